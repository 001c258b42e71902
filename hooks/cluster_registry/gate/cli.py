"""``cluster-registry token-service``: distribution's token realm in the registry pod (``service``,
``access``, ``tokens``), and the GC write lock's replica side (``kubesync``, ``state``)."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from aiohttp import web

from cluster_registry import kube, kubeio
from cluster_registry.certs.serving import TlsFiles
from cluster_registry.gate import access, service, tokens
from cluster_registry.gate.kubesync import ClusterSources, Heartbeat, LockWatcher, SecretPoller
from cluster_registry.gate.state import GateState

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])


def lock_options(f: F) -> F:
    """The GC lock's options (the Lease, this replica's heartbeat, the API)."""
    for option in reversed([
        click.option("--lock-name", default="cluster-registry-gc", show_default=True, help="The GC Lease; empty disables the lock."),
        click.option("--namespace", envvar=["CLUSTER_REGISTRY_GATE_NAMESPACE", "POD_NAMESPACE"], default="default", show_default=True),
        click.option("--identity", envvar=["CLUSTER_REGISTRY_GATE_IDENTITY", "POD_NAME"], default=socket.gethostname,
                     help="This replica's name (its heartbeat Lease); default the pod name."),
        click.option("--pod-uid", envvar=["CLUSTER_REGISTRY_GATE_POD_UID", "POD_UID"], default=None,
                     help="Owner of the heartbeat Lease, so it goes with the pod."),
        click.option("--kubeconfig", type=click.Path(dir_okay=False)),
    ]):
        f = option(f)
    return f


def _pushers(values: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for v in values:
        component, sep, secret = v.partition("=")
        if not sep or component not in access.PUSHERS or not secret:
            raise click.BadParameter(f"expected COMPONENT=SECRET with COMPONENT one of {sorted(access.PUSHERS)}, got {v!r}")
        out[component] = secret
    return out


def _tls(app: web.Application, cert: str | None, key: str | None) -> ssl.SSLContext | None:
    """The serving context, following renewals of the certificate files (the webhook's code)."""
    if not cert or not key:
        return None
    files = TlsFiles(cert, key)
    files.reload_if_changed()  # a missing or bad pair fails here, at start

    async def watch(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(files.watch(5.0))
        yield
        task.cancel()

    app.cleanup_ctx.append(watch)
    return files.context


@click.command("token-service")
@click.option("--listen", default="0.0.0.0:5002", show_default=True, help="HOST:PORT to serve /token, /metrics, probes.")
@click.option("--tls-cert", type=click.Path(dir_okay=False), help="Serve HTTPS with this certificate (re-read when renewed).")
@click.option("--tls-key", type=click.Path(dir_okay=False))
@click.option("--signing-key", required=True, type=click.Path(dir_okay=False), help="PEM EC P-256 key the tokens are signed with.")
@click.option("--issuer", default="cluster-registry-token-service", show_default=True, help="distribution's auth.token.issuer.")
@click.option("--service", "service_name", default="cluster-registry", show_default=True, help="distribution's auth.token.service.")
@click.option("--access", "access_mode", type=click.Choice(["isolated", "shared"]), default="isolated", show_default=True,
              help="isolated: a namespace pulls what is Ready for it; shared: anyone pulls anything.")  # fmt: skip
@click.option("--pull-keys-secret", default="", help="The release's pull-credential keys Secret (current/previous).")
@click.option("--pusher", "pushers", multiple=True, help="COMPONENT=SECRET: a component's push credential Secret (repeatable).")
@click.option("--push-ttl", default=15, show_default=True, help="Seconds a push token lives (GC's drain waits for them).")
@click.option("--pull-ttl", default=300, show_default=True, help="Seconds a pull token lives.")
@click.option("--registry-debug", default="http://127.0.0.1:5001", show_default=True,
              help="distribution's debug listener on the pod's loopback (/metrics, /debug/health).")  # fmt: skip
@lock_options
def token_service(
    listen: str, tls_cert: str | None, tls_key: str | None, signing_key: str, issuer: str, service_name: str,
    access_mode: str, pull_keys_secret: str, pushers: tuple[str, ...], push_ttl: int, pull_ttl: int,
    registry_debug: str, lock_name: str, namespace: str, identity: str, pod_uid: str | None, kubeconfig: str | None,
) -> None:  # fmt: skip
    """Serve distribution's token realm: who may pull, push and delete, and no push while GC locks."""
    if push_ttl < 1 or pull_ttl < 1:
        raise click.BadParameter("token lifetimes must be at least 1 s")
    pusher_secrets = _pushers(pushers)
    signer = tokens.load_signer(Path(signing_key).read_bytes(), issuer, service_name)
    settings = service.Settings(signer, access_mode == "shared", push_ttl, pull_ttl, registry_debug.rstrip("/"))
    api = kube.api_client(kubeconfig)
    stop = threading.Event()
    state = GateState(enabled=bool(lock_name))
    heartbeat: Heartbeat | None = None
    if lock_name:
        heartbeat = Heartbeat(api, namespace, lock_name, identity, state, stop, pod_uid=pod_uid)
        heartbeat.start()  # no push token before GC can know of this replica (GateState fences on it)
        LockWatcher(api, namespace, lock_name, state, stop).start()
    names = [n for n in (pull_keys_secret, *pusher_secrets.values()) if n]
    poller = SecretPoller(api, namespace, names, stop)
    poller.start()
    index = access.ReadyIndex()
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    informer = None
    if not settings.shared:
        informer = kubeio.Informer(kubeio.Kube(api), "artifacts", loop, index.update)
        informer.start()
    sources = ClusterSources(poller, pull_keys_secret, pusher_secrets, index, informer)
    app = service.make_app(settings, state, sources)
    host, _, port = listen.rpartition(":")
    log.info("token service serving", extra={"listen": listen, "access": access_mode, "lock": lock_name or None})
    try:
        web.run_app(app, host=host or "0.0.0.0", port=int(port), ssl_context=_tls(app, tls_cert, tls_key),
                    access_log=None, print=None, handle_signals=True, loop=loop)  # fmt: skip
    finally:
        stop.set()
        if informer is not None:
            informer.stop()
        if heartbeat is not None:
            heartbeat.remove()
    os._exit(0)  # the watch threads may sit in a blocking read
