"""ci/nodenet.py's cluster DNS answers (the local cluster's real nodes resolve Services with it)."""

from __future__ import annotations

import socket
import struct
import sys

import pytest

from tests.support.cluster import ROOT

sys.path.insert(0, str(ROOT / "ci"))
from nodenet import dns_answer  # noqa: E402 (ci/ is not a package)

pytestmark = pytest.mark.unit
RECORDS = {"web.shop.svc.cluster.local": ["198.19.0.7"], "db.shop.svc.cluster.local": ["198.18.112.4", "198.18.113.9"]}


def query(name: str, qtype: int = 1, qid: int = 0x1234) -> bytes:
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split("."))
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + labels + b"\0" + struct.pack("!HH", qtype, 1)


def parse(reply: bytes) -> tuple[int, int, list[str]]:
    qid, flags, _, ancount, _, _ = struct.unpack("!HHHHHH", reply[:12])
    i = 12
    while reply[i]:
        i += 1 + reply[i]
    i += 5
    addrs = []
    for _ in range(ancount):
        _, rtype, _, _, rdlen = struct.unpack("!HHHIH", reply[i:i + 12])
        addrs.append(socket.inet_ntoa(reply[i + 12:i + 12 + rdlen]))
        i += 12 + rdlen
    return qid, flags & 0xF, addrs


@pytest.mark.parametrize("name,qtype,rcode,addrs", [
    ("web.shop.svc.cluster.local", 1, 0, ["198.19.0.7"]),
    ("WEB.Shop.svc.cluster.local", 1, 0, ["198.19.0.7"]),  # names are case-insensitive
    ("db.shop.svc.cluster.local", 1, 0, ["198.18.112.4", "198.18.113.9"]),  # headless: every ready endpoint
    ("web.shop.svc.cluster.local", 28, 0, []),  # AAAA of a known name: no data, not an error
    ("web.shop.svc.cluster.local.shop.svc.cluster.local", 1, 3, []),  # a search-list try: NXDOMAIN
    ("example.com", 1, 5, []),  # outside the cluster domain: refused (no upstream here)
])
def test_answers(name: str, qtype: int, rcode: int, addrs: list[str]) -> None:
    reply = dns_answer(query(name, qtype), RECORDS)
    assert reply is not None
    assert parse(reply) == (0x1234, rcode, addrs)


def test_garbage_and_responses_get_no_answer() -> None:
    assert dns_answer(b"\0\1", RECORDS) is None
    response = bytearray(query("web.shop.svc.cluster.local"))
    response[2] |= 0x80  # QR set: a response, never answered (no loops)
    assert dns_answer(bytes(response), RECORDS) is None
