"""The gate's HTTP side: a streaming reverse proxy for ``/v2/``, plus ``/healthz``, ``/readyz`` and
``/metrics``.

Reads (GET, HEAD) pass anonymously. Every other method is a write: it needs HTTP basic credentials
matching ``--credentials-file`` (compared in constant time) and is refused with 503, ``Retry-After``
and ``X-Cluster-Registry-Lock: gc`` while GC holds the lock (``unknown`` while the gate cannot vouch
for the lock's state). Bodies stream both ways in large chunks, never buffered whole.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import os
import time
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge
from yarl import URL

from cluster_registry.errors import ConfigError
from cluster_registry.gate.protocol import LOCK_HEADER
from cluster_registry.gate.service import LockMetrics, error
from cluster_registry.gate.state import GateState, Lock
from cluster_registry.oci.auth import read_credentials_file

log = logging.getLogger(__name__)
CHUNK = 1 << 20
READS = frozenset({"GET", "HEAD"})
HOP_BY_HOP = frozenset(
    h.lower()
    for h in ("Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "TE", "Trailer",
              "Transfer-Encoding", "Upgrade", "Host", "Authorization")
)  # fmt: skip
STATE_KEY = web.AppKey("state", GateState)
SESSION_KEY = web.AppKey("session", aiohttp.ClientSession)


class Credentials:
    """``{username, password}`` from a YAML/JSON file, re-read when the file changes (Secret rotation)."""

    def __init__(self, path: str | None, recheck: float = 5.0) -> None:
        self.path, self.recheck = path, recheck
        self._expected: bytes | None = None
        self._mtime = -1.0
        self._checked = 0.0
        self._load()

    def _load(self) -> None:
        if not self.path:
            return
        mtime = os.stat(self.path).st_mtime
        if mtime == self._mtime:
            return
        creds = read_credentials_file(self.path)
        self._expected = f"{creds.username}:{creds.password}".encode()
        self._mtime = mtime

    def check(self, authorization: str | None) -> bool:
        now = time.monotonic()
        if now - self._checked > self.recheck:
            self._checked = now
            try:
                self._load()
            except (OSError, ConfigError) as err:
                log.warning("cannot re-read the credentials file; keeping the previous one", extra={"error": type(err).__name__})
        if self._expected is None:
            return False  # no credentials configured: nobody may write
        if not authorization or not authorization[:6].lower() == "basic ":
            return False
        try:
            given = base64.b64decode(authorization[6:].strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        return hmac.compare_digest(given, self._expected)


class Metrics(LockMetrics):
    def __init__(self) -> None:
        super().__init__()
        self.requests = Counter(
            "cluster_registry_gate_requests", "requests by kind and outcome", ["kind", "outcome"], registry=self.registry
        )
        self.inflight = Gauge("cluster_registry_gate_inflight_writes", "writes in flight", registry=self.registry)


def make_app(
    upstream: str,
    state: GateState,
    credentials: Credentials,
    *,
    chunk: int = CHUNK,
) -> web.Application:
    up = URL(upstream.rstrip("/"))
    metrics = Metrics()
    app = web.Application(client_max_size=0)
    app[STATE_KEY] = state

    async def startup(app: web.Application) -> None:
        app[SESSION_KEY] = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=600),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept", "Content-Type"),
            read_bufsize=chunk,
        )

    async def cleanup(app: web.Application) -> None:
        await app[SESSION_KEY].close()

    app.on_startup.append(startup)
    app.on_cleanup.append(cleanup)

    async def body(request: web.Request) -> AsyncIterator[bytes]:
        async for data in request.content.iter_any():
            yield data

    async def forward(request: web.Request) -> web.StreamResponse:
        headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP)
        headers["Host"] = request.host
        peer = request.remote or ""
        xff = request.headers.get("X-Forwarded-For")
        headers["X-Forwarded-For"] = f"{xff}, {peer}" if xff else peer
        headers.setdefault("X-Forwarded-Proto", request.scheme)
        has_body = request.body_exists and request.method not in READS
        if has_body and "Content-Length" not in request.headers and "chunked" not in request.headers.get(
            "Transfer-Encoding", ""
        ).lower():
            has_body = False
        url = URL(str(up) + request.raw_path, encoded=True)  # path and query exactly as sent
        session = request.app[SESSION_KEY]
        try:
            async with session.request(
                request.method,
                url,
                headers=headers,
                data=body(request) if has_body else None,
                allow_redirects=False,
            ) as upstream_resp:
                resp = web.StreamResponse(status=upstream_resp.status, reason=upstream_resp.reason)
                for k, v in upstream_resp.headers.items():
                    if k.lower() not in HOP_BY_HOP:
                        resp.headers.add(k, v)
                await resp.prepare(request)
                if request.method != "HEAD":
                    async for data in upstream_resp.content.iter_any():
                        await resp.write(data)
                await resp.write_eof()
                return resp
        except (aiohttp.ClientConnectionError, TimeoutError) as err:
            log.warning("upstream unreachable", extra={"error": type(err).__name__})
            return error(503, "UNAVAILABLE", "the registry behind the gate is unavailable", {"Retry-After": "5"})

    async def v2(request: web.Request) -> web.StreamResponse:
        if request.method in READS:
            metrics.requests.labels("read", "proxied").inc()
            return await forward(request)
        if not credentials.check(request.headers.get("Authorization")):
            metrics.requests.labels("write", "unauthorized").inc()
            return error(
                401,
                "UNAUTHORIZED",
                "authentication required to write to the cluster registry",
                {"WWW-Authenticate": 'Basic realm="cluster-registry"'},
            )
        st = state.admit()
        if st is not Lock.FREE:
            metrics.requests.labels("write", "locked" if st is Lock.HELD else "lock-unknown").inc()
            message = (
                "the cluster registry is read-only while garbage collection runs; retry later"
                if st is Lock.HELD
                else "the cluster registry cannot confirm the garbage-collection lock's state; retry later"
            )
            retry = state.retry_after() if st is Lock.HELD else 5
            return error(
                503, "UNAVAILABLE", message, {"Retry-After": str(retry), LOCK_HEADER: "gc" if st is Lock.HELD else "unknown"}
            )
        metrics.inflight.inc()
        try:
            metrics.requests.labels("write", "proxied").inc()
            return await forward(request)
        finally:
            metrics.inflight.dec()
            state.done()

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def readyz(request: web.Request) -> web.Response:
        if not state.synced:
            return web.Response(status=503, text="lock state not synced yet")
        try:
            async with request.app[SESSION_KEY].get(
                up.with_path("/v2/"), timeout=aiohttp.ClientTimeout(total=3)
            ) as r:
                await r.read()
                if r.status >= 500:
                    return web.Response(status=503, text=f"registry answers {r.status}")
        except (aiohttp.ClientError, TimeoutError):
            return web.Response(status=503, text="registry unreachable")
        return web.Response(text="ok")

    async def metrics_handler(request: web.Request) -> web.Response:
        return web.Response(body=metrics.exposition(state), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.router.add_route("GET", "/healthz", healthz)
    app.router.add_route("GET", "/readyz", readyz)
    app.router.add_route("GET", "/metrics", metrics_handler)
    app.router.add_route("*", "/v2", v2)
    app.router.add_route("*", "/v2/{tail:.*}", v2)
    return app
