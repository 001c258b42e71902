"""``cluster-registry node-proxy``: the cluster registry at ``127.0.0.1:<port>`` of every node.

The webhook rewrites images to ``127.0.0.1:<port>/...`` (the chart's default, docs/pull-path.md): a
stock containerd or CRI-O pulls from a loopback registry over plain HTTP with no node configuration,
while any other host needs a hosts.toml and a CA. This proxy, a hostNetwork DaemonSet listening on
the node's loopback only, relays each connection byte for byte to the registry Service (the gate),
so whatever the registry serves the node sees as is.

The registry answers pulls with distribution's token challenge, whose realm is the token service as
nodes reach it: a second loopback port (``--token-listen``, default 5051) relayed the same way to the
token service's Service port. Both stay on the node's loopback, so containerd needs no configuration.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import click

log = logging.getLogger(__name__)
BUFFER = 1 << 16


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
    moved = 0
    try:
        while data := await reader.read(BUFFER):
            writer.write(data)
            moved += len(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(ConnectionError, OSError, RuntimeError):
            writer.close()
    return moved


async def serve(listen: tuple[str, int], upstream: tuple[str, int], connect_timeout: float,
                started: asyncio.Event | None = None) -> None:
    """Relay every connection to LISTEN to UPSTREAM (resolved per connection: the Service may move)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(*upstream), connect_timeout)
        except (OSError, asyncio.TimeoutError) as e:
            log.warning("registry unreachable", extra={"upstream": "%s:%d" % upstream, "error": str(e) or type(e).__name__})
            writer.close()
            return
        await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer))

    server = await asyncio.start_server(handle, *listen, reuse_address=True)
    log.info("node proxy serving", extra={"listen": "%s:%d" % listen, "upstream": "%s:%d" % upstream})
    if started is not None:
        started.set()
    async with server:
        await server.serve_forever()


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
def node_proxy(listen: str, upstream: str, connect_timeout: float, token_listen: str, token_upstream: str) -> None:
    """Serve the cluster registry (and its token realm) on this node's loopback (a hostNetwork DaemonSet)."""
    relays = [(listen, upstream)] + ([(token_listen, token_upstream)] if token_upstream else [])

    async def main() -> None:
        await asyncio.gather(*(serve(_host_port(a), _host_port(b), connect_timeout) for a, b in relays))

    asyncio.run(main())
