from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from cluster_registry.errors import ConfigError
from cluster_registry.oci.auth import Credentials, credentials_from_docker_config, parse_challenge, read_credentials_file, scope


def b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


CHALLENGES = [
    (
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/nginx:pull"',
        "bearer",
        {"realm": "https://auth.docker.io/token", "service": "registry.docker.io", "scope": "repository:library/nginx:pull"},
    ),
    ('Basic realm="Registry Realm"', "basic", {"realm": "Registry Realm"}),
    ("Bearer realm=https://x/token,service=reg", "bearer", {"realm": "https://x/token", "service": "reg"}),
    (
        'Bearer realm="https://ghcr.io/token", service="ghcr.io", scope="repository:a/b:pull,push"',
        "bearer",
        {"realm": "https://ghcr.io/token", "service": "ghcr.io", "scope": "repository:a/b:pull,push"},
    ),
    ('Bearer realm="https://h/t",error="insufficient_scope"', "bearer", {"realm": "https://h/t", "error": "insufficient_scope"}),
    ('Bearer realm="a\\"b"', "bearer", {"realm": 'a"b'}),
]


@pytest.mark.parametrize(("header", "scheme", "params"), CHALLENGES)
def test_parse_challenge(header: str, scheme: str, params: dict[str, str]) -> None:
    c = parse_challenge(header)
    assert c is not None
    assert c.scheme == scheme
    assert c.params == params


def test_parse_challenge_empty() -> None:
    assert parse_challenge("") is None


def test_scope() -> None:
    assert scope("a/b", False) == "repository:a/b:pull"
    assert scope("a/b", True) == "repository:a/b:pull,push"


DOCKERCONFIGJSON = json.dumps(
    {
        "auths": {
            "https://index.docker.io/v1/": {"auth": b64("hubuser:hubpass")},
            "ghcr.io": {"username": "gh", "password": "ghp_secret"},
            "http://reg.local:5000/v2/": {"auth": b64("u:p:with:colons")},
            "acr.example.io": {"identitytoken": "refresh-secret"},
            "tok.example.io": {"registrytoken": "bearer-secret"},
        }
    }
)
DOCKERCFG = json.dumps({"reg.local:5000": {"auth": b64("old:style"), "email": "x@y"}})


@pytest.mark.parametrize(
    ("data", "host", "want"),
    [
        (DOCKERCONFIGJSON, "docker.io", Credentials("hubuser", "hubpass")),
        (DOCKERCONFIGJSON, "ghcr.io", Credentials("gh", "ghp_secret")),
        (DOCKERCONFIGJSON, "reg.local:5000", Credentials("u", "p:with:colons")),
        (DOCKERCONFIGJSON, "acr.example.io", Credentials("", token="refresh-secret")),
        (DOCKERCONFIGJSON, "tok.example.io", Credentials("", token="bearer-secret", token_is_bearer=True)),
        (DOCKERCONFIGJSON, "quay.io", None),
        (DOCKERCONFIGJSON, "reg.local", None),  # port matters
        (DOCKERCFG, "reg.local:5000", Credentials("old", "style")),
        (DOCKERCFG.encode(), "reg.local:5000", Credentials("old", "style")),
    ],
)
def test_docker_config(data: str | bytes, host: str, want: Credentials | None) -> None:
    assert credentials_from_docker_config(data, host) == want


@pytest.mark.parametrize("data", ["{not json", "[]", json.dumps({"auths": {"h": {"auth": b64("nocolon")}}})])
def test_docker_config_errors_hide_content(data: str) -> None:
    with pytest.raises(ConfigError) as err:
        credentials_from_docker_config(data, "h")
    assert "nocolon" not in str(err.value)


def test_repr_hides_secrets() -> None:
    for c in (Credentials("user", "hunter2"), Credentials("user", token="tok-secret")):
        text = repr(c) + str(c) + f"{c}" + repr([c])
        assert "hunter2" not in text and "tok-secret" not in text
        assert "user" in text
    assert Credentials().anonymous and not Credentials("u", "p").anonymous
    assert Credentials("u", "p").basic_header() == "Basic " + b64("u:p")


def test_credentials_file_yaml_or_json(tmp_path: Path) -> None:
    for text in ("username: gc\npassword: 1234\n", '{"username": "gc", "password": "1234"}'):
        path = tmp_path / "credentials.yaml"
        path.write_text(text)
        assert read_credentials_file(str(path)) == Credentials("gc", "1234")  # a numeric password stays text


@pytest.mark.parametrize("text", ["username: gc\n", "password: hunter2\n", "- a\n", "username: [unclosed\n", ""])
def test_credentials_file_errors_name_the_file_not_the_secret(tmp_path: Path, text: str) -> None:
    path = tmp_path / "credentials.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        read_credentials_file(str(path))
    assert str(path) in str(err.value) and "hunter2" not in str(err.value)


def test_credentials_file_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the credentials file"):
        read_credentials_file(str(tmp_path / "absent.yaml"))
