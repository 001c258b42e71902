"""Issue 19 end to end: the chart as an AOSM operator uses it, on the local cluster.

One release (HA defaults, early loading from the artifact store with a pull secret, side loading from a
drive on one system node, a 1Gi volume, GC grace 1s) goes through, in order:

- install, an upgrade and both autoscaling toggles, with Ready pods sampled all along: the registry and
  webhook Deployments never ask for fewer than 3 replicas, and once 3 are Ready they stay Ready;
- the chart's preload Job (through helm) records its images in the release-owned Component; GC runs
  from the CronJob past the grace period and keeps them; an image removed from the list and upgraded
  goes at the next GC, and `enableEarlyLoading` with an empty list is valid and releases the rest;
- the chart's side-load Job (through helm) imports a drive's image;
- a storage size change is refused with the reason in helm's own output;
- every command of docs/operating.md runs against the release.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.cluster import (
    BIN, ROOT, STATE, Cluster, CommandError, adopt_crds, component_pods, exclusive_chart, pod_ready, three_ready, wait_for,
)
from tests.support.ociimages import Image, Pusher, push_image

# The first test also pays for the install (and for waiting on the chart lock); the GC test for two upgrades.
pytestmark = pytest.mark.timeout(1800)

CHART = ROOT / "chart"
VALUES = "global.networkfunctionextension"
GUIDE = ROOT / "docs" / "operating.md"


@dataclass
class Release:
    name: str
    namespace: str
    images: dict[str, Image]  # tag -> image in the artifact store
    sources: dict[str, str]  # tag -> the reference as values name it (the store's in-cluster host)
    sideloaded: Image
    samples: list[tuple[str, str, int | None, int]] = field(default_factory=list)  # (phase, component, replicas, ready)
    sampler: Sampler | None = None

    @property
    def prefix(self) -> str:
        return f"{self.name}-cluster-registry"

    def helm_upgrade(self, cluster: Cluster, *args: str) -> str:
        return cluster.helm("upgrade", self.name, str(CHART), "-n", self.namespace, "--reuse-values", "--wait",
                            "--wait-for-jobs", "--timeout", "420s", *args, timeout=480)


class Sampler(threading.Thread):
    """Reads, twice a second, each HA Deployment's spec.replicas and its Ready, not terminating pods."""

    def __init__(self, cluster: Cluster, release: Release) -> None:
        super().__init__(name="ha-sampler", daemon=True)
        from kubernetes import client

        api = cluster.api_client()
        self.apps, self.core = client.AppsV1Api(api), client.CoreV1Api(api)
        self.release, self.phase, self.stop = release, "install", threading.Event()

    def run(self) -> None:
        from kubernetes.client import ApiException

        while not self.stop.wait(0.5):
            for component in ("registry", "webhook"):
                try:
                    replicas = self.apps.read_namespaced_deployment(f"{self.release.prefix}-{component}",
                                                                    self.release.namespace).spec.replicas
                except ApiException:
                    replicas = None  # not created yet
                except Exception:  # noqa: BLE001 - a blip of the API server: sample again
                    continue
                pods = self.core.list_namespaced_pod(
                    self.release.namespace, label_selector=f"app.kubernetes.io/component={component}").items
                ready = sum(1 for p in pods if not p.metadata.deletion_timestamp and p.status.phase == "Running"
                            and any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or []))
                self.release.samples.append((self.phase, component, replicas, ready))


def system_nodes(cluster: Cluster) -> list[str]:
    return sorted(n["metadata"]["name"] for n in cluster.kubectl_json(
        "get", "nodes", "-l", "kubernetes.azure.com/mode=system")["items"])


def cli(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cluster_registry", *args], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env=cluster.env())


@pytest.fixture(scope="module")
def release(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Release]:
    assert cluster.artifact_store_in_cluster, "env file lacks LOCALCLUSTER_ARTIFACT_STORE_IN_CLUSTER"
    tmp = tmp_path_factory.mktemp("operating")
    name, namespace = f"op{secrets.token_hex(2)}", f"crop-{secrets.token_hex(3)}"
    store = Pusher(cluster.artifact_store, auth=(cluster.artifact_store_user, cluster.artifact_store_password))
    repo = f"e2e-early/{namespace}"
    seed = int(time.time()) % 100000
    images = {tag: push_image(store, repo, tag, layers=[16 * 1024 + i], seed=seed + i)
              for i, tag in enumerate(("one", "two"))}
    sources = {tag: f"{cluster.artifact_store_in_cluster}/{repo}:{tag}" for tag in images}

    # A drive with one image on the first system node, for the side-load Job.
    side = push_image(store, f"e2e-side/{namespace}", "1.0", layers=[8 * 1024], seed=seed + 7)
    creds = tmp / "creds.yaml"
    creds.write_text(f"username: {cluster.artifact_store_user}\npassword: {cluster.artifact_store_password}\n")
    node = system_nodes(cluster)[0]
    drive_path = f"/var/lib/cluster-registry/sideload-{namespace}"
    drive = Path(drive_path)  # the system nodes are real kubelets on this machine (docs/localcluster.md)
    exported = cli(cluster, "export", f"{cluster.artifact_store}/e2e-side/{namespace}:1.0", "-o", str(drive / "layout"),
                   "--insecure-registry", cluster.artifact_store, "--credentials-file", str(creds),
                   "--as-host", "sideload.example.com")
    assert exported.returncode == 0, exported.stderr
    for path in (drive, *drive.rglob("*")):  # a drive the Job's user (65532) can read, as a real one must be
        path.chmod(0o755 if path.is_dir() else 0o644)
    agent = STATE / "nodeagent" / "hostpath" / node / drive_path.lstrip("/")  # the node agent's (fallback) view
    shutil.copytree(drive, agent, dirs_exist_ok=True)

    values = tmp / "values.yaml"
    values.write_text(yaml.safe_dump({"global": {"networkfunctionextension": {
        "enableEarlyLoading": True,
        "earlyLoading": {"images": [sources["one"], sources["two"]], "timeout": "5m", "pullSecrets": ["store-pull"]},
        "enableLocalRegistry": True,
        "localRegistry": {"source": "hostPath", "hostPath": drive_path, "nodeSelector": {"kubernetes.io/hostname": node}},
        "artifactReconciler": {"insecureRegistries": [cluster.artifact_store_in_cluster]},
        "clusterRegistry": {"storageSize": "1Gi", "gc": {"grace": "1s"}},
    }}}))
    rel = Release(name, namespace, images, sources, side)
    with exclusive_chart():
        cluster.kubectl("create", "namespace", namespace)
        auth = base64.b64encode(f"{cluster.artifact_store_user}:{cluster.artifact_store_password}".encode()).decode()
        dockercfg = {"auths": {cluster.artifact_store_in_cluster: {"auth": auth}}}
        cluster.apply({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/dockerconfigjson",
                       "metadata": {"name": "store-pull", "namespace": namespace},
                       "data": {".dockerconfigjson": base64.b64encode(json.dumps(dockercfg).encode()).decode()}})
        adopt_crds(cluster, name, namespace)
        rel.sampler = Sampler(cluster, rel)
        rel.sampler.start()
        try:
            cluster.helm("install", name, str(CHART), "-n", namespace, "-f", str(values), "--wait", "--wait-for-jobs",
                         "--timeout", "480s", timeout=540)
            rel.sampler.phase = "installed"
            # the state helm --wait returned in: sampled before any test moves the phase on
            wait_for(lambda: sum(1 for s in rel.samples if s[0] == "installed") >= 4, timeout=30, interval=0.2,
                     what="the HA sampler's first samples after the install")
            yield rel
        finally:
            rel.sampler.stop.set()
            cluster.helm("uninstall", name, "-n", namespace, "--wait", "--timeout", "120s", check=False)
            cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
            shutil.rmtree(drive, ignore_errors=True)
            shutil.rmtree(agent, ignore_errors=True)


def in_registry(cluster: Cluster, release: Release, local: str, image: Image) -> bool:
    """Whether the registry (by pod IP, with GC's credential, which may read every repository: the
    default isolated access serves anonymous callers nothing) serves LOCAL's manifest."""
    repo = local.split("/", 1)[1].rsplit("@", 1)[0].rsplit(":", 1)[0]
    ip = three_ready(cluster, release.namespace, "registry")[0]["status"]["podIP"]
    secret = cluster.kubectl_json("get", "secret", "-n", release.namespace, f"{release.prefix}-registry-push-gc")
    creds = yaml.safe_load(base64.b64decode(secret["data"]["credentials.yaml"]))
    code, _, body = Pusher(f"{ip}:5000", auth=(creds["username"], creds["password"])).request(
        "GET", f"/v2/{repo}/manifests/{image.digest}", repo, headers={"Accept": image.media_type})
    assert code in (200, 404), (code, body[:300])
    return code == 200


def run_gc_job(cluster: Cluster, release: Release) -> dict[str, Any]:
    """A Job from the chart's GC CronJob, run to completion; its JSON report."""
    job = f"gc-e2e-{secrets.token_hex(2)}"
    cluster.kubectl("create", "job", job, "-n", release.namespace, f"--from=cronjob/{release.prefix}-gc")
    cluster.kubectl("wait", "-n", release.namespace, "--for=condition=complete", f"job/{job}", "--timeout=300s",
                    timeout=330)
    logs = cluster.kubectl("logs", "-n", release.namespace, f"job/{job}")
    report: dict[str, Any] = json.loads([ln for ln in logs.splitlines() if ln.startswith("{")][-1])
    assert report["ran"] and not report.get("error"), report
    return report


def artifacts(cluster: Cluster, namespace: str) -> dict[str, dict[str, Any]]:
    return {a["spec"]["sourceArtifact"]: a for a in cluster.kubectl_json("get", "artifacts", "-n", namespace)["items"]}


# -- item 3: three replicas at all times ------------------------------------------------------------


def test_ha_never_runs_below_three_through_install_upgrade_and_autoscaling_toggles(cluster: Cluster,
                                                                                    release: Release) -> None:
    assert release.sampler is not None
    for component in ("registry", "webhook"):
        three_ready(cluster, release.namespace, component, timeout=180)
    release.sampler.phase = "settled"
    steps = [
        ("upgrade", ["--set", f"{VALUES}.clusterRegistry.clusterRegistryGCCadence=30 1 * * *"]),
        ("autoscaling-off", ["--set", f"{VALUES}.clusterRegistry.autoScaling.enabled=false",
                             "--set", f"{VALUES}.webhook.autoScaling.enabled=false"]),
        ("autoscaling-on", ["--set", f"{VALUES}.clusterRegistry.autoScaling.enabled=true",
                            "--set", f"{VALUES}.webhook.autoScaling.enabled=true"]),
    ]
    for phase, args in steps:
        release.sampler.phase = phase
        release.helm_upgrade(cluster, *args)
        time.sleep(15)  # a Deployment dropped to 1 replica loses its Ready pods within seconds
    hpas = cluster.kubectl("get", "hpa", "-n", release.namespace, "-o", "name").split()
    assert len(hpas) == 2, hpas
    release.sampler.phase = "done"
    time.sleep(1)

    samples = list(release.samples)
    asked = [(phase, c, r) for phase, c, r, _ in samples if r is not None]
    assert asked and all(r >= 3 for _, _, r in asked), [s for s in asked if s[2] < 3][:5]
    after = [(phase, c, ready) for phase, c, _, ready in samples if phase in ("settled", *dict(steps))]
    assert {p for p, _, _ in after} >= set(dict(steps)), "the sampler missed a step"
    low = [s for s in after if s[2] < 3]
    assert not low, f"fewer than 3 Ready pods: {low[:5]} (of {len(after)} samples)"
    installed = [ready for phase, _, _, ready in samples if phase == "installed"]
    assert installed and min(installed[:2]) >= 2, "helm --wait returned before replicas - maxUnavailable were Ready"
    print(f"HA samples: {len(samples)}; Ready after helm install returned: {installed[:2]}")


# -- items 1, 2 and 9: early loading survives GC while listed; the chart's preload Job --------------


def test_early_loaded_images_survive_gc_until_removed_from_the_list(cluster: Cluster, release: Release) -> None:
    status = json.loads(cluster.helm("status", release.name, "-n", release.namespace, "-o", "json"))
    hooks = {h["name"].removeprefix(f"{release.prefix}-"): h["last_run"]["phase"] for h in status.get("hooks", [])}
    assert hooks.get("preload") == "Succeeded", hooks

    component = cluster.kubectl_json("get", "component", "-n", release.namespace, f"{release.prefix}-early-loading")
    assert component["spec"]["images"] == [release.sources["one"], release.sources["two"]]
    owner = cluster.kubectl_json("get", "configmap", "-n", release.namespace, f"{release.prefix}-early-loading")
    assert component["metadata"]["ownerReferences"][0]["uid"] == owner["metadata"]["uid"]
    arts = artifacts(cluster, release.namespace)
    local = {}
    for tag in ("one", "two"):
        art = arts[release.sources[tag]]
        assert art["status"]["phase"] == "Ready" and art["status"]["digest"] == release.images[tag].digest, art["status"]
        assert art["metadata"]["ownerReferences"][0]["uid"] == component["metadata"]["uid"]
        local[tag] = art["status"]["localArtifact"]
        assert in_registry(cluster, release, local[tag], release.images[tag])

    time.sleep(2)  # past the 1s grace period: only the Component keeps them now
    report = run_gc_job(cluster, release)
    assert report["manifestsSeen"] >= 2, report
    for tag in ("one", "two"):
        assert in_registry(cluster, release, local[tag], release.images[tag]), f"GC deleted early-loaded {tag}"
        assert release.sources[tag] in artifacts(cluster, release.namespace)

    # Remove "two" from the list: the component reconciler releases its Artifact, the next GC deletes it.
    release.helm_upgrade(cluster, "--set-json", f'{VALUES}.earlyLoading.images=["{release.sources["one"]}"]')
    wait_for(lambda: release.sources["two"] not in artifacts(cluster, release.namespace), timeout=120,
             what="the Artifact of the removed image to go")
    time.sleep(2)
    report = run_gc_job(cluster, release)
    assert report["manifestsDeleted"] >= 1, report
    assert not in_registry(cluster, release, local["two"], release.images["two"]), "removed from the list, yet kept"
    assert in_registry(cluster, release, local["one"], release.images["one"]), "still listed, yet deleted"

    # Item 2: the switch with an empty list is valid; the notes say there is nothing to preload, and
    # the last image is released too.
    out = release.helm_upgrade(cluster, "--set-json", f"{VALUES}.earlyLoading.images=[]")
    assert "nothing to preload" in out, out
    wait_for(lambda: release.sources["one"] not in artifacts(cluster, release.namespace), timeout=120,
             what="the Artifact of the last image to go")
    time.sleep(2)
    run_gc_job(cluster, release)
    assert not in_registry(cluster, release, local["one"], release.images["one"])


# -- item 9: the chart's side-load Job ---------------------------------------------------------------


def test_sideload_job_runs_through_helm(cluster: Cluster, release: Release) -> None:
    status = json.loads(cluster.helm("status", release.name, "-n", release.namespace, "-o", "json"))
    hooks = {h["name"].removeprefix(f"{release.prefix}-"): h["last_run"]["phase"] for h in status.get("hooks", [])}
    assert hooks.get("sideload") == "Succeeded", hooks
    source = f"sideload.example.com/e2e-side/{release.namespace}:1.0"
    art = artifacts(cluster, release.namespace)[source]
    assert art["status"]["phase"] == "Ready" and art["status"]["digest"] == release.sideloaded.digest
    assert [c["reason"] for c in art["status"]["conditions"] if c["type"] == "Ready"] == ["Sideloaded"]
    assert in_registry(cluster, release, art["status"]["localArtifact"], release.sideloaded)


# -- item 6: a refusal that says why -----------------------------------------------------------------


def test_storage_size_change_is_refused_with_the_reason_in_helms_output(cluster: Cluster, release: Release) -> None:
    before = json.loads(cluster.helm("status", release.name, "-n", release.namespace, "-o", "json"))["version"]
    with pytest.raises(CommandError) as refused:
        cluster.helm("upgrade", release.name, str(CHART), "-n", release.namespace, "--reuse-values",
                     "--set", f"{VALUES}.clusterRegistry.storageSize=2Gi", "--timeout", "120s", timeout=180)
    stderr = refused.value.stderr
    assert "storageSize cannot be modified after the initial deployment" in stderr, stderr
    assert "is 1Gi and the new value is 2Gi" in stderr and "BackoffLimitExceeded" not in stderr, stderr
    after = json.loads(cluster.helm("status", release.name, "-n", release.namespace, "-o", "json"))["version"]
    assert after == before, "a refused upgrade must not create a revision"
    # The same size in another spelling is no change (the hook's own check agrees).
    release.helm_upgrade(cluster, "--set", f"{VALUES}.clusterRegistry.storageSize=1Gi")


# -- item 7: every command of the operator's guide -----------------------------------------------------


def guide_blocks(text: str) -> list[tuple[str, str | None]]:
    """(script, refusal text or None) for every ```sh block, in order."""
    out = []
    for m in re.finditer(r"(?:<!-- refused: (?P<why>[^>]*?) -->\n)?(?P<indent> *)```sh\n(?P<body>.*?)\n(?P=indent)```",
                         text, re.S):
        body = "\n".join(line.removeprefix(m["indent"]) for line in m["body"].splitlines())
        out.append((body, m["why"]))
    return out


def test_every_command_of_the_operating_guide_runs(cluster: Cluster, release: Release, namespace: str) -> None:
    blocks = guide_blocks(GUIDE.read_text())
    assert len(blocks) >= 10 and sum(1 for _, why in blocks if why) == 1
    # A network function that was running before: a Deployment on the (simulated) user nodes.
    image = f"myacr.azurecr.io/e2e/{namespace}/cnf:1.0.0"
    cluster.apply({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "cnf", "namespace": namespace},
                   "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "cnf"}},
                            "template": {"metadata": {"labels": {"app": "cnf"}, "annotations": {}},
                                         "spec": {"nodeSelector": {"kubernetes.azure.com/mode": "user"},
                                                  "tolerations": [{"operator": "Exists"}],
                                                  "containers": [{"name": "cnf", "image": image}]}}}})
    env = {**cluster.env(), "RELEASE": release.name, "NAMESPACE": release.namespace, "CHART": str(CHART),
           "PREFIX": release.prefix, "CNF_NAMESPACE": namespace, "PATH": f"{BIN}:{os.environ['PATH']}"}
    outputs = []
    for script, why in blocks:
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], capture_output=True, text=True, env=env,
                              cwd=ROOT, timeout=900)
        if why:
            assert proc.returncode != 0 and why in proc.stderr, (script, proc.stdout, proc.stderr)
        else:
            assert proc.returncode == 0, (script, proc.stdout, proc.stderr)
        outputs.append(proc.stdout)
    text = "\n".join(outputs)
    # What the commands showed: the re-created pod recorded, the window, the cached list.
    assert any(a["spec"]["sourceArtifact"] == image for a in cluster.kubectl_json("get", "artifacts", "-n", namespace)["items"])
    assert re.search(r"^cluster_registry_gc_last_window_seconds \d", text, re.M), text[-2000:]
    assert "ReadOnlyWindow" in text and "read-only window: writes were held off for" in text
    assert f"{release.prefix}-early-loading" in text
    assert all(pod_ready(p) for p in component_pods(cluster, release.namespace, "registry"))
