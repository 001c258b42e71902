"""The registry's front as the chart runs it, on loopback against the local cluster's API server:
distribution with ``auth: token`` and ``cluster-registry token-service`` processes as its realm (the GC
lock Lease, their heartbeat Leases and the push-credential Secrets live in the cluster).

    with token_front(cluster, namespace, tmp_path) as f:
        f.pusher()                # pushes as the artifact reconciler (tokens from f.service)
        f.gc_creds                # GC's credentials file (--registry-credentials-file)
        f.service.metrics()       # the token service's /metrics

Several distribution replicas on one object store each get their own token service
(``start_token_service``), as each registry pod has one beside distribution. Without a cluster,
``local_front`` runs the token service in this process with the test's own sources (Secrets, Ready
Artifacts) and its GC lock driven through ``GateState``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, Protocol, TypeVar

from cluster_registry.gate import service, tokens
from cluster_registry.gate.state import GateState
from tests.support.cluster import ROOT, Cluster, wait_for
from tests.support.ociimages import HTTPError, Pusher
from tests.support.registry import AppServer, Registry, free_port, run_registry

PUSHERS = {"artifact-reconciler": "reconciler-e2e-pw", "gc": "gc-e2e-pw"}
SERVICE, ISSUER = "cluster-registry", "cluster-registry-token-service"
LOCK = "gc-lock"
PUSH_TTL = 5  # seconds; the chart's default is 15: shorter keeps every drain (TTL + 5 s grace) short


def env_for(cluster: Cluster) -> dict[str, str]:
    return {**cluster.env(), "PYTHONPATH": str(ROOT / "hooks")}


@dataclass(frozen=True)
class Signing:
    """The token signing key and the JWKS distribution verifies tokens with."""

    key: Path
    jwks: Path

    def auth(self, realm: str) -> dict[str, str]:
        """distribution's ``auth.token`` section, as the chart renders it."""
        return {"realm": realm, "service": SERVICE, "issuer": ISSUER, "jwks": str(self.jwks)}


def new_signing(directory: Path) -> Signing:
    directory.mkdir(parents=True, exist_ok=True)
    key = directory / "signing-key.pem"
    key.write_bytes(tokens.new_private_key_pem())
    jwks = directory / "jwks.json"
    jwks.write_text(tokens.jwks(tokens.load_signer(key.read_bytes(), "", "").key.public_key()))
    return Signing(key, jwks)


def create_push_secrets(cluster: Cluster, namespace: str) -> None:
    """The pushers' credential Secrets, as the chart keeps them (``credentials.yaml``)."""
    for component, password in PUSHERS.items():
        cluster.kubectl("create", "secret", "generic", f"push-{component}", "-n", namespace,
                        f"--from-literal=credentials.yaml=username: {component}\npassword: {password}\n")  # fmt: skip


def token(realm: str, scope: str, component: str = "artifact-reconciler") -> tuple[int, dict[str, str], str]:
    """Ask ``realm`` for a token as ``component``: (status, headers, token or "")."""
    req = urllib.request.Request(f"{realm}?service={SERVICE}&scope={scope}")
    req.add_header("Authorization", "Basic " + base64.b64encode(f"{component}:{PUSHERS[component]}".encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=10) as r:  # noqa: S310 - loopback
            return r.status, dict(r.headers), str(json.loads(r.read())["token"])
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), ""


def push_token_granted(realm: str, repo: str = "probe/w") -> bool:
    """Whether the token service issues a push token now (it does not while GC holds the lock)."""
    return token(realm, f"repository:{repo}:pull,push")[0] == 200


@dataclass
class TokenService:
    realm: str
    identity: str
    proc: subprocess.Popen[bytes]
    log: Path

    def metrics(self) -> str:
        with urllib.request.urlopen(self.realm.removesuffix("/token") + "/metrics", timeout=5) as r:  # noqa: S310
            return str(r.read().decode())

    def metric(self, name: str) -> float | None:
        """The value of an unlabelled series in /metrics, None when absent."""
        return next((float(ln.split()[-1]) for ln in self.metrics().splitlines() if ln.startswith(name + " ")), None)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_token_service(cluster: Cluster, namespace: str, signing: Signing, log: Path, *, identity: str, port: int,
                        registry_debug: str, push_ttl: int = PUSH_TTL) -> TokenService:  # fmt: skip
    """``cluster-registry token-service`` as the chart runs it (shared access: these tests are about writes)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "cluster_registry", "--log-format", "json", "token-service", "--listen", f"127.0.0.1:{port}",
         "--signing-key", str(signing.key), "--access", "shared", *(x for c in PUSHERS for x in ("--pusher", f"{c}=push-{c}")),
         "--push-ttl", str(push_ttl), "--registry-debug", registry_debug, "--lock-name", LOCK, "--namespace", namespace,
         "--identity", identity],
        env=env_for(cluster), stdout=subprocess.DEVNULL, stderr=open(log, "wb"),
    )  # fmt: skip
    return TokenService(f"http://127.0.0.1:{port}/token", identity, proc, log)


def wait_issuing(ts: TokenService) -> None:
    """Until ``ts`` issues push tokens: ready, and its first heartbeat written (GC can know of it)."""
    wait_for(lambda: push_token_granted(ts.realm, "probe/x"), timeout=60, what=f"token service {ts.identity} to issue push tokens")


class Endpoint(Protocol):
    """A distribution process (tests.support.registry.Registry, or an object-store Replica)."""

    @property
    def host(self) -> str: ...

    @property
    def url(self) -> str: ...


@dataclass
class Pod:
    """One registry pod's worth: distribution and the token service beside it."""

    registry: Endpoint
    service: TokenService
    gc_creds: Path

    @property
    def realm(self) -> str:
        return self.service.realm

    def pusher(self, component: str = "artifact-reconciler") -> Pusher:
        return Pusher(self.registry.host, auth=(component, PUSHERS[component]), realm=self.realm)

    def writable(self, repo: str = "probe/w") -> bool:
        """A new writer gets a push token and distribution starts its upload (a fresh client: no cached token)."""
        try:
            return self.pusher().request("POST", f"/v2/{repo}/blobs/uploads/", repo)[0] == 202
        except HTTPError:
            return False  # the token request was refused (503 while GC holds the lock)


@dataclass
class Front(Pod):
    """A registry pod on the filesystem driver."""

    registry: Registry  # its storage is a directory the tests read and age


def write_gc_creds(directory: Path) -> Path:
    creds = directory / "gc-credentials.yaml"
    creds.write_text(f"username: gc\npassword: {PUSHERS['gc']}\n")
    return creds


@contextlib.contextmanager
def token_front(cluster: Cluster, namespace: str, tmp: Path, *, push_ttl: int = PUSH_TTL) -> Iterator[Front]:
    """One registry pod's worth on the filesystem driver: distribution (``auth: token``) and its token service."""
    create_push_secrets(cluster, namespace)
    signing = new_signing(tmp / "signing")
    port, debug = free_port(), free_port()
    with run_registry(tmp / "registry", token_auth=signing.auth(f"http://127.0.0.1:{port}/token"), debug_port=debug) as reg:
        ts = start_token_service(cluster, namespace, signing, tmp / "token-service.log", identity="ts-0", port=port,
                                 registry_debug=f"http://127.0.0.1:{debug}", push_ttl=push_ttl)  # fmt: skip
        try:
            wait_issuing(ts)
            yield Front(reg, ts, write_gc_creds(tmp))
        finally:
            ts.stop()


S = TypeVar("S", bound=service.Sources)


@dataclass
class LocalFront(Generic[S]):
    registry: Registry
    realm: str  # where the token service really is
    state: GateState
    sources: S
    signer: tokens.Signer


@contextlib.contextmanager
def local_front(root: Path, sources: S, *, shared: bool, named_realm: str | None = None,
                push_ttl: int = 15) -> Iterator[LocalFront[S]]:  # fmt: skip
    """distribution with ``auth: token`` and the token service in this process, the lock free (no
    heartbeat expected). ``named_realm``: the realm distribution's challenge names, if not the real one
    (the chart names the node proxy's loopback port)."""
    signing = new_signing(root / "signing")
    signer = tokens.load_signer(signing.key.read_bytes(), ISSUER, SERVICE)
    state = GateState(enabled=True, heartbeat_fence=None)
    state.observe(None)
    debug = free_port()
    settings = service.Settings(signer, shared=shared, push_ttl=push_ttl, registry_debug=f"http://127.0.0.1:{debug}")
    with AppServer(service.make_app(settings, state, sources)) as ts:
        realm = f"http://{ts.host}/token"
        with run_registry(root / "registry", token_auth=signing.auth(named_realm or realm), debug_port=debug) as reg:
            yield LocalFront(reg, realm, state, sources, signer)
