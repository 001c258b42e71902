"""GC's online mark (#20): distribution's mark runs while writes go on; the window then spares what
was written since the mark began and sweeps the rest. Against a real registry on loopback, its
storage and the real `registry garbage-collect`; the lock is a stand-in (tests/e2e/test_gc.py runs
the same path behind the real gate and Lease).

The writes land between the mark and the window, the widest gap the design allows."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from cluster_registry.errors import TemporaryError
from cluster_registry.gc import storage, sweep
from cluster_registry.gc.lock import DrainReport
from cluster_registry.gc.run import Options, Report, _locked
from tests.support.ociimages import HTTPError, Image, Pusher, layer_chunks, push_image
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
       writes_after: object = None, writes_aside: object = None) -> Report:  # fmt: skip
    """One online mark, then ``writes_between()``, then the set-aside, then ``writes_aside()``, then
    the window, then ``writes_after()`` and the layer links of the blobs taken; the trash is emptied
    after (the order ``run._window`` keeps)."""
    marked = sweep.mark(config, str(reg.storage))
    if callable(writes_between):
        writes_between()
    rep = Report()
    opts = Options(registry_url=reg.url, storage_root=str(reg.storage), storage_size=1 << 30)
    try:
        sweep.set_aside(str(reg.storage), marked)
        if callable(writes_aside):
            writes_aside()
        _locked(opts, lock or Lock(), config, rep, storage.blob_sizes(reg.storage), marked)  # type: ignore[arg-type]
        if callable(writes_after):
            writes_after()
        sweep.unlink_after(str(reg.storage), marked)
    finally:
        marked.aside.restore()  # as ``run._window`` does when the window fails
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


def body(p: Pusher, repo: str, digest: str) -> bytes:
    st, _, data = p.request("GET", f"/v2/{repo}/blobs/{digest}", repo)
    assert st == 200, (repo, digest, st)
    return data


def test_a_push_that_found_its_blobs_before_the_set_aside_uploads_them_again(reg: Registry, config: str) -> None:
    """Between the set-aside and the window (writes go on), a set-aside blob is answered for as one
    never uploaded: a HEAD (the 'blob exists' short-circuit) says 404, a cross-repository mount falls
    back to an upload, and the manifest that names it is refused. So a copy that probed or mounted
    before the set-aside cannot end with a manifest whose blob is gone: it uploads again and lands."""
    p = Pusher(reg.host)
    keep = push_image(p, "aside/keep", "v1", layers=[1500], seed=11)
    old = push_image(p, "aside/old", "v1", layers=[2100, 1300], seed=12)
    gone = push_image(p, "aside/gone", "v1", layers=[900], seed=13)
    data = {d: body(p, old.repo, d) for d, _ in old.blobs}
    delete(p, old)
    delete(p, gone)
    age(reg.storage)
    layer = old.blobs[-1][0]
    assert p.blob_exists(old.repo, layer), "before the set-aside a HEAD finds it (its link is still there)"

    def writes_aside() -> None:
        assert not p.blob_exists(old.repo, layer), "a HEAD of a set-aside blob answers 404"
        st, _, _ = p.request("POST", f"/v2/aside/copy/blobs/uploads/?mount={layer}&from={old.repo}", "aside/copy")
        assert st == 202, f"a mount of a set-aside blob falls back to an upload (201: mounted), got {st}"
        with pytest.raises(HTTPError, match="MANIFEST_BLOB_UNKNOWN"):
            p.put_manifest("aside/copy", "v1", old.manifest, old.media_type)
        for blob in data.values():
            p.push_blob("aside/copy", blob)  # HEAD 404, so uploaded
        p.put_manifest("aside/copy", "v1", old.manifest, old.media_type)

    gc(reg, config, writes_aside=writes_aside)
    pulls(p, keep)
    pulls(p, replace(old, repo="aside/copy", tag="v1"))
    assert not {gone.digest, *(d for d, _ in gone.blobs)} & blobs(reg.storage), "the real garbage was swept"
    after = sweep.run(config, dry_run=True)
    assert after.deleted_digests == [] and after.layer_links == [], after


def test_a_manifest_linked_during_the_set_aside_gets_its_blobs_back(
    reg: Registry, config: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The one race the set-aside leaves: a manifest PUT checks its blobs, the set-aside reads what
    to keep, the manifest is linked, then its blobs are renamed. The set-aside's second look, once
    its renames are done, puts them back; one linked during that second look too is put back by the
    window. The timing is staged by handing each look what it would have read before the link."""
    p = Pusher(reg.host)
    raced = push_image(p, "aside/raced", "v1", layers=[1700, 800], seed=14)
    gone = push_image(p, "aside/gone", "v1", layers=[600], seed=15)
    delete(p, raced)
    delete(p, gone)
    age(reg.storage)
    root = str(reg.storage)
    for late in (False, True):  # linked during the renames / during the second look as well
        marked = sweep.mark(config, root)
        stale = storage.referenced_since(root, marked.started - sweep.MTIME_SLACK)
        tag = f"again-{late}"
        p.put_manifest(raced.repo, tag, raced.manifest, raced.media_type)  # linked after ``stale`` was read
        with monkeypatch.context() as m:
            if late:
                m.setattr(storage, "referenced_since", lambda *_: stale)
            sweep.set_aside(root, marked, keep=stale)
        assert p.blob_exists(raced.repo, raced.blobs[1][0]) != late, "put back by the second look unless it missed"
        opts = Options(registry_url=reg.url, storage_root=root, storage_size=1 << 30)
        rep = Report()
        try:
            _locked(opts, Lock(), config, rep, storage.blob_sizes(root), marked)  # type: ignore[arg-type]
            sweep.unlink_after(root, marked)
        finally:
            sweep.empty_trash(root)
        assert rep.sparedSinceMark >= len(raced.blobs), rep
        pulls(p, replace(raced, tag=tag))
        assert not {gone.digest, *(d for d, _ in gone.blobs)} & blobs(reg.storage), "the real garbage was swept"
        p.request("DELETE", f"/v2/{raced.repo}/manifests/{raced.digest}", raced.repo)
        age(reg.storage)


PAUSED_MID_SET_ASIDE = """
import os, sys
from cluster_registry.gc import sweep
marked = sweep.mark(sys.argv[1], sys.argv[2])
rename, done = os.rename, []
def paused(src, dst):  # the real rename; after the second, print both and wait for a line on stdin
    rename(src, dst)
    done.append(dst)
    if len(done) == 2:
        print("\\n".join(done), flush=True)
        sys.stdin.readline()
os.rename = paused
sweep.set_aside(sys.argv[2], marked)
print(len(marked.aside.moved), flush=True)
"""


def set_aside_paused(config: str, root: Path) -> tuple[subprocess.Popen[str], list[str]]:
    """A GC process (real ``mark`` and ``set_aside``) paused after its second rename; the paths it moved."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "hooks")}
    proc = subprocess.Popen([sys.executable, "-c", PAUSED_MID_SET_ASIDE, config, str(root)], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    moved = [proc.stdout.readline().strip() for _ in range(2)]  # type: ignore[union-attr]
    assert all(Path(m).exists() and f"/{sweep.PENDING}" in m for m in moved), moved
    return proc, moved


def test_a_second_run_starting_mid_set_aside_deletes_none_of_it(reg: Registry, config: str) -> None:
    """A second run started by hand while the first sets aside: its ``empty_trash`` puts back what the
    first set aside and never removes the first's pending directory while it is in use; the first's
    later renames then fail and leave their blobs in place (its window would have nothing to settle)."""
    p = Pusher(reg.host)
    old = push_image(p, "twice/old", "v1", layers=[1100, 1200, 1300], seed=18)
    delete(p, old)
    age(reg.storage)
    before = blobs(reg.storage)
    first, _ = set_aside_paused(config, reg.storage)
    try:
        assert sweep.empty_trash(str(reg.storage)) == 2, "the second run put back the first's two"
        out, _ = first.communicate("go\n", timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0 and out.strip() == "2", out  # none of its later renames landed
    assert blobs(reg.storage) == before, "nothing was deleted without a verdict under the lock"


def test_a_gc_sigkilled_during_the_set_aside_loses_nothing(reg: Registry, config: str) -> None:
    """SIGKILL while blobs are being set aside (no lock held): what was set aside stays ``pending-``;
    a push meanwhile that needs one uploads it again; the next run puts the rest back before its
    own mark, so its mark judges the store as it is, and that run sweeps the garbage."""
    p = Pusher(reg.host)
    keep = push_image(p, "killed/keep", "v1", layers=[1400], seed=16)
    old = push_image(p, "killed/old", "v1", layers=[1100, 1200, 1300], seed=17)
    data = {d: body(p, old.repo, d) for d, _ in old.blobs} | {old.digest: old.manifest}
    delete(p, old)
    age(reg.storage)
    before = blobs(reg.storage)
    proc, moved = set_aside_paused(config, reg.storage)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(blobs(reg.storage)) == len(before) - 2, "killed with two blobs set aside"
    # meanwhile a copy uploads one of them again (a HEAD said 404): that new copy is the one kept
    first, second = (Path(m).name.replace("-", ":", 1) for m in moved)
    p.push_blob("killed/copy", data[first])
    assert sweep.empty_trash(str(reg.storage)) == 1, "the next run put back the other one"
    assert blobs(reg.storage) == before and not sweep.trash_root(str(reg.storage)).exists()
    assert p.blob_sha256(old.repo, second)[0] == second
    for digest, _ in old.blobs:
        p.push_blob("killed/copy", data[digest])
    p.put_manifest("killed/copy", "v1", old.manifest, old.media_type)
    pulls(p, keep)
    pulls(p, replace(old, repo="killed/copy", tag="v1"))
    age(reg.storage)
    p.request("DELETE", f"/v2/killed/copy/manifests/{old.digest}", "killed/copy")
    gc(reg, config)  # the next run's own mark and sweep: old's blobs are garbage now, keep is not
    pulls(p, keep)
    assert not {d for d, _ in old.blobs} & blobs(reg.storage)
    after = sweep.run(config, dry_run=True)
    assert after.deleted_digests == [] and after.layer_links == [], after
