"""``cluster-registry gate``: the registry pod's write gate (see ``proxy`` and ``protocol``)."""

from __future__ import annotations

import logging
import os
import socket
import threading

import click
from aiohttp import web

from cluster_registry import kube
from cluster_registry.gate.kubesync import Heartbeat, LockWatcher
from cluster_registry.gate.proxy import Credentials, make_app
from cluster_registry.gate.state import GateState

log = logging.getLogger(__name__)


@click.command()
@click.option("--listen", default="0.0.0.0:5000", show_default=True, help="HOST:PORT to serve on.")
@click.option("--upstream", default="http://127.0.0.1:5001", show_default=True, help="The registry on the pod's loopback.")
@click.option("--credentials-file", type=click.Path(dir_okay=False), help="YAML/JSON {username, password}: who may write.")
@click.option("--lock-name", default="cluster-registry-gc", show_default=True, help="The GC Lease; empty disables the lock.")
@click.option("--namespace", envvar=["CLUSTER_REGISTRY_GATE_NAMESPACE", "POD_NAMESPACE"], default="default", show_default=True)
@click.option("--identity", envvar=["CLUSTER_REGISTRY_GATE_IDENTITY", "POD_NAME"], default=socket.gethostname,
              help="This replica's name (its heartbeat Lease); default the pod name.")  # fmt: skip
@click.option("--pod-uid", envvar=["CLUSTER_REGISTRY_GATE_POD_UID", "POD_UID"], default=None,
              help="Owner of the heartbeat Lease, so it goes with the pod.")  # fmt: skip
@click.option("--kubeconfig", type=click.Path(dir_okay=False))
def gate(
    listen: str,
    upstream: str,
    credentials_file: str | None,
    lock_name: str,
    namespace: str,
    identity: str,
    pod_uid: str | None,
    kubeconfig: str | None,
) -> None:
    """Serve the registry: anonymous reads, authenticated writes, refused while GC holds its lock."""
    if not credentials_file:
        log.warning("no --credentials-file: every write is refused")
    state = GateState(enabled=bool(lock_name))
    stop = threading.Event()
    heartbeat: Heartbeat | None = None
    if lock_name:
        api = kube.api_client(kubeconfig)
        heartbeat = Heartbeat(api, namespace, lock_name, identity, state, stop, pod_uid=pod_uid)
        # No write is admitted before the first heartbeat lands (GateState fences on it), so GC
        # always knows of a replica before that replica can write.
        heartbeat.start()
        LockWatcher(api, namespace, lock_name, state, stop).start()
    app = make_app(upstream, state, Credentials(credentials_file))
    host, _, port = listen.rpartition(":")
    log.info("gate serving", extra={"listen": listen, "upstream": upstream, "lock": lock_name or None})
    try:
        web.run_app(app, host=host or "0.0.0.0", port=int(port), access_log=None, print=None, handle_signals=True)
    finally:
        stop.set()
        if heartbeat is not None:
            heartbeat.remove()
    os._exit(0)  # the watch thread may sit in a blocking read
