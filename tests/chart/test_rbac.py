"""Every RBAC rule the chart renders, against the expected table (#16 items 5, 6). Each grant is
justified in docs/security.md ("Who may do what"); a new or wider rule fails here until it is added to
both. Names are relative to the release's fullname (`t-cluster-registry-`)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.chart.chartlib import render

EVERYTHING = ("enableEarlyLoading=true", "earlyLoading.images[0]=myacr.azurecr.io/nginx:1.0.0", "enableLocalRegistry=true",
              "serviceMonitor.enabled=true", "networkPolicy.enabled=true")  # fmt: skip
PREFIX = "t-cluster-registry-"

Rule = tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...], tuple[str, ...]]  # groups, resources, verbs, names

# (kind, name) -> rules: (apiGroups, resources, sorted verbs, resourceNames)
EXPECTED: dict[tuple[str, str], set[Rule]] = {
    ("ClusterRole", "artifact-reconciler"): {
        (('clusterregistry.io',), ('artifacts',), ('list', 'watch'), ()),
        (('clusterregistry.io',), ('artifacts/status',), ('patch',), ()),
        (('',), ('secrets',), ('get',), ()),
        (('', 'events.k8s.io'), ('events',), ('create', 'patch'), ()),
    },
    ("Role", "artifact-reconciler"): {
        (('coordination.k8s.io',), ('leases',), ('create', 'get', 'list', 'patch', 'update', 'watch'), ()),
        (('', 'events.k8s.io'), ('events',), ('create', 'patch'), ()),
    },
    ("ClusterRole", "certs"): {
        (('admissionregistration.k8s.io',), ('mutatingwebhookconfigurations',), ('get', 'patch', 'update'), ('webhook',)),
    },
    ("Role", "certs"): {
        (('',), ('secrets',), ('get', 'patch', 'update'), ('webhook-tls', 'registry-tls')),
        # registryTLS: a renewed certificate restarts the registry (distribution reads it at start)
        (('apps',), ('deployments',), ('patch',), ('registry',)),
    },
    ("ClusterRole", "component-reconciler"): {
        (('clusterregistry.io',), ('components',), ('get', 'list', 'patch', 'update', 'watch'), ()),
        (('clusterregistry.io',), ('components/status',), ('get', 'patch', 'update'), ()),
        (('clusterregistry.io',), ('artifacts',), ('create', 'delete', 'get', 'list', 'patch', 'update', 'watch'), ()),
        (('',), ('secrets',), ('get',), ()),
        (('', 'events.k8s.io'), ('events',), ('create', 'patch'), ()),
    },
    ("Role", "component-reconciler"): {
        (('coordination.k8s.io',), ('leases',), ('create', 'get', 'list', 'patch', 'update', 'watch'), ()),
        (('', 'events.k8s.io'), ('events',), ('create', 'patch'), ()),
    },
    ("ClusterRole", "gc"): {
        (('',), ('pods', 'replicationcontrollers'), ('list',), ()),
        (('apps',), ('replicasets', 'deployments', 'statefulsets', 'daemonsets', 'controllerrevisions'), ('get', 'list'), ()),
        (('batch',), ('jobs', 'cronjobs'), ('get', 'list'), ()),
        (('clusterregistry.io',), ('artifacts',), ('delete', 'get', 'list'), ()),
        (('clusterregistry.io',), ('components',), ('list',), ()),
        (('events.k8s.io',), ('events',), ('create',), ()),
    },
    ("Role", "gc"): {
        (('coordination.k8s.io',), ('leases',), ('create', 'delete', 'get', 'list', 'patch', 'update', 'watch'), ()),
        (('events.k8s.io',), ('events',), ('create',), ()),
    },
    ("ClusterRole", "hooks"): {
        (('',), ('nodes',), ('list',), ()),
        (('storage.k8s.io',), ('storageclasses',), ('list',), ()),
        (('admissionregistration.k8s.io',), ('mutatingwebhookconfigurations',), ('get', 'patch', 'update'), ('webhook',)),
    },
    ("Role", "hooks"): {
        (('',), ('persistentvolumeclaims',), ('get', 'list'), ()),
        (('',), ('secrets',), ('create',), ()),
        (('',), ('secrets',), ('get', 'patch', 'update'),
         ('webhook-tls', 'registry', 'registry-tls', 'registry-token', 'registry-push-artifact-reconciler',
          'registry-push-sideload', 'registry-push-gc')),
        (('apps',), ('deployments',), ('patch',), ('registry',)),
        (('clusterregistry.io',), ('components', 'artifacts'), ('create', 'get', 'list', 'patch', 'update', 'watch'), ()),
        (('clusterregistry.io',), ('artifacts/status',), ('get', 'patch', 'update'), ()),
        (('',), ('configmaps',), ('get',), ('early-loading',)),
    },
    ("Role", "registry"): {
        # the token service: the pull keys and each pusher's credential, by name
        (('',), ('secrets',), ('get',),
         ('pull-keys', 'registry-push-artifact-reconciler', 'registry-push-sideload', 'registry-push-gc')),
        (('coordination.k8s.io',), ('leases',), ('get', 'list', 'watch'), ('gc',)),
        (('coordination.k8s.io',), ('leases',), ('create', 'delete', 'get', 'update'), ()),
    },
    ("ClusterRole", "webhook"): {
        (('',), ('pods',), ('list', 'watch'), ()),
        (('clusterregistry.io',), ('artifacts',), ('create', 'get', 'list', 'patch', 'watch'), ()),
        (('',), ('serviceaccounts',), ('get',), ()),
        (('apps',), ('replicasets', 'deployments', 'statefulsets', 'daemonsets'), ('get',), ()),
        (('batch',), ('jobs', 'cronjobs'), ('get',), ()),
    },
    ("Role", "webhook"): {
        (('coordination.k8s.io',), ('leases',), ('create',), ()),
        (('coordination.k8s.io',), ('leases',), ('get', 'update'), ('webhook',)),
    },
}


def rules(docs: list[dict[str, Any]]) -> dict[tuple[str, str], set[Rule]]:
    got: dict[tuple[str, str], set[Rule]] = {}
    for d in docs:
        if d["kind"] in ("Role", "ClusterRole"):
            key = (d["kind"], d["metadata"]["name"].removeprefix(PREFIX))
            got[key] = {
                (tuple(r["apiGroups"]), tuple(r["resources"]), tuple(sorted(r["verbs"])),
                 tuple(n.removeprefix(PREFIX) for n in r.get("resourceNames") or ()))
                for r in d["rules"]
            }  # fmt: skip
    return got


def test_rbac_rules_are_exactly_the_expected_table() -> None:
    assert rules(render(*EVERYTHING, "registryAccess.mode=shared")) == EXPECTED


# registryAccess isolated (#15): the artifact reconciler keeps a pull Secret in each namespace with an
# Artifact (create anywhere, update only Secrets of that name); the rotation CronJob updates the key Secret.
ISOLATED = {
    **EXPECTED,
    ("ClusterRole", "artifact-reconciler"): EXPECTED[("ClusterRole", "artifact-reconciler")] | {
        (('',), ('secrets',), ('create',), ()),
        (('',), ('secrets',), ('update',), ('cluster-registry-pull',)),
    },
    ("Role", "pull-keys"): {(('',), ('secrets',), ('get', 'update'), ('pull-keys',))},
    # the token service grants a namespace pull on what its Artifacts have Ready
    ("ClusterRole", "registry"): {(('clusterregistry.io',), ('artifacts',), ('list', 'watch'), ())},
}


def test_isolated_access_adds_only_the_pull_secret_grants() -> None:
    assert rules(render(*EVERYTHING)) == ISOLATED  # isolated is the default


@pytest.mark.parametrize(
    ("component", "forbidden"),
    [
        ("artifact-reconciler", {("artifacts", "update"), ("artifacts", "patch"), ("secrets", "list"), ("secrets", "watch")}),
        ("component-reconciler", {("secrets", "list"), ("secrets", "watch")}),
        ("gc", {("artifacts", "patch"), ("artifacts/status", "patch")}),
        ("hooks", {("mutatingwebhookconfigurations", "create")}),
        ("webhook", {("secrets", "get"), ("artifacts", "update"), ("artifacts", "delete")}),
    ],
)
def test_removed_grants_stay_removed(component: str, forbidden: set[tuple[str, str]]) -> None:
    """Item 6 of #16, one by one (the table above says it too, this says why a diff fails)."""
    granted = {(res, verb) for (kind, name), rs in rules(render(*EVERYTHING)).items() if name == component
               for _, resources, verbs, _names in rs for res in resources for verb in verbs}  # fmt: skip
    assert not granted & forbidden


def test_registry_leases_the_lock_only_by_name_and_the_token_only_in_the_token_service() -> None:
    docs = render()
    registry = rules(docs)[("Role", "registry")]
    assert ((("coordination.k8s.io",), ("leases",), ("get", "list", "watch"), ("gc",))) in registry
    dep = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == PREFIX + "registry")
    spec = dep["spec"]["template"]["spec"]
    assert spec["automountServiceAccountToken"] is False
    mounts = {c["name"]: {m["mountPath"] for m in c.get("volumeMounts", [])} for c in spec["containers"]}
    token = "/var/run/secrets/kubernetes.io/serviceaccount"
    assert token in mounts["token"] and token not in mounts["registry"]


def test_hook_objects_are_deleted_when_a_hook_fails_too() -> None:
    """A failed install must not leave the hooks' ServiceAccount and its grants behind."""
    for d in render(*EVERYTHING):
        policy = (d["metadata"].get("annotations") or {}).get("helm.sh/hook-delete-policy")
        if policy is not None and d["kind"] in ("ServiceAccount", "Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"):
            assert "hook-failed" in policy.split(","), d["metadata"]["name"]
