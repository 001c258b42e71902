"""The chart's ecosystem on one real install (local control plane, pods on its real system nodes):

1. `helm test`: the chart's test hook pushes a probe image through the registry endpoint, pulls it
   back byte for byte, sees an anonymous pull of it refused (the default isolated access), and has the
   webhook answer an AdmissionReview over the chart's TLS.
2. Flux (its real source-controller and kustomize-controller, out of cluster): examples/flux/cnf,
   served from the artifact store as an OCIRepository. `cnf-images` applies the Component with
   `wait: true`; `cnf` dependsOn it and is held back (no Deployment exists) until Flux's own kstatus
   health check sees the Component Ready; then the CNF's pods come up rewritten. A Component whose
   image does not exist is Stalled and keeps its `cnf` from ever being applied, with its message in
   `cnf-images`' Ready condition.
3. Argo CD: examples/argocd/health/*.lua, run by gopher-lua as Argo CD runs it, on Artifacts and
   Components taken from this cluster in every phase (Pending, Copying, Ready, Failed, Deferred).
4. Every metric name the PrometheusRule and the dashboard use is served by a running component's
   /metrics (or is one of the named kubelet / kube-state-metrics series).

The release holds tests.support.cluster.exclusive_chart() for the whole module.
"""

from __future__ import annotations

import json
import re
import secrets
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import pytest
import yaml

from cluster_registry import reference
from tests.gitops import flux as fluxlib
from tests.gitops.lib import BIN, ROOT, monitoring_crd
from tests.gitops.test_monitoring import EXTERNAL, used_metric_names
from tests.support import cnf
from tests.support.cluster import Cluster, component_pods, exclusive_chart, pod_ready, wait_for

GROUP = "clusterregistry.io"
EXAMPLES = ROOT / "examples"

# Installs hold the cluster-wide chart lock (tests.support.cluster.exclusive_chart), waited for first.
pytestmark = pytest.mark.timeout(2400)


@dataclass
class Env:
    release: str
    namespace: str
    cnf_ns: str  # Flux's good CNF
    bad_ns: str  # Flux's CNF whose image does not exist
    lua_ns: str  # Components and Artifacts for the Argo CD health checks
    flux_ns: str  # where the Flux objects live and the controllers watch
    store_host: str  # the artifact store as pods reach it
    artifact_store: str  # the artifact store as this machine (and Flux's controllers) reach it
    images: dict[str, cnf.CnfImage]

    @property
    def fullname(self) -> str:
        return cnf.fullname(self.release)



@pytest.fixture(scope="module")
def env(cluster: Cluster) -> Iterator[Env]:
    suffix = secrets.token_hex(3)
    release, namespace = f"cr{suffix[:4]}", f"crs-{suffix}"
    names = {k: f"{k}-{suffix}" for k in ("cnf", "bad", "lua", "flux")}
    with exclusive_chart():
        for ns in (namespace, *names.values()):
            cluster.kubectl("create", "namespace", ns)
        # The Prometheus Operator's CRDs, so the chart's ServiceMonitors and PrometheusRule install.
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(monitoring_crd("servicemonitors")),
                        "-f", str(monitoring_crd("prometheusrules")))
        front = cnf.StoreFront(cluster)
        front.start()
        try:
            store_host = cnf.expose_store(cluster, names["cnf"], front)
            images = cnf.push_images(cluster)
            values = cnf.cluster_registry_values([names["cnf"], names["bad"]], store_host)
            values["global"]["networkfunctionextension"].update(
                serviceMonitor={"enabled": True}, prometheusRule={"enabled": True}, grafanaDashboard={"enabled": True})
            # every phase written at once, so that the health checks meet Pending and Copying (quick copies skip them)
            values["global"]["networkfunctionextension"]["artifactReconciler"]["progressDelay"] = 0
            cnf.install_cluster_registry(cluster, release, namespace, values)
            cnf.wait_replicas(cluster, namespace)
            yield Env(release, namespace, names["cnf"], names["bad"], names["lua"], names["flux"], store_host,
                      cluster.artifact_store, images)
        finally:
            cluster.helm("uninstall", release, "-n", namespace, "--wait", "--timeout", "120s", check=False)
            for ns in (*names.values(), namespace):
                cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)
            front.stop()


def rewrite_target(cluster: Cluster, env: Env) -> str:
    """The host the webhook rewrites to, as its Deployment passes it (--registry-host)."""
    dep = cluster.kubectl_json("get", "deployment", f"{env.fullname}-webhook", "-n", env.namespace)
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    return str(args[args.index("--registry-host") + 1])


def ready_condition(obj: dict[str, Any]) -> dict[str, Any]:
    return next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == "Ready"), {})


# -- 1. helm test ----------------------------------------------------------------------------------


def test_helm_test_hook_pushes_pulls_and_reaches_the_webhook(cluster: Cluster, env: Env) -> None:
    out = cluster.helm("test", env.release, "-n", env.namespace, "--logs", "--timeout", "180s", timeout=240)
    assert "Phase:          Succeeded" in out or "Phase: Succeeded" in out.replace("  ", " "), out
    report = json.loads(next(line for line in out.splitlines() if line.startswith("{")))
    assert report["pushedAndPulled"].startswith("sha256:") and report["webhookAdmitted"] is True, report
    assert report["anonymousPull"] == "refused", report  # the default isolated access
    # The probe Pod stays (for --logs) until the next `helm test`; its script ConfigMap is gone (hook-succeeded).
    left = cluster.kubectl("get", "pods,configmaps", "-n", env.namespace, "-l", "app.kubernetes.io/component=helm-test",
                           "-o", "name").split()
    assert left == [f"pod/{env.fullname}-helm-test"], left


# -- 2. Flux ---------------------------------------------------------------------------------------


def flux_objects(env: Env, *, name: str, target: str, tag: str, images_timeout: str) -> list[dict[str, Any]]:
    """examples/flux/cnf's OCIRepository and Kustomizations, pointed at this cluster's store, TARGET and TAG."""
    docs = [yaml.safe_load((EXAMPLES / "flux" / "cnf" / f).read_text()) for f in ("source.yaml", "cnf-images.yaml", "cnf.yaml")]
    source, images, workload = docs
    source["metadata"].update(name=name, namespace=env.flux_ns)
    source["spec"].update(url=f"oci://{env.artifact_store}/flux/sample-cnf", insecure=True, interval="1m")
    for k in (images, workload):
        k["metadata"].update(name=f"{name}-{k['metadata']['name']}", namespace=env.flux_ns)
        k["spec"].update(targetNamespace=target, retryInterval="5s", interval="1m")
        k["spec"]["sourceRef"]["name"] = name
        k["spec"]["postBuild"]["substitute"] = {"CNF_REGISTRY": env.store_host, "CNF_TAG": tag}
    images["spec"]["timeout"] = images_timeout
    workload["spec"]["dependsOn"] = [{"name": images["metadata"]["name"]}]
    return docs


@pytest.fixture(scope="module")
def flux(cluster: Cluster, env: Env, tmp_path_factory: pytest.TempPathFactory) -> Iterator[fluxlib.Flux]:
    fluxlib.push_artifact(cnf.store_pusher(cluster), "flux/sample-cnf", "1.0.0", EXAMPLES / "flux" / "cnf" / "manifests",
                          source="examples/flux/cnf/manifests")
    cluster.apply(fluxlib.docker_config_secret("acr-pull", env.flux_ns, cluster.artifact_store,
                                               cluster.artifact_store_user, cluster.artifact_store_password))
    controllers = fluxlib.Flux(cluster, env.flux_ns, tmp_path_factory.mktemp("flux")).start()
    try:
        yield controllers
    finally:
        # While the controllers run: they remove their finalizers (and prune what they applied).
        cluster.kubectl("delete", "kustomizations.kustomize.toolkit.fluxcd.io,ocirepositories.source.toolkit.fluxcd.io",
                        "--all", "-n", env.flux_ns, "--wait", "--timeout=120s", check=False, timeout=180)
        controllers.stop()


def test_flux_applies_the_cnf_only_after_its_component_is_ready(cluster: Cluster, env: Env, flux: fluxlib.Flux) -> None:
    def component() -> dict[str, Any]:
        return dict(cluster.kubectl_json("get", f"components.{GROUP}", "sample-cnf", "-n", env.cnf_ns))

    # GC's write lock held: the Component's copies are Deferred for as long as the test wants.
    with GCHold(cluster, env.namespace, f"{env.fullname}-gc"):
        cluster.apply(flux_objects(env, name="good", target=env.cnf_ns, tag="1.0.0", images_timeout="4m"))
        flux.wait_ready("ocirepository", "good", timeout=120)
        held = wait_for(lambda: (lambda c: c if c.get("reason") == "DependencyNotReady" else None)(
            flux.ready("kustomization", "good-cnf")), timeout=120, interval=1, what="cnf to wait on cnf-images")
        assert "good-cnf-images" in held["message"], held
        wait_for(lambda: ready_condition(component()).get("reason") == "Deferred", timeout=120, interval=1,
                 what="the Component's copies Deferred by the lock")
        for _ in range(10):  # held back: nothing of the CNF is applied while the Component is not Ready
            flux.alive()
            assert flux.ready("kustomization", "good-cnf-images").get("status") != "True"
            assert not cluster.kubectl("get", "deployments", "-n", env.cnf_ns, "-o", "name").strip()
            time.sleep(1)

    ready = wait_for(lambda: (lambda c: c if c.get("status") == "True" else None)(ready_condition(component())),
                     timeout=180, interval=1, what="the Component Ready once the lock is released")
    ready_at = datetime.fromisoformat(ready["lastTransitionTime"].replace("Z", "+00:00"))
    flux.wait_ready("kustomization", "good-cnf-images", timeout=120)
    flux.wait_ready("kustomization", "good-cnf", timeout=180)
    deployment = cluster.kubectl_json("get", "deployment", "sample-cnf-frontend", "-n", env.cnf_ns)
    created = datetime.fromisoformat(deployment["metadata"]["creationTimestamp"].replace("Z", "+00:00"))
    assert created >= ready_at.replace(microsecond=0), (created, ready_at)
    assert deployment["metadata"]["labels"]["kustomize.toolkit.fluxcd.io/name"] == "good-cnf"

    # The CNF's pods come up rewritten to the cluster registry (WhenReady: their Artifacts are Ready).
    pods = wait_for(lambda: (lambda ps: ps if len(ps) == 2 and all(p["status"].get("phase") == "Running" for p in ps) else None)(
        cluster.kubectl_json("get", "pods", "-n", env.cnf_ns, "-l", "app.kubernetes.io/part-of=sample-cnf")["items"]),
        timeout=120, interval=2, what="2 Running CNF pods")
    target = rewrite_target(cluster, env)
    for pod in pods:
        spec = pod["spec"]
        for c in spec["initContainers"] + spec["containers"]:
            source = f"{env.store_host}/cnf/{c['name']}:1.0.0"
            # pinned to the digest the namespace's Artifact verified (#15)
            name, _, digest = c["image"].partition("@")
            assert name == str(reference.rewrite(reference.parse(source), target)) and digest.startswith("sha256:"), c["image"]


def test_flux_never_applies_a_cnf_whose_image_is_missing(cluster: Cluster, env: Env, flux: fluxlib.Flux) -> None:
    cluster.apply(flux_objects(env, name="bad", target=env.bad_ns, tag="0.0.0-missing", images_timeout="40s"))

    def stalled() -> dict[str, Any] | None:
        c = cluster.kubectl_json("get", f"components.{GROUP}", "sample-cnf", "-n", env.bad_ns)
        conds = {x["type"]: x for x in c.get("status", {}).get("conditions", [])}
        return conds if conds.get("Stalled", {}).get("status") == "True" else None

    # The image does not exist (NotFound, permanent): the Component is Stalled (kstatus: Failed), not Reconciling.
    conds = wait_for(stalled, timeout=180, interval=2, what="the Component Stalled on the missing image")
    assert conds["Ready"]["reason"] == "ArtifactFailed" and "Reconciling" not in conds, conds
    assert "0.0.0-missing" in conds["Ready"]["message"] and conds["Stalled"]["message"] == conds["Ready"]["message"]

    def held() -> dict[str, Any] | None:
        flux.alive()
        c = flux.ready("kustomization", "bad-cnf-images")
        # A check that ran into its client's rate limiter at the deadline names no object; Flux retries it.
        return c if c.get("reason") == "HealthCheckFailed" and "rate limiter" not in c.get("message", "") else None

    images = wait_for(held, timeout=180, interval=2, what="cnf-images' health check to time out")
    assert images["status"] == "False"
    # The example's failed expression carries the Component's own message into Flux's (see cnf-images.yaml).
    assert f"Component/{env.bad_ns}/sample-cnf status: 'Unknown'" in images["message"], images
    message = ready_condition(cluster.kubectl_json("get", f"components.{GROUP}", "sample-cnf", "-n", env.bad_ns))["message"]
    assert message in images["message"], (message, images)
    print(f"\nFlux cnf-images Ready: {images['message']}")
    workload = flux.ready("kustomization", "bad-cnf")
    assert workload.get("status") != "True" and workload.get("reason") == "DependencyNotReady", workload
    assert not cluster.kubectl("get", "deployments", "-n", env.bad_ns, "-o", "name").strip()

    # The early-stop variant the example's README offers (kstatus alone): Stalled reads as Failed, at once.
    failed = yaml.safe_load((EXAMPLES / "flux" / "cnf" / "cnf-images.yaml").read_text())["spec"]["healthCheckExprs"][0]["failed"]
    cluster.kubectl("patch", "kustomization", "bad-cnf-images", "-n", env.flux_ns, "--type=json", "-p", json.dumps(
        [{"op": "replace", "path": "/spec/healthCheckExprs/0/failed", "value": failed.replace(" && {}[c.message]", "")}]))
    fast = wait_for(lambda: (lambda c: c if "failed early" in c.get("message", "") else None)(
        flux.ready("kustomization", "bad-cnf-images")), timeout=120, interval=2, what="cnf-images to stop early")
    assert f"failed early due to stalled resources: [Component/{env.bad_ns}/sample-cnf status: 'Failed']" in fast["message"]
    print(f"Flux cnf-images Ready (early stop): {fast['message']}")
    assert not cluster.kubectl("get", "deployments", "-n", env.bad_ns, "-o", "name").strip()


# -- 3. Argo CD's health checks --------------------------------------------------------------------


def argo_health(kind: str, obj: dict[str, Any]) -> dict[str, str]:
    script = EXAMPLES / "argocd" / "health" / f"{kind}.lua"
    proc = subprocess.run([str(BIN / "argolua"), str(script)], input=json.dumps(obj), capture_output=True,
                          text=True, check=False, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout))


class Recorder:
    """Every version of the Artifacts and Components in NAMESPACE, from watches (phases that last
    milliseconds, such as Copying, are caught too)."""

    def __init__(self, cluster: Cluster, namespace: str) -> None:
        self.cluster, self.namespace = cluster, namespace
        self.seen: dict[str, list[dict[str, Any]]] = {"artifacts": [], "components": []}
        self.procs = [subprocess.Popen([str(BIN / "kubectl"), "get", f"{plural}.{GROUP}", "-n", namespace, "--watch",
                                        "-o", "json"], stdout=subprocess.PIPE, env=cluster.env())
                      for plural in self.seen]
        self.threads = [threading.Thread(target=self._read, args=(p, plural), daemon=True)
                        for p, plural in zip(self.procs, self.seen)]
        for t in self.threads:
            t.start()

    def _read(self, proc: subprocess.Popen[bytes], plural: str) -> None:
        assert proc.stdout is not None
        decoder, buffer = json.JSONDecoder(), ""
        for line in proc.stdout:
            buffer += line.decode()
            try:
                obj, end = decoder.raw_decode(buffer.lstrip())
            except json.JSONDecodeError:
                continue
            buffer = buffer.lstrip()[end:]
            self.seen[plural].append(obj)

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
            p.wait(timeout=10)


class GCHold:
    """The GC write lock held as a GC run holds it (the Lease `<fullname>-gc`, renewed): the gates
    refuse writes, so copies are Deferred."""

    def __init__(self, cluster: Cluster, namespace: str, name: str) -> None:
        self.cluster, self.namespace, self.name = cluster, namespace, name
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._renew, daemon=True)

    def _lease(self) -> dict[str, Any]:
        now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": {"holderIdentity": "gitops-test-hold", "leaseDurationSeconds": 15, "renewTime": now,
                         "acquireTime": now}}

    def _renew(self) -> None:
        while not self.stopped.wait(3):
            self.cluster.apply(self._lease())

    def __enter__(self) -> GCHold:
        self.cluster.apply(self._lease())
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.thread.join()
        self.cluster.kubectl("delete", "lease", self.name, "-n", self.namespace, "--ignore-not-found")


def component(name: str, namespace: str, images: list[str]) -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/v1alpha1", "kind": "Component", "metadata": {"name": name, "namespace": namespace},
            "spec": {"images": images}}


def by_phase(objs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The last version seen of any Artifact in each phase."""
    return {o["status"]["phase"]: o for o in objs if o.get("status", {}).get("phase")}


def by_reason(objs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {ready_condition(o)["reason"]: o for o in objs if ready_condition(o).get("reason")}


def test_argocd_health_checks_on_real_objects_in_every_phase(cluster: Cluster, env: Env) -> None:
    ns = env.lua_ns
    recorder = Recorder(cluster, ns)
    try:
        source = env.images["backend"].source(env.store_host).replace(f"@{env.images['backend'].digest}", ":1.0.0")
        with GCHold(cluster, env.namespace, f"{env.fullname}-gc"):
            cluster.apply(component("deferred", ns, [source]))
            wait_for(lambda: "Deferred" in by_phase(recorder.seen["artifacts"])
                     and "Deferred" in by_reason(recorder.seen["components"]), timeout=120, interval=1,
                     what="an Artifact and its Component Deferred by the GC lock")
        cluster.apply([component("fresh", ns, [env.images["agent"].source(env.store_host)]),
                       component("failing", ns, [f"{env.store_host}/cnf/frontend:0.0.0-missing"]),
                       component("invalid", ns, ["Not A Reference!"])])
        wait_for(lambda: {"Pending", "Copying", "Ready", "Failed", "Deferred"} <= set(by_phase(recorder.seen["artifacts"]))
                 and {"Progressing", "AllReady", "ArtifactFailed", "InvalidImage"} <= set(by_reason(recorder.seen["components"])),
                 timeout=240, interval=1, what="Artifacts and Components in every phase")
    finally:
        recorder.stop()

    want_artifact = {"Pending": "Progressing", "Copying": "Progressing", "Deferred": "Progressing",
                     "Ready": "Healthy", "Failed": "Degraded"}
    for phase, obj in by_phase(recorder.seen["artifacts"]).items():
        health = argo_health("artifact", obj)
        assert health["status"] == want_artifact[phase], (phase, health, obj["status"])
        assert ready_condition(obj)["message"] in health["message"], (phase, health)
    want_component = {"Progressing": "Progressing", "Deferred": "Progressing", "AllReady": "Healthy",
                      "ArtifactFailed": "Degraded", "InvalidImage": "Degraded"}
    for reason, obj in by_reason(recorder.seen["components"]).items():
        health = argo_health("component", obj)
        assert health["status"] == want_component[reason], (reason, health, obj["status"])
        assert health["message"] == ready_condition(obj)["message"], (reason, health)
    # A new spec not yet observed is Progressing, whatever the old status said.
    stale = json.loads(json.dumps(by_reason(recorder.seen["components"])["AllReady"]))
    stale["metadata"]["generation"] = stale["status"]["observedGeneration"] + 1
    assert argo_health("component", stale)["status"] == "Progressing"


# -- 4. metric names -------------------------------------------------------------------------------


def scrape(cluster: Cluster, namespace: str, pod: str, port: int, scheme: str, path: str = "/metrics") -> str:
    """GET PATH of POD's PORT through `kubectl port-forward` (pods run in the nodes' own networks); an
    HTTP error's body is the answer too."""
    fwd = subprocess.Popen([str(BIN / "kubectl"), "port-forward", "-n", namespace, f"pod/{pod}", f":{port}"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cluster.env())
    try:
        assert fwd.stdout is not None
        line = fwd.stdout.readline()
        local = re.search(rf"127\.0\.0\.1:(\d+) -> {port}", line)
        assert local, line + (fwd.stderr.read() if fwd.stderr and fwd.poll() is not None else "")
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # 127.0.0.1 is not in the certificate
        try:
            with urllib.request.urlopen(f"{scheme}://127.0.0.1:{local[1]}{path}", timeout=10,  # noqa: S310 - loopback
                                        context=context if scheme == "https" else None) as r:
                return str(r.read().decode())
        except urllib.error.HTTPError as e:
            return str(e.read().decode())
    finally:
        fwd.terminate()
        fwd.wait(10)


def exported(text: str) -> set[str]:
    """Sample names a Prometheus scrape of TEXT yields (families with no samples yet included)."""
    from prometheus_client.parser import text_string_to_metric_families

    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"], "summary": ["_count", "_sum", ""]}
        names |= {family.name + s for s in suffixes.get(family.type, [""])}
        names |= {s.name for s in family.samples}
    return names


def container_port(pod: dict[str, Any], name: str) -> int:
    return next(int(p["containerPort"]) for c in pod["spec"]["containers"] for p in c.get("ports", []) if p.get("name") == name)


def test_every_metric_the_rules_and_dashboard_use_is_exported(cluster: Cluster, env: Env) -> None:
    names: set[str] = set()
    sources = {"webhook": [("https", "https")], "artifact-reconciler": [("http", "http")],
               "component-reconciler": [("http", "http")],
               "registry": [("token", "https")]}  # the token service's, then distribution's (from its loopback); registryTLS
    for comp, endpoints in sources.items():
        pod = next(p for p in component_pods(cluster, env.namespace, comp) if pod_ready(p))
        if comp == "registry":  # distribution's request counters appear with its first request: make one
            assert "UNAUTHORIZED" in scrape(cluster, env.namespace, pod["metadata"]["name"], container_port(pod, "registry"), "https", "/v2/")
        for port, scheme in endpoints:
            names |= exported(scrape(cluster, env.namespace, pod["metadata"]["name"], container_port(pod, port), scheme))
    missing = {n for n in used_metric_names() - names if n not in EXTERNAL}
    assert not missing, f"used by the rules or dashboard but exported by no component: {sorted(missing)}"
