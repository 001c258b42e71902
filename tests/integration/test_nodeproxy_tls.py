"""The node proxy originating TLS to the registry (``--ca-file``): containerd talks plain HTTP to the
node's loopback, the relay talks TLS to the registry, trusting only the chart's CA and verifying the
Service's name. Against a real distribution serving TLS (its certificate from the project's own pki):
a pull is byte-exact and keep-alive works; against a man in the middle (a certificate from another CA,
or the right CA for another name) the client gets nothing and the impostor gets no byte of the request;
half-close still works through TLS."""

from __future__ import annotations

import datetime as dt
import hashlib
import http.client
import logging
import random
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import pytest

from cluster_registry.certs import pki
from cluster_registry.nodeproxy.relay import Relay, TlsOrigin, Upstream
from tests.integration.test_nodeproxy import recv_all, relay, upstream
from tests.support.registry import registry_binary, run_registry

pytestmark = pytest.mark.integration

NOW = dt.datetime.now(dt.timezone.utc)
DAY = dt.timedelta(days=1)


def tls_relay(port: int, ca_file: Path, host: str = "localhost") -> AbstractContextManager[tuple[int, Relay]]:
    """The relay towards a TLS upstream on 127.0.0.1:PORT, trusting CA_FILE and verifying HOST."""
    return relay(port, host=host, tls=TlsOrigin(str(ca_file)))


@contextmanager
def tls_server(cert: bytes, key: bytes, tmp: Path, handler: object) -> Iterator[tuple[int, list[bytes]]]:
    """A TLS server on 127.0.0.1 with CERT; HANDLER(conn) runs per connection after the handshake.
    Yields (port, the application bytes any connection sent it)."""
    (tmp / "srv.crt").write_bytes(cert)
    (tmp / "srv.key").write_bytes(key)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp / "srv.crt", tmp / "srv.key")
    received: list[bytes] = []

    def serve(raw: socket.socket) -> None:  # upstream() closes RAW after it
        with ctx.wrap_socket(raw, server_side=True) as conn:
            handler(conn, received)  # type: ignore[operator]

    with upstream(serve) as port:
        yield port, received


def _ca(tmp: Path) -> tuple[bytes, bytes, Path]:
    ca_cert, ca_key = pki.new_ca(NOW, "test CA", DAY)
    (tmp / "ca.crt").write_bytes(ca_cert)
    return ca_cert, ca_key, tmp / "ca.crt"


@pytest.mark.skipif(registry_binary() is None, reason="needs distribution (ci/toolchain)")
def test_a_pull_through_the_tls_relay_from_real_distribution_is_byte_exact_on_one_kept_alive_connection(tmp_path: Path) -> None:
    blob = random.Random(3).randbytes(24 << 20)
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    with run_registry(tmp_path, tls=True) as reg:  # its certificate: pki.new_serving for "localhost"
        assert reg.ca_file is not None
        direct = http.client.HTTPSConnection(reg.host, context=ssl.create_default_context(cafile=str(reg.ca_file)))
        direct.request("POST", "/v2/tls/blobs/uploads/")
        resp = direct.getresponse()
        resp.read()
        location = resp.headers["Location"]
        sep = "&" if "?" in location else "?"
        direct.request("PUT", f"{location}{sep}digest={digest}", body=blob,
                       headers={"Content-Type": "application/octet-stream"})
        assert direct.getresponse().status == 201
        port = int(reg.host.rsplit(":", 1)[1])
        with tls_relay(port, reg.ca_file) as (relay_port, _):
            conn = http.client.HTTPConnection("127.0.0.1", relay_port, timeout=30)  # plain, as containerd on loopback
            for _ in range(2):  # the second request rides the same connection
                conn.request("GET", f"/v2/tls/blobs/{digest}")
                resp = conn.getresponse()
                body = resp.read()
                assert resp.status == 200 and hashlib.sha256(body).hexdigest() == digest[7:] and len(body) == len(blob)
            assert conn.sock is not None, "the connection was kept alive"
            conn.close()


@pytest.mark.parametrize("impostor", ["another CA", "the right CA, another name"])
def test_a_man_in_the_middle_gets_no_byte_and_the_client_nothing(
    tmp_path: Path, impostor: str, caplog: pytest.LogCaptureFixture
) -> None:
    ca_cert, ca_key, ca_file = _ca(tmp_path)
    if impostor == "another CA":
        other_cert, other_key = pki.new_ca(NOW, "attacker CA", DAY)
        cert, key = pki.new_serving(other_cert, other_key, ["localhost"], NOW, DAY)
    else:
        cert, key = pki.new_serving(ca_cert, ca_key, ["attacker.example"], NOW, DAY)

    def record(conn: ssl.SSLSocket, received: list[bytes]) -> None:
        received.append(recv_all(conn))
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nowned")

    caplog.set_level(logging.ERROR, logger="cluster_registry.nodeproxy.relay")
    with tls_server(cert, key, tmp_path, record) as (port, received), tls_relay(port, ca_file) as (relay_port, _):
        with socket.create_connection(("127.0.0.1", relay_port), timeout=5) as c:
            c.sendall(b"GET /token HTTP/1.1\r\nHost: x\r\nAuthorization: Basic c2VjcmV0OnNlY3JldA==\r\n\r\n")
            c.shutdown(socket.SHUT_WR)
            try:
                got = recv_all(c)
            except ConnectionResetError:  # closed with the request unread
                got = b""
            assert got == b"", "the client is closed without an answer"
        time.sleep(0.2)
    assert not any(received), "the impostor received no application byte (no credential)"
    assert any("registry TLS refused" in r.getMessage() for r in caplog.records)


def test_half_close_and_a_large_exchange_through_tls_are_byte_exact(tmp_path: Path) -> None:
    ca_cert, ca_key, ca_file = _ca(tmp_path)
    cert, key = pki.new_serving(ca_cert, ca_key, ["localhost"], NOW, DAY)
    request = random.Random(1).randbytes(8 << 20)
    answer = random.Random(2).randbytes(48 << 20)

    def handler(conn: ssl.SSLSocket, received: list[bytes]) -> None:
        got = recv_all(conn)  # until the relay passes on the client's half-close
        conn.sendall(hashlib.sha256(got).digest() + answer)

    with tls_server(cert, key, tmp_path, handler) as (port, _), tls_relay(port, ca_file) as (relay_port, _r):
        with socket.create_connection(("127.0.0.1", relay_port), timeout=30) as c:
            sender = threading.Thread(target=lambda: (c.sendall(request), c.shutdown(socket.SHUT_WR)))
            sender.start()
            body = recv_all(c)
            sender.join()
    assert body[:32] == hashlib.sha256(request).digest(), "the registry got every byte, then the end of the stream"
    assert hashlib.sha256(body[32:]).digest() == hashlib.sha256(answer).digest(), "the answer after the half-close"


def test_a_renewed_ca_file_reaches_new_connections(tmp_path: Path) -> None:
    """The chart's CA may be regenerated (every ten years, or by hand): the relay re-reads the bundle."""
    old_cert, _old_key, ca_file = _ca(tmp_path)
    new_cert, new_key = pki.new_ca(NOW, "new CA", DAY)
    cert, key = pki.new_serving(new_cert, new_key, ["localhost"], NOW, DAY)

    def answer(conn: ssl.SSLSocket, received: list[bytes]) -> None:
        conn.sendall(b"ok")

    origin = TlsOrigin(str(ca_file))
    with tls_server(cert, key, tmp_path, answer) as (port, _):
        up = Upstream("localhost", port, 2.0, origin)
        with pytest.raises(ssl.SSLCertVerificationError):
            up.connect()
        ca_file.write_bytes(old_cert + new_cert)  # the bundle during the overlap
        with up.connect() as s:
            assert s.recv(2) == b"ok"
