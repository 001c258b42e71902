"""Errors of the registry client and copy engine, each temporary or permanent (see ``errors.py``).

Messages name the registry, repository and digest involved and what to do; they never hold a
credential, a token or a request header.
"""

from __future__ import annotations

import json

from cluster_registry.errors import PermanentError, TemporaryError, WriteLockedError

__all__ = [
    "AccessDeniedError",
    "AuthenticationError",
    "CorruptBlobError",
    "NotFoundError",
    "RateLimitedError",
    "RegistryProtocolError",
    "RegistryUnavailableError",
    "TLSError",
    "UnsupportedManifestError",
    "WriteLockedError",
    "error_detail",
]


def error_detail(text: str) -> str:
    """The codes and messages of a distribution error body, else a short excerpt of it."""
    try:
        doc = json.loads(text)
        errors = doc.get("errors") if isinstance(doc, dict) else None
        if isinstance(errors, list) and errors:
            return "; ".join(f"{e.get('code', '')} {e.get('message', '')}".strip() for e in errors if isinstance(e, dict))
    except ValueError:
        pass
    return " ".join(text.split())[:200]


class RegistryUnavailableError(TemporaryError):
    """Connection refused/reset, timeouts or 5xx answers that outlasted the retries."""


class RateLimitedError(TemporaryError):
    """The registry kept answering 429 Too Many Requests."""


class AuthenticationError(PermanentError):
    """401: no credentials, wrong credentials, or the token service refused them."""


class AccessDeniedError(PermanentError):
    """403: the credentials are valid but may not pull (or push) this repository."""


class NotFoundError(PermanentError):
    """The repository, tag, manifest or blob does not exist."""


class CorruptBlobError(PermanentError):
    """Content whose SHA-256 or size differs from its descriptor, even after retrying."""


class UnsupportedManifestError(PermanentError):
    """A manifest media type the engine does not copy (e.g. Docker schema 1)."""


class RegistryProtocolError(PermanentError):
    """A registry answer that breaks the distribution API (unexpected status, missing header)."""


class TLSError(PermanentError):
    """The registry's certificate does not verify: give a CA bundle or list it as insecure."""
