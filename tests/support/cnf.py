"""The sample CNF (examples/sample-cnf) on the local cluster, shared by `make demo` and the e2e scenarios.

* :func:`push_images` builds the CNF's images deterministically (``tests/support/ociimages.py``) and
  pushes them to the artifact store of ``.cache/localcluster/env``: by tag, one pinned by digest, a
  multi-platform index, and one in the private repository ``private/``.
* :class:`StoreFront` is the artifact store as the CNF's cluster sees it: a proxy on 127.0.0.1 that we
  start and stop ourselves (the shared artifact store keeps serving the other tests), exposed to the
  pods by a selectorless Service that ci/nodenet.py leads to it (nodes pull from it on their 127.0.0.1). It lets anonymous clients pull every
  repository but ``private/`` (it adds the store's credentials for them, as a registry with anonymous
  pull does), so only the private image needs the pull secret. ``stop()`` is the disconnected drill.
* :func:`push_chart` publishes the sample chart as an OCI chart with the real ``helm push --plain-http``
  (after ``helm registry login``), its values pointing at the store front and at the pinned digest.
* :func:`install_cluster_registry` installs chart/ with the real helm as tests/e2e/test_chart_install.py
  does (``tests.support.cluster.adopt_crds``); :func:`install_cnf` installs the published chart.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.support.cluster import ROOT, Cluster, CommandError, adopt_crds, wait_for
# re-exported: tests/support/demo.py and tests/e2e/test_scenarios.py call them as cnf.*
from tests.support.cluster import component_pods, pod_ready
from tests.support.ociimages import PLATFORMS, Image, Pusher, push_runnable, push_runnable_index
from aiohttp import web

from tests.support.proxy import FaultProxy

SAMPLE_CHART = ROOT / "examples" / "sample-cnf"
CLUSTER_CHART = ROOT / "chart"
CHART_NAME = "sample-cnf"
CHART_REPO = "charts"  # oci://<store>/charts/sample-cnf
VALUES = "global.networkfunctionextension"
PULL_SECRET = "cnf-pull"
# registryAccess.pullSecretName's default: in isolated mode (the chart's default) the artifact reconciler
# keeps it in every namespace with an Artifact and the webhook adds it to the pods it rewrites
REGISTRY_PULL_SECRET = "cluster-registry-pull"
# `helm install` arguments that schedule the CNF on the real system nodes (its default is the kwok user pool)
ON_SYSTEM_NODES = ["--set-json", 'nodeSelector={"kubernetes.azure.com/mode":"system"}']
STORE_SERVICE = "cnf-store"
FORWARD_ANNOTATION = "localcluster.clusterregistry.io/forward-to"  # ci/nodenet.py


@dataclass(frozen=True)
class CnfImage:
    key: str  # the values key in examples/sample-cnf/values.yaml
    repo: str  # repository in the artifact store
    ref: str  # "repo:tag" or "repo@digest", as the chart's values name it
    image: Image  # what was pushed (digest, manifest bytes, blobs)
    owner_kind: str  # the top owner of the pods that use it
    owner: str  # that owner's name without the release prefix ("frontend" -> <release>-frontend)

    @property
    def digest(self) -> str:
        return self.image.digest

    @property
    def size(self) -> int:
        """Bytes of every manifest and blob of the image (what a copy transfers)."""
        manifests = sum(len(m.manifest) for m in self.image.all_manifests())
        return manifests + sum(size for _, size in self.image.all_blobs())

    def source(self, store_host: str) -> str:
        """The image reference as the CNF's pods name it (and the Artifact's sourceArtifact)."""
        return f"{store_host}/{self.ref}"


def store_pusher(cluster: Cluster) -> Pusher:
    return Pusher(cluster.artifact_store, auth=(cluster.artifact_store_user, cluster.artifact_store_password))


HTTPD = ["/bin/busybox", "httpd", "-f", "-v", "-p", "8080", "-h", "/www"]


def page(key: str, tag: str) -> bytes:
    """What the CNF's image KEY serves on :8080 (or prints): the tests check it."""
    return f"sample-cnf {key} {tag}\n".encode()


def push_images(cluster: Cluster, tag: str = "1.0.0") -> dict[str, CnfImage]:
    """Build and push the CNF's images (same bytes, same digests every time): real tar layers with
    Debian's static busybox, each serving (or printing) its ``page``, runnable on the real nodes."""
    p = store_pusher(cluster)
    init = push_runnable(p, "cnf/init", tag, entrypoint=["/bin/init"],
                         files={"/bin/init": b"#!/bin/sh\necho " + page("init", tag)})
    frontend = push_runnable(p, "cnf/frontend", tag, entrypoint=HTTPD, files={"/www/index.html": page("frontend", tag)})
    backend = push_runnable(p, "cnf/backend", tag, entrypoint=HTTPD, files={"/www/index.html": page("backend", tag)})
    agent = push_runnable_index(p, "cnf/agent", tag, PLATFORMS[:2], entrypoint=HTTPD,
                                files={"/www/index.html": page("agent", tag)})
    reporter = push_runnable(p, "private/reporter", tag, entrypoint=["/bin/busybox", "cat", "/etc/cnf/report"],
                             files={"/etc/cnf/report": page("reporter", tag)})
    return {
        "init": CnfImage("init", "cnf/init", f"cnf/init:{tag}", init, "Deployment", "frontend"),
        "frontend": CnfImage("frontend", "cnf/frontend", f"cnf/frontend:{tag}", frontend, "Deployment", "frontend"),
        "backend": CnfImage("backend", "cnf/backend", f"cnf/backend@{backend.digest}", backend, "StatefulSet", "backend"),
        "agent": CnfImage("agent", "cnf/agent", f"cnf/agent:{tag}", agent, "DaemonSet", "agent"),
        "reporter": CnfImage("reporter", "private/reporter", f"private/reporter:{tag}", reporter, "CronJob", "reporter"),
    }


# -- the artifact store as the CNF's cluster reaches it ----------------------------------------------


class StoreFront(FaultProxy):
    """A proxy on 127.0.0.1 in front of the artifact store: anonymous pulls everywhere but ``private/``."""

    def __init__(self, cluster: Cluster, port: int | None = None) -> None:
        super().__init__(f"http://{cluster.artifact_store}")
        if port is not None:
            self.port = port
        token = f"{cluster.artifact_store_user}:{cluster.artifact_store_password}".encode()
        self._basic = "Basic " + base64.b64encode(token).decode()

    offline = False  # the disconnected drill: every connection is reset, keep-alive ones included

    async def _handle(self, request: Any) -> Any:
        if self.offline:
            transport = request.transport
            if transport is not None:
                transport.abort()
            return web.Response(status=502)
        if "Authorization" not in request.headers and not request.path.startswith("/v2/private/"):
            headers = dict(request.headers)
            headers["Authorization"] = self._basic
            request = request.clone(headers=headers)
        return await super()._handle(request)


def expose_store(cluster: Cluster, namespace: str, front: StoreFront) -> str:
    """A selectorless Service in NAMESPACE that pods reach the store front through; returns its host:port."""
    cluster.apply({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": STORE_SERVICE, "namespace": namespace,
                     "annotations": {FORWARD_ANNOTATION: front.host}},
        "spec": {"type": "ClusterIP", "ports": [{"name": "http", "port": 5000, "protocol": "TCP"}]},
    })
    return f"{STORE_SERVICE}.{namespace}.svc.cluster.local:5000"


def pull_secret(cluster: Cluster, namespace: str, store_host: str) -> None:
    """The CNF's pull secret: the artifact store's credentials for the host the pods name."""
    auth = base64.b64encode(f"{cluster.artifact_store_user}:{cluster.artifact_store_password}".encode()).decode()
    config = {"auths": {store_host: {"username": cluster.artifact_store_user,
                                     "password": cluster.artifact_store_password, "auth": auth}}}
    cluster.apply({
        "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/dockerconfigjson",
        "metadata": {"name": PULL_SECRET, "namespace": namespace},
        "data": {".dockerconfigjson": base64.b64encode(json.dumps(config).encode()).decode()},
    })


# -- the chart ------------------------------------------------------------------------------------


def chart_version() -> str:
    return str(yaml.safe_load((SAMPLE_CHART / "Chart.yaml").read_text())["version"])


def push_chart(cluster: Cluster, images: dict[str, CnfImage], store_host: str, version: str | None = None) -> str:
    """Package examples/sample-cnf with its values pointing at STORE_HOST (and the backend's digest) and
    push it with `helm push --plain-http` after `helm registry login`; returns the oci:// reference."""
    version = version or chart_version()
    with tempfile.TemporaryDirectory(prefix="sample-cnf-") as tmp:
        work = Path(tmp) / CHART_NAME
        shutil.copytree(SAMPLE_CHART, work)
        values = yaml.safe_load((work / "values.yaml").read_text())
        values["registry"] = store_host
        values["images"] = {k: img.ref for k, img in images.items()}
        # Keep the documented file, replace only the values (a publisher's release step).
        (work / "values.yaml").write_text(yaml.safe_dump(values, sort_keys=False))
        cluster.helm("package", str(work), "--version", version, "-d", tmp)
        config = Path(tmp) / "registry.json"
        cluster.helm("registry", "login", cluster.artifact_store, "--plain-http", "--insecure",
                     "--registry-config", str(config), "--username", cluster.artifact_store_user,
                     "--password", cluster.artifact_store_password)
        cluster.helm("push", str(Path(tmp) / f"{CHART_NAME}-{version}.tgz"), f"oci://{cluster.artifact_store}/{CHART_REPO}",
                     "--plain-http", "--registry-config", str(config))
    return f"oci://{cluster.artifact_store}/{CHART_REPO}/{CHART_NAME}"


@dataclass(frozen=True)
class Published:
    store_host: str  # the store front as the CNF's namespaces reach it
    images: dict[str, CnfImage]
    chart_ref: str
    version: str
    values: dict[str, Any]  # the cluster registry's values for those namespaces


def publish_cnf(cluster: Cluster, front: StoreFront, cnf_namespaces: list[str], version: str | None = None) -> Published:
    """What a CNF's publisher and the site's operator do before anything is installed: the store is
    exposed in the first of CNF_NAMESPACES, each gets its pull secret for it, the images and the
    chart (at VERSION: the store's charts/sample-cnf is shared by every test) are pushed, and the cluster
    registry's values are scoped to those namespaces."""
    store_host = expose_store(cluster, cnf_namespaces[0], front)
    for ns in cnf_namespaces:
        pull_secret(cluster, ns, store_host)
    images = push_images(cluster)
    version = version or chart_version()
    chart_ref = push_chart(cluster, images, store_host, version)
    return Published(store_host, images, chart_ref, version, cluster_registry_values(cnf_namespaces, store_host))


def install_cnf(cluster: Cluster, release: str, namespace: str, chart_ref: str, version: str | None = None,
                extra: Iterable[str] = ()) -> None:
    """`helm install` of the published chart (pulled from the store like an operator would)."""
    with tempfile.TemporaryDirectory(prefix="sample-cnf-") as tmp:
        config = Path(tmp) / "registry.json"
        host = chart_ref.removeprefix("oci://").split("/", 1)[0]
        cluster.helm("registry", "login", host, "--plain-http", "--insecure", "--registry-config", str(config),
                     "--username", cluster.artifact_store_user, "--password", cluster.artifact_store_password)
        cluster.helm("install", release, chart_ref, "--version", version or chart_version(), "-n", namespace,
                     "--plain-http", "--registry-config", str(config), *extra, timeout=300)


# -- the cluster registry -------------------------------------------------------------------------


def cluster_registry_values(cnf_namespaces: Iterable[str], store_host: str, *, rewrite_policy: str = "WhenReady",
                            storage_size: str = "1Gi") -> dict[str, Any]:
    """Values for the CNF scenarios: the webhook scoped to the CNF's namespaces (other tests install the
    chart into the same cluster at the same time), the store front spoken to over plain HTTP, GC with
    no grace period so a Job triggered from the CronJob collects at once. The system pool is required,
    not just preferred: the local cluster's user nodes are kwok-simulated and cannot run the project's
    pods, and with the chart's soft preference a webhook scaled from 0 to 3 was once scheduled on one."""
    scope = " || ".join(f"request.namespace == '{ns}'" for ns in cnf_namespaces)
    return {"global": {"networkfunctionextension": {
        "webhook": {"pod": {"mutation": {"matchConditionExpression": scope}}, "rewritePolicy": rewrite_policy},
        "systemPool": {"required": True},
        "clusterRegistry": {"storageSize": storage_size, "gc": {"grace": "1s"}},
        "artifactReconciler": {"insecureRegistries": [store_host]},
    }}}


def install_cluster_registry(cluster: Cluster, release: str, namespace: str, values: dict[str, Any],
                             timeout: int = 420) -> None:
    """`helm install --wait --wait-for-jobs` of chart/, the way tests/e2e/test_chart_install.py does."""
    adopt_crds(cluster, release, namespace)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="cr-values-") as f:
        f.write(yaml.safe_dump(values))
        f.flush()
        cluster.helm("install", release, str(CLUSTER_CHART), "-n", namespace, "-f", f.name, "--wait",
                     "--wait-for-jobs", "--timeout", f"{timeout}s", timeout=timeout + 60)


def wait_replicas(cluster: Cluster, namespace: str, count: int = 3, timeout: float = 240) -> None:
    """Wait for COUNT Ready registry and webhook pods (helm --wait returns at the Deployment's initial
    replica; the HPAs, min 3, scale up from there)."""
    for component in ("registry", "webhook"):
        wait_for(lambda c=component: (lambda ps: len(ps) == count and all(map(pod_ready, ps)))(  # type: ignore[misc]
            component_pods(cluster, namespace, c)), timeout=timeout, interval=2, what=f"{count} Ready {component} pods")


def upgrade_cluster_registry(cluster: Cluster, release: str, namespace: str, values: dict[str, Any],
                             *sets: str, timeout: int = 420) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="cr-values-") as f:
        f.write(yaml.safe_dump(values))
        f.flush()
        cluster.helm("upgrade", release, str(CLUSTER_CHART), "-n", namespace, "-f", f.name,
                     *[a for s in sets for a in ("--set", s)], "--wait", "--timeout", f"{timeout}s",
                     timeout=timeout + 60)


def fullname(release: str) -> str:
    return release if "cluster-registry" in release else f"{release}-cluster-registry"


def registry_endpoints(cluster: Cluster, namespace: str) -> list[str]:
    """`IP:5000` of every Ready registry pod: where the registry Service's name leads (as kube-proxy would)."""
    return [f"{p['status']['podIP']}:5000" for p in component_pods(cluster, namespace, "registry") if pod_ready(p)]


def registry_volume(cluster: Cluster, namespace: str, release: str) -> Path:
    """The hostPath directory behind the registry's PVC (the local cluster's provisioner)."""
    pvc = cluster.kubectl_json("get", "pvc", "-n", namespace, f"{fullname(release)}-registry")
    pv = cluster.kubectl_json("get", "pv", pvc["spec"]["volumeName"])
    return Path(pv["spec"]["hostPath"]["path"])


def du(path: Path) -> int:
    """Bytes of the regular files under PATH."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def namespace_pull_credential(cluster: Cluster, namespace: str, timeout: float = 120) -> tuple[str, str]:
    """NAMESPACE's pull credential for the cluster registry, as its pods hold it (the Secret the chart
    keeps there once the namespace has an Artifact)."""
    secret = wait_for(lambda: cluster.kubectl("get", "secret", "-n", namespace, REGISTRY_PULL_SECRET, "--ignore-not-found",
                                              "-o", "json").strip(), timeout=timeout, what=f"the pull Secret in {namespace}")
    auths = json.loads(base64.b64decode(json.loads(secret)["data"][".dockerconfigjson"]))["auths"]
    entry = next(iter(auths.values()))
    return str(entry["username"]), str(entry["password"])


def registry_credentials(cluster: Cluster, namespace: str, release: str, component: str = "artifact-reconciler") -> tuple[str, str]:
    """COMPONENT's push credential the chart generated (its own Secret; by default the artifact reconciler's)."""
    secret = cluster.kubectl_json("get", "secret", "-n", namespace, f"{fullname(release)}-registry-push-{component}")
    creds = yaml.safe_load(base64.b64decode(secret["data"]["credentials.yaml"]))
    return str(creds["username"]), str(creds["password"])


# -- the CNF's pods -------------------------------------------------------------------------------


def cnf_pods(cluster: Cluster, namespace: str) -> list[dict[str, Any]]:
    items = cluster.kubectl_json("get", "pods", "-n", namespace, "-l", "app.kubernetes.io/part-of=sample-cnf")["items"]
    return [p for p in items if not p["metadata"].get("deletionTimestamp")]


def containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return list(pod["spec"].get("initContainers", [])) + list(pod["spec"]["containers"])


def all_up(cluster: Cluster, namespace: str, registry_host: str) -> list[dict[str, Any]] | None:
    """Every CNF pod rewritten to REGISTRY_HOST and running (the reporter's Job pod: Succeeded), or None."""
    pods = cnf_pods(cluster, namespace)
    kinds = {p["metadata"]["labels"].get("app.kubernetes.io/name") for p in pods}
    if not {"frontend", "backend", "agent", "reporter"} <= kinds:
        return None
    for p in pods:
        if not all(c["image"].startswith(registry_host + "/") for c in containers(p)):
            return None
        if not (p["status"].get("phase") == "Succeeded" or pod_ready(p)):
            return None
    return pods


def restart_cnf(cluster: Cluster, namespace: str, release: str = "cnf") -> None:
    """Delete every CNF pod (their owners make new ones, which the webhook now rewrites: under
    ``WhenReady`` the first ones were admitted before their Artifacts were Ready) and start the
    reporter's Job."""
    cluster.kubectl("delete", "pods", "-n", namespace, "-l", "app.kubernetes.io/part-of=sample-cnf", "--wait=false")
    cluster.kubectl("delete", "jobs", "-n", namespace, "--all", "--wait=false")
    cluster.kubectl("create", "job", f"report-{secrets.token_hex(2)}", f"--from=cronjob/{release}-reporter", "-n", namespace)


# -- pulling as a node would ----------------------------------------------------------------------


NODE_NETNS = "/run/netns/crnode-system-0"  # a real node's network namespace: its runtime's view


def skopeo(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    """The real skopeo, run in a node's network namespace: the registry's token challenge names the
    node proxy's realm on the node's loopback, which only a node (or a pod on it) reaches."""
    exe = shutil.which("skopeo")
    if exe is None:
        raise RuntimeError("skopeo is not installed (ci/toolchain installs it from Debian)")
    argv = ["nsenter", f"--net={NODE_NETNS}", exe, *args]
    proc = subprocess.run(argv, capture_output=True, timeout=timeout)
    if proc.returncode != 0:
        raise CommandError(argv, proc.returncode, proc.stdout.decode(errors="replace"),
                           proc.stderr.decode(errors="replace"))
    return proc


def inspect_raw(rewritten: str, endpoint: str, creds: tuple[str, str] | None) -> bytes:
    """The raw manifest of REWRITTEN (`<registry host>/<repo>[:tag][@digest]`) at ENDPOINT, with the
    real skopeo from a node, authenticated at the realm with CREDS (a namespace's pull credential) as
    a node's runtime is with the pod's pull Secret; None: anonymously."""
    _, _, path = rewritten.partition("/")
    auth = ["--creds", ":".join(creds)] if creds else ["--no-creds"]
    return skopeo("inspect", "--raw", "--tls-verify=false", *auth, f"docker://{endpoint}/{path}").stdout


def pull(rewritten: str, endpoint: str, creds: tuple[str, str] | None) -> str:
    """Pull REWRITTEN from ENDPOINT (a registry pod's IP:5000, where a node's runtime lands through the
    Service) with the real skopeo and CREDS (see inspect_raw): the raw manifest (its sha256 is
    returned) and the whole image, every platform, into a throwaway OCI layout (skopeo verifies every
    blob's digest)."""
    _, _, path = rewritten.partition("/")
    raw = inspect_raw(rewritten, endpoint, creds)
    auth = ["--src-creds", ":".join(creds)] if creds else ["--src-no-creds"]
    with tempfile.TemporaryDirectory(prefix="pull-") as tmp:
        skopeo("copy", "--all", "--src-tls-verify=false", *auth, "--preserve-digests", f"docker://{endpoint}/{path}",
               f"oci:{tmp}/layout:x", timeout=300)
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def wait_gone(cluster: Cluster, *args: str, timeout: float = 120) -> None:
    wait_for(lambda: not cluster.kubectl("get", *args, "--ignore-not-found", "-o", "name").strip(),
             timeout=timeout, interval=1, what=f"{' '.join(args)} gone")


def pod_start_seconds(cluster: Cluster, namespace: str, image: str, node: str, forget: str,
                      pull_secret: str | None = None) -> float:
    """Seconds from creating a pod of IMAGE (serving :8080) on NODE to Ready, every image whose name
    contains FORGET first removed from the real nodes' containerd (content too), so the node pulls it
    (with PULL_SECRET, the namespace's registry pull Secret, when given). The pod opts out of the
    webhook: its IMAGE is pulled as named."""
    import time

    from tests.support.cluster import remove_node_images

    remove_node_images(forget)
    name = f"start-{secrets.token_hex(3)}"
    t0 = time.monotonic()
    cluster.apply({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"clusterregistry.io/skip": "true"}},
                   "spec": {"nodeName": node, "terminationGracePeriodSeconds": 0,
                            **({"imagePullSecrets": [{"name": pull_secret}]} if pull_secret else {}),
                            "containers": [{"name": "c", "image": image,
                                            "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1}}]}},
                  namespace)
    wait_for(lambda: pod_ready(cluster.kubectl_json("get", "pod", "-n", namespace, name)), timeout=180, interval=0.2,
             what=f"{name} Ready")
    spent = time.monotonic() - t0
    cluster.kubectl("delete", "pod", "-n", namespace, name, "--wait=false")
    return spent
