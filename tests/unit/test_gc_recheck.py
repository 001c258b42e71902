"""GC's re-check after its deletes: an image referenced again meanwhile is reported, with an Event."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

from cluster_registry.gc.run import Options, Report, _recheck
from cluster_registry.gc.select import Artifact, Inputs, Manifest, Workload, select

NOW = datetime(2026, 1, 10, tzinfo=timezone.utc)
OLD = NOW - timedelta(days=2)
D1, D2 = "sha256:" + "1" * 64, "sha256:" + "2" * 64
REPO = "myacr.azurecr.io/app"


class FakeView:
    def __init__(self, workloads: list[Workload], artifacts: list[Artifact]) -> None:
        self._w, self._a = workloads, artifacts
        self.events: list[tuple[str, str, str]] = []

    def workloads(self) -> list[Workload]:
        return self._w

    def artifacts(self) -> list[Artifact]:
        return self._a

    def components(self) -> list[Any]:
        return []

    def event(self, a: Artifact, reason: str, message: str, type_: str = "Normal") -> None:
        self.events.append((a.name, reason, type_))


def test_an_image_referenced_again_during_the_deletes_is_reported() -> None:
    manifests = (Manifest(REPO, D1, tags=frozenset({"1.0"}), pushed_at=OLD), Manifest(REPO, D2, tags=frozenset({"2.0"}), pushed_at=OLD))
    before = Inputs(manifests, (), (), (), frozenset(), NOW, timedelta(hours=1))
    sel = select(before)
    assert {m.digest for m in sel.delete_manifests} == {D1, D2}
    rep = Report(deleted=[f"{REPO}@{D1}", f"{REPO}@{D2}"])
    # Meanwhile a pod of a new Deployment came up with 1.0, and the webhook recorded its Artifact.
    view = FakeView([Workload("Pod", "cnf", "p", "u1", ("myacr.azurecr.io/app:1.0",))],
                    [Artifact("cnf", "app-1", "myacr.azurecr.io/app:1.0", created=NOW)])  # fmt: skip
    _recheck(Options(registry_url="", storage_root=None, storage_size=1), view, before, sel, rep)  # type: ignore[arg-type]
    assert rep.manifestsRaced == 1
    assert view.events == [("app-1", "ImageGarbageCollected", "Warning")]


def test_nothing_reported_when_nothing_changed() -> None:
    manifests = (Manifest(REPO, D1, tags=frozenset({"1.0"}), pushed_at=OLD),)
    before = Inputs(manifests, (), (), (), frozenset(), NOW, timedelta(hours=1))
    sel = select(before)
    rep = Report(deleted=[f"{REPO}@{D1}"])
    view = FakeView([], [])
    _recheck(Options(registry_url="", storage_root=None, storage_size=1), view, before, sel, rep)  # type: ignore[arg-type]
    assert rep.manifestsRaced == 0 and view.events == []
