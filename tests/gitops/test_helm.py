"""The chart under helm 3 (`helm`, the project's pin) and helm 4 (`helm4`, v4.3.x) alike.

* lint --strict passes with both for every chart/ci/*-values.yaml;
* `helm template` renders the same documents with both (same --kube-version, tests included): byte for
  byte but for each document's trailing whitespace and where the MutatingWebhookConfiguration sorts;
* the same lifecycle with each on the local cluster: install (hooks and --wait), upgrade, an upgrade
  the validate hook refuses (the release stays on the last good revision), uninstall.
"""

from __future__ import annotations

import json
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.chart.chartlib import CI_VALUES
from tests.gitops.lib import CHART, KUBE_VERSION, tool
from tests.support.cluster import Cluster, CommandError, adopt_crds, exclusive_chart

HELMS = ("helm", "helm4")
P = "global.networkfunctionextension."

# Installs hold the cluster-wide chart lock (tests.support.cluster.exclusive_chart), waited for first.
pytestmark = pytest.mark.timeout(1800)


def run(helm: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool(helm), *args], capture_output=True, text=True, check=False, timeout=300)


def test_both_are_the_versions_we_pin() -> None:
    assert run("helm", "version", "--short").stdout.startswith("v3.")
    assert run("helm4", "version", "--short").stdout.startswith("v4.3.")


@pytest.mark.parametrize("helm", HELMS)
@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.name)
def test_lint_strict(helm: str, values: Path) -> None:
    result = run(helm, "lint", "--strict", "--kube-version", KUBE_VERSION, str(CHART), "-f", str(values))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout


def documents(text: str) -> list[str]:
    return text.split("\n---\n")


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.name)
def test_helm3_and_helm4_render_the_same_documents(values: Path) -> None:
    """The same documents, byte for byte but for two things helm 4 changed:
    - helm 3 trims the whitespace that ends each rendered document, helm 4 keeps it;
    - helm 4's install order knows MutatingWebhookConfiguration (helm 3 sorts it among the kinds it does
      not know, by name), so with cert-manager's Certificate and Issuer it comes before them.
    """
    args = ("template", "r", str(CHART), "-n", "crs", "--kube-version", KUBE_VERSION, "-f", str(values))
    three, four = run("helm", *args), run("helm4", *args)
    assert three.returncode == 0 and four.returncode == 0, three.stderr + four.stderr
    docs3 = [d.rstrip() for d in documents(three.stdout)]
    docs4 = [d.rstrip() for d in documents(four.stdout)]
    assert len(docs3) > 10 and sorted(docs3) == sorted(docs4)

    def others(docs: list[str]) -> list[str]:
        return [d for d in docs if "\nkind: MutatingWebhookConfiguration\n" not in d]

    assert others(docs3) == others(docs4)


def test_both_refuse_a_bad_value_the_same_way() -> None:
    args = ("template", "r", str(CHART), "--kube-version", KUBE_VERSION,
            "--set", f"{P}enableClusterRegistry=false", "--set", f"{P}enableEarlyLoading=true")
    errors = [run(h, *args) for h in HELMS]
    assert all(e.returncode != 0 and "enableEarlyLoading=true needs" in e.stderr for e in errors), errors


# -- the lifecycle on the local cluster ------------------------------------------------------------

QUICK = {"global": {"networkfunctionextension": {
    "clusterRegistry": {"storageSize": "1Gi", "highAvailability": {"enabled": False}, "autoScaling": {"enabled": False}},
    "webhook": {"highAvailability": {"enabled": False}, "autoScaling": {"enabled": False},
                # no namespace matches: the webhook is installed and serving but rewrites nobody's pods
                "pod": {"mutation": {"matchConditionExpression": "request.namespace == 'no-such-namespace'"}}},
    "hooks": {"backoffLimit": 0},
}}}


@pytest.fixture
def namespace(cluster: Cluster) -> Iterator[str]:
    name = f"helm-{secrets.token_hex(3)}"
    cluster.kubectl("create", "namespace", name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.mark.parametrize("helm", HELMS)
def test_install_upgrade_refused_upgrade_uninstall(cluster: Cluster, namespace: str, helm: str, tmp_path: Path) -> None:
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump(QUICK))
    release = f"h{secrets.token_hex(2)}"
    with exclusive_chart():
        adopt_crds(cluster, release, namespace)
        try:
            cluster.run(helm, "install", release, str(CHART), "-n", namespace, "-f", str(values),
                        "--wait", "--wait-for-jobs", "--timeout", "300s", timeout=420)
            deployments = cluster.kubectl("get", "deployments", "-n", namespace, "-o", "name").split()
            assert len(deployments) == 4, deployments  # registry, webhook, both reconcilers

            cluster.run(helm, "upgrade", release, str(CHART), "-n", namespace, "-f", str(values),
                        "--set", f"{P}clusterRegistry.registryService.scale=small",
                        "--wait", "--wait-for-jobs", "--timeout", "300s", timeout=420)
            registry = cluster.kubectl_json("get", "deployment", "-n", namespace, f"{release}-cluster-registry-registry")
            assert registry["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]["memory"] == "250Mi"

            with pytest.raises(CommandError) as refused:
                cluster.run(helm, "upgrade", release, str(CHART), "-n", namespace, "-f", str(values),
                            "--set", f"{P}clusterRegistry.registryService.scale=large",
                            "--set", f"{P}clusterRegistry.storageClassName=does-not-exist",
                            "--wait", "--wait-for-jobs", "--timeout", "240s", timeout=300)
            # Refused at render time (the chart looks the volume up) or by the pre-upgrade validate hook.
            assert 'the new value is "does-not-exist"' in str(refused.value) or \
                ("pre-upgrade" in str(refused.value) and "validate" in str(refused.value)), refused.value
            history = json.loads(cluster.run(helm, "history", release, "-n", namespace, "-o", "json").stdout)
            assert [h["status"] for h in history] in (["superseded", "deployed"], ["superseded", "deployed", "failed"]), history
            registry = cluster.kubectl_json("get", "deployment", "-n", namespace, f"{release}-cluster-registry-registry")
            assert registry["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]["memory"] == "250Mi"

            cluster.run(helm, "uninstall", release, "-n", namespace, "--wait", "--timeout", "120s", timeout=180)
            assert not cluster.kubectl("get", "deployments,services,cronjobs", "-n", namespace, "-o", "name").strip()
            # helm 4 lists releases in every status by default and has no --all; helm 3 needs it
            every = ["--all"] if Path(helm).name == "helm" else []
            assert release not in cluster.run(helm, "list", "-n", namespace, *every, "--short").stdout
        finally:
            cluster.run(helm, "uninstall", release, "-n", namespace, "--wait", "--timeout", "120s", check=False, timeout=180)
