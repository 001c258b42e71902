"""A real distribution with ``auth: token`` (JWKS) and our token service as its realm, on loopback.

The token service runs in-process with fixed sources (a pull key, the pushers' passwords, which
namespace has what Ready) instead of the cluster; the lock state is driven through ``GateState``
(the Lease watch and the drain ack run end to end in tests/e2e/test_gc_lock.py).
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone

import pytest

from cluster_registry import pullcreds
from cluster_registry.errors import WriteLockedError
from cluster_registry.gate import tokens
from cluster_registry.gate.access import Scope
from cluster_registry.gate.protocol import LOCK_HEADER, LeaseView
from cluster_registry.oci import Credentials, RegistryOptions, RegistrySession
from tests.support.ociimages import HTTPError, Pusher, push_image
from tests.support.registry import free_port
from tests.support.tokenfront import LocalFront, local_front

PULL_KEY = b"pull-key-for-tests"
PUSHERS = {"artifact-reconciler": "reconciler-pw", "gc": "gc-pw"}
REPO_A = "source.example_5000/team-a/app"  # Ready for namespace a only
REPO_B = "source.example_5000/team-b/private"  # Ready for namespace b only
NODE_REALM = f"http://127.0.0.1:{free_port()}/token"


@dataclass
class Sources:
    keys: list[bytes] = field(default_factory=lambda: [PULL_KEY])
    ready_by_ns: dict[str, frozenset[str]] = field(
        default_factory=lambda: {"a": frozenset({REPO_A}), "b": frozenset({REPO_B})})

    def pull_keys(self) -> list[bytes]:
        return self.keys

    def pusher_password(self, component: str) -> str | None:
        return PUSHERS.get(component)

    def ready(self, namespace: str) -> frozenset[str]:
        return self.ready_by_ns.get(namespace, frozenset())

    def synced(self) -> bool:
        return True


Front = LocalFront[Sources]


def ns_creds(namespace: str) -> tuple[str, str]:
    return pullcreds.username(namespace), pullcreds.password(PULL_KEY, namespace)


@pytest.fixture(scope="module")
def front(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Front]:
    # distribution names the realm as nodes reach it (the node proxy's loopback port): nothing listens
    # there in this test, so every client below must be told the realm pods use, as the chart does.
    with local_front(tmp_path_factory.mktemp("token-front"), Sources(), shared=False, named_realm=NODE_REALM) as f:
        for repo in (REPO_A, REPO_B):
            push_image(Pusher(f.registry.host, auth=("artifact-reconciler", PUSHERS["artifact-reconciler"]), realm=f.realm),
                       repo, "1.0", layers=[2048], seed=len(repo))  # fmt: skip
        yield f


def options(f: Front) -> RegistryOptions:
    """The copy engine's options as the chart's components get them ($CLUSTER_REGISTRY_TOKEN_REALMS)."""
    return RegistryOptions(insecure_hosts=frozenset({f.registry.host}), token_realms={NODE_REALM: f.realm})


def get_token(f: Front, scope: str, creds: tuple[str, str] | None = None) -> tuple[int, dict[str, str], dict[str, object]]:
    req = urllib.request.Request(f"{f.realm}?service=cluster-registry&scope={urllib.parse.quote(scope)}")
    if creds:
        req.add_header("Authorization", "Basic " + base64.b64encode(":".join(creds).encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), {}


def registry_get(f: Front, path: str, token: str | None) -> int:
    req = urllib.request.Request(f"{f.registry.url}{path}", headers={"Authorization": f"Bearer {token}"} if token else {})
    req.add_header("Accept", "application/vnd.oci.image.manifest.v1+json")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code


def pull_with(f: Front, creds: tuple[str, str] | None, repo: str) -> int:
    code, _, body = get_token(f, f"repository:{repo}:pull", creds)
    if code != 200:
        return code
    return registry_get(f, f"/v2/{repo}/manifests/1.0", str(body["token"]))


def test_anonymous_gets_nothing(front: Front) -> None:
    assert registry_get(front, f"/v2/{REPO_A}/manifests/1.0", None) == 401
    assert pull_with(front, None, REPO_A) == 401, "an anonymous token grants nothing"
    code, _, body = get_token(front, "registry:catalog:*")
    assert code == 200 and registry_get(front, "/v2/_catalog", str(body["token"])) == 401
    assert registry_get(front, f"/v2/{REPO_A}/tags/list", str(body["token"])) == 401


def test_a_namespace_pulls_only_what_is_ready_for_it(front: Front) -> None:
    assert pull_with(front, ns_creds("a"), REPO_A) == 200
    assert pull_with(front, ns_creds("a"), REPO_B) == 401, "a cannot pull b's private image"
    assert pull_with(front, ns_creds("b"), REPO_B) == 200
    user, _ = ns_creds("a")
    assert pull_with(front, (user, ns_creds("b")[1]), REPO_A) == 401, "b's password does not prove a"
    assert get_token(front, f"repository:{REPO_A}:pull", (user, "wrong"))[0] == 401
    code, _, body = get_token(front, "registry:catalog:*", ns_creds("a"))
    assert code == 200 and registry_get(front, "/v2/_catalog", str(body["token"])) == 401
    # A's token cannot be reused against B's repository either (by tag or by digest)
    _, _, body = get_token(front, f"repository:{REPO_A}:pull", ns_creds("a"))
    assert registry_get(front, f"/v2/{REPO_B}/manifests/1.0", str(body["token"])) == 401
    # a namespace cannot push, even to a repository it may pull
    with pytest.raises(HTTPError) as refused:
        push_image(Pusher(front.registry.host, auth=ns_creds("a"), realm=front.realm), REPO_A, "evil", layers=[64], seed=99)
    assert refused.value.status == 401


def test_forged_expired_and_foreign_tokens_are_refused(front: Front) -> None:
    grant = (Scope("repository", REPO_B, ("pull",)),)
    other = tokens.load_signer(tokens.new_private_key_pem(), front.signer.issuer, front.signer.service)
    assert registry_get(front, f"/v2/{REPO_B}/manifests/1.0", tokens.issue(other, "x", grant, 60, time.time())) == 401
    expired = tokens.issue(front.signer, "x", grant, 10, time.time() - 30)
    assert registry_get(front, f"/v2/{REPO_B}/manifests/1.0", expired) == 401, "dead 20 s ago, leeway included"
    live = tokens.issue(front.signer, "x", grant, 60, time.time())
    assert registry_get(front, f"/v2/{REPO_B}/manifests/1.0", live) == 200, "the same grant, properly signed, works"
    wrong_aud = tokens.issue(tokens.Signer(front.signer.key, front.signer.kid, front.signer.issuer, "elsewhere"),
                             "x", grant, 60, time.time())  # fmt: skip
    assert registry_get(front, f"/v2/{REPO_B}/manifests/1.0", wrong_aud) == 401
    header, claims, sig = live.split(".")
    doc = json.loads(base64.urlsafe_b64decode(claims + "=="))
    doc["access"][0]["name"] = REPO_A
    tampered = ".".join([header, base64.urlsafe_b64encode(json.dumps(doc).encode()).rstrip(b"=").decode(), sig])
    assert registry_get(front, f"/v2/{REPO_A}/manifests/1.0", tampered) == 401


def test_pushers_push_and_gc_deletes_and_lists(front: Front) -> None:
    image = push_image(Pusher(front.registry.host, auth=("artifact-reconciler", PUSHERS["artifact-reconciler"]), realm=front.realm),
                       "local/pushed", "v1", layers=[1024], seed=5)  # fmt: skip
    with pytest.raises(HTTPError) as refused:
        push_image(Pusher(front.registry.host, auth=("gc", PUSHERS["gc"]), realm=front.realm), "local/pushed", "v2", layers=[64], seed=6)
    assert refused.value.status == 401, "GC never pushes"

    async def gc_side() -> tuple[list[str], bool]:
        async with RegistrySession(options(front)) as s:
            creds = Credentials("gc", PUSHERS["gc"])
            repos = await s.catalog(front.registry.host, creds)
            deleted = await s.repository(front.registry.host, "local/pushed", creds, push=True).delete_manifest(image.digest)
            return repos, deleted

    repos, deleted = asyncio.run(gc_side())
    assert "local/pushed" in repos and deleted


def test_no_push_token_while_gc_holds_the_lock(front: Front) -> None:
    front.state.observe(LeaseView("gc", "gc-gen-1", datetime.now(timezone.utc), 30))
    try:
        code, headers, _ = get_token(front, "repository:local/x:pull,push", ("artifact-reconciler", PUSHERS["artifact-reconciler"]))
        assert code == 503 and headers.get(LOCK_HEADER) == "gc" and int(headers["Retry-After"]) >= 1
        assert pull_with(front, ns_creds("a"), REPO_A) == 200, "pulls go on during the window"

        async def copy_side() -> None:
            async with RegistrySession(options(front)) as s:
                repo = s.repository(front.registry.host, "local/x", Credentials("artifact-reconciler", PUSHERS["artifact-reconciler"]), push=True)
                await repo.blob_size("sha256:" + "0" * 64)

        with pytest.raises(WriteLockedError):  # the copy engine defers (Artifact: Deferred) and retries later
            asyncio.run(copy_side())
    finally:
        front.state.observe(LeaseView("gc", None, datetime.now(timezone.utc), 30))
    assert get_token(front, "repository:local/x:pull,push", ("artifact-reconciler", PUSHERS["artifact-reconciler"]))[0] == 200


def test_pull_key_rotation_keeps_both_credentials_working(front: Front) -> None:
    new = b"rotated-pull-key"
    front.sources.keys = [new, PULL_KEY]
    try:
        assert pull_with(front, ns_creds("a"), REPO_A) == 200, "the previous key still works during a rotation"
        rotated = (pullcreds.username("a"), pullcreds.password(new, "a"))
        assert pull_with(front, rotated, REPO_A) == 200
        front.sources.keys = [new]
        assert pull_with(front, ns_creds("a"), REPO_A) == 401, "the retired key is refused"
    finally:
        front.sources.keys = [PULL_KEY]


def test_metrics_and_readiness_relay_distribution_loopback_debug(front: Front) -> None:
    base = front.realm.removesuffix("/token")
    with urllib.request.urlopen(f"{base}/readyz", timeout=10) as r:
        assert r.status == 200
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as r:
        text = r.read().decode()
    assert "cluster_registry_token_requests" in text and "registry_" in text, "ours and distribution's"
    for path in ("/debug/pprof/", "/debug/vars"):
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(f"{base}{path}", timeout=10)


def test_tokens_say_their_lifetime(front: Front) -> None:
    code, _, body = get_token(front, "repository:local/y:pull,push", ("artifact-reconciler", PUSHERS["artifact-reconciler"]))
    assert code == 200 and body["expires_in"] == 15
    code, _, body = get_token(front, f"repository:{REPO_A}:pull", ns_creds("a"))
    assert code == 200 and body["expires_in"] == 300
    assert isinstance(body["token"], str) and body["token"] == body["access_token"]


def test_post_password_grant_as_containerd_sends_it(front: Front) -> None:
    user, password = ns_creds("a")
    form = urllib.parse.urlencode({"grant_type": "password", "username": user, "password": password,
                                   "service": "cluster-registry", "scope": f"repository:{REPO_A}:pull",
                                   "client_id": "containerd-client"}).encode()  # fmt: skip
    with urllib.request.urlopen(urllib.request.Request(front.realm, data=form), timeout=10) as r:
        token = json.loads(r.read())["access_token"]
    assert registry_get(front, f"/v2/{REPO_A}/manifests/1.0", token) == 200


def test_pods_need_the_realm_map_to_reach_the_token_service(front: Front) -> None:
    """The challenge names the node-local realm; a pod without $CLUSTER_REGISTRY_TOKEN_REALMS cannot use it."""
    from cluster_registry.oci import RegistryUnavailableError
    from cluster_registry.oci.client import token_realms_from
    from cluster_registry.oci.retry import RetryPolicy

    assert token_realms_from(f"{NODE_REALM}=http://svc:5002/token junk =x a=ftp://b") == {NODE_REALM: "http://svc:5002/token"}

    async def catalog(opts: RegistryOptions) -> list[str]:
        async with RegistrySession(opts) as s:
            return await s.catalog(front.registry.host, Credentials("gc", PUSHERS["gc"]))

    bare = RegistryOptions(insecure_hosts=frozenset({front.registry.host}), token_realms={}, retry=RetryPolicy(attempts=1))
    with pytest.raises(RegistryUnavailableError, match="token service"):
        asyncio.run(catalog(bare))
    assert REPO_A in asyncio.run(catalog(options(front)))
