from __future__ import annotations

import email.message

import pytest

from cluster_registry.errors import WriteLockedError
from cluster_registry.oci import blobio
from cluster_registry.oci.errors import (
    AuthenticationError,
    CorruptBlobError,
    NotFoundError,
    RateLimitedError,
    RegistryProtocolError,
    RegistryUnavailableError,
)


def headers(**kw: str) -> email.message.Message:
    m = email.message.Message()
    for k, v in kw.items():
        m[k.replace("_", "-")] = v
    return m


@pytest.mark.parametrize(
    ("status", "hdrs", "body", "error", "temporary"),
    [
        (503, {"X_Cluster_Registry_Lock": "gc"}, b"", WriteLockedError, True),
        (503, {"X_Cluster_Registry_Lock": "unknown"}, b"", WriteLockedError, True),
        (503, {}, b"", RegistryUnavailableError, True),
        (500, {}, b"oops", RegistryUnavailableError, True),
        (429, {"Retry_After": "3"}, b"", RateLimitedError, True),
        (401, {}, b"", AuthenticationError, False),
        (404, {}, b'{"errors":[{"code":"BLOB_UNKNOWN"}]}', NotFoundError, False),
        (400, {}, b'{"errors":[{"code":"DIGEST_INVALID"}]}', CorruptBlobError, False),
        (400, {}, b"bad", RegistryProtocolError, False),
    ],
)
def test_status_errors(status: int, hdrs: dict[str, str], body: bytes, error: type[Exception], temporary: bool) -> None:
    err = blobio._status_error(status, "Reason", headers(**hdrs), "push blob h/r@sha256:x", body)  # type: ignore[arg-type]
    assert type(err) is error
    assert err.temporary is temporary
    assert "h/r@sha256:x" in str(err)
    if status == 429:
        assert getattr(err, "retry_after") == 3.0


def test_transport_errors_name_no_url() -> None:
    err = blobio._transport_error(ConnectionResetError(104, "Connection reset by peer"), "get blob h/r@d", "download")
    assert isinstance(err, RegistryUnavailableError) and err.temporary
    assert "Connection reset by peer" in str(err)
