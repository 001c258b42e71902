"""The artifact reconciler's copy path against real distribution registries on loopback.

Kubernetes is an in-memory stand-in here (the e2e layer has the real API); the copy engine, the
registries, pull-secret credentials, status and the re-verification HEAD are real.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from datetime import datetime, timezone
from typing import Any

import pytest

from cluster_registry import reference
from cluster_registry.reconcile import status as st
from cluster_registry.reconcile.artifacts import ArtifactReconciler, Config
from cluster_registry.reconcile.metrics import artifact_metrics
from cluster_registry.gate.protocol import LeaseView
from cluster_registry.oci import Credentials
from cluster_registry.oci.client import RegistrySession
from tests.integration.test_token_service import PUSHERS, Sources
from tests.support import ociimages
from tests.support.registry import Registry, run_registry
from tests.support.tokenfront import local_front

USER, PASSWORD = "puller", "pw-Secr3t-value"


class MemoryKube:
    """Just enough of kubeio.Kube: objects, status patches, secrets, events."""

    def __init__(self) -> None:
        self.objects: dict[str, dict[str, Any]] = {}
        self.secrets: dict[str, bytes] = {}
        self.writes: list[dict[str, Any]] = []
        self.events: list[tuple[str, str, str, str]] = []
        self.rv = 0

    def add(self, ns: str, name: str, source: str, secrets: list[str] | None = None) -> dict[str, Any]:
        self.rv += 1
        obj = {"apiVersion": "clusterregistry.io/v1alpha1", "kind": "Artifact",
               "metadata": {"namespace": ns, "name": name, "uid": name, "generation": 1, "resourceVersion": str(self.rv)},
               "spec": {"sourceArtifact": source, "pullSecrets": secrets or []}}
        self.objects[f"{ns}/{name}"] = obj
        return copy.deepcopy(obj)

    def patch_status(self, plural: str, ns: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        obj = self.objects[f"{ns}/{name}"]
        status = obj.setdefault("status", {})
        status.update({k: v for k, v in patch.items() if v is not None})
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        self.writes.append(patch)
        return copy.deepcopy(obj)

    def docker_config(self, ns: str, name: str) -> bytes | None:
        return self.secrets.get(f"{ns}/{name}")

    def event(self, obj: dict[str, Any], type_: str, reason: str, note: str, **_: Any) -> None:
        self.events.append((obj["metadata"]["name"], type_, reason, note))

    def status(self, key: str) -> dict[str, Any]:
        return dict(self.objects[key].get("status") or {})


@pytest.fixture(scope="module")
def registries(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Registry, Registry]]:
    root = tmp_path_factory.mktemp("reconcile")
    with run_registry(root / "store", htpasswd=(USER, PASSWORD)) as store, run_registry(root / "cluster") as cluster:
        yield store, cluster


async def reconcile_all(r: ArtifactReconciler, kube: MemoryKube) -> None:
    while (dest := r.queue.pop(r.clock())) is not None:
        before = len(kube.writes)
        r.queue.done(dest, await r.process(dest))
        await r.settled()  # the status writes and Events, sent off the worker's path
        for key in list(kube.objects)[:]:
            if len(kube.writes) != before:
                r.on_event("MODIFIED", copy.deepcopy(kube.objects[key]))


def reconciler(kube: MemoryKube, store: Registry, cluster: Registry) -> ArtifactReconciler:
    config = Config(registry_host=cluster.host, registry_insecure=True, insecure_registries=frozenset({store.host}))
    r = ArtifactReconciler(kube, config, artifact_metrics())  # type: ignore[arg-type]
    r.session = RegistrySession(config.registry_options())
    return r


def secret(store: Registry, user: str = USER, password: str = PASSWORD) -> bytes:
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    return json.dumps({"auths": {store.host: {"auth": auth}}}).encode()


async def test_copies_images_keeps_digests_and_recopies_a_wiped_copy(registries: tuple[Registry, Registry]) -> None:
    store, cluster = registries
    src = ociimages.Pusher(store.host, auth=(USER, PASSWORD))
    dst = ociimages.Pusher(cluster.host)
    image = ociimages.push_image(src, "cnf/app", "1.0", layers=[30_000, 70_000], seed=11)
    index = ociimages.push_index(src, "cnf/multi", "2.0", ociimages.PLATFORMS[:2], layers=[20_000], seed=12)
    kube = MemoryKube()
    for ns in ("tenant-a", "tenant-b"):
        kube.secrets[f"{ns}/store"] = secret(store)
    r = reconciler(kube, store, cluster)
    try:
        app = f"{store.host}/cnf/app:1.0"
        r.on_event("ADDED", kube.add("tenant-a", "app", app, ["store"]))
        r.on_event("ADDED", kube.add("tenant-b", "app", app, ["store"]))
        pinned = f"{store.host}/cnf/multi:2.0@{index.digest}"
        r.on_event("ADDED", kube.add("tenant-a", "multi", pinned, ["store"]))
        await reconcile_all(r, kube)

        local_app = reference.local_repository(reference.parse(app))
        for key in ("tenant-a/app", "tenant-b/app"):
            s = kube.status(key)
            assert s["phase"] == "Ready", s
            assert s["digest"] == image.digest
            assert s["size"] == len(image.manifest) + sum(size for _, size in image.all_blobs())
            assert s["localArtifact"] == f"{cluster.host}/{local_app}:1.0"
        ociimages.assert_copied(src, dst, image, local_app)
        assert dst.get_manifest(local_app, "1.0") == (image.manifest, image.media_type)
        assert r.metrics.copies.labels("ready")._value.get() == 2  # one per destination, not per Artifact

        m = kube.status("tenant-a/multi")
        assert m["phase"] == "Ready" and m["digest"] == index.digest
        assert sorted(m["platforms"]) == sorted(f"{p['os']}/{p['architecture']}" + (f"/{p['variant']}" if "variant" in p else "")
                                                for p in ociimages.PLATFORMS[:2])
        local_multi = reference.local_repository(reference.parse(pinned))
        ociimages.assert_copied(src, dst, index, local_multi)
        assert "pw-Secr3t" not in json.dumps(kube.writes) + json.dumps(kube.events)

        # The cluster registry loses the image (wiped, or GC'd): the next verification recopies it.
        req = urllib.request.Request(f"http://{cluster.host}/v2/{local_app}/manifests/{image.digest}", method="DELETE")
        with urllib.request.urlopen(req) as resp:  # noqa: S310 - loopback
            assert resp.status == 202
        assert dst.get_manifest(local_app, "1.0") is None
        clock = r.clock
        r.clock = lambda: clock() + 2 * r.config.verify_interval
        await reconcile_all(r, kube)
        assert dst.get_manifest(local_app, "1.0") == (image.manifest, image.media_type)
        assert any(e[2] == "Missing" for e in kube.events)
        assert kube.status("tenant-a/app")["phase"] == "Ready"
    finally:
        await r.session.close()  # type: ignore[union-attr]


async def test_missing_image_and_bad_credentials_fail_with_clear_reasons(registries: tuple[Registry, Registry]) -> None:
    store, cluster = registries
    src = ociimages.Pusher(store.host, auth=(USER, PASSWORD))
    ociimages.push_image(src, "cnf/locked", "1.0", layers=[1000], seed=21)
    kube = MemoryKube()
    kube.secrets["t/wrong"] = secret(store, password="not-the-password")
    r = reconciler(kube, store, cluster)
    try:
        r.on_event("ADDED", kube.add("t", "gone", f"{store.host}/cnf/app:does-not-exist", []))
        r.on_event("ADDED", kube.add("t", "denied", f"{store.host}/cnf/locked:1.0", ["wrong"]))
        await reconcile_all(r, kube)
    finally:
        await r.session.close()  # type: ignore[union-attr]
    gone = st.condition(kube.status("t/gone")["conditions"], "Ready")
    denied = st.condition(kube.status("t/denied")["conditions"], "Ready")
    assert kube.status("t/gone")["phase"] == kube.status("t/denied")["phase"] == "Failed"
    assert gone is not None and denied is not None
    # anonymous against an htpasswd store is refused before "not found" can be said: both are auth
    assert denied["reason"] in ("Authentication", "AccessDenied"), denied
    assert store.host in denied["message"] and "not-the-password" not in json.dumps(kube.status("t/denied"))
    assert gone["reason"] in ("Authentication", "NotFound"), gone
    # permanent errors wait long before the next try
    nxt = r.queue.next_due()
    assert nxt is not None and nxt - r.clock() > 200


async def test_missing_tag_with_valid_credentials_is_not_found(registries: tuple[Registry, Registry], tmp_path: Path) -> None:
    store, cluster = registries
    kube = MemoryKube()
    kube.secrets["t/store"] = secret(store)
    r = reconciler(kube, store, cluster)
    try:
        r.on_event("ADDED", kube.add("t", "gone", f"{store.host}/cnf/app:does-not-exist", ["store"]))
        await reconcile_all(r, kube)
    finally:
        await r.session.close()  # type: ignore[union-attr]
    cond = st.condition(kube.status("t/gone")["conditions"], "Ready")
    assert cond is not None and cond["reason"] == "NotFound" and "does-not-exist" in cond["message"], cond


async def test_gc_write_lock_defers_the_copy_and_nothing_is_lost(registries: tuple[Registry, Registry], tmp_path: Path) -> None:
    """The real token front: distribution with ``auth: token`` and the token service (in-process, the
    lock driven through its ``GateState``) refusing push tokens while GC holds the lock."""
    store, _ = registries
    src = ociimages.Pusher(store.host, auth=(USER, PASSWORD))
    image = ociimages.push_image(src, "cnf/locked-window", "1.0", layers=[5000], seed=31)
    with local_front(tmp_path, Sources(), shared=True) as front:
        front.state.observe(LeaseView("gc", "gc-gen-1", datetime.now(timezone.utc), 30))  # GC holds the lock
        kube = MemoryKube()
        kube.secrets["t/store"] = secret(store)
        pusher = "artifact-reconciler"
        config = Config(registry_host=front.registry.host, registry_insecure=True, insecure_registries=frozenset({store.host}),
                        registry_credentials=Credentials(pusher, PUSHERS[pusher]))  # fmt: skip
        r = ArtifactReconciler(kube, config, artifact_metrics())  # type: ignore[arg-type]
        r.session = RegistrySession(config.registry_options())
        try:
            r.on_event("ADDED", kube.add("t", "img", f"{store.host}/cnf/locked-window:1.0", ["store"]))
            await reconcile_all(r, kube)
            s = kube.status("t/img")
            assert s["phase"] == "Deferred", s
            assert st.condition(s["conditions"], "Ready")["reason"] == "WriteLocked"  # type: ignore[index]
            nxt = r.queue.next_due()
            assert nxt is not None and nxt - r.clock() < 30  # soon, not a long backoff
            front.state.observe(LeaseView("gc", None, datetime.now(timezone.utc), 30))  # GC released it
            clock = r.clock
            r.clock = lambda: clock() + 60
            await reconcile_all(r, kube)
        finally:
            await r.session.close()  # type: ignore[union-attr]
        s = kube.status("t/img")
        assert s["phase"] == "Ready" and s["digest"] == image.digest
        local = reference.local_repository(reference.parse(f"{store.host}/cnf/locked-window:1.0"))
        reader = ociimages.Pusher(front.registry.host, auth=(pusher, PUSHERS[pusher]), realm=front.realm)
        assert reader.get_manifest(local, "1.0") == (image.manifest, image.media_type)
