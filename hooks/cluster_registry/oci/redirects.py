"""Which redirects a registry may send us to (a pure policy, and the resolving check the followers call).

A registry is untrusted: its redirect could point a reconciler inside the cluster at an address only
the cluster can reach and copy the answer into an Artifact. Refused:

* any scheme but http and https, and https -> http (a downgrade exposes the request and the blob);
* loopback, link-local (which holds the clouds' metadata services, 169.254.169.254 and fe80::/10),
  unspecified and multicast addresses, and the metadata services' names and other addresses;

unless the target is the same host as the request being redirected (a registry on loopback that
redirects to itself) or a host the operator listed (``allowed``: its cluster-internal registries).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable
from urllib.parse import urlsplit

from cluster_registry.oci.errors import RegistryProtocolError

METADATA_HOSTS = frozenset({"metadata", "metadata.google.internal", "metadata.goog", "instance-data"})
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200", "169.254.170.2")
)

Resolver = Callable[[str], Iterable[str]]


def _host(url: str) -> str:
    return (urlsplit(url).hostname or "").lower().rstrip(".")


def _netloc(url: str) -> str:
    return urlsplit(url).netloc.lower()


def refusal(current: str, target: str, addresses: Iterable[str], allowed: frozenset[str] = frozenset()) -> str | None:
    """Why a redirect from URL ``current`` to URL ``target`` (resolving to ``addresses``) is refused, or None."""
    scheme, was = urlsplit(target).scheme.lower(), urlsplit(current).scheme.lower()
    if scheme not in ("http", "https"):
        return f"to a {scheme or 'relative'}: URL"
    if was == "https" and scheme == "http":
        return "from https to plain http"
    host = _host(target)
    if host == _host(current) or host in allowed or _netloc(target) in allowed:
        return None
    if host in METADATA_HOSTS or host == "localhost" or host.endswith(".localhost"):
        return f"to {host}"
    for text in addresses:
        try:
            ip = ipaddress.ip_address(text.split("%", 1)[0])
        except ValueError:
            continue
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if ip in METADATA_ADDRESSES:
            return f"to a metadata service address ({ip})"
        if ip.is_loopback or ip.is_link_local or ip.is_unspecified or ip.is_multicast:
            return f"to an internal address ({ip})"
    return None


def resolve(host: str) -> list[str]:
    """Every address ``host`` resolves to (an IP literal: itself; unresolvable: none, the connect fails)."""
    try:
        return sorted({str(info[4][0]) for info in socket.getaddrinfo(host, None)})
    except (OSError, UnicodeError):
        return []


def check(current: str, target: str, allowed: frozenset[str] = frozenset(), resolver: Resolver = resolve) -> None:
    """Raise RegistryProtocolError when the redirect from ``current`` to ``target`` is refused."""
    host = _host(target)
    addresses = [] if host == _host(current) or host in allowed else list(resolver(host))
    why = refusal(current, target, addresses, allowed)
    if why is not None:
        raise RegistryProtocolError(f"{_netloc(current)} redirected {why}: refused")
