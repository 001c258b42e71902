"""Image references: parsing, normalisation and the cluster-registry mapping. Pure functions, no I/O.

Normalisation follows the container runtimes (distribution/reference ``ParseNormalizedNamed`` plus
``TagNameOnly``): a first path component is a registry host only if it holds a ``.`` or ``:``, is
``localhost``, or has upper-case letters; otherwise the host is ``docker.io`` and single-component
Docker Hub names gain ``library/``. A reference with neither tag nor digest gets ``:latest``.

In the cluster registry an image lives at ``<local host>/<source host>/<repository>``. A port or an
IPv6 host cannot stand in a repository path as is, so the source host is encoded into one valid path
component (``host:5000`` -> ``host_5000``; ``[fd00::1]:5000`` -> the exploded address with ``-``,
then ``_5000``), a mapping that :func:`decode_host` reverses.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from dataclasses import dataclass

from cluster_registry.errors import InvalidReferenceError

DOCKER_HUB = "docker.io"
_LEGACY_HUBS = {"index.docker.io", "registry-1.docker.io"}

_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[\w][\w.-]{0,127}")
_DIGEST = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}")
_HOST = re.compile(
    r"(?:(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])(?:\.(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]))*"
    r"|\[[0-9a-fA-F:.]+\])(?::[0-9]+)?"
)
_ENCODED_V6 = re.compile(r"([0-9a-f]{4}(?:-[0-9a-f]{4}){7})(?:_([0-9]+))?")
_ENCODED_PORT = re.compile(r"(.+)_([0-9]+)")
_MAX_NAME = 255


@dataclass(frozen=True)
class Reference:
    """A normalised image reference. ``tag`` and ``digest`` may both be set; at least one is."""

    host: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def name(self) -> str:
        return f"{self.host}/{self.repository}"

    @property
    def suffix(self) -> str:
        """``:tag``, ``@digest`` or both, as written after the name."""
        return (f":{self.tag}" if self.tag else "") + (f"@{self.digest}" if self.digest else "")

    @property
    def pull_ref(self) -> str:
        """What to fetch the manifest by: the digest when pinned, otherwise the tag."""
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        return self.name + self.suffix


def parse(text: str) -> Reference:
    """Parse and normalise ``text`` as a container runtime would; raise InvalidReferenceError."""
    if not text or text != text.strip():
        raise InvalidReferenceError(f"invalid image reference {text!r}: empty or padded with spaces")
    rest, digest = text, None
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        if not _DIGEST.fullmatch(digest) or (digest.startswith("sha256:") and len(digest) != 71):
            raise InvalidReferenceError(f"invalid image reference {text!r}: bad digest {digest!r}")
    tag = None
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > slash:
        rest, tag = rest[:colon], rest[colon + 1 :]
        if not _TAG.fullmatch(tag):
            raise InvalidReferenceError(f"invalid image reference {text!r}: bad tag {tag!r}")
    host, path = _split_host(rest)
    if host in _LEGACY_HUBS:
        host = DOCKER_HUB
    if host == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    if not all(_COMPONENT.fullmatch(c) for c in path.split("/")):
        raise InvalidReferenceError(
            f"invalid image reference {text!r}: repository {path!r} must be lower-case "
            "letters, digits and separators"
        )
    if len(host) + 1 + len(path) > _MAX_NAME:
        raise InvalidReferenceError(f"invalid image reference {text!r}: name longer than {_MAX_NAME}")
    if tag is None and digest is None:
        tag = "latest"
    return Reference(host=host, repository=path, tag=tag, digest=digest)


def _split_host(name: str) -> tuple[str, str]:
    first, sep, remainder = name.partition("/")
    is_host = sep and (any(c in first for c in ".:[") or first == "localhost" or first.lower() != first)
    if not is_host:
        return DOCKER_HUB, name
    if not _HOST.fullmatch(first):
        raise InvalidReferenceError(f"invalid image reference {name!r}: bad registry host {first!r}")
    if first.startswith("["):
        try:
            ipaddress.IPv6Address(first[1 : first.index("]")])
        except ValueError as err:
            raise InvalidReferenceError(f"invalid image reference {name!r}: bad IPv6 host") from err
    return first, remainder


def normalize(text: str) -> str:
    """The fully normalised string form: ``nginx`` -> ``docker.io/library/nginx:latest``."""
    return str(parse(text))


def encode_host(host: str) -> str:
    """Encode a registry host as one repository path component (see the module docstring)."""
    port = ""
    if host.startswith("["):
        end = host.index("]")
        addr, port = host[1:end], host[end + 2 :]
        encoded = ipaddress.IPv6Address(addr).exploded.replace(":", "-")
    else:
        encoded, _, port = host.partition(":")
        encoded = encoded.lower()
    return f"{encoded}_{port}" if port else encoded


def decode_host(component: str) -> str:
    """Reverse :func:`encode_host`."""
    if m := _ENCODED_V6.fullmatch(component):
        addr = ipaddress.IPv6Address(m.group(1).replace("-", ":")).compressed
        return f"[{addr}]:{m.group(2)}" if m.group(2) else f"[{addr}]"
    if m := _ENCODED_PORT.fullmatch(component):
        return f"{m.group(1)}:{m.group(2)}"
    return component


def local_repository(ref: Reference) -> str:
    """The repository, inside the cluster registry, that holds ``ref``'s image."""
    return f"{encode_host(ref.host)}/{ref.repository}"


def rewrite(ref: Reference, local_host: str) -> Reference:
    """Where ``ref`` lives in the cluster registry at ``local_host``, tag and digest kept."""
    return Reference(host=local_host, repository=local_repository(ref), tag=ref.tag, digest=ref.digest)


def is_local(ref: Reference, local_host: str) -> bool:
    return ref.host.lower() == local_host.lower()


def source_of(local: Reference, local_host: str) -> Reference | None:
    """The source a rewritten reference was made from, or None if ``local`` is not one."""
    if not is_local(local, local_host) or "/" not in local.repository:
        return None
    host_part, _, repository = local.repository.partition("/")
    return Reference(host=decode_host(host_part), repository=repository, tag=local.tag, digest=local.digest)


def artifact_name(source: str) -> str:
    """A deterministic DNS-1123 name (at most 63 characters) for the Artifact of ``source``.

    ``source`` must already be normalised; the hash keeps distinct sources apart after the readable
    part is trimmed.
    """
    readable = re.sub(r"[^a-z0-9]+", "-", source.lower()).strip("-")[:50].strip("-")
    digest = hashlib.sha256(source.encode()).hexdigest()[:12]
    return f"{readable}-{digest}" if readable else f"image-{digest}"
