"""GC's registry-side adapters against a real distribution registry (no cluster needed): the
filesystem inventory and usage, deletes through the API, and the mark-and-sweep run."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster_registry.gc import registry as gcreg
from cluster_registry.gc import storage, sweep
from cluster_registry.gc.select import Inputs, select
from tests.support.ociimages import PLATFORMS, Pusher, push_image, push_index
from tests.support.registry import Registry, run_registry


@pytest.fixture
def reg(tmp_path: Path) -> Iterator[Registry]:
    with run_registry(tmp_path / "r") as r:
        yield r


def test_inventory_and_usage_match_what_was_pushed(reg: Registry) -> None:
    p = Pusher(reg.host)
    a = push_image(p, "h.example.com/team/a", "v1", layers=[5000, 3000], seed=1)
    push_image(p, "h.example.com/team/a", "v2", layers=[(1, 5000), 100], seed=2)  # (shares no layer: seeds differ)
    idx = push_index(p, "h.example.com/multi", "v1", PLATFORMS[:2], layers=[2000], seed=3)
    untagged = push_image(p, "h.example.com/team/a", None, layers=[700], seed=4)
    inv = {(m.repository, m.digest): m for m in storage.inventory(reg.storage)}
    assert inv[("h.example.com/team/a", a.digest)].tags == frozenset({"v1"})
    assert inv[("h.example.com/team/a", untagged.digest)].tags == frozenset()
    top = inv[("h.example.com/multi", idx.digest)]
    assert top.is_index and set(top.children) == {c.digest for c in idx.children}
    assert all(("h.example.com/multi", c.digest) in inv for c in idx.children)
    assert list(storage.repositories(reg.storage)) == ["h.example.com/multi", "h.example.com/team/a"]
    # Usage is the sum of the blob files' sizes, manifests included.
    sizes = storage.blob_sizes(reg.storage)
    assert sizes[a.digest] == len(a.manifest) and sizes[a.blobs[1][0]] == 5000
    used = storage.usage(reg.storage)
    on_disk = sum(f.stat().st_size for f in (reg.storage / "docker/registry/v2/blobs").rglob("data"))
    assert used.bytes == on_disk and used.blobs == len(sizes)


@pytest.mark.parametrize("mode", ["distribution", "trash"])
def test_soft_delete_then_sweep_frees_exactly_the_unreferenced_blobs(reg: Registry, mode: str) -> None:
    p = Pusher(reg.host)
    keep = push_index(p, "h.example.com/keep", "v1", PLATFORMS[:2], layers=[4000], seed=10, shared_base=3000)
    gone = push_index(p, "h.example.com/gone", "v1", PLATFORMS[:2], layers=[6000], seed=11)
    gone_plain = push_image(p, "h.example.com/gone", "v2", layers=[9000], seed=12)
    old = 1_000_000_000.0
    for link in (reg.storage / "docker/registry/v2/repositories").rglob("revisions/*/*/link"):
        os.utime(link, (old, old))
    from datetime import datetime, timedelta, timezone

    from cluster_registry.gc.select import Workload

    inputs = Inputs(tuple(storage.inventory(reg.storage)), (), (Workload("Pod", "ns", "p", "u", ("h.example.com/keep:v1",)),),
                    (), frozenset({"u"}), datetime.now(timezone.utc), timedelta(hours=1))  # fmt: skip
    sel = select(inputs)
    doomed = {m.digest for m in sel.delete_manifests}
    assert doomed == {gone.digest, *(c.digest for c in gone.children), gone_plain.digest}
    before = storage.usage(reg.storage)
    out = gcreg.delete_sync(reg.url, [[(m.repository, m.digest) for m in w] for w in sel.delete_waves])
    assert sorted(o.status for o in out) == ["deleted"] * 4
    assert storage.usage(reg.storage) == before, "a soft delete frees nothing by itself"
    config = sweep.default_config(str(reg.storage))
    if mode == "trash":
        res = sweep.run_trash(config, str(reg.storage))
        assert storage.usage(reg.storage).blobs < before.blobs, "the garbage is out of the registry's sight"
        assert any(sweep.trash_root(str(reg.storage)).rglob("data"))
        sweep.empty_trash(str(reg.storage))
        assert not sweep.trash_root(str(reg.storage)).exists()
        layer_links = list((reg.storage / "docker/registry/v2/repositories/h.example.com/gone").rglob("_layers/*/*/link"))
        assert layer_links == [], "the deleted images' layer links went too, as distribution's sweep does"
    else:
        res = sweep.run(config)
    after = storage.usage(reg.storage)
    gone_blobs = {d for i in (gone, gone_plain) for d, _ in i.all_blobs()} | {m.digest for m in gone.all_manifests()}
    gone_blobs.add(gone_plain.digest)
    assert res.blobs_deleted == len(gone_blobs) and set(res.deleted_digests) == gone_blobs
    assert before.bytes - after.bytes == sum(storage_sizes for storage_sizes in _sizes(gone, gone_plain))
    for m in keep.all_manifests():
        assert p.get_manifest("h.example.com/keep", m.digest) is not None
    for d, size in keep.all_blobs():
        assert p.blob_sha256("h.example.com/keep", d) == (d, size)
    assert p.get_manifest("h.example.com/gone", "v2") is None and p.tags("h.example.com/gone") == []


def _sizes(*images: object) -> list[int]:
    out: dict[str, int] = {}
    for img in images:
        for m in img.all_manifests():  # type: ignore[attr-defined]
            out[m.digest] = len(m.manifest)
            for d, n in m.blobs:
                out[d] = n
    return list(out.values())


def test_parse_output_of_a_real_dry_run(reg: Registry) -> None:
    p = Pusher(reg.host)
    img = push_image(p, "h.example.com/x", "v1", layers=[100], seed=20)
    gcreg.delete_sync(reg.url, [[("h.example.com/x", img.digest)]])
    res = sweep.run(sweep.default_config(str(reg.storage)), dry_run=True)
    assert res.blobs_deleted == 3 and res.blobs_marked == 0  # manifest, config, layer; nothing left to mark
    assert storage.usage(reg.storage).blobs == 3, "a dry run deletes nothing"


def test_api_inventory_agrees_with_the_filesystem_on_tagged_images(reg: Registry) -> None:
    p = Pusher(reg.host)
    push_image(p, "h.example.com/a", "v1", layers=[1000, 2000], seed=30)
    push_image(p, "h.example.com/a", "v2", layers=[1500], seed=31)
    push_index(p, "h.example.com/m", "v1", PLATFORMS[:3], layers=[500], seed=32)
    api, sizes = gcreg.inventory_sizes(reg.url)
    used = sum(sizes.values())
    fs = storage.inventory(reg.storage)
    assert {(m.repository, m.digest, m.tags, m.children) for m in api} == {
        (m.repository, m.digest, m.tags, m.children) for m in fs
    }
    assert used == storage.usage(reg.storage).bytes  # nothing unreferenced yet: the two agree


def test_signatures_and_referrers_stay_with_their_image_and_go_with_it(reg: Registry) -> None:
    from datetime import datetime, timedelta, timezone

    from cluster_registry.gc.select import Workload
    from tests.support.ociimages import push_referrer, push_signature

    p = Pusher(reg.host)
    repo = "h.example.com/signed"
    kept = push_image(p, repo, "v1", layers=[100], seed=40)
    gone = push_image(p, repo, "v0", layers=[100], seed=41)
    attached = {
        "kept": {push_signature(p, repo, kept.digest).digest, push_referrer(p, repo, kept).digest},
        "gone": {push_signature(p, repo, gone.digest, suffix="att").digest, push_referrer(p, repo, gone).digest},
    }
    inv = storage.inventory(reg.storage)
    assert any(m.subject == kept.digest for m in inv), "the OCI 1.1 subject is read from the manifest"
    later = datetime.now(timezone.utc) + timedelta(days=1)  # everything is past the grace period
    sel = select(Inputs(tuple(inv), (), (Workload("Pod", "ns", "p", "u", (f"{repo}:v1",)),), (), frozenset({"u"}),
                        later, timedelta(hours=1)))  # fmt: skip
    doomed = {m.digest for m in sel.delete_manifests}
    assert attached["kept"].isdisjoint(doomed) and kept.digest not in doomed
    fallback = {m.digest for m in inv if f"sha256-{gone.digest[7:]}" in m.tags}
    assert doomed == {gone.digest} | attached["gone"] | fallback


def test_a_registry_that_never_stored_anything_is_not_swept(tmp_path: Path) -> None:
    """distribution's garbage-collect fails on empty storage; GC must see that case and skip the window."""
    with run_registry(tmp_path / "empty") as empty:
        assert not storage.has_repositories(empty.storage)
        config = sweep.default_config(str(empty.storage))
        try:
            with pytest.raises(Exception, match="garbage-collect failed"):
                sweep.run(config)
        finally:
            os.unlink(config)
        push_image(Pusher(empty.host), "app", "v1", layers=[1024], seed=7)
        assert storage.has_repositories(empty.storage)
