"""Flux's source-controller and kustomize-controller, built by ci/toolchain, run out of cluster.

Both run as processes on this machine against the local control plane (admin kubeconfig) and watch
only one namespace (RUNTIME_NAMESPACE), so parallel runs and other tests never meet. The CRDs come
from the controllers' own Go modules, at the versions ci/flux/*/go.mod pin.
"""

from __future__ import annotations

import gzip
import io
import base64
import json
import re
import socket
import subprocess
import tarfile
from pathlib import Path
from typing import Any

from tests.gitops.lib import BIN, ROOT, go_module
from tests.support.cluster import Cluster, wait_for
from tests.support.ociimages import Pusher, canonical, sha256

CONTROLLERS = ("source-controller", "kustomize-controller")
# What `flux push artifact` writes (fluxcd/pkg/oci): source-controller extracts the content layer.
CONFIG_TYPE = "application/vnd.cncf.flux.config.v1+json"
CONTENT_TYPE = "application/vnd.cncf.flux.content.v1.tar+gzip"


def pinned(controller: str) -> tuple[str, str]:
    """(module path, version) of CONTROLLER as its wrapper module requires it."""
    go_mod = (ROOT / "ci" / "flux" / controller / "go.mod").read_text()
    match = re.search(rf"^require (github\.com/fluxcd/{controller}) (v\S+)$", go_mod, re.M)
    assert match, f"ci/flux/{controller}/go.mod requires github.com/fluxcd/{controller}"
    return match.group(1), match.group(2)


def crd_files() -> list[Path]:
    return sorted(p for c in CONTROLLERS for p in (go_module(*pinned(c)) / "config" / "crd" / "bases").glob("*.yaml"))


def free_ports(n: int) -> list[int]:
    """N distinct free loopback ports (all held open while choosing, so none is handed out twice)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


class Flux:
    """The two controllers as child processes, watching NAMESPACE."""

    def __init__(self, cluster: Cluster, namespace: str, workdir: Path) -> None:
        self.cluster, self.namespace, self.workdir = cluster, namespace, workdir
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> Flux:
        self.cluster.kubectl("apply", "--server-side", "--force-conflicts", *[a for f in crd_files() for a in ("-f", str(f))])
        for crd in ("ocirepositories.source.toolkit.fluxcd.io", "kustomizations.kustomize.toolkit.fluxcd.io"):
            self.cluster.kubectl("wait", "--for=condition=Established", f"crd/{crd}", "--timeout=60s")
        storage = self.workdir / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        ports = iter(free_ports(5))
        storage_addr = f"127.0.0.1:{next(ports)}"
        args = {
            "source-controller": [f"--storage-path={storage}", f"--storage-addr={storage_addr}",
                                  f"--storage-adv-addr={storage_addr}"],
            "kustomize-controller": ["--no-remote-bases=true", "--requeue-dependency=5s"],
        }
        for name in CONTROLLERS:
            args[name] += ["--enable-leader-election=false", "--watch-all-namespaces=false", "--log-level=debug",
                           f"--metrics-addr=127.0.0.1:{next(ports)}", f"--health-addr=127.0.0.1:{next(ports)}"]
        env = dict(self.cluster.env(), RUNTIME_NAMESPACE=self.namespace, TMPDIR=str(self.workdir))
        for name in CONTROLLERS:
            log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
            self.procs.append(subprocess.Popen([str(BIN / name), *args[name]], env=env, stdout=log,
                                               stderr=subprocess.STDOUT, cwd=self.workdir))
        return self

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def logs(self) -> str:
        return "\n".join(f"--- {c}\n" + (self.workdir / f"{c}.log").read_text(errors="replace")[-4000:] for c in CONTROLLERS)

    def alive(self) -> None:
        for name, p in zip(CONTROLLERS, self.procs):
            assert p.poll() is None, f"{name} exited {p.returncode}:\n{self.logs()}"

    def ready(self, kind: str, name: str) -> dict[str, Any]:
        """The Ready condition of a Flux object ({} while it has none)."""
        obj = self.cluster.kubectl_json("get", kind, name, "-n", self.namespace)
        return next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == "Ready"), {})

    def wait_ready(self, kind: str, name: str, timeout: float = 180) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            self.alive()
            c = self.ready(kind, name)
            return c if c.get("status") == "True" else None
        try:
            return wait_for(check, timeout=timeout, interval=2, what=f"{kind}/{name} Ready")
        except TimeoutError as e:
            raise AssertionError(f"{kind}/{name}: {self.ready(kind, name)}\n{self.logs()}") from e


def tar_gz(folder: Path) -> bytes:
    """FOLDER's files as a reproducible tar.gz, paths relative to it (as `flux push artifact --path`)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            info = tarfile.TarInfo(str(path.relative_to(folder)))
            data = path.read_bytes()
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(raw.getvalue(), mtime=0)


def push_artifact(pusher: Pusher, repo: str, tag: str, folder: Path, source: str) -> str:
    """Publish FOLDER as a Flux OCI artifact (config + one content layer); returns the manifest digest."""
    layer = tar_gz(folder)
    config = b"{}"
    pusher.push_blob(repo, layer)
    pusher.push_blob(repo, config)
    manifest = canonical({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": CONFIG_TYPE, "size": len(config), "digest": sha256(config)},
        "layers": [{"mediaType": CONTENT_TYPE, "size": len(layer), "digest": sha256(layer)}],
        "annotations": {"org.opencontainers.image.source": source, "org.opencontainers.image.revision": tag,
                        "org.opencontainers.image.created": "2026-01-01T00:00:00Z"},
    })
    pusher.put_manifest(repo, tag, manifest, "application/vnd.oci.image.manifest.v1+json")
    return sha256(manifest)


def docker_config_secret(name: str, namespace: str, host: str, user: str, password: str) -> dict[str, Any]:
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    config = {"auths": {host: {"username": user, "password": password, "auth": auth}}}
    return {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/dockerconfigjson",
            "metadata": {"name": name, "namespace": namespace},
            "data": {".dockerconfigjson": base64.b64encode(json.dumps(config).encode()).decode()}}
