"""Per-namespace pull credentials: derivation, rotation overlap, and forgeries refused."""

import base64
import json

import pytest

from cluster_registry import pullcreds

OLD, NEW = b"o" * 32, b"n" * 32


def test_a_namespace_password_verifies_with_its_key_and_names_the_namespace() -> None:
    secret = pullcreds.password(NEW, "tenant-a")
    assert pullcreds.verify([NEW, OLD], "ns/tenant-a", secret) == "tenant-a"


def test_both_keys_are_accepted_during_a_rotation_and_a_dropped_key_is_not() -> None:
    old_secret = pullcreds.password(OLD, "tenant-a")
    assert pullcreds.verify([NEW, OLD], "ns/tenant-a", old_secret) == "tenant-a"
    assert pullcreds.verify([NEW, b""], "ns/tenant-a", old_secret) is None


@pytest.mark.parametrize(
    ("user", "secret"),
    [
        ("ns/tenant-b", pullcreds.password(NEW, "tenant-a")),  # A's password presented as B
        ("ns/tenant-a", pullcreds.password(b"x" * 32, "tenant-a")),  # derived from a guessed key
        ("ns/tenant-a", ""),
        ("ns/", pullcreds.password(NEW, "")),
        ("tenant-a", pullcreds.password(NEW, "tenant-a")),  # not a pull username at all
        ("push/gc", pullcreds.password(NEW, "gc")),
    ],
)
def test_forged_credentials_authenticate_nobody(user: str, secret: str) -> None:
    assert pullcreds.verify([NEW, OLD], user, secret) is None


def test_passwords_differ_per_namespace_and_per_key() -> None:
    assert pullcreds.password(NEW, "a") != pullcreds.password(NEW, "b")
    assert pullcreds.password(NEW, "a") != pullcreds.password(OLD, "a")


def test_an_empty_key_is_refused() -> None:
    with pytest.raises(ValueError):
        pullcreds.password(b"", "a")


def test_dockerconfigjson_carries_a_credential_the_token_service_accepts() -> None:
    config = json.loads(pullcreds.dockerconfigjson("127.0.0.1:5050", NEW, "tenant-a"))
    entry = config["auths"]["127.0.0.1:5050"]
    user, _, secret = base64.b64decode(entry["auth"]).decode().partition(":")
    assert (user, secret) == (entry["username"], entry["password"])
    assert pullcreds.verify([NEW], user, secret) == "tenant-a"
