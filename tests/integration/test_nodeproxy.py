"""`cluster-registry node-proxy` (nodeproxy/relay.py) relays bytes exactly both ways, relays half-closes,
drops a client it cannot serve with a clear log line, and bounds its connections."""

from __future__ import annotations

import hashlib
import logging
import random
import resource
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from cluster_registry.nodeproxy.relay import FDS_PER_CONNECTION, FDS_SPARE, Relay, TlsOrigin, Upstream, fit_connections

pytestmark = pytest.mark.integration

Handler = Callable[[socket.socket], None]


@contextmanager
def upstream(handler: Handler) -> Iterator[int]:
    """A TCP server on 127.0.0.1 running HANDLER on a thread per connection; yields its port."""
    server = socket.create_server(("127.0.0.1", 0), backlog=256)

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=lambda: _run(handler, conn), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield server.getsockname()[1]
    finally:
        server.shutdown(socket.SHUT_RDWR)
        server.close()


def _run(handler: Handler, conn: socket.socket) -> None:
    with conn:
        try:
            handler(conn)
        except OSError:
            pass


@contextmanager
def relay(port: int, max_connections: int = 64, idle_timeout: float = 300.0, host: str = "127.0.0.1",
          tls: TlsOrigin | None = None) -> Iterator[tuple[int, Relay]]:
    r = Relay(("127.0.0.1", 0), Upstream(host, port, 1.0, tls), threading.BoundedSemaphore(max_connections), idle_timeout)
    thread = threading.Thread(target=r.serve_forever, daemon=True)
    thread.start()
    try:
        yield r.address[1], r
    finally:
        r.close()
        thread.join(5)
        assert not thread.is_alive(), "close() ends serve_forever"


def recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def echo(conn: socket.socket) -> None:
    while data := conn.recv(1 << 16):
        conn.sendall(data)


def test_a_large_transfer_is_byte_exact_both_ways() -> None:
    request = random.Random(1).randbytes(8 << 20)
    answer = random.Random(2).randbytes(96 << 20)

    def handler(conn: socket.socket) -> None:
        got = recv_all(conn)  # until the client's half-close
        conn.sendall(hashlib.sha256(got).digest() + answer)

    with upstream(handler) as up, relay(up) as (port, _), socket.create_connection(("127.0.0.1", port)) as c:
        sender = threading.Thread(target=lambda: (c.sendall(request), c.shutdown(socket.SHUT_WR)))
        sender.start()
        body = recv_all(c)
        sender.join()
    assert body[:32] == hashlib.sha256(request).digest(), "the upstream got every byte the client sent"
    assert len(body) - 32 == len(answer) and hashlib.sha256(body[32:]).digest() == hashlib.sha256(answer).digest()


def test_small_exchanges_on_one_connection_are_each_relayed_at_once() -> None:
    """HTTP keep-alive: each request's bytes must reach the upstream before the next arrives (splice
    sleeping for socket data with the pipe's lock held would hold them back)."""
    with upstream(echo) as up, relay(up) as (port, _), socket.create_connection(("127.0.0.1", port), timeout=5) as c:
        for i in range(300):
            c.sendall(b"%05d" % i)
            assert c.recv(5) == b"%05d" % i


def test_a_half_close_is_relayed_and_the_other_direction_stays_open() -> None:
    after: list[bytes] = []

    def handler(conn: socket.socket) -> None:
        conn.sendall(b"hello")
        conn.shutdown(socket.SHUT_WR)  # the upstream is done talking, still listening
        after.append(recv_all(conn))

    with upstream(handler) as up, relay(up) as (port, _), socket.create_connection(("127.0.0.1", port)) as c:
        c.settimeout(5)
        assert recv_all(c) == b"hello", "the client sees the upstream's end of stream"
        c.sendall(b"still here")
        c.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + 5
        while not after and time.monotonic() < deadline:
            time.sleep(0.01)
    assert after == [b"still here"], "bytes after the upstream's half-close reach it, then the client's end"


def test_a_client_is_closed_with_a_clear_log_when_the_registry_is_down(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        down = s.getsockname()[1]  # bound, never listening: connection refused
    caplog.set_level(logging.WARNING, "cluster_registry.nodeproxy.relay")
    with relay(down) as (port, _), socket.create_connection(("127.0.0.1", port)) as c:
        c.settimeout(5)
        assert c.recv(1) == b"", "the client is closed, not left hanging"
    (record,) = [r for r in caplog.records if r.getMessage().startswith("registry unreachable")]
    assert getattr(record, "upstream") == f"127.0.0.1:{down}"
    assert "refused" in getattr(record, "error").lower()


def test_connections_beyond_the_limit_wait_and_all_are_served() -> None:
    limit, clients = 8, 100
    with upstream(echo) as up, relay(up, max_connections=limit) as (port, _):
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(limit)]
        for i, s in enumerate(held):  # each holds a slot: served
            s.sendall(b"%d" % i)
            assert s.recv(16) == b"%d" % i
        threads_at_limit = threading.active_count()
        waiting = socket.create_connection(("127.0.0.1", port))  # in the backlog: nothing relays it yet
        waiting.sendall(b"next")
        waiting.settimeout(0.5)
        with pytest.raises(TimeoutError):
            waiting.recv(16)
        held.pop().close()  # a slot frees: the waiting one is served
        waiting.settimeout(5)
        assert waiting.recv(16) == b"next"
        waiting.close()
        for s in held:
            s.close()

        results: list[bytes] = []

        def client(i: int) -> None:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
                s.sendall(b"%d" % i)
                s.shutdown(socket.SHUT_WR)
                results.append(recv_all(s))

        many = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        for t in many:
            t.start()
        peak = 0
        while any(t.is_alive() for t in many):
            peak = max(peak, threading.active_count() - clients)
            time.sleep(0.005)
    assert sorted(results) == sorted(b"%d" % i for i in range(clients)), "every connection got its own answer"
    assert peak < threads_at_limit + limit, "threads stay bounded by the limit (a 100 unbounded would be ~300)"


def test_a_connection_idle_both_ways_is_closed_and_frees_its_slot() -> None:
    with upstream(echo) as up, relay(up, max_connections=1, idle_timeout=1) as (port, _):
        stuck = socket.create_connection(("127.0.0.1", port))
        stuck.settimeout(5)
        t0 = time.monotonic()
        assert stuck.recv(1) == b"", "the relay closes a connection that moved nothing for idle_timeout"
        assert 0.9 <= time.monotonic() - t0 < 4
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"ok")
            assert s.recv(2) == b"ok", "its slot serves the next connection"
        stuck.close()


def test_a_long_one_way_transfer_is_not_idle() -> None:
    def slow(conn: socket.socket) -> None:
        for _ in range(6):  # 1.5 s of answer while the client stays silent, past the 1 s idle timeout
            conn.sendall(b"x" * 1000)
            time.sleep(0.25)

    with upstream(slow) as up, relay(up, idle_timeout=1) as (port, _), socket.create_connection(("127.0.0.1", port)) as c:
        c.settimeout(5)
        assert recv_all(c) == b"x" * 6000


def test_the_connection_limit_fits_the_open_file_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert fit_connections(8) == 8
    if hard == resource.RLIM_INFINITY:
        pytest.skip("no hard open-file limit to fit under")
    assert fit_connections(hard) == (hard - FDS_SPARE) // FDS_PER_CONNECTION
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == hard, "the soft limit was raised to the hard one"
