"""The keep-alive connection pool every request of the registry client uses, and sending on it.

Blocking (``http.client``): used only on the session's worker threads, by ``transport`` (every
exchange) and ``blobio`` (large blobs, GET to PUT on one thread).
"""

from __future__ import annotations

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
from urllib.parse import urlsplit

_T = TypeVar("_T")


@dataclass
class ConnectionPool:
    """Idle keep-alive connections per (scheme, host:port), shared by the worker threads.

    Each new https connection takes its TLS context from ``make_ssl`` (which keeps it until its CA
    files change), so a process that only speaks plain HTTP never loads the CA store. Connections time out after ``connect_timeout``
    while connecting and ``timeout`` per read or write afterwards. ``close`` also shuts down the
    connections in use, which unblocks any thread still waiting on one.
    """

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
        host, _, port = netloc.rpartition(":") if netloc.rsplit(":", 1)[-1].isdigit() else (netloc, "", "")
        host = host.strip("[]")
        connect_timeout = self.timeout if self.connect_timeout is None else self.connect_timeout
        if scheme == "https":
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                host, int(port) if port else None, timeout=connect_timeout, context=self.make_ssl()
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
