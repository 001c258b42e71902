"""The OCI distribution API client: one pooled HTTP session, per-repository handles.

``RegistrySession`` owns the keep-alive connection pool (reused across blobs and images), the
worker threads that drive it (``http.client`` through :mod:`.transport`: see there why not an
asyncio HTTP library), the token cache and the knowledge of which blob already sits in which repository of a
destination registry (for cross-repository mounts). ``Repository`` is a handle on one repository
with one set of credentials; every request goes through :meth:`Repository.request`, which
authenticates (basic or the bearer-token flow), retries connection errors, 429 and 5xx with bounded
backoff, and maps failures to the error hierarchy. Nothing here logs or raises a credential.
"""

from __future__ import annotations

import asyncio
import functools
import http.client
import json
import logging
import os
import ssl
import time
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlencode, urljoin

from cluster_registry import __version__
from cluster_registry.errors import ClusterRegistryError, ConfigError
from cluster_registry.gate.protocol import LOCK_HEADER
from cluster_registry.oci import media, transport
from cluster_registry.oci.auth import Challenge, Credentials, parse_challenge, scope
from cluster_registry.oci.errors import (
    AuthenticationError,
    CorruptBlobError,
    RateLimitedError,
    RegistryProtocolError,
    RegistryUnavailableError,
    TLSError,
    describe,
    status_error,
)
from cluster_registry.oci.pool import ConnectionPool
from cluster_registry.oci.retry import RetryPolicy, is_retryable_status, parse_retry_after
from cluster_registry.oci.verify import Verifier

log = logging.getLogger(__name__)

MAX_MANIFEST = 4 * 1024 * 1024
MAX_BODY = 16 << 20  # any other response body read into memory (tag lists, tokens, errors)
_DOCKER_HUB_API = "registry-1.docker.io"
USER_AGENT = f"cluster-registry/{__version__}"
_T = TypeVar("_T")


@dataclass(frozen=True)
class RegistryOptions:
    """Transport settings shared by every registry a session talks to.

    ``insecure_hosts``: hosts (``host[:port]`` as in references) spoken to over plain HTTP.
    ``ca_bundle``: a PEM file of extra CAs trusted for HTTPS (added to the system's).
    """

    insecure_hosts: frozenset[str] = frozenset()
    ca_bundle: str | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    connections_per_host: int = 32  # also the session's worker threads: blocking exchanges at once
    chunk_size: int = 1 << 20
    connect_timeout: float = 30.0
    read_timeout: float = 300.0
    # {realm a challenge names: the realm to ask instead}. The cluster registry's challenge names the
    # token service as nodes reach it (the node proxy on their loopback); pods reach it by its Service
    # (the chart sets $CLUSTER_REGISTRY_TOKEN_REALMS="NAMED=ACTUAL ..." in the components that push).
    token_realms: Mapping[str, str] = field(
        default_factory=lambda: token_realms_from(os.environ.get(TOKEN_REALMS_ENV, "")), compare=False)

    def scheme(self, host: str) -> str:
        return "http" if host.lower() in {h.lower() for h in self.insecure_hosts} else "https"


TOKEN_REALMS_ENV = "CLUSTER_REGISTRY_TOKEN_REALMS"
CA_BUNDLE_ENV = "CLUSTER_REGISTRY_CA_BUNDLE"  # the chart's CA, which the cluster registry's certificate verifies against


def token_realms_from(text: str) -> dict[str, str]:
    """``NAMED=ACTUAL`` pairs separated by spaces (malformed ones ignored)."""
    pairs = (item.split("=", 1) for item in text.split() if "=" in item)
    return {named: actual for named, actual in pairs if named and actual.startswith(("http://", "https://"))}


@dataclass(frozen=True)
class Manifest:
    """A manifest's exact bytes, media type and digest; ``info`` parses it once, when first asked."""

    body: bytes
    media_type: str
    digest: str
    doc: dict[str, Any] | None = field(default=None, compare=False, repr=False)  # the parsed JSON, if at hand

    @property
    def size(self) -> int:
        return len(self.body)

    @functools.cached_property
    def info(self) -> media.ManifestInfo:
        """What it references (raises UnsupportedManifestError for a type the engine does not copy)."""
        return media.inspect(self.body, self.media_type, self.doc)


@dataclass
class _Token:
    value: str
    expires: float


def _stamp(path: str) -> tuple[int, int] | None:
    """What tells a CA file's new content from its old (a Secret volume swaps its files in whole)."""
    try:
        st = os.stat(path)
    except OSError:
        return None  # loading it names the problem
    return st.st_mtime_ns, st.st_size


class RegistrySession:
    """A pool of connections and tokens. Use as ``async with RegistrySession(opts) as s:``."""

    def __init__(self, options: RegistryOptions | None = None) -> None:
        self.options = options or RegistryOptions()
        self._pool: ConnectionPool | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._tokens: dict[tuple[str, str, tuple[str, ...]], _Token] = {}
        self._challenges: dict[str, Challenge] = {}
        self._token_locks: dict[tuple[str, str, tuple[str, ...]], asyncio.Lock] = {}
        #: (registry host, blob digest) -> a repository on that host known to hold the blob.
        self.known_blobs: dict[tuple[str, str], str] = {}
        #: registry host -> False once it refused a mount from the target repository itself.
        self.self_mount: dict[str, bool] = {}
        self._ssl: tuple[tuple[tuple[int, int] | None, ...], ssl.SSLContext] | None = None  # (bundle stamps, context)

    def ssl_context(self) -> ssl.SSLContext:
        """The TLS context for a new https connection: the system's trust plus the extra CA bundle and
        the cluster registry's CA ($CLUSTER_REGISTRY_CA_BUNDLE, which the chart sets in every pod that
        talks to the registry). Kept until a bundle file changes (loading the CA store takes tens of
        milliseconds): a long-lived reconciler trusts a renewed CA once its mounted Secret shows it."""
        bundles = [b for b in (self.options.ca_bundle, os.environ.get(CA_BUNDLE_ENV)) if b]
        stamp = tuple(_stamp(b) for b in bundles)
        if self._ssl is not None and self._ssl[0] == stamp:
            return self._ssl[1]
        ctx = ssl.create_default_context()
        for bundle in bundles:
            try:
                ctx.load_verify_locations(cafile=bundle)
            except (OSError, ssl.SSLError) as err:
                raise ConfigError(f"cannot load CA bundle {bundle}: {err}") from err
        self._ssl = (stamp, ctx)
        return ctx

    @property
    def executor(self) -> ThreadPoolExecutor:
        """The session's own worker threads, one per blocking exchange (never the loop's default
        executor, which the rest of a process may need for short calls while blobs stream)."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max(1, self.options.connections_per_host), thread_name_prefix="oci")
        return self._executor

    @property
    def pool(self) -> ConnectionPool:
        """Blocking keep-alive connections, used only on the worker threads."""
        if self._pool is None:
            self._pool = ConnectionPool(
                timeout=self.options.read_timeout,
                connect_timeout=self.options.connect_timeout,
                make_ssl=self.ssl_context,
            )
        return self._pool

    async def run(self, lease: transport.Lease, step: Callable[[], _T]) -> _T:
        """``step`` (blocking, on ``lease``'s connection) on a worker thread. A caller cancelled
        meanwhile abandons the exchange: its connection is closed, never pooled half-read."""
        future = self.executor.submit(lease.run, step)
        try:
            return await asyncio.wrap_future(future)
        except BaseException:
            lease.abandon()
            raise

    async def send(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        data: bytes | AsyncIterable[bytes] | None = None,
        *,
        limit: int = MAX_BODY,
        stream: bool = False,
    ) -> transport.Response:
        """One HTTP exchange (no auth, no retry). Raises transport.TransportError on connection failures.

        A bytes body is sent and redirects followed in one trip to a worker thread. A streamed body
        is sent as ``data`` yields it, one trip per chunk, the headers going with the first and the
        response read with the last (an error ``data`` raises propagates as is).
        """
        hdrs = {"User-Agent": USER_AGENT, **headers}
        lease = transport.Lease(self.pool)
        if data is None or isinstance(data, bytes):
            first = self.options.chunk_size if stream else 0
            follow = functools.partial(
                transport.exchange, lease, method, url, hdrs, data, limit, first, allowed=self.options.insecure_hosts
            )  # redirects to the hosts the operator listed (cluster-internal registries) are allowed
            return await self.run(lease, follow)
        try:
            chunks = aiter(data)
            conn: http.client.HTTPConnection | None = None
            chunk = await anext(chunks, None)
            while True:
                following = None if chunk is None else await anext(chunks, None)
                last = following is None
                conn, resp = await self.run(
                    lease, functools.partial(transport.send_part, lease, conn, method, url, hdrs, chunk, last, limit)
                )
                if resp is not None:
                    return resp
                chunk = following
        except BaseException:
            lease.abandon()
            raise

    async def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    async def __aenter__(self) -> RegistrySession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def repository(
        self, host: str, name: str, auth: Credentials | None = None, *, push: bool = False
    ) -> Repository:
        return Repository(self, host, name, auth or Credentials(), push=push)

    async def catalog(self, host: str, auth: Credentials | None = None, page_size: int = 1000) -> list[str]:
        """Every repository on ``host`` (``/v2/_catalog``, following ``Link`` pages)."""
        registry = self.repository(host, "", auth)
        url = f"{self.base_url(host)}/v2/_catalog?n={page_size}"
        return await registry.paged(url, "repositories", f"list the repositories of {host}", ("registry:catalog:*",))

    def base_url(self, host: str) -> str:
        api = _DOCKER_HUB_API if host == "docker.io" else host
        return f"{self.options.scheme(host)}://{api}"

    # -- tokens -------------------------------------------------------------------------------

    async def authorize(self, host: str, creds: Credentials, scopes: tuple[str, ...]) -> str | None:
        """The Authorization header for a request to ``host`` needing ``scopes``, answering the
        challenge the host last sent (None before any: the first request goes out anonymous)."""
        challenge = self._challenges.get(host)
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            # The challenge is remembered per host, but a host may serve some repositories to
            # anyone: without credentials, ask anyway and let the registry answer.
            return None if creds.anonymous else creds.basic_header()
        if challenge.scheme == "bearer":
            if creds.token and creds.token_is_bearer:
                return f"Bearer {creds.token}"
            return "Bearer " + await self.token(host, creds, scopes, challenge)
        raise AuthenticationError(f"registry {host} asks for unsupported auth scheme {challenge.scheme!r}")

    def challenged(self, host: str, challenge: Challenge, creds: Credentials, scopes: tuple[str, ...]) -> None:
        """Remember ``host``'s 401 challenge; the token cached for ``creds`` and ``scopes`` did not do."""
        self._challenges[host] = challenge
        self._tokens.pop((host, creds.username, scopes), None)

    async def token(self, host: str, creds: Credentials, scopes: tuple[str, ...], challenge: Challenge) -> str:
        key = (host, creds.username, scopes)
        cached = self._tokens.get(key)
        if cached and cached.expires > time.monotonic():
            return cached.value
        lock = self._token_locks.setdefault(key, asyncio.Lock())
        async with lock:
            cached = self._tokens.get(key)
            if cached and cached.expires > time.monotonic():
                return cached.value
            value, ttl = await self._fetch_token(host, creds, scopes, challenge)
            self._tokens[key] = _Token(value, time.monotonic() + max(ttl - 10, 1))
            return value

    async def _fetch_token(
        self, host: str, creds: Credentials, scopes: tuple[str, ...], challenge: Challenge
    ) -> tuple[str, float]:
        realm = self.options.token_realms.get(challenge.realm, challenge.realm)
        if not realm.startswith(("http://", "https://")):
            raise RegistryProtocolError(f"registry {host} sent a bearer challenge without a usable realm")
        params: list[tuple[str, str]] = []
        if challenge.params.get("service"):
            params.append(("service", challenge.params["service"]))
        params += [("scope", s) for s in scopes]
        policy = self.options.retry
        attempt = 0
        while True:
            attempt += 1
            try:
                if creds.token and not creds.token_is_bearer:
                    form = dict(params[:1]) | {
                        "grant_type": "refresh_token",
                        "refresh_token": creds.token,
                        "client_id": "cluster-registry",
                        "scope": " ".join(scopes),
                    }
                    form_type = {"Content-Type": "application/x-www-form-urlencoded"}
                    resp = await self.send("POST", realm, form_type, urlencode(form).encode())
                else:
                    headers = {} if creds.anonymous else {"Authorization": creds.basic_header()}
                    resp = await self.send("GET", _with_query(realm, urlencode(params)), headers)
            except transport.TransportError as err:
                if policy.should_retry(attempt):
                    await asyncio.sleep(policy.delay(attempt))
                    continue
                raise RegistryUnavailableError(f"cannot reach the token service of {host}: {describe(err.cause)}") from None
            if resp.status == 503 and resp.headers.get(LOCK_HEADER):  # no push token while GC locks: defer
                raise status_error(resp.status, resp.headers, resp.body, f"get a push token for {host}", host=host, where=host)
            if is_retryable_status(resp.status) and policy.should_retry(attempt):
                await asyncio.sleep(policy.delay(attempt, parse_retry_after(resp.headers.get("Retry-After"), time.time())))
                continue
            if resp.status in (401, 403):
                raise AuthenticationError(
                    f"the token service of {host} refused the credentials"
                    f"{' for user ' + repr(creds.username) if creds.username else ' (anonymous)'}: "
                    "check the pull secret or registry credentials"
                )
            if resp.status != 200:
                raise (RegistryUnavailableError if resp.status >= 500 else RegistryProtocolError)(
                    f"the token service of {host} answered HTTP {resp.status}"
                )
            doc = _json(resp, f"the token service of {host}")
            token = doc.get("token") or doc.get("access_token") if isinstance(doc, dict) else None
            if not isinstance(token, str) or not token:
                raise RegistryProtocolError(f"the token service of {host} returned no token")
            ttl = doc.get("expires_in", 60)
            return token, float(ttl) if isinstance(ttl, (int, float)) and ttl > 0 else 60.0


class Repository:
    """One repository on one registry, with one set of credentials."""

    def __init__(self, session: RegistrySession, host: str, name: str, auth: Credentials, *, push: bool) -> None:
        self.session = session
        self.host = host
        self.name = name
        self.auth = auth
        self.push = push
        self.base = session.base_url(host) + f"/v2/{name}"

    def __repr__(self) -> str:
        return f"Repository({self.host}/{self.name})"

    @property
    def where(self) -> str:
        return f"{self.host}/{self.name}"

    # -- the request core -------------------------------------------------------------------------

    def _scopes(self, extra: tuple[str, ...]) -> tuple[str, ...]:
        own = (scope(self.name, self.push),) if self.name else ()  # no repository: the catalog
        return (*own, *extra)

    async def authorization(self, extra_scopes: tuple[str, ...] = ()) -> dict[str, str]:
        """The Authorization header (if any) this repository's requests currently carry."""
        authz = await self.session.authorize(self.host, self.auth, self._scopes(extra_scopes))
        return {"Authorization": authz} if authz else {}

    async def request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
        data: bytes | AsyncIterable[bytes] | None = None,
        extra_scopes: tuple[str, ...] = (),
        retry: bool = True,
        what: str = "",
        limit: int = MAX_BODY,
        stream: bool = False,
    ) -> transport.Response:
        """Send one API request; return the response for any non-retryable status.

        The body is read into the response (at most ``limit`` bytes), except with ``stream``, where
        a 200 response's body stays open as ``resp.stream`` (the caller closes it).
        Streamed bodies (async iterables) are sent once (``retry`` must be False for them).
        """
        if not url.startswith(("http://", "https://")):
            url = self.base + url
        if params:
            url = _with_query(url, urlencode(params, safe=":/"))
        scopes = self._scopes(extra_scopes)
        policy = self.session.options.retry
        attempt = 0
        reauthed = False
        what = what or f"{method} {self.where}"
        while True:
            attempt += 1
            hdrs = dict(headers or {})
            authz = await self.session.authorize(self.host, self.auth, scopes)
            if authz:
                hdrs["Authorization"] = authz
            try:
                resp = await self.session.send(method, url, hdrs, data, limit=limit, stream=stream)
            except transport.TransportError as err:
                cause = err.cause
                if isinstance(cause, ssl.SSLCertVerificationError):
                    raise TLSError(
                        f"TLS certificate of {self.host} does not verify ({cause.verify_message}): "
                        "give its CA with --ca-bundle or list the host as insecure"
                    ) from None
                if err.connecting and isinstance(cause, ssl.SSLError):
                    raise TLSError(
                        f"TLS handshake with {self.host} failed ({type(cause).__name__}); "
                        "plain HTTP registry? list it as insecure"
                    ) from None
                if retry and policy.should_retry(attempt):
                    delay = policy.delay(attempt)
                    log.debug("retrying %s after %s in %.2fs", what, type(cause).__name__, delay)
                    await asyncio.sleep(delay)
                    continue
                raise RegistryUnavailableError(f"{what}: cannot reach registry {self.host} ({describe(cause)})") from None
            if resp.status == 401 and not reauthed and not (data is not None and not retry):
                header = resp.headers.get("WWW-Authenticate", "")
                challenge = parse_challenge(header)
                if challenge is None:
                    raise AuthenticationError(f"{what}: registry {self.host} answered 401 without a challenge")
                if challenge.scheme == "basic" and self.auth.anonymous:
                    raise AuthenticationError(
                        f"{what}: registry {self.host} requires credentials and none were given: "
                        "add a pull secret or credentials"
                    )
                self.session.challenged(self.host, challenge, self.auth, scopes)
                reauthed = True
                attempt -= 1
                continue
            if resp.status == 503 and resp.headers.get(LOCK_HEADER):
                raise self.status_error(resp.status, resp.headers, resp.body, what)
            if is_retryable_status(resp.status):
                retry_after = parse_retry_after(resp.headers.get("Retry-After"), time.time())
                if retry and policy.should_retry(attempt):
                    if retry_after is not None and retry_after > policy.max_retry_after:
                        raise RateLimitedError(
                            f"{what}: registry {self.host} asks to wait {retry_after:.0f}s", retry_after=retry_after
                        )
                    delay = policy.delay(attempt, retry_after)
                    log.debug("retrying %s after HTTP %s in %.2fs", what, resp.status, delay)
                    await asyncio.sleep(delay)
                    continue
                message = f"{what}: registry {self.host} answered HTTP {resp.status} (after {attempt} tries)"
                if resp.status == 429:
                    raise RateLimitedError(message, retry_after=retry_after)
                raise RegistryUnavailableError(message)
            return resp

    async def fail(self, resp: transport.Response, what: str) -> ClusterRegistryError:
        """The error for an unexpected response (an open stream is closed)."""
        if resp.stream is not None:
            resp.stream.close()
        return self.status_error(resp.status, resp.headers, resp.body, what)

    def status_error(self, status: int, headers: http.client.HTTPMessage, body: bytes, what: str) -> ClusterRegistryError:
        """The error for an answer ``status`` to ``what`` here (pure: the blob threads call it too)."""
        return status_error(
            status, headers, body, what, host=self.host, where=self.where, user=self.auth.username, push=self.push
        )

    # -- manifests --------------------------------------------------------------------------------

    async def get_manifest(self, ref: str) -> Manifest:
        """The manifest at tag or digest ``ref``: exact bytes, media type, digest (verified if pinned)."""
        what = f"manifest {self.where}{'@' if ':' in ref else ':'}{ref}"
        resp = await self.request(
            "GET", f"/manifests/{ref}", headers={"Accept": media.ACCEPT}, what=f"get {what}", limit=MAX_MANIFEST
        )
        if resp.status != 200:
            raise await self.fail(resp, f"get {what}")
        body = _full_body(resp, f"get {what}", MAX_MANIFEST)
        doc = media.document(body)
        mt = media.media_type_of(doc, resp.headers.get("Content-Type"))
        if ":" in ref:
            media.verify_manifest(body, ref, what)
            digest = ref
        else:
            digest = media.digest_of(body)
        return Manifest(body, mt, digest, doc)

    async def head_manifest(self, ref: str) -> tuple[str, str, int] | None:
        """(digest, media type, size) of the manifest at ``ref``, or None if absent."""
        resp = await self.request("HEAD", f"/manifests/{ref}", headers={"Accept": media.ACCEPT}, what=f"head manifest {self.where}:{ref}")
        if resp.status == 404:
            return None
        if resp.status != 200:
            raise await self.fail(resp, f"head manifest {self.where}:{ref}")
        digest = resp.headers.get("Docker-Content-Digest", "")
        return digest, resp.headers.get("Content-Type", "").split(";")[0], resp.content_length or 0

    async def put_manifest(self, ref: str, body: bytes, media_type: str) -> http.client.HTTPMessage:
        """Push ``body`` byte for byte at tag or digest ``ref``; returns the response headers."""
        what = f"push manifest {self.where}{'@' if ':' in ref else ':'}{ref}"
        resp = await self.request(
            "PUT", f"/manifests/{ref}", headers={"Content-Type": media_type}, data=body, what=what
        )
        if resp.status not in (200, 201, 202):
            raise await self.fail(resp, what)
        got = resp.headers.get("Docker-Content-Digest")
        want = media.digest_of(body)
        if got and got != want:
            raise RegistryProtocolError(f"{what}: registry stored digest {got}, expected {want}")
        return resp.headers

    async def delete_manifest(self, digest: str) -> bool:
        """Delete the manifest ``digest`` (untags every tag pointing at it). False if it was absent."""
        what = f"delete manifest {self.where}@{digest}"
        resp = await self.request("DELETE", f"/manifests/{media.check_digest(digest)}", what=what,
                                  extra_scopes=(f"repository:{self.name}:delete",))  # distribution v3 asks for it
        if resp.status == 404:
            return False
        if resp.status not in (200, 202):
            raise await self.fail(resp, what)
        return True

    async def list_tags(self, page_size: int = 1000) -> list[str]:
        """Every tag of the repository (follows ``Link`` pagination). Empty if the repository is absent."""
        return await self.paged(f"/tags/list?n={page_size}", "tags", f"list tags of {self.where}")

    async def paged(self, url: str, key: str, what: str, extra_scopes: tuple[str, ...] = ()) -> list[str]:
        """The strings under ``key`` of every page of a listing (``Link: <...>; rel="next"``); [] on 404."""
        out: list[str] = []
        while url:
            resp = await self.request("GET", url, what=what, extra_scopes=extra_scopes)
            if resp.status == 404:
                return out
            if resp.status != 200:
                raise await self.fail(resp, what)
            doc = _json(resp, what)
            out += [t for t in (doc.get(key) or []) if isinstance(t, str)] if isinstance(doc, dict) else []
            link = resp.headers.get("Link", "")
            url = ""
            if link and 'rel="next"' in link:
                target = link.split(";", 1)[0].strip().strip("<>")
                url = urljoin(self.session.base_url(self.host) + "/", target)
        return out

    async def referrers(self, digest: str) -> list[media.Descriptor] | None:
        """The referrers of ``digest`` via the OCI 1.1 referrers API; None if the registry lacks it."""
        what = f"list referrers of {self.where}@{digest}"
        resp = await self.request("GET", f"/referrers/{digest}", headers={"Accept": media.OCI_INDEX}, what=what)
        if resp.status in (404, 405, 400):
            return None
        if resp.status != 200:
            raise await self.fail(resp, what)
        ctype = resp.headers.get("Content-Type", "").split(";")[0]
        if ctype != media.OCI_INDEX:
            return None
        return list(media.inspect(_full_body(resp, what), media.OCI_INDEX).children)

    # -- blobs ------------------------------------------------------------------------------------

    async def blob_size(self, digest: str) -> int | None:
        """The size of blob ``digest`` if the repository has it, else None."""
        resp = await self.request("HEAD", f"/blobs/{digest}", what=f"check blob {self.where}@{digest}")
        if resp.status == 404:
            return None
        if resp.status != 200:
            raise await self.fail(resp, f"check blob {self.where}@{digest}")
        length = resp.content_length
        return -1 if length is None else length

    async def open_blob(self, digest: str, size: int | None = None) -> BlobStream:
        """Stream blob ``digest`` in chunks, verifying size and digest as it goes (``verify.Verifier``).

        The last chunk is held back until the whole blob verified, so a consumer that forwards
        chunks never forwards the end of corrupt content. Raises CorruptBlobError on a mismatch and
        RegistryUnavailableError when the connection drops midway.
        """
        what = f"get blob {self.where}@{digest}"
        check: Verifier[bytes] = Verifier(digest, size, what)
        resp = await self.request("GET", f"/blobs/{digest}", what=what, stream=True)
        if resp.status != 200 or resp.stream is None:
            raise await self.fail(resp, what)
        try:
            check.announced(resp.content_length)
        except CorruptBlobError:
            resp.stream.close()
            raise
        if size is None:
            check.size = resp.content_length
        return BlobStream(resp.stream, self._verified(resp.stream, check))

    async def _verified(self, stream: transport.Stream, check: Verifier[bytes]) -> AsyncGenerator[bytes, None]:
        chunk_size = self.session.options.chunk_size
        try:
            # the exchange read the first chunk; the read that ends the body gives the connection back
            while stream.first is not None or not stream.done:
                chunk, stream.first = stream.first, None
                try:
                    if chunk is None:
                        chunk = await self.session.run(stream.lease, functools.partial(stream.read, chunk_size))
                except transport.TransportError as err:
                    raise RegistryUnavailableError(
                        f"{check.what}: connection dropped after {check.got} bytes ({describe(err.cause)})"
                    ) from None
                if not chunk:
                    break
                if (ready := check.feed(chunk)) is not None:
                    yield ready
            if (last := check.finish()) is not None:
                yield last
        finally:
            stream.close()

    async def start_upload(self, digest: str, *, mount_from: str | None = None, allow_self: bool = False) -> str | None:
        """POST an upload session; None if the blob got mounted from ``mount_from`` instead.

        Returns the upload URL (the ``digest`` query included) for :meth:`finish_upload`.
        A mount the registry declines starts an ordinary upload, so trying one costs no request.
        """
        what = f"push blob {self.where}@{digest}"
        params: dict[str, str] = {}
        extra: tuple[str, ...] = ()
        if mount_from and (allow_self or mount_from != self.name):
            params = {"mount": digest, "from": mount_from}
            extra = (scope(mount_from, False),) if mount_from != self.name else ()
        resp = await self.request("POST", "/blobs/uploads/", params=params, extra_scopes=extra, what=what)
        if resp.status == 201 and params:
            return None
        if resp.status != 202:
            raise await self.fail(resp, what)
        location = resp.headers.get("Location")
        if not location:
            raise RegistryProtocolError(f"{what}: registry {self.host} gave no upload location")
        upload = urljoin(resp.url, location)
        return _with_query(upload, urlencode({"digest": digest}, safe=":"))

    async def finish_upload(
        self,
        upload: str,
        digest: str,
        size: int,
        body: AsyncIterable[bytes] | bytes,
    ) -> None:
        """One monolithic PUT to ``upload`` whose body is streamed from ``body`` (``size`` bytes).

        An error ``body`` raises (a corrupt or cut source) propagates as is.
        """
        what = f"push blob {self.where}@{digest}"
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
        resp = await self.request("PUT", upload, headers=headers, data=body, retry=isinstance(body, bytes), what=what)
        if resp.status != 201:
            raise await self.fail(resp, what)


class BlobStream:
    """A verified blob download: ``async for chunk in stream``; ``await stream.aclose()`` always."""

    def __init__(self, stream: transport.Stream, chunks: AsyncGenerator[bytes, None]) -> None:
        self._stream = stream
        self._chunks = chunks

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks

    async def aclose(self) -> None:
        await self._chunks.aclose()
        self._stream.close()

    async def __aenter__(self) -> BlobStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _with_query(url: str, query: str) -> str:
    """``url`` with ``query`` (already encoded) added to any query it has."""
    return f"{url}{'&' if '?' in url else '?'}{query}" if query else url


def _full_body(resp: transport.Response, what: str, limit: int = MAX_BODY) -> bytes:
    """The whole body, or an error when it was longer than the exchange's ``limit``."""
    if not resp.complete:
        raise RegistryProtocolError(f"{what}: the answer is larger than {limit} bytes")
    return resp.body


def _json(resp: transport.Response, what: str) -> Any:
    try:
        return json.loads(_full_body(resp, what))
    except ValueError:
        raise RegistryProtocolError(f"{what}: the answer is not JSON") from None
