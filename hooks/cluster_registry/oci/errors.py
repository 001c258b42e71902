"""Errors of the registry client and copy engine, each temporary or permanent (see ``errors.py``).

Messages name the registry, repository and digest involved and what to do; they never hold a
credential, a token or a request header.
"""

from __future__ import annotations

import http.client
import json
import re
import time

from cluster_registry.errors import ClusterRegistryError, PermanentError, TemporaryError, WriteLockedError
from cluster_registry.gate.protocol import LOCK_HEADER
from cluster_registry.oci.retry import parse_retry_after

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
    "UnsupportedOperationError",
    "WriteLockedError",
    "describe",
    "error_detail",
    "status_error",
]


_CODE = re.compile(r"[A-Z][A-Z0-9_]{0,63}")


def error_detail(text: str) -> str:
    """The codes and messages of a distribution error body (at most 3, each message cut at 200
    characters), else nothing: any other body (an HTML page, an internal service's answer behind a
    redirect) is never copied into a message, which ends up in Artifact status and Events."""
    try:
        doc = json.loads(text)
    except ValueError:
        return ""
    errors = doc.get("errors") if isinstance(doc, dict) else None
    if not isinstance(errors, list):
        return ""
    parts = []
    for e in errors[:3]:
        code = e.get("code") if isinstance(e, dict) else None
        if not isinstance(code, str) or not _CODE.fullmatch(code):
            continue
        message = " ".join(str(e.get("message") or "").split())[:200]
        parts.append(f"{code} {message if message.isprintable() else ''}".strip())
    return "; ".join(parts)


def describe(err: BaseException) -> str:
    """A credential-free description of a transport error (no URL, no header)."""
    if isinstance(err, TimeoutError):
        return "timed out"
    if isinstance(err, OSError) and err.strerror:
        return f"{type(err).__name__}: {err.strerror}"
    return type(err).__name__


class RegistryUnavailableError(TemporaryError):
    """Connection refused/reset, timeouts or 5xx answers that outlasted the retries."""


class RateLimitedError(TemporaryError):
    """The registry kept answering 429 Too Many Requests; ``retry_after``: the seconds it asked for, if any."""

    def __init__(self, message: str, *, retry_after: float | None = None, detail: str = "") -> None:
        super().__init__(message, detail=detail)
        self.retry_after = retry_after


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


class UnsupportedOperationError(RegistryProtocolError):
    """405: the registry does not allow this operation (e.g. deletes switched off)."""


class TLSError(PermanentError):
    """The registry's certificate does not verify: give a CA bundle or list it as insecure."""


def status_error(
    status: int,
    headers: http.client.HTTPMessage,
    body: bytes,
    what: str,
    *,
    host: str,
    where: str,
    user: str = "",
    push: bool = False,
) -> ClusterRegistryError:
    """The error for an answer ``status`` to ``what`` (at ``where``, a repository of ``host``).

    ``user`` names whom a 401 refused ("" for anonymous access); ``push`` says whether a 403 denied
    a push or a pull. A 429's ``Retry-After`` is kept as ``retry_after`` (seconds, or None).
    """
    detail = error_detail(body[:2048].decode("utf-8", "replace"))
    suffix = f": {detail}" if detail else ""
    if status == 503 and headers.get(LOCK_HEADER):
        if headers.get(LOCK_HEADER, "").lower() == "gc":
            return WriteLockedError(
                f"{what}: the cluster registry {host} is read-only while garbage collection runs; "
                "the write will be retried when the lock is released"
            )
        return WriteLockedError(
            f"{what}: the cluster registry {host} holds writes back: it cannot confirm the "
            "garbage-collection lock is free; the write will be retried"
        )
    if status == 429:
        return RateLimitedError(
            f"{what}: registry {host} answered HTTP 429 Too Many Requests",
            retry_after=parse_retry_after(headers.get("Retry-After"), time.time()),
        )
    if status >= 500:
        return RegistryUnavailableError(f"{what}: registry {host} answered HTTP {status}{suffix}")
    if status == 401:
        who = f"user {user!r}" if user else "anonymous access"
        return AuthenticationError(f"{what}: registry {host} refused {who}{suffix}; check the pull secret or credentials")
    if status == 403:
        return AccessDeniedError(f"{what}: not allowed to {'push to' if push else 'pull from'} {where}{suffix}")
    if status == 404:
        return NotFoundError(f"{what}: not found in {where}{suffix}")
    if status == 405:
        return UnsupportedOperationError(f"{what}: registry {host} does not allow this (HTTP 405){suffix}")
    if status == 400 and ("DIGEST_INVALID" in detail or "SIZE_INVALID" in detail):
        return CorruptBlobError(f"{what}: {where} rejected the content{suffix}")
    return RegistryProtocolError(f"{what}: registry {host} answered HTTP {status}{suffix}")
