"""Distribution on real object storage (ci/objectstores: moto's S3 server, Azurite), five replicas
running the chart's own rendering of the s3 and azure drivers' config, with the keys in the
environment as the chart passes them:

- replicas share one store: an upload started on one replica and continued chunk by chunk on the
  others commits, every replica serves every byte, and GC's bucket listing sees exactly what was pushed;
- GC on the store: usage and push times read from the bucket/container, the threshold decided on it, a soft delete
  frees nothing, distribution's mark-and-sweep (the chart's config) frees exactly the deleted images'
  blobs from the store, and what is kept still pulls from every replica;
- a replica SIGKILLed in the middle of a push loses nothing: what it committed stays in the store, the
  client resumes the upload at that offset on another replica, the blob commits with its digest
  verified, and everything pushed before is intact on every replica.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from cluster_registry.gc import objectstore, sweep
from cluster_registry.gc import registry as gcreg
from cluster_registry.gc.select import Inputs, Workload, select
from cluster_registry.gc.threshold import decide
from tests.support import objectstores
from tests.support.ociimages import PLATFORMS, HTTPError, Image, Pusher, push_image, push_index, sha256
from tests.support.registry import registry_binary

pytestmark = pytest.mark.integration

REPLICAS = 5


@pytest.fixture(params=objectstores.BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    if registry_binary() is None:
        pytest.fail("no distribution registry binary: run ci/toolchain")
    return str(request.param)


@pytest.fixture
def store(backend: str) -> Iterator[objectstores.Store]:
    with objectstores.fresh(backend) as s:
        yield s


@pytest.fixture
def rs(store: objectstores.Store, tmp_path: Path) -> Iterator[objectstores.Replicas]:
    with objectstores.replicas(store, tmp_path, REPLICAS) as r:
        yield r


def _gc_store(rs: objectstores.Replicas) -> objectstore.ObjectStore:
    """The store as GC's CronJob reads it: from the registry's config and its environment."""
    return objectstore.load(str(rs.config), rs.env)


def _path(location: str) -> str:
    return urllib.parse.urlsplit(location)._replace(scheme="", netloc="").geturl() if "://" in location else location


def _pulls_everywhere(rs: objectstores.Replicas, repo: str, image: Image) -> None:
    for r in rs.members:
        if r.proc.poll() is not None:
            continue
        p = Pusher(r.host)
        got = p.get_manifest(repo, image.digest)
        assert got is not None and sha256(got[0]) == image.digest, f"{r.host}: {repo}@{image.digest}"
        for digest, size in image.all_blobs():
            assert p.blob_sha256(repo, digest) == (digest, size), f"{r.host}: {repo} blob {digest}"


def test_the_storage_health_check_passes_on_the_chart_config(store: objectstores.Store, tmp_path: Path) -> None:
    """distribution answers 503 to everything once its storage health check fails 3 times in a row (the
    chart: every 10 s); here every 0.5 s, so 4 s are well past three checks."""
    env = {"REGISTRY_HEALTH_STORAGEDRIVER_INTERVAL": "500ms"}
    with objectstores.replicas(store, tmp_path, 1, env) as rs:
        time.sleep(4)
        st, _, body = Pusher(rs.members[0].host).request("GET", "/v2/", "")
        assert st == 200, body
    assert "storage driver health check" not in rs.members[0].log.read_text()


def test_replicas_share_the_store_and_gc_lists_what_was_pushed(rs: objectstores.Replicas) -> None:
    r = rs.members
    # One upload, five replicas: 3 MiB chunks (under S3's 5 MiB part minimum, which distribution's
    # s3 writer must merge server-side) PATCHed to replicas 1-4 in turn, committed on replica 0.
    data = os.urandom(4 * (3 << 20) + 12345)
    digest = sha256(data)
    st, h, _ = Pusher(r[0].host).request("POST", "/v2/site/chunked/blobs/uploads/", "site/chunked")
    assert st == 202
    loc, offset = _path(h["location"]), 0
    for i, start in enumerate(range(0, len(data), 3 << 20)):
        chunk = data[start : start + (3 << 20)]
        st, h, body = Pusher(r[1 + i % 4].host).request(
            "PATCH", loc, "site/chunked", body=chunk,
            headers={"Content-Type": "application/octet-stream", "Content-Range": f"{offset}-{offset + len(chunk) - 1}"},
        )  # fmt: skip
        assert st == 202, body
        loc, offset = _path(h["location"]), offset + len(chunk)
    sep = "&" if "?" in loc else "?"
    st, _, body = Pusher(r[0].host).request("PUT", f"{loc}{sep}digest={digest}", "site/chunked", body=b"")
    assert st == 201, body
    for m in r:
        assert Pusher(m.host).blob_sha256("site/chunked", digest) == (digest, len(data))

    img = push_image(Pusher(r[2].host), "site/app", "v1", layers=[(1 << 20) + 7, 4096], seed=1)
    idx = push_index(Pusher(r[3].host), "site/multi", "v1", PLATFORMS[:2], layers=[2000], seed=2)
    _pulls_everywhere(rs, "site/app", img)
    for child in idx.children:
        _pulls_everywhere(rs, "site/multi", child)

    sizes = objectstore.blob_sizes(_gc_store(rs))
    pushed = {digest: len(data), img.digest: len(img.manifest), **dict(img.all_blobs())}
    for m in idx.all_manifests():
        pushed[m.digest] = len(m.manifest)
        pushed.update(m.all_blobs())
    assert sizes == pushed, "GC's listing of the store is exactly the blobs pushed, with their sizes"
    assert objectstore.has_repositories(_gc_store(rs))


def test_gc_on_the_store_frees_exactly_the_deleted_images(rs: objectstores.Replicas, monkeypatch: pytest.MonkeyPatch) -> None:
    r = rs.members
    keep = push_image(Pusher(r[0].host), "h.example.com/keep", "v1", layers=[300_000, 2000], seed=10)
    gone = [push_image(Pusher(r[1 + i % 4].host), "h.example.com/gone", f"v{i}", layers=[200_000 + i, 500], seed=20 + i)
            for i in range(4)]  # fmt: skip
    # Pinned by digest, never tagged: the registry API's tag lists do not name it, the store's revisions do.
    gone.append(push_image(Pusher(r[1].host), "h.example.com/pinned", None, layers=[100_000, 400], seed=30, push_tag=False))
    store = _gc_store(rs)
    before = objectstore.blob_sizes(store)
    used = sum(before.values())
    # The threshold is decided on what the store holds: not run just above it, run at it.
    assert not decide(used, used * 100 // 49 + 1, 50).run
    assert decide(used, used * 2, 50).run

    revisions = objectstore.revisions(store)  # as GC's gather does on object storage
    manifests, _ = gcreg.inventory_sizes(r[4].url, untagged=revisions)
    manifests = [replace(m, pushed_at=revisions.get(m.key)) for m in manifests]
    assert {m.key for m in manifests} == set(revisions), "every stored manifest, the untagged one too"
    now = datetime.now(timezone.utc)
    assert all(m.pushed_at and timedelta(0) <= now - m.pushed_at < timedelta(minutes=2) for m in manifests), manifests
    inputs = Inputs(tuple(manifests), (), (Workload("Pod", "ns", "p", "u", ("h.example.com/keep:v1",)),), (),
                    frozenset({"u"}), datetime.now(timezone.utc), timedelta(0))  # fmt: skip
    sel = select(inputs)
    assert {m.digest for m in sel.delete_manifests} == {g.digest for g in gone}
    out = gcreg.delete_sync(r[2].url, [[(m.repository, m.digest) for m in w] for w in sel.delete_waves])
    assert [o.status for o in out] == ["deleted"] * len(gone)
    assert objectstore.blob_sizes(store) == before, "a soft delete frees nothing by itself"

    for k, v in rs.env.items():  # the sweep runs with the registry's own config and keys, as in the CronJob
        monkeypatch.setenv(k, v)
    res = sweep.run(str(rs.config), binary=str(registry_binary()))
    after = objectstore.blob_sizes(store)
    freed = {d for g in gone for d, _ in g.all_blobs()} | {g.digest for g in gone}
    assert set(before) - set(after) == freed, "exactly the deleted images' blobs left the store"
    assert res.blobs_deleted == len(freed)
    assert sum(after.values()) == used - sum(before[d] for d in freed)
    _pulls_everywhere(rs, "h.example.com/keep", keep)
    assert Pusher(r[0].host).get_manifest("h.example.com/gone", "v0") is None


def test_a_replica_killed_mid_push_loses_nothing(rs: objectstores.Replicas) -> None:
    r = rs.members
    earlier = push_image(Pusher(r[0].host), "site/app", "v1", layers=[(2 << 20) + 3, 4096], seed=1)
    data = os.urandom(24 << 20)  # several of the s3 driver's 10 MiB parts
    digest, half = sha256(data), 14 << 20
    victim = Pusher(r[0].host)
    st, h, _ = victim.request("POST", "/v2/site/big/blobs/uploads/", "site/big")
    assert st == 202
    loc = _path(h["location"])
    sent = threading.Event()

    def stalled_body() -> Iterator[bytes]:
        for i in range(0, half, 1 << 20):
            yield data[i : i + (1 << 20)]
        sent.set()
        time.sleep(60)  # the replica dies before the rest comes
        yield b""

    def patch() -> None:
        with contextlib.suppress(OSError, HTTPError):
            victim.request("PATCH", loc, "site/big", body=stalled_body(), chunked=True,
                           headers={"Content-Type": "application/octet-stream"})  # fmt: skip

    t = threading.Thread(target=patch, daemon=True)
    t.start()
    assert sent.wait(120), "the first half was not sent"
    time.sleep(2)  # let the replica write what it received
    rs.kill(r[0])

    # The client takes the upload over on another replica: it asks where the upload stands (what the
    # dead replica committed to the store is kept) and sends the rest there; the commit verifies the digest.
    taker = Pusher(r[1].host)
    st, h, _ = taker.request("GET", loc, "site/big")
    assert st == 204 and h.get("range"), "the upload's state is in the store, readable by any replica"
    offset = int(h["range"].split("-")[1]) + 1
    assert 0 < offset <= half, f"the dead replica's committed bytes are kept ({offset})"
    st, h, body = taker.request("PATCH", _path(h["location"]), "site/big", body=data[offset:],
                                headers={"Content-Type": "application/octet-stream",
                                         "Content-Range": f"{offset}-{len(data) - 1}"})  # fmt: skip
    assert st == 202, body
    loc = _path(h["location"])
    sep = "&" if "?" in loc else "?"
    st, _, body = taker.request("PUT", f"{loc}{sep}digest={digest}", "site/big", body=b"")
    assert st == 201, body
    rs.start()  # the replacement replica
    for m in rs.members:
        if m.proc.poll() is None:
            assert Pusher(m.host).blob_sha256("site/big", digest) == (digest, len(data))
    _pulls_everywhere(rs, "site/app", earlier)
    sizes = objectstore.blob_sizes(_gc_store(rs))
    assert sizes[digest] == len(data)
    print(f"upload resumed on another replica at {offset} of {len(data)} bytes")
