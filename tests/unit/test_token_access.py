"""The token service's decisions (gate/access.py) and its JWTs as distribution checks them (gate/tokens.py)."""

from __future__ import annotations

import json

import jwt
import pytest

from cluster_registry.gate import access, tokens
from cluster_registry.gate.access import ANONYMOUS, Caller, Kind, Scope, decide, parse_scopes

REPO = "registry.example.com_5000/team/app"
OTHER = "docker.io/library/nginx"
A = Caller(Kind.NAMESPACE, "team-a")
RECONCILER = Caller(Kind.PUSHER, "artifact-reconciler")
GC = Caller(Kind.PUSHER, "gc")


def grants(caller: Caller, scopes: str, *, shared: bool = False, ready: frozenset[str] = frozenset({REPO}),
           writes_open: bool = True) -> list[str] | str:
    d = decide(caller, parse_scopes([scopes]), shared=shared, ready=ready, writes_open=writes_open)
    return "locked" if d.locked else [f"{g.type}:{g.name}:{','.join(g.actions)}" for g in d.grants]


@pytest.mark.parametrize(("caller", "scopes", "kw", "want"), [
    # isolated (the default): anonymous gets nothing at all
    (ANONYMOUS, f"repository:{REPO}:pull", {}, []),
    (ANONYMOUS, "registry:catalog:*", {}, []),
    # a namespace pulls what is Ready for it, nothing else, never writes or lists
    (A, f"repository:{REPO}:pull", {}, [f"repository:{REPO}:pull"]),
    (A, f"repository:{OTHER}:pull", {}, []),
    (A, f"repository:{REPO}:pull,push", {}, [f"repository:{REPO}:pull"]),
    (A, f"repository:{REPO}:delete", {}, []),
    (A, "registry:catalog:*", {}, []),
    (A, f"repository:{REPO}:pull", {"ready": frozenset()}, []),
    # shared (AOSM): anyone pulls anything and lists; still nobody but pushers writes
    (ANONYMOUS, f"repository:{OTHER}:pull,push", {"shared": True}, [f"repository:{OTHER}:pull"]),
    (ANONYMOUS, "registry:catalog:*", {"shared": True}, ["registry:catalog:*"]),
    (A, f"repository:{OTHER}:pull", {"shared": True}, [f"repository:{OTHER}:pull"]),
    # pushers get their role: reconcilers push, GC deletes and lists but never pushes
    (RECONCILER, f"repository:{OTHER}:pull,push", {}, [f"repository:{OTHER}:pull,push"]),
    (RECONCILER, f"repository:{OTHER}:delete", {}, []),
    (RECONCILER, "registry:catalog:*", {}, []),
    (GC, f"repository:{OTHER}:pull,push repository:{OTHER}:delete", {},
     [f"repository:{OTHER}:pull", f"repository:{OTHER}:delete"]),
    (GC, "registry:catalog:*", {}, ["registry:catalog:*"]),
    (Caller(Kind.PUSHER, "stranger"), f"repository:{OTHER}:pull,push", {}, []),
    # the GC lock: a push is refused as a whole (retry later); GC's deletes and pulls are not pushes
    (RECONCILER, f"repository:{OTHER}:pull,push", {"writes_open": False}, "locked"),
    (Caller(Kind.PUSHER, "sideload"), f"repository:{OTHER}:push", {"writes_open": False}, "locked"),
    (RECONCILER, f"repository:{OTHER}:pull", {"writes_open": False}, [f"repository:{OTHER}:pull"]),
    (GC, f"repository:{OTHER}:pull,push repository:{OTHER}:delete", {"writes_open": False},
     [f"repository:{OTHER}:pull", f"repository:{OTHER}:delete"]),
    (A, f"repository:{REPO}:pull,push", {"writes_open": False}, [f"repository:{REPO}:pull"]),
])  # fmt: skip
def test_decisions(caller: Caller, scopes: str, kw: dict[str, object], want: object) -> None:
    assert grants(caller, scopes, **kw) == want  # type: ignore[arg-type]


def test_scopes_with_a_port_in_the_name_and_junk() -> None:
    got = parse_scopes(["repository:127.0.0.1_5000/a/b:pull,push registry:catalog:*", "nonsense", "repository::pull"])
    assert got == [Scope("repository", "127.0.0.1_5000/a/b", ("pull", "push")), Scope("registry", "catalog", ("*",))]


def artifact(ns: str, name: str, source: str, ready: str | None) -> dict[str, object]:
    status = {"conditions": [{"type": "Ready", "status": ready}]} if ready else {}
    return {"metadata": {"namespace": ns, "name": name}, "spec": {"sourceArtifact": source}, "status": status}


def test_ready_index_follows_artifact_events() -> None:
    idx = access.ReadyIndex()
    src = "registry.example.com:5000/team/app:1.0"
    idx.update("ADDED", artifact("a", "x", src, "True"))
    idx.update("ADDED", artifact("a", "y", src, "True"))  # two Artifacts, same repository
    idx.update("ADDED", artifact("b", "x", src, "False"))
    idx.update("ADDED", artifact("b", "bad", "NOT A REF", "True"))
    assert idx.ready("a") == {REPO} and idx.ready("b") == frozenset()
    idx.update("MODIFIED", artifact("a", "x", src, "False"))
    assert idx.ready("a") == {REPO}, "y is still Ready"
    idx.update("DELETED", artifact("a", "y", src, "True"))
    assert idx.ready("a") == frozenset()
    idx.update("MODIFIED", artifact("b", "x", src, "True"))
    assert idx.ready("b") == {REPO}


def test_jwt_claims_as_distribution_checks_them() -> None:
    signer = tokens.load_signer(tokens.new_private_key_pem(), "issuer-x", "svc-y")
    grant = (Scope("repository", REPO, ("pull",)),)
    token = tokens.issue(signer, "namespace:team-a", grant, ttl=15, now=1_000_000)
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "ES256" and header["kid"] == signer.kid
    doc = json.loads(tokens.jwks(signer.key.public_key()))
    assert [k["kid"] for k in doc["keys"]] == [signer.kid] and "d" not in doc["keys"][0]
    key = jwt.PyJWK(doc["keys"][0]).key
    claims = jwt.decode(token, key, algorithms=["ES256"], audience="svc-y", issuer="issuer-x",
                        options={"verify_exp": False, "verify_nbf": False, "verify_iat": False})  # fmt: skip
    assert claims["sub"] == "namespace:team-a"
    assert claims["access"] == [{"type": "repository", "name": REPO, "actions": ["pull"]}]
    # distribution accepts until exp + its fixed 60 s leeway: that must be exactly the TTL
    assert claims["exp"] + tokens.DISTRIBUTION_LEEWAY == 1_000_000 + 15 and claims["nbf"] == 1_000_000
    other = tokens.load_signer(tokens.new_private_key_pem(), "issuer-x", "svc-y")
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(token, other.key.public_key(), algorithms=["ES256"], audience="svc-y",
                   options={"verify_exp": False})  # fmt: skip


def test_signing_key_must_be_p256() -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from cluster_registry.errors import ConfigError

    rsa_pem = rsa.generate_private_key(65537, 2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    with pytest.raises(ConfigError, match="P-256"):
        tokens.load_signer(rsa_pem, "i", "s")
    with pytest.raises(ConfigError, match="not a PEM"):
        tokens.load_signer(b"garbage", "i", "s")
