"""The webhook on every core (#20): the real CLI process with ``--workers 2`` on loopback TLS.

The kernel spreads connections over the workers (``SO_REUSEPORT``); a scrape of any worker reports
the pod's totals; a killed worker is reported and replaced; SIGTERM lets a request in flight finish.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from cluster_registry.certs import pki
from tests.integration.test_webhook_server import LOCAL, client_ssl, free_port, review, write_pair

WORKERS = 2


class Supervised:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, tmp: Path, ca: tuple[bytes, bytes]) -> None:
        self.proc, self.port, self.tmp, self.ca = proc, port, tmp, ca
        self.url = f"https://127.0.0.1:{port}"

    def workers(self) -> list[int]:
        return [int(p) for p in Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()]

    def log(self) -> str:
        return (self.tmp / "webhook.log").read_text()

    def metrics(self) -> dict[str, float]:
        ctx = client_ssl(self.ca[0])
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as raw, ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            text = b"".join(iter(lambda: s.recv(65536), b"")).decode()
        body = text.split("\r\n\r\n", 1)[1]
        return {ln.rsplit(" ", 1)[0]: float(ln.rsplit(" ", 1)[1]) for ln in body.splitlines() if ln and not ln.startswith("#")}

    def known_series(self) -> set[str]:
        return {k for k in self.metrics() if k.startswith("cluster_registry_webhook_artifacts_known{")}


def start(tmp: Path) -> Supervised:
    ca = pki.new_ca(dt.datetime.now(dt.timezone.utc))
    write_pair(tmp, ca)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cluster_registry", "--log-format", "json", "webhook", "--offline", "--rewrite-policy", "Always",
         "--listen", f"127.0.0.1:{port}", "--tls-cert", str(tmp / "tls.crt"), "--tls-key", str(tmp / "tls.key"),
         "--registry-host", LOCAL],
        env={**os.environ, "CLUSTER_REGISTRY_WEBHOOK_WORKERS": str(WORKERS)},
        stdout=(tmp / "webhook.log").open("wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    s = Supervised(proc, port, tmp, ca)
    deadline = time.monotonic() + 60
    while True:  # every worker has scraped itself into the shared metrics
        try:
            if len(s.known_series()) == WORKERS:
                return s
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail("webhook workers did not start:\n" + s.log())
        time.sleep(0.2)


def stop(s: Supervised) -> None:
    s.proc.terminate()
    try:
        s.proc.wait(30)
    except subprocess.TimeoutExpired:
        s.proc.kill()


@pytest.fixture(scope="module")
def hook(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Supervised]:
    s = start(tmp_path_factory.mktemp("workers"))
    yield s
    stop(s)


def sockets(pid: int) -> int:
    fds = Path(f"/proc/{pid}/fd")
    return sum(1 for fd in fds.iterdir() if os.readlink(fd).startswith("socket:"))


async def post_each(s: Supervised, n: int, keep_open: bool = False) -> list[dict[str, Any]]:
    """``n`` reviews at once, each on its own connection; every answer must be the review's own."""
    body = review("deployment_pod")
    connector = aiohttp.TCPConnector(ssl=client_ssl(s.ca[0]), limit=n, force_close=not keep_open)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(i: int) -> dict[str, Any]:
            doc = json.loads(json.dumps(body))
            doc["request"]["uid"] = f"uid-{i}"
            async with session.post(f"{s.url}/mutate", json=doc) as r:
                assert r.status == 200
                got: dict[str, Any] = await r.json()
            assert got["response"]["uid"] == f"uid-{i}" and "patch" in got["response"]
            return got

        results = await asyncio.gather(*(one(i) for i in range(n)))
        if keep_open:  # hand the caller a moment with every connection still open
            await asyncio.sleep(0)
            s.open_sockets = {pid: sockets(pid) for pid in s.workers()}  # type: ignore[attr-defined]
        return results


async def test_every_worker_takes_connections_and_metrics_are_the_pods(hook: Supervised) -> None:
    workers = hook.workers()
    assert len(workers) == WORKERS
    before = hook.metrics().get('cluster_registry_webhook_requests_total{result="patched"}', 0.0)
    await asyncio.sleep(0.5)  # the scrape's connection closed on the worker's side too
    before_sockets = {pid: sockets(pid) for pid in workers}
    await post_each(hook, 24, keep_open=True)
    took = {pid: hook.open_sockets[pid] - before_sockets[pid] for pid in workers}  # type: ignore[attr-defined]
    assert sum(took.values()) == 24 and all(n > 0 for n in took.values()), took  # the kernel spread them
    # any worker's scrape sums every worker's counters
    after = [hook.metrics()['cluster_registry_webhook_requests_total{result="patched"}'] for _ in range(6)]
    assert after == [before + 24] * 6
    assert hook.known_series() == {f'cluster_registry_webhook_artifacts_known{{pid="{pid}"}}' for pid in workers}


async def test_a_killed_worker_is_reported_and_replaced(hook: Supervised) -> None:
    victim, survivor = hook.workers()
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while victim in hook.workers() or len(hook.workers()) != WORKERS or len(hook.known_series()) != WORKERS:
        assert time.monotonic() < deadline, hook.log()
        await asyncio.sleep(0.2)
    assert survivor in hook.workers()
    assert hook.metrics()["cluster_registry_webhook_worker_restarts_total"] == 1
    exits = [json.loads(ln) for ln in hook.log().splitlines() if "worker exited" in ln]
    assert [(e["pid"], e["code"]) for e in exits] == [(victim, -signal.SIGKILL)]
    # the dead worker's gauge is gone, its counters stay in the totals; both workers answer again
    assert f'cluster_registry_webhook_artifacts_known{{pid="{victim}"}}' not in hook.known_series()
    await post_each(hook, 16)


def test_sigterm_lets_the_request_in_flight_finish(tmp_path: Path) -> None:
    s = start(tmp_path)
    body = json.dumps(review("deployment_pod")).encode()
    ctx = client_ssl(s.ca[0])
    with socket.create_connection(("127.0.0.1", s.port), timeout=10) as raw, ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        tls.sendall(b"POST /mutate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n" % len(body) + body[:100])  # fmt: skip
        time.sleep(0.5)  # the request is being read
        workers = s.workers()
        s.proc.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        with pytest.raises(OSError):  # no worker takes new connections any more
            socket.create_connection(("127.0.0.1", s.port), timeout=2).close()
        tls.sendall(body[100:])
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = tls.recv(65536)
            if not chunk:
                break
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert s.proc.wait(30) == 0, s.log()
    assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()]  # no worker outlives it
    assert "worker exited" not in s.log()  # a drain is not a crash
