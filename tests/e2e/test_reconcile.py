"""The reconcilers on the local control plane, run as local processes with ``--kubeconfig``.

Artifacts are copied from the artifact store (htpasswd; credentials from a dockerconfigjson pull
Secret) into the cluster registry; Components (listed images, and a chart pushed to the store as
OCI) become Ready; two artifact reconcilers share a Lease and only the leader copies.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from cluster_registry import reference
from cluster_registry.oci.retry import RetryPolicy
from cluster_registry.reconcile import status as st
from tests.support import ociimages
from tests.support.cluster import ROOT, Cluster, wait_for
from tests.support.registry import free_port

CLI = str(ROOT / ".venv" / "bin" / "cluster-registry")
HELM = str(ROOT / ".cache" / "bin" / "helm")
CHART = ROOT / "tests" / "unit" / "reconcile_fixtures" / "cnf-chart"
GROUP, VERSION = "clusterregistry.io", "v1alpha1"


@pytest.fixture(scope="module")
def crds(cluster: Cluster) -> None:
    """The chart's CRDs, applied from ``helm template`` output (idempotent)."""
    rendered = cluster.helm("template", "cluster-registry", str(ROOT / "chart"), "--kube-version", "1.35.0",
                            "--show-only", "templates/crds/artifacts.yaml", "--show-only", "templates/crds/components.yaml")
    cluster.kubectl("apply", "-f", "-", stdin=rendered)
    cluster.kubectl("wait", "--for", "condition=established", "--timeout=60s",
                    "crd/artifacts.clusterregistry.io", "crd/components.clusterregistry.io")


class Process:
    """A reconciler run locally; stopped by its PID."""

    def __init__(self, args: list[str], log: Path, port: int) -> None:
        self.log = log
        self.port = port
        self._out = open(log, "wb")
        self.proc = subprocess.Popen([CLI, *args], stdout=self._out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._out.close()


@pytest.fixture
def start(cluster: Cluster, namespace: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Any]:
    procs: list[Process] = []
    failed_before = request.session.testsfailed

    def run(kind: str, *extra: str, name: str | None = None) -> Process:
        port = free_port()
        common = ["--kubeconfig", str(cluster.kubeconfig), "--namespace", namespace, "--watch-namespace", namespace,
                  "--http-listen", f"127.0.0.1:{port}", "--lease-duration", "6", "--renew-deadline", "4",
                  "--retry-period", "1", "--insecure-registry", cluster.artifact_store]
        if kind == "artifacts":
            common += ["--registry-host", cluster.cluster_registry, "--registry-insecure", "--backoff-base", "2"]
        else:
            common += ["--helm", HELM, "--registry-host", cluster.cluster_registry]
        p = Process(["--log-format", "json", "reconcile", kind, *common, *extra], tmp_path / f"{name or kind}.log", port)
        procs.append(p)
        return p

    yield run
    for p in procs:
        p.stop()
    if request.session.testsfailed > failed_before:  # keep what explains a failure: logs, objects' state
        keep = Path(os.environ.get("RECONCILE_E2E_KEEP", "/tmp")) / f"reconcile-e2e-{namespace}"
        keep.mkdir(parents=True, exist_ok=True)
        for p in procs:
            (keep / p.log.name).write_bytes(p.log.read_bytes())
        state = cluster.kubectl("get", f"artifacts.{GROUP},components.{GROUP},events", "-n", namespace, "-o", "yaml", check=False)
        (keep / "objects.yaml").write_text(state)
        print(f"reconciler logs and objects kept in {keep}")


def pull_secret(cluster: Cluster, namespace: str, name: str = "store", password: str | None = None) -> None:
    auth = base64.b64encode(f"{cluster.artifact_store_user}:{password or cluster.artifact_store_password}".encode()).decode()
    config = json.dumps({"auths": {cluster.artifact_store: {"auth": auth}}})
    cluster.apply({
        "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/dockerconfigjson",
        "metadata": {"name": name, "namespace": namespace},
        "data": {".dockerconfigjson": base64.b64encode(config.encode()).decode()},
    })


# The shared local cluster may run installed charts whose reconcilers watch every namespace: the
# annotation keeps them off this test's objects (they belong to the reconcilers started here).
CLAIM = "clusterregistry.io/registry"


def artifact(name: str, source: str, secrets: list[str] | None = None) -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Artifact",
            "metadata": {"name": name, "annotations": {CLAIM: Cluster.load().cluster_registry}},
            "spec": {"sourceArtifact": source, **({"pullSecrets": secrets} if secrets else {})}}


def get(cluster: Cluster, kind: str, namespace: str, name: str) -> dict[str, Any]:
    return dict(cluster.kubectl_json("get", f"{kind}.{GROUP}", name, "-n", namespace))


def ready_condition(obj: dict[str, Any]) -> dict[str, Any]:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == "Ready"), {})


def phase_is(cluster: Cluster, namespace: str, name: str, phase: str) -> dict[str, Any] | None:
    obj = get(cluster, "artifacts", namespace, name)
    return obj if (obj.get("status") or {}).get("phase") == phase else None


def failed_with(cluster: Cluster, namespace: str, name: str, *reasons: str) -> dict[str, Any] | None:
    obj = phase_is(cluster, namespace, name, "Failed")
    return obj if obj is not None and ready_condition(obj).get("reason") in reasons else None


class WriteCounter:
    """Counts MODIFIED watch events of one Artifact (status writes show up as such) while running."""

    def __init__(self, cluster: Cluster, namespace: str, name: str) -> None:
        self.count = 0
        self.cmd = subprocess.Popen(
            [str(ROOT / ".cache/bin/kubectl"), "get", f"artifacts.{GROUP}", name, "-n", namespace, "--watch-only",
             "-o", "jsonpath={.metadata.resourceVersion}{\"\\n\"}"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=cluster.env(), text=True,
        )
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.cmd.stdout is not None
        for line in self.cmd.stdout:
            if line.strip():
                self.count += 1

    def stop(self) -> int:
        os.kill(self.cmd.pid, signal.SIGTERM)
        self.cmd.wait(10)
        self.thread.join(5)
        return self.count


UNREACHABLE = "127.0.0.1:1/nothing/listens:1.0"


def failure_times(log: str, source: str) -> list[float]:
    """When the reconciler logged "copy failed" for SOURCE's destination (its JSON lines' ts)."""
    ref = reference.parse(source)
    dest = f"/{reference.local_repository(ref)}:{ref.tag}"
    out = []
    for line in log.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("msg") == "copy failed" and dest in str(rec.get("destination")):
            out.append(datetime.fromisoformat(rec["ts"].replace("Z", "+00:00")).timestamp())
    return out


def store_pusher(cluster: Cluster) -> ociimages.Pusher:
    return ociimages.Pusher(cluster.artifact_store, auth=(cluster.artifact_store_user, cluster.artifact_store_password))


def test_artifacts_are_copied_with_pull_secrets_and_bad_sources_back_off(
    cluster: Cluster, crds: None, namespace: str, start: Any
) -> None:
    src = store_pusher(cluster)
    repo = f"{namespace}/app"
    image = ociimages.push_image(src, repo, "1.0", layers=[20_000, 50_000], seed=41)
    index = ociimages.push_index(src, f"{namespace}/multi", "2.0", ociimages.PLATFORMS[:2], layers=[10_000], seed=42)
    src.put_manifest(repo, "locked", image.manifest, image.media_type)  # same image, another tag
    pull_secret(cluster, namespace)
    good = f"{cluster.artifact_store}/{repo}:1.0"
    multi = f"{cluster.artifact_store}/{namespace}/multi:2.0@{index.digest}"
    missing = f"{cluster.artifact_store}/{namespace}/app:no-such-tag"
    cluster.apply([artifact("good", good, ["store"]), artifact("multi", multi, ["store"]),
                   artifact("missing", missing, ["store"]), artifact("twin", good),
                   artifact("nosecret", f"{cluster.artifact_store}/{repo}:locked"),
                   artifact("unreachable", UNREACHABLE)], namespace)
    proc = start("artifacts")

    obj = wait_for(lambda: phase_is(cluster, namespace, "good", "Ready"), timeout=120, what="good Ready")
    s = obj["status"]
    local_repo = reference.local_repository(reference.parse(good))
    assert s["digest"] == image.digest
    assert s["size"] == len(image.manifest) + sum(size for _, size in image.all_blobs())
    assert s["localArtifact"] == f"{cluster.cluster_registry}/{local_repo}:1.0"
    assert s["observedGeneration"] == obj["metadata"]["generation"] and s["lastSyncTime"]
    assert ready_condition(obj)["status"] == "True"
    dst = ociimages.Pusher(cluster.cluster_registry)
    assert dst.get_manifest(local_repo, "1.0") == (image.manifest, image.media_type)
    ociimages.assert_copied(src, dst, image, local_repo)

    # Same source, no pull secret of its own: one copy serves both; readiness is per Artifact.
    twin = wait_for(lambda: phase_is(cluster, namespace, "twin", "Ready"), timeout=60, what="twin Ready")
    assert twin["status"]["digest"] == image.digest and twin["status"]["localArtifact"] == s["localArtifact"]
    assert '"copied"' in proc.text() and proc.text().count(f'"destination": "{s["localArtifact"]}"') == 1

    m = wait_for(lambda: phase_is(cluster, namespace, "multi", "Ready"), timeout=120, what="multi Ready")["status"]
    assert m["digest"] == index.digest and len(m["platforms"]) == 2

    # (a store that is briefly unreachable shows RegistryUnavailable first and is retried soon)
    bad = wait_for(lambda: failed_with(cluster, namespace, "missing", "NotFound"), timeout=120, what="missing NotFound")
    assert "no-such-tag" in ready_condition(bad)["message"]
    wait_for(lambda: failed_with(cluster, namespace, "nosecret", "Authentication", "AccessDenied"), timeout=120,
             what="nosecret Authentication")

    down = wait_for(lambda: phase_is(cluster, namespace, "unreachable", "Failed"), timeout=120, what="unreachable Failed")
    assert ready_condition(down)["reason"] == "RegistryUnavailable"  # temporary: retried with a short backoff

    # No hot loop: while the temporary failure is retried twice more, no failed Artifact's status is
    # rewritten (backoff, unchanged status).
    counters = [WriteCounter(cluster, namespace, n) for n in ("missing", "nosecret", "unreachable")]
    seen = len(failure_times(proc.text(), UNREACHABLE))
    wait_for(lambda: len(failure_times(proc.text(), UNREACHABLE)) >= seen + 2, timeout=90, what="two more retries")
    assert [c.stop() for c in counters] == [0, 0, 0]
    events = cluster.kubectl_json("get", "events.events.k8s.io", "-n", namespace)["items"]
    reasons = [(e["regarding"]["name"], e["reason"]) for e in events]
    assert ("good", "Copied") in reasons and reasons.count(("missing", "NotFound")) == 1, reasons
    log = proc.text()
    assert cluster.artifact_store_password not in log
    # Failures back off on the schedule: between two logged failures of the temporary one lie the
    # jittered k-th backoff delay and the next attempt's own time (the registry client's retries of a
    # refused connection, at most the sum of their delays); permanent ones are not retried within the
    # test (their first backoff is minutes).
    times = failure_times(log, UNREACHABLE)
    policy = st.BackoffPolicy(base=2.0)  # --backoff-base 2, as the fixture starts it
    inner = RetryPolicy()
    attempt = sum(min(inner.max_delay, inner.base_delay * 2 ** (n - 1)) for n in range(1, inner.attempts)) + 1.0
    for k, gap in enumerate((b - a for a, b in zip(times, times[1:])), 1):
        low, high = (st.backoff_delay(k, True, r, policy) for r in (0.0, 1.0))
        assert low - 0.05 <= gap <= high + attempt, f"retry {k} came {gap:.2f}s after the failure: not in [{low:.1f}, {high:.1f}] + the attempt"
    assert len(times) >= 3  # two retries checked at least
    assert [len(failure_times(log, n)) for n in (missing, f"{cluster.artifact_store}/{repo}:locked")] == [1, 1]


def test_components_with_images_and_with_a_chart_become_ready(
    cluster: Cluster, crds: None, namespace: str, start: Any, tmp_path: Path
) -> None:
    src = store_pusher(cluster)
    base = f"{cluster.artifact_store}/{namespace}"
    for n, name in enumerate(["app", "init", "db", "agent", "migrate", "backup", "extra"]):
        ociimages.push_image(src, f"{namespace}/{name}", {"db": "2.1", "agent": "0.3"}.get(name, "1.0"),
                             layers=[2_000 + n], seed=60 + n)
    push_chart(cluster, base, tmp_path)
    pull_secret(cluster, namespace)
    cluster.apply([
        {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Component",
         "metadata": {"name": "listed", "annotations": {CLAIM: cluster.cluster_registry}},
         "spec": {"images": [f"{base}/app:1.0", f"{base}/extra:1.0"], "pullSecrets": ["store"]}},
        {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Component",
         "metadata": {"name": "charted", "annotations": {CLAIM: cluster.cluster_registry}},
         "spec": {"chart": {"ref": f"oci://{base}/charts/reconcile-cnf", "version": "0.1.0",
                            "values": {"registry": base}, "pullSecrets": ["store"]}}},
    ], namespace)
    start("artifacts")
    start("components")

    def ready(name: str) -> dict[str, Any] | None:
        obj = get(cluster, "components", namespace, name)
        return obj if ready_condition(obj).get("status") == "True" else None

    listed = wait_for(lambda: ready("listed"), timeout=180, what="listed Ready")
    assert listed["status"]["ready"] == "2/2"
    assert listed["status"]["observedGeneration"] == listed["metadata"]["generation"]
    charted = wait_for(lambda: ready("charted"), timeout=180, what="charted Ready")
    assert charted["status"]["ready"] == "6/6", charted["status"]
    sources = sorted(i["sourceArtifact"] for i in charted["status"]["images"])
    assert sources == sorted(f"{base}/{n}" for n in ["agent:0.3", "app:1.0", "backup:1.0", "db:2.1", "init:1.0", "migrate:1.0"])
    assert all(i["phase"] == "Ready" for i in charted["status"]["images"])

    arts = cluster.kubectl_json("get", f"artifacts.{GROUP}", "-n", namespace)["items"]
    by_source = {a["spec"]["sourceArtifact"]: a for a in arts}
    shared = by_source[f"{base}/app:1.0"]  # wanted by both Components: one Artifact, two owners
    assert sorted(r["name"] for r in shared["metadata"]["ownerReferences"]) == ["charted", "listed"]
    assert all(a["metadata"]["annotations"][CLAIM] == cluster.cluster_registry for a in arts)  # claim propagated
    db = by_source[f"{base}/db:2.1"]
    assert db["metadata"]["name"] == reference.artifact_name(f"{base}/db:2.1")
    assert db["metadata"]["labels"]["clusterregistry.io/component"] == "charted"
    assert [r["uid"] for r in db["metadata"]["ownerReferences"]] == [charted["metadata"]["uid"]]


def push_chart(cluster: Cluster, base: str, tmp_path: Path) -> str:
    """The test chart, packaged and pushed to the store as an OCI artifact with helm itself; its oci:// ref."""
    cluster.helm("package", str(CHART), "-d", str(tmp_path))
    auth = base64.b64encode(f"{cluster.artifact_store_user}:{cluster.artifact_store_password}".encode()).decode()
    regconf = tmp_path / "registry.json"
    regconf.write_text(json.dumps({"auths": {cluster.artifact_store: {"auth": auth}}}))
    cluster.helm("push", str(tmp_path / "reconcile-cnf-0.1.0.tgz"), f"oci://{base}/charts", "--plain-http",
                 "--registry-config", str(regconf))
    return f"oci://{base}/charts/reconcile-cnf"


def test_components_whose_chart_cannot_render_say_why_and_keep_their_artifacts(
    cluster: Cluster, crds: None, namespace: str, start: Any, tmp_path: Path
) -> None:
    base = f"{cluster.artifact_store}/{namespace}"
    ref = push_chart(cluster, base, tmp_path)
    pull_secret(cluster, namespace)
    wrong = "not-the-password"
    pull_secret(cluster, namespace, "wrong", password=wrong)
    chart = {"ref": ref, "version": "0.1.0", "values": {"registry": base}, "pullSecrets": ["store"]}
    component = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Component"}
    cluster.apply([
        {**component, "metadata": {"name": "moved", "annotations": {CLAIM: cluster.cluster_registry}}, "spec": {"chart": chart}},
        {**component, "metadata": {"name": "wrongcreds", "annotations": {CLAIM: cluster.cluster_registry}},
         "spec": {"chart": {**chart, "pullSecrets": ["wrong"]}}},
    ], namespace)  # fmt: skip
    proc = start("components")

    def conditions(name: str) -> dict[str, tuple[str, str, str]]:
        return {c["type"]: (c["status"], c["reason"], c["message"])
                for c in (get(cluster, "components", namespace, name).get("status") or {}).get("conditions") or []}  # fmt: skip

    def owned_by(name: str) -> dict[str, str]:
        return {a["metadata"]["name"]: a["metadata"]["uid"] for a in cluster.kubectl_json(
            "get", f"artifacts.{GROUP}", "-n", namespace, "-l", f"clusterregistry.io/component={name}")["items"]}  # fmt: skip

    made = wait_for(lambda: (lambda o: o if len(o) == 6 else None)(owned_by("moved")), timeout=120,
                    what="the chart's 6 Artifacts")  # fmt: skip
    # Wrong credentials: refused by the store (401), permanent, and no credential in what is reported.
    denied = wait_for(lambda: (lambda c: c if c.get("Stalled", ("",))[0] == "True" else None)(conditions("wrongcreds")),
                      timeout=120, what="wrongcreds Stalled")  # fmt: skip
    assert denied["Ready"][:2] == ("False", "ChartRenderFailed") and "Reconciling" not in denied
    assert "401" in denied["Ready"][2] or "unauthorized" in denied["Ready"][2].lower(), denied
    assert not owned_by("wrongcreds")
    # The chart moves to a version that does not exist: the status says so, the Artifacts stay.
    cluster.kubectl("patch", f"components.{GROUP}", "moved", "-n", namespace, "--type=merge",
                    "-p", json.dumps({"spec": {"chart": {"version": "9.9.9"}}}))  # fmt: skip
    gone = wait_for(lambda: (lambda c: c if c.get("Ready", ("",))[1:2] == ("ChartRenderFailed",) else None)(
        conditions("moved")), timeout=120, what="moved ChartRenderFailed")  # fmt: skip
    assert gone["Stalled"][0] == "True" and "9.9.9" in gone["Ready"][2], gone
    assert owned_by("moved") == made, "a render failure dropped or replaced Artifacts"
    log = proc.text()
    assert wrong not in log and base64.b64encode(f"{cluster.artifact_store_user}:{wrong}".encode()).decode() not in log
    assert all(wrong not in c[2] for c in denied.values())
    # Fixed credentials are picked up (a new generation): it renders and makes its Artifacts.
    cluster.kubectl("patch", f"components.{GROUP}", "wrongcreds", "-n", namespace, "--type=merge",
                    "-p", json.dumps({"spec": {"chart": {"pullSecrets": ["store"]}}}))  # fmt: skip
    wait_for(lambda: len(get(cluster, "components", namespace, "wrongcreds")["status"].get("images") or []) == 6,
             timeout=120, what="wrongcreds rendered once its credentials are fixed")  # fmt: skip
    assert "Stalled" not in conditions("wrongcreds")


def test_leader_election_only_the_leader_copies_and_a_standby_takes_over(
    cluster: Cluster, crds: None, namespace: str, start: Any
) -> None:
    src = store_pusher(cluster)
    first = ociimages.push_image(src, f"{namespace}/one", "1.0", layers=[3_000], seed=81)
    second = ociimages.push_image(src, f"{namespace}/two", "1.0", layers=[3_000], seed=82)
    pull_secret(cluster, namespace)
    a = start("artifacts", name="a")
    b = start("artifacts", name="b")

    def holder() -> str | None:
        lease = cluster.kubectl_json("get", "lease", "cluster-registry-artifact-reconciler", "-n", namespace)
        return lease["spec"].get("holderIdentity") or None

    leader_id = wait_for(holder, timeout=60, what="a leader")
    time.sleep(3)  # both processes are up and contending
    cluster.apply(artifact("one", f"{cluster.artifact_store}/{namespace}/one:1.0", ["store"]), namespace)
    obj = wait_for(lambda: phase_is(cluster, namespace, "one", "Ready"), timeout=120, what="one Ready")
    assert obj["status"]["digest"] == first.digest
    leader, standby = (a, b) if leader_id in a.text() else (b, a)  # each process logs its own identity
    assert '"leading"' in leader.text() and '"leading"' not in standby.text()
    assert '"copied"' in leader.text() and '"copied"' not in standby.text()

    leader.stop(signal.SIGKILL)  # no release: the standby must wait out the Lease
    killed = time.monotonic()
    cluster.apply(artifact("two", f"{cluster.artifact_store}/{namespace}/two:1.0", ["store"]), namespace)
    obj = wait_for(lambda: phase_is(cluster, namespace, "two", "Ready"), timeout=120, what="two Ready after failover")
    assert obj["status"]["digest"] == second.digest
    assert '"leading"' in standby.text() and '"copied"' in standby.text()
    assert wait_for(holder, timeout=5) != leader_id
    assert time.monotonic() - killed < 60


def test_lease_lock_contention_expiry_and_release(cluster: Cluster, namespace: str) -> None:
    from cluster_registry.leader import LeaseLock, Result

    api = cluster.api_client()
    a = LeaseLock(api, namespace, "contended", "a", duration=2)
    b = LeaseLock(api, namespace, "contended", "b", duration=2)
    assert a.try_acquire_or_renew() is Result.HELD
    assert b.try_acquire_or_renew() is Result.OTHER
    assert a.try_acquire_or_renew() is Result.HELD  # renewal
    rec = a.read()
    assert rec is not None and rec.holder == "a" and rec.duration == 2 and rec.transitions == 0
    # a stops renewing: b, having watched the record stay unchanged for longer than 2 s, takes over
    deadline = time.monotonic() + 10
    while b.try_acquire_or_renew() is not Result.HELD:
        assert time.monotonic() < deadline, "b never took the expired lease"
        time.sleep(0.5)
    rec = b.read()
    assert rec is not None and rec.holder == "b" and rec.transitions == 1
    assert a.try_acquire_or_renew() is Result.OTHER
    b.release()
    assert b.read().holder == ""  # type: ignore[union-attr]
    assert a.try_acquire_or_renew() is Result.HELD  # released: no wait
