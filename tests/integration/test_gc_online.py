"""GC's online mark (#20): distribution's mark runs while writes go on; the window then spares what
was written since the mark began and sweeps the rest. Against a real registry on loopback, its
storage and the real `registry garbage-collect`; the lock is a stand-in (tests/e2e/test_gc.py runs
the same path behind the real gate and Lease).

The writes land between the mark and the window, the widest gap the design allows."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from cluster_registry.errors import TemporaryError
from cluster_registry.gc import storage, sweep
from cluster_registry.gc.lock import DrainReport
from cluster_registry.gc.run import Options, Report, _locked
from tests.support.ociimages import Image, Pusher, layer_chunks, push_image
from tests.support.registry import Registry, run_registry


class Lock:
    """The lock as ``_locked`` sees it: drained at once; safe for its first ``safe_for`` polls."""

    def __init__(self, safe_for: int = 10**9) -> None:
        self.left = safe_for

    def wait_drained(self, timeout: float) -> DrainReport:
        return DrainReport(acked=["gate-0"])

    def safe(self) -> bool:
        self.left -= 1
        return self.left >= 0


def age(root: Path, seconds: float = 3600) -> None:
    """Everything stored so far was written an hour ago (files and directories)."""
    t = time.time() - seconds
    for d, dirs, files in os.walk(root / "docker/registry/v2"):
        for name in dirs + files:
            os.utime(os.path.join(d, name), (t, t))


def blobs(root: Path) -> set[str]:
    return set(storage.blob_sizes(root))


def pulls(p: Pusher, image: Image, ref: str | None = None) -> None:
    got = p.get_manifest(image.repo, ref or image.digest)
    assert got is not None and got[0] == image.manifest, f"{image.repo}@{image.digest} does not resolve"
    for digest, size in image.blobs:
        assert p.blob_sha256(image.repo, digest) == (digest, size), f"{image.repo}: blob {digest} lost"


def delete(p: Pusher, image: Image) -> None:
    assert p.request("DELETE", f"/v2/{image.repo}/manifests/{image.digest}", image.repo)[0] == 202


def gc(reg: Registry, config: str, writes_between: object = None, lock: Lock | None = None,
       writes_after: object = None) -> Report:  # fmt: skip
    """One online mark, then ``writes_between()``, then the window, then ``writes_after()`` and the
    layer links of the blobs taken; the trash is emptied after (the order ``run._window`` keeps)."""
    marked = sweep.mark(config, str(reg.storage))
    if callable(writes_between):
        writes_between()
    rep = Report()
    opts = Options(registry_url=reg.url, storage_root=str(reg.storage), storage_size=1 << 30)
    try:
        _locked(opts, lock or Lock(), config, rep, storage.blob_sizes(reg.storage), marked)  # type: ignore[arg-type]
        if callable(writes_after):
            writes_after()
        sweep.unlink_after(str(reg.storage), marked)
    finally:
        sweep.empty_trash(str(reg.storage))
    return rep


@pytest.fixture
def reg(tmp_path: Path) -> Registry:
    with run_registry(tmp_path / "r") as r:
        yield r  # type: ignore[misc]


@pytest.fixture
def config(reg: Registry) -> str:
    path = sweep.default_config(str(reg.storage))
    yield path  # type: ignore[misc]
    os.unlink(path)


def test_pushes_between_the_mark_and_the_window_survive(reg: Registry, config: str) -> None:
    p = Pusher(reg.host)
    keep = push_image(p, "online/keep", "v1", layers=[3000, 2000], seed=1)
    old = push_image(p, "online/old", "v1", layers=[2500, 1200], seed=2)
    gone = push_image(p, "online/gone", "v1", layers=[2200], seed=3)
    junk = os.urandom(700)
    junk_digest = p.push_blob("online/junk", junk)  # an abandoned upload: linked, named by no manifest
    delete(p, old)
    age(reg.storage)
    delete(p, gone)  # just before the mark, as GC's soft delete does
    new: dict[str, object] = {}

    def writes() -> None:
        # the deleted image pushed again: its blobs are still linked, so only the manifest is sent
        p.put_manifest(old.repo, "again", old.manifest, old.media_type)
        new["fresh"] = push_image(p, "online/fresh", "v1", layers=[1800], seed=4)
        new["inflight"] = p.push_blob("online/fresh", os.urandom(900))  # its manifest is still on its way
        p.push_blob("online/other", junk)  # the abandoned blob uploaded again into another repository

    def after() -> None:  # once writes resume: one of gone's layers uploaded again, before its link goes
        assert p.push_blob_stream(gone.repo, layer_chunks(3 * 100_003, 2200), 2200) == gone.blobs[1][0]

    marked_garbage = {d for d, _ in old.blobs + gone.blobs} | {old.digest, gone.digest, junk_digest}
    rep = gc(reg, config, writes, writes_after=after)
    assert rep.sparedSinceMark >= len(old.blobs) + 2, rep  # old's blobs, its manifest, the junk blob
    for image in (keep, old, new["fresh"]):
        pulls(p, image)  # type: ignore[arg-type]
    assert p.blob_exists("online/fresh", str(new["inflight"])) and p.blob_exists("online/other", junk_digest)
    assert p.blob_sha256(gone.repo, gone.blobs[1][0]) == gone.blobs[1], "the upload after the window kept its link"
    left = blobs(reg.storage)
    swept = {gone.digest, gone.blobs[0][0]}  # its manifest and config; its layer came back
    assert not swept & left and marked_garbage - left == swept, "the real garbage was swept"
    # distribution's own mark now finds only what was written after ours and is named by no manifest
    # (the next run takes it): everything any manifest names is there, and no layer link dangles.
    after = sweep.run(config, dry_run=True)
    assert set(after.deleted_digests) == {str(new["inflight"]), junk_digest, gone.blobs[1][0]}, after
    assert {d for _, d in after.layer_links} <= set(after.deleted_digests), after.layer_links  # none dangles


def test_deletes_between_the_mark_and_the_window_lose_nothing_referenced(reg: Registry, config: str) -> None:
    p = Pusher(reg.host)
    shared = (424242, 3000)
    a = push_image(p, "online/a", "v1", layers=[shared, 1000], seed=5)
    b = push_image(p, "online/a", "v2", layers=[shared, 1100], seed=6)
    c = push_image(p, "online/c", "v1", layers=[1300], seed=7)
    age(reg.storage)
    rep = gc(reg, config, lambda: delete(p, a))
    assert rep.blobsDeleted == 0  # the mark saw a referenced: its blobs wait for the next run
    pulls(p, b)
    pulls(p, c)
    assert {d for d, _ in a.blobs} <= blobs(reg.storage)
    age(reg.storage)
    gc(reg, config)
    pulls(p, b)
    pulls(p, c)
    left = blobs(reg.storage)
    own = {a.digest, a.blobs[0][0], a.blobs[2][0]}  # its manifest, config and own layer; blobs[1] is shared
    assert not own & left, "a's own blobs go in the next run"
    assert sweep.run(config, dry_run=True).deleted_digests == []


def test_a_lock_lost_at_the_end_of_the_window_puts_everything_back(reg: Registry, config: str) -> None:
    p = Pusher(reg.host)
    doomed = push_image(p, "online/doomed", "v1", layers=[2000, 1000], seed=8)
    delete(p, doomed)
    age(reg.storage)
    before = blobs(reg.storage)
    with pytest.raises(TemporaryError, match="lapsed"):
        gc(reg, config, lock=Lock(safe_for=1))  # safe when the renames start, lapsed once they are done
    assert blobs(reg.storage) == before, "the garbage renamed aside was put back"
    assert sweep.run(config, dry_run=True).deleted_digests, "and is still garbage for the next run"
