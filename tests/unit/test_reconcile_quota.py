"""Per-namespace storage quota and the maximum image size (#16 item 9): one namespace cannot fill the
volume for everyone. Run through the artifact reconciler's loop with its in-memory fakes."""

from __future__ import annotations

import dataclasses
from typing import Any

from cluster_registry import reference
from cluster_registry.oci.auth import Credentials
from cluster_registry.oci.copy import CopyResult, ImageTooLargeError
from cluster_registry.reconcile import status as st
from tests.unit.test_reconcile_artifacts import Clock, FakeKube, Script, drain, make, result

QUOTA = 10_000


def ready(kube: FakeKube, ns: str, name: str, source: str, size: int) -> dict[str, Any]:
    obj = kube.add(ns, name, source)
    kube.objects[f"{ns}/{name}"]["status"] = obj["status"] = {"phase": "Ready", "size": size, "observedGeneration": 1}
    return obj


async def test_a_namespace_at_its_quota_gets_nothing_more_and_others_are_unaffected() -> None:
    kube, clock, script = FakeKube(), Clock(), Script(result())
    r = make(script, kube, clock, namespace_quota=QUOTA)
    r.on_event("ADDED", ready(kube, "greedy", "big", "ghcr.io/x/big:1", QUOTA))
    for ns in ("greedy", "modest"):
        r.on_event("ADDED", kube.add(ns, "nginx", "docker.io/library/nginx:1.25"))
    await drain(r, kube)
    refused = kube.status("greedy/nginx")
    assert refused["phase"] == "Failed"
    cond = st.condition(refused["conditions"], "Ready")
    assert cond is not None and cond["reason"] == "QuotaExceeded"
    assert "namespace greedy's images would pass its quota of 10000 bytes (it holds 10000 bytes" in cond["message"]
    assert kube.status("modest/nginx")["phase"] == "Ready"  # copied for the namespace with room
    assert [c[1] for c in script.calls] == ["127.0.0.1:5000/docker.io/library/nginx:1.25"]


async def test_a_copy_that_would_pass_the_quota_is_refused_for_that_namespace() -> None:
    kube, clock, script = FakeKube(), Clock(), Script(dataclasses.replace(result(), size=4242))
    r = make(script, kube, clock, namespace_quota=QUOTA)
    r.on_event("ADDED", ready(kube, "a", "old", "ghcr.io/x/old:1", QUOTA - 1000))
    r.on_event("ADDED", kube.add("a", "new", "ghcr.io/x/new:1"))
    await drain(r, kube)
    s = kube.status("a/new")
    assert s["phase"] == "Failed" and st.condition(s["conditions"], "Ready")["reason"] == "QuotaExceeded"  # type: ignore[index]


async def test_the_copy_is_limited_to_what_the_namespace_has_left() -> None:
    kube, clock = FakeKube(), Clock()
    limits: list[int] = []

    async def copy(src: reference.Reference, dst: reference.Reference, creds: Credentials | None, max_size: int = 0) -> CopyResult:
        limits.append(max_size)
        raise ImageTooLargeError(f"image too large: over the maximum image size of {max_size} bytes")

    r = make(Script(result()), kube, clock, namespace_quota=QUOTA, max_image_size=50_000)
    r.copy = copy  # type: ignore[method-assign]
    r.on_event("ADDED", ready(kube, "a", "old", "ghcr.io/x/old:1", 3000))
    r.on_event("ADDED", kube.add("a", "new", "ghcr.io/x/new:1"))
    await drain(r, kube)
    assert limits == [QUOTA - 3000]  # the quota's remainder, under the maximum image size
    assert st.condition(kube.status("a/new")["conditions"], "Ready")["reason"] == "QuotaExceeded"  # type: ignore[index]
    # without a quota the maximum image size applies, and says so
    kube2, limits[:] = FakeKube(), []
    r2 = make(Script(result()), kube2, clock, max_image_size=50_000)
    r2.copy = copy  # type: ignore[method-assign]
    r2.on_event("ADDED", kube2.add("a", "new", "ghcr.io/x/new:1"))
    await drain(r2, kube2)
    assert limits == [50_000]
    assert st.condition(kube2.status("a/new")["conditions"], "Ready")["reason"] == "ImageTooLarge"  # type: ignore[index]
