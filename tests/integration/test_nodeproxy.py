"""`cluster-registry node-proxy` relays bytes both ways to the registry and drops a client it cannot serve."""

from __future__ import annotations

import asyncio
import socket

import pytest

from cluster_registry.nodeproxy.cli import serve

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def upstream_server() -> tuple[asyncio.AbstractServer, int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.readexactly(3 << 20)
        writer.write(b"got " + str(len(data)).encode() + b" " + data[-5:])
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def test_relays_a_large_exchange_both_ways() -> None:
    async def run() -> bytes:
        server, up = await upstream_server()
        port, started = free_port(), asyncio.Event()
        task = asyncio.create_task(serve(("127.0.0.1", port), ("127.0.0.1", up), 5, started))
        await started.wait()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"x" * ((3 << 20) - 5) + b"12345")
        await writer.drain()
        answer = await reader.read()
        task.cancel()
        server.close()
        return answer

    assert asyncio.run(run()) == b"got 3145728 12345"


def test_a_client_is_closed_when_the_registry_is_unreachable() -> None:
    async def run() -> bytes:
        port, started = free_port(), asyncio.Event()
        task = asyncio.create_task(serve(("127.0.0.1", port), ("127.0.0.1", free_port()), 1, started))
        await started.wait()
        reader, _ = await asyncio.open_connection("127.0.0.1", port)
        answer = await asyncio.wait_for(reader.read(), 5)
        task.cancel()
        return answer

    assert asyncio.run(run()) == b""
