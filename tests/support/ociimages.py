"""Deterministic OCI/Docker test images, built in memory or streamed, pushed with a tiny
synchronous client that shares no code with the copy engine under test.

    p = Pusher(reg.host)                                   # or Pusher(host, auth=("u","p"), ca_file=...)
    img = push_image(p, "app", "v1", layers=[1 << 20] * 3, seed=1)            # OCI manifest
    img = push_image(p, "app", "v1", layers=[...], docker=True)               # Docker schema 2
    idx = push_index(p, "multi", "v1", PLATFORMS[:3], layers=[...])           # OCI index / manifest list
    sig = push_signature(p, "app", img.digest)                                # tag sha256-<hex>.sig
    ref = push_referrer(p, "app", img)                                         # OCI 1.1 subject + fallback tag

Layer content is ``random.Random(seed)`` bytes, generated in 1 MiB chunks while uploading (a 1 GiB
layer never sits in memory); the same seed and size always give the same digest.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import http.client
import ipaddress
import json
import random
import socket
import ssl
import urllib.parse
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
ACCEPT = ", ".join([OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST])
CHUNK = 1 << 20

PLATFORMS: list[dict[str, str]] = [
    {"os": "linux", "architecture": "amd64"},
    {"os": "linux", "architecture": "arm64", "variant": "v8"},
    {"os": "linux", "architecture": "s390x"},
    {"os": "linux", "architecture": "ppc64le"},
]


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def layer_chunks(seed: int, size: int, chunk: int = CHUNK) -> Iterator[bytes]:
    """``size`` deterministic pseudo-random bytes in chunks (never all in memory)."""
    rng = random.Random(seed)
    left = size
    while left > 0:
        n = min(chunk, left)
        yield rng.randbytes(n)
        left -= n


def layer_digest(seed: int, size: int) -> str:
    h = hashlib.sha256()
    for c in layer_chunks(seed, size):
        h.update(c)
    return "sha256:" + h.hexdigest()


def canonical(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


class HTTPError(Exception):
    def __init__(self, status: int, what: str, body: bytes = b"") -> None:
        super().__init__(f"{what}: HTTP {status} {body[:300]!r}")
        self.status = status


def pod_view_realm(realm: str, registry_host: str, scheme: str = "http") -> str:
    """The realm a client outside the node asks: a loopback realm (the node proxy's) becomes the token
    service's port in the registry pod the client talks to (over SCHEME: https with registryTLS);
    anything else stays."""
    u = urllib.parse.urlsplit(realm)
    host = registry_host.rpartition(":")[0]
    if u.hostname in ("127.0.0.1", "localhost") and host not in ("127.0.0.1", "localhost"):
        return f"{scheme}://{host}:5002{u.path}"
    return realm


def tls_context(host: str, ca_file: str | None) -> ssl.SSLContext | None:
    """How to speak to HOST (``host:port``): verified against CA_FILE (the chain only when HOST is an IP,
    as a pod dialling a registry pod's IP sees it); without CA_FILE, TLS without verification if HOST
    answers a TLS handshake (the chart's registry with registryTLS, seen by a test that does not test
    TLS), else None: plain HTTP."""
    h, _, port = host.rpartition(":")
    try:
        ipaddress.ip_address(h.strip("[]"))
        literal = True
    except ValueError:
        literal = False
    if ca_file:
        ctx = ssl.create_default_context(cafile=ca_file)
        ctx.check_hostname = not literal
        return ctx
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    try:
        with socket.create_connection((h.strip("[]"), int(port)), timeout=10) as raw, ctx.wrap_socket(raw):
            return ctx
    except (ssl.SSLError, OSError):
        return None


@dataclass
class Pusher:
    """A minimal synchronous registry client (basic and bearer auth, HTTP or HTTPS)."""

    host: str
    auth: tuple[str, str] | None = None
    ca_file: str | None = None
    # The token realm to ask instead of the challenge's. None: the challenge's, except that the chart's
    # registry names the node-local realm (127.0.0.1:<node proxy port + 1>), which a client with a pod's
    # view (a registry pod's IP) reaches as the token service beside distribution (<pod IP>:5002).
    realm: str | None = None
    _token: dict[str, str] = field(default_factory=dict)
    _challenge: str = ""

    @functools.cached_property
    def _tls(self) -> ssl.SSLContext | None:
        return tls_context(self.host, self.ca_file)

    @property
    def scheme(self) -> str:
        return "https" if self._tls else "http"

    def _conn(self) -> http.client.HTTPConnection:
        h, _, port = self.host.rpartition(":")
        if self._tls:
            return http.client.HTTPSConnection(h, int(port), context=self._tls, timeout=300)
        return http.client.HTTPConnection(h, int(port), timeout=300)

    def _authz(self, repo: str) -> dict[str, str]:
        if self._challenge.lower().startswith("basic") and self.auth:
            return {"Authorization": "Basic " + base64.b64encode(f"{self.auth[0]}:{self.auth[1]}".encode()).decode()}
        if self._challenge.lower().startswith("bearer"):
            if repo not in self._token:
                params = dict(
                    (k, v.strip('"'))
                    for k, _, v in (p.strip().partition("=") for p in self._challenge[7:].split(","))
                )
                scope = f"repository:{repo}:pull,push" if repo else "registry:catalog:*"  # "" is the catalog
                q = urllib.parse.urlencode({"service": params.get("service", ""), "scope": scope})
                u = urllib.parse.urlsplit(self.realm or pod_view_realm(params["realm"], self.host, self.scheme))
                c = (http.client.HTTPSConnection(u.hostname or "", u.port or 443, timeout=30,
                                                 context=self._tls or ssl.create_default_context(cafile=self.ca_file))
                     if u.scheme == "https" else http.client.HTTPConnection(u.hostname or "", u.port or 80, timeout=30))  # fmt: skip
                hdrs = {}
                if self.auth:
                    hdrs["Authorization"] = "Basic " + base64.b64encode(f"{self.auth[0]}:{self.auth[1]}".encode()).decode()
                c.request("GET", f"{u.path}?{q}", headers=hdrs)
                r = c.getresponse()
                body = r.read()
                if r.status != 200:
                    raise HTTPError(r.status, "token", body)
                self._token[repo] = json.loads(body)["token"]
            return {"Authorization": f"Bearer {self._token[repo]}"}
        return {}

    def request(
        self, method: str, path: str, repo: str, *, body: bytes | Iterable[bytes] | None = None,
        headers: dict[str, str] | None = None, chunked: bool = False,
    ) -> tuple[int, dict[str, str], bytes]:
        for _ in range(2):
            conn = self._conn()
            hdrs = dict(headers or {}) | self._authz(repo)
            conn.request(method, path, body=body, headers=hdrs, encode_chunked=chunked)
            resp = conn.getresponse()
            data = resp.read()
            out = {k.lower(): v for k, v in resp.getheaders()}
            conn.close()
            if resp.status == 401 and isinstance(body, (bytes, type(None))):
                if not self._challenge:
                    self._challenge = out.get("www-authenticate", "")
                    continue
                if self._token.pop(repo, None) is not None:
                    continue  # the cached token died (push tokens live seconds): ask for a new one
            return resp.status, out, data
        return resp.status, out, data

    def _upload_location(self, repo: str) -> str:
        st, h, b = self.request("POST", f"/v2/{repo}/blobs/uploads/", repo)
        if st != 202:
            raise HTTPError(st, f"start upload {repo}", b)
        loc = h["location"]
        return urllib.parse.urlsplit(loc)._replace(scheme="", netloc="").geturl() if "://" in loc else loc

    def push_blob(self, repo: str, data: bytes) -> str:
        digest = sha256(data)
        if self.blob_exists(repo, digest):
            return digest
        loc = self._upload_location(repo)
        sep = "&" if "?" in loc else "?"
        st, _, b = self.request("PUT", f"{loc}{sep}digest={digest}", repo, body=data,
                                headers={"Content-Type": "application/octet-stream"})
        if st != 201:
            raise HTTPError(st, f"push blob {repo}", b)
        return digest

    def push_blob_stream(self, repo: str, chunks: Iterable[bytes], size: int, digest: str | None = None) -> str:
        """Stream a blob (PATCH, chunked) and commit it (PUT ?digest=); returns its digest."""
        if digest and self.blob_exists(repo, digest):
            return digest
        if not self._challenge:  # learn the auth scheme with a replayable request first
            self.request("GET", "/v2/", repo)
        h = hashlib.sha256()

        def hashed() -> Iterator[bytes]:
            for c in chunks:
                h.update(c)
                yield c

        loc = self._upload_location(repo)
        st, hd, b = self.request("PATCH", loc, repo, body=hashed(), chunked=True,
                                 headers={"Content-Type": "application/octet-stream"})
        if st != 202:
            raise HTTPError(st, f"patch blob {repo}", b)
        got = "sha256:" + h.hexdigest()
        loc = hd["location"]
        loc = urllib.parse.urlsplit(loc)._replace(scheme="", netloc="").geturl() if "://" in loc else loc
        sep = "&" if "?" in loc else "?"
        st, _, b = self.request("PUT", f"{loc}{sep}digest={got}", repo, body=b"")
        if st != 201:
            raise HTTPError(st, f"commit blob {repo}", b)
        return got

    def blob_exists(self, repo: str, digest: str) -> bool:
        st, _, _ = self.request("HEAD", f"/v2/{repo}/blobs/{digest}", repo)
        return st == 200

    def blob_sha256(self, repo: str, digest: str) -> tuple[str, int]:
        """Download a blob streaming; (sha256 digest, size) of what the registry serves."""
        if not self._challenge:  # learn the registry's auth challenge first (request() answers it)
            self.request("HEAD", f"/v2/{repo}/blobs/{digest}", repo)
        conn = self._conn()
        conn.request("GET", f"/v2/{repo}/blobs/{digest}", headers=self._authz(repo))
        resp = conn.getresponse()
        if resp.status in (301, 302, 307):
            raise HTTPError(resp.status, "redirected blob")
        if resp.status != 200:
            raise HTTPError(resp.status, f"get blob {repo}@{digest}", resp.read())
        h, n = hashlib.sha256(), 0
        while c := resp.read(CHUNK):
            h.update(c)
            n += len(c)
        conn.close()
        return "sha256:" + h.hexdigest(), n

    def put_manifest(self, repo: str, ref: str, body: bytes, media_type: str) -> dict[str, str]:
        st, h, b = self.request("PUT", f"/v2/{repo}/manifests/{ref}", repo, body=body, headers={"Content-Type": media_type})
        if st != 201:
            raise HTTPError(st, f"put manifest {repo}:{ref}", b)
        return h

    def get_manifest(self, repo: str, ref: str) -> tuple[bytes, str] | None:
        st, h, b = self.request("GET", f"/v2/{repo}/manifests/{ref}", repo, headers={"Accept": ACCEPT})
        if st == 404:
            return None
        if st != 200:
            raise HTTPError(st, f"get manifest {repo}:{ref}", b)
        return b, h.get("content-type", "")

    def tags(self, repo: str) -> list[str]:
        st, _, b = self.request("GET", f"/v2/{repo}/tags/list", repo)
        if st == 404:
            return []
        if st != 200:
            raise HTTPError(st, f"tags {repo}", b)
        return list(json.loads(b).get("tags") or [])


@dataclass
class Image:
    repo: str
    tag: str | None
    digest: str
    manifest: bytes
    media_type: str
    blobs: list[tuple[str, int]]  # every blob (config + layers) with its size
    children: list[Image] = field(default_factory=list)

    @property
    def descriptor(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": len(self.manifest)}

    def all_blobs(self) -> list[tuple[str, int]]:
        out = list(self.blobs)
        for c in self.children:
            out += c.all_blobs()
        return list(dict.fromkeys(out))

    def all_manifests(self) -> list[Image]:
        return [self] + [m for c in self.children for m in c.all_manifests()]


def push_image(
    p: Pusher, repo: str, tag: str | None, *, layers: list[int | tuple[int, int]], seed: int = 0,
    platform: dict[str, str] | None = None, docker: bool = False, push_tag: bool = True,
) -> Image:
    """An image of random layers (a size, or ``(seed, size)`` for a layer shared with other
    images); pushed; tagged unless ``push_tag`` is False."""
    platform = platform or PLATFORMS[0]
    layer_descs, blobs = [], []
    for i, spec in enumerate(layers):
        s, size = spec if isinstance(spec, tuple) else (seed * 100_003 + i, spec)
        digest = p.push_blob_stream(repo, layer_chunks(s, size), size)
        layer_descs.append({"mediaType": DOCKER_LAYER if docker else OCI_LAYER, "digest": digest, "size": size})
        blobs.append((digest, size))
    config = canonical({
        "architecture": platform["architecture"], "os": platform["os"],
        **({"variant": platform["variant"]} if "variant" in platform else {}),
        "config": {"Env": [f"SEED={seed}"]},
        "rootfs": {"type": "layers", "diff_ids": [d["digest"] for d in layer_descs]},
    })
    return _push_manifest(p, repo, tag if push_tag else None, config, layer_descs, blobs, docker)


def _push_manifest(p: Pusher, repo: str, tag: str | None, config: bytes, layer_descs: list[dict[str, Any]],
                   blobs: list[tuple[str, int]], docker: bool = False) -> Image:
    """Push CONFIG and the manifest of it and LAYER_DESCS (by TAG, else by digest)."""
    cdigest = p.push_blob(repo, config)
    blobs.insert(0, (cdigest, len(config)))
    mt = DOCKER_MANIFEST if docker else OCI_MANIFEST
    manifest = json.dumps({  # not canonical on purpose: copies must keep these exact bytes
        "schemaVersion": 2, "mediaType": mt,
        "config": {"mediaType": DOCKER_CONFIG if docker else OCI_CONFIG, "digest": cdigest, "size": len(config)},
        "layers": layer_descs,
    }, indent=3).encode()
    digest = sha256(manifest)
    p.put_manifest(repo, tag or digest, manifest, mt)
    return Image(repo, tag, digest, manifest, mt, blobs)


def push_index(
    p: Pusher, repo: str, tag: str | None, platforms: list[dict[str, str]], *, layers: list[int | tuple[int, int]],
    seed: int = 0, docker: bool = False, shared_base: int = 0,
) -> Image:
    """A multi-platform index (OCI) or manifest list (``docker=True``); platforms differ in content.

    ``shared_base`` > 0 adds one layer of that size common to every platform (exercises dedupe).
    """
    children = []
    for n, plat in enumerate(platforms):
        child_layers: list[int | tuple[int, int]] = [(10**9 + seed, shared_base)] if shared_base else []
        child_layers += layers
        img = push_image(p, repo, None, layers=child_layers, seed=seed * 1000 + n + 1, platform=plat, docker=docker)
        children.append(img)
    return _push_index(p, repo, tag, children, platforms, docker)


def _push_index(p: Pusher, repo: str, tag: str | None, children: list[Image], platforms: list[dict[str, str]],
                docker: bool = False) -> Image:
    mt = DOCKER_LIST if docker else OCI_INDEX
    body = json.dumps({
        "schemaVersion": 2, "mediaType": mt,
        "manifests": [dict(c.descriptor, platform=plat) for c, plat in zip(children, platforms)],
    }, indent=2).encode()
    digest = sha256(body)
    p.put_manifest(repo, tag or digest, body, mt)
    return Image(repo, tag, digest, body, mt, [], children)


def push_signature(p: Pusher, repo: str, subject: str, *, suffix: str = "sig") -> Image:
    """A cosign-style signature image at tag ``sha256-<hex>.<suffix>``."""
    payload = canonical({"critical": {"image": {"docker-manifest-digest": subject}, "type": "cosign container image signature"}})
    layer = p.push_blob(repo, payload)
    config = canonical({"architecture": "", "os": "", "config": {}, "rootfs": {"type": "layers", "diff_ids": [layer]}})
    cdigest = p.push_blob(repo, config)
    body = canonical({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": cdigest, "size": len(config)},
        "layers": [{"mediaType": "application/vnd.dev.cosign.simplesigning.v1+json", "digest": layer,
                    "size": len(payload), "annotations": {"dev.cosignproject.cosign/signature": "MEUCIQ" + "A" * 40}}],
    })
    tag = subject.replace(":", "-") + "." + suffix
    p.put_manifest(repo, tag, body, OCI_MANIFEST)
    return Image(repo, tag, sha256(body), body, OCI_MANIFEST, [(cdigest, len(config)), (layer, len(payload))])


def push_referrer(
    p: Pusher, repo: str, subject: Image, *, artifact_type: str = "application/vnd.example.sbom.v1+json",
    content: bytes = b'{"sbom":"example"}', fallback_tag: bool = True,
) -> Image:
    """An OCI 1.1 artifact whose ``subject`` is ``subject``; with ``fallback_tag`` also the
    referrers tag-schema index ``sha256-<hex>`` (what clients do on registries without the API)."""
    empty = p.push_blob(repo, b"{}")
    layer = p.push_blob(repo, content)
    body = canonical({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": artifact_type,
        "config": {"mediaType": OCI_EMPTY, "digest": empty, "size": 2},
        "layers": [{"mediaType": "application/json", "digest": layer, "size": len(content)}],
        "subject": subject.descriptor,
        "annotations": {"org.opencontainers.image.created": "2026-01-01T00:00:00Z"},
    })
    digest = sha256(body)
    headers = p.put_manifest(repo, digest, body, OCI_MANIFEST)
    if fallback_tag and "oci-subject" not in headers:
        tag = subject.digest.replace(":", "-")
        existing = p.get_manifest(repo, tag)
        manifests = json.loads(existing[0])["manifests"] if existing else []
        manifests.append({"mediaType": OCI_MANIFEST, "digest": digest, "size": len(body), "artifactType": artifact_type})
        p.put_manifest(repo, tag, canonical({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}), OCI_INDEX)
    return Image(repo, None, digest, body, OCI_MANIFEST, [(empty, 2), (layer, len(content))])


def assert_copied(src: Pusher, dst: Pusher, image: Image, dst_repo: str, *, hash_blobs: bool = True) -> None:
    """Every manifest byte-identical at ``dst_repo`` (by digest), every blob present with the right
    content (downloaded and hashed when ``hash_blobs``, else HEAD)."""
    for m in image.all_manifests():
        got = dst.get_manifest(dst_repo, m.digest)
        assert got is not None, f"manifest {m.digest} missing at {dst_repo}"
        assert got[0] == m.manifest, f"manifest {m.digest} differs at {dst_repo}"
    for digest, size in image.all_blobs():
        if hash_blobs:
            assert dst.blob_sha256(dst_repo, digest) == (digest, size), f"blob {digest} differs"
        else:
            assert dst.blob_exists(dst_repo, digest), f"blob {digest} missing"


# -- runnable images: real tar layers with Debian's static busybox ------------------------------------

BUSYBOX = "/bin/busybox"  # Debian's busybox-static (ci/toolchain installs it)


def tar_gz(files: dict[str, bytes | str], mode: int = 0o755) -> tuple[bytes, str]:
    """A deterministic tar+gzip layer of FILES (path -> content, or "->target" for a symlink); parents
    are added as directories. Returns (gzip bytes, diff_id)."""
    import gzip
    import io
    import tarfile

    entries: dict[str, bytes | str | None] = {}
    for path in files:
        parts = path.strip("/").split("/")
        for i in range(1, len(parts)):
            entries.setdefault("/".join(parts[:i]), None)
    entries.update({p.strip("/"): v for p, v in files.items()})
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(entries):
            info = tarfile.TarInfo(name)
            info.mtime, info.uid, info.gid = 1700000000, 0, 0
            value = entries[name]
            if value is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            elif isinstance(value, str):
                info.type, info.linkname, info.mode = tarfile.SYMTYPE, value.removeprefix("->"), 0o777
                tar.addfile(info)
            else:
                info.size, info.mode = len(value), mode
                tar.addfile(info, io.BytesIO(value))
    data = raw.getvalue()
    gz = io.BytesIO()
    with gzip.GzipFile(fileobj=gz, mode="wb", mtime=0, filename="") as f:
        f.write(data)
    return gz.getvalue(), sha256(data)


@functools.cache
def busybox_layer() -> tuple[bytes, str]:
    """/bin/busybox and /bin/sh: the shared base layer of the sample CNF's images."""
    from pathlib import Path

    return tar_gz({"/bin/busybox": Path(BUSYBOX).read_bytes(), "/bin/sh": "->busybox"})


def push_runnable(
    p: Pusher, repo: str, tag: str | None, *, files: dict[str, bytes | str], entrypoint: list[str],
    platform: dict[str, str] | None = None,
) -> Image:
    """An image a container runtime can run: busybox, then a layer of FILES; ENTRYPOINT as given
    (pushed by TAG, or by digest only when TAG is None)."""
    platform = platform or PLATFORMS[0]
    layers = [busybox_layer(), tar_gz(files)]
    descs, blobs = [], []
    for gz, _ in layers:
        digest = p.push_blob(repo, gz)
        descs.append({"mediaType": OCI_LAYER, "digest": digest, "size": len(gz)})
        blobs.append((digest, len(gz)))
    config = canonical({
        "architecture": platform["architecture"], "os": platform["os"],
        **({"variant": platform["variant"]} if "variant" in platform else {}),
        "config": {"Entrypoint": entrypoint, "Env": ["PATH=/bin"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [diff for _, diff in layers]},
    })
    return _push_manifest(p, repo, tag, config, descs, blobs)


def push_runnable_index(
    p: Pusher, repo: str, tag: str, platforms: list[dict[str, str]], *, files: dict[str, bytes | str],
    entrypoint: list[str],
) -> Image:
    """A multi-platform index of runnable images (each platform's files name their platform; only
    the amd64 one runs here: every platform carries the same amd64 busybox)."""
    children = []
    for plat in platforms:
        label = "/".join(v for v in (plat["os"], plat["architecture"], plat.get("variant", "")) if v)
        own = {k: v + f" {label}\n".encode() if isinstance(v, bytes) and k.endswith(".html") else v for k, v in files.items()}
        children.append(push_runnable(p, repo, None, files=own, entrypoint=entrypoint, platform=plat))
    return _push_index(p, repo, tag, children, platforms)
