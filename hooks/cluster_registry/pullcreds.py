"""Per-namespace pull credentials (pure): derived, never stored in a table.

A namespace's credential is ``ns/<namespace>`` with a password derived from a key the release keeps in
one Secret (``current`` and ``previous``, rotated on a schedule). The token service needs no list of
passwords: it recomputes the password from either key and compares in constant time, so both the old
and the new credential work while the namespaces' Secrets are being rewritten after a rotation.
A password proves the namespace and nothing else; what that namespace may pull is decided per pull.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Iterable

USERNAME_PREFIX = "ns/"
SECRET_TYPE = "kubernetes.io/dockerconfigjson"
KEY_FIELDS = ("current", "previous")  # data keys of the release's key Secret
_CONTEXT = b"cluster-registry pull v1\x00"


def username(namespace: str) -> str:
    return USERNAME_PREFIX + namespace


def namespace_of(user: str) -> str | None:
    """The namespace a pull username names, or None when it is not a pull username."""
    if not user.startswith(USERNAME_PREFIX):
        return None
    namespace = user[len(USERNAME_PREFIX):]
    return namespace or None


def password(key: bytes, namespace: str) -> str:
    if not key:
        raise ValueError("empty pull-credential key")
    digest = hmac.new(key, _CONTEXT + namespace.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def verify(keys: Iterable[bytes], user: str, secret: str) -> str | None:
    """The namespace ``user``/``secret`` authenticates with any of ``keys``, else None."""
    namespace = namespace_of(user)
    if namespace is None:
        return None
    ok = False
    for key in keys:
        if key:  # no early exit: the same work whichever key matches
            ok |= hmac.compare_digest(password(key, namespace), secret)
    return namespace if ok else None


def dockerconfigjson(registry_host: str, key: bytes, namespace: str) -> str:
    """The ``.dockerconfigjson`` of the namespace's pull Secret for ``registry_host``."""
    user, secret = username(namespace), password(key, namespace)
    auth = base64.b64encode(f"{user}:{secret}".encode()).decode()
    entry = {"username": user, "password": secret, "auth": auth}
    return json.dumps({"auths": {registry_host: entry}}, sort_keys=True)
