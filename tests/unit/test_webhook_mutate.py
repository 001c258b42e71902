"""The webhook's pure core on real-shaped AdmissionReview v1 fixtures (tests/unit/fixtures/admission)."""

from __future__ import annotations

import base64
import copy
import json
from pathlib import Path
from typing import Any

import pytest

from cluster_registry.webhook import jsonpatch
from cluster_registry.webhook.mutate import (
    INTERNAL_ERROR_WARNING,
    BadRequest,
    Intent,
    Mutator,
    NothingReady,
    Owner,
    Policy,
    Settings,
)

FIXTURES = Path(__file__).parent / "fixtures" / "admission"
LOCAL = "cr.local:5000"
D1 = "sha256:" + "0123456789abcdef" * 4
D2 = "sha256:" + "fedcba9876543210" * 4


def fixture(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((FIXTURES / f"{name}.json").read_text())
    return doc


class Ready:
    def __init__(self, *keys: tuple[str, str]) -> None:
        self.keys = set(keys)

    def is_ready(self, namespace: str, source: str) -> bool:
        return (namespace, source) in self.keys


class AllReady:
    def is_ready(self, namespace: str, source: str) -> bool:
        return True


def ops_of(review: dict[str, Any]) -> list[dict[str, Any]]:
    response = review["response"]
    if "patch" not in response:
        assert "patchType" not in response
        return []
    assert response["patchType"] == "JSONPatch"
    ops: list[dict[str, Any]] = json.loads(base64.b64decode(response["patch"]))
    return ops


def as_map(ops: list[dict[str, Any]]) -> dict[str, str]:
    assert all(op["op"] == "replace" for op in ops)
    return {op["path"]: op["value"] for op in ops}


def mutator(policy: Policy = Policy.ALWAYS, **kw: Any) -> Mutator:
    return Mutator(Settings.build(LOCAL, policy, **kw))


RS = Owner("apps/v1", "ReplicaSet", "upf-7d9c6b5f8d", "0c8f7a52-1b8e-4c43-9d8e-2f3b9a6e1d01")
JOB = Owner("batch/v1", "Job", "migrate-28912345", "7e1d3c5b-5a9f-4e2b-8c1d-0b2a3c4d5e6f")

DEPLOYMENT_PATCH = {
    "/spec/initContainers/0/image": f"{LOCAL}/docker.io/library/busybox:1.36",
    "/spec/containers/0/image": f"{LOCAL}/myacr.azurecr.io/nginx:1.0.0",
    "/spec/containers/1/image": f"{LOCAL}/docker.io/library/nginx:latest",
    "/spec/containers/2/image": f"{LOCAL}/docker.io/bitnami/redis:7",
}

# fixture, expected patch (path -> image) under Always, expected skip counts
ALWAYS_CASES = [
    ("deployment_pod", DEPLOYMENT_PATCH, {}),
    ("job_pod", {"/spec/containers/0/image": f"{LOCAL}/ghcr.io/acme/migrate@{D1}"}, {}),
    (
        "bare_pod",
        {
            "/spec/initContainers/0/image": f"{LOCAL}/docker.io/library/busybox:latest",
            "/spec/initContainers/1/image": f"{LOCAL}/docker.io/library/alpine:3.20",
            "/spec/containers/0/image": f"{LOCAL}/registry.example.com_5000/team/app:2.1@{D2}",
        },
        {},
    ),
    (
        "ports_ipv6",
        {
            "/spec/containers/0/image": f"{LOCAL}/fd00-0000-0000-0000-0000-0000-0000-0001_5000/team/app:v2",
            "/spec/containers/1/image": f"{LOCAL}/2001-0db8-0000-0000-0000-0000-0000-0005/x/y@{D1}",
            "/spec/containers/2/image": f"{LOCAL}/localhost_5000/app:latest",
            "/spec/containers/3/image": f"{LOCAL}/registry.local_8443/x/y:1",
        },
        {},
    ),
    ("already_rewritten", {}, {"local": 2}),
    ("dry_run", DEPLOYMENT_PATCH, {}),
    ("mirror_pod", {}, {"mirror-pod": 1}),
    ("opt_out", {}, {"opt-out": 1}),
    (
        "ephemeral_update",
        {"/spec/ephemeralContainers/1/image": f"{LOCAL}/docker.io/nicolaka/netshoot:v0.13"},
        {},
    ),
    ("pod_update", {}, {"operation": 1}),
    (
        "invalid_image",
        {"/spec/containers/1/image": f"{LOCAL}/quay.io/prometheus/node-exporter:v1.8.2"},
        {"invalid-reference": 1},
    ),
]


@pytest.mark.parametrize(("name", "want", "skips"), ALWAYS_CASES, ids=[c[0] for c in ALWAYS_CASES])
def test_always_policy_on_fixtures(name: str, want: dict[str, str], skips: dict[str, int]) -> None:
    body = fixture(name)
    out = mutator().review(body, NothingReady())
    review = out.review
    assert review["apiVersion"] == "admission.k8s.io/v1"
    assert review["kind"] == "AdmissionReview"
    assert review["response"]["uid"] == body["request"]["uid"]
    assert review["response"]["allowed"] is True
    assert out.error is None
    assert as_map(ops_of(review)) == want
    assert dict(out.skips) == skips
    assert out.rewrites == len(want)
    # the patch applies to the object and a second pass (reinvocation) changes nothing
    patched = jsonpatch.apply(body["request"]["object"], ops_of(review))
    again = copy.deepcopy(body)
    again["request"]["object"] = patched
    assert ops_of(mutator().review(again, AllReady()).review) == []


def test_intents_for_a_deployment_pod() -> None:
    out = mutator().review(fixture("deployment_pod"), NothingReady())
    sources = {
        "docker.io/library/busybox:1.36",
        "myacr.azurecr.io/nginx:1.0.0",
        "docker.io/library/nginx:latest",
        "docker.io/bitnami/redis:7",
    }
    assert out.intents == {Intent("cnf", s, ("acr-pull",), "upf", RS) for s in sources}


def test_intents_carry_job_and_bare_pod_owners() -> None:
    (job,) = mutator().review(fixture("job_pod"), NothingReady()).intents
    assert job == Intent("cnf", f"ghcr.io/acme/migrate@{D1}", (), "default", JOB)
    bare = mutator().review(fixture("bare_pod"), NothingReady()).intents
    assert {i.owner for i in bare} == {Owner("v1", "Pod", "debug-shell", "")}
    assert {i.namespace for i in bare} == {"default"}


def test_dry_run_rewrites_but_records_nothing() -> None:
    out = mutator().review(fixture("dry_run"), NothingReady())
    assert out.rewrites == 4
    assert out.intents == frozenset()


def test_ephemeral_update_asks_only_for_the_new_container() -> None:
    out = mutator().review(fixture("ephemeral_update"), NothingReady())
    assert {i.source for i in out.intents} == {"docker.io/nicolaka/netshoot:v0.13"}


def test_a_bare_pods_update_records_the_same_owner_as_its_create() -> None:
    """CREATE has no uid yet; an UPDATE that carried one would patch a second owner entry for the same pod."""
    body = fixture("ephemeral_update")
    body["request"]["object"]["metadata"]["uid"] = "0f0e0d0c-0000-4000-8000-000000000001"
    assert {i.owner for i in mutator().review(body, NothingReady()).intents} == {Owner("v1", "Pod", "upf-0", "")}


@pytest.mark.parametrize("name", ["already_rewritten", "mirror_pod", "opt_out", "pod_update"])
def test_nothing_recorded_for_skipped_pods(name: str) -> None:
    assert mutator().review(fixture(name), NothingReady()).intents == frozenset()


def test_when_ready_rewrites_only_ready_artifacts_of_the_pods_namespace() -> None:
    m = mutator(Policy.WHEN_READY)
    body = fixture("deployment_pod")
    out = m.review(body, Ready(("cnf", "myacr.azurecr.io/nginx:1.0.0"), ("other", "docker.io/library/nginx:latest")))
    assert as_map(ops_of(out.review)) == {"/spec/containers/0/image": f"{LOCAL}/myacr.azurecr.io/nginx:1.0.0"}
    assert out.skips["not-ready"] == 3
    assert len(out.intents) == 4  # every Artifact is still asked for
    none = m.review(body, Ready(*((ns, s) for ns in ("default", "kube-system") for s in DEPLOYMENT_PATCH.values())))
    assert ops_of(none.review) == [] and none.skips["not-ready"] == 4


def test_when_ready_with_everything_ready_equals_always() -> None:
    body = fixture("deployment_pod")
    assert ops_of(mutator(Policy.WHEN_READY).review(body, AllReady()).review) == ops_of(
        mutator().review(body, NothingReady()).review
    )


@pytest.mark.parametrize(
    ("kw", "rewritten"),
    [
        ({"exclude": ["myacr.azurecr.io"]}, {"/spec/initContainers/0/image", "/spec/containers/1/image", "/spec/containers/2/image"}),
        ({"exclude": ["*.azurecr.io"]}, {"/spec/initContainers/0/image", "/spec/containers/1/image", "/spec/containers/2/image"}),
        ({"exclude": ["index.docker.io"]}, {"/spec/containers/0/image"}),
        ({"allow": ["MyACR.azurecr.io"]}, {"/spec/containers/0/image"}),
        ({"allow": ["docker.io"], "exclude": ["docker.io"]}, set()),
    ],
)
def test_exclusion_and_allow_lists(kw: dict[str, list[str]], rewritten: set[str]) -> None:
    out = mutator(**kw).review(fixture("deployment_pod"), NothingReady())
    assert set(as_map(ops_of(out.review))) == rewritten
    assert {i.source for i in out.intents} == {DEPLOYMENT_PATCH[p].removeprefix(LOCAL + "/") for p in rewritten}
    assert sum(out.skips.values()) == 4 - len(rewritten)


def test_registry_host_is_matched_case_insensitively() -> None:
    body = fixture("already_rewritten")
    for c in body["request"]["object"]["spec"]["containers"]:
        c["image"] = c["image"].replace("cr.local", "CR.LOCAL")
    assert ops_of(mutator().review(body, NothingReady()).review) == []


@pytest.mark.parametrize(
    "body",
    [
        None,
        [],
        "AdmissionReview",
        {"kind": "Pod", "apiVersion": "v1"},
        {"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v2", "request": {"uid": "x"}},
        {"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1"},
        {"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1", "request": {"uid": 7}},
        {"kind": "AdmissionReview", "apiVersion": ["admission.k8s.io/v1"], "request": {"uid": "x"}},
        {"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1", "request": [{"uid": "x"}]},
    ],
)
def test_not_an_admission_review_is_a_bad_request(body: Any) -> None:
    with pytest.raises(BadRequest):
        mutator().review(body, NothingReady())


def test_internal_error_admits_unchanged_with_a_warning() -> None:
    body = fixture("deployment_pod")
    body["request"]["object"]["spec"]["containers"] = ["nginx", 7]  # not container objects
    out = mutator().review(body, NothingReady())
    assert out.review["response"] == {
        "uid": body["request"]["uid"],
        "allowed": True,
        "warnings": [INTERNAL_ERROR_WARNING],
    }
    assert out.error is not None and out.intents == frozenset()


def test_view_errors_also_admit_unchanged() -> None:
    class Broken:
        def is_ready(self, namespace: str, source: str) -> bool:
            raise RuntimeError("boom")

    out = mutator(Policy.WHEN_READY).review(fixture("deployment_pod"), Broken())
    assert out.review["response"]["allowed"] is True and "patch" not in out.review["response"]
    assert out.skips["internal-error"] == 1


def test_v1beta1_review_is_echoed_in_its_version() -> None:
    body = fixture("job_pod")
    body["apiVersion"] = "admission.k8s.io/v1beta1"
    assert mutator().review(body, NothingReady()).review["apiVersion"] == "admission.k8s.io/v1beta1"


def test_non_pod_resource_is_left_alone() -> None:
    body = fixture("deployment_pod")
    body["request"]["resource"] = {"group": "apps", "version": "v1", "resource": "deployments"}
    out = mutator().review(body, NothingReady())
    assert ops_of(out.review) == [] and out.skips["operation"] == 1


def test_a_name_too_long_after_rewriting_is_skipped() -> None:
    image = "r.io/" + "/".join(["abcdefghij"] * 22)  # valid, but > 255 once prefixed
    body = fixture("bare_pod")
    body["request"]["object"]["spec"]["containers"][0]["image"] = image
    out = mutator().review(body, NothingReady())
    assert "/spec/containers/0/image" not in as_map(ops_of(out.review))
    assert out.skips["invalid-reference"] == 1
