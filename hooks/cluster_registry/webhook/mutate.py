"""The webhook's pure core: an AdmissionReview in, the response out. No writes, no I/O, no clock.

The caller passes the request body (already decoded from JSON) and a view of which Artifacts are
Ready, and gets back an :class:`Outcome`. Answering is all the webhook does: Artifacts are recorded
from pods that exist (``webhook.pods``), never from a request, which anyone who can reach the port
could forge. The patch also annotates the pod with its images' sources (``ANNOTATION_SOURCES``), so
a rewritten pod is still traced to where its images came from.

What is rewritten: every image in ``initContainers``, ``containers`` and ``ephemeralContainers`` of
a pod on CREATE, and the *new* ephemeral containers on an UPDATE of the ``pods/ephemeralcontainers``
subresource (the API server refuses changes to ephemeral containers that already exist). The target
is ``str(reference.rewrite(parse(image), registry_host))``.

What is never rewritten: pods in an excluded namespace (kube-system, the release namespace: refused
here as well as by the webhook configuration's selector), references already in the cluster
registry, excluded registries, sources outside a non-empty allow-list, mirror pods, and pods
labelled ``clusterregistry.io/skip: "true"``. Under ``WhenReady`` an image is rewritten only when the
Artifact for its source in the pod's namespace is Ready.

A rewritten image is pinned to the digest the Artifact in the pod's namespace verified
(``<local>/<host>/<repo>:<tag>@<digest>``), so the pod runs exactly what was copied for that namespace
whatever the shared tag holds later. With ``Settings.pull_secret`` (``registryAccess: isolated``) a pod
with at least one rewritten image also gets the namespace's pull Secret in ``imagePullSecrets``: the
registry serves nothing to anonymous callers then.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass, field
from enum import Enum
from functools import lru_cache
from typing import Any, Protocol

from cluster_registry import reference
from cluster_registry.api import LABEL_OPT_OUT
from cluster_registry.errors import InvalidReferenceError

MIRROR_ANNOTATION = "kubernetes.io/config.mirror"
# JSON object, container name -> normalised source, of every image the webhook may rewrite (set on
# CREATE whether rewritten yet or not): traces rewritten images to their source, and marks the pod as
# one the webhook's scope (its matchConditions) covers.
ANNOTATION_SOURCES = "clusterregistry.io/sources"
_SOURCES_PATH = "/metadata/annotations/" + ANNOTATION_SOURCES.replace("~", "~0").replace("/", "~1")
CONTAINER_FIELDS = ("initContainers", "containers", "ephemeralContainers")
REVIEW_VERSIONS = frozenset({"admission.k8s.io/v1", "admission.k8s.io/v1beta1"})
INTERNAL_ERROR_WARNING = "cluster-registry webhook: internal error, pod admitted unchanged"


class Policy(str, Enum):
    WHEN_READY = "WhenReady"
    ALWAYS = "Always"


class Skip(str, Enum):
    """Why an image (or a whole request) was left alone; the label of the skips metric."""

    LOCAL = "local"  # already points at the cluster registry
    EXCLUDED = "excluded"  # on the exclusion list
    NOT_ALLOWED = "not-allowed"  # outside a non-empty allow-list
    INVALID = "invalid-reference"  # does not parse (the kubelet will fail it, not us)
    NOT_READY = "not-ready"  # WhenReady and the Artifact is not Ready (yet)
    MIRROR = "mirror-pod"
    OPT_OUT = "opt-out"
    OPERATION = "operation"  # not a pod CREATE / pods/ephemeralcontainers UPDATE
    NAMESPACE = "excluded-namespace"  # kube-system, the release namespace, webhook.excludeNamespaces
    NO_PULL_SECRET = "no-pull-secret"  # a new ephemeral container in a pod without the pull Secret
    ERROR = "internal-error"


class BadRequest(ValueError):
    """The body is not an AdmissionReview with a request: answered with HTTP 400."""


class ReadinessView(Protocol):
    def is_ready(self, namespace: str, source: str) -> bool:
        """Whether the Artifact for normalised ``source`` in ``namespace`` is Ready."""

    def digest(self, namespace: str, source: str) -> str:
        """The digest that Artifact verified for ``namespace`` ("" when not Ready or unknown)."""


_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


@dataclass(frozen=True)
class Settings:
    registry_host: str
    policy: Policy = Policy.WHEN_READY
    exclude: frozenset[str] = frozenset()  # registry hosts; "*.example.com" matches subdomains
    allow: frozenset[str] = frozenset()  # empty: every source registry
    exclude_namespaces: frozenset[str] = frozenset({"kube-system"})
    pull_secret: str = ""  # the namespaces' pull Secret added to rewritten pods; "" (shared registry): none

    @staticmethod
    def build(
        registry_host: str,
        policy: Policy | str = Policy.WHEN_READY,
        exclude: tuple[str, ...] | list[str] = (),
        allow: tuple[str, ...] | list[str] = (),
        exclude_namespaces: tuple[str, ...] | list[str] = (),
        pull_secret: str = "",
    ) -> Settings:
        return Settings(
            registry_host=registry_host.strip().lower(),
            policy=Policy(policy),
            exclude=frozenset(_norm_host(h) for h in exclude if h.strip()),
            allow=frozenset(_norm_host(h) for h in allow if h.strip()),
            exclude_namespaces=frozenset({"kube-system", *(n.strip() for n in exclude_namespaces if n.strip())}),
            pull_secret=pull_secret.strip(),
        )


def _norm_host(host: str) -> str:
    host = host.strip().lower().rstrip("/")
    return reference.DOCKER_HUB if host in ("index.docker.io", "registry-1.docker.io") else host


def _host_matches(host: str, patterns: frozenset[str]) -> bool:
    if host in patterns:
        return True
    bare = host.partition(":")[0] if not host.startswith("[") else host
    if bare in patterns:
        return True
    return any(p.startswith("*.") and bare.endswith(p[1:]) for p in patterns)


@dataclass(frozen=True)
class Plan:
    """One image string classified: either a skip reason, or its source and rewrite target."""

    source: str = ""
    target: str = ""
    skip: Skip | None = None
    target_json: str = ""  # json.dumps(target), computed once per image string
    pinned: bool = False  # the source names a digest: the target is pinned already


@dataclass
class Outcome:
    review: dict[str, Any]  # the AdmissionReview to answer with
    rewrites: int = 0
    skips: dict[str, int] = field(default_factory=dict)
    error: BaseException | None = None  # an internal error (already turned into "allowed")


class Mutator:
    """The admission decision for one set of settings. Image classifications are memoised."""

    def __init__(self, settings: Settings, cache_size: int = 16384) -> None:
        self.settings = settings
        self.classify = lru_cache(maxsize=cache_size)(self._classify)

    def _classify(self, image: str) -> Plan:
        s = self.settings
        try:
            ref = reference.parse(image)
        except InvalidReferenceError:
            return Plan(skip=Skip.INVALID)
        host = ref.host.lower()
        if host == s.registry_host:
            return Plan(skip=Skip.LOCAL)
        if s.exclude and _host_matches(host, s.exclude):
            return Plan(skip=Skip.EXCLUDED)
        if s.allow and not _host_matches(host, s.allow):
            return Plan(skip=Skip.NOT_ALLOWED)
        try:
            target = str(reference.rewrite(ref, s.registry_host))
            reference.parse(target)  # the rewritten name must stay a valid reference (length)
        except (InvalidReferenceError, ValueError):
            return Plan(skip=Skip.INVALID)
        return Plan(source=str(ref), target=target, target_json=json.dumps(target), pinned=ref.digest is not None)

    def review(self, body: Any, view: ReadinessView) -> Outcome:
        """Decide on ``body`` (a decoded AdmissionReview). Raises BadRequest for anything else."""
        if not isinstance(body, dict) or body.get("kind") != "AdmissionReview":
            raise BadRequest("body is not an AdmissionReview")
        api_version = body.get("apiVersion")
        if not isinstance(api_version, str) or api_version not in REVIEW_VERSIONS:
            raise BadRequest(f"unsupported AdmissionReview apiVersion {api_version!r}")
        request = body.get("request")
        if not isinstance(request, dict) or not isinstance(request.get("uid"), str):
            raise BadRequest("AdmissionReview without a request uid")
        uid: str = request["uid"]
        try:
            return self._review(api_version, uid, request, view)
        except Exception as err:  # never block the cluster: allowed, unchanged, with a warning
            response = {"uid": uid, "allowed": True, "warnings": [INTERNAL_ERROR_WARNING]}
            return Outcome(review=_envelope(api_version, response), error=err, skips={Skip.ERROR.value: 1})

    def _review(self, api_version: str, uid: str, request: dict[str, Any], view: ReadinessView) -> Outcome:
        response: dict[str, Any] = {"uid": uid, "allowed": True}
        out = Outcome(review=_envelope(api_version, response))
        skips = out.skips
        fields, known = _scope(request)
        pod = request.get("object")
        if fields is None or not isinstance(pod, dict):
            skips[Skip.OPERATION.value] = 1
            return out
        meta = pod.get("metadata") or {}
        namespace = request.get("namespace") or meta.get("namespace") or "default"
        if namespace in self.settings.exclude_namespaces:
            skips[Skip.NAMESPACE.value] = 1
            return out
        if skipped := pod_skip(meta):
            skips[skipped.value] = 1
            return out
        spec = pod.get("spec") or {}
        always = self.settings.policy is Policy.ALWAYS
        secret = self.settings.pull_secret
        # an ephemeral-containers update may change nothing else: without the Secret already there, a
        # rewritten image could not be pulled, so it is left alone
        no_secret = bool(secret and request.get("operation") == "UPDATE" and not _has_secret(spec, secret))
        classify = self.classify
        ops: list[str] = []
        sources: dict[str, str] = {}
        for name in fields:
            containers = spec.get(name)
            if not containers:
                continue
            for i, container in enumerate(containers):
                if known and container.get("name") in known:
                    continue  # an existing ephemeral container: immutable
                image = container.get("image")
                if not isinstance(image, str):
                    skips[Skip.INVALID.value] = skips.get(Skip.INVALID.value, 0) + 1
                    continue
                plan = classify(image)
                if plan.skip is not None:
                    skips[plan.skip.value] = skips.get(plan.skip.value, 0) + 1
                    continue
                sources[str(container.get("name", ""))] = plan.source
                if no_secret:
                    skips[Skip.NO_PULL_SECRET.value] = skips.get(Skip.NO_PULL_SECRET.value, 0) + 1
                elif always or view.is_ready(namespace, plan.source):
                    ops.append(f'{{"op":"replace","path":"/spec/{name}/{i}/image","value":{_pinned(plan, view, namespace)}}}')
                else:
                    skips[Skip.NOT_READY.value] = skips.get(Skip.NOT_READY.value, 0) + 1
        out.rewrites = len(ops)
        if ops and secret and request.get("operation") == "CREATE" and not _has_secret(spec, secret):
            ops.append(_add_secret(spec, secret))
        if sources and request.get("operation") == "CREATE":  # an ephemeralcontainers update may change only those
            ops.extend(_annotate(meta, sources))
        if ops:
            response["patchType"] = "JSONPatch"
            response["patch"] = base64.b64encode(("[" + ",".join(ops) + "]").encode()).decode()
        return out


def _pinned(plan: Plan, view: ReadinessView, namespace: str) -> str:
    """The JSON target of ``plan``, pinned to the digest the namespace's Artifact verified."""
    if plan.pinned:
        return plan.target_json  # the source's own digest; the Artifact is Ready only if it matched
    digest = view.digest(namespace, plan.source)
    if not _DIGEST.fullmatch(digest):
        return plan.target_json  # Always and not Ready yet: nothing verified to pin to
    return json.dumps(f"{plan.target}@{digest}")


def _has_secret(spec: dict[str, Any], name: str) -> bool:
    return any(isinstance(s, dict) and s.get("name") == name for s in spec.get("imagePullSecrets") or ())


def _add_secret(spec: dict[str, Any], name: str) -> str:
    entry = json.dumps({"name": name})
    if isinstance(spec.get("imagePullSecrets"), list):
        return f'{{"op":"add","path":"/spec/imagePullSecrets/-","value":{entry}}}'
    return f'{{"op":"add","path":"/spec/imagePullSecrets","value":[{entry}]}}'


def pod_skip(meta: dict[str, Any]) -> Skip | None:
    """Why a whole pod is left alone by its metadata (opt-out label, mirror pod), or None."""
    if (meta.get("labels") or {}).get(LABEL_OPT_OUT) == "true":
        return Skip.OPT_OUT
    if MIRROR_ANNOTATION in (meta.get("annotations") or {}):
        return Skip.MIRROR
    return None


def recorded_sources(meta: dict[str, Any]) -> dict[str, str] | None:
    """The pod's ``ANNOTATION_SOURCES`` (container name -> source); None when absent or malformed."""
    raw = (meta.get("annotations") or {}).get(ANNOTATION_SOURCES)
    if not isinstance(raw, str):
        return None
    try:
        got = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(got, dict):
        return None
    return {str(k): v for k, v in got.items() if isinstance(v, str)}


def _annotate(meta: dict[str, Any], sources: dict[str, str]) -> list[str]:
    """The op recording ``sources`` in the pod's annotation, merged with what an earlier pass recorded."""
    merged = {**(recorded_sources(meta) or {}), **sources}
    if merged == recorded_sources(meta):
        return []  # reinvoked with nothing new
    value = json.dumps(merged, sort_keys=True, separators=(",", ":"))
    if isinstance(meta.get("annotations"), dict):
        return [f'{{"op":"add","path":"{_SOURCES_PATH}","value":{json.dumps(value)}}}']
    return [f'{{"op":"add","path":"/metadata/annotations","value":{json.dumps({ANNOTATION_SOURCES: value})}}}']


def _envelope(api_version: str, response: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": api_version, "kind": "AdmissionReview", "response": response}


def _scope(request: dict[str, Any]) -> tuple[tuple[str, ...] | None, frozenset[str]]:
    """Which container lists to look at, and the names of containers that must not change."""
    resource = request.get("resource") or {}
    if resource.get("resource") != "pods" or resource.get("group", ""):
        return None, frozenset()
    sub = request.get("subResource") or ""
    op = request.get("operation")
    if op == "CREATE" and sub == "":
        return CONTAINER_FIELDS, frozenset()
    if op == "UPDATE" and sub == "ephemeralcontainers":
        old = request.get("oldObject") or {}
        existing = (old.get("spec") or {}).get("ephemeralContainers") or ()
        return ("ephemeralContainers",), frozenset(str(c.get("name")) for c in existing if isinstance(c, dict))
    return None, frozenset()
