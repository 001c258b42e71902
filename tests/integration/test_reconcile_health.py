"""The probes/metrics server the reconcilers (and others) run: real HTTP on loopback."""

from __future__ import annotations

import aiohttp
from prometheus_client import CollectorRegistry, Counter

from cluster_registry.health import HealthServer


async def test_probes_and_metrics() -> None:
    registry = CollectorRegistry()
    Counter("cluster_registry_test_things", "things", registry=registry).inc(3)
    state: dict[str, bool | str] = {"ready": "caches not synced yet"}

    def boom() -> bool:
        raise RuntimeError("secret detail")

    server = HealthServer("127.0.0.1:0", registry, ready=lambda: state["ready"], live=lambda: True)
    await server.start()
    base = f"http://127.0.0.1:{server.port}"
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{base}/healthz") as r:
                assert (r.status, await r.text()) == (200, "ok")
            async with http.get(f"{base}/readyz") as r:
                assert (r.status, await r.text()) == (503, "caches not synced yet")
            state["ready"] = True
            async with http.get(f"{base}/readyz") as r:
                assert r.status == 200
            async with http.get(f"{base}/metrics") as r:
                assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
                assert "cluster_registry_test_things_total 3.0" in await r.text()
            server.live = boom
            async with http.get(f"{base}/healthz") as r:
                assert r.status == 503 and "secret detail" not in await r.text()
    finally:
        await server.stop()
