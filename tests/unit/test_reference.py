from __future__ import annotations

import pytest

from cluster_registry import reference as R
from cluster_registry.errors import InvalidReferenceError

D = "sha256:" + "ab" * 32

NORMALISE = [
    ("nginx", "docker.io/library/nginx:latest"),
    ("nginx:1.25", "docker.io/library/nginx:1.25"),
    ("library/nginx", "docker.io/library/nginx:latest"),
    ("bitnami/redis:7", "docker.io/bitnami/redis:7"),
    ("index.docker.io/library/nginx", "docker.io/library/nginx:latest"),
    ("docker.io/nginx", "docker.io/library/nginx:latest"),
    ("myacr.azurecr.io/nginx:1.0.0", "myacr.azurecr.io/nginx:1.0.0"),
    ("localhost/app", "localhost/app:latest"),
    ("localhost:5000/app:v1", "localhost:5000/app:v1"),
    ("host:5000/a/b@" + D, "host:5000/a/b@" + D),
    ("host:5000/a/b:1.0@" + D, "host:5000/a/b:1.0@" + D),
    ("nginx@" + D, "docker.io/library/nginx@" + D),
    ("[::1]:5000/repo:tag", "[::1]:5000/repo:tag"),
    ("[fd00::1]/x/y", "[fd00::1]/x/y:latest"),
    ("127.0.0.1:5001/a-b/c__d/e.f:T_1.0-x", "127.0.0.1:5001/a-b/c__d/e.f:T_1.0-x"),
    ("ghcr.io/org/team/app:sha-abc", "ghcr.io/org/team/app:sha-abc"),
]


@pytest.mark.parametrize(("text", "want"), NORMALISE)
def test_normalise(text: str, want: str) -> None:
    assert R.normalize(text) == want
    assert R.normalize(want) == want  # idempotent


@pytest.mark.parametrize(
    "text",
    [
        "",
        " nginx",
        "Nginx",  # upper case in a Docker Hub repository
        "host/UPPER",
        "nginx:",
        "nginx:-bad",
        "nginx@sha256:abc",
        "nginx@sha256:" + "g" * 64,
        "a//b",
        "host:5000/",
        "[zz::1]:5000/x",
        "a/" + "b" * 300,
        "nginx:" + "t" * 129,
    ],
)
def test_invalid(text: str) -> None:
    with pytest.raises(InvalidReferenceError) as err:
        R.parse(text)
    assert "invalid image reference" in str(err.value)


@pytest.mark.parametrize(
    ("source", "want"),
    [
        ("myacr.azurecr.io/nginx:1.0.0", "reg.local:5000/myacr.azurecr.io/nginx:1.0.0"),
        ("nginx", "reg.local:5000/docker.io/library/nginx:latest"),
        ("host:5000/a/b@" + D, "reg.local:5000/host_5000/a/b@" + D),
        ("[::1]:5000/r:t", "reg.local:5000/0000-0000-0000-0000-0000-0000-0000-0001_5000/r:t"),
        ("[fd00::2]/r:t", "reg.local:5000/fd00-0000-0000-0000-0000-0000-0000-0002/r:t"),
    ],
)
def test_rewrite_roundtrip(source: str, want: str) -> None:
    ref = R.parse(source)
    local = R.rewrite(ref, "reg.local:5000")
    assert str(local) == want
    assert R.parse(want) == local  # the rewritten form is itself a valid reference
    assert R.is_local(local, "reg.local:5000")
    assert R.source_of(local, "reg.local:5000") == ref
    assert R.source_of(ref, "reg.local:5000") is None


def test_pull_ref_prefers_digest() -> None:
    assert R.parse("a.io/x:1@" + D).pull_ref == D
    assert R.parse("a.io/x:1").pull_ref == "1"


def test_artifact_name_is_dns1123_and_distinct() -> None:
    import re

    names = {R.artifact_name(R.normalize(s)) for s, _ in NORMALISE}
    assert len(names) == len({R.normalize(s) for s, _ in NORMALISE})
    for n in names:
        assert len(n) <= 63 and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", n), n
    long = R.artifact_name("a.io/" + "x" * 200 + ":1")
    assert len(long) <= 63
