"""The one mapping from a registry's answer to an error, used by the client and the blob threads."""

from __future__ import annotations

import email
import http.client
import json

import pytest

from cluster_registry.errors import ClusterRegistryError, WriteLockedError
from cluster_registry.oci.errors import (
    AccessDeniedError,
    AuthenticationError,
    CorruptBlobError,
    NotFoundError,
    RateLimitedError,
    RegistryProtocolError,
    RegistryUnavailableError,
    status_error,
)


def headers(**fields: str) -> http.client.HTTPMessage:
    text = "".join(f"{k.replace('_', '-')}: {v}\r\n" for k, v in fields.items())
    return email.message_from_string(text, _class=http.client.HTTPMessage)


def body(code: str, message: str) -> bytes:
    return json.dumps({"errors": [{"code": code, "message": message}]}).encode()


def err(
    status: int, hdrs: http.client.HTTPMessage | None = None, data: bytes = b"", user: str = "", push: bool = False
) -> ClusterRegistryError:
    return status_error(status, hdrs or headers(), data, "get blob r.example/app@sha256:ab",
                        host="r.example", where="r.example/app", user=user, push=push)


@pytest.mark.parametrize(
    ("status", "data", "kind", "temporary"),
    [
        (500, b"", RegistryUnavailableError, True),
        (502, b"<html>bad gateway</html>", RegistryUnavailableError, True),
        (404, body("BLOB_UNKNOWN", "blob unknown to registry"), NotFoundError, False),
        (400, body("DIGEST_INVALID", "provided digest did not match uploaded content"), CorruptBlobError, False),
        (400, body("SIZE_INVALID", "provided length did not match content length"), CorruptBlobError, False),
        (400, body("NAME_INVALID", "invalid repository name"), RegistryProtocolError, False),
        (409, b"", RegistryProtocolError, False),
    ],
)
def test_status_maps_to_a_classified_error(status: int, data: bytes, kind: type[Exception], temporary: bool) -> None:
    e = err(status, data=data)
    assert type(e) is kind
    assert e.temporary is temporary
    assert str(e).startswith("get blob r.example/app@sha256:ab: ")
    if data.startswith(b"{"):
        assert json.loads(data)["errors"][0]["code"] in str(e)  # the registry's own code, for the user


def test_401_names_whom_it_refused_never_a_secret() -> None:
    anonymous = err(401, headers(WWW_Authenticate='Bearer realm="https://auth/token",service="r"'))
    assert isinstance(anonymous, AuthenticationError) and "anonymous access" in str(anonymous)
    user = err(401, user="robot")
    assert "user 'robot'" in str(user) and "check the pull secret" in str(user)
    assert "Bearer" not in str(anonymous)


def test_403_says_whether_a_push_or_a_pull_was_denied() -> None:
    assert "not allowed to pull from r.example/app" in str(err(403))
    pushed = err(403, push=True)
    assert isinstance(pushed, AccessDeniedError) and "not allowed to push to r.example/app" in str(pushed)


def test_429_keeps_retry_after() -> None:
    e = err(429, headers(Retry_After="7"))
    assert isinstance(e, RateLimitedError) and e.temporary
    assert e.retry_after == 7
    plain = err(429)
    assert isinstance(plain, RateLimitedError) and plain.retry_after is None


@pytest.mark.parametrize(("lock", "says"), [("gc", "while garbage collection runs"), ("unknown", "cannot confirm")])
def test_503_with_the_gate_header_is_the_write_lock(lock: str, says: str) -> None:
    e = err(503, headers(**{"X_Cluster_Registry_Lock": lock}))
    assert isinstance(e, WriteLockedError) and says in str(e)
    assert isinstance(err(503), RegistryUnavailableError)  # a plain 503 is an outage, not the lock
