"""The registry client's transport (``http.client`` on the session's worker threads): what the copy
command imports, TLS made only when needed, cancellation, redirects, the refresh-token grant,
timeouts and limits, against real registries and small scripted HTTP servers on loopback."""

from __future__ import annotations

import asyncio
import hashlib
import http.server
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cluster_registry import __version__, reference
from cluster_registry.oci import (
    AuthenticationError,
    Credentials,
    RegistryOptions,
    RegistryProtocolError,
    RegistrySession,
    RegistryUnavailableError,
    RetryPolicy,
    TLSError,
    copy_image,
)
from cluster_registry.oci.pool import ConnectionPool
from cluster_registry.oci.client import MAX_MANIFEST
from tests.support.ociimages import Pusher, assert_copied, push_image
from tests.support.registry import Registry

ROOT = Path(__file__).resolve().parents[2]
FAST_RETRY = RetryPolicy(attempts=2, base_delay=0.01, max_delay=0.02)


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Scripted:
    """A threaded HTTP/1.1 server on 127.0.0.1 whose answers come from ``handle`` (a function of
    the request returning ``(status, headers, body)``, or None to leave it to the function itself)."""

    handle: Callable[[Scripted, http.server.BaseHTTPRequestHandler, Seen], tuple[int, dict[str, str], bytes] | None]
    seen: list[Seen] = field(default_factory=list)
    disconnected: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self._server.server_address[1]}"

    @contextmanager
    def running(self) -> Iterator[Scripted]:
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                seen = Seen(self.command, self.path, dict(self.headers.items()), self.rfile.read(length))
                outer.seen.append(seen)
                out = outer.handle(outer, self, seen)
                if out is None:
                    return
                status, headers, body = out
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                if "Content-Length" not in headers:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_HEAD = do_POST = do_PUT = answer

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.release.set()
            self._server.shutdown()
            self._server.server_close()


def stall_until_client_leaves(server: Scripted, handler: http.server.BaseHTTPRequestHandler, headers_first: bool) -> None:
    """Answer nothing (or headers and part of a body), then wait for the client to hang up."""
    if headers_first:
        handler.send_response(200)
        handler.send_header("Content-Length", str(1 << 20))
        handler.end_headers()
        handler.wfile.write(b"x" * 1000)
        handler.wfile.flush()
    handler.connection.settimeout(10)
    try:
        while handler.connection.recv(65536):
            pass
        server.disconnected.set()
    except OSError:
        pass
    server.release.wait(10)
    handler.close_connection = True


def idle_connections(s: RegistrySession) -> int:
    return sum(len(v) for v in s.pool._idle.values())


def test_copy_command_imports_no_aiohttp() -> None:
    code = "import cluster_registry.oci.cli, cluster_registry.oci, sys; assert 'aiohttp' not in sys.modules, 'aiohttp'"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr


async def test_plain_http_copy_makes_no_tls_context(src: Registry, dst: Registry) -> None:
    img = push_image(Pusher(src.host), "plain/app", "1", layers=[10_000], seed=51)
    opts = RegistryOptions(insecure_hosts=frozenset({src.host, dst.host}), retry=FAST_RETRY)
    async with RegistrySession(opts) as s:
        r = await copy_image(reference.parse(f"{src.host}/plain/app:1"), reference.parse(f"{dst.host}/plain/app:1"), session=s)
        assert r.digest == img.digest
        assert s._ssl is None  # no CA store loaded for plain HTTP
        assert idle_connections(s) >= 1  # keep-alive connections are pooled for reuse
    assert_copied(Pusher(src.host), Pusher(dst.host), img, "plain/app")


async def test_tls_to_a_plain_http_registry_names_the_fix(src: Registry) -> None:
    async with RegistrySession(RegistryOptions(retry=FAST_RETRY)) as s:  # src.host not listed as insecure
        with pytest.raises(TLSError) as err:
            await s.repository(src.host, "any").get_manifest("1")
    assert "plain HTTP registry? list it as insecure" in str(err.value) and src.host in str(err.value)


async def test_tag_list_follows_link_pagination(src: Registry) -> None:
    sp = Pusher(src.host)
    img = push_image(sp, "paged/app", "t0", layers=[100], seed=52)
    for i in range(1, 5):
        sp.put_manifest("paged/app", f"t{i}", img.manifest, img.media_type)
    async with RegistrySession(RegistryOptions(insecure_hosts=frozenset({src.host}))) as s:
        tags = await s.repository(src.host, "paged/app").list_tags(page_size=2)
    assert sorted(tags) == [f"t{i}" for i in range(5)]


@pytest.mark.parametrize("headers_first", [False, True], ids=["before-headers", "mid-body"])
async def test_cancelled_request_does_not_pool_its_connection(headers_first: bool) -> None:
    blob = "sha256:" + "0" * 64

    def handle(server: Scripted, h: http.server.BaseHTTPRequestHandler, seen: Seen) -> tuple[int, dict[str, str], bytes] | None:
        if seen.path.endswith("/manifests/ok"):
            return 200, {"Content-Type": "application/vnd.oci.image.manifest.v1+json"}, b'{"schemaVersion":2}'
        stall_until_client_leaves(server, h, headers_first)
        return None

    with Scripted(handle).running() as server:
        # mid-body: the exchange reads a first chunk of 512 of the 1000 bytes sent, a later read blocks
        opts = RegistryOptions(insecure_hosts=frozenset({server.host}), read_timeout=30, chunk_size=512)
        async with RegistrySession(opts) as s:
            repo = s.repository(server.host, "r")
            await repo.get_manifest("ok")
            assert idle_connections(s) == 1  # a complete exchange leaves its connection for reuse

            async def stalled() -> None:
                if headers_first:
                    async with await repo.open_blob(blob, 1 << 20) as stream:
                        async for _ in stream:
                            pass
                else:
                    await repo.get_manifest("stalls")

            task = asyncio.create_task(stalled())
            while len(server.seen) < 2:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.1)  # the worker thread is blocked reading
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            # the socket is shut down at once (no waiting for the 30 s read timeout)...
            assert await asyncio.get_running_loop().run_in_executor(None, server.disconnected.wait, 5)
            await asyncio.sleep(0.05)
            # ...and never handed out again: the pool holds no connection (the stalled one was the
            # pooled one, reused), and the next request works on a new one
            assert idle_connections(s) == 0
            assert (await repo.get_manifest("ok")).body == b'{"schemaVersion":2}'
            assert idle_connections(s) == 1


async def test_redirect_keeps_authorization_only_on_the_same_origin() -> None:
    data = b"blob content " * 100
    digest = "sha256:" + hashlib.sha256(data).hexdigest()

    def storage(server: Scripted, h: http.server.BaseHTTPRequestHandler, seen: Seen) -> tuple[int, dict[str, str], bytes]:
        return 200, {"Content-Type": "application/octet-stream"}, data

    with Scripted(storage).running() as store:

        def front(server: Scripted, h: http.server.BaseHTTPRequestHandler, seen: Seen) -> tuple[int, dict[str, str], bytes]:
            if not seen.headers.get("Authorization"):
                return 401, {"WWW-Authenticate": 'Basic realm="r"'}, b""
            if seen.path.startswith("/v2/r/blobs/"):
                return 307, {"Location": f"/v2/r/moved/{digest}"}, b""  # same origin: still authorized
            return 302, {"Location": f"http://{store.host}/signed?sig=abc"}, b""  # another origin

        with Scripted(front).running() as reg:
            opts = RegistryOptions(insecure_hosts=frozenset({reg.host}))
            async with RegistrySession(opts) as s:
                repo = s.repository(reg.host, "r", Credentials("user", "pw-secret"))
                async with await repo.open_blob(digest, len(data)) as stream:
                    got = b"".join([c async for c in stream])
    assert got == data
    assert [x.path for x in reg.seen] == [f"/v2/r/blobs/{digest}", f"/v2/r/blobs/{digest}", f"/v2/r/moved/{digest}"]
    assert reg.seen[2].headers.get("Authorization", "").startswith("Basic ")
    assert [x.path for x in store.seen] == ["/signed?sig=abc"]
    assert "Authorization" not in store.seen[0].headers
    assert all(x.headers.get("User-Agent") == f"cluster-registry/{__version__}" for x in reg.seen + store.seen)


async def test_refresh_token_grant_and_bearer_reauth(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")
    manifest = b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}'
    issued: list[dict[str, list[str]]] = []

    def tokens(server: Scripted, h: http.server.BaseHTTPRequestHandler, seen: Seen) -> tuple[int, dict[str, str], bytes]:
        form = urllib.parse.parse_qs(seen.body.decode())
        issued.append(form)
        if seen.method != "POST" or form.get("refresh_token") != ["refresh-secret"]:
            return 401, {}, b""
        return 200, {"Content-Type": "application/json"}, json.dumps({"access_token": f"access-{len(issued)}", "expires_in": 300}).encode()

    with Scripted(tokens).running() as ts:

        def registry(server: Scripted, h: http.server.BaseHTTPRequestHandler, seen: Seen) -> tuple[int, dict[str, str], bytes]:
            if seen.headers.get("Authorization") != "Bearer access-1":
                challenge = f'Bearer realm="http://{ts.host}/token",service="reg",scope="repository:org/app:pull"'
                return 401, {"WWW-Authenticate": challenge}, b""
            return 200, {"Content-Type": "application/vnd.oci.image.manifest.v1+json"}, manifest

        with Scripted(registry).running() as reg:
            opts = RegistryOptions(insecure_hosts=frozenset({reg.host}), retry=FAST_RETRY)
            async with RegistrySession(opts) as s:
                m = await s.repository(reg.host, "org/app", Credentials(token="refresh-secret")).get_manifest("1")
                assert m.body == manifest
                with pytest.raises(AuthenticationError) as err:
                    await s.repository(reg.host, "org/other", Credentials(token="wrong-secret")).get_manifest("1")
    assert issued[0] == {
        "service": ["reg"], "grant_type": ["refresh_token"], "refresh_token": ["refresh-secret"],
        "client_id": ["cluster-registry"], "scope": ["repository:org/app:pull"],
    }
    assert [x.headers.get("Authorization") for x in reg.seen[:2]] == [None, "Bearer access-1"]
    for secret in ("refresh-secret", "wrong-secret", "access-1"):
        assert secret not in str(err.value) and secret not in caplog.text


async def test_read_timeout_and_manifest_limit() -> None:
    huge = b"{" + b" " * MAX_MANIFEST + b"}"

    def handle(server: Scripted, h: http.server.BaseHTTPRequestHandler, seen: Seen) -> tuple[int, dict[str, str], bytes] | None:
        if seen.path.endswith("/huge"):
            return 200, {"Content-Type": "application/vnd.oci.image.manifest.v1+json"}, huge
        if seen.path.endswith("/chunked"):  # no Content-Length: the limit applies while reading
            h.send_response(200)
            h.send_header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
            h.send_header("Transfer-Encoding", "chunked")
            h.end_headers()
            for i in range(0, len(huge), 1 << 20):
                part = huge[i:i + (1 << 20)]
                h.wfile.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
            h.wfile.write(b"0\r\n\r\n")
            return None
        server.release.wait(5)  # slower than the read timeout
        return 200, {}, b"{}"

    with Scripted(handle).running() as server:
        opts = RegistryOptions(insecure_hosts=frozenset({server.host}), retry=FAST_RETRY, read_timeout=0.3)
        async with RegistrySession(opts) as s:
            repo = s.repository(server.host, "r")
            for ref in ("huge", "chunked"):
                with pytest.raises(RegistryProtocolError, match=f"larger than {MAX_MANIFEST} bytes"):
                    await repo.get_manifest(ref)
            started = time.monotonic()
            with pytest.raises(RegistryUnavailableError, match="timed out"):
                await repo.get_manifest("slow")
            assert time.monotonic() - started < 3


def test_pool_drops_idle_and_closed_connections() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        netloc = f"127.0.0.1:{server.getsockname()[1]}"
        pool = ConnectionPool(max_idle=0.0)
        stale = pool.get("http", netloc)
        pool.put("http", netloc, stale)
        fresh = pool.get("http", netloc)  # idle too long: closed, a new one made
        assert fresh is not stale and stale.sock is None
        kept_pool = ConnectionPool(max_idle=60.0)
        kept = kept_pool.get("http", netloc)
        kept_pool.put("http", netloc, kept)
        assert kept_pool.get("http", netloc) is kept
        # the server closed its end meanwhile: the idle connection is dropped, not handed out
        kept_pool.put("http", netloc, kept)
        for _ in range(3):
            server.accept()[0].close()
        time.sleep(0.05)
        again = kept_pool.get("http", netloc)
        assert again is not kept and kept.sock is None
        for c in (fresh, again):
            c.close()


def test_closed_pool_keeps_nothing_and_unblocks_users() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        netloc = f"127.0.0.1:{server.getsockname()[1]}"
        pool = ConnectionPool(timeout=30.0)
        busy = pool.get("http", netloc)
        sock = busy.sock
        assert sock is not None
        got: list[bytes] = []
        reader = threading.Thread(target=lambda: got.append(sock.recv(1)))
        reader.start()
        time.sleep(0.05)
        started = time.monotonic()
        pool.close()  # shuts the connection in use down: the blocked reader returns at once
        reader.join(5)
        assert not reader.is_alive() and got == [b""]
        assert time.monotonic() - started < 5
        pool.put("http", netloc, busy)  # after close: closed, not kept
        assert busy.sock is None
