"""Large-blob streaming on worker threads: GET at the source, PUT at the destination (see ``pool``
for the connections).

Every request runs on the session's worker threads with blocking sockets (``http.client``; see
``transport``); a large blob moves in one :func:`transfer` per blob, where the socket system calls
and SHA-256 release the GIL. Under CPU contention a copy then uses as many cores as it has blobs
in flight, like Go's clients do, instead of one. Memory stays bounded: two chunk buffers per blob.

Authorization headers are computed by the async side and passed in; the thread never sees a
credential other than the header value and never logs or raises one.
"""

from __future__ import annotations

import http.client
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from cluster_registry.errors import ClusterRegistryError
from cluster_registry.oci import transport
from cluster_registry.oci.errors import (
    CorruptBlobError,
    RegistryUnavailableError,
    TLSError,
    describe,
)
from cluster_registry.oci.pool import ConnectionPool, begin, send_on
from cluster_registry.oci.verify import Verifier

_REDIRECT_BODY = 64 << 10  # bytes of a redirect's body read before the connection is dropped instead


class Cancelled(Exception):
    """The copy was cancelled while a worker thread streamed a blob."""


def _from_pool(pool: ConnectionPool) -> Callable[[str, str, bool], tuple[http.client.HTTPConnection, bool]]:
    """``send_on``'s ``connect`` for the blob threads: any first connection gets one more try."""
    return lambda scheme, netloc, fresh: (pool.get(scheme, netloc, fresh=fresh), True)


def _send_get(pool: ConnectionPool, url: str, headers: dict[str, str]) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    def send(conn: http.client.HTTPConnection, path: str) -> http.client.HTTPResponse:
        conn.request("GET", path, headers=headers)
        return conn.getresponse()

    return send_on(url, _from_pool(pool), http.client.HTTPConnection.close, send)


def _start_put(pool: ConnectionPool, url: str, headers: dict[str, str], size: int) -> http.client.HTTPConnection:
    sized = headers | {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
    conn, _ = send_on(url, _from_pool(pool), http.client.HTTPConnection.close, lambda c, path: begin(c, "PUT", path, sized))
    return conn


@dataclass
class Endpoint:
    """One side of a transfer: full URL and headers (Authorization included when needed)."""

    url: str
    headers: dict[str, str]
    what: str  # "get blob host/repository@digest", for messages
    status_error: Callable[[int, http.client.HTTPMessage, bytes, str], ClusterRegistryError]  # see oci.errors


def _transport_error(err: BaseException, what: str, action: str) -> ClusterRegistryError:
    if isinstance(err, ssl.SSLCertVerificationError):
        return TLSError(f"{what}: TLS certificate does not verify ({err.verify_message}): give its CA with --ca-bundle")
    return RegistryUnavailableError(f"{what}: {action} failed ({describe(err)})")


def transfer(
    pool: ConnectionPool,
    src: Endpoint,
    dst: Endpoint,
    digest: str,
    size: int,
    cancel: threading.Event,
    chunk_size: int = 1 << 20,
    allowed: frozenset[str] = frozenset(),
) -> None:
    """Stream blob ``digest`` (``size`` bytes) from ``src`` (GET) into ``dst`` (PUT upload URL).

    Verifies size and digest while streaming and holds the last chunk back until both verified, so
    a corrupt or truncated source never completes the upload. Blocking; run it on a worker thread.
    """
    check: Verifier[memoryview] = Verifier(digest, size, src.what)
    # -- open the source, its redirects followed (Authorization only to the original origin)
    sconn: http.client.HTTPConnection | None = None

    def send(url: str, method: str, headers: dict[str, str], body: bytes | None) -> http.client.HTTPResponse:
        nonlocal sconn
        sconn, resp = _send_get(pool, url, headers)
        return resp

    def settle(url: str, resp: http.client.HTTPResponse) -> None:
        # a redirect's body is never needed: read a little of it to keep the connection, else drop it
        assert sconn is not None
        if len(resp.read(_REDIRECT_BODY + 1)) <= _REDIRECT_BODY and resp.isclosed():
            parts = urlsplit(url)
            pool.put(parts.scheme, parts.netloc, sconn)
        else:
            sconn.close()

    try:
        url, sresp = transport.follow(src.url, "GET", src.headers, None, send, settle, allowed)
    except (OSError, http.client.HTTPException) as err:
        raise _transport_error(err, src.what, "download") from None
    assert sconn is not None
    parts = urlsplit(url)
    if sresp.status != 200:
        body = sresp.read(2048)
        sconn.close()
        raise src.status_error(sresp.status, sresp.headers, body, src.what)
    length = sresp.getheader("Content-Length", "")
    try:
        check.announced(int(length) if length.isdigit() else None)
    except CorruptBlobError:
        sconn.close()
        raise
    # -- the upload
    dparts = urlsplit(dst.url)
    try:
        dconn = _start_put(pool, dst.url, dst.headers, size)
    except (OSError, http.client.HTTPException) as err:
        sconn.close()
        raise _transport_error(err, dst.what, "upload") from None
    bufs = [bytearray(chunk_size), bytearray(chunk_size)]  # the chunk read and the one held back
    which = 0
    try:
        while True:
            if cancel.is_set():
                raise Cancelled()
            buf = bufs[which]
            try:
                n = sresp.readinto(buf)
                if not n and sresp.length:  # http.client reports a cut body as a quiet end
                    raise http.client.IncompleteRead(b"", sresp.length)
            except (OSError, http.client.HTTPException) as err:
                raise _transport_error(err, src.what, f"download after {check.got} bytes") from None
            if not n:
                break
            ready = check.feed(memoryview(buf)[:n])
            if ready is not None:
                try:
                    dconn.send(ready)
                except OSError as err:
                    raise _transport_error(err, dst.what, "upload") from None
            which ^= 1
        held = check.finish()
        try:
            if held is not None:
                dconn.send(held)
            dresp = dconn.getresponse()
            body = dresp.read()
        except (OSError, http.client.HTTPException) as err:
            raise _transport_error(err, dst.what, "upload") from None
    except BaseException:
        sconn.close()
        dconn.close()
        raise
    pool.put(parts.scheme, parts.netloc, sconn)
    if dresp.status != 201:
        dconn.close()
        raise dst.status_error(dresp.status, dresp.headers, body, dst.what)
    pool.put(dparts.scheme, dparts.netloc, dconn)
