"""#15 tenants, against real distribution registries on loopback (an htpasswd-protected artifact store
and a cluster registry): readiness is decided per namespace with that namespace's own access, and a
``tag@digest`` source never moves the shared tag. Kubernetes is the in-memory stand-in of
test_reconcile_copy."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from cluster_registry import reference
from cluster_registry.reconcile import status as st
from tests.integration.test_reconcile_copy import PASSWORD, USER, MemoryKube, reconcile_all, reconciler, secret
from tests.support import ociimages
from tests.support.registry import Registry, run_registry


@pytest.fixture(scope="module")
def registries(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Registry, Registry]]:
    root = tmp_path_factory.mktemp("tenants")
    with run_registry(root / "store", htpasswd=(USER, PASSWORD)) as store, run_registry(root / "cluster") as cluster:
        yield store, cluster


async def test_a_tenant_without_access_is_not_ready_from_anothers_copy_until_it_has_its_own(
    registries: tuple[Registry, Registry],
) -> None:
    store, cluster = registries
    src = ociimages.Pusher(store.host, auth=(USER, PASSWORD))
    image = ociimages.push_image(src, "private/reporter", "1.0", layers=[20_000], seed=31)
    source = f"{store.host}/private/reporter:1.0"
    local = reference.local_repository(reference.parse(source))
    kube = MemoryKube()
    kube.secrets["tenant-b/store"] = secret(store)
    r = reconciler(kube, store, cluster)
    try:
        r.on_event("ADDED", kube.add("tenant-b", "reporter", source, ["store"]))
        r.on_event("ADDED", kube.add("tenant-a", "reporter", source, ["store"]))  # A names a Secret it lacks
        await reconcile_all(r, kube)
        assert kube.status("tenant-b/reporter")["phase"] == "Ready"
        assert ociimages.Pusher(cluster.host).get_manifest(local, image.digest) is not None  # B's copy is there
        a = kube.status("tenant-a/reporter")
        cond = st.condition(a["conditions"], "Ready")
        assert a["phase"] == "Failed" and "digest" not in a and cond is not None
        assert cond["reason"] in ("Authentication", "AccessDenied"), cond
        assert "namespace tenant-a's own access" in cond["message"] and "not found: tenant-a/store" in cond["message"]

        # A's own wrong credential does not help either
        kube.secrets["tenant-a/store"] = secret(store, password="wrong")
        assert await r.recheck_secrets()
        await reconcile_all(r, kube)
        assert kube.status("tenant-a/reporter")["phase"] == "Failed"
        # A's own valid credential: verified upstream (the image is not copied again) and Ready, same digest
        kube.secrets["tenant-a/store"] = secret(store)
        assert await r.recheck_secrets()
        await reconcile_all(r, kube)
        a = kube.status("tenant-a/reporter")
        assert a["phase"] == "Ready" and a["digest"] == image.digest == kube.status("tenant-b/reporter")["digest"]
        assert kube.status("tenant-b/reporter")["phase"] == "Ready"
    finally:
        await r.session.close()  # type: ignore[union-attr]


async def test_a_tag_at_digest_source_never_moves_the_shared_tag(registries: tuple[Registry, Registry]) -> None:
    store, cluster = registries
    src, dst = ociimages.Pusher(store.host, auth=(USER, PASSWORD)), ociimages.Pusher(cluster.host)
    old = ociimages.push_image(src, "shared/app", "1.0", layers=[10_000], seed=41)
    new = ociimages.push_image(src, "shared/app", "1.0", layers=[12_000], seed=42)  # the tag moved upstream
    tagged = f"{store.host}/shared/app:1.0"
    local = reference.local_repository(reference.parse(tagged))
    kube = MemoryKube()
    for ns in ("tenant-a", "tenant-b"):
        kube.secrets[f"{ns}/store"] = secret(store)
    r = reconciler(kube, store, cluster)
    try:
        r.on_event("ADDED", kube.add("tenant-b", "app", tagged, ["store"]))
        await reconcile_all(r, kube)
        assert dst.get_manifest(local, "1.0") == (new.manifest, new.media_type)
        # A pins the old digest under the same tag: copied by digest, the tag B's pods follow stays
        r.on_event("ADDED", kube.add("tenant-a", "app", f"{tagged}@{old.digest}", ["store"]))
        await reconcile_all(r, kube)
        a = kube.status("tenant-a/app")
        assert a["phase"] == "Ready" and a["digest"] == old.digest
        assert dst.get_manifest(local, "1.0") == (new.manifest, new.media_type)
        assert dst.get_manifest(local, old.digest) == (old.manifest, old.media_type)
        assert dst.tags(local) == ["1.0"]
        # the pinned copy's re-verification looks at its digest, not at the tag (else it would recopy forever)
        clock = r.clock
        r.clock = lambda: clock() + 2 * r.config.verify_interval
        before = r.metrics.copies.labels("ready")._value.get()
        await reconcile_all(r, kube)
        assert r.metrics.copies.labels("ready")._value.get() == before
        assert dst.get_manifest(local, "1.0") == (new.manifest, new.media_type)
    finally:
        await r.session.close()  # type: ignore[union-attr]
