"""Property test of the webhook core over generated AdmissionReviews.

No crash, the UID echoed, always allowed, a patch that is valid JSON Patch and applies to the pod,
only image fields touched, only local targets written, and idempotent: the patched pod reviewed again
(every Artifact Ready) yields no patch. CI runs 10,000 cases; ``WEBHOOK_FUZZ_EXAMPLES=200000`` (or
any number) is the long mode.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import string
import zlib
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster_registry import reference
from cluster_registry.webhook.mutate import Mutator, Policy, Settings, recorded_sources
from tests.support import jsonpatch

LOCAL = "cr.local:5000"
EXAMPLES = int(os.environ.get("WEBHOOK_FUZZ_EXAMPLES", "10000"))

# Vocabularies rather than character-level text: one hypothesis draw per part keeps 10,000 cases cheap.
_alnum = st.sampled_from(["a", "x1", "nginx", "redis", "team", "0", "app", "upf", "z9z"])
_component = st.sampled_from(["nginx", "a", "x-y", "b.c", "d__e", "f--g", "0", "app1", "library", "team_a", "q.r-s"])
_host = st.sampled_from([
    "docker.io", "index.docker.io", "ghcr.io", "myacr.azurecr.io", "localhost", "quay.io", LOCAL, "CR.LOCAL:5000",
    "cr.local", "registry.io:443", "r.example.com:65535", "Upper.Host", "[::1]:5000", "[fd00::1]", "[2001:db8::5]:443",
    "127.0.0.1:5001", "localhost:5000", "registry-1.docker.io",
])
_tag = st.sampled_from(["1.0", "latest", "v2", "T_1.0-x", "a" * 128, "sha-abc", "_x", "1"])
_digest = st.sampled_from(["sha256:" + c * 64 for c in "0123456789abcdef"])
# Every strategy is built once, here: building them inside draws costs hypothesis a validation each time.
_junk = st.one_of(
    st.sampled_from([None, 7, "", " nginx", "Nginx", "a//b", "nginx:", "nginx:-x", "host:5000/", "x@sha256:abc", "[zz::1]/a", "a" * 300]),
    st.text(max_size=12),
)
_path = st.lists(_component, min_size=1, max_size=3).map("/".join)
_maybe_host = st.one_of(st.none(), _host)
_maybe_tag = st.one_of(st.none(), _tag)
_maybe_digest = st.one_of(st.none(), _digest)


@st.composite
def images(draw: st.DrawFn) -> Any:
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(_junk)
    path = draw(_path)
    host = draw(_maybe_host)
    name = f"{host}/{path}" if host else path
    if kind == 1:  # an already-rewritten reference
        try:
            return str(reference.rewrite(reference.parse(name), LOCAL))
        except Exception:  # noqa: BLE001
            return name
    tag = draw(_maybe_tag)
    digest = draw(_maybe_digest)
    return name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")


def _pool() -> list[Any]:
    """Every combination of the vocabularies (hosts x paths x tag/digest), the junk, and rewritten forms:
    drawing one of them costs hypothesis a single choice, where composing one costs a dozen."""
    hosts = [None, *_host.elements]  # type: ignore[attr-defined]
    paths = ["nginx", "a/b", "x-y/b.c/d__e", "library/redis", "0", "team_a/q.r-s", "f--g/app1"]
    tags = [None, "1.0", "latest", "T_1.0-x", "a" * 128, "_x"]
    digests = [None, "sha256:" + "0" * 64, "sha256:" + "f" * 64]
    pool: list[Any] = []
    for i, (host, path) in enumerate((h, p) for h in hosts for p in paths):
        name = f"{host}/{path}" if host else path
        tag, digest = tags[i % len(tags)], digests[(i // len(tags)) % len(digests)]
        for suffix in {(f":{tag}" if tag else "") + (f"@{digest}" if digest else ""), f":{tags[(i + 1) % len(tags)] or 'v'}"}:
            pool.append(name + suffix)
            if i % 3:
                continue
            try:
                pool.append(str(reference.rewrite(reference.parse(name + suffix), LOCAL)))
            except Exception:  # noqa: BLE001 - invalid ones stay as they are
                pass
    # junk last: hypothesis favours the first elements
    return pool + [None, 7, "", " nginx", "Nginx", "a//b", "nginx:", "nginx:-x", "host:5000/", "x@sha256:abc", "[zz::1]/a", "a" * 300]


_POOL = st.sampled_from(_pool())
_image = st.one_of(_POOL, _POOL, _POOL, _POOL, _POOL, images())  # mostly the pool, sometimes composed


_flags = st.tuples(
    st.integers(0, 4), st.integers(-1, 2), st.integers(-1, 2),  # containers, init, ephemeral (-1: absent)
    st.integers(0, 7),  # how many ephemeral containers the old pod already had
    st.sampled_from([(), ("app", "x"), ("clusterregistry.io/skip", "true"), ("clusterregistry.io/skip", "false")]),
    st.integers(0, 9),  # 0: mirror pod
    st.booleans(),  # has a controller
    st.integers(-1, 2),  # pull secrets (-1: none)
    st.sampled_from([("CREATE", "")] * 5 + [("UPDATE", "ephemeralcontainers")] * 2 + [("UPDATE", ""), ("UPDATE", "status")]),
    st.sampled_from(["cnf", "default", "team-a"]),
    st.booleans(),  # dry run
    st.integers(0, 19),  # 0: one container without an image
)


@st.composite
def reviews(draw: st.DrawFn) -> dict[str, Any]:
    """A pod AdmissionReview in few draws (a tuple of choices, then one per image): 10,000 stay cheap."""
    n, n_init, n_eph, n_old, label, mirror, owned, n_secrets, (op, sub), ns, dry, noimage = draw(_flags)
    spec: dict[str, Any] = {}
    for name, prefix, count in (("containers", "c", n), ("initContainers", "i", n_init), ("ephemeralContainers", "e", n_eph)):
        if count >= 0:
            spec[name] = [{"name": f"{prefix}{k}", "image": draw(_image)} for k in range(count)]
    if noimage == 0 and spec["containers"]:
        del spec["containers"][0]["image"]
    if n_secrets >= 0:
        spec["imagePullSecrets"] = [{"name": f"pull-{k}"} for k in range(n_secrets)]
    meta: dict[str, Any] = {"generateName": "p-"}
    if label:
        meta["labels"] = {label[0]: label[1]}
    if mirror == 0:
        meta["annotations"] = {"kubernetes.io/config.mirror": "abc"}
    if owned:
        meta["ownerReferences"] = [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "rs", "uid": "u1", "controller": True}]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}
    request: dict[str, Any] = {
        "uid": f"uid-{n}{n_init}{n_eph}-{id(pod)}",
        "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "namespace": ns,
        "operation": op,
        "dryRun": dry,
        "object": pod,
    }
    if sub:
        request["subResource"] = sub
    if op == "UPDATE":
        old = copy.deepcopy(pod)
        eph = old["spec"].get("ephemeralContainers") or []
        old["spec"]["ephemeralContainers"] = eph[:n_old]
        request["oldObject"] = old
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request}


class RandomReady:
    """A deterministic, arbitrary half of all Artifacts is Ready."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def is_ready(self, namespace: str, source: str) -> bool:
        return zlib.crc32(f"{self.seed}/{namespace}/{source}".encode()) % 2 == 0

    def digest(self, namespace: str, source: str) -> str:
        return ""


class AllReady:
    def is_ready(self, namespace: str, source: str) -> bool:
        return True

    def digest(self, namespace: str, source: str) -> str:
        return ""


MUTATORS = {p: Mutator(Settings.build(LOCAL, p, exclude=["quay.io"])) for p in Policy}


def check(body: dict[str, Any], policy: Policy, seed: int) -> None:
    """Every property of one review."""
    m = MUTATORS[policy]
    original = copy.deepcopy(body)
    out = m.review(body, RandomReady(seed))
    assert body == original  # the input is not modified
    patched = check_response(body, out.review)
    if patched is not None:  # idempotent: reinvocation in the same state changes nothing
        again = copy.deepcopy(body)
        again["request"]["object"] = patched
        assert "patch" not in m.review(again, RandomReady(seed)).review["response"]
    assert out.error is None or out.rewrites == 0


def check_response(body: dict[str, Any], review: dict[str, Any]) -> dict[str, Any] | None:
    """Check one answer (also used through the real server); return the patched pod, if patched."""
    response = review["response"]
    assert response["uid"] == body["request"]["uid"] and response["allowed"] is True
    json.dumps(review)  # serialisable
    if "patch" not in response:
        return None
    assert response["patchType"] == "JSONPatch"
    ops = json.loads(base64.b64decode(response["patch"], validate=True))
    assert ops, "an empty patch must be omitted"
    pod = body["request"]["object"]
    patched = jsonpatch.apply(pod, ops)
    assert jsonpatch.apply(patched, ops) == patched  # applying twice changes nothing more
    for op in ops:
        if op["path"].startswith("/metadata/annotations"):  # the sources annotation, on CREATE only
            assert op["op"] == "add" and body["request"]["operation"] == "CREATE"
            assert set(recorded_sources(patched["metadata"]) or {}) <= {
                c["name"] for f in ("containers", "initContainers", "ephemeralContainers") for c in pod["spec"].get(f) or []
            }
            continue
        assert op["op"] == "replace"
        _, spec, field, index, leaf = op["path"].split("/")
        assert (spec, leaf) == ("spec", "image") and field in ("containers", "initContainers", "ephemeralContainers")
        source = reference.parse(pod["spec"][field][int(index)]["image"])
        assert reference.parse(op["value"]) == reference.rewrite(source, LOCAL)
    # a pod whose images are all rewritten gets no further patch, whatever is Ready
    again = copy.deepcopy(body)
    again["request"]["object"] = patched
    second = MUTATORS[Policy.ALWAYS].review(again, AllReady()).review["response"]
    if "patch" in second:
        touched = {op["path"] for op in ops}
        assert not touched & {op["path"] for op in json.loads(base64.b64decode(second["patch"]))}
    return patched


@settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(reviews(), st.sampled_from(list(Policy)), st.integers(0, 3))
def test_generated_reviews(body: dict[str, Any], policy: Policy, seed: int) -> None:
    check(body, policy, seed)
