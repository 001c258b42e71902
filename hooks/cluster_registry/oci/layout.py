"""OCI image layouts and docker-archive tarballs on disk: reading, verifying, writing. No registry I/O.

Side loading moves images on a drive. ``export`` writes an OCI image layout (``oci-layout``,
``index.json``, ``blobs/<alg>/<hex>``); every ``index.json`` entry is annotated with

* ``org.opencontainers.image.ref.name``: the tag (the OCI convention, what skopeo/umoci read),
* ``io.containerd.image.name``: the full normalised reference (what containerd/nerdctl read),
* ``clusterregistry.io/source``: the full source reference with its digest (what ``sideload`` reads),
* ``clusterregistry.io/referrer-of``: on signatures/attestations, the digest of the image they refer to.

``sideload`` reads such layouts (as a directory or a tar file) and ``docker save`` archives (the
legacy ``manifest.json`` + ``<id>/layer.tar`` format; newer archives that also hold an OCI layout
are read as the layout, keeping the original digests). A docker archive's layers are uncompressed
tars, so its image is pushed as an OCI manifest of uncompressed layers whose digests are the
config's ``rootfs.diff_ids``: verified, but not the digest the image had in its registry.

Reading turns every input into :class:`Entry` values (manifests in memory, blobs as file members);
:func:`verify` hashes every blob before anything is pushed.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from cluster_registry import api, reference
from cluster_registry.errors import InvalidReferenceError, PermanentError
from cluster_registry.oci import media

REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"
SOURCE = api.ANNOTATION_SOURCE
REFERRER_OF = "clusterregistry.io/referrer-of"
LAYOUT_VERSION = "1.0.0"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
CHUNK = 1 << 20
MAX_DOC = 4 * 1024 * 1024  # manifests, index.json, configs
MAX_MEMBERS = 100_000  # files in one archive (an image has tens of blobs)
MAX_EXPANDED = 1 << 40  # bytes an archive may hold once decompressed
# Image layers are compressed already: a tar of them barely compresses. Past 1 GiB, an archive
# expanding to 100 times its size on disk is a decompression bomb (gzip's limit is ~1000).
BOMB_RATIO, BOMB_FLOOR = 100, 1 << 30


class InputError(PermanentError):
    """A side-loading input that is corrupt, partial or cannot be mapped to a source."""


# --- inputs: a directory or a tar file, read by member path ------------------------------------


class Input:
    """Where an entry's files are: a directory (``members`` are relative paths) or a tar file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._tar: tarfile.TarFile | None = None
        self._members: dict[str, tarfile.TarInfo] | None = None

    @property
    def where(self) -> str:
        return str(self.path)

    @property
    def is_tar(self) -> bool:
        return self.path.is_file()

    def _index(self) -> dict[str, tarfile.TarInfo]:
        """The archive's files by path. Headers are read one by one and checked before the next
        member's data is decompressed: a link, a path out of the archive, too many members or a
        decompressed size out of proportion (a gzip bomb) fail at once, before anything is pushed."""
        if self._members is None:
            compressed = self.path.stat().st_size
            try:
                self._tar = tarfile.open(self.path, "r:*")
                members: dict[str, tarfile.TarInfo] = {}
                for count, m in enumerate(self._tar, 1):
                    _check_member(self.where, m, count, compressed)
                    if m.isfile():
                        members[os.path.normpath(m.name).lstrip("/")] = m
                self._members = members
            except (tarfile.TarError, OSError, EOFError) as err:
                raise InputError(f"{self.where}: not a readable tar archive ({err})") from None
        return self._members

    def _file(self, member: str) -> Path:
        """A directory input's member, refused when it leaves the directory or goes through a link."""
        path = self.path / member
        if ".." in Path(member).parts or Path(member).is_absolute():
            raise InputError(f"{self.where}: {member!r} leaves the directory: refused")
        for part in (path, *path.parents):
            if part == self.path:
                break
            if part.is_symlink():
                raise InputError(f"{self.where}: {part.relative_to(self.path)} is a symbolic link: refused")
        return path

    def exists(self, member: str) -> bool:
        if self.is_tar:
            return os.path.normpath(member) in self._index()
        return self._file(member).is_file()

    def size(self, member: str) -> int | None:
        if self.is_tar:
            info = self._index().get(os.path.normpath(member))
            return info.size if info is not None and info.isfile() else None
        try:
            return self._file(member).stat().st_size
        except OSError:
            return None

    @contextmanager
    def open(self, member: str) -> Iterator[IO[bytes]]:
        if self.is_tar:
            info = self._index().get(os.path.normpath(member))
            f = self._tar.extractfile(info) if info is not None and self._tar is not None else None
            if f is None:
                raise FileNotFoundError(member)
            with f:
                yield f
        else:
            with open(self._file(member), "rb") as fh:
                yield fh

    def read(self, member: str, limit: int = MAX_DOC) -> bytes:
        with self.open(member) as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise InputError(f"{self.where}: {member} is larger than {limit} bytes")
        return data

    def chunks(self, member: str, chunk: int = CHUNK) -> Iterator[bytes]:
        with self.open(member) as f:
            while data := f.read(chunk):
                yield data

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None
            self._members = None


def _check_member(where: str, m: tarfile.TarInfo, count: int, compressed: int) -> None:
    """Refuse an archive member that is a link, a device, a path out of the archive, or that takes the
    archive past the member count or the decompressed size (its header's word, before its data)."""
    if count > MAX_MEMBERS:
        raise InputError(f"{where}: more than {MAX_MEMBERS} members: refused")
    if m.issym() or m.islnk():
        kind = "symbolic" if m.issym() else "hard"
        raise InputError(f"{where}: member {m.name!r} is a {kind} link (to {m.linkname!r}): links are refused")
    if not (m.isfile() or m.isdir()):
        raise InputError(f"{where}: member {m.name!r} is not a file or directory: refused")
    if m.name.startswith("/") or ".." in m.name.split("/"):
        raise InputError(f"{where}: member {m.name!r} leaves the archive: refused")
    end = m.offset_data + m.size
    if end > MAX_EXPANDED or (end > BOMB_FLOOR and end > BOMB_RATIO * compressed):
        raise InputError(
            f"{where}: expands to more than {end} bytes from {compressed} on disk (member {m.name!r}): "
            "refused as a decompression bomb"
        )


# --- the model ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Blob:
    digest: str
    size: int
    media_type: str
    member: str  # path inside the input


@dataclass(frozen=True)
class ManifestDoc:
    digest: str
    media_type: str
    body: bytes


@dataclass(frozen=True)
class Entry:
    """One image (or referrer) to import: where it came from and everything it is made of."""

    source: reference.Reference  # normalised; ``digest`` is the top manifest's
    manifests: tuple[ManifestDoc, ...]  # children first, the top manifest last
    blobs: tuple[Blob, ...]
    origin: Input = field(compare=False)
    referrer_of: str = ""  # subject digest when this is a signature/attestation/referrer
    platforms: tuple[str, ...] = ()

    @property
    def top(self) -> ManifestDoc:
        return self.manifests[-1]

    @property
    def size(self) -> int:
        return sum(m.size for m in {b.digest: b for b in self.blobs}.values()) + sum(len(m.body) for m in self.manifests)


def blob_member(digest: str) -> str:
    algorithm, _, hexpart = media.check_digest(digest).partition(":")
    return f"blobs/{algorithm}/{hexpart}"


def source_from_annotations(annotations: dict[str, str], default_repository: str | None) -> reference.Reference:
    """The source an index entry names (see the module docstring); raises InputError."""
    for key in (SOURCE, CONTAINERD_NAME):
        if text := annotations.get(key):
            try:
                return reference.parse(text)
            except InvalidReferenceError as err:
                raise InputError(f"annotation {key}={text!r} is not an image reference: {err}") from None
    ref_name = annotations.get(REF_NAME, "")
    try:
        if "/" in ref_name:
            return reference.parse(ref_name)
        if ref_name and default_repository:
            return reference.parse(f"{default_repository}:{ref_name}")
    except InvalidReferenceError as err:
        raise InputError(f"{REF_NAME}={ref_name!r} does not make an image reference: {err}") from None
    raise InputError(
        f"no source reference: annotate the entry with {SOURCE} or {CONTAINERD_NAME} "
        f"(or give --default-repository for a bare tag {ref_name!r})"
    )


# --- reading OCI layouts ---------------------------------------------------------------------------


def _read_verified_manifest(src: Input, desc: dict[str, Any], where: str) -> ManifestDoc:
    digest = desc.get("digest", "")
    try:
        member = blob_member(digest)
    except PermanentError:
        raise InputError(f"{src.where}: {where} has a malformed digest {digest!r}") from None
    if not src.exists(member):
        raise InputError(f"{src.where}: manifest {digest} is missing ({member}): the layout is partial")
    body = src.read(member)
    got = media.digest_of(body, digest.split(":", 1)[0])
    if got != digest:
        raise InputError(f"{src.where}: manifest {digest} ({member}) is corrupt: its content hashes to {got}")
    if isinstance(desc.get("size"), int) and desc["size"] != len(body):
        raise InputError(f"{src.where}: manifest {digest} ({member}) is {len(body)} bytes, the descriptor says {desc['size']}")
    media_type = desc.get("mediaType") or media.detect_media_type(body, None)
    return ManifestDoc(digest, media.detect_media_type(body, media_type), body)


def _walk(src: Input, top: ManifestDoc) -> tuple[list[ManifestDoc], list[Blob], list[str]]:
    """Every manifest (children first) and blob under ``top``, and the platforms of an index."""
    manifests: list[ManifestDoc] = []
    blobs: list[Blob] = []
    platforms: list[str] = []
    try:
        info = media.inspect(top.body, top.media_type)
    except PermanentError as err:
        raise InputError(f"{src.where}: manifest {top.digest}: {err}") from None
    for child in info.children:
        doc = _read_verified_manifest(src, dict(child), f"child of {top.digest}")
        sub_manifests, sub_blobs, _ = _walk(src, doc)
        manifests += sub_manifests
        blobs += sub_blobs
        if child.get("platform"):
            platforms.append(media.platform_string(child.get("platform")))
    for blob in media.copyable_blobs(info):
        blobs.append(Blob(blob["digest"], blob["size"], blob["mediaType"], blob_member(blob["digest"])))
    manifests.append(top)
    return manifests, blobs, platforms


def read_oci_layout(src: Input, default_repository: str | None = None) -> list[Entry]:
    """The entries of an OCI image layout; raises InputError naming the file and digest."""
    if not src.exists("oci-layout"):
        raise InputError(f"{src.where}: no oci-layout file: not an OCI image layout")
    try:
        layout = json.loads(src.read("oci-layout"))
        index = json.loads(src.read("index.json"))
    except FileNotFoundError:
        raise InputError(f"{src.where}: index.json is missing: the layout is partial") from None
    except ValueError as err:
        raise InputError(f"{src.where}: oci-layout or index.json is not JSON ({err})") from None
    if not isinstance(layout, dict) or layout.get("imageLayoutVersion") != LAYOUT_VERSION:
        raise InputError(f"{src.where}: unsupported imageLayoutVersion {layout.get('imageLayoutVersion') if isinstance(layout, dict) else layout!r}")
    entries: list[Entry] = []
    for i, desc in enumerate(index.get("manifests") or [] if isinstance(index, dict) else []):
        if not isinstance(desc, dict):
            raise InputError(f"{src.where}: index.json manifests[{i}] is not a descriptor")
        annotations = desc.get("annotations") or {}
        try:
            source = source_from_annotations(annotations, default_repository)
        except InputError as err:
            raise InputError(f"{src.where}: index.json manifests[{i}] ({desc.get('digest')}): {err}") from None
        if source.digest and source.digest != desc.get("digest"):
            raise InputError(
                f"{src.where}: index.json manifests[{i}] names {source} but points at {desc.get('digest')}"
            )
        top = _read_verified_manifest(src, desc, f"index.json manifests[{i}]")
        manifests, blobs, platforms = _walk(src, top)
        entries.append(
            Entry(
                source=reference.Reference(source.host, source.repository, source.tag, top.digest),
                manifests=_unique_manifests(manifests),
                blobs=tuple({b.digest: b for b in blobs}.values()),
                origin=src,
                referrer_of=annotations.get(REFERRER_OF, ""),
                platforms=tuple(platforms),
            )
        )
    if not entries:
        raise InputError(f"{src.where}: index.json lists no images")
    return entries


def _unique_manifests(docs: list[ManifestDoc]) -> tuple[ManifestDoc, ...]:
    return tuple({d.digest: d for d in docs}.values())


# --- reading docker archives ---------------------------------------------------------------------


def read_docker_archive(src: Input) -> list[Entry]:
    """The entries of a ``docker save`` tarball (legacy manifest.json format)."""
    try:
        items = json.loads(src.read("manifest.json"))
    except FileNotFoundError:
        raise InputError(f"{src.where}: no manifest.json: not a docker archive") from None
    except ValueError as err:
        raise InputError(f"{src.where}: manifest.json is not JSON ({err})") from None
    if not isinstance(items, list) or not items:
        raise InputError(f"{src.where}: manifest.json lists no images")
    entries: list[Entry] = []
    for i, item in enumerate(items):
        config_member = item.get("Config") if isinstance(item, dict) else None
        layers = item.get("Layers") if isinstance(item, dict) else None
        if not isinstance(config_member, str) or not isinstance(layers, list):
            raise InputError(f"{src.where}: manifest.json[{i}] has no Config/Layers")
        if not src.exists(config_member):
            raise InputError(f"{src.where}: config {config_member} is missing: the archive is partial")
        config = src.read(config_member)
        config_digest = media.digest_of(config)
        named = Path(config_member).name.removesuffix(".json")
        if len(named) == 64 and all(c in "0123456789abcdef" for c in named) and config_digest != f"sha256:{named}":
            raise InputError(
                f"{src.where}: config sha256:{named} ({config_member}) is corrupt: its content hashes to {config_digest}"
            )
        try:
            diff_ids = json.loads(config)["rootfs"]["diff_ids"]
        except (ValueError, KeyError, TypeError):
            raise InputError(f"{src.where}: config {config_member} has no rootfs.diff_ids") from None
        if len(diff_ids) != len(layers):
            raise InputError(f"{src.where}: manifest.json[{i}] lists {len(layers)} layers, its config {len(diff_ids)}")
        blobs = [Blob(config_digest, len(config), OCI_CONFIG, config_member)]
        for member, diff_id in zip(layers, diff_ids):
            size = src.size(member)
            if size is None:
                raise InputError(f"{src.where}: layer {diff_id} ({member}) is missing: the archive is partial")
            blobs.append(Blob(diff_id, size, OCI_LAYER_TAR, member))
        manifest = {
            "schemaVersion": 2,
            "mediaType": media.OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
            "layers": [{"mediaType": b.media_type, "digest": b.digest, "size": b.size} for b in blobs[1:]],
        }
        body = json.dumps(manifest, separators=(",", ":")).encode()
        doc = ManifestDoc(media.digest_of(body), media.OCI_MANIFEST, body)
        platform = _config_platform(config)
        tags = item.get("RepoTags") or []
        if not tags:
            raise InputError(f"{src.where}: manifest.json[{i}] (config {config_digest}) has no RepoTags: cannot tell its source")
        for tag in tags:
            try:
                source = reference.parse(tag)
            except InvalidReferenceError as err:
                raise InputError(f"{src.where}: RepoTags entry {tag!r}: {err}") from None
            entries.append(
                Entry(
                    source=reference.Reference(source.host, source.repository, source.tag, doc.digest),
                    manifests=(doc,),
                    blobs=tuple(blobs),
                    origin=src,
                    platforms=(platform,) if platform else (),
                )
            )
    return entries


def _config_platform(config: bytes) -> str:
    try:
        doc = json.loads(config)
    except ValueError:
        return ""
    if not isinstance(doc, dict) or not doc.get("os"):
        return ""
    return media.platform_string({"os": doc["os"], "architecture": doc.get("architecture", ""), **({"variant": doc["variant"]} if doc.get("variant") else {})})


# --- finding and reading inputs ------------------------------------------------------------------

_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".oci", ".oci.tar")


def discover(path: Path) -> list[Input]:
    """The inputs under ``path``: itself if it is a layout or a tar file, else its layouts and tar files."""
    if path.is_file():
        return [Input(path)]
    if not path.is_dir():
        raise InputError(f"{path}: no such file or directory")
    if (path / "oci-layout").is_file():
        return [Input(path)]
    found = [
        Input(p)
        for p in sorted(path.iterdir())
        if (p.is_dir() and (p / "oci-layout").is_file()) or (p.is_file() and p.name.endswith(_TAR_SUFFIXES))
    ]
    if not found:
        raise InputError(f"{path}: holds no OCI layout (a folder with oci-layout) and no .tar archive")
    return found


def read_input(src: Input, default_repository: str | None = None) -> list[Entry]:
    """Read one input as an OCI layout (directory or tar) or a docker archive."""
    if src.exists("oci-layout") and src.exists("index.json"):
        return read_oci_layout(src, default_repository)
    if src.is_tar and src.exists("manifest.json"):
        return read_docker_archive(src)
    raise InputError(f"{src.where}: neither an OCI image layout nor a docker archive (no oci-layout, no manifest.json)")


def verify(entries: list[Entry]) -> int:
    """Hash every blob of every entry (once each); returns the bytes read; raises InputError naming
    the file, the member and the digest of the first bad blob."""
    seen: set[tuple[str, str]] = set()
    total = 0
    for entry in entries:
        for blob in entry.blobs:
            key = (entry.origin.where, blob.member)
            if key in seen:
                continue
            seen.add(key)
            total += verify_blob(entry.origin, blob)
    return total


def verify_blob(src: Input, blob: Blob) -> int:
    where = f"{src.where}: blob {blob.digest} ({blob.member})"
    algorithm = blob.digest.split(":", 1)[0]
    if algorithm not in ("sha256", "sha512"):
        raise InputError(f"{where}: unsupported digest algorithm")
    hasher = hashlib.new(algorithm)
    size = 0
    try:
        for chunk in src.chunks(blob.member):
            hasher.update(chunk)
            size += len(chunk)
    except (FileNotFoundError, KeyError):
        raise InputError(f"{where} is missing: the input is partial") from None
    except (OSError, tarfile.TarError, EOFError) as err:
        raise InputError(f"{where} cannot be read ({err}): the input is partial or damaged") from None
    if size != blob.size:
        raise InputError(f"{where} is {size} bytes, the manifest says {blob.size}: truncated or partial")
    got = f"{algorithm}:{hasher.hexdigest()}"
    if got != blob.digest:
        raise InputError(f"{where} is corrupt: its content hashes to {got}")
    return size


# --- writing OCI layouts -------------------------------------------------------------------------


class LayoutWriter:
    """Write (or add to) an OCI image layout at ``root``. Blobs land atomically, verified on write."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        layout = root / "oci-layout"
        if not layout.exists():
            layout.write_text(json.dumps({"imageLayoutVersion": LAYOUT_VERSION}))
        index_path = root / "index.json"
        self.index: dict[str, Any] = {"schemaVersion": 2, "mediaType": media.OCI_INDEX, "manifests": []}
        if index_path.exists():
            self.index = json.loads(index_path.read_text())

    def path(self, digest: str) -> Path:
        return self.root / blob_member(digest)

    def has(self, digest: str, size: int) -> bool:
        p = self.path(digest)
        return p.is_file() and p.stat().st_size == size

    def write_bytes(self, digest: str, data: bytes) -> None:
        with self.sink(digest, len(data)) as f:
            f.write(data)

    @contextmanager
    def sink(self, digest: str, size: int) -> Iterator[IO[bytes]]:
        """A file to write blob ``digest`` to; verified (size and hash) and renamed into place on exit."""
        target = self.path(digest)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".partial-")
        try:
            with os.fdopen(fd, "wb") as f:
                yield f
            algorithm = digest.split(":", 1)[0]
            hasher = hashlib.new(algorithm)
            written = 0
            with open(tmp, "rb") as f:
                while data := f.read(CHUNK):
                    hasher.update(data)
                    written += len(data)
            if written != size or f"{algorithm}:{hasher.hexdigest()}" != digest:
                raise InputError(f"writing blob {digest}: got {written} bytes hashing to {algorithm}:{hasher.hexdigest()}")
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def add(self, descriptor: dict[str, Any]) -> None:
        """Add an index entry, replacing one with the same source annotation."""
        key = (descriptor.get("annotations") or {}).get(SOURCE)
        manifests = [
            d for d in self.index.get("manifests", []) if not key or (d.get("annotations") or {}).get(SOURCE) != key
        ]
        manifests.append(descriptor)
        self.index["manifests"] = manifests

    def save(self) -> None:
        tmp = self.root / ".index.json.partial"
        tmp.write_text(json.dumps(self.index, indent=2, sort_keys=True))
        os.replace(tmp, self.root / "index.json")


def index_descriptor(manifest: ManifestDoc, source: reference.Reference, referrer_of: str = "") -> dict[str, Any]:
    """The ``index.json`` entry for ``manifest`` exported from ``source``."""
    pinned = reference.Reference(source.host, source.repository, source.tag, manifest.digest)
    annotations = {SOURCE: str(pinned)}
    if source.tag:
        annotations[REF_NAME] = source.tag
        annotations[CONTAINERD_NAME] = f"{source.name}:{source.tag}"
    else:
        annotations[CONTAINERD_NAME] = f"{source.name}@{manifest.digest}"
    if referrer_of:
        annotations[REFERRER_OF] = referrer_of
    return {"mediaType": manifest.media_type, "digest": manifest.digest, "size": len(manifest.body), "annotations": annotations}
