"""Manifest media types and pure manifest inspection (no I/O)."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, NotRequired, TypedDict

from cluster_registry.oci.errors import CorruptBlobError, UnsupportedManifestError

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"

IMAGE_MANIFESTS = frozenset({DOCKER_MANIFEST, OCI_MANIFEST})
INDEXES = frozenset({DOCKER_MANIFEST_LIST, OCI_INDEX})
MANIFESTS = IMAGE_MANIFESTS | INDEXES
#: The Accept header of every manifest request.
ACCEPT = ", ".join([OCI_INDEX, DOCKER_MANIFEST_LIST, OCI_MANIFEST, DOCKER_MANIFEST])

#: Layers that registries must not redistribute (Windows base layers); never copied.
FOREIGN_LAYERS = frozenset(
    {
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
        "application/vnd.oci.image.layer.nondistributable.v1.tar",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    }
)

_DIGEST = re.compile(r"(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})")


class Platform(TypedDict, total=False):
    architecture: str
    os: str
    variant: str


class Descriptor(TypedDict):
    """An OCI/Docker content descriptor as found in manifests (wire format)."""

    mediaType: str
    digest: str
    size: int
    platform: NotRequired[Platform]
    annotations: NotRequired[dict[str, str]]
    urls: NotRequired[list[str]]
    artifactType: NotRequired[str]


@dataclass(frozen=True)
class ManifestInfo:
    """What the copy engine needs to know about one manifest."""

    media_type: str
    blobs: tuple[Descriptor, ...] = ()  # config first, then layers (image manifests)
    children: tuple[Descriptor, ...] = ()  # platform manifests (indexes)
    subject: Descriptor | None = None
    artifact_type: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEXES


def digest_of(body: bytes, algorithm: str = "sha256") -> str:
    return f"{algorithm}:{hashlib.new(algorithm, body).hexdigest()}"


def check_digest(digest: str) -> str:
    """Return ``digest`` if it is a well-formed sha256/sha512 digest, else raise."""
    if not _DIGEST.fullmatch(digest):
        raise UnsupportedManifestError(f"unsupported or malformed digest {digest!r}")
    return digest


def verify_manifest(body: bytes, digest: str, where: str) -> None:
    """Raise CorruptBlobError unless ``body`` hashes to ``digest``."""
    algorithm = check_digest(digest).split(":", 1)[0]
    got = digest_of(body, algorithm)
    if got != digest:
        raise CorruptBlobError(f"manifest {where} has digest {got}, expected {digest}: the registry served corrupt data")


def document(body: bytes) -> dict[str, Any]:
    """The manifest's JSON object."""
    try:
        doc = json.loads(body)
    except ValueError as err:
        raise UnsupportedManifestError(f"manifest is not JSON ({err})") from err
    if not isinstance(doc, dict):
        raise UnsupportedManifestError("manifest is not a JSON object")
    return doc


def detect_media_type(body: bytes, content_type: str | None) -> str:
    """The manifest's media type: its own ``mediaType`` field, else the Content-Type header."""
    return media_type_of(document(body), content_type)


def media_type_of(doc: dict[str, Any], content_type: str | None) -> str:
    """The media type of the manifest ``doc``: its ``mediaType`` field, else the Content-Type header, else its shape."""
    declared = doc.get("mediaType")
    ctype = (content_type or "").split(";", 1)[0].strip()
    if isinstance(declared, str) and declared:
        return declared
    if ctype in MANIFESTS:
        return ctype
    # OCI allows omitting mediaType; tell image from index by shape.
    if "manifests" in doc:
        return OCI_INDEX
    if "layers" in doc and "config" in doc:
        return OCI_MANIFEST
    if doc.get("schemaVersion") == 1:
        return DOCKER_SCHEMA1
    raise UnsupportedManifestError(f"cannot tell the manifest type (Content-Type {ctype!r})")


def _descriptor(raw: Any, where: str) -> Descriptor:
    if (
        not isinstance(raw, dict)
        or not isinstance(raw.get("digest"), str)
        or not isinstance(raw.get("size"), int)
        or raw["size"] < 0
    ):
        raise UnsupportedManifestError(f"malformed descriptor in {where}")
    check_digest(raw["digest"])
    raw.setdefault("mediaType", "")
    return raw  # type: ignore[return-value]


def inspect(body: bytes, media_type: str, doc: dict[str, Any] | None = None) -> ManifestInfo:
    """Parse a manifest of ``media_type`` into the descriptors it references (``doc``: its JSON, when
    already parsed)."""
    if media_type in (DOCKER_SCHEMA1, DOCKER_SCHEMA1_SIGNED):
        raise UnsupportedManifestError(
            "Docker schema 1 manifests are not supported (deprecated since 2017): rebuild or re-push the image"
        )
    if media_type not in MANIFESTS:
        raise UnsupportedManifestError(f"unsupported manifest media type {media_type!r}")
    doc = json.loads(body) if doc is None else doc
    subject = _descriptor(doc["subject"], "subject") if "subject" in doc else None
    artifact_type = doc.get("artifactType") if isinstance(doc.get("artifactType"), str) else None
    if media_type in INDEXES:
        children = tuple(_descriptor(d, "index") for d in doc.get("manifests") or [])
        return ManifestInfo(media_type, children=children, subject=subject, artifact_type=artifact_type)
    if "config" not in doc:
        raise UnsupportedManifestError("image manifest without config")
    blobs = [_descriptor(doc["config"], "config")]
    blobs += [_descriptor(d, "layers") for d in doc.get("layers") or []]
    if artifact_type is None and isinstance(doc["config"].get("mediaType"), str):
        if doc["config"]["mediaType"] not in (
            "application/vnd.docker.container.image.v1+json",
            "application/vnd.oci.image.config.v1+json",
        ):
            artifact_type = doc["config"]["mediaType"]
    return ManifestInfo(media_type, blobs=tuple(blobs), subject=subject, artifact_type=artifact_type)


def copyable_blobs(info: ManifestInfo) -> list[Descriptor]:
    """The blobs to copy: every one except non-distributable (foreign) layers."""
    return [d for d in info.blobs if d["mediaType"] not in FOREIGN_LAYERS or not d.get("urls")]


def platform_string(p: Platform | None) -> str:
    if not p:
        return "unknown"
    s = f"{p.get('os', 'unknown')}/{p.get('architecture', 'unknown')}"
    return f"{s}/{p['variant']}" if p.get("variant") else s


def attached_tag_prefix(digest: str) -> str:
    """The tag prefix cosign and the OCI referrers tag schema use for ``digest``: ``sha256-<hex>``."""
    return digest.replace(":", "-", 1)


def is_attached_tag(tag: str, digest: str) -> bool:
    """``sha256-<hex>`` (referrers fallback) or ``sha256-<hex>.<suffix>`` (cosign .sig/.att/.sbom)."""
    prefix = attached_tag_prefix(digest)
    return tag == prefix or (tag.startswith(prefix + ".") and len(tag) > len(prefix) + 1)
