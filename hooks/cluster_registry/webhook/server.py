"""The webhook's HTTPS server (aiohttp): ``/mutate``, ``/healthz``, ``/readyz``, ``/metrics``.

``/mutate`` only answers: it writes nothing, whoever calls it. What one caller can cost is bounded
(:class:`Limits`): a body larger than the API server can send for a pod is refused unread, a body
with more JSON arrays and objects than a pod can hold is refused before it is parsed (parsing
``[],[],...`` costs ~60 bytes of memory per 3 bytes of input), at most ``concurrent`` requests are
read and parsed at once, and a client gets ``idle_timeout`` seconds for its request line and
headers (aiohttp's keep-alive timer, which also runs before the first request) and ``body_timeout``
for its body.

TLS 1.2 or newer; the certificate and key files are polled and, when their contents change and the
new pair loads, swapped into the live SSL context so new connections get the new certificate with no
restart (a Secret volume's atomic symlink swap, cert-manager, or ``certs`` renewing the Secret).

One process serves on one core; :mod:`cluster_registry.webhook.workers` runs several of these
servers as workers on one port (``SO_REUSEPORT``), their metrics summed through prometheus_client's
multiprocess files (``multiprocess_dir``), each worker joining the port only once its view synced.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import time
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from cluster_registry.certs.serving import TlsFiles
from cluster_registry.leader import LeaderElector
from cluster_registry.webhook.mutate import BadRequest, Mutator, Skip
from cluster_registry.webhook.recorder import Recording
from cluster_registry.webhook.view import ArtifactView

log = logging.getLogger(__name__)

BUCKETS = (0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class TooLarge(Exception):
    """A request body over one of the :class:`Limits`."""


@dataclass(frozen=True)
class Limits:
    # An AdmissionReview carries the pod twice at most (object, oldObject) and etcd stores objects of
    # up to 1.5 MiB: 4 MiB covers every review the API server can send.
    max_body: int = 4 * 1024 * 1024
    # JSON arrays and objects per body. A pod at etcd's limit made of env entries and volume mounts
    # holds ~25,000; parsing 100,000 costs ~6 MiB.
    max_structures: int = 100_000
    concurrent: int = 4
    # An idle keep-alive connection is closed after this, and a request's line and headers must arrive
    # within it. Longer than the API server keeps an idle connection to a webhook (Go's http.Transport,
    # 90 s): the client closes first. A server closing first races the API server's next call, which
    # then gets EOF and is not retried (a POST): the admission fails, or the pod goes unrewritten.
    idle_timeout: float = 120.0
    body_timeout: float = 10.0


PREFIX = "cluster_registry_webhook"


class Metrics:
    """The request path's metrics. Gauges are set by :meth:`refresh` (not ``set_function``, which
    multiprocess mode cannot share): before each scrape, and every second in a worker."""

    def __init__(self, registry: CollectorRegistry, view: ArtifactView) -> None:
        p = PREFIX
        self.requests = Counter(f"{p}_requests", "AdmissionReview requests by result", ["result"], registry=registry)
        self.latency = Histogram(
            f"{p}_request_duration_seconds", "Time to answer /mutate", buckets=BUCKETS, registry=registry
        )
        self.rewrites = Counter(f"{p}_rewrites", "Image references rewritten", registry=registry)
        self.skips = Counter(f"{p}_skips", "Images or requests left unchanged, by reason", ["reason"], registry=registry)
        self.by_result = {
            r: self.requests.labels(r) for r in ("patched", "unchanged", "bad_request", "too_large", "timeout", "error")
        }
        self.by_reason = {s.value: self.skips.labels(s.value) for s in Skip}
        # one series per live worker (label pid) in multiprocess mode: each worker's view shows
        self._known = Gauge(
            f"{p}_artifacts_known", "Artifacts in the watch-fed view", registry=registry, multiprocess_mode="liveall"
        )
        self._view = view

    def refresh(self) -> None:
        self._known.set(len(self._view))


class RecordingMetrics:
    """The pod watch's metrics, in the one process per pod that records Artifacts."""

    def __init__(self, registry: CollectorRegistry, recording: Recording) -> None:
        p = PREFIX  # one process records: "livesum" is its values, while it lives
        self.recording = recording
        self.pods = Gauge(f"{p}_pods_watched", "Pods in the watch that records Artifacts", registry=registry,
                          multiprocess_mode="livesum")
        self.pending = Gauge(f"{p}_artifact_intents_pending", "Artifact intents waiting to be written",
                             registry=registry, multiprocess_mode="livesum")
        self.writes = Gauge(f"{p}_artifact_api_writes", "Artifact writes since start", ["op"], registry=registry,
                            multiprocess_mode="livesum")
        self.errors = Gauge(f"{p}_artifact_errors", "Failed Artifact batches since start", registry=registry,
                            multiprocess_mode="livesum")

    def refresh(self) -> None:
        recorder = self.recording.recorder
        self.pods.set(len(self.recording.pods))
        self.pending.set(recorder.pending)
        self.writes.labels("create").set(recorder.stats.creates)
        self.writes.labels("patch").set(recorder.stats.patches)
        self.errors.set(recorder.stats.errors)


def exposition(registry: CollectorRegistry, multiprocess_dir: str) -> bytes:
    """The text format: ``registry``, or every process's files in ``multiprocess_dir`` summed."""
    if not multiprocess_dir:
        return bytes(generate_latest(registry))
    merged = CollectorRegistry()
    multiprocess.MultiProcessCollector(merged, path=multiprocess_dir)  # type: ignore[no-untyped-call]
    return bytes(generate_latest(merged))


async def refresh_every(interval: float, *refreshers: Metrics | RecordingMetrics) -> None:
    while True:
        for r in refreshers:
            r.refresh()
        await asyncio.sleep(interval)


def record(recording: Recording, elector: LeaderElector | None, stopping: asyncio.Event) -> asyncio.Task[None]:
    """The pod watch recording Artifacts, while this replica leads (``elector``; None: always)."""
    work = recording.run
    return asyncio.create_task(elector.run(work, stopping) if elector is not None else work())


@dataclass
class Webhook:
    mutator: Mutator
    view: ArtifactView
    tls: TlsFiles | None
    registry: CollectorRegistry
    recording: Recording | None = None  # the pod watch recording Artifacts (None: offline)
    elector: LeaderElector | None = None  # records only while it leads (None: always)
    limits: Limits = Limits()
    multiprocess_dir: str = ""  # a worker's: metrics are summed over every process writing there

    def __post_init__(self) -> None:
        self.metrics = Metrics(self.registry, self.view)
        self.recording_metrics = RecordingMetrics(self.registry, self.recording) if self.recording else None
        self._slots = asyncio.Semaphore(self.limits.concurrent)
        self.in_flight = 0  # requests begun and not answered, for the drain on shutdown

    async def mutate(self, request: web.Request) -> web.Response:
        self.in_flight += 1
        try:
            return await self._mutate(request)
        finally:
            self.in_flight -= 1

    async def _mutate(self, request: web.Request) -> web.Response:
        start = time.perf_counter()
        m = self.metrics
        limits = self.limits
        if request.content_length is not None and request.content_length > limits.max_body:
            m.by_result["too_large"].inc()
            return web.json_response({"error": f"body larger than {limits.max_body} bytes"}, status=413)
        async with self._slots:
            try:
                body = await asyncio.wait_for(self._read(request), limits.body_timeout)
            except asyncio.TimeoutError:
                m.by_result["timeout"].inc()
                return web.json_response({"error": f"body not received within {limits.body_timeout:.0f}s"}, status=408)
            except TooLarge as err:
                m.by_result["too_large"].inc()
                return web.json_response({"error": str(err)}, status=413)
            try:
                outcome = self.mutator.review(orjson.loads(body), self.view)
            except (BadRequest, ValueError) as err:  # orjson's errors (bad JSON, UTF-8, nesting) are ValueErrors
                m.by_result["bad_request"].inc()
                return web.json_response({"error": f"not an AdmissionReview: {err}"}, status=400)
            del body
        if outcome.error is not None:
            log.error(
                "internal error, admitting unchanged",
                exc_info=outcome.error,
                extra={"uid": outcome.review["response"]["uid"]},
            )
            m.by_result["error"].inc()
        else:
            m.by_result["patched" if outcome.rewrites else "unchanged"].inc()
        if outcome.rewrites:
            m.rewrites.inc(outcome.rewrites)
        for reason, n in outcome.skips.items():
            m.by_reason[reason].inc(n)
        response = web.Response(body=orjson.dumps(outcome.review), content_type="application/json")
        m.latency.observe(time.perf_counter() - start)
        return response

    async def _read(self, request: web.Request) -> bytes:
        """The body, refused as soon as it passes either limit (so a refused body is never held whole)."""
        limits = self.limits
        chunks: list[bytes] = []
        size = structures = 0
        async for chunk in request.content.iter_any():
            size += len(chunk)
            if size > limits.max_body:
                raise TooLarge(f"body larger than {limits.max_body} bytes")
            structures += chunk.count(b"[") + chunk.count(b"{")
            if structures > limits.max_structures:
                raise TooLarge(f"more than {limits.max_structures} JSON arrays and objects")
            chunks.append(chunk)
        return b"".join(chunks)

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def readyz(self, request: web.Request) -> web.Response:
        problems = []
        if not self.view.synced:
            problems.append("artifact view not synced")
        if self.tls is not None and not self.tls.loaded:
            problems.append("TLS not loaded")
        if problems:
            return web.Response(status=503, text="; ".join(problems))
        return web.Response(text="ok")

    def refresh_metrics(self) -> None:
        self.metrics.refresh()
        if self.recording_metrics is not None:
            self.recording_metrics.refresh()

    async def metrics_handler(self, request: web.Request) -> web.Response:
        self.refresh_metrics()
        body = exposition(self.registry, self.multiprocess_dir)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.limits.max_body)
        app.router.add_post("/mutate", self.mutate)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics_handler)
        return app


class Running:
    """A started server: its port, and how to stop it."""

    def __init__(self, runner: web.AppRunner, port: int, tasks: list[asyncio.Task[Any]], webhook: Webhook) -> None:
        self.runner = runner
        self.port = port
        self.tasks = tasks
        self.webhook = webhook
        self.stopping = asyncio.Event()

    async def stop(self, drain: float = 5.0) -> None:
        # Stop listening, then let requests begun finish before closing connections: aiohttp's
        # cleanup drops the rest of a body still arriving (and the request would time out).
        for site in list(self.runner.sites):
            await site.stop()
        deadline = time.monotonic() + self.webhook.limits.body_timeout
        while self.webhook.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await self.runner.cleanup()
        if self.webhook.recording is not None:
            await self.webhook.recording.recorder.drained(drain)
        self.stopping.set()  # the elector releases its Lease
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.webhook.view.stop()


async def start(
    webhook: Webhook, host: str, port: int, reload_interval: float = 5.0, worker: bool = False
) -> Running:
    """Start serving ``webhook`` on host:port (port 0: any free port); returns once listening.

    A ``worker`` shares the port with its siblings (``SO_REUSEPORT``) and joins only once its view
    synced: the pod is already Ready through them, so it must never answer from an empty view.
    """
    tasks: list[asyncio.Task[Any]] = []
    ssl_context = None
    if webhook.tls is not None:
        webhook.tls.reload_if_changed()
        ssl_context = webhook.tls.context
        tasks.append(asyncio.create_task(webhook.tls.watch(reload_interval)))
    webhook.view.start()
    if webhook.multiprocess_dir:
        tasks.append(asyncio.create_task(refresh_every(1.0, webhook.metrics)))
    while worker and not webhook.view.synced:
        await asyncio.sleep(0.05)
    runner = web.AppRunner(
        webhook.app(), access_log=None, handle_signals=False, keepalive_timeout=webhook.limits.idle_timeout
    )
    await runner.setup()
    site = web.TCPSite(
        runner, host, port, ssl_context=ssl_context, backlog=1024, reuse_address=True, reuse_port=worker or None
    )
    await site.start()
    server: Any = site._server
    sockets = server.sockets if server is not None else ()
    actual = sockets[0].getsockname()[1] if sockets else port
    running = Running(runner, int(actual), tasks, webhook)
    if webhook.recording is not None:
        tasks.append(record(webhook.recording, webhook.elector, running.stopping))
    return running


async def orphaned(parent: int) -> None:
    """Return once ``parent`` is no longer this process's parent (a worker outliving its supervisor)."""
    while os.getppid() == parent:
        await asyncio.sleep(1.0)


async def serve_forever(
    webhook: Webhook, host: str, port: int, reload_interval: float = 5.0, worker: bool = False
) -> None:
    running = await start(webhook, host, port, reload_interval, worker)
    # Everything allocated so far (modules, clients, the view) lives as long as the process: keep it
    # out of the collector's full passes, which otherwise stall requests for milliseconds.
    gc.freeze()
    log.info(
        "webhook listening",
        extra={"address": f"{host}:{running.port}", "policy": webhook.mutator.settings.policy.value},
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if worker:
        parent = os.getppid()
        running.tasks.append(asyncio.create_task(orphaned(parent)))
        running.tasks[-1].add_done_callback(lambda _: stop.set())
    await stop.wait()
    log.info("shutting down")
    await running.stop()
