"""Blocking HTTP exchanges for the registry client, run on the session's worker threads.

Why ``http.client`` on threads rather than an asyncio HTTP library: start-up time. The copy
command's whole work on a re-copy is a dozen requests (about 15 ms), while importing aiohttp cost
0.26 s (its connector loads the CA store twice at import). The event loop still schedules every
request; only the socket work happens here.

Each exchange runs on one worker thread from connect to the last byte of the response and returns
a :class:`Response` whose body is in memory (at most ``limit`` bytes). Only blob downloads keep
their connection open (:class:`Stream`), each chunk read being one more trip to a worker thread.

A :class:`Lease` ties the connections of one exchange to it: a connection goes back to the pool
only when its response was read to the end and nobody abandoned the exchange. The event loop
abandons it when the awaiting task is cancelled; that shuts the socket down, so a thread blocked
on it returns at once, and the connection is closed, never pooled half-read.

Nothing here logs; errors carry no URL and no header.
"""

from __future__ import annotations

import http.client
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urljoin, urlsplit

from cluster_registry.oci import redirects
from cluster_registry.oci.errors import RegistryProtocolError
from cluster_registry.oci.pool import ConnectionPool, begin, send_on, shutdown

_REDIRECTS = (301, 302, 303, 307, 308)
_MAX_REDIRECTS = 10
_T = TypeVar("_T")


class TransportError(Exception):
    """The connection failed (refused, reset, timed out, TLS, cut short): never an HTTP status.

    ``connecting``: it failed while connecting (TLS handshake included), before any request byte.
    """

    def __init__(self, cause: BaseException, *, connecting: bool = False) -> None:
        super().__init__(type(cause).__name__)
        self.cause = cause
        self.connecting = connecting


class Abandoned(Exception):
    """The exchange was abandoned (its task cancelled) before this step started."""


class Lease:
    """The connection one exchange uses, shared by the worker thread doing the I/O and the event
    loop, which may abandon the exchange at any moment."""

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool
        self._lock = threading.Lock()
        self._conn: http.client.HTTPConnection | None = None
        self._key = ("", "")
        self._busy = False
        self.abandoned = False

    def run(self, step: Callable[[], _T]) -> _T:
        """Run one blocking ``step`` of the exchange (on a worker thread)."""
        with self._lock:
            if self.abandoned:
                raise Abandoned()
            self._busy = True
        try:
            return step()
        except (OSError, http.client.HTTPException) as err:
            self.discard()
            raise TransportError(err) from None
        except BaseException:
            self.discard()
            raise
        finally:
            with self._lock:
                self._busy = False
                conn, self._conn = (self._conn, None) if self.abandoned else (None, self._conn)
            if conn is not None:
                conn.close()

    def connect(self, scheme: str, netloc: str, *, fresh: bool = False) -> tuple[http.client.HTTPConnection, bool]:
        """A pooled or new connection, now this exchange's; and whether it was reused."""
        try:
            conn, reused = self.pool.acquire(scheme, netloc, fresh=fresh)
        except (OSError, http.client.HTTPException) as err:
            raise TransportError(err, connecting=True) from None
        with self._lock:
            if not self.abandoned:
                self._conn, self._key = conn, (scheme, netloc)
                return conn, reused
        conn.close()
        raise Abandoned()

    def release(self) -> None:
        """The response was read to its end: the connection may serve another request."""
        with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None and self.abandoned:
                conn.close()
                return
        if conn is not None:
            self.pool.put(*self._key, conn)

    def discard(self) -> None:
        """Close the connection (its state is unknown)."""
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def abandon(self) -> None:
        """From the event loop: the exchange is over whatever state it is in (task cancelled)."""
        with self._lock:
            self.abandoned = True
            conn, busy = self._conn, self._busy
            if not busy:
                self._conn = None
        if conn is not None and busy:
            shutdown(conn)  # the thread in ``run`` closes it when its step returns
        elif conn is not None:
            conn.close()


@dataclass
class Response:
    """A response: ``body`` holds at most the exchange's ``limit`` bytes (``complete`` False when the
    body was longer and got cut; a HEAD response has none). ``url`` is the final one after redirects."""

    status: int
    reason: str
    headers: http.client.HTTPMessage
    url: str
    body: bytes = b""
    complete: bool = True
    stream: Stream | None = None

    @property
    def content_length(self) -> int | None:
        value = self.headers.get("Content-Length", "")
        return int(value) if value.isdigit() else None


class Stream:
    """The open body of a 200 response, read a chunk at a time on the worker threads.

    The first chunk is read by the exchange itself (``first``): a small blob then costs one trip
    to a worker thread, not two.
    """

    def __init__(self, lease: Lease, resp: http.client.HTTPResponse) -> None:
        self.lease = lease
        self._resp = resp
        self.first: bytes | None = None

    @property
    def done(self) -> bool:
        return self._resp.isclosed()

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes; b"" at the end. Raises IncompleteRead when the body is cut short."""
        data = self._resp.read(n)
        if not data and self._resp.length:  # http.client reports a cut body as a quiet end
            raise http.client.IncompleteRead(b"", self._resp.length)
        if self._resp.isclosed() and not self._resp.will_close:
            self.lease.release()
        return data

    def close(self) -> None:
        """Give the connection back if the body was read to its end, else close it."""
        if self._resp.isclosed() and not self._resp.will_close:
            self.lease.release()
        else:
            self.lease.abandon()


def _send(
    lease: Lease, url: str, send: Callable[[http.client.HTTPConnection, str], _T]
) -> tuple[http.client.HTTPConnection, _T]:
    """``send(conn, path)`` on the lease's connection to ``url``'s origin; a reused connection the
    server closed meanwhile is replaced once by a new one."""
    return send_on(
        url, lambda scheme, netloc, fresh: lease.connect(scheme, netloc, fresh=fresh), lambda _: lease.discard(), send
    )


def _finish(lease: Lease, resp: http.client.HTTPResponse, url: str, limit: int) -> Response:
    """Read the body (at most ``limit`` bytes) and settle the connection."""
    complete = resp.length is None or resp.length <= limit
    body = resp.read(limit + 1) if complete else b""
    if len(body) > limit:
        complete, body = False, body[:limit]
    if complete and not resp.isclosed():
        resp.read(1)  # a chunked body's terminating chunk
    if complete and resp.isclosed() and not resp.will_close:
        lease.release()
    else:
        lease.discard()
    return Response(resp.status, resp.reason, resp.headers, url, body, complete)


Send = Callable[[str, str, dict[str, str], bytes | None], http.client.HTTPResponse]


def follow(
    url: str,
    method: str,
    headers: dict[str, str],
    body: bytes | None,
    send: Send,
    settle: Callable[[str, http.client.HTTPResponse], None],
    allowed: frozenset[str] = frozenset(),
) -> tuple[str, http.client.HTTPResponse]:
    """Send a request and follow its redirects: the one place the client follows a registry's redirect.

    ``send(url, method, headers, body)`` sends one request and returns its response; ``settle(url,
    resp)`` disposes of a redirect's response (read it to keep the connection, or drop it). Every
    target must pass ``redirects.check`` (``allowed``: hosts the operator listed); the Authorization
    header goes only to the original origin; a 303, and a 301/302 after a POST, become a GET without
    a body. Returns the final URL and its response, which is no redirect.
    """
    origin = urlsplit(url)[:2]
    headers = dict(headers)
    for _ in range(_MAX_REDIRECTS + 1):
        resp = send(url, method, headers, body)
        location = resp.getheader("Location")
        if resp.status not in _REDIRECTS or not location:
            return url, resp
        settle(url, resp)
        target = urljoin(url, location)
        redirects.check(url, target, allowed)
        if resp.status == 303 or (resp.status in (301, 302) and method == "POST"):
            method = "GET" if method != "HEAD" else "HEAD"
            body = None
            headers = {k: v for k, v in headers.items() if k.lower() not in ("content-type", "content-length")}
        if urlsplit(target)[:2] != origin:
            headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
        url = target
    raise RegistryProtocolError(f"{urlsplit(url).netloc} redirected more than {_MAX_REDIRECTS} times")


def exchange(
    lease: Lease,
    method: str,
    url: str,
    headers: dict[str, str],
    body: bytes | None,
    limit: int,
    stream: int = 0,
    allowed: frozenset[str] = frozenset(),
) -> Response:
    """One request, its redirects followed (see :func:`follow`).

    ``stream``: a 200 response's body is left open as ``Response.stream``, its first ``stream``
    bytes read. Blocking: call it through ``lease.run`` on a worker thread.
    """

    def send(url: str, method: str, headers: dict[str, str], body: bytes | None) -> http.client.HTTPResponse:
        def request(conn: http.client.HTTPConnection, path: str) -> http.client.HTTPResponse:
            conn.request(method, path, body=body, headers=headers)
            return conn.getresponse()

        return _send(lease, url, request)[1]

    def settle(url: str, resp: http.client.HTTPResponse) -> None:
        _finish(lease, resp, url, 64 << 10)

    url, resp = follow(url, method, headers, body, send, settle, allowed)
    if stream and resp.status == 200:
        body_stream = Stream(lease, resp)
        body_stream.first = body_stream.read(stream)
        return Response(resp.status, resp.reason, resp.headers, url, stream=body_stream)
    return _finish(lease, resp, url, limit)


def send_part(
    lease: Lease,
    conn: http.client.HTTPConnection | None,
    method: str,
    url: str,
    headers: dict[str, str],
    chunk: bytes | None,
    last: bool,
    limit: int,
) -> tuple[http.client.HTTPConnection, Response | None]:
    """One part of a request whose body is streamed: the request line and headers first (when
    ``conn`` is None), then ``chunk``, then, when it is the ``last``, the response (redirects are
    not followed: the body is gone). Blocking: call it through ``lease.run`` on a worker thread."""
    if conn is None:
        conn, _ = _send(lease, url, lambda c, path: begin(c, method, path, headers))
    if chunk:
        conn.send(chunk)
    return conn, _finish(lease, conn.getresponse(), url, limit) if last else None
