"""The local cluster as tests see it: `.cache/localcluster/env`, kubectl/helm wrappers, API clients.

`ci/localcluster up` writes the env file; `Cluster.load()` reads it. Every helper runs the pinned
binaries from `.cache/bin` against the local cluster's kubeconfig, never the caller's environment.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parents[2]
BIN = ROOT / ".cache" / "bin"
STATE = ROOT / ".cache" / "localcluster"
ENV_FILE = STATE / "env"
LOCALCLUSTER = ROOT / "ci" / "localcluster"

T = TypeVar("T")


class CommandError(RuntimeError):
    """A kubectl/helm call failed; the message carries the command and its stderr."""

    def __init__(self, argv: list[str], returncode: int, stdout: str, stderr: str) -> None:
        super().__init__(f"{' '.join(argv)} exited {returncode}:\n{stderr.strip() or stdout.strip()}")
        self.argv = argv
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr


def read_env(path: Path = ENV_FILE) -> dict[str, str]:
    """Parse the KEY=VALUE lines of the env file (shell syntax, no quoting needed for our values)."""
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        values[key.strip()] = value.strip().strip("'\"")
    return values


@dataclass(frozen=True)
class Cluster:
    kubeconfig: Path
    cluster_registry: str  # host:port, plain HTTP, no auth
    artifact_store: str  # host:port, plain HTTP, htpasswd auth
    artifact_store_user: str
    artifact_store_password: str
    apiserver: str = ""
    ca_file: Path | None = None
    # The two registries as pods reach them (Service DNS names).
    artifact_store_in_cluster: str = ""
    cluster_registry_in_cluster: str = ""

    @classmethod
    def load(cls, path: Path = ENV_FILE) -> Cluster:
        env = read_env(path)
        return cls(
            kubeconfig=Path(env["KUBECONFIG"]),
            cluster_registry=env["CLUSTER_REGISTRY"],
            artifact_store=env["ARTIFACT_STORE"],
            artifact_store_user=env["ARTIFACT_STORE_USER"],
            artifact_store_password=env["ARTIFACT_STORE_PASSWORD"],
            apiserver=env.get("LOCALCLUSTER_APISERVER", ""),
            ca_file=Path(env["LOCALCLUSTER_CA"]) if env.get("LOCALCLUSTER_CA") else None,
            artifact_store_in_cluster=env.get("LOCALCLUSTER_ARTIFACT_STORE_IN_CLUSTER", ""),
            cluster_registry_in_cluster=env.get("LOCALCLUSTER_CLUSTER_REGISTRY_IN_CLUSTER", ""),
        )

    # -- binaries ---------------------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        """The process environment for a tool run against this cluster."""
        env = dict(os.environ)
        env["KUBECONFIG"] = str(self.kubeconfig)
        env["PATH"] = f"{BIN}:{env.get('PATH', '')}"
        env.setdefault("HELM_CACHE_HOME", str(STATE / "helm" / "cache"))
        env.setdefault("HELM_CONFIG_HOME", str(STATE / "helm" / "config"))
        env.setdefault("HELM_DATA_HOME", str(STATE / "helm" / "data"))
        return env

    def run(self, tool: str, *args: str, stdin: str | None = None, timeout: float = 300, check: bool = True
            ) -> subprocess.CompletedProcess[str]:
        argv = [str(BIN / tool), *args]
        proc = subprocess.run(argv, input=stdin, text=True, capture_output=True, env=self.env(), timeout=timeout)
        if check and proc.returncode != 0:
            raise CommandError(argv, proc.returncode, proc.stdout, proc.stderr)
        return proc

    def kubectl(self, *args: str, stdin: str | None = None, timeout: float = 120, check: bool = True) -> str:
        """Run kubectl against the cluster; returns stdout, raises CommandError with stderr on failure."""
        return self.run("kubectl", *args, stdin=stdin, timeout=timeout, check=check).stdout

    def kubectl_json(self, *args: str) -> Any:
        return json.loads(self.kubectl(*args, "-o", "json"))

    def apply(self, manifest: dict[str, Any] | list[dict[str, Any]], namespace: str | None = None) -> str:
        items = manifest if isinstance(manifest, list) else [manifest]
        doc = json.dumps({"apiVersion": "v1", "kind": "List", "items": items})
        ns = ["-n", namespace] if namespace else []
        return self.kubectl("apply", *ns, "-f", "-", stdin=doc)

    def helm(self, *args: str, timeout: float = 600, check: bool = True) -> str:
        """Run helm against the cluster; returns stdout, raises CommandError with stderr on failure."""
        return self.run("helm", *args, timeout=timeout, check=check).stdout

    def pod_logs(self, namespace: str, pod: str, container: str) -> str:
        """Output of a container, every restart of it, gone pods included ("" when it has none yet)."""
        for d in _log_dirs(f"{namespace}_{pod}_*"):
            text = _container_log(d, container)
            if text:
                return text
        return ""

    def namespace_logs(self, namespace: str) -> dict[str, str]:
        """Output of every container that ran in NAMESPACE, gone pods included: {"<pod>/<container>": text}."""
        out: dict[str, str] = {}
        for d in _log_dirs(f"{namespace}_*"):
            pod = d.name[len(namespace) + 1:].rsplit("_", 1)[0]
            for c in sorted({f.name.split(".", 1)[0] for f in d.glob("*.log")}):
                out[f"{pod}/{c}"] = _container_log(d, c)
        return out

    # -- API clients ------------------------------------------------------------------------------

    def api_client(self) -> Any:
        """A kubernetes.client.ApiClient for this cluster (admin credentials)."""
        from kubernetes import client, config

        cfg = client.Configuration()
        config.load_kube_config(config_file=str(self.kubeconfig), client_configuration=cfg)
        return client.ApiClient(configuration=cfg)

    def core(self) -> Any:
        from kubernetes import client

        return client.CoreV1Api(self.api_client())

    # -- health -----------------------------------------------------------------------------------

    def healthy(self) -> bool:
        """The apiserver answers /readyz and both registries answer /v2/."""
        if not self.kubeconfig.exists() or self.ca_file is None or not self.apiserver:
            return False
        try:
            self.kubectl("get", "--raw", "/readyz", timeout=10)
        except (CommandError, subprocess.TimeoutExpired):
            return False
        return (_http_status(f"http://{self.cluster_registry}/v2/") == 200
                and _http_status(f"http://{self.artifact_store}/v2/") == 401)


# Container logs: the real nodes' kubelets write CRI log files, which ci/nodenet.py keeps (hard links)
# under pod-logs/<ns>_<pod>_<uid>/<container>.<restart>.log after the kubelet removes a gone pod's.
POD_LOGS = STATE / "pod-logs"


def _log_dirs(pattern: str) -> list[Path]:
    return sorted(POD_LOGS.glob(pattern))


def _container_log(d: Path, container: str) -> str:
    parts = sorted(d.glob(f"{container}.*.log"), key=lambda f: int(f.name.rsplit(".", 2)[1]))
    return "".join(cri_log_text(f.read_text(errors="replace")) for f in parts)


def cri_log_text(raw: str) -> str:
    """The program's output from a CRI log file (`<time> <stream> <P|F> <text>` lines; P: partial)."""
    out = []
    for line in raw.splitlines():
        fields = line.split(" ", 3)
        if len(fields) < 3:
            continue
        text = fields[3] if len(fields) == 4 else ""
        out.append(text if fields[2] == "P" else text + "\n")
    return "".join(out)


def _http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:  # noqa: S310 (loopback)
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except (OSError, ssl.SSLError):
        return 0


@contextlib.contextmanager
def exclusive_chart(timeout: float = 1800) -> Iterator[None]:
    """Hold the cluster-wide lock for installing chart/ while the release exists.

    Two releases of the chart on one cluster fight: the CRDs are cluster-scoped (one owner), and each
    release's webhook and artifact reconciler act on every namespace. Tests that install the chart
    hold this lock (a flock on .cache/localcluster/chart.lock) from install to uninstall.
    """
    STATE.mkdir(parents=True, exist_ok=True)
    if _held_by_an_ancestor(STATE / "chart.lock"):  # e.g. `flock .cache/localcluster/chart.lock pytest ...`
        yield
        return
    with open(STATE / "chart.lock", "w") as f:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError("another test held the chart lock for too long") from None
                time.sleep(1)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _held_by_an_ancestor(path: Path) -> bool:
    """True when this process or one of its parents holds the flock on PATH: taking it again through a
    new open file would wait forever on ourselves."""
    if not path.exists():
        return False
    inode = str(path.stat().st_ino)
    holders = set()
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()  # "1: FLOCK ADVISORY WRITE <pid> <maj:min:inode> 0 EOF"; waiters have "->"
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5].rsplit(":", 1)[-1] == inode:
            holders.add(int(fields[4]))
    pid = os.getpid()
    while pid > 1:
        if pid in holders:
            return True
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
    return False


def ensure_up() -> Cluster:
    """Return the running cluster, starting it with `ci/localcluster up` when it is missing or unhealthy,
    with the project's images of the current code in its registries (`ci/images push`: seconds when
    nothing changed; the real nodes run the chart's pods from these images)."""
    cluster = Cluster.load() if ENV_FILE.exists() else None
    if cluster is None or not cluster.healthy():
        proc = subprocess.run([str(LOCALCLUSTER), "up"], capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise CommandError([str(LOCALCLUSTER), "up"], proc.returncode, proc.stdout, proc.stderr)
        cluster = Cluster.load()
    images = ROOT / "ci" / "images"
    proc = subprocess.run([str(images), "push"], capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise CommandError([str(images), "push"], proc.returncode, proc.stdout, proc.stderr)
    return cluster


def wait_for(predicate: Callable[[], T | None], timeout: float = 60, interval: float = 0.5,
             what: str = "condition") -> T:
    """Poll PREDICATE until it returns a truthy value (returned); raise TimeoutError after TIMEOUT s.

    Exceptions raised by the predicate count as "not yet"; the last one is chained to the timeout.
    """
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except Exception as e:  # noqa: BLE001 - reported on timeout
            last_exc = e
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}") from last_exc
        time.sleep(interval)


# The chart's releases and pods, shared by the e2e tests that install chart/ (and tests/support/cnf.py).

CRDS = ("artifacts.clusterregistry.io", "components.clusterregistry.io")


def adopt_crds(cluster: Cluster, release: str, namespace: str) -> None:
    """Let RELEASE take over the chart's CRDs (as Helm allows): they are cluster-wide, outlive releases
    (resource-policy keep), and other e2e tests `kubectl apply` them."""
    for crd in CRDS:
        if cluster.kubectl("get", "crd", crd, "--ignore-not-found", "-o", "name").strip():
            cluster.kubectl("label", "crd", crd, "--overwrite", "app.kubernetes.io/managed-by=Helm")
            cluster.kubectl("annotate", "crd", crd, "--overwrite",
                            f"meta.helm.sh/release-name={release}", f"meta.helm.sh/release-namespace={namespace}")


def component_pods(cluster: Cluster, namespace: str, component: str) -> list[dict[str, Any]]:
    """The pods of one chart component (`app.kubernetes.io/component`), those being deleted left out."""
    items = cluster.kubectl_json("get", "pods", "-n", namespace, "-l", f"app.kubernetes.io/component={component}")["items"]
    return [p for p in items if not p["metadata"].get("deletionTimestamp")]


def pod_ready(pod: dict[str, Any]) -> bool:
    conditions = {c["type"]: c["status"] for c in pod["status"].get("conditions", [])}
    return pod["status"].get("phase") == "Running" and conditions.get("Ready") == "True"


def three_ready(cluster: Cluster, namespace: str, component: str, timeout: float = 240) -> list[dict[str, Any]]:
    """Wait for exactly 3 Ready pods of COMPONENT (the HPAs' minimum) and return them."""
    return wait_for(
        lambda: (lambda ps: ps if len(ps) == 3 and all(map(pod_ready, ps)) else None)(
            component_pods(cluster, namespace, component)),
        timeout=timeout, interval=2, what=f"3 Ready {component} pods")


# Module-level shortcuts against the running cluster (`ci/localcluster up` must have run).


def kubectl(*args: str, stdin: str | None = None) -> str:
    return Cluster.load().kubectl(*args, stdin=stdin)


def helm(*args: str) -> str:
    return Cluster.load().helm(*args)


def api_client() -> Any:
    return Cluster.load().api_client()


# The real nodes' containerd (ci/localnodes.py: one socket per node under /run/localcluster/<node>/).

NODE_SOCKETS = Path("/run/localcluster")


def _ctr(sock: Path, *args: str) -> str:
    return subprocess.run(["ctr", "-a", str(sock), "-n", "k8s.io", *args], capture_output=True, text=True,
                          check=True, timeout=120).stdout


def containerd_images() -> list[str]:
    """Every image name in every real node's containerd (what `crictl images` lists)."""
    return sorted(name for sock in NODE_SOCKETS.glob("*/containerd.sock")
                  for name in _ctr(sock, "images", "ls", "-q").split())


def remove_node_images(substring: str) -> list[str]:
    """`crictl rmi` on every real node for each image whose name contains SUBSTRING (content removed
    too); returns what was removed."""
    removed = []
    for sock in NODE_SOCKETS.glob("*/containerd.sock"):
        names = [n for n in _ctr(sock, "images", "ls", "-q").split() if substring in n]
        if names:
            _ctr(sock, "images", "rm", "--sync", *names)
            removed += names
    return removed
