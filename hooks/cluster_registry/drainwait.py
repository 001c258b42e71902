"""``cluster-registry wait-drained``: hold a terminating pod's network until its clients have their bytes.

A server that drains on SIGTERM (distribution's ``http.draintimeout``) finishes a response once the
last bytes are in the kernel's send buffer, then exits. A slow client may still have megabytes to
receive; when every container has exited the kubelet tears the pod's network namespace down, the
unsent bytes go with it and the client waits for the rest until its own timeout (seen on the real
nodes: a 64 MiB pull at 4 MiB/s lost its last 1.5 MiB). Run as another container's preStop hook in
the same pod (one network namespace), this waits until nothing listens on the port, no connection to
it is open and none still holds unacknowledged data; the kubelet stops that container only then.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import click

from cluster_registry.units import parse_duration

log = logging.getLogger(__name__)

TABLES = ("/proc/net/tcp", "/proc/net/tcp6")  # this network namespace's TCP sockets
# TCP states (include/net/tcp_states.h) in which the server may still send: the listener, and open
# connections. Closed ones count only while their send queue holds data.
OPEN_STATES = {"01": "ESTABLISHED", "03": "SYN_RECV", "08": "CLOSE_WAIT", "0A": "LISTEN"}


@dataclass(frozen=True)
class Socket:
    port: int  # local port
    state: str  # hex, as /proc shows it
    tx_queue: int  # bytes sent but not acknowledged, or not sent yet

    def __str__(self) -> str:
        return f":{self.port} {OPEN_STATES.get(self.state, self.state)} tx_queue={self.tx_queue}"


def parse(table: str) -> list[Socket]:
    """The sockets of one ``/proc/net/tcp``-format table (pure)."""
    out = []
    for line in table.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 5:
            continue
        tx, _, _ = fields[4].partition(":")
        out.append(Socket(int(fields[1].rpartition(":")[2], 16), fields[3], int(tx, 16)))
    return out


def busy(sockets: list[Socket], port: int) -> list[Socket]:
    """The sockets on ``port`` that keep the pod's network needed (pure)."""
    return [s for s in sockets if s.port == port and (s.state in OPEN_STATES or s.tx_queue > 0)]


def read_tables() -> list[Socket]:
    return [s for t in TABLES if Path(t).exists() for s in parse(Path(t).read_text())]


def wait(port: int, timeout: float, interval: float = 0.2, read: Callable[[], list[Socket]] = read_tables,
         clock: Callable[[], float] = time.monotonic) -> list[Socket]:  # fmt: skip
    """Wait until :func:`busy` is empty or ``timeout`` passed; what was still busy (empty: drained)."""
    deadline = clock() + timeout
    while (left := busy(read(), port)) and clock() < deadline:
        time.sleep(interval)
    return left


@click.command("wait-drained")
@click.option("--port", type=click.IntRange(1, 65535), required=True, help="The server's port in this pod.")
@click.option("--timeout", default="65s", show_default=True, help="Give up after this (keep it under the grace period).")
def wait_drained(port: int, timeout: str) -> None:
    """Wait until the pod's server on PORT stopped and its clients received everything it sent."""
    left = wait(port, parse_duration(timeout))
    if left:
        log.warning("still busy at the time-out", extra={"sockets": [str(s) for s in left[:10]]})
    else:
        log.info("drained", extra={"port": port})
