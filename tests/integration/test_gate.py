"""The write gate in front of a real distribution registry on loopback.

The gate runs in-process (its own event loop in a thread); the lock state is driven directly through
``GateState`` (the Lease watch is exercised end to end in tests/e2e/test_gc_lock.py).
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest

from cluster_registry.gate.protocol import LeaseView
from cluster_registry.gate.proxy import Credentials, make_app
from cluster_registry.gate.state import GateState
from tests.support.ociimages import HTTPError, Pusher, layer_chunks, push_image
from tests.support.registry import AppServer as GateServer
from tests.support.registry import Registry, run_registry

USER, PASSWORD = "writer", "gate-test-password"


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with run_registry(tmp_path_factory.mktemp("gate-registry")) as reg:
        yield reg


@pytest.fixture
def gate(registry: Registry, tmp_path: Path) -> Iterator[tuple[GateServer, GateState]]:
    creds = tmp_path / "creds.yaml"
    creds.write_text(f"username: {USER}\npassword: {PASSWORD}\n")
    state = GateState()
    state.observe(None)
    state.heartbeat_ok(time.monotonic() + 3600)  # no Kubernetes here: pretend the heartbeat is fresh
    with GateServer(make_app(registry.url, state, Credentials(str(creds)))) as server:
        yield server, state


def hold(state: GateState, generation: str = "gc-test") -> None:
    state.observe(LeaseView("gc", generation, datetime.now(timezone.utc), 30))


def release(state: GateState) -> None:
    state.observe(LeaseView("gc", None, datetime.now(timezone.utc), 30))


def test_reads_are_anonymous_and_byte_exact(registry: Registry, gate: tuple[GateServer, GateState]) -> None:
    server, _ = gate
    img = push_image(Pusher(registry.host), "reads/app", "v1", layers=[3 << 20, 1000], seed=1)
    anon = Pusher(server.host)
    got = anon.get_manifest("reads/app", "v1")
    assert got is not None and got[0] == img.manifest
    for digest, size in img.all_blobs():
        assert anon.blob_sha256("reads/app", digest) == (digest, size)
    st, headers, body = anon.request("HEAD", f"/v2/reads/app/blobs/{img.blobs[1][0]}", "reads/app")
    assert st == 200 and int(headers["content-length"]) == img.blobs[1][1] and body == b""
    assert anon.tags("reads/app") == ["v1"]


def test_writes_need_the_credentials(
    registry: Registry, gate: tuple[GateServer, GateState], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    server, _ = gate
    with pytest.raises(HTTPError) as err:
        push_image(Pusher(server.host), "writes/app", "v1", layers=[1000], seed=2)
    assert err.value.status == 401
    with pytest.raises(HTTPError) as err:
        push_image(Pusher(server.host, auth=(USER, "wrong")), "writes/app", "v1", layers=[1000], seed=2)
    assert err.value.status == 401
    img = push_image(Pusher(server.host, auth=(USER, PASSWORD)), "writes/app", "v1", layers=[2 << 20, 1000], seed=2)
    direct = Pusher(registry.host)
    got = direct.get_manifest("writes/app", "v1")
    assert got is not None and got[0] == img.manifest
    for digest, size in img.all_blobs():
        assert direct.blob_sha256("writes/app", digest) == (digest, size)
    anon = Pusher(server.host)
    st, _, _ = anon.request("DELETE", f"/v2/writes/app/manifests/{img.digest}", "writes/app")
    assert st == 401 and direct.get_manifest("writes/app", img.digest) is not None
    assert PASSWORD not in caplog.text and "wrong" not in caplog.text, "credentials never reach the logs"


def test_lock_refuses_writes_with_503_and_keeps_reads(registry: Registry, gate: tuple[GateServer, GateState]) -> None:
    server, state = gate
    writer = Pusher(server.host, auth=(USER, PASSWORD))
    img = push_image(writer, "locked/app", "v1", layers=[1000], seed=3)
    hold(state)
    st, headers, body = writer.request("POST", "/v2/locked/app/blobs/uploads/", "locked/app")
    assert st == 503
    assert headers["x-cluster-registry-lock"] == "gc"
    assert 1 <= int(headers["retry-after"]) <= 60
    assert b"UNAVAILABLE" in body
    st, _, _ = writer.request("DELETE", f"/v2/locked/app/manifests/{img.digest}", "locked/app")
    assert st == 503
    got = Pusher(server.host).get_manifest("locked/app", "v1")
    assert got is not None and got[0] == img.manifest, "pulls keep working during the hold"
    release(state)
    push_image(writer, "locked/app", "v2", layers=[1000], seed=4)
    assert sorted(Pusher(registry.host).tags("locked/app")) == ["v1", "v2"]


def test_drain_waits_for_an_in_flight_upload(registry: Registry, gate: tuple[GateServer, GateState]) -> None:
    server, state = gate
    writer = Pusher(server.host, auth=(USER, PASSWORD))
    writer.request("GET", "/v2/", "drain/app")
    st, h, _ = writer.request("POST", "/v2/drain/app/blobs/uploads/", "drain/app")
    assert st == 202
    location = h["location"].split("://", 1)[-1].split("/", 1)[1]
    acks: list[str | None] = []
    state.on_drained = lambda: acks.append(state.ack_wanted())
    started, proceed = threading.Event(), threading.Event()
    size = 8 << 20

    def slow_body() -> Iterator[bytes]:
        for i, chunk in enumerate(layer_chunks(99, size)):
            if i == 1:
                started.set()
                proceed.wait(10)
            yield chunk

    result: dict[str, object] = {}

    def upload() -> None:
        result["patch"] = writer.request("PATCH", f"/{location}", "drain/app", body=slow_body(), chunked=True,
                                         headers={"Content-Type": "application/octet-stream"})  # fmt: skip

    t = threading.Thread(target=upload)
    t.start()
    assert started.wait(10)
    # The client has sent the headers; wait until the gate has admitted the write (its handler runs on
    # another thread), or the lock taken below would refuse it instead of finding it in flight.
    deadline = time.monotonic() + 5
    while state.inflight != 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    hold(state, "gc-drain")  # observe() decides (and would ack) synchronously: nothing to wait for
    assert state.inflight == 1 and state.ack_wanted() is None and not acks, "an upload is still in flight"
    st, headers, _ = writer.request("POST", "/v2/drain/app/blobs/uploads/", "drain/app")
    assert st == 503 and headers["x-cluster-registry-lock"] == "gc", "no new write once the lock is seen"
    proceed.set()
    t.join(30)
    status, hd, _ = result["patch"]  # type: ignore[misc]
    assert status == 202, "the in-flight upload finished normally"
    deadline = time.monotonic() + 5  # the gate counts the write done just after the response's last byte
    while not acks and time.monotonic() < deadline:
        time.sleep(0.01)
    assert acks == ["gc-drain"] and state.inflight == 0
    # The upload session survives the hold: commit it once the lock is released.
    release(state)
    digest = "sha256:" + hashlib.sha256(b"".join(layer_chunks(99, size))).hexdigest()
    loc = hd["location"].split("://", 1)[-1].split("/", 1)[1]
    st, _, _ = writer.request("PUT", f"/{loc}&digest={digest}", "drain/app", body=b"")
    assert st == 201
    assert Pusher(registry.host).blob_sha256("drain/app", digest) == (digest, size)
