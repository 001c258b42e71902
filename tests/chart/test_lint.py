"""helm lint --strict, ct lint and kubeconform -strict (offline schemas) over every chart/ci/*-values.yaml."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.chart.chartlib import CHART, CI_VALUES, KUBE_VERSION, ROOT, helm_template, tool

SCHEMA_DIR = ROOT / "schema"
LOCATION = "{{ .Group }}/{{ .ResourceKind }}_{{ .ResourceAPIVersion }}.json"


def pinned_kubernetes() -> str:
    """The k8s.io/kubernetes version ci/toolchain builds the control plane from (ci/k8s/go.mod)."""
    match = re.search(r"^(?:require)?\s*k8s\.io/kubernetes (v[0-9.]+)", (ROOT / "ci" / "k8s" / "go.mod").read_text(), re.M)
    assert match, "ci/k8s/go.mod requires k8s.io/kubernetes"
    return match.group(1)


def swagger() -> Path:
    """The OpenAPI of the pinned Kubernetes module (in the Go module cache since ci/toolchain built it)."""
    version = pinned_kubernetes()
    roots = []
    if shutil.which("go"):
        out = subprocess.run(["go", "env", "GOMODCACHE"], capture_output=True, text=True, check=False).stdout.strip()
        if out:
            roots.append(Path(out))
    roots.append(Path.home() / "go" / "pkg" / "mod")
    for root in roots:
        path = root / "k8s.io" / f"kubernetes@{version}" / "api" / "openapi-spec" / "swagger.json"
        if path.is_file():
            return path
    raise AssertionError(f"k8s.io/kubernetes@{version} is not in the Go module cache: run ci/toolchain")


@pytest.fixture(scope="module")
def k8s_schemas() -> Path:
    """Strict JSON schemas of every Kubernetes kind, generated once into .cache (git-ignored)."""
    out = ROOT / ".cache" / "kubeconform" / f"k8s-{pinned_kubernetes()}"
    stamp = out / ".complete"
    if not stamp.exists():
        result = subprocess.run([sys.executable, str(SCHEMA_DIR / "openapi2jsonschema.py"), "k8s", str(swagger()), str(out)],
                                capture_output=True, text=True, check=False)
        assert result.returncode == 0, result.stderr
        stamp.touch()
    return out


def kubeconform(schemas: Path, *files: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("kubeconform"), "-strict", "-summary", "-output", "text",
         "-schema-location", f"{schemas}/{LOCATION}", "-schema-location", f"{SCHEMA_DIR}/{LOCATION}", *map(str, files)],
        capture_output=True, text=True, check=False,
    )


def test_there_is_a_values_file_per_case() -> None:
    names = {p.name.removesuffix("-values.yaml") for p in CI_VALUES}
    assert {"default", "ha-off", "gc-disabled", "early-loading", "url-webhook", "object-storage"} <= names


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.name)
def test_helm_lint_strict(values: Path) -> None:
    result = subprocess.run([tool("helm"), "lint", "--strict", "--kube-version", KUBE_VERSION, str(CHART), "-f", str(values)],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout


def test_ct_lint() -> None:
    env = dict(os.environ, PATH=f"{ROOT / '.cache' / 'bin'}{os.pathsep}{ROOT / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}")
    result = subprocess.run([tool("ct"), "lint", "--config", "ci/ct/ct.yaml"], cwd=ROOT, env=env,
                            capture_output=True, text=True, check=False, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "All charts linted successfully" in output, output
    assert output.count("Linting chart with values file") >= len(CI_VALUES), "ct lints every chart/ci values file"


def test_kubeconform_strict_over_every_case(k8s_schemas: Path, tmp_path: Path) -> None:
    files = []
    for values in CI_VALUES:
        rendered = helm_template("-f", str(values))
        assert rendered.returncode == 0, rendered.stderr
        path = tmp_path / values.name
        path.write_text(rendered.stdout)
        files.append(path)
    examples = tmp_path / "custom-resources.yaml"
    examples.write_text(EXAMPLE_RESOURCES)
    result = kubeconform(k8s_schemas, *files, examples)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = result.stdout.strip().splitlines()[-1]
    assert "Invalid: 0, Errors: 0, Skipped: 0" in summary, summary


def test_kubeconform_schemas_are_strict(k8s_schemas: Path, tmp_path: Path) -> None:
    """A negative control: a misspelt field fails, in a core kind and in our CRDs."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\nspec:\n  selector: {matchLabels: {a: b}}\n"
        "  template:\n    metadata: {labels: {a: b}}\n    spec:\n      containers: [{name: c, image: i, imagePullPolicyy: Always}]\n"
        "---\napiVersion: clusterregistry.io/v1alpha1\nkind: Artifact\nmetadata: {name: a, namespace: n}\n"
        "spec: {sourceArtifact: docker.io/library/nginx:latest, owner: []}\n"
        "---\napiVersion: clusterregistry.io/v1alpha1\nkind: Artifact\nmetadata: {name: b, namespace: n}\n"
        "spec: {sourceArtifact: x}\nstatus: {phase: Done}\n"
    )
    result = kubeconform(k8s_schemas, bad)
    assert result.returncode != 0
    assert "imagePullPolicyy" in result.stdout and "'owner' not allowed" in result.stdout, result.stdout
    assert "/status/phase" in result.stdout, result.stdout
    assert "Invalid: 3" in result.stdout


EXAMPLE_RESOURCES = """\
apiVersion: clusterregistry.io/v1alpha1
kind: Artifact
metadata:
  name: docker.io-library-nginx-latest
  namespace: cnf
spec:
  sourceArtifact: docker.io/library/nginx:latest
  pullSecrets: [acr]
  owners:
    - {apiVersion: apps/v1, kind: Deployment, name: web, uid: 0b8c6c2e-0000-4000-8000-000000000001}
status:
  phase: Ready
  digest: sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef
  size: 52428800
  platforms: [linux/amd64, linux/arm64]
  localArtifact: registry.example:5000/docker.io/library/nginx:latest
  lastSyncTime: "2026-01-01T00:00:00Z"
  observedGeneration: 1
  conditions:
    - {type: Ready, status: "True", reason: Copied, message: ok, lastTransitionTime: "2026-01-01T00:00:00Z"}
---
apiVersion: clusterregistry.io/v1alpha1
kind: Component
metadata:
  name: upf
  namespace: cnf
spec:
  images: [myacr.azurecr.io/upf:1.0.0]
  chart: {ref: oci://myacr.azurecr.io/charts/upf, version: 1.0.0, values: {replicas: 2}, pullSecrets: [acr]}
status:
  observedGeneration: 1
  ready: 1/1
  images:
    - {sourceArtifact: myacr.azurecr.io/upf:1.0.0, artifact: myacr.azurecr.io-upf-1.0.0, phase: Ready, message: ""}
  conditions:
    - {type: Ready, status: "True", reason: AllReady}
"""
