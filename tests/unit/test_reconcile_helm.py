"""The component reconciler's helm adapter, its pure parts: the docker-config merge that becomes helm's
``--registry-config``, the scrubbing of helm's stderr before it reaches a status or an Event, and
the temporary/permanent split of helm's failures (real helm messages)."""

from __future__ import annotations

import base64
import json

import pytest

from cluster_registry.errors import ConfigError
from cluster_registry.reconcile import helm


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_docker_configs_merge_first_wins_per_host() -> None:
    first = json.dumps({"auths": {"https://myacr.azurecr.io/v2/": {"auth": b64("a:1")},
                                  "ghcr.io": {"username": "u", "password": "p w"}}}).encode()  # fmt: skip
    second = json.dumps({"auths": {"myacr.azurecr.io": {"auth": b64("b:2")}, "quay.io": {"auth": b64("q:3")}}}).encode()
    legacy = json.dumps({"registry.example:5000": {"auth": b64("l:4"), "email": "x@example"}}).encode()  # .dockercfg
    merged = helm.merge_docker_configs([first, second, legacy, b"[]"])
    assert merged == {"auths": {
        "myacr.azurecr.io": {"auth": b64("a:1")},  # scheme and path dropped; the first Secret wins
        "ghcr.io": {"username": "u", "password": "p w", "auth": b64("u:p w")},  # helm reads `auth`
        "quay.io": {"auth": b64("q:3")},
        "registry.example:5000": {"auth": b64("l:4"), "email": "x@example"},
    }}  # fmt: skip
    assert helm.merge_docker_configs([]) == {"auths": {}}


def test_a_broken_pull_secret_is_a_config_error_that_names_no_secret() -> None:
    with pytest.raises(ConfigError) as err:
        helm.merge_docker_configs([b'{"auths": {"h": {"auth": "c2VjcmV0"'])
    assert "c2VjcmV0" not in str(err.value) and "docker config JSON" in str(err.value)
    assert not err.value.temporary


@pytest.mark.parametrize(("stderr", "kept", "gone"), [
    ("Error: failed to login: password=hunter2 rejected\n", "password=***", "hunter2"),
    ('level=debug msg="auth: dXNlcjpwYXNz"\nError: token: eyJhbGciOi.abc.def expired', "token=***", "eyJhbGciOi"),
    ("first line mentions secret-one\n\nError: unexpected status 401 Unauthorized\n", "401 Unauthorized", "secret-one"),
])  # fmt: skip
def test_scrub_keeps_helms_last_line_without_credentials(stderr: str, kept: str, gone: str) -> None:
    line = helm._scrub(stderr)
    assert kept in line and gone not in line


def test_scrub_bounds_the_message() -> None:
    assert len(helm._scrub("Error: " + "x" * 5000)) == 500
    assert helm._scrub("\n \n") == "helm template failed"


# Real helm 3/4 stderr lines, each with how retrying it can help.
@pytest.mark.parametrize(("message", "temporary"), [
    ('Error: Get "https://store:5000/v2/": dial tcp 127.0.0.1:5000: connect: connection refused', True),
    ('Error: Get "https://store.example/v2/": dial tcp: lookup store.example: no such host', True),
    ("Error: failed to do request: Head \"https://store/v2/c/manifests/1\": net/http: TLS handshake timeout", True),
    ('Error: HEAD "https://store/v2/c/manifests/1": response status code 503: Service Unavailable', True),
    ("Error: failed to authorize: unexpected status: 504 Gateway Timeout", True),
    ("Error: failed to perform \"FetchReference\" on source: response status code 502: Bad Gateway", True),
    ("Error: GET \"https://store/v2/c/manifests/1\": response status code 429: toomanyrequests", True),
    ("Error: read tcp 10.0.0.1:4711->10.0.0.2:443: read: connection reset by peer", True),
    ("Error: oci://store/charts/cnf:9.9.9: not found", False),
    ("Error: failed to authorize: failed to fetch oauth token: unexpected status: 401 Unauthorized", False),
    ("Error: pull access denied, repository does not exist or may require authorization: 403 Forbidden", False),
    ("Error: template: cnf/templates/deployment.yaml:7:20: executing \"cnf/templates/deployment.yaml\" at "
     "<.Values.image.tag>: nil pointer evaluating interface {}.tag", False),
    ("Error: chart requires kubeVersion: >=1.99.0 which is incompatible with Kubernetes v1.35.0", False),
])  # fmt: skip
def test_helm_failures_split_into_temporary_and_permanent(message: str, temporary: bool) -> None:
    assert bool(helm._TEMPORARY.search(message)) is temporary
