"""Early loading's pure parts: image collection, progress lines, the wait loop, the timeout report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cluster_registry import reference
from cluster_registry.errors import ConfigError
from cluster_registry.install import preload as PL
from cluster_registry.install import progress as P
from cluster_registry.units import parse_duration

A = P.Wanted("myacr.azurecr.io/a:1", "cnf", "earlyLoading.images")
B = P.Wanted("docker.io/library/nginx:1.25", "cnf", "--image")
C = P.Wanted("ghcr.io/org/c:2", "other", "component other/c")


def art(w: P.Wanted, phase: str | None, *, size: int = 0, message: str = "") -> dict[str, Any]:
    status: dict[str, Any] = {}
    if phase:
        status["phase"] = phase
    if size:
        status["size"] = size
    if message:
        status["conditions"] = [{"type": "Ready", "status": "False", "reason": "X", "message": message}]
    return {"metadata": {"name": w.artifact, "namespace": w.namespace}, "status": status}


def objects(*items: tuple[P.Wanted, dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(w.namespace, w.artifact): o for w, o in items}


def test_artifact_names_follow_reference_module() -> None:
    assert A.artifact == reference.artifact_name("myacr.azurecr.io/a:1")


def test_summary_counts_bytes_and_phases() -> None:
    s = P.summarize(
        [A, B, C],
        objects((A, art(A, "Ready", size=3 * 1024 * 1024)), (B, art(B, "Copying")), (C, art(C, "Deferred"))),
    )
    assert (s.ready, s.total, s.bytes_ready, s.done, s.deferred) == (1, 3, 3 * 1024 * 1024, False, 1)
    assert s.line() == (
        "1 of 3 images Ready (3.0 MiB); 1 Copying, 1 Deferred (Deferred: the registry's GC write lock is held; waiting)"
    )


def test_not_ready_report_names_each_image_and_why() -> None:
    s = P.summarize([A, B, C], objects((A, art(A, "Failed", message="manifest unknown: a:1 not found")), (B, art(B, None))))
    assert s.not_ready_report() == [
        f"NOT READY myacr.azurecr.io/a:1 (Artifact cnf/{A.artifact}, from earlyLoading.images): Failed: manifest unknown: a:1 not found",
        f"NOT READY docker.io/library/nginx:1.25 (Artifact cnf/{B.artifact}, from --image): Pending: waiting for the artifact reconciler",
        f"NOT READY ghcr.io/org/c:2 (Artifact other/{C.artifact}, from component other/c): Missing: the Artifact does not exist",
    ]


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_wait_returns_when_all_ready_and_waits_through_deferred() -> None:
    clock = FakeClock()
    script = [
        objects((A, art(A, "Deferred")), (B, art(B, "Copying"))),
        objects((A, art(A, "Deferred")), (B, art(B, "Ready", size=10))),
        objects((A, art(A, "Ready", size=5)), (B, art(B, "Ready", size=10))),
    ]
    reads: list[int] = []

    def read() -> dict[tuple[str, str], dict[str, Any]]:
        reads.append(1)
        return script[min(len(reads) - 1, len(script) - 1)]

    s = PL.wait([A, B], read, timeout=60, poll=2, fail_fast=False, clock=clock, sleep=clock.sleep)
    assert s.done and s.bytes_ready == 15
    assert len(reads) == 3 and clock.now == 4


def test_wait_times_out_with_what_is_missing() -> None:
    clock = FakeClock()
    s = PL.wait([A, B], lambda: objects((A, art(A, "Ready"))), timeout=10, poll=3, fail_fast=False, clock=clock, sleep=clock.sleep)
    assert not s.done
    assert clock.now == 10
    assert [line.split(" (")[0] for line in s.not_ready_report()] == ["NOT READY docker.io/library/nginx:1.25"]


def test_wait_fail_fast_stops_on_failed_but_not_on_deferred() -> None:
    clock = FakeClock()
    s = PL.wait([A], lambda: objects((A, art(A, "Deferred"))), timeout=6, poll=2, fail_fast=True, clock=clock, sleep=clock.sleep)
    assert clock.now == 6 and not s.done  # Deferred: waited to the deadline
    clock = FakeClock()
    s = PL.wait([A], lambda: objects((A, art(A, "Failed"))), timeout=60, poll=2, fail_fast=True, clock=clock, sleep=clock.sleep)
    assert clock.now == 0 and s.failed


def test_normalise_dedupes_per_namespace_and_rejects_bad_refs() -> None:
    got = PL.normalise([("nginx:1.25", "cnf", "a"), ("docker.io/library/nginx:1.25", "cnf", "b"), ("nginx:1.25", "x", "c")])
    assert [(w.source, w.namespace, w.origin) for w in got] == [
        ("docker.io/library/nginx:1.25", "cnf", "a"),
        ("docker.io/library/nginx:1.25", "x", "c"),
    ]
    with pytest.raises(ConfigError, match=r"'Bad:ref!'.*\(from chart ./c\)"):
        PL.normalise([("Bad:ref!", "cnf", "chart ./c")])


def test_values_images(tmp_path: Path) -> None:
    f = tmp_path / "v.yaml"
    f.write_text("global:\n  networkfunctionextension:\n    earlyLoading:\n      images: [a.io/x:1, b.io/y:2]\n      timeout: 10m\n")
    assert PL.values_images(str(f)) == (["a.io/x:1", "b.io/y:2"], "10m")
    f.write_text("earlyLoading:\n  images: a-string\n")
    with pytest.raises(ConfigError, match="earlyLoading.images must be a list"):
        PL.values_images(str(f))


@pytest.mark.parametrize(("text", "seconds"), [("30m", 1800), ("1h30m", 5400), ("90s", 90), ("45", 45), ("500ms", 0.5)])
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "10x", "1h 30m"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_human() -> None:
    assert P.human(0) == "0 B"
    assert P.human(1536) == "1.5 KiB"
    assert P.human(5 * 1024**3) == "5.0 GiB"


def test_dry_run_lists_images_without_a_cluster(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from cluster_registry.cli import cli

    values = tmp_path / "v.yaml"
    values.write_text("earlyLoading:\n  images: [nginx:1.25, 'myacr.azurecr.io/a:1']\n")
    out = CliRunner().invoke(cli, ["preload", "--values", str(values), "--image", "nginx:1.25", "--namespace", "cnf", "--dry-run"])
    assert out.exit_code == 0, out.output
    assert out.output.splitlines() == [
        f"would preload docker.io/library/nginx:1.25 as Artifact cnf/{reference.artifact_name('docker.io/library/nginx:1.25')} (from --image)",
        f"would preload myacr.azurecr.io/a:1 as Artifact cnf/{reference.artifact_name('myacr.azurecr.io/a:1')} (from earlyLoading.images)",
    ]
    bad = CliRunner().invoke(cli, ["preload", "--image", "UPPER/Case", "--namespace", "cnf", "--dry-run"])
    assert bad.exit_code == 1 and "cannot preload" in bad.output
    usage = CliRunner().invoke(cli, ["preload", "--image", "a", "--timeout", "soon", "--dry-run"])
    assert usage.exit_code == 2


class FakeCustom:
    """Enough of CustomObjectsApi for Artifact creation: create (409 when present), get, patch."""

    def __init__(self, existing: dict[tuple[str, str], dict[str, Any]] | None = None) -> None:
        self.objects = dict(existing or {})
        self.patches: list[dict[str, Any]] = []

    def create_namespaced_custom_object(self, group: str, version: str, ns: str, plural: str, body: dict[str, Any]) -> dict[str, Any]:
        from kubernetes.client import ApiException

        key = (ns, body["metadata"]["name"])
        if key in self.objects:
            raise ApiException(status=409, reason="Conflict")
        self.objects[key] = body
        return body

    def get_namespaced_custom_object(self, group: str, version: str, ns: str, plural: str, name: str) -> dict[str, Any]:
        return self.objects[(ns, name)]

    def patch_namespaced_custom_object(self, group: str, version: str, ns: str, plural: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        self.patches.append(patch)
        obj = self.objects[(ns, name)]
        obj["metadata"].setdefault("labels", {}).update(patch.get("metadata", {}).get("labels", {}))
        obj["spec"].update(patch.get("spec", {}))
        return obj


def test_component_images_and_artifacts_owned_by_the_component() -> None:
    component = {
        "metadata": {"name": "cnf", "namespace": "ops", "uid": "u-1"},
        "spec": {"images": ["nginx:1.25"]},
        "status": {"images": [{"sourceArtifact": "ghcr.io/org/side:1", "phase": "Pending"}]},
    }
    fake = FakeCustom({("ops", "cnf"): component})
    images, obj = PL.component_images(fake, "ops", "cnf")
    assert images == ["nginx:1.25", "ghcr.io/org/side:1"]
    wanted = PL.normalise([(i, "ops", "component ops/cnf") for i in images])
    PL._ensure_all(fake, wanted, {("ops", "cnf"): obj}, "cnf", ("secret",))
    art = fake.objects[("ops", reference.artifact_name("docker.io/library/nginx:1.25"))]
    assert art["spec"] == {"sourceArtifact": "docker.io/library/nginx:1.25"}  # pull secrets are the release namespace's
    assert art["metadata"]["labels"] == {
        "app.kubernetes.io/managed-by": "cluster-registry",
        "clusterregistry.io/loaded-by": "preload",
        "clusterregistry.io/component": "cnf",
    }
    assert art["metadata"]["ownerReferences"] == [
        {"apiVersion": "clusterregistry.io/v1alpha1", "kind": "Component", "name": "cnf", "uid": "u-1"}
    ]


def test_existing_artifact_is_kept_and_gains_label_and_pull_secret() -> None:
    name = reference.artifact_name("docker.io/library/nginx:1.25")
    existing = {"metadata": {"name": name, "namespace": "cnf", "labels": {"x": "y"}}, "spec": {"sourceArtifact": "docker.io/library/nginx:1.25", "pullSecrets": ["a"]}}
    fake = FakeCustom({("cnf", name): existing})
    PL._ensure_all(fake, PL.normalise([("nginx:1.25", "cnf", "--image")]), {}, "cnf", ("b",))
    assert fake.patches == [
        {"metadata": {"labels": {"app.kubernetes.io/managed-by": "cluster-registry", "clusterregistry.io/loaded-by": "preload"}}, "spec": {"pullSecrets": ["a", "b"]}}
    ]
    PL._ensure_all(fake, PL.normalise([("nginx:1.25", "cnf", "--image")]), {}, "cnf", ("b",))
    assert len(fake.patches) == 1  # nothing left to change: no second patch


class FakeCore:
    """read_namespaced_config_map of CoreV1Api: the release's early-loading ConfigMap, or 404."""

    def __init__(self, uid: str | None) -> None:
        self.uid = uid

    def read_namespaced_config_map(self, name: str, ns: str) -> Any:
        from types import SimpleNamespace

        from kubernetes.client import ApiException

        if self.uid is None:
            raise ApiException(status=404, reason="Not Found")
        return SimpleNamespace(metadata=SimpleNamespace(name=name, namespace=ns, uid=self.uid))


def test_recorded_component_lists_the_images_owned_by_the_release_configmap() -> None:
    body = PL.recorded_component("r-early-loading", "ops", ["myacr.azurecr.io/a:1", "myacr.azurecr.io/a:1"], "cm-uid")
    assert body["spec"] == {"images": ["myacr.azurecr.io/a:1"], "pullSecrets": []}
    assert body["metadata"]["ownerReferences"] == [{"apiVersion": "v1", "kind": "ConfigMap", "name": "r-early-loading", "uid": "cm-uid"}]
    assert body["metadata"]["labels"]["clusterregistry.io/loaded-by"] == "preload"
    assert PL.recorded_component("x", "ops", [], "u")["spec"]["images"] == [], "an emptied list is recorded, so GC may collect"
    assert PL.recorded_component("x", "ops", [], "u", ["b", "a", "b"])["spec"]["pullSecrets"] == ["a", "b"]


def test_record_component_creates_then_replaces_the_list() -> None:
    fake = FakeCustom()
    first = PL.record_component(FakeCore("cm-1"), fake, "rec", "ops", ["myacr.azurecr.io/a:1", "myacr.azurecr.io/b:1"])
    assert first["spec"]["images"] == ["myacr.azurecr.io/a:1", "myacr.azurecr.io/b:1"]
    PL.record_component(FakeCore("cm-2"), fake, "rec", "ops", ["myacr.azurecr.io/b:1"])
    (patch,) = fake.patches
    assert patch["spec"]["images"] == ["myacr.azurecr.io/b:1"], "a merge patch replaces the whole list: a removed image goes"
    assert patch["metadata"]["ownerReferences"][0]["uid"] == "cm-2", "a re-created ConfigMap becomes the owner"


def test_record_component_without_the_release_configmap_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="ConfigMap ops/rec .* does not exist"):
        PL.record_component(FakeCore(None), FakeCustom(), "rec", "ops", ["myacr.azurecr.io/a:1"])


def test_recorded_images_become_dependents_of_the_component() -> None:
    """The preload Job's Artifacts are owned by the recording Component (so GC and the component
    reconciler treat them as the Component's), not left ownerless for GC to collect."""
    fake = FakeCustom()
    comp = PL.record_component(FakeCore("cm-1"), fake, "rec", "ops", ["myacr.azurecr.io/a:1"])
    comp["metadata"]["uid"] = "comp-uid"
    wanted = PL.normalise([("myacr.azurecr.io/a:1", "ops", "component ops/rec")])
    PL._ensure_all(fake, wanted, {("ops", "rec"): comp}, "ops", ())
    art = fake.objects[("ops", reference.artifact_name("myacr.azurecr.io/a:1"))]
    assert art["metadata"]["labels"]["clusterregistry.io/component"] == "rec"
    assert art["metadata"]["ownerReferences"][0]["uid"] == "comp-uid"
