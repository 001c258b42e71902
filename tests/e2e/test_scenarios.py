"""Issue 9: the operator's scenarios end to end on the local control plane, on the chart's own pods.

One install of chart/ (real helm, `--wait --wait-for-jobs`, its pods run on the real system nodes; its
default isolated registry access: nodes pull with the namespace's pull Secret) and one
sample CNF (examples/sample-cnf, published to the artifact store as an OCI chart with `helm push`)
are shared by the scenarios, which run in this file's order:

1 lazy loading -> 8 `kubectl get artifacts -A -o jsonpath` -> 7 webhook outage -> 6 HA (spread,
eviction) -> 2 early loading (Component of the chart, `rewritePolicy: Always`) -> 3 disconnected
drill -> 4 GC -> 5 upgrades.

The artifact store is reached by the cluster through a proxy this module starts (tests/support/cnf.py
StoreFront), which the drill turns offline (every connection reset): stopping the shared artifact
store of ci/localcluster would break every other test that runs at the same time, and `ci/localcluster`
has no subcommand to stop one component.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from cluster_registry import reference
from tests.support import cnf, podview
from tests.support.cluster import Cluster, CommandError, component_pods, exclusive_chart, pod_ready, three_ready, wait_for

GROUP = "clusterregistry.io"
CNF = "cnf"  # the CNF's release name in every CNF namespace


@dataclass
class Env:
    release: str
    namespace: str  # the cluster registry's
    cnf_ns: str  # lazy loading
    early_ns: str  # early loading
    store_host: str  # the artifact store as pods reach it (the StoreFront's Service)
    images: dict[str, cnf.CnfImage]
    chart_ref: str
    front: cnf.StoreFront
    values: dict[str, Any]
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def registry_host(self) -> str:
        return "127.0.0.1:5050"  # the chart's default rewrite target: the node proxy (docs/pull-path.md)

    def source(self, key: str) -> str:
        return self.images[key].source(self.store_host)

    def rewritten(self, key: str) -> str:
        return str(reference.rewrite(reference.parse(self.source(key)), self.registry_host))

    def pinned(self, key: str) -> str:
        """What the webhook writes into a pod: the rewritten reference pinned to the digest its copy verified."""
        ref = reference.rewrite(reference.parse(self.source(key)), self.registry_host)
        return str(ref) if ref.digest else f"{ref}@{self.images[key].digest}"


@pytest.fixture(scope="module")
def env(cluster: Cluster) -> Iterator[Env]:
    suffix = secrets.token_hex(3)
    release, namespace = f"cr{suffix[:4]}", f"crs-{suffix}"
    cnf_ns, early_ns = f"cnf-lazy-{suffix}", f"cnf-early-{suffix}"
    for ns in (namespace, cnf_ns, early_ns):
        cluster.kubectl("create", "namespace", ns)
    front = cnf.StoreFront(cluster).start()
    with exclusive_chart():  # one release at a time (the CRDs, every node's 127.0.0.1:5050)
        try:
            pub = cnf.publish_cnf(cluster, front, [cnf_ns, early_ns])
            cnf.install_cluster_registry(cluster, release, namespace, pub.values)
            cnf.wait_replicas(cluster, namespace)
            e = Env(release, namespace, cnf_ns, early_ns, pub.store_host, pub.images, pub.chart_ref, front, pub.values)
            yield e
        finally:
            for ns in (cnf_ns, early_ns):
                cluster.helm("uninstall", CNF, "-n", ns, "--wait", "--timeout", "60s", check=False)
            cluster.helm("uninstall", release, "-n", namespace, "--wait", "--timeout", "120s", check=False)
            for ns in (cnf_ns, early_ns, namespace):
                cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)
            front.stop()


# -- helpers ---------------------------------------------------------------------------------------


def artifacts(cluster: Cluster, namespace: str) -> dict[str, dict[str, Any]]:
    """The Artifacts of NAMESPACE by sourceArtifact."""
    items = cluster.kubectl_json("get", f"artifacts.{GROUP}", "-n", namespace)["items"]
    return {a["spec"]["sourceArtifact"]: a for a in items}


def live_pods(cluster: Cluster, namespace: str, selector: str = "app.kubernetes.io/part-of=sample-cnf") -> list[dict[str, Any]]:
    items = cluster.kubectl_json("get", "pods", "-n", namespace, "-l", selector)["items"]
    return [p for p in items if not p["metadata"].get("deletionTimestamp")]


def images_of(pod: dict[str, Any]) -> dict[str, str]:
    spec = pod["spec"]
    return {c["name"]: c["image"] for c in spec.get("initContainers", []) + spec["containers"]}


def running(pod: dict[str, Any]) -> bool:
    return pod["status"].get("phase") in ("Running", "Succeeded")




def scale_frontend(cluster: Cluster, namespace: str, replicas: int, what: str) -> list[dict[str, Any]]:
    """Scale the sample CNF's frontend to REPLICAS; return the frontend pods that scaling created."""
    before = {p["metadata"]["uid"] for p in live_pods(cluster, namespace)}
    cluster.kubectl("scale", "deployment", f"{CNF}-frontend", "-n", namespace, f"--replicas={replicas}")
    return wait_for(lambda: [p for p in live_pods(cluster, namespace, "app.kubernetes.io/name=frontend")
                             if p["metadata"]["uid"] not in before], timeout=60, interval=1, what=what)


def expect_rewritten(env: Env, pod: dict[str, Any]) -> None:
    for container, image in images_of(pod).items():
        assert image == env.pinned(container), (pod["metadata"]["name"], container, image)
    # isolated access: the namespace's pull Secret, which the node's runtime pulls the rewritten images with
    assert {"name": cnf.REGISTRY_PULL_SECRET} in pod["spec"].get("imagePullSecrets", []), pod["metadata"]["name"]


def trigger(cluster: Cluster, namespace: str, cronjob: str, job: str) -> None:
    cluster.kubectl("create", "job", job, f"--from=cronjob/{cronjob}", "-n", namespace)


def pull_everything(env: Env, cluster: Cluster, keys: list[str]) -> None:
    """Every rewritten reference of KEYS pulls from every registry replica with the store's digest, with
    the lazy CNF namespace's pull credential (as its pods' pulls are made)."""
    endpoints = cnf.registry_endpoints(cluster, env.namespace)
    assert len(endpoints) >= 2, endpoints
    creds = cnf.namespace_pull_credential(cluster, env.cnf_ns)
    for n, key in enumerate(keys):
        for m, endpoint in enumerate(endpoints):
            if (n + m) % len(endpoints) == 0:  # one full pull per image, the others by manifest
                got = cnf.pull(env.rewritten(key), endpoint, creds)
            else:
                got = reference_digest(cnf.inspect_raw(env.rewritten(key), endpoint, creds))
            assert got == env.images[key].digest, (key, endpoint)


def reference_digest(raw: bytes) -> str:
    import hashlib

    return "sha256:" + hashlib.sha256(raw).hexdigest()


def registry_status(endpoint: str, path: str, accept: str, creds: tuple[str, str]) -> int:
    """GET PATH at ENDPOINT as a node's runtime would: with a pull token for CREDS from the realm the
    registry's challenge names. (GET, not HEAD: podview retries over https on the body of the
    registry's refusal of plain HTTP, with registryTLS.)"""
    challenge = podview.bearer_challenge(cnf.NODE_NETNS, endpoint)
    repo = path.split("/v2/", 1)[1].rsplit("/manifests/", 1)[0]
    token = podview.tokens(cnf.NODE_NETNS, challenge, [(f"repository:{repo}:pull", creds)])[0]
    assert token, f"no pull token for {repo}"
    answer = podview.from_netns(cnf.NODE_NETNS, [{"url": f"http://{endpoint}{path}", "method": "GET",
                                                  "headers": {"Accept": accept, "Authorization": f"Bearer {token}"}}])
    return int(answer[0]["status"])


def ready_condition(obj: dict[str, Any]) -> dict[str, Any]:
    return next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == "Ready"), {})


def all_ready(cluster: Cluster, namespace: str, sources: set[str]) -> dict[str, dict[str, Any]] | None:
    arts = artifacts(cluster, namespace)
    if not sources <= set(arts) or any(arts[s].get("status", {}).get("phase") != "Ready" for s in sources):
        return None
    return arts


def wait_ready(cluster: Cluster, namespace: str, sources: set[str], timeout: float) -> dict[str, dict[str, Any]]:
    try:
        return wait_for(lambda: all_ready(cluster, namespace, sources), timeout=timeout, interval=2,
                        what="every Artifact Ready")
    except TimeoutError as e:
        arts = artifacts(cluster, namespace)
        state = {s: (arts.get(s, {}).get("status", {}).get("phase"), ready_condition(arts.get(s, {})).get("message"))
                 for s in sorted(sources)}
        raise AssertionError(f"Artifacts not Ready after {timeout:.0f}s: {json.dumps(state, indent=1)}") from e


# -- 1. lazy loading -------------------------------------------------------------------------------


def test_scenario_1_lazy_loading(cluster: Cluster, env: Env) -> None:
    ns = env.cnf_ns
    cnf.install_cnf(cluster, CNF, ns, env.chart_ref)
    trigger(cluster, ns, f"{CNF}-reporter", "reporter-first")
    sources = {env.source(k) for k in env.images}

    # Artifacts: one per image, the right source, the pods' top owner, the private image's pull secret.
    arts = wait_for(lambda: (lambda a: a if sources <= set(a) else None)(artifacts(cluster, ns)),
                    timeout=60, interval=1, what="an Artifact per CNF image")
    for key, img in env.images.items():
        art = arts[env.source(key)]
        assert art["metadata"]["name"] == reference.artifact_name(env.source(key))
        owners = {(o["kind"], o["name"]) for o in art["spec"].get("owners", [])}
        assert owners == {(img.owner_kind, f"{CNF}-{img.owner}")}, (key, art["spec"])
        assert (art["spec"].get("pullSecrets") or []) == ([cnf.PULL_SECRET] if key == "reporter" else []), (key, art["spec"])

    # The first pods were created before any copy was Ready: WhenReady leaves them on the store.
    first = live_pods(cluster, ns)
    assert first and all(i.startswith(env.store_host + "/") for p in first for i in images_of(p).values())

    arts = wait_ready(cluster, ns, sources, timeout=240)
    for key, img in env.images.items():
        status = arts[env.source(key)]["status"]
        assert status["digest"] == img.digest, (key, status)
        assert ready_condition(arts[env.source(key)]).get("status") == "True"
        assert int(status["size"]) > 0
    assert len(arts[env.source("agent")]["status"].get("platforms", [])) == 2

    # Pods created afterwards are rewritten: scale up, replace a pod of each owner, run the CronJob.
    old = {p["metadata"]["uid"] for p in live_pods(cluster, ns)}
    cluster.kubectl("scale", "deployment", f"{CNF}-frontend", "-n", ns, "--replicas=3")
    for component in ("backend", "agent"):
        victim = live_pods(cluster, ns, f"app.kubernetes.io/name={component}")[0]
        cluster.kubectl("delete", "pod", "-n", ns, victim["metadata"]["name"], "--wait=false")
    trigger(cluster, ns, f"{CNF}-reporter", "reporter-second")

    def new_pods() -> list[dict[str, Any]] | None:
        fresh = [p for p in live_pods(cluster, ns) if p["metadata"]["uid"] not in old]
        names = {p["metadata"]["labels"]["app.kubernetes.io/name"] for p in fresh}
        return fresh if names >= {"frontend", "backend", "agent", "reporter"} else None

    fresh = wait_for(new_pods, timeout=60, interval=1, what="new pods of every owner")
    for pod in fresh:
        expect_rewritten(env, pod)

    # A node pulls every rewritten reference from the cluster registry: digests match the store's.
    pull_everything(env, cluster, list(env.images))
    with pytest.raises(CommandError) as refused:  # isolated: an anonymous pull is refused
        cnf.inspect_raw(env.rewritten("frontend"), cnf.registry_endpoints(cluster, env.namespace)[0], None)
    assert "unauthorized" in refused.value.stderr.lower(), refused.value.stderr
    store = cnf.store_pusher(cluster)
    for key, img in env.images.items():
        ref = reference.parse(env.source(key))
        got = store.get_manifest(img.repo, ref.pull_ref)
        assert got is not None and reference_digest(got[0]) == img.digest


# -- 8. the sources, as an operator lists them -----------------------------------------------------


def test_scenario_8_kubectl_lists_artifact_sources(cluster: Cluster, env: Env) -> None:
    printed = cluster.kubectl("get", "artifacts", "-A", "-o", "jsonpath={range .items[*]}{.spec.sourceArtifact}")
    for key in env.images:
        assert env.source(key) in printed, key
    lines = cluster.kubectl("get", "artifacts", "-A", "-o", 'jsonpath={range .items[*]}{.spec.sourceArtifact}{"\\n"}{end}')
    assert {env.source(k) for k in env.images} <= set(lines.splitlines())


# -- 7. webhook outage -----------------------------------------------------------------------------


def test_scenario_7_webhook_outage(cluster: Cluster, env: Env) -> None:
    ns, rns = env.cnf_ns, env.namespace
    webhook = f"{cnf.fullname(env.release)}-webhook"
    cluster.kubectl("scale", "deployment", webhook, "-n", rns, "--replicas=0")
    try:
        wait_for(lambda: not component_pods(cluster, rns, "webhook"), timeout=90, interval=1, what="no webhook pod")
        added = scale_frontend(cluster, ns, 4, "a frontend pod created while the webhook is down")
        # failurePolicy Ignore: the pod was created, and not by way of our webhook (its images do not
        # point at our registry). Not "== the store's references": another chart release installed by
        # a concurrent test with the default matchConditions may rewrite them to its own registry.
        for pod in added:
            assert set(images_of(pod)) == {"init", "frontend"}
            assert not [i for i in images_of(pod).values() if i.startswith(env.registry_host + "/")], images_of(pod)
    finally:
        cluster.kubectl("scale", "deployment", webhook, "-n", rns, "--replicas=3")
    three_ready(cluster, rns, "webhook", timeout=180)
    # The API server calls the webhook again once its endpoints reach it (seconds after Ready): probe
    # with server-side dry-run pods until one comes back rewritten.
    wait_for(lambda: json.loads(cluster.kubectl(
        "run", "probe", "-n", ns, f"--image={env.source('frontend')}", "--restart=Never", "--dry-run=server",
        "-o", "json"))["spec"]["containers"][0]["image"] == env.pinned("frontend"),
        timeout=60, interval=2, what="the webhook answering the API server again")
    added = scale_frontend(cluster, ns, 5, "a frontend pod created after the webhook is back")
    for pod in added:
        expect_rewritten(env, pod)
    cluster.kubectl("scale", "deployment", f"{CNF}-frontend", "-n", ns, "--replicas=2")


# -- 6. HA -----------------------------------------------------------------------------------------


def evict_at_once(cluster: Cluster, namespace: str, pods: list[str]) -> list[tuple[int, str]]:
    """Evict PODS through the eviction API one right after the other (no kubectl start-up in between, so
    the replacement of the first is not Ready yet): (HTTP status, message) per pod."""
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    core = client.CoreV1Api(cluster.api_client())
    out: list[tuple[int, str]] = []
    for pod in pods:
        body = client.V1Eviction(metadata=client.V1ObjectMeta(name=pod, namespace=namespace))
        try:
            core.create_namespaced_pod_eviction(pod, namespace, body)
            out.append((201, "evicted"))
        except ApiException as e:
            out.append((int(e.status), str(e.body)))
    return out


def test_scenario_6_high_availability(cluster: Cluster, env: Env) -> None:
    rns = env.namespace
    system = {n["metadata"]["name"] for n in cluster.kubectl_json("get", "nodes", "-l", "kubernetes.azure.com/mode=system")["items"]}
    assert len(system) == 3
    for component in ("registry", "webhook"):
        pods = three_ready(cluster, rns, component, timeout=180)
        assert {p["spec"]["nodeName"] for p in pods} == system, f"{component}: one replica per system node"
        pdb = cluster.kubectl_json("get", "pdb", "-n", rns, f"{cnf.fullname(env.release)}-{component}")
        assert pdb["spec"]["minAvailable"] == 2
        wait_for(lambda c=component: cluster.kubectl_json("get", "pdb", "-n", rns, f"{cnf.fullname(env.release)}-{c}")
                 ["status"].get("disruptionsAllowed") == 1, timeout=60, interval=1, what=f"{component} PDB allows 1")
        (first, _), (second, why) = evict_at_once(cluster, rns, [p["metadata"]["name"] for p in pods[:2]])
        assert first == 201, "the first eviction leaves 2 of 3: allowed"
        assert second == 429 and "disruption budget" in why, (component, second, why)
        # The Deployment replaces the evicted pod; HA is whole again.
        three_ready(cluster, rns, component, timeout=180)


# -- 2. early loading ------------------------------------------------------------------------------


def test_scenario_2_early_loading(cluster: Cluster, env: Env) -> None:
    ns = env.early_ns
    values = cnf.cluster_registry_values([env.cnf_ns, env.early_ns], env.store_host, rewrite_policy="Always")
    cnf.upgrade_cluster_registry(cluster, env.release, env.namespace, values)
    env.values = values
    mwc = cluster.kubectl_json("get", "deployment", "-n", env.namespace, f"{cnf.fullname(env.release)}-webhook")
    assert "Always" in mwc["spec"]["template"]["spec"]["containers"][0]["args"]
    try:
        chart = f"oci://{env.store_host}/{cnf.CHART_REPO}/{cnf.CHART_NAME}"
        cluster.apply({"apiVersion": f"{GROUP}/v1alpha1", "kind": "Component",
                       "metadata": {"name": "sample-cnf", "namespace": ns},
                       "spec": {"chart": {"ref": chart, "version": cnf.chart_version(), "pullSecrets": [cnf.PULL_SECRET]},
                                "pullSecrets": [cnf.PULL_SECRET]}})

        def component_ready() -> dict[str, Any] | None:
            obj = cluster.kubectl_json("get", f"components.{GROUP}", "-n", ns, "sample-cnf")
            return obj if ready_condition(obj).get("status") == "True" else None

        try:
            comp = wait_for(component_ready, timeout=240, interval=2, what="the Component Ready")
        except TimeoutError as e:
            obj = cluster.kubectl_json("get", f"components.{GROUP}", "-n", ns, "sample-cnf")
            raise AssertionError(f"Component not Ready: {json.dumps(obj.get('status'))}") from e
        sources = {env.source(k) for k in env.images}
        assert {i["sourceArtifact"] for i in comp["status"]["images"]} == sources
        assert all_ready(cluster, ns, sources), "every image Ready before the CNF is installed"

        cnf.install_cnf(cluster, CNF, ns, env.chart_ref)
        trigger(cluster, ns, f"{CNF}-reporter", "reporter-first")
        pods = wait_for(lambda: (lambda ps: ps if {p["metadata"]["labels"]["app.kubernetes.io/name"] for p in ps}
                                 >= {"frontend", "backend", "agent", "reporter"} else None)(live_pods(cluster, ns)),
                        timeout=60, interval=1, what="the early CNF's pods")
        for pod in pods:  # every pod, at its first creation
            expect_rewritten(env, pod)
    finally:
        # Leave the lazy CNF as the only user of its images (scenario 4 collects them).
        cluster.helm("uninstall", CNF, "-n", ns, "--wait", "--timeout", "60s", check=False)
        cluster.kubectl("delete", f"components.{GROUP}", "-n", ns, "--all", "--wait=true", check=False, timeout=60)
        # Quiet before the drill: no pod left to make the webhook record an Artifact here again.
        cluster.kubectl("delete", "jobs,pods", "-n", ns, "--all", "--wait=true", check=False, timeout=60)
        wait_for(lambda: not cluster.kubectl("get", "pods", "-n", ns, "-o", "name").strip(), timeout=60,
                 what=f"no pod left in {ns}")
        cluster.kubectl("delete", f"artifacts.{GROUP}", "-n", ns, "--all", "--wait=true", check=False, timeout=60)


# -- 3. disconnected drill -------------------------------------------------------------------------


def test_scenario_3_disconnected_drill(cluster: Cluster, env: Env) -> None:
    ns = env.cnf_ns
    env.front.offline = True
    try:
        with pytest.raises(OSError):  # the store front resets every connection
            urllib.request.urlopen(f"http://{env.front.host}/v2/", timeout=5).read()  # noqa: S310
        old = {p["metadata"]["uid"] for p in live_pods(cluster, ns)}
        cluster.kubectl("delete", "pods", "-n", ns, "-l", "app.kubernetes.io/part-of=sample-cnf", "--wait=false")
        cluster.kubectl("scale", "deployment", f"{CNF}-frontend", "-n", ns, "--replicas=3")
        trigger(cluster, ns, f"{CNF}-reporter", "reporter-offline")

        def replaced() -> list[dict[str, Any]] | None:
            ps = live_pods(cluster, ns)
            if any(p["metadata"]["uid"] in old for p in ps):
                return None
            names = [p["metadata"]["labels"]["app.kubernetes.io/name"] for p in ps if running(p)]
            ok = names.count("frontend") == 3 and "backend" in names and names.count("agent") == 2 and "reporter" in names
            return ps if ok else None

        pods = wait_for(replaced, timeout=120, interval=1, what="every CNF pod replaced with the store down")
        for pod in pods:
            expect_rewritten(env, pod)
        pull_everything(env, cluster, list(env.images))
        # The copies stay Ready while their source is unreachable.
        arts = artifacts(cluster, ns)
        state = {k: (arts[env.source(k)]["status"]["phase"], ready_condition(arts[env.source(k)]).get("message"),
                     arts[env.source(k)]["metadata"]["generation"])
                 for k in env.images}
        assert all(st[0] == "Ready" for st in state.values()), state
    finally:
        env.front.offline = False


def test_scenario_3b_a_new_user_of_an_image_during_the_outage_leaves_the_others_ready(cluster: Cluster, env: Env) -> None:
    """Disconnected, another namespace starts using an image that is already in the cluster registry:
    the Artifacts that were Ready stay Ready (their copy is intact; WhenReady keeps rewriting for them)."""
    ns, other = env.cnf_ns, env.early_ns
    env.front.offline = True
    try:
        cluster.apply({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "late-user", "namespace": other},
                       "spec": {"nodeSelector": {"kubernetes.azure.com/mode": "user"},
                                "containers": [{"name": "frontend", "image": env.source("frontend")}]}})
        wait_for(lambda: env.source("frontend") in artifacts(cluster, other), timeout=60, interval=1,
                 what="the new namespace's Artifact")
        time.sleep(20)  # the reconciler sees a new member of an existing copy and tries the unreachable store
        arts = artifacts(cluster, ns)
        state = {k: (arts[env.source(k)]["status"]["phase"], ready_condition(arts[env.source(k)]).get("message"))
                 for k in env.images}
        assert all(phase == "Ready" for phase, _ in state.values()), state
    finally:
        cluster.kubectl("delete", "pod", "late-user", "-n", other, "--wait=true", check=False, timeout=60)
        cluster.kubectl("delete", f"artifacts.{GROUP}", "-n", other, "--all", "--wait=true", check=False, timeout=60)
        env.front.offline = False
        # Reachable again: whatever turned Failed is copied again (the GC scenario expects Ready copies).
        wait_ready(cluster, ns, {env.source(k) for k in env.images}, timeout=180)


# -- 4. GC -----------------------------------------------------------------------------------------


def test_scenario_4_gc(cluster: Cluster, env: Env) -> None:
    ns, rns = env.cnf_ns, env.namespace
    volume = cnf.registry_volume(cluster, rns, env.release)
    before = cnf.du(volume)
    cluster.kubectl("delete", "cronjob", f"{CNF}-reporter", "-n", ns, "--cascade=foreground", "--wait=true", timeout=120)
    cluster.kubectl("delete", "deployment", f"{CNF}-frontend", "-n", ns, "--cascade=foreground", "--wait=true", timeout=120)
    wait_for(lambda: not [p for p in live_pods(cluster, ns) if p["metadata"]["labels"]["app.kubernetes.io/name"]
                          in ("frontend", "reporter")], timeout=120, interval=1, what="their pods gone")
    time.sleep(2)  # past the 1 s grace period
    gc = f"{cnf.fullname(env.release)}-gc"
    job = f"gc-now-{secrets.token_hex(2)}"
    trigger(cluster, rns, gc, job)

    def finished() -> dict[str, Any] | None:
        obj = cluster.kubectl_json("get", "job", "-n", rns, job)
        conds = {c["type"]: c["status"] for c in obj.get("status", {}).get("conditions", [])}
        return obj if conds.get("Complete") == "True" or conds.get("Failed") == "True" else None

    done = wait_for(finished, timeout=300, interval=2, what="the GC Job")
    assert done["status"].get("succeeded") == 1, done["status"]

    endpoints = cnf.registry_endpoints(cluster, rns)
    accept = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json"
    gc_creds = cnf.registry_credentials(cluster, rns, env.release, "gc")  # pulls any repository: 404, not 401
    for key in ("init", "frontend", "reporter"):
        ref = reference.parse(env.rewritten(key))
        for endpoint in endpoints:
            for pull_ref in (ref.pull_ref, env.images[key].digest):
                assert registry_status(endpoint, f"/v2/{ref.repository}/manifests/{pull_ref}", accept, gc_creds) == 404, key
    pull_everything(env, cluster, ["backend", "agent"])
    after = cnf.du(volume)
    # The CNF's images share their busybox layer: only what no kept image uses can be freed.
    kept = {d for k in ("backend", "agent") for d, _ in env.images[k].image.all_blobs()}
    gone = {d: size for k in ("init", "frontend", "reporter") for d, size in env.images[k].image.all_blobs() if d not in kept}
    freed = sum(gone.values()) + sum(len(m.manifest) for k in ("init", "frontend", "reporter")
                                     for m in env.images[k].image.all_manifests())  # fmt: skip
    assert gone and after < before, (before, after)
    assert before - after >= freed * 0.9, (before, after, freed)


# -- 5. upgrades -----------------------------------------------------------------------------------


def test_scenario_5_upgrades(cluster: Cluster, env: Env) -> None:
    rns, release = env.namespace, env.release
    name = cnf.fullname(release)

    def revision() -> int:
        return int(json.loads(cluster.helm("status", release, "-n", rns, "-o", "json"))["version"])

    rev = revision()
    pvc = cluster.kubectl_json("get", "pvc", "-n", rns, f"{name}-registry")
    deployment = cluster.kubectl_json("get", "deployment", "-n", rns, f"{name}-registry")
    with pytest.raises(CommandError) as refused:
        cnf.upgrade_cluster_registry(cluster, release, rns, env.values,
                                     f"{cnf.VALUES}.clusterRegistry.storageSize=2Gi", timeout=240)
    # Refused at render time (the chart looks up the live volume), with the reason in helm's own output,
    # before any revision or hook exists.
    assert "storageSize cannot be modified" in str(refused.value) and "the new value is 2Gi" in str(refused.value), \
        refused.value
    history = json.loads(cluster.helm("history", release, "-n", rns, "-o", "json"))
    assert [h for h in history if h["status"] == "deployed"][-1]["revision"] == rev == history[-1]["revision"]
    assert cluster.kubectl_json("get", "pvc", "-n", rns, f"{name}-registry")["spec"] == pvc["spec"]
    now = cluster.kubectl_json("get", "deployment", "-n", rns, f"{name}-registry")
    assert now["metadata"]["generation"] == deployment["metadata"]["generation"]

    # Autoscaling off (and a smaller registry, so the pods roll): the HPA goes, the pods roll one at a time.
    samples: list[tuple[int, int]] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            try:
                ps = component_pods(cluster, rns, "registry")
                samples.append((sum(map(pod_ready, ps)), len(ps)))
            except Exception:  # noqa: BLE001 - a missed sample
                pass
            stop.wait(0.5)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        cnf.upgrade_cluster_registry(cluster, release, rns, env.values,
                                     f"{cnf.VALUES}.clusterRegistry.autoScaling.enabled=false",
                                     f"{cnf.VALUES}.clusterRegistry.registryService.scale=small")
        wait_for(lambda: (lambda ps: len(ps) == 3 and all(map(pod_ready, ps)) and all(
            p["spec"]["containers"][0]["resources"]["requests"]["memory"] == "250Mi" for p in ps))(
            component_pods(cluster, rns, "registry")), timeout=240, interval=2, what="registry rolled")
    finally:
        stop.set()
        watcher.join(10)
    assert revision() == rev + 1  # the refused upgrade left no revision behind
    assert not cluster.kubectl("get", "hpa", "-n", rns, f"{name}-registry", "--ignore-not-found", "-o", "name").strip()
    assert cluster.kubectl_json("get", "deployment", "-n", rns, f"{name}-registry")["spec"]["replicas"] == 3
    assert samples and min(r for r, _ in samples) >= 2, f"more than one registry pod down at once: {samples}"
    assert max(n for _, n in samples) <= 4, f"more than one extra pod at once: {samples}"
    # Back on: the HPA returns.
    cnf.upgrade_cluster_registry(cluster, release, rns, env.values,
                                 f"{cnf.VALUES}.clusterRegistry.registryService.scale=small")
    hpa = cluster.kubectl_json("get", "hpa", "-n", rns, f"{name}-registry")
    assert hpa["spec"]["minReplicas"] == 3 and hpa["spec"]["maxReplicas"] == 5
