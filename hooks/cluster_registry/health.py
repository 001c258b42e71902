"""A small HTTP server for probes and metrics: ``/healthz``, ``/readyz``, ``/metrics`` (aiohttp).

Reusable by every long-running command::

    server = HealthServer("0.0.0.0:8080", registry, ready=lambda: informer.synced)
    await server.start()
    ...
    await server.stop()

``live`` and ``ready`` are callables returning ``True`` or a reason string (``False`` means "not
ready" without a reason); ``/healthz`` and ``/readyz`` answer 200 ``ok`` or 503 with the reason.
For synchronous programs, :func:`start_in_thread` runs the server on its own event loop thread.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable

from aiohttp import web
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

log = logging.getLogger(__name__)

Check = Callable[[], "bool | str"]


def split_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) to (host, port)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"listen address {listen!r} is not HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


def _run_check(check: Check | None) -> tuple[bool, str]:
    if check is None:
        return True, "ok"
    try:
        result = check()
    except Exception as err:  # noqa: BLE001 - a failing check is a failed probe, not a crash
        return False, f"check failed: {type(err).__name__}"
    if result is True:
        return True, "ok"
    return False, result if isinstance(result, str) and result else "not ready"


class HealthServer:
    def __init__(
        self,
        listen: str,
        registry: CollectorRegistry = REGISTRY,
        *,
        live: Check | None = None,
        ready: Check | None = None,
    ) -> None:
        self.host, self.port = split_listen(listen)
        self.registry = registry
        self.live = live
        self.ready = ready
        self._runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/livez", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        return app

    async def _healthz(self, request: web.Request) -> web.Response:
        ok, text = _run_check(self.live)
        return web.Response(status=200 if ok else 503, text=text)

    async def _readyz(self, request: web.Request) -> web.Response:
        ok, text = _run_check(self.ready)
        return web.Response(status=200 if ok else 503, text=text)

    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await site.start()
        if self.port == 0 and site._server is not None:  # an ephemeral port (tests): report the real one
            sockets = getattr(site._server, "sockets", None) or []
            if sockets:
                self.port = int(sockets[0].getsockname()[1])
        log.info("serving /healthz /readyz /metrics", extra={"listen": f"{self.host}:{self.port}"})

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


def start_in_thread(server: HealthServer) -> threading.Thread:
    """Run ``server`` on a daemon thread with its own event loop (for synchronous programs)."""
    started = threading.Event()

    def main() -> None:
        loop = asyncio.new_event_loop()
        loop.run_until_complete(server.start())
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=main, name="health-server", daemon=True)
    thread.start()
    started.wait(10)
    return thread
