"""The webhook's pure core on real-shaped AdmissionReview v1 fixtures (tests/unit/fixtures/admission)."""

from __future__ import annotations

import base64
import copy
import json
from pathlib import Path
from typing import Any

import pytest

from cluster_registry.webhook.mutate import (
    ANNOTATION_SOURCES,
    INTERNAL_ERROR_WARNING,
    BadRequest,
    Mutator,
    Policy,
    Settings,
    recorded_sources,
)
from tests.support import jsonpatch

FIXTURES = Path(__file__).parent / "fixtures" / "admission"
LOCAL = "cr.local:5000"
D1 = "sha256:" + "0123456789abcdef" * 4
D2 = "sha256:" + "fedcba9876543210" * 4


def fixture(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((FIXTURES / f"{name}.json").read_text())
    return doc


class Ready:
    """Ready for the (namespace, source) keys given; ``digests`` are what each one verified."""

    def __init__(self, *keys: tuple[str, str], digests: dict[tuple[str, str], str] | None = None) -> None:
        self.keys = set(keys)
        self.digests = digests or {}

    def is_ready(self, namespace: str, source: str) -> bool:
        return (namespace, source) in self.keys

    def digest(self, namespace: str, source: str) -> str:
        return self.digests.get((namespace, source), "") if self.is_ready(namespace, source) else ""


class NothingReady:
    def is_ready(self, namespace: str, source: str) -> bool:
        return False

    def digest(self, namespace: str, source: str) -> str:
        return ""


class AllReady:
    def is_ready(self, namespace: str, source: str) -> bool:
        return True

    def digest(self, namespace: str, source: str) -> str:
        return ""


def ops_of(review: dict[str, Any]) -> list[dict[str, Any]]:
    response = review["response"]
    if "patch" not in response:
        assert "patchType" not in response
        return []
    assert response["patchType"] == "JSONPatch"
    ops: list[dict[str, Any]] = json.loads(base64.b64decode(response["patch"]))
    return ops


def as_map(ops: list[dict[str, Any]]) -> dict[str, str]:
    """The image replacements (the annotation op aside)."""
    images = [op for op in ops if not op["path"].startswith("/metadata/")]
    assert all(op["op"] == "replace" for op in images)
    return {op["path"]: op["value"] for op in images}


def sources_of(body: dict[str, Any], review: dict[str, Any]) -> dict[str, str] | None:
    """The sources annotation of the pod once the patch is applied."""
    patched = jsonpatch.apply(body["request"]["object"], ops_of(review))
    return recorded_sources(patched["metadata"])


def mutator(policy: Policy = Policy.ALWAYS, **kw: Any) -> Mutator:
    return Mutator(Settings.build(LOCAL, policy, **kw))



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


def test_the_patch_records_every_candidates_source_in_an_annotation() -> None:
    body = fixture("deployment_pod")
    assert sources_of(body, mutator(Policy.WHEN_READY).review(body, NothingReady()).review) == {
        "init-config": "docker.io/library/busybox:1.36",
        "upf": "myacr.azurecr.io/nginx:1.0.0",
        "sidecar": "docker.io/library/nginx:latest",
        "metrics": "docker.io/bitnami/redis:7",
    }


def test_the_annotation_keeps_other_annotations_and_earlier_sources() -> None:
    body = fixture("deployment_pod")
    pod = body["request"]["object"]
    pod["metadata"]["annotations"] = {"team": "core", ANNOTATION_SOURCES: json.dumps({"gone": "r.io/x:1"})}
    out = mutator().review(body, NothingReady())
    patched = jsonpatch.apply(pod, ops_of(out.review))
    assert patched["metadata"]["annotations"]["team"] == "core"
    assert recorded_sources(patched["metadata"]) == {"gone": "r.io/x:1", **(sources_of(fixture("deployment_pod"), mutator().review(fixture("deployment_pod"), NothingReady()).review) or {})}


def test_ephemeral_update_patches_only_the_new_container() -> None:
    """The pods/ephemeralcontainers subresource refuses changes to anything else (annotations too)."""
    ops = ops_of(mutator().review(fixture("ephemeral_update"), NothingReady()).review)
    assert [op["path"] for op in ops] == ["/spec/ephemeralContainers/1/image"]


@pytest.mark.parametrize("name", ["already_rewritten", "mirror_pod", "opt_out", "pod_update"])
def test_nothing_annotated_for_skipped_pods(name: str) -> None:
    assert ops_of(mutator().review(fixture(name), NothingReady()).review) == []


@pytest.mark.parametrize("namespace", ["kube-system", "cluster-registry", "infra"])
def test_excluded_namespaces_are_refused_in_the_process(namespace: str) -> None:
    """Item 3 of #16: whatever the webhook configuration lets through, these are never patched."""
    body = fixture("deployment_pod")
    body["request"]["namespace"] = namespace
    out = mutator(exclude_namespaces=["cluster-registry", "infra"]).review(body, AllReady())
    assert ops_of(out.review) == [] and out.skips == {"excluded-namespace": 1}
    body["request"]["namespace"] = "cnf"
    assert as_map(ops_of(mutator(exclude_namespaces=["cluster-registry", "infra"]).review(body, AllReady()).review))


def test_when_ready_rewrites_only_ready_artifacts_of_the_pods_namespace() -> None:
    m = mutator(Policy.WHEN_READY)
    body = fixture("deployment_pod")
    out = m.review(body, Ready(("cnf", "myacr.azurecr.io/nginx:1.0.0"), ("other", "docker.io/library/nginx:latest")))
    assert as_map(ops_of(out.review)) == {"/spec/containers/0/image": f"{LOCAL}/myacr.azurecr.io/nginx:1.0.0"}
    assert out.skips["not-ready"] == 3
    assert len(sources_of(body, out.review) or {}) == 4  # every source is recorded, rewritten or not
    none = m.review(body, Ready(*((ns, s) for ns in ("default", "kube-system") for s in DEPLOYMENT_PATCH.values())))
    assert as_map(ops_of(none.review)) == {} and none.skips["not-ready"] == 4


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
    recorded = set((sources_of(fixture("deployment_pod"), out.review) or {}).values())
    assert recorded == {DEPLOYMENT_PATCH[p].removeprefix(LOCAL + "/") for p in rewritten}
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
    assert out.error is not None


def test_view_errors_also_admit_unchanged() -> None:
    class Broken:
        def is_ready(self, namespace: str, source: str) -> bool:
            raise RuntimeError("boom")

        def digest(self, namespace: str, source: str) -> str:
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


# --- registryAccess isolated: the namespace's pull Secret, and images pinned to the verified digest -------

SECRET = "cluster-registry-pull"
NGINX = "myacr.azurecr.io/nginx:1.0.0"


def isolated(policy: Policy = Policy.WHEN_READY) -> Mutator:
    return Mutator(Settings.build(LOCAL, policy, pull_secret=SECRET))


def patched_pod(body: dict[str, Any], review: dict[str, Any]) -> dict[str, Any]:
    pod: dict[str, Any] = jsonpatch.apply(body["request"]["object"], ops_of(review))
    return pod


def test_rewritten_images_are_pinned_to_the_digest_their_namespace_verified() -> None:
    body = fixture("deployment_pod")
    ns = body["request"]["namespace"]
    view = Ready((ns, NGINX), ("other", NGINX), digests={(ns, NGINX): D1, ("other", NGINX): D2})
    pod = patched_pod(body, isolated().review(body, view).review)
    images = {c["name"]: c["image"] for c in pod["spec"]["containers"]}
    assert f"{LOCAL}/myacr.azurecr.io/nginx:1.0.0@{D1}" in images.values()  # this namespace's, not "other"'s
    assert sum(i.startswith(LOCAL) for i in images.values()) == 1  # the rest are not Ready here


def test_a_source_pinned_by_digest_keeps_its_own_digest() -> None:
    body = fixture("job_pod")
    ns = body["request"]["namespace"]
    source = recorded_sources(patched_pod(body, mutator().review(body, NothingReady()).review)["metadata"])
    assert source is not None
    view = Ready(*[(ns, s) for s in source.values()], digests={(ns, s): D2 for s in source.values()})
    pod = patched_pod(body, isolated().review(body, view).review)
    assert pod["spec"]["containers"][0]["image"] == f"{LOCAL}/ghcr.io/acme/migrate@{D1}"


@pytest.mark.parametrize("bad", ["", "sha256:short", "md5:" + "0" * 64, D1 + '"}]'])
def test_a_digest_that_is_not_sha256_is_not_pinned(bad: str) -> None:
    body = fixture("deployment_pod")
    ns = body["request"]["namespace"]
    pod = patched_pod(body, isolated().review(body, Ready((ns, NGINX), digests={(ns, NGINX): bad})).review)
    assert f"{LOCAL}/myacr.azurecr.io/nginx:1.0.0" in [c["image"] for c in pod["spec"]["containers"]]


def test_isolated_adds_the_pull_secret_once_and_keeps_the_pods_own() -> None:
    body = fixture("deployment_pod")
    spec = body["request"]["object"]["spec"]
    spec["imagePullSecrets"] = [{"name": "acr"}]
    pod = patched_pod(body, isolated(Policy.ALWAYS).review(body, NothingReady()).review)
    assert pod["spec"]["imagePullSecrets"] == [{"name": "acr"}, {"name": SECRET}]
    again = {**body, "request": {**body["request"], "object": pod}}  # reinvocation: already there
    ops = ops_of(isolated(Policy.ALWAYS).review(again, NothingReady()).review)
    assert not [op for op in ops if "imagePullSecrets" in op["path"]]


def test_isolated_creates_the_list_when_the_pod_has_none() -> None:
    body = fixture("bare_pod")
    assert "imagePullSecrets" not in body["request"]["object"]["spec"]
    pod = patched_pod(body, isolated(Policy.ALWAYS).review(body, NothingReady()).review)
    assert pod["spec"]["imagePullSecrets"] == [{"name": SECRET}]


def test_no_pull_secret_without_a_rewrite_or_in_shared_mode() -> None:
    body = fixture("deployment_pod")
    for out in (isolated().review(body, NothingReady()), mutator(Policy.ALWAYS).review(body, NothingReady())):
        # nothing Ready (so nothing rewritten), and everything rewritten in shared mode
        assert ops_of(out.review) and not [op for op in ops_of(out.review) if "imagePullSecrets" in op["path"]]


def test_new_ephemeral_container_is_rewritten_only_in_a_pod_with_the_pull_secret() -> None:
    body = fixture("ephemeral_update")
    out = isolated(Policy.ALWAYS).review(body, NothingReady())
    assert as_map(ops_of(out.review)) == {} and out.skips == {"no-pull-secret": 1}
    body["request"]["object"]["spec"]["imagePullSecrets"] = [{"name": SECRET}]
    out = isolated(Policy.ALWAYS).review(body, NothingReady())
    assert list(as_map(ops_of(out.review))) == ["/spec/ephemeralContainers/1/image"]
    assert not [op for op in ops_of(out.review) if "imagePullSecrets" in op["path"]]  # immutable here
