"""The token service's HTTP side (aiohttp): distribution's realm, plus probes and metrics.

- ``GET /token?service=&scope=...`` (docker token spec) and ``POST /token`` (OAuth2 password grant,
  what containerd tries first) answer ``{"token", "access_token", "expires_in", "issued_at"}``.
  HTTP basic credentials name the caller (``identify``); wrong credentials get 401, a caller with no
  right gets a token granting nothing (distribution then answers 401 to its request, as registries do).
  A push asked for while GC holds the write lock is refused with 503, ``Retry-After`` and
  ``X-Cluster-Registry-Lock: gc`` (``unknown`` when the lock's state cannot be vouched for), which the
  copy engine treats as "retry after the lock".
- ``/metrics``: our counters followed by distribution's own (its debug listener stays on the pod's
  loopback: ``/debug/pprof`` and ``/debug/vars`` are not reachable from the network).
- ``/readyz``: the lock watch has synced and distribution's ``/debug/health`` answers 200;
  ``/healthz``: the process answers.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest

from cluster_registry import pullcreds
from cluster_registry.gate import access, tokens
from cluster_registry.gate.protocol import LOCK_HEADER
from cluster_registry.gate.state import GateState, Lock

log = logging.getLogger(__name__)
SESSION_KEY = web.AppKey("session", aiohttp.ClientSession)
# A push token is dead at distribution ttl seconds after issue; the replica's drain ack waits this much
# longer: for a request authorised in the token's last instant to finish its manifest write, and for
# the skew between this node's clock and another registry node's (NTP keeps it far below this).
PUSH_GRACE = 5.0


class Sources(Protocol):
    """What the decisions need from the cluster (``kubesync`` reads it; tests pass their own)."""

    def pull_keys(self) -> list[bytes]: ...

    def pusher_password(self, component: str) -> str | None: ...

    def ready(self, namespace: str) -> frozenset[str]: ...

    def synced(self) -> bool: ...


@dataclass(frozen=True)
class Settings:
    signer: tokens.Signer
    shared: bool  # registryAccess: shared (anyone may pull) or isolated
    push_ttl: int = 15
    pull_ttl: int = 300
    registry_debug: str = "http://127.0.0.1:5001"  # distribution's loopback debug listener


def _basic(authorization: str | None) -> tuple[str, str] | None:
    if not authorization or authorization[:6].lower() != "basic ":
        return None
    try:
        user, sep, password = base64.b64decode(authorization[6:].strip(), validate=True).decode().partition(":")
    except (binascii.Error, ValueError):
        return None
    return (user, password) if sep else None


def identify(user: str, password: str, sources: Sources) -> access.Caller | None:
    """The caller these credentials prove, None when they prove nothing."""
    if user in access.PUSHERS:
        expected = sources.pusher_password(user)
        ok = expected is not None and hmac.compare_digest(expected.encode(), password.encode())
        return access.Caller(access.Kind.PUSHER, user) if ok else None
    namespace = pullcreds.verify(sources.pull_keys(), user, password)
    return access.Caller(access.Kind.NAMESPACE, namespace) if namespace else None


def error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    """A registry-style JSON error (``{"errors": [...]}``)."""
    body = json.dumps({"errors": [{"code": code, "message": message, "detail": None}]})
    return web.Response(status=status, text=body, content_type="application/json", headers=headers)


class Metrics:
    """The token requests, and the GC lock's gauges (this replica watches the lock Lease; the GC Job
    is gone by the time anything scrapes)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.tokens = Counter(
            "cluster_registry_token_requests", "token requests by caller kind and outcome", ["caller", "outcome"],
            registry=self.registry,
        )  # fmt: skip
        self.locked = Gauge("cluster_registry_gate_lock_held", "1 while the GC lock is held", registry=self.registry)
        self.gc_window = Gauge(
            "cluster_registry_gc_last_window_seconds",
            "how long the last GC run held writes off (its read-only window); 0 before the first",
            registry=self.registry,
        )

    def exposition(self, state: GateState) -> bytes:
        self.locked.set(1 if state.status() is Lock.HELD else 0)
        self.gc_window.set(state.last_window or 0.0)
        return generate_latest(self.registry)


def make_app(settings: Settings, state: GateState, sources: Sources, *,
             clock: Callable[[], float] = time.time) -> web.Application:
    metrics = Metrics()
    app = web.Application(client_max_size=64 << 10)

    async def startup(app: web.Application) -> None:
        app[SESSION_KEY] = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))

    async def cleanup(app: web.Application) -> None:
        await app[SESSION_KEY].close()

    app.on_startup.append(startup)
    app.on_cleanup.append(cleanup)

    async def token(request: web.Request) -> web.Response:
        if request.method == "POST":
            form = await request.post()
            if form.get("grant_type") != "password":
                return error(400, "UNSUPPORTED", "only the password grant is supported; or GET with basic auth")
            creds: tuple[str, str] | None = (str(form.get("username", "")), str(form.get("password", "")))
            scopes = access.parse_scopes(str(v) for v in form.getall("scope", []))
        else:
            creds = _basic(request.headers.get("Authorization"))
            scopes = access.parse_scopes(request.query.getall("scope", []))
        caller = access.ANONYMOUS
        if creds is not None and (creds[0] or creds[1]):
            found = identify(creds[0], creds[1], sources)
            if found is None:
                metrics.tokens.labels("unknown", "unauthorized").inc()
                log.info("token refused: bad credentials", extra={"user": creds[0][:64]})
                return error(401, "UNAUTHORIZED", "the credentials are not valid for the cluster registry",
                             {"WWW-Authenticate": 'Basic realm="cluster-registry"'})  # fmt: skip
            caller = found
        ready = sources.ready(caller.name) if caller.kind is access.Kind.NAMESPACE else frozenset()
        wants_push = any("push" in s.actions for s in scopes)
        lock = state.status() if wants_push else Lock.FREE
        decision = access.decide(caller, scopes, shared=settings.shared, ready=ready, writes_open=lock is Lock.FREE)
        pushes = any("push" in g.actions for g in decision.grants)
        if pushes:  # record it atomically with the lock check: the drain ack waits for it to die
            lock = state.grant_push(settings.push_ttl + PUSH_GRACE)
            if lock is not Lock.FREE:
                decision = access.Decision((), locked=True)
        if decision.locked:
            metrics.tokens.labels(caller.kind.value, "locked").inc()
            held = lock is Lock.HELD
            message = (
                "the cluster registry is read-only while garbage collection runs; retry later"
                if held else "the cluster registry cannot confirm the garbage-collection lock's state; retry later"
            )  # fmt: skip
            return error(503, "UNAVAILABLE", message,
                         {"Retry-After": str(state.retry_after() if held else 5), LOCK_HEADER: "gc" if held else "unknown"})  # fmt: skip
        ttl = settings.push_ttl if pushes else settings.pull_ttl
        now = clock()
        jwt = tokens.issue(settings.signer, str(caller), decision.grants, ttl, now)
        metrics.tokens.labels(caller.kind.value, "granted" if decision.grants else "nothing").inc()
        issued = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
        body = {"token": jwt, "access_token": jwt, "expires_in": ttl, "issued_at": issued}
        return web.json_response(body, headers={"Cache-Control": "no-store"})

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def readyz(request: web.Request) -> web.Response:
        if not state.synced or not sources.synced():
            return web.Response(status=503, text="lock state, Secrets or Artifacts not synced yet")
        try:
            async with request.app[SESSION_KEY].get(settings.registry_debug + "/debug/health") as r:
                await r.read()
                if r.status != 200:
                    return web.Response(status=503, text=f"registry health answers {r.status}")
        except (aiohttp.ClientError, TimeoutError):
            return web.Response(status=503, text="registry unreachable")
        return web.Response(text="ok")

    async def metrics_handler(request: web.Request) -> web.Response:
        body = metrics.exposition(state)
        try:
            async with request.app[SESSION_KEY].get(settings.registry_debug + "/metrics") as r:
                if r.status == 200:
                    body += await r.read()
        except (aiohttp.ClientError, TimeoutError):
            pass  # our own metrics still answer; distribution's absence shows as missing series
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.router.add_route("GET", "/token", token)
    app.router.add_route("POST", "/token", token)
    app.router.add_route("GET", "/healthz", healthz)
    app.router.add_route("GET", "/readyz", readyz)
    app.router.add_route("GET", "/metrics", metrics_handler)
    return app
