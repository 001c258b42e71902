"""examples/flux and examples/argocd are valid for the tools they are written for.

* Every Flux object validates (kubeconform strict) against its CRD: OCIRepository and Kustomization
  from the source- and kustomize-controller modules ci/toolchain builds, HelmRelease from
  github.com/fluxcd/helm-controller/api generated with controller-gen as upstream generates it (the
  controller's own module is not served by the Go module proxy).
* The manifests Flux applies, after Flux's own variable substitution defaults, are a valid Component
  (the chart's CRD schema) and a Deployment.
* Argo CD: the kustomization merges both health checks into argocd-cm under Argo CD's key names, and
  the Application ignores exactly the field the chart's certs Job fills in (the rendered
  MutatingWebhookConfiguration has no caBundle).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from tests.gitops import flux as fluxlib
from tests.chart.test_lint import k8s_schemas  # noqa: F401 - fixture: the pinned Kubernetes' schemas
from tests.gitops.lib import ROOT, render, tool

FLUX = ROOT / "examples" / "flux"
ARGO = ROOT / "examples" / "argocd"
LOCATION = "{{ .Group }}/{{ .ResourceKind }}_{{ .ResourceAPIVersion }}.json"


def helmrelease_crd(out: Path) -> Path:
    """HelmRelease's CRD from helm-controller's API types (ci/flux/helmrelease-crd pins both)."""
    proc = subprocess.run([tool("controller-gen"), "crd", "paths=github.com/fluxcd/helm-controller/api/v2",
                           f"output:crd:dir={out}"], cwd=ROOT / "ci" / "flux" / "helmrelease-crd",
                          capture_output=True, text=True, check=False, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return out / "helm.toolkit.fluxcd.io_helmreleases.yaml"


def schemas(tmp: Path) -> Path:
    out = tmp / "schemas"
    crds = [helmrelease_crd(tmp / "crd"), *fluxlib.crd_files()]
    proc = subprocess.run([sys.executable, str(ROOT / "schema" / "openapi2jsonschema.py"), "crd", *map(str, crds), str(out)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    return out


def kubeconform(schema_dirs: list[Path], *files: Path) -> subprocess.CompletedProcess[str]:
    locations = [a for d in schema_dirs for a in ("-schema-location", f"{d}/{LOCATION}")]
    return subprocess.run([tool("kubeconform"), "-strict", "-summary", *locations, *map(str, files)],
                          capture_output=True, text=True, check=False)


def flux_defaults(text: str) -> str:
    """Flux's postBuild substitution with no variables set: `${VAR:=default}` becomes the default."""
    return re.sub(r"\$\{[A-Z_]+:=([^}]*)\}", r"\1", text)


def test_flux_objects_validate_against_their_crds(tmp_path: Path) -> None:
    files = sorted(p for p in FLUX.rglob("*.yaml") if "manifests" not in p.parts)
    kinds = {yaml.safe_load(p.read_text())["kind"] for p in files}
    assert kinds == {"OCIRepository", "Kustomization", "HelmRelease"}
    result = kubeconform([schemas(tmp_path)], *files)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Valid: {len(files)}, Invalid: 0, Errors: 0, Skipped: 0" in result.stdout, result.stdout


def test_the_schemas_catch_a_misspelt_field(tmp_path: Path) -> None:
    doc = yaml.safe_load((FLUX / "cluster-registry" / "helmrelease.yaml").read_text())
    doc["spec"]["driftDetection"]["ignores"] = doc["spec"]["driftDetection"].pop("ignore")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc))
    result = kubeconform([schemas(tmp_path)], bad)
    assert result.returncode != 0 and "ignores" in result.stdout, result.stdout


def test_flux_applied_manifests_are_a_component_and_a_deployment(k8s_schemas: Path, tmp_path: Path) -> None:
    files = []
    for path in sorted((FLUX / "cnf" / "manifests").rglob("*.yaml")):
        out = tmp_path / path.name
        out.write_text(flux_defaults(path.read_text()))
        assert "${" not in out.read_text()
        files.append(out)
    component = yaml.safe_load(files[0].read_text())
    assert component["spec"]["images"] == ["myacr.azurecr.io/cnf/frontend:1.0.0", "myacr.azurecr.io/cnf/init:1.0.0"]
    result = kubeconform([ROOT / "schema", k8s_schemas], *files)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Valid: 2, Invalid: 0, Errors: 0, Skipped: 0" in result.stdout, result.stdout


def test_argocd_kustomization_installs_both_health_checks() -> None:
    kustomization = yaml.safe_load((ARGO / "kustomization.yaml").read_text())
    (generator,) = kustomization["configMapGenerator"]
    assert generator["name"] == "argocd-cm" and generator["behavior"] == "merge"
    files = dict(f.split("=", 1) for f in generator["files"])
    assert files == {f"resource.customizations.health.clusterregistry.io_{k}": f"health/{k.lower()}.lua"
                     for k in ("Component", "Artifact")}
    for path in files.values():
        assert (ARGO / path).is_file()
    for resource in kustomization["resources"]:
        assert yaml.safe_load((ARGO / resource).read_text())["kind"] == "Application"


def test_argocd_application_ignores_the_cabundle_the_chart_leaves_to_its_job() -> None:
    app = yaml.safe_load((ARGO / "application.yaml").read_text())
    (ignore,) = app["spec"]["ignoreDifferences"]
    assert (ignore["group"], ignore["kind"]) == ("admissionregistration.k8s.io", "MutatingWebhookConfiguration")
    assert ignore["jqPathExpressions"] == [".webhooks[]?.clientConfig.caBundle"]
    assert "RespectIgnoreDifferences=true" in app["spec"]["syncPolicy"]["syncOptions"]
    assert app["spec"]["source"]["path"] == "chart"
    docs: list[dict[str, Any]] = render({"global": {"networkfunctionextension": {}}})
    (webhook,) = [d for d in docs if d["kind"] == "MutatingWebhookConfiguration"]
    for hook in webhook["webhooks"]:
        assert "service" in hook["clientConfig"] and "caBundle" not in hook["clientConfig"]
