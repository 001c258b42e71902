"""Shared by the GitOps tests: the toolchain's GitOps binaries, Go modules as file trees, chart renders."""

from __future__ import annotations

import functools
import json
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.chart.chartlib import BIN, CHART, KUBE_VERSION, ROOT, tool

__all__ = ["BIN", "CHART", "KUBE_VERSION", "ROOT", "go_module", "monitoring_crd", "render", "tool"]

# The Prometheus Operator's CRDs ship in its Go module (example/prometheus-operator-crd/).
PROMETHEUS_OPERATOR = ("github.com/prometheus-operator/prometheus-operator", "v0.85.0")


@functools.cache
def go_module(path: str, version: str) -> Path:
    """The unpacked module in the Go module cache (downloaded through the module proxy when missing)."""
    out = subprocess.run(["go", "mod", "download", "-json", f"{path}@{version}"], capture_output=True, text=True,
                         check=False, cwd=ROOT, timeout=600)
    info = json.loads(out.stdout or "{}")
    assert out.returncode == 0 and "Dir" in info, f"go mod download {path}@{version}: {info.get('Error') or out.stderr}"
    return Path(info["Dir"])


def monitoring_crd(kind_plural: str) -> Path:
    """The upstream CRD file of monitoring.coreos.com/<kind_plural> (prometheusrules, servicemonitors)."""
    return go_module(*PROMETHEUS_OPERATOR) / "example" / "prometheus-operator-crd" / f"monitoring.coreos.com_{kind_plural}.yaml"


def render(values: dict[str, Any], *, helm: str = "helm", release: str = "cr", namespace: str = "crns",
           extra: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """`helm template` of chart/ with VALUES (a dict), parsed."""
    proc = subprocess.run([tool(helm), "template", release, str(CHART), "-n", namespace, "--kube-version", KUBE_VERSION,
                           "-f", "-", *extra], input=yaml.safe_dump(values), capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]
