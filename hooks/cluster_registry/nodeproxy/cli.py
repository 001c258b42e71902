"""``cluster-registry node-proxy``: the cluster registry at ``127.0.0.1:<port>`` of every node.

The webhook rewrites images to ``127.0.0.1:<port>/...`` (the chart's default, docs/pull-path.md): a
stock containerd or CRI-O pulls from a loopback registry over plain HTTP with no node configuration,
while any other host needs a hosts.toml and a CA. This proxy, a hostNetwork DaemonSet listening on
the node's loopback only, relays each connection byte for byte to the registry Service, so whatever
the registry serves the node sees as is (relay.py: in-kernel ``splice``, bounded connections).

The registry answers pulls with distribution's token challenge, whose realm is the token service as
nodes reach it: a second loopback port (``--token-listen``, default 5051) relayed the same way to the
token service's Service port. Both stay on the node's loopback, so containerd needs no configuration.
With ``--ca-file`` (the chart's default) the relay speaks TLS to both Service ports: plain HTTP stays
on the node's loopback, nothing crosses the pod network in clear.
"""

from __future__ import annotations

import logging
import threading

import click

from cluster_registry.nodeproxy.relay import Relay, TlsOrigin, Upstream, fit_connections

log = logging.getLogger(__name__)


def _host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise click.BadParameter(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


@click.command("node-proxy")
@click.option("--listen", default="127.0.0.1:5050", show_default=True,
              help="HOST:PORT on the node (its loopback: nothing off the node can reach it).")
@click.option("--upstream", required=True, help="HOST:PORT of the registry Service.")
@click.option("--connect-timeout", default=5.0, show_default=True, help="Seconds to reach the registry.")
@click.option("--token-listen", default="127.0.0.1:5051", show_default=True,
              help="HOST:PORT on the node for the token service (the realm the registry names).")  # fmt: skip
@click.option("--token-upstream", default="", help="HOST:PORT of the token service's Service; empty: no relay.")
@click.option("--max-connections", default=512, show_default=True, type=click.IntRange(min=1),
              help="Connections relayed at once (both ports); more wait in the listen backlog.")
@click.option("--ca-file", type=click.Path(dir_okay=False), default=None,
              help="Speak TLS to both upstreams, trusting only this CA bundle and verifying their host names.")
@click.option("--idle-timeout", default=300.0, show_default=True, type=click.FloatRange(min=1),
              help="Seconds a connection may move no byte either way before it is closed.")
def node_proxy(listen: str, upstream: str, connect_timeout: float, token_listen: str, token_upstream: str,
               max_connections: int, ca_file: str | None, idle_timeout: float) -> None:
    """Serve the cluster registry (and its token realm) on this node's loopback (a hostNetwork DaemonSet)."""
    pairs = [(listen, upstream)] + ([(token_listen, token_upstream)] if token_upstream else [])
    fitting = fit_connections(max_connections)
    if fitting < max_connections:
        log.warning("the open-file limit allows fewer connections", extra={"wanted": max_connections, "max_connections": fitting})
    slots = threading.BoundedSemaphore(fitting)
    tls = TlsOrigin(ca_file) if ca_file else None
    relays = [Relay(_host_port(a), Upstream(*_host_port(b), connect_timeout, tls), slots, idle_timeout) for a, b in pairs]
    threads = [threading.Thread(target=r.serve_forever, daemon=True) for r in relays]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
