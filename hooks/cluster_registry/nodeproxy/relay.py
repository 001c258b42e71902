"""The node proxy's TCP relay: every byte moves socket -> pipe -> socket inside the kernel (``splice``).

Why this shape (measured with bench/pull.py, see bench/README.md): the former asyncio byte pump read
every chunk into Python and wrote it out again, 1.4-2.0 CPU s per GB on the node, and a node pulled
at 0.4-0.6x of the registry's direct speed. ``os.splice`` moves page references from the receiving
socket into a pipe and from the pipe to the sending socket: the bytes never enter user space and Python
runs one loop iteration per pipe-full (0.34-0.48 CPU s per GB, 0.89-0.94x). Each direction has two threads
blocked in ``splice`` (the GIL is released there), one filling its 1 MiB pipe from the source, one
draining it to the destination: on loopback a sender's thread also does the receiver's TCP work, and
one thread per direction doing both halves in turn measured 0.70-0.75x at 1 and 4 clients where the
pair measured 0.89-0.94x. A selector loop of non-blocking splices would add a Python dispatch per
readiness event; a separate tool (haproxy, socat) would add a program and its configuration to the
image for the same kernel path, and the extra TCP hop it cannot avoid either is what is left.

TLS to the registry (``Upstream.tls``): containerd keeps plain HTTP on the node's loopback, and the
relay originates TLS to the registry Service, verifying the chart's CA and the Service's name, so no
credential or token crosses the pod network in clear. splice cannot move TLS records (the bytes must
be decrypted in user space; kTLS is not offered by Python 3.11's ssl module), so a TLS connection
is pumped by :class:`_TlsConnection`: one thread, both directions, non-blocking sockets, 128 KiB
buffers filled with as many TLS records as are at hand before each send. One thread per connection
because an OpenSSL connection must not be used from two threads at once.

Bounds: at most ``max_connections`` relayed connections per process (each holds four threads, two
sockets and two pipes; 512 took 54 MiB); beyond it new connections wait in the listen backlog until
one ends. A connection on which neither direction moved a byte for ``idle_timeout`` seconds is
closed, so stuck peers give their slot back. Half-close is relayed: when one side ends its stream,
the relay shuts down writing to the other and keeps the opposite direction open.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import resource
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

# Pipe sizes to ask for, largest first: on loopback 1 MiB (pipe-max-size's default) measured 0.19 CPU
# s/GB, 256 KiB 0.30, the 64 KiB default 0.4. An unprivileged user's pipes share
# fs.pipe-user-pages-soft (64 MiB by default): past it the kernel refuses larger pipes, so smaller ones.
PIPE_SIZES = (1 << 20, 1 << 18)
THREAD_STACK = 256 << 10  # the relay loop is a few frames deep: no need for 8 MiB of address space per thread
FDS_PER_CONNECTION = 6  # the client, the upstream and a pipe (two ends) per direction
FDS_SPARE = 64  # listeners, logging, the interpreter's own


def fit_connections(wanted: int) -> int:
    """Raise this process's open-file limit for WANTED connections; the number that fits under it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = wanted * FDS_PER_CONNECTION + FDS_SPARE
    if soft != resource.RLIM_INFINITY and soft < need:
        soft = need if hard == resource.RLIM_INFINITY else min(need, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    if soft == resource.RLIM_INFINITY or soft >= need:
        return wanted
    return max(1, (soft - FDS_SPARE) // FDS_PER_CONNECTION)


class TlsOrigin:
    """Client TLS towards the registry: trusts only the CA bundle in ``ca_file`` (re-read when the
    file changes: a renewed CA reaches new connections) and verifies the upstream's host name."""

    def __init__(self, ca_file: str) -> None:
        self.ca_file = ca_file
        self._seen: tuple[float, int] | None = None
        self._context: ssl.SSLContext | None = None
        self._lock = threading.Lock()

    def context(self) -> ssl.SSLContext:
        stat = os.stat(self.ca_file)
        with self._lock:
            if self._context is None or self._seen != (stat.st_mtime, stat.st_size):
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the chain and the host name
                ctx.minimum_version = ssl.TLSVersion.TLSv1_2
                ctx.load_verify_locations(cafile=self.ca_file)
                self._context, self._seen = ctx, (stat.st_mtime, stat.st_size)
            return self._context


@dataclass(frozen=True)
class Upstream:
    """Where a listener's connections go; HOST is resolved per connection (a Service may move).
    With ``tls`` the relay speaks TLS to it and verifies that its certificate names HOST."""

    host: str
    port: int
    connect_timeout: float
    tls: TlsOrigin | None = None

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"

    def connect(self) -> socket.socket:
        """A connected socket (TLS handshake done and verified); raises OSError (ssl.SSLError too)."""
        sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
        if self.tls is None:
            return sock
        try:
            return self.tls.context().wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise


def _timeouts(sock: socket.socket, seconds: float) -> None:
    """Blocking socket whose sends (``splice`` to it included) give up with EAGAIN after SECONDS."""
    sock.settimeout(None)
    tv = struct.pack("ll", int(seconds), int((seconds % 1) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # forward what arrived: the sender already coalesced


def _grow(pipe: int) -> int:
    """Enlarge PIPE (its write end) as far as allowed; its capacity in bytes."""
    for size in PIPE_SIZES:
        with contextlib.suppress(OSError):
            return fcntl.fcntl(pipe, fcntl.F_SETPIPE_SZ, size)
    return fcntl.fcntl(pipe, fcntl.F_GETPIPE_SZ)


class _Connection:
    """One client and its upstream: two directions, closed when both end or either fails."""

    def __init__(self, client: socket.socket, upstream: socket.socket, idle_timeout: float) -> None:
        self.client, self.upstream, self.idle_timeout = client, upstream, idle_timeout
        self.last = time.monotonic()
        self.moved = [0, 0]  # client -> upstream, upstream -> client
        self._lock = threading.Lock()
        self._running = 2

    def idle(self) -> bool:
        return time.monotonic() - self.last >= self.idle_timeout

    def pump(self, direction: int) -> None:
        """One direction: this thread fills a pipe from the source while another drains it to the
        destination, so receiving and sending overlap (on loopback the sender's thread also does the
        receiver's TCP work: one thread for both halves would serialise them)."""
        src, dst = (self.client, self.upstream) if direction == 0 else (self.upstream, self.client)
        try:
            r, w = os.pipe()
        except OSError:  # no fd for the pipe: end both
            self.abort()
            self._ended()
            return
        size = _grow(w)
        drain = threading.Thread(target=self._drain, args=(r, dst, size, direction), daemon=True)
        try:
            drain.start()
        except RuntimeError:
            os.close(r)
            os.close(w)
            self.abort()
            self._ended()
            return
        try:
            self._fill(src, w, size)
        except OSError:
            self.abort()  # a reset, a timeout or the other side's abort: end both
        finally:
            os.close(w)  # the drain sees the end of the stream once the pipe is empty
            drain.join()
            self._ended()

    def _fill(self, src: socket.socket, w: int, size: int) -> None:
        # Wait for the socket before splicing: splice sleeps for socket data holding the pipe's lock,
        # which would keep the drain from sending what is already in the pipe.
        ready = select.poll()
        ready.register(src, select.POLLIN)
        while True:
            if not ready.poll(self.idle_timeout * 1000):
                if self.idle():
                    raise TimeoutError(errno.ETIMEDOUT, "idle")
                continue  # the other direction is busy (a long download's request side is silent)
            if os.splice(src.fileno(), w, size, flags=os.SPLICE_F_MOVE) == 0:
                return

    def _drain(self, r: int, dst: socket.socket, size: int, direction: int) -> None:
        try:
            while True:
                try:
                    sent = os.splice(r, dst.fileno(), size, flags=os.SPLICE_F_MOVE)
                except BlockingIOError:
                    if self.idle():
                        raise TimeoutError(errno.ETIMEDOUT, "idle") from None
                    continue
                if sent == 0:
                    break
                self.moved[direction] += sent
                self.last = time.monotonic()
            dst.shutdown(socket.SHUT_WR)  # relay the half-close; the other direction goes on
        except OSError:
            self.abort()
        finally:
            os.close(r)  # a fill blocked on the full pipe gets EPIPE

    def _ended(self) -> None:
        with self._lock:
            self._running -= 1
            last = self._running == 0
        if last:
            self.client.close()
            self.upstream.close()

    def abort(self) -> None:
        """Wake both directions (a thread blocked in splice on either socket) and end them."""
        for sock in (self.client, self.upstream):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


TLS_BUFFER = 128 << 10  # per direction; 512 TLS connections hold at most 128 MiB of buffers


class _TlsConnection:
    """A plain client and a TLS upstream, pumped by one thread: each round tries both directions
    (receive into a buffer when it is empty, send what it holds), and waits in ``poll`` only when no
    step moved a byte. Half-closes are relayed as on the splice path (towards the registry as
    close_notify and a TCP FIN, :func:`_end_stream`)."""

    def __init__(self, client: socket.socket, upstream: ssl.SSLSocket, idle_timeout: float) -> None:
        self.client, self.upstream, self.idle_timeout = client, upstream, idle_timeout
        self.moved = [0, 0]  # client -> upstream, upstream -> client

    def run(self) -> None:
        client, upstream = self.client, self.upstream
        for sock in (client, upstream):
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        up = _Direction(client, upstream)
        down = _Direction(upstream, client)
        poller = select.poll()
        last = time.monotonic()
        try:
            while not (up.done and down.done):
                waits: dict[int, int] = {}
                moved = up.step(waits) + down.step(waits)
                if moved:
                    last = time.monotonic()
                    continue
                for fd, events in waits.items():
                    poller.register(fd, events)
                ready = poller.poll(self.idle_timeout * 1000)
                for fd in waits:
                    poller.unregister(fd)
                if not ready and time.monotonic() - last >= self.idle_timeout:
                    return
        except OSError:
            pass  # a reset or a TLS error: end both
        finally:
            self.moved = [up.moved, down.moved]
            client.close()
            upstream.close()


class _Direction:
    """One direction of a :class:`_TlsConnection`: a buffer between a source and a destination."""

    def __init__(self, src: socket.socket, dst: socket.socket) -> None:
        self.src, self.dst = src, dst
        self.buffer = memoryview(bytearray(TLS_BUFFER))
        self.start = self.end = 0
        self.ended = self.done = False
        self.moved = 0

    def step(self, waits: dict[int, int]) -> int:
        """Receive (if the buffer is empty) and send; register what blocked in WAITS. Returns the
        progress made: bytes moved (a relayed half-close counts as one)."""
        moved = 0
        if self.start == self.end and not self.ended:
            self.start = self.end = 0
            while self.end < TLS_BUFFER:  # as many records as are at hand
                got = _io(lambda: self.src.recv_into(self.buffer[self.end:]), self.src, select.POLLIN, waits)
                if got is None:
                    break
                if got == 0:
                    self.ended = True
                    break
                self.end += got
                moved += got
        if self.start < self.end:
            sent = _io(lambda: self.dst.send(self.buffer[self.start:self.end]), self.dst, select.POLLOUT, waits)
            if sent:
                self.start += sent
                self.moved += sent
                moved += sent
        if self.ended and self.start == self.end and not self.done:
            self.done = _end_stream(self.dst, waits)
            moved += self.done
        return moved


def _end_stream(sock: socket.socket, waits: dict[int, int]) -> bool:
    """Relay a half-close to SOCK: TLS's close_notify (TLS 1.3 half-close: the peer may go on
    writing, and a TLS peer takes a bare TCP FIN for a truncation attack and fails the connection),
    then the TCP FIN. False when the close_notify could not be written yet (WAITS says when)."""
    if isinstance(sock, ssl.SSLSocket):
        try:
            sock.unwrap()  # sends close_notify, then finds the peer's not there yet (non-blocking)
        except ssl.SSLWantReadError:
            pass  # sent; the peer's close_notify comes with its end of stream, read as such
        except ssl.SSLWantWriteError:
            waits[sock.fileno()] = waits.get(sock.fileno(), 0) | select.POLLOUT
            return False
    socket.socket.shutdown(sock, socket.SHUT_WR)  # SSLSocket.shutdown would drop the TLS layer
    return True


def _io(op: Callable[[], int], sock: socket.socket, wanted: int, waits: dict[int, int]) -> int | None:
    """OP's result, or None when it would block (what it waits for is added to WAITS)."""
    try:
        return op()
    except ssl.SSLWantReadError:
        waits[sock.fileno()] = waits.get(sock.fileno(), 0) | select.POLLIN
    except ssl.SSLWantWriteError:
        waits[sock.fileno()] = waits.get(sock.fileno(), 0) | select.POLLOUT
    except BlockingIOError:
        waits[sock.fileno()] = waits.get(sock.fileno(), 0) | wanted
    return None


class Relay:
    """Relay every connection accepted on LISTEN to UPSTREAM; ``serve_forever`` until ``close``."""

    def __init__(self, listen: tuple[str, int], upstream: Upstream, slots: threading.BoundedSemaphore,
                 idle_timeout: float = 300.0) -> None:
        self.upstream, self.slots, self.idle_timeout = upstream, slots, idle_timeout
        self.listener = socket.create_server(listen, backlog=1024)
        self.address: tuple[str, int] = self.listener.getsockname()[:2]
        self._closed = threading.Event()
        self._warned = -60.0

    def serve_forever(self) -> None:
        threading.stack_size(THREAD_STACK)
        log.info("node proxy serving", extra={"listen": "%s:%d" % self.address, "upstream": str(self.upstream)})
        while not self._closed.is_set():
            if not self.slots.acquire(blocking=False):
                if time.monotonic() - self._warned >= 60:  # once a minute while it lasts
                    self._warned = time.monotonic()
                    log.warning("connection limit reached: new connections wait in the listen backlog",
                                extra={"listen": "%s:%d" % self.address})
                while not self.slots.acquire(timeout=1):
                    if self._closed.is_set():
                        return
            try:
                client, _ = self.listener.accept()
            except OSError as e:
                self.slots.release()
                if self._closed.is_set():
                    return
                log.warning("accept failed", extra={"listen": "%s:%d" % self.address, "error": str(e)})
                time.sleep(0.1)  # out of fds or memory for a moment (or the client gave up): keep serving
                continue
            try:
                threading.Thread(target=self._handle, args=(client,), daemon=True).start()
            except RuntimeError as e:  # the process's thread limit: refuse this one, keep serving
                log.warning("cannot relay a connection", extra={"error": str(e)})
                client.close()
                self.slots.release()

    def _handle(self, client: socket.socket) -> None:
        try:
            try:
                upstream = self.upstream.connect()
            except ssl.SSLError as e:  # ssl.SSLCertVerificationError included: not the registry
                log.error("registry TLS refused: closing the client",
                          extra={"upstream": str(self.upstream), "error": str(e)})
                client.close()
                return
            except OSError as e:
                log.warning("registry unreachable: closing the client",
                            extra={"upstream": str(self.upstream), "error": str(e) or type(e).__name__})
                client.close()
                return
            if isinstance(upstream, ssl.SSLSocket):
                tls = _TlsConnection(client, upstream, self.idle_timeout)
                tls.run()
                log.debug("connection closed", extra={"upstream": str(self.upstream), "sent": tls.moved[0],
                                                      "received": tls.moved[1]})
                return
            _timeouts(client, self.idle_timeout)
            _timeouts(upstream, self.idle_timeout)
            conn = _Connection(client, upstream, self.idle_timeout)
            back = threading.Thread(target=conn.pump, args=(1,), daemon=True)
            try:
                back.start()
            except RuntimeError as e:  # the process's thread limit (a pids cgroup): refuse this one
                log.warning("cannot relay a connection", extra={"error": str(e)})
                client.close()
                upstream.close()
                return
            conn.pump(0)
            back.join()
            log.debug("connection closed", extra={"upstream": str(self.upstream), "sent": conn.moved[0],
                                                  "received": conn.moved[1]})
        finally:
            self.slots.release()

    def close(self) -> None:
        """Stop accepting (connections in flight finish on their own threads)."""
        self._closed.set()
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes a blocked accept()
        self.listener.close()
