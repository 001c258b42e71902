"""A fault-injecting HTTP proxy in front of a registry, for the copy engine's tests.

    with FaultProxy(reg.url, [Fault("429", r"GET /v2/.*/blobs/", times=2)]) as proxy:
        proxy.host  # "127.0.0.1:PORT": use it as the registry host (plain HTTP)

Each :class:`Fault` applies to the first ``times`` requests whose ``"METHOD /path?query"`` matches
``match`` (``times=-1``: every one). Kinds:

* ``429``: ``429 Too Many Requests`` with ``Retry-After``;
* ``5xx``: an error status (``status``, default 503) with no body;
* ``reset``: the upstream answer's headers and half its body, then a TCP reset;
* ``truncate``: headers with the full Content-Length, half the body, then a clean close;
* ``flip``: the whole body with one byte (in the middle) inverted;
* ``lock``: ``503`` + ``X-Cluster-Registry-Lock: gc`` + ``Retry-After`` (the GC write lock).

``proxy.log`` records ``(method, path, outcome)`` per request. The proxy runs its own event loop
in a thread so it serves synchronous and asynchronous tests alike.
"""

from __future__ import annotations

import asyncio
import re
import socket
import struct
import threading
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-authorization", "host"}


@dataclass
class Fault:
    kind: str
    match: str = r".*"
    times: int = 1
    status: int = 503
    retry_after: str = "1"
    hits: int = 0

    def applies(self, line: str) -> bool:
        if self.times >= 0 and self.hits >= self.times:
            return False
        if not re.search(self.match, line):
            return False
        self.hits += 1
        return True


@dataclass
class FaultProxy:
    upstream: str  # e.g. "http://127.0.0.1:5000"
    faults: list[Fault] = field(default_factory=list)
    log: list[tuple[str, str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.upstream = self.upstream.rstrip("/")
        self._upstream_host = self.upstream.split("://", 1)[1]
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def add(self, fault: Fault) -> Fault:
        self.faults.append(fault)
        return fault

    def _fault_for(self, line: str) -> Fault | None:
        for f in self.faults:
            if f.applies(line):
                return f
        return None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        try:
            return await self._forward(request)
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            return web.Response(status=499)  # the client went away (often on purpose: a test's fault)

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        line = f"{request.method} {request.path_qs}"
        fault = self._fault_for(line)
        if fault and fault.kind in ("429", "5xx", "lock"):
            self.log.append((request.method, request.path, fault.kind))
            await request.read()
            if fault.kind == "429":
                return web.Response(status=429, headers={"Retry-After": fault.retry_after})
            if fault.kind == "lock":
                return web.Response(status=503, headers={"Retry-After": fault.retry_after, "X-Cluster-Registry-Lock": "gc"})
            return web.Response(status=fault.status)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        body: Any = None
        if request.body_exists:
            body = request.content.iter_chunked(1 << 20)
        assert self._client is not None
        async with self._client.request(
            request.method, self.upstream + request.path_qs, headers=headers, data=body, allow_redirects=False
        ) as up:
            out_headers = {k: v for k, v in up.headers.items() if k.lower() not in _HOP}
            if "Location" in out_headers:
                out_headers["Location"] = out_headers["Location"].replace(self._upstream_host, self.host)
            resp = web.StreamResponse(status=up.status, headers=out_headers)
            length = up.content_length
            if length is not None:
                resp.content_length = length
            await resp.prepare(request)
            if request.method == "HEAD":
                self.log.append((request.method, request.path, str(up.status)))
                return resp
            limit = length // 2 if (fault and length and fault.kind in ("reset", "truncate")) else None
            flip_at = length // 2 if (fault and length and fault.kind == "flip") else None
            sent = 0
            async for chunk in up.content.iter_chunked(1 << 16):
                if flip_at is not None and sent <= flip_at < sent + len(chunk):
                    b = bytearray(chunk)
                    b[flip_at - sent] ^= 0xFF
                    chunk = bytes(b)
                if limit is not None and sent + len(chunk) >= limit:
                    await resp.write(chunk[: limit - sent])
                    transport = request.transport
                    assert fault is not None
                    self.log.append((request.method, request.path, fault.kind))
                    if transport is not None:
                        if fault.kind == "reset":
                            sock = transport.get_extra_info("socket")
                            if sock is not None:
                                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                            transport.abort()
                        else:
                            transport.close()
                    return resp
                await resp.write(chunk)
                sent += len(chunk)
            await resp.write_eof()
            self.log.append((request.method, request.path, fault.kind if fault else str(up.status)))
            return resp

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        self._client = aiohttp.ClientSession(auto_decompress=False, timeout=aiohttp.ClientTimeout(total=None))
        app = web.Application(client_max_size=0)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", self.port)
        await site.start()
        self._ready.set()
        await self._stop.wait()
        await runner.cleanup()
        await self._client.close()

    def start(self) -> FaultProxy:
        self._client: aiohttp.ClientSession | None = None

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(self._main())
            self._loop.close()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fault proxy did not start")
        return self

    def stop(self) -> None:
        if self._loop and self._stop:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread:
            self._thread.join(10)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
