"""Large-blob streaming on worker threads (GET at the source, PUT at the destination) and the
keep-alive connection pool every request of the client uses.

Every request runs on the session's worker threads with blocking sockets (``http.client``; see
``transport``); a large blob moves in one :func:`transfer` per blob, where the socket system calls
and SHA-256 release the GIL. Under CPU contention a copy then uses as many cores as it has blobs
in flight, like Go's clients do, instead of one. Memory stays bounded: two chunk buffers per blob.

Authorization headers are computed by the async side and passed in; the thread never sees a
credential other than the header value and never logs or raises one.
"""

from __future__ import annotations

import hashlib
import http.client
import select
import socket
import ssl
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar
from urllib.parse import urljoin, urlsplit

from cluster_registry.errors import ClusterRegistryError
from cluster_registry.oci import redirects
from cluster_registry.oci.errors import (
    CorruptBlobError,
    RegistryProtocolError,
    RegistryUnavailableError,
    TLSError,
    describe,
)

_REDIRECTS = (301, 302, 303, 307, 308)
_REDIRECT_BODY = 64 << 10  # bytes of a redirect's body read before the connection is dropped instead
_T = TypeVar("_T")


class Cancelled(Exception):
    """The copy was cancelled while a worker thread streamed a blob."""


@dataclass
class ConnectionPool:
    """Idle keep-alive connections per (scheme, host:port), shared by the worker threads.

    The TLS context is made on the first https connection (``make_ssl``), so a process that only
    speaks plain HTTP never loads the CA store. Connections time out after ``connect_timeout``
    while connecting and ``timeout`` per read or write afterwards. ``close`` also shuts down the
    connections in use, which unblocks any thread still waiting on one.
    """

    ssl_context: ssl.SSLContext | None = None
    timeout: float = 300.0
    max_idle: float = 15.0  # seconds; servers close idle keep-alive connections sooner or later
    connect_timeout: float | None = None  # None: ``timeout``
    make_ssl: Callable[[], ssl.SSLContext] = ssl.create_default_context
    _idle: dict[tuple[str, str], list[tuple[float, http.client.HTTPConnection]]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _active: weakref.WeakSet[http.client.HTTPConnection] = field(default_factory=weakref.WeakSet)
    _closed: bool = False
    _swept: float = 0.0

    def get(self, scheme: str, netloc: str, *, fresh: bool = False) -> http.client.HTTPConnection:
        return self.acquire(scheme, netloc, fresh=fresh)[0]

    def acquire(self, scheme: str, netloc: str, *, fresh: bool = False) -> tuple[http.client.HTTPConnection, bool]:
        """A connection to ``netloc`` and whether it was reused (an idle one) rather than new."""
        now = time.monotonic()
        with self._lock:
            if now - self._swept > self.max_idle:  # a long-lived process talks to many hosts
                self._sweep(now)
            idle = self._idle.get((scheme, netloc), [])
            while idle and not fresh:
                since, idle_conn = idle.pop()
                if now - since < self.max_idle and _alive(idle_conn):
                    self._active.add(idle_conn)
                    return idle_conn, True
                idle_conn.close()
            if scheme == "https" and self.ssl_context is None:
                self.ssl_context = self.make_ssl()
        host, _, port = netloc.rpartition(":") if netloc.rsplit(":", 1)[-1].isdigit() else (netloc, "", "")
        host = host.strip("[]")
        connect_timeout = self.timeout if self.connect_timeout is None else self.connect_timeout
        if scheme == "https":
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                host, int(port) if port else None, timeout=connect_timeout, context=self.ssl_context
            )
        else:
            conn = http.client.HTTPConnection(host, int(port) if port else None, timeout=connect_timeout)
        conn.connect()
        if conn.sock is not None:
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.sock.settimeout(self.timeout)
        with self._lock:
            self._active.add(conn)
        return conn, False

    def _sweep(self, now: float) -> None:
        """Close the idle connections kept too long (called with the lock held)."""
        self._swept = now
        for key, idle in list(self._idle.items()):
            keep = [(since, c) for since, c in idle if now - since < self.max_idle]
            for since, c in idle:
                if now - since >= self.max_idle:
                    c.close()
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]

    def put(self, scheme: str, netloc: str, conn: http.client.HTTPConnection) -> None:
        """Keep ``conn`` for reuse; only a connection whose last response was read to the end."""
        with self._lock:
            self._active.discard(conn)
            if not self._closed and conn.sock is not None:
                self._idle.setdefault((scheme, netloc), []).append((time.monotonic(), conn))
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for conns in self._idle.values():
                for _, c in conns:
                    c.close()
            self._idle.clear()
            active = list(self._active)
        for c in active:
            shutdown(c)


def shutdown(conn: http.client.HTTPConnection) -> None:
    """Shut ``conn``'s socket down (from any thread): a thread blocked on it returns at once.

    The owner still closes it. ``socket.socket.shutdown`` directly, because an SSL socket's own
    ``shutdown`` also drops its TLS state under the feet of a thread reading it.
    """
    sock = conn.sock
    if sock is not None:
        try:
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        except OSError:
            pass


def _alive(conn: http.client.HTTPConnection) -> bool:
    """An idle connection the server has not closed: nothing to read on it (no EOF, no stray data)."""
    sock = conn.sock
    if sock is None:
        return False
    poller = select.poll()  # not select(): it fails on descriptors past 1023 in a busy process
    poller.register(sock, select.POLLIN)
    try:
        return not poller.poll(0)
    except OSError:
        return False


STALE = (ConnectionError, http.client.RemoteDisconnected, http.client.BadStatusLine)


def send_on(
    url: str,
    connect: Callable[[str, str, bool], tuple[http.client.HTTPConnection, bool]],
    drop: Callable[[http.client.HTTPConnection], None],
    send: Callable[[http.client.HTTPConnection, str], _T],
) -> tuple[http.client.HTTPConnection, _T]:
    """``send(conn, path)`` on a connection to ``url``'s origin; returns the connection used too.

    ``connect(scheme, netloc, fresh)`` gives a connection and whether a stale-connection failure on
    it deserves one more try on a fresh one (a pooled connection the server closed meanwhile);
    ``drop`` disposes of the failed one.
    """
    parts = urlsplit(url)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    conn, retry = connect(parts.scheme, parts.netloc, False)
    try:
        return conn, send(conn, path)
    except STALE:
        drop(conn)
        if not retry:
            raise
    conn, _ = connect(parts.scheme, parts.netloc, True)
    return conn, send(conn, path)


def begin(conn: http.client.HTTPConnection, method: str, path: str, headers: dict[str, str]) -> None:
    """Send the request line and ``headers`` of a request whose body the caller sends itself."""
    conn.putrequest(method, path, skip_accept_encoding=True)
    for k, v in headers.items():
        conn.putheader(k, v)
    conn.endheaders()


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
) -> None:
    """Stream blob ``digest`` (``size`` bytes) from ``src`` (GET) into ``dst`` (PUT upload URL).

    Verifies size and digest while streaming and holds the last chunk back until both verified, so
    a corrupt or truncated source never completes the upload. Blocking; run it on a worker thread.
    """
    algorithm = digest.split(":", 1)[0]
    hasher = hashlib.new(algorithm)
    # -- open the source, following redirects (Authorization only to the original origin)
    url, headers = src.url, dict(src.headers)
    origin = urlsplit(url)[:2]
    for _ in range(6):
        parts = urlsplit(url)
        try:
            sconn, sresp = _send_get(pool, url, headers)
        except (OSError, http.client.HTTPException) as err:
            raise _transport_error(err, src.what, "download") from None
        if sresp.status in _REDIRECTS and sresp.getheader("Location"):
            # a redirect's body is never needed: read a little of it to keep the connection, else drop it
            if len(sresp.read(_REDIRECT_BODY + 1)) <= _REDIRECT_BODY and sresp.isclosed():
                pool.put(parts.scheme, parts.netloc, sconn)
            else:
                sconn.close()
            target = urljoin(url, sresp.getheader("Location", ""))
            redirects.check(url, target)
            url = target
            if urlsplit(url)[:2] != origin:
                headers.pop("Authorization", None)
            continue
        break
    else:
        raise RegistryProtocolError(f"{src.what}: too many redirects")
    if sresp.status != 200:
        body = sresp.read(2048)
        sconn.close()
        raise src.status_error(sresp.status, sresp.headers, body, src.what)
    length = sresp.getheader("Content-Length")
    if length is not None and length.isdigit() and int(length) != size:
        sconn.close()
        raise CorruptBlobError(f"{src.what}: registry serves {length} bytes, the descriptor says {size}")
    # -- the upload
    dparts = urlsplit(dst.url)
    try:
        dconn = _start_put(pool, dst.url, dst.headers, size)
    except (OSError, http.client.HTTPException) as err:
        sconn.close()
        raise _transport_error(err, dst.what, "upload") from None
    bufs = [bytearray(chunk_size), bytearray(chunk_size)]
    held: memoryview | None = None
    got = 0
    which = 0
    try:
        while True:
            if cancel.is_set():
                raise Cancelled()
            buf = bufs[which]
            try:
                n = sresp.readinto(buf)
            except (OSError, http.client.HTTPException) as err:
                raise _transport_error(err, src.what, f"download after {got} bytes") from None
            if not n:
                break
            view = memoryview(buf)[:n]
            hasher.update(view)
            got += n
            if got > size:
                raise CorruptBlobError(f"{src.what}: registry sent more than the {size} bytes the descriptor says")
            if held is not None:
                try:
                    dconn.send(held)
                except OSError as err:
                    raise _transport_error(err, dst.what, "upload") from None
            held = view
            which ^= 1
        if got != size:  # the connection ended before Content-Length: a transfer fault
            raise RegistryUnavailableError(f"{src.what}: connection closed after {got} of {size} bytes")
        actual = f"{algorithm}:{hasher.hexdigest()}"
        if actual != digest:
            raise CorruptBlobError(f"{src.what}: content hashes to {actual}: the source served corrupt data")
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
