"""`cluster-registry wait-drained` (#16 item 10): the registry pod's network is held until the server
stopped and its clients acknowledged every byte. The pure parts from /proc lines, then the wait on
real loopback sockets: a slow reader keeps it waiting after the server closed, until it read all."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from cluster_registry.drainwait import Socket, busy, parse, read_tables, wait

HEADER = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"


def line(port: int, state: str, tx: int) -> str:
    return f"   0: 0100007F:{port:04X} 0100007F:D431 {state} {tx:08X}:00000000 00:00000000 00000000 0 0 1 1 0 100 0 0 10 0"


@pytest.mark.parametrize(
    ("state", "tx", "held"),
    [
        ("0A", 0, True),  # distribution still listens (its own preStop, then the drain)
        ("01", 0, True),  # a response in progress, between writes
        ("01", 4096, True),
        ("08", 0, True),  # the client closed, the server has not yet
        ("04", 1 << 20, True),  # FIN_WAIT1: the server closed, the tail is not acknowledged yet
        ("04", 0, False),
        ("06", 0, False),  # TIME_WAIT: delivered
        ("07", 0, False),
    ],
)
def test_busy_states(state: str, tx: int, held: bool) -> None:
    sockets = parse(HEADER + line(5000, state, tx) + "\n" + line(5002, "0A", 0))
    assert sockets[0] == Socket(5000, state, tx)
    assert bool(busy(sockets, 5000)) is held
    assert busy(sockets, 5001) == []  # other ports do not count


def test_wait_holds_until_a_slow_reader_received_the_tail() -> None:
    """A real server sends 16 MiB to a client that does not read yet, closes, and stops listening: the
    bytes sit in the kernel, and the wait holds until the client read them all."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)  # the kernel cannot take it all for the client
    client.connect(("127.0.0.1", port))
    conn, _ = server.accept()
    server.close()
    payload = b"x" * (16 << 20)
    sender = threading.Thread(target=lambda: (conn.sendall(payload), conn.close()))
    sender.start()
    time.sleep(0.3)
    assert busy(read_tables(), port), "the unsent tail must be visible in /proc/net/tcp"
    assert wait(port, timeout=0.5, interval=0.05), "returned while the client had not read"
    got = 0
    result: list[list[Socket]] = []
    waiter = threading.Thread(target=lambda: result.append(wait(port, timeout=20, interval=0.05)))
    waiter.start()
    while chunk := client.recv(1 << 20):
        got += len(chunk)
        time.sleep(0.01)
    sender.join()
    waiter.join()
    client.close()
    assert got == len(payload) and result == [[]]
