"""Run a real distribution v3 registry on 127.0.0.1 for tests and benchmarks.

    with run_registry(tmp_path) as reg:                       # anonymous, plain HTTP
        reg.host          # "127.0.0.1:PORT"
    with run_registry(tmp_path, htpasswd=("u", "p")) as reg:  # basic auth
    with run_registry(tmp_path, tls=True) as reg:             # HTTPS; reg.ca_file is its CA
    with TokenServer(users={"u": "p"}) as ts, run_registry(tmp_path, token=ts) as reg:  # bearer flow

The binary is ``.cache/bin/registry`` (``ci/toolchain``) or ``$CLUSTER_REGISTRY_REGISTRY_BIN``.
Each registry gets a free port and its own storage directory; it is stopped by its PID.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ctypes
import ctypes.util
import datetime
import http.client
import http.server
import json
import os
import secrets
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from cluster_registry.certs import pki

ROOT = Path(__file__).resolve().parents[2]


def registry_binary() -> Path | None:
    for candidate in (os.environ.get("CLUSTER_REGISTRY_REGISTRY_BIN"), ROOT / ".cache/bin/registry"):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return Path(candidate)
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bcrypt_hash(password: str) -> str:
    """A bcrypt hash for htpasswd (distribution accepts only bcrypt), via the system's libcrypt."""
    lib = ctypes.CDLL(ctypes.util.find_library("crypt") or "libcrypt.so.1")
    lib.crypt_gensalt.restype = ctypes.c_char_p
    lib.crypt_gensalt.argtypes = [ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p, ctypes.c_int]
    lib.crypt.restype = ctypes.c_char_p
    lib.crypt.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    salt = lib.crypt_gensalt(b"$2y$", 5, None, 0)
    out = lib.crypt(password.encode(), salt)
    if not out or not out.startswith(b"$2"):
        raise RuntimeError("libcrypt has no bcrypt")
    return str(out.decode())


def _self_signed(common_name: str, key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    """A self-signed CA certificate for ``key`` (the token service's signer), valid for two days."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )


def _write_tls(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it, made as the webhook's are
    (cluster_registry.certs.pki): (ca.pem, cert.pem, key.pem)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    two_days = datetime.timedelta(days=2)
    ca_cert, ca_key = pki.new_ca(now, "cluster-registry test CA", two_days)
    cert, key = pki.new_serving(ca_cert, ca_key, ["localhost"], now, two_days, ["127.0.0.1"])
    paths = directory / "ca.pem", directory / "cert.pem", directory / "key.pem"
    for path, pem in zip(paths, (ca_cert, cert, key)):
        path.write_bytes(pem)
    return paths


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class TokenServer:
    """A small bearer-token service (docker token spec) for distribution's ``auth.token``.

    Grants every requested action to known users (or to anyone when ``users`` is None), signs
    ES256 JWTs with an ``x5c`` header holding a self-signed certificate that the registry trusts
    (``rootcertbundle``). ``requests`` records (user, scopes) of each token request.
    """

    users: dict[str, str] | None = None
    service: str = "test-registry"
    issuer: str = "test-token-issuer"
    requests: list[tuple[str, list[str]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.cert = _self_signed("token signer", self.key)
        self.port = free_port()
        self._server: http.server.ThreadingHTTPServer | None = None

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, user: str, scopes: list[str]) -> str:
        access = []
        for s in scopes:
            parts = s.split(":")
            if len(parts) >= 3:
                access.append({"type": parts[0], "name": ":".join(parts[1:-1]), "actions": parts[-1].split(",")})
        now = int(time.time())
        header = {"alg": "ES256", "typ": "JWT", "x5c": [base64.b64encode(self.cert.public_bytes(serialization.Encoding.DER)).decode()]}
        claims = {
            "iss": self.issuer, "sub": user, "aud": self.service, "exp": now + 300, "nbf": now - 10,
            "iat": now, "jti": secrets.token_hex(8), "access": access,
        }
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        r, s = decode_dss_signature(self.key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
        return f"{signing_input}.{_b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"

    def __enter__(self) -> TokenServer:
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                q = urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query)
                user = ""
                authz = self.headers.get("Authorization", "")
                if authz.startswith("Basic "):
                    user, _, password = base64.b64decode(authz[6:]).decode().partition(":")
                    if outer.users is not None and outer.users.get(user) != password:
                        self.send_response(401)
                        self.end_headers()
                        return
                elif outer.users is not None:
                    self.send_response(401)
                    self.end_headers()
                    return
                scopes = q.get("scope", [])
                outer.requests.append((user, scopes))
                token = outer.issue(user, scopes)
                body = json.dumps({"token": token, "access_token": token, "expires_in": 300}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server:
            self._server.shutdown()
            self._server.server_close()


class AppServer:
    """Run an aiohttp app on 127.0.0.1 in a thread with its own loop (the gate, the token service)."""

    def __init__(self, app: Any) -> None:
        self.app, self.port = app, free_port()
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        from aiohttp import web

        asyncio.set_event_loop(self.loop)
        self.runner = web.AppRunner(self.app, access_log=None)
        self.loop.run_until_complete(self.runner.setup())
        self.loop.run_until_complete(web.TCPSite(self.runner, "127.0.0.1", self.port).start())
        self._ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(self.runner.cleanup())

    def __enter__(self) -> AppServer:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"


@dataclass
class Registry:
    host: str
    root: Path
    proc: subprocess.Popen[bytes]
    scheme: str = "http"
    username: str = ""
    password: str = ""
    ca_file: Path | None = None

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}"

    @property
    def storage(self) -> Path:
        return self.root / "storage"

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, 15)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, 9)
                self.proc.wait()


def _config(root: Path, port: int, htpasswd: Path | None, tls: tuple[Path, Path] | None, token: TokenServer | None,
            token_auth: dict[str, str] | None = None, debug_port: int | None = None) -> str:
    lines = [
        "version: 0.1",
        "log:",
        "  level: error",
        "  accesslog:",
        "    disabled: true",
        "storage:",
        "  filesystem:",
        f"    rootdirectory: {root / 'storage'}",
        "  delete:",
        "    enabled: true",
        "  maintenance:",
        "    uploadpurging:",
        "      enabled: false",
        "http:",
        f"  addr: 127.0.0.1:{port}",
        "  secret: test-secret-not-for-production",
    ]
    if tls:
        lines += ["  tls:", f"    certificate: {tls[0]}", f"    key: {tls[1]}"]
    if debug_port:
        lines += ["  debug:", f"    addr: 127.0.0.1:{debug_port}", "    prometheus:", "      enabled: true",
                  "      path: /metrics"]
    if token_auth:  # the chart's token service's realm: options as the chart sets them
        lines += ["auth:", "  token:", *(f"    {k}: {v}" for k, v in token_auth.items())]
    elif htpasswd:
        lines += ["auth:", "  htpasswd:", "    realm: test-registry", f"    path: {htpasswd}"]
    elif token:
        bundle = root / "token-signer.pem"
        bundle.write_bytes(token.cert_pem())
        lines += [
            "auth:", "  token:", f"    realm: {token.realm}", f"    service: {token.service}",
            f"    issuer: {token.issuer}", f"    rootcertbundle: {bundle}",
        ]
    return "\n".join(lines) + "\n"


def start_registry(
    root: Path,
    *,
    htpasswd: tuple[str, str] | None = None,
    tls: bool = False,
    token: TokenServer | None = None,
    token_auth: dict[str, str] | None = None,
    debug_port: int | None = None,
    timeout: float = 20.0,
) -> Registry:
    """Start a registry under ``root`` (created); wait until it answers ``/v2/``."""
    binary = registry_binary()
    if binary is None:
        raise RuntimeError("no distribution registry binary: run ci/toolchain (or set CLUSTER_REGISTRY_REGISTRY_BIN)")
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    pw_file = None
    if htpasswd:
        pw_file = root / "htpasswd"
        pw_file.write_text(f"{htpasswd[0]}:{bcrypt_hash(htpasswd[1])}\n")
    tls_files = _write_tls(root) if tls else None
    config = root / "config.yml"
    config.write_text(_config(root, port, pw_file, (tls_files[1], tls_files[2]) if tls_files else None, token,
                              token_auth, debug_port))
    log = open(root / "registry.log", "ab")
    proc = subprocess.Popen([str(binary), "serve", str(config)], stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    log.close()
    reg = Registry(
        host=f"127.0.0.1:{port}", root=root, proc=proc, scheme="https" if tls else "http",
        username=htpasswd[0] if htpasswd else "", password=htpasswd[1] if htpasswd else "",
        ca_file=tls_files[0] if tls_files else None,
    )
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"registry exited with {proc.returncode}: {(root / 'registry.log').read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return reg
        except OSError:
            if time.monotonic() > deadline:
                reg.stop()
                raise RuntimeError("registry did not start listening") from None
            time.sleep(0.05)


@contextlib.contextmanager
def run_registry(root: Path, **kwargs: Any) -> Iterator[Registry]:
    reg = start_registry(root, **kwargs)
    try:
        yield reg
    finally:
        reg.stop()


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) a running process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Measured:
    code: int
    stdout: str
    stderr: str
    wall: float
    rss_kib: int  # peak resident set of the command itself


def run_measured(cmd: list[str], *, timeout: float = 1800, cwd: Path | None = None,
                 env: dict[str, str] | None = None) -> Measured:
    """Run ``cmd``; its exit code, output, wall time and peak RSS.

    ``wait4``'s ``ru_maxrss`` would count the forking (large) parent's pages, so the peak comes from
    GNU ``/usr/bin/time -f %M`` (a small parent), else from polling ``VmHWM`` in /proc.
    """
    import tempfile

    with tempfile.NamedTemporaryFile("r", suffix=".rss") as rss_file:
        gnu_time = Path("/usr/bin/time")
        full = [str(gnu_time), "-f", "%M", "-o", rss_file.name, *cmd] if gnu_time.exists() else cmd
        t0 = time.monotonic()
        proc = subprocess.Popen(full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd, env=env)
        hwm = 0
        out: list[bytes] = []
        err: list[bytes] = []
        readers = [
            threading.Thread(target=lambda: out.append(proc.stdout.read() if proc.stdout else b""), daemon=True),
            threading.Thread(target=lambda: err.append(proc.stderr.read() if proc.stderr else b""), daemon=True),
        ]
        for r in readers:
            r.start()
        while proc.poll() is None:
            if time.monotonic() - t0 > timeout:
                os.kill(proc.pid, 9)
                proc.wait()
                raise TimeoutError(cmd)
            if not gnu_time.exists():
                with contextlib.suppress(OSError):
                    for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                        if line.startswith("VmHWM:"):
                            hwm = max(hwm, int(line.split()[1]))
            time.sleep(0.01)
        wall = time.monotonic() - t0
        for r in readers:
            r.join()
        if gnu_time.exists():
            lines = [ln for ln in rss_file.read().split("\n") if ln.strip().isdigit()]
            hwm = int(lines[-1]) if lines else 0
    return Measured(proc.returncode, b"".join(out).decode(), b"".join(err).decode(), wall, hwm)


def wait_serving(host: str, ok: tuple[int, ...] = (200,), timeout: float = 30) -> None:
    """Until ``GET /v2/`` on ``host`` answers one of ``ok`` (401 too where the endpoint wants credentials)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection(*host.split(":"), timeout=2)
            conn.request("GET", "/v2/")
            if conn.getresponse().status in ok:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{host} did not come up")
