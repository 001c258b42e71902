"""Issue 15: one namespace cannot pull another's private images, seen from a real node.

One release in isolated mode (`registryAccess.mode: isolated`, the chart's default) and two tenant namespaces, A and B. The
artifact store's front (tests/support/cnf.py) serves `private/` only with its credentials, which only B
has (its pull Secret); `cnf/` anonymously. Every attack is an HTTP request made from the network
namespace of a real node (tests/support/podview.py), to the endpoint the node's runtime pulls from
(the node proxy, 127.0.0.1:5050) and to the token realm the registry names there: what a process on
the node, or a pod's pull through its node, can reach. Tokens are asked for as a runtime asks (basic
credentials at the realm) with no credential, A's own pull credential and B's; forged ones are signed
with another key, expired, or made for another service.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cluster_registry.gate import tokens
from cluster_registry.gate.access import Scope
from tests.support import cnf, podview
from tests.support.cluster import Cluster, component_pods, exclusive_chart, wait_for
from tests.support.inpod import container_pid, node_netns, ready_registry_pod, single_replica_values
from tests.support.ociimages import Image, push_image
from tests.support.podview import from_netns

NODE_ENDPOINT = "127.0.0.1:5050"  # the node proxy: the rewrite target
PULL_SECRET = cnf.REGISTRY_PULL_SECRET
RECONCILER_CREDENTIALS = "/etc/cluster-registry/credentials/credentials.yaml"  # its push credential, mounted
USER_NODES = {"kubernetes.azure.com/mode": "user"}  # kwok: the pods' images are never pulled there


@dataclass
class Iso:
    release: str
    ns: str
    a: str
    b: str
    store_host: str
    private: Image
    public: Image
    netns: str  # a real node's network namespace

    def source(self, image: Image) -> str:
        return f"{self.store_host}/{image.repo}:{image.tag}"

    def repo(self, image: Image) -> str:
        """The image's repository in the cluster registry (`<host>_<port>/<repo>`)."""
        return f"{self.store_host.replace(':', '_')}/{image.repo}"


@pytest.fixture(scope="module")
def iso(cluster: Cluster) -> Iterator[Iso]:
    sfx = secrets.token_hex(3)
    release, ns, store_ns, a, b = f"is{sfx[:4]}", f"e2e-iso-{sfx}", f"e2e-iso-store-{sfx}", f"e2e-iso-a-{sfx}", f"e2e-iso-b-{sfx}"
    for n in (ns, store_ns, a, b):
        cluster.kubectl("create", "namespace", n)
    front = cnf.StoreFront(cluster)
    front.start()
    pusher = cnf.store_pusher(cluster)
    private = push_image(pusher, f"private/iso-{sfx}", "1.0", layers=[4096, 2048], seed=151)
    public = push_image(pusher, f"cnf/iso-pub-{sfx}", "1.0", layers=[4096], seed=152)
    try:
        with exclusive_chart():
            store_host = cnf.expose_store(cluster, store_ns, front)
            cnf.pull_secret(cluster, b, store_host)
            values = single_replica_values()
            ext = values["global"]["networkfunctionextension"]
            ext["webhook"]["pod"]["mutation"]["matchConditionExpression"] = f"request.namespace in ['{a}', '{b}']"
            ext["artifactReconciler"]["insecureRegistries"] = [store_host]
            try:
                cnf.install_cluster_registry(cluster, release, ns, values)
                pod = ready_registry_pod(cluster, ns)
                yield Iso(release, ns, a, b, store_host, private, public, node_netns(pod))
            finally:
                cluster.helm("uninstall", release, "-n", ns, "--wait", "--timeout", "120s", check=False)
    finally:
        for n in (a, b, store_ns, ns):
            cluster.kubectl("delete", "namespace", n, "--wait=false", check=False)
        front.stop()


# -- helpers --------------------------------------------------------------------------------------


def tenant_pod(cluster: Cluster, namespace: str, image: str, *, pull_secret: str | None = None) -> dict[str, Any]:
    """A pod of IMAGE on a kwok node (recorded and rewritten by the webhook, never pulled); returns it as created."""
    name = f"p{secrets.token_hex(4)}"
    cluster.apply({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": namespace},
                   "spec": {"nodeSelector": USER_NODES, "terminationGracePeriodSeconds": 0,
                            **({"imagePullSecrets": [{"name": pull_secret}]} if pull_secret else {}),
                            "containers": [{"name": "c", "image": image}]}})
    return dict(cluster.kubectl_json("get", "pod", "-n", namespace, name))


def artifact(cluster: Cluster, namespace: str, source: str) -> dict[str, Any] | None:
    return next((x for x in cluster.kubectl_json("get", "artifacts.clusterregistry.io", "-n", namespace)["items"]
                 if x["spec"]["sourceArtifact"] == source), None)


def phase(cluster: Cluster, namespace: str, source: str) -> str:
    found = artifact(cluster, namespace, source)
    return str((found or {}).get("status", {}).get("phase", ""))


def wait_phase(cluster: Cluster, namespace: str, source: str, phases: set[str], timeout: float = 180) -> str:
    return str(wait_for(lambda: (p := phase(cluster, namespace, source)) in phases and p, timeout=timeout, interval=1,
                        what=f"the Artifact of {source} in {namespace} {'/'.join(sorted(phases))}"))


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class Node:
    """Requests from the node's network namespace to the registry endpoint and the realm it names."""

    def __init__(self, iso: Iso) -> None:
        self.netns = iso.netns
        self.challenge = podview.bearer_challenge(iso.netns, NODE_ENDPOINT)
        self.service = self.challenge["service"]

    def tokens(self, asks: list[tuple[str, tuple[str, str] | None]]) -> list[str | None]:
        return podview.tokens(self.netns, self.challenge, asks)

    def get(self, paths_and_tokens: list[tuple[str, str | None]]) -> list[int]:
        """Status of each GET on the registry endpoint with that token (None: no Authorization)."""
        accept = {"Accept": "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json"}
        reqs = [{"url": f"http://{NODE_ENDPOINT}{path}", "headers": {**accept, **(bearer(t) if t else {})}}
                for path, t in paths_and_tokens]
        return [int(r["status"]) for r in from_netns(self.netns, reqs)]


def reads(iso: Iso, image: Image) -> list[str]:
    """Every way to read IMAGE: its tag list, its manifest by tag and by digest, a layer."""
    repo = iso.repo(image)
    return [f"/v2/{repo}/tags/list", f"/v2/{repo}/manifests/{image.tag}", f"/v2/{repo}/manifests/{image.digest}",
            f"/v2/{repo}/blobs/{image.blobs[-1][0]}"]


def signing_key(cluster: Cluster, iso: Iso) -> bytes:
    secret = cluster.kubectl_json("get", "secret", "-n", iso.ns, f"{cnf.fullname(iso.release)}-registry-token")
    return base64.b64decode(secret["data"]["key.pem"])


# -- the tests ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def b_has_private(cluster: Cluster, iso: Iso) -> Iso:
    """B's pod names the private image with the store's credentials: copied, Ready for B."""
    tenant_pod(cluster, iso.b, iso.source(iso.private), pull_secret=cnf.PULL_SECRET)
    wait_phase(cluster, iso.b, iso.source(iso.private), {"Ready"})
    return iso


def test_a_cannot_read_bs_private_image_by_any_path_or_token(cluster: Cluster, b_has_private: Iso) -> None:
    iso = b_has_private
    node = Node(iso)
    b_creds = cnf.namespace_pull_credential(cluster, iso.b)
    # A has a pull credential too once it has an Artifact (a public image, Ready for A).
    tenant_pod(cluster, iso.a, iso.source(iso.public))
    wait_phase(cluster, iso.a, iso.source(iso.public), {"Ready"})
    a_creds = cnf.namespace_pull_credential(cluster, iso.a)
    scope = f"repository:{iso.repo(iso.private)}:pull"
    anon, a_token, b_token, a_catalog, anon_catalog = node.tokens(
        [(scope, None), (scope, a_creds), (scope, b_creds), ("registry:catalog:*", a_creds), ("registry:catalog:*", None)])
    assert b_token, "B gets a token for its own image"
    grant = (Scope("repository", iso.repo(iso.private), ("pull",)),)
    key = signing_key(cluster, iso)
    now = time.time()
    real = tokens.load_signer(key, "cluster-registry-token-service", node.service)
    forged = {
        "another key": tokens.issue(tokens.load_signer(tokens.new_private_key_pem(), real.issuer, real.service), "x", grant, 60, now),
        "expired": tokens.issue(real, "x", grant, 10, now - 90),  # dead 80 s ago: past distribution's 60 s leeway
        "another service": tokens.issue(tokens.load_signer(key, real.issuer, "elsewhere"), "x", grant, 60, now),
    }
    attempts: dict[str, str | None] = {"no credential": None, "anonymous token": anon, "A's token": a_token, **forged}
    paths = reads(iso, iso.private)
    results = node.get([(p, t) for t in attempts.values() for p in paths]
                       + [("/v2/_catalog", t) for t in (None, anon_catalog, a_catalog)]
                       + [(p, b_token) for p in paths])
    refused, catalog, b_reads = results[:-len(paths) - 3], results[-len(paths) - 3:-len(paths)], results[-len(paths):]
    by_attempt = {name: refused[i * len(paths):(i + 1) * len(paths)] for i, name in enumerate(attempts)}
    assert all(codes == [401] * len(paths) for codes in by_attempt.values()), by_attempt
    assert catalog == [401, 401, 401], "nobody but GC lists the catalog"
    assert b_reads == [200] * len(paths), "B reads its own image every way"
    # The same forgery machinery with the real key and service works: the refusals above are the forgeries'.
    assert node.get([(paths[2], tokens.issue(real, "x", grant, 60, time.time()))]) == [200]


def test_a_public_image_copied_for_b_is_pullable_by_a_only_once_as_artifact_is_ready(cluster: Cluster, iso: Iso) -> None:
    node = Node(iso)
    image = push_image(cnf.store_pusher(cluster), f"cnf/iso-shared-{secrets.token_hex(2)}", "1.0", layers=[2048], seed=153)
    tenant_pod(cluster, iso.b, iso.source(image))
    wait_phase(cluster, iso.b, iso.source(image), {"Ready"})
    tenant_pod(cluster, iso.a, iso.source(iso.public))  # A has a credential (its namespace has an Artifact)
    wait_phase(cluster, iso.a, iso.source(iso.public), {"Ready"})
    scope = f"repository:{iso.repo(image)}:pull"
    before = node.tokens([(scope, cnf.namespace_pull_credential(cluster, iso.a))])[0]
    assert node.get([(p, before) for p in reads(iso, image)]) == [401] * 4, "copied for B, not yet Ready for A"
    tenant_pod(cluster, iso.a, iso.source(image))
    wait_phase(cluster, iso.a, iso.source(image), {"Ready"})
    after = node.tokens([(scope, cnf.namespace_pull_credential(cluster, iso.a))])[0]
    assert node.get([(p, after) for p in reads(iso, image)]) == [200] * 4


def test_a_without_upstream_access_gets_no_ready_artifact_and_no_rewrite(cluster: Cluster, b_has_private: Iso) -> None:
    iso = b_has_private
    source = iso.source(iso.private)
    first = tenant_pod(cluster, iso.a, source)  # no pull secret: the store refuses A
    settled = wait_phase(cluster, iso.a, source, {"Failed", "Ready"}, timeout=240)
    assert settled == "Failed", "A's Artifact became Ready from B's copy"
    status = (artifact(cluster, iso.a, source) or {}).get("status", {})
    assert "digest" not in status, status
    assert {c.get("reason") for c in status.get("conditions", [])} & {"Authentication", "AccessDenied"}, status
    later = tenant_pod(cluster, iso.a, source)
    for pod in (first, later):
        assert [c["image"] for c in pod["spec"]["containers"]] == [source], "A's pod was rewritten"
        assert not any(s["name"] == PULL_SECRET for s in pod["spec"].get("imagePullSecrets", []))
    b_pod = tenant_pod(cluster, iso.b, source, pull_secret=cnf.PULL_SECRET)
    assert b_pod["spec"]["containers"][0]["image"].startswith(f"{NODE_ENDPOINT}/"), "B's pods are rewritten"
    assert {"name": PULL_SECRET} in b_pod["spec"]["imagePullSecrets"], "with B's pull credential"


def test_tag_at_digest_cannot_repoint_a_shared_tag(cluster: Cluster, iso: Iso) -> None:
    node, pusher, repo = Node(iso), cnf.store_pusher(cluster), f"cnf/iso-tag-{secrets.token_hex(2)}"
    old = push_image(pusher, repo, "1.0", layers=[1024], seed=155)
    new = push_image(pusher, repo, "1.0", layers=[1024], seed=156)  # the store's 1.0 moves on; old stays by digest
    tenant_pod(cluster, iso.b, iso.source(new))
    wait_phase(cluster, iso.b, iso.source(new), {"Ready"})
    pinned = f"{iso.source(old)}@{old.digest}"
    tenant_pod(cluster, iso.a, pinned)
    wait_phase(cluster, iso.a, pinned, {"Ready"})
    token = node.tokens([(f"repository:{iso.repo(new)}:pull", cnf.namespace_pull_credential(cluster, iso.b))])[0]
    accept = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
    by_tag = from_netns(iso.netns, [{"url": f"http://{NODE_ENDPOINT}/v2/{iso.repo(new)}/manifests/1.0",
                                     "headers": {**accept, **bearer(str(token))}}])[0]
    assert by_tag["status"] == 200 and by_tag["digest"] == new.digest, "the shared tag was repointed"
    a_pod = tenant_pod(cluster, iso.a, pinned)
    assert a_pod["spec"]["containers"][0]["image"].endswith(f"/{iso.repo(old)}:1.0@{old.digest}"), "A runs what was copied"


def registry_pods(cluster: Cluster, ns: str) -> dict[str, tuple[str, int]]:
    """{pod/container: (pod UID, restarts)} of the registry and the artifact reconciler: a rotation restarts none."""
    return {f"{p['metadata']['name']}/{c['name']}": (p["metadata"]["uid"], c["restartCount"])
            for component in ("registry", "artifact-reconciler") for p in component_pods(cluster, ns, component)
            for c in p["status"]["containerStatuses"]}


def test_pull_key_rotation_keeps_pulls_working_with_no_restart(cluster: Cluster, b_has_private: Iso) -> None:
    iso = b_has_private
    node, before, old = Node(iso), registry_pods(cluster, iso.ns), cnf.namespace_pull_credential(cluster, iso.b)
    scope, manifest = f"repository:{iso.repo(iso.private)}:pull", reads(iso, iso.private)[2]
    job = f"rotate-{secrets.token_hex(2)}"
    cluster.kubectl("create", "job", job, f"--from=cronjob/{cnf.fullname(iso.release)}-pull-keys", "-n", iso.ns)
    cluster.kubectl("wait", "--for=condition=complete", f"job/{job}", "-n", iso.ns, "--timeout=120s", timeout=150)
    new = wait_for(lambda: (c := cnf.namespace_pull_credential(cluster, iso.b)) != old and c, timeout=120, interval=2,
                   what="B's pull Secret rewritten with the new key")
    for creds in (old, new):  # both keys are valid until the next rotation
        token = wait_for(lambda c=creds: node.tokens([(scope, c)])[0], timeout=30, what="a token")  # type: ignore[misc]
        assert node.get([(manifest, token)]) == [200]
    assert registry_pods(cluster, iso.ns) == before, "a rotation restarted something"


def test_push_credential_rotation_keeps_copies_working_with_no_restart(cluster: Cluster, b_has_private: Iso) -> None:
    iso = b_has_private
    node, before = Node(iso), registry_pods(cluster, iso.ns)
    name = f"{cnf.fullname(iso.release)}-registry-push-artifact-reconciler"
    user, old = cnf.registry_credentials(cluster, iso.ns, iso.release)
    new = secrets.token_urlsafe(32)
    doc = base64.b64encode((json.dumps({"username": user, "password": new}) + "\n").encode()).decode()
    cluster.kubectl("patch", "secret", name, "-n", iso.ns, "--type=merge", "-p", json.dumps({"data": {"credentials.yaml": doc}}))
    scope = "repository:e2e/rotation:pull,push"
    wait_for(lambda: node.tokens([(scope, (user, new))])[0] and not node.tokens([(scope, (user, old))])[0],
             timeout=60, interval=2, what="the token service taking the new push password and refusing the old")
    # The kubelet updates the reconciler's mounted copy of the Secret on its own schedule (about a minute):
    # wait for the file itself, read through the container's root (a host process on a real node).
    reconciler = component_pods(cluster, iso.ns, "artifact-reconciler")[0]
    mounted = f"/proc/{container_pid(cluster, reconciler, reconciler['spec']['containers'][0]['name'])}/root{RECONCILER_CREDENTIALS}"
    wait_for(lambda: new in Path(mounted).read_text(), timeout=180, interval=2, what="the reconciler's mounted credential updated")
    image = push_image(cnf.store_pusher(cluster), f"cnf/iso-rot-{secrets.token_hex(2)}", "1.0", layers=[1024], seed=154)
    tenant_pod(cluster, iso.b, iso.source(image))
    wait_phase(cluster, iso.b, iso.source(image), {"Ready"}, timeout=120)  # copied with the new password
    assert registry_pods(cluster, iso.ns) == before, "a rotation restarted something"
