"""`cluster-registry validate --values FILE --chart chart --schema-only` says what `helm template` says.

Each bad values file is given to both; the lines after helm's "values don't meet the specifications"
header must be the same, so a CI job or a GitOps repository learns before helm runs what helm would
refuse.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.chart.chartlib import CHART, helm_template

NFE = "networkfunctionextension"
BAD_VALUES = {
    "wrong-type": {"enableClusterRegistry": "yes"},
    "not-in-enum": {"clusterRegistry": {"registryService": {"scale": "huge"}}},
    "pattern": {"clusterRegistry": {"storageSize": "100GB"}},
    "range": {"clusterRegistry": {"clusterRegistryGCThreshold": 101}},
    "unknown-key": {"enableClusterRegistyr": True},
    "several": {"enableEarlyLoading": 1, "clusterRegistry": {"clusterRegistryGCThreshold": -1}},
    "required-removed": {"earlyLoading": {"timeout": None}},  # a null deletes the chart's default
    "any-of": {"hooks": {"resources": {"requests": {"cpu": "lots"}}}},  # one line, its alternatives under it
}


def ours(values: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "cluster_registry", "validate", "--values", str(values), "--chart", str(CHART), "--schema-only", *extra]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def violations(text: str) -> list[str]:
    """The violation lines, nested ones (an anyOf's alternatives) with their indent; helm's order varies."""
    return sorted(line for line in text.splitlines() if line.lstrip().startswith("- at "))


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_the_same_refusal_as_helm(tmp_path: Path, case: str) -> None:
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"global": {NFE: BAD_VALUES[case]}}))
    helm = helm_template("-f", str(values))
    assert helm.returncode != 0 and "don't meet the specifications of the schema" in helm.stderr, helm.stderr
    got = ours(values)
    assert got.returncode == 1, got.stderr
    assert "values don't meet the specifications of the schema(s) in the following chart(s):" in got.stdout
    assert violations(got.stdout) == violations(helm.stderr) != []


def test_good_values_pass_without_a_cluster(tmp_path: Path) -> None:
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"global": {NFE: {"clusterRegistry": {"registryService": {"scale": "small"}}}}}))
    assert helm_template("-f", str(values)).returncode == 0
    got = ours(values, "--kubeconfig", str(tmp_path / "no-such-kubeconfig"))
    assert got.returncode == 0 and "meet the schema of chart cluster-registry" in got.stdout, got.stdout + got.stderr
