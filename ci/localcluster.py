"""The local Kubernetes control plane behind `ci/localcluster up|down|status|reset`.

A real control plane on 127.0.0.1, every process started here and recorded by PID:

* etcd, kube-apiserver (own CA and certificates, service-account signing key, admission webhooks,
  aggregator routing so webhooks and APIServices are reached at their endpoints' pod IPs),
  kube-controller-manager, kube-scheduler;
* kwok, simulating the user-pool nodes (annotated ``kwok.x-k8s.io/node=fake``) and their pods;
* three real system-pool nodes (ci/localnodes.py): per node a kubelet, Debian's containerd and runc
  and a kube-proxy in the node's own network namespace, and ci/nodenet.py, which gives the nodes the
  API server, cluster DNS and the harness's registries;
* a storage provisioner (``provisioner`` below) binding every PVC of the two StorageClasses to a
  directory under ``.cache/localcluster/volumes``;
* two distribution v3 registries: the cluster registry (no auth, delete enabled) and the artifact
  store (htpasswd auth), standing in for ACR.

``up`` is idempotent and serialised with ``flock``: when everything already runs it only rewrites
the env file. ``down`` stops exactly the PIDs recorded in ``pids/`` (after checking that each PID
still runs the binary it was started as). State (etcd data, registries' storage) survives ``down``
so the next ``up`` is warm; ``reset`` stops everything and deletes the state.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import secrets
import shutil
import signal
import ssl
import string
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "ci"))
import localnodes  # noqa: E402 (ci/ is not a package)
BIN = ROOT / ".cache" / "bin"
STATE = ROOT / ".cache" / "localcluster"
PKI = STATE / "pki"
PIDS = STATE / "pids"
LOGS = STATE / "logs"
VOLUMES = STATE / "volumes"
ENV_FILE = STATE / "env"
KUBECONFIG = STATE / "kubeconfig"

HOST = "127.0.0.1"
ETCD_PORT = 22379
ETCD_PEER_PORT = 22380
APISERVER_PORT = 26443
KCM_PORT = 26257
SCHEDULER_PORT = 26259
KWOK_PORT = 26247
CLUSTER_REGISTRY_PORT = 25000
ARTIFACT_STORE_PORT = 25001
ARTIFACT_STORE_USER = "artifact-user"

# Addresses. Services get virtual IPs from SERVICE_CIDR; kwok gives its simulated pods IPs from
# KWOK_POD_CIDR. Both halves sit inside 198.18.0.0/15 (RFC 2544 benchmarking space, never routed on
# the internet), and `up` installs a blackhole route for the whole /15 so that no packet for a
# simulated pod or a ClusterIP can leave the machine (the apiserver dials webhook endpoints' pod IPs).
SAFETY_CIDR = "198.18.0.0/15"
SERVICE_CIDR = "198.19.0.0/16"
KWOK_POD_CIDR = "198.18.128.0/17"
KUBERNETES_SERVICE_IP = "198.19.0.1"

SYSTEM_NODES = 3
USER_NODES = 2
STORAGE_CLASSES = ("standard", "nexus-shared")  # the first is the cluster default
PROVISIONER_NAME = "localcluster.clusterregistry.io/hostpath"
# kwok manages the nodes annotated kwok.x-k8s.io/node=fake (the user pool); the system pool is real.
FORWARD_ANNOTATION = "localcluster.clusterregistry.io/forward-to"
HARNESS_NAMESPACE = "localcluster"
REAL_LABEL = "localcluster.clusterregistry.io/real"


def log(msg: str) -> None:
    print(f"[localcluster] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# PKI


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    tmp.chmod(mode)
    tmp.replace(path)


def ensure_pki() -> None:
    """CA, apiserver serving cert, admin client cert, service-account key pair (created once).

    The CA and the serving certificate are made as the webhook's are, by cluster_registry.certs.pki
    (installed in the .venv that ci/localcluster runs this with); pki makes no client certificates.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from cluster_registry.certs import pki

    if all((PKI / f).exists() for f in ("ca.crt", "apiserver.crt", "admin.crt", "sa.key", "sa.pub")):
        return
    log("generating certificates")
    now = dt.datetime.now(dt.timezone.utc)
    ten_years = dt.timedelta(days=3650)
    ca_crt, ca_key = pki.new_ca(now, "localcluster-ca", ten_years)
    api_names = ["localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
                 "kubernetes.default.svc.cluster.local"]
    api_crt, api_key = pki.new_serving(ca_crt, ca_key, api_names, now, ten_years, [HOST, KUBERNETES_SERVICE_IP])
    admin_crt, admin_key = _client_cert(ca_crt, ca_key, "localcluster-admin", ["system:masters"], now, ten_years)
    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    _write(PKI / "ca.crt", ca_crt)
    _write(PKI / "ca.key", ca_key, 0o600)
    _write(PKI / "apiserver.crt", api_crt)
    _write(PKI / "apiserver.key", api_key, 0o600)
    _write(
        PKI / "sa.key",
        sa_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        0o600,
    )
    _write(
        PKI / "sa.pub",
        sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    )
    _write(PKI / "admin.key", admin_key, 0o600)
    _write(PKI / "admin.crt", admin_crt)  # written last: its presence marks a complete PKI


def _client_cert(
    ca_crt: bytes, ca_key_pem: bytes, cn: str, orgs: Sequence[str], now: dt.datetime, validity: dt.timedelta
) -> tuple[bytes, bytes]:
    """A client certificate (CN: user, O: groups) signed by the CA: (certificate PEM, key PEM)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in orgs]
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attrs))
        .issuer_name(x509.load_pem_x509_certificate(ca_crt).subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def ensure_node_pki(nodes: list[localnodes.Node]) -> None:
    """Client certificates and kubeconfigs of each real node's kubelet and kube-proxy."""
    now = dt.datetime.now(dt.timezone.utc)
    for node in nodes:
        d = STATE / "nodes" / node.name
        for who, cn, orgs in (("kubelet", f"system:node:{node.name}", ["system:nodes"]),
                              ("kube-proxy", "system:kube-proxy", [])):
            if not (d / f"{who}.kubeconfig").exists():
                crt, key = _client_cert((PKI / "ca.crt").read_bytes(), (PKI / "ca.key").read_bytes(), cn, orgs, now,
                                        dt.timedelta(days=3650))
                _write(d / f"{who}.crt", crt)
                _write(d / f"{who}.key", key, 0o600)
                write_kubeconfig(d / f"{who}.kubeconfig", d / f"{who}.crt", d / f"{who}.key", cn)


def ensure_kubeconfig() -> None:
    write_kubeconfig(KUBECONFIG, PKI / "admin.crt", PKI / "admin.key", "localcluster-admin")


def write_kubeconfig(path: Path, crt: Path, key: Path, user: str) -> None:
    """A kubeconfig for USER's certificate; the address is 127.0.0.1 on the host and on every real
    node (ci/nodenet.py forwards the node's own 127.0.0.1:APISERVER_PORT to the host's)."""
    import base64

    def b64(p: Path) -> str:
        return base64.b64encode(p.read_bytes()).decode()

    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "localcluster",
                "cluster": {
                    "server": f"https://{HOST}:{APISERVER_PORT}",
                    "certificate-authority-data": b64(PKI / "ca.crt"),
                },
            }
        ],
        "users": [
            {
                "name": user,
                "user": {"client-certificate-data": b64(crt), "client-key-data": b64(key)},
            }
        ],
        "contexts": [
            {"name": "localcluster", "context": {"cluster": "localcluster", "user": user}}
        ],
        "current-context": "localcluster",
    }
    data = json.dumps(cfg, indent=1).encode()
    if not path.exists() or path.read_bytes() != data:
        _write(path, data, 0o600)


# --------------------------------------------------------------------------------------------------
# Registries


def artifact_store_password() -> str:
    path = STATE / "artifact-store.password"
    if not path.exists():
        alphabet = string.ascii_letters + string.digits
        _write(path, "".join(secrets.choice(alphabet) for _ in range(24)).encode(), 0o600)
    return path.read_text().strip()


def ensure_htpasswd(password: str) -> Path:
    path = STATE / "artifact-store.htpasswd"
    stamp = STATE / "artifact-store.htpasswd.for"
    if path.exists() and stamp.exists() and stamp.read_text() == ARTIFACT_STORE_USER + ":" + password:
        return path
    htpasswd = shutil.which("htpasswd")
    if htpasswd:
        out = subprocess.run(
            [htpasswd, "-nbB", "-C", "10", ARTIFACT_STORE_USER, password],
            check=True, capture_output=True, text=True,
        ).stdout.strip()
    else:  # libxcrypt's bcrypt through the stdlib (Python <= 3.12)
        import crypt  # type: ignore[import-not-found,unused-ignore]

        out = f"{ARTIFACT_STORE_USER}:" + crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH))
    _write(path, (out + "\n").encode(), 0o600)
    _write(stamp, (ARTIFACT_STORE_USER + ":" + password).encode(), 0o600)
    return path


def registry_config(name: str, port: int, htpasswd: Path | None) -> Path:
    root = STATE / f"registry-{name}"
    root.mkdir(parents=True, exist_ok=True)
    lines = [
        "version: 0.1",
        "log:",
        "  level: info",
        "  accesslog:",
        "    disabled: true",
        "storage:",
        "  filesystem:",
        f"    rootdirectory: {root}",
        "  delete:",
        "    enabled: true",
        "  maintenance:",
        "    uploadpurging:",
        "      enabled: false",
        "http:",
        f"  addr: {HOST}:{port}",
        f"  secret: localcluster-{name}",
        "  debug:",
        "    addr: ''",
        "health:",
        "  storagedriver:",
        "    enabled: false",
    ]
    if htpasswd is not None:
        lines += ["auth:", "  htpasswd:", "    realm: artifact-store", f"    path: {htpasswd}"]
    path = STATE / f"registry-{name}.yml"
    text = "\n".join(lines) + "\n"
    if not path.exists() or path.read_text() != text:
        _write(path, text.encode())
    return path


# --------------------------------------------------------------------------------------------------
# Processes


@dataclass
class Component:
    name: str
    argv: list[str]
    healthy: Callable[[], bool]
    env: dict[str, str] = field(default_factory=dict)
    marker: str = ""  # a command-line word identifying the process (default: argv[0])

    @property
    def pidfile(self) -> Path:
        return PIDS / f"{self.name}.pid"


def _proc_ok(pid: int, marker: str) -> bool:
    """True when PID runs (not a zombie) and its command line still contains MARKER."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    return state not in ("Z", "X") and any(marker.encode() in part for part in cmdline)


def recorded(name: str) -> tuple[int, str] | None:
    """(pid, marker) of a component started by us and still running, else None."""
    path = PIDS / f"{name}.pid"
    try:
        pid_s, marker = path.read_text().split("\n", 2)[:2]
        pid = int(pid_s)
    except (OSError, ValueError):
        return None
    return (pid, marker) if _proc_ok(pid, marker) else None


def start(c: Component) -> None:
    if recorded(c.name):
        return
    PIDS.mkdir(parents=True, exist_ok=True)
    LOGS.mkdir(parents=True, exist_ok=True)
    logf = open(LOGS / f"{c.name}.log", "ab")
    logf.write(f"\n==== {dt.datetime.now().isoformat()} start {' '.join(c.argv)}\n".encode())
    logf.flush()
    env = {**os.environ, **c.env}
    proc = subprocess.Popen(
        c.argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
        start_new_session=True, cwd=STATE, env=env,
    )
    logf.close()
    marker = c.marker or c.argv[0]
    _write(c.pidfile, f"{proc.pid}\n{marker}\n".encode())
    # Until the child has exec'd, /proc shows our own command line: wait for the exec.
    deadline = time.monotonic() + 10
    while not _proc_ok(proc.pid, marker) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    log(f"started {c.name} (pid {proc.pid})")


def stop(name: str, grace: float = 10.0) -> None:
    rec = recorded(name)
    pidfile = PIDS / f"{name}.pid"
    if rec is None:
        pidfile.unlink(missing_ok=True)
        return
    pid, marker = rec
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _proc_ok(pid, marker):
        _reap(pid)
        time.sleep(0.1)
    if _proc_ok(pid, marker):
        log(f"{name} (pid {pid}) ignored SIGTERM for {grace:.0f}s: SIGKILL")
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _reap(pid)
    pidfile.unlink(missing_ok=True)
    log(f"stopped {name} (pid {pid})")


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


# --------------------------------------------------------------------------------------------------
# Health checks


def _ssl_admin() -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(PKI / "ca.crt"))
    ctx.load_cert_chain(str(PKI / "admin.crt"), str(PKI / "admin.key"))
    return ctx


def _get(url: str, ctx: ssl.SSLContext | None = None, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=ctx) as r:  # noqa: S310 (loopback)
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (OSError, ssl.SSLError):
        return 0, b""


def _insecure() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def etcd_healthy() -> bool:
    code, body = _get(f"http://{HOST}:{ETCD_PORT}/health")
    return code == 200 and b'"true"' in body


def apiserver_healthy() -> bool:
    if not (PKI / "admin.crt").exists():
        return False
    return _get(f"https://{HOST}:{APISERVER_PORT}/readyz", _ssl_admin())[0] == 200


def secure_healthz(port: int) -> Callable[[], bool]:
    return lambda: _get(f"https://{HOST}:{port}/healthz", _insecure())[0] == 200


def registry_healthy(port: int, want: int) -> Callable[[], bool]:
    return lambda: _get(f"http://{HOST}:{port}/v2/")[0] == want


# --------------------------------------------------------------------------------------------------
# Cluster objects


def kubectl(*args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "kubectl"), f"--kubeconfig={KUBECONFIG}", *args],
        input=stdin, text=True, capture_output=True, check=check,
    )


def node_manifest(name: str, pool: str, zone: str) -> dict[str, Any]:
    """A Node for kwok to simulate."""
    annotations = {"node.alpha.kubernetes.io/ttl": "0", "kwok.x-k8s.io/node": "fake"}
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": annotations,
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "kubernetes.azure.com/mode": pool,
                "kubernetes.azure.com/agentpool": f"{pool}pool",
                "topology.kubernetes.io/zone": zone,
                "topology.kubernetes.io/region": "local",
                "type": "kwok",
            },
        },
        "status": {
            "allocatable": {"cpu": "16", "memory": "64Gi", "pods": "110", "ephemeral-storage": "200Gi"},
            "capacity": {"cpu": "16", "memory": "64Gi", "pods": "110", "ephemeral-storage": "200Gi"},
            "nodeInfo": {
                "architecture": "amd64",
                "operatingSystem": "linux",
                "kubeletVersion": "fake",
                "kubeProxyVersion": "fake",
                "osImage": "localcluster",
                "kernelVersion": "",
                "containerRuntimeVersion": "",
                "bootID": "",
                "machineID": "",
                "systemUUID": "",
            },
        },
    }


def bootstrap_objects() -> None:
    items: list[dict[str, Any]] = []
    # Kubelets authenticate as system:node:<name> in group system:nodes (no Node authorizer here).
    items.append({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": "localcluster:nodes"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:node"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "system:nodes"}],
    })
    for i in range(USER_NODES):
        items.append(node_manifest(f"user-{i}", "user", f"local-{i % 3 + 1}"))
    for i, sc in enumerate(STORAGE_CLASSES):
        items.append(
            {
                "apiVersion": "storage.k8s.io/v1",
                "kind": "StorageClass",
                "metadata": {
                    "name": sc,
                    "annotations": {
                        "storageclass.kubernetes.io/is-default-class": "true" if i == 0 else "false",
                        "localcluster.clusterregistry.io/access-modes": (
                            "ReadWriteOnce,ReadOnlyMany,ReadWriteOncePod,ReadWriteMany"
                        ),
                    },
                },
                "provisioner": PROVISIONER_NAME,
                "reclaimPolicy": "Delete",
                "volumeBindingMode": "Immediate",
                "allowVolumeExpansion": False,
            }
        )
    # The harness's registries as pods see them (ci/nodenet.py leads these Services to the host's
    # loopback): the artifact store stands in for a remote registry such as ACR.
    items.append({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": HARNESS_NAMESPACE}})
    for name, port in (("artifact-store", ARTIFACT_STORE_PORT), ("cluster-registry", CLUSTER_REGISTRY_PORT)):
        items.append({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": HARNESS_NAMESPACE,
                         "annotations": {FORWARD_ANNOTATION: f"{HOST}:{port}"}},
            "spec": {"type": "ClusterIP", "ports": [{"name": "http", "port": 5000, "protocol": "TCP"}]},
        })
    doc = json.dumps({"apiVersion": "v1", "kind": "List", "items": items})
    kubectl("apply", "--server-side", "--force-conflicts", "--field-manager=localcluster", "-f", "-", stdin=doc)


def nodes_ready() -> bool:
    r = kubectl("get", "nodes", "-o", "json", check=False)
    if r.returncode != 0:
        return False
    nodes = json.loads(r.stdout)["items"]
    if len(nodes) < SYSTEM_NODES + USER_NODES:
        return False
    for n in nodes:
        conds = {c["type"]: c["status"] for c in n.get("status", {}).get("conditions", [])}
        if conds.get("Ready") != "True":
            return False
    return True


# --------------------------------------------------------------------------------------------------
# Network safety net


def ensure_blackhole() -> None:
    """No packet for 198.18.0.0/15 (kwok pod IPs, ClusterIPs) may leave the machine."""
    out = subprocess.run(["ip", "-4", "route", "show", "type", "blackhole"], capture_output=True, text=True)
    if SAFETY_CIDR in out.stdout:
        return
    subprocess.run(["ip", "route", "add", "blackhole", SAFETY_CIDR], check=True)
    (STATE / "blackhole-route").write_text(SAFETY_CIDR + "\n")
    log(f"installed blackhole route {SAFETY_CIDR}")


def remove_blackhole() -> None:
    marker = STATE / "blackhole-route"
    if marker.exists():
        subprocess.run(["ip", "route", "del", "blackhole", SAFETY_CIDR], capture_output=True)
        marker.unlink()


# --------------------------------------------------------------------------------------------------
# The components


def components() -> list[Component]:
    py = sys.executable
    kc = str(KUBECONFIG)
    admin = {"KUBECONFIG": kc}
    password = artifact_store_password()
    htpasswd = ensure_htpasswd(password)
    comps = [
        Component(
            "etcd",
            [
                str(BIN / "etcd"), "--name=localcluster", f"--data-dir={STATE / 'etcd'}",
                f"--listen-client-urls=http://{HOST}:{ETCD_PORT}",
                f"--advertise-client-urls=http://{HOST}:{ETCD_PORT}",
                f"--listen-peer-urls=http://{HOST}:{ETCD_PEER_PORT}",
                f"--initial-advertise-peer-urls=http://{HOST}:{ETCD_PEER_PORT}",
                f"--initial-cluster=localcluster=http://{HOST}:{ETCD_PEER_PORT}",
                "--unsafe-no-fsync", "--quota-backend-bytes=4294967296", "--log-level=warn",
                "--snapshot-count=10000", "--auto-compaction-retention=1h",
            ],
            etcd_healthy,
        ),
        Component(
            "kube-apiserver",
            [
                str(BIN / "kube-apiserver"),
                f"--etcd-servers=http://{HOST}:{ETCD_PORT}",
                f"--bind-address={HOST}", f"--secure-port={APISERVER_PORT}", f"--advertise-address={HOST}",
                "--endpoint-reconciler-type=none",
                f"--tls-cert-file={PKI / 'apiserver.crt'}", f"--tls-private-key-file={PKI / 'apiserver.key'}",
                f"--client-ca-file={PKI / 'ca.crt'}",
                f"--service-account-key-file={PKI / 'sa.pub'}",
                f"--service-account-signing-key-file={PKI / 'sa.key'}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--authorization-mode=RBAC",
                "--allow-privileged=true",
                "--enable-aggregator-routing=true",
                "--kubelet-preferred-address-types=InternalIP",
                # logs, exec, port-forward: the real nodes' kubelets accept clients of the cluster CA
                f"--kubelet-client-certificate={PKI / 'admin.crt'}", f"--kubelet-client-key={PKI / 'admin.key'}",
                "--enable-admission-plugins=DefaultStorageClass,MutatingAdmissionWebhook,ValidatingAdmissionWebhook",
                "--enable-priority-and-fairness=false",
                "--profiling=false",
                "--event-ttl=30m",
                "--v=1",
            ],
            apiserver_healthy,
        ),
        Component(
            "kube-controller-manager",
            [
                str(BIN / "kube-controller-manager"),
                f"--kubeconfig={kc}", f"--authentication-kubeconfig={kc}", f"--authorization-kubeconfig={kc}",
                f"--bind-address={HOST}", f"--secure-port={KCM_PORT}",
                "--leader-elect=false", "--use-service-account-credentials=true",
                f"--service-account-private-key-file={PKI / 'sa.key'}", f"--root-ca-file={PKI / 'ca.crt'}",
                f"--cluster-signing-cert-file={PKI / 'ca.crt'}", f"--cluster-signing-key-file={PKI / 'ca.key'}",
                "--controllers=*,-nodeipam,-cloud-node-lifecycle,-service-lb-controller,-route",
                "--concurrent-gc-syncs=5", "--horizontal-pod-autoscaler-sync-period=15s",
                "--profiling=false", "--v=1",
            ],
            secure_healthz(KCM_PORT),
        ),
        Component(
            "kube-scheduler",
            [
                str(BIN / "kube-scheduler"),
                f"--kubeconfig={kc}", f"--authentication-kubeconfig={kc}", f"--authorization-kubeconfig={kc}",
                f"--bind-address={HOST}", f"--secure-port={SCHEDULER_PORT}",
                "--leader-elect=false", "--profiling=false", "--v=1",
            ],
            secure_healthz(SCHEDULER_PORT),
        ),
        Component(
            "kwok",
            [
                str(BIN / "kwok"), f"--kubeconfig={kc}",
                "--manage-all-nodes=false",
                "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
                f"--cidr={KWOK_POD_CIDR.replace('.0/17', '.1/17')}",
                "--node-ip=198.18.127.254",
                f"--server-address={HOST}:{KWOK_PORT}",
                "--node-lease-duration-seconds=40",
            ],
            lambda: True,
        ),
        Component(
            "provisioner",
            [py, str(ROOT / "ci" / "localcluster.py"), "provisioner"],
            lambda: True,
            env=admin,
            marker=str(ROOT / "ci" / "localcluster.py"),
        ),
        Component(
            "cluster-registry",
            [str(BIN / "registry"), "serve", str(registry_config("cluster", CLUSTER_REGISTRY_PORT, None))],
            registry_healthy(CLUSTER_REGISTRY_PORT, 200),
        ),
        Component(
            "artifact-store",
            [str(BIN / "registry"), "serve", str(registry_config("store", ARTIFACT_STORE_PORT, htpasswd))],
            registry_healthy(ARTIFACT_STORE_PORT, 401),
        ),
    ]
    return comps + node_components(real_nodes())


def system_labels(i: int) -> dict[str, str]:
    return {"kubernetes.azure.com/mode": "system", "kubernetes.azure.com/agentpool": "systempool",
            "topology.kubernetes.io/zone": f"local-{i % 3 + 1}", "topology.kubernetes.io/region": "local",
            "type": "real", REAL_LABEL: "true"}


def real_nodes() -> list[localnodes.Node]:
    return [localnodes.Node(f"system-{i}", i, system_labels(i)) for i in range(SYSTEM_NODES)]


def containerd_healthy(node: localnodes.Node) -> Callable[[], bool]:
    def check() -> bool:
        import socket

        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(str(node.sock))
                return True
            except OSError:
                return False

    return check


def node_components(nodes: list[localnodes.Node]) -> list[Component]:
    """nodenet, then per real node its containerd, kubelet and kube-proxy (in the node's namespace)."""
    if not nodes:
        return []
    nodenet = ROOT / "ci" / "nodenet.py"
    comps = [Component(
        "nodenet",
        [sys.executable, str(nodenet), *(f"--netns={n.netns}" for n in nodes), f"--kubeconfig={KUBECONFIG}",
         f"--apiserver={HOST}:{APISERVER_PORT}", *(f"--pod-logs={STATE / 'nodes' / n.name / 'pod-logs'}" for n in nodes),
         f"--kept-logs={STATE / 'pod-logs'}"],
        lambda: True, marker=str(nodenet),
    )]
    for n in nodes:
        d = STATE / "nodes" / n.name
        cfg = localnodes.containerd_config(n, STATE, mirror=f"{HOST}:{CLUSTER_REGISTRY_PORT}")
        comps.append(Component(f"containerd-{n.name}", localnodes.in_node(n, "containerd", f"--config={cfg}"),
                               containerd_healthy(n), marker=f"--config={cfg}"))
        kubelet_cfg = localnodes.kubelet_config(n, STATE, PKI / "ca.crt")
        comps.append(Component(
            f"kubelet-{n.name}",
            localnodes.in_node(n, str(BIN / "kubelet"), f"--config={kubelet_cfg}",
                               f"--kubeconfig={d / 'kubelet.kubeconfig'}", f"--hostname-override={n.name}",
                               f"--node-ip={n.addr}", f"--root-dir={d / 'kubelet'}", f"--cert-dir={d / 'kubelet-pki'}",
                               "--node-labels=" + ",".join(f"{k}={v}" for k, v in sorted(n.labels.items()))),
            lambda: True, marker=f"--hostname-override={n.name}",
        ))
        proxy_cfg = localnodes.kube_proxy_config(n, STATE, d / "kube-proxy.kubeconfig")
        comps.append(Component(f"kube-proxy-{n.name}", localnodes.in_node(n, str(BIN / "kube-proxy"), f"--config={proxy_cfg}"),
                               lambda: True, marker=f"--config={proxy_cfg}"))
    return comps


def start_real_nodes(comps: dict[str, Component]) -> None:
    """nodenet and the containerds first (the pause image pushed meanwhile), then kubelets and kube-proxies."""
    import images

    nodes = real_nodes()
    start(comps["nodenet"])
    for n in nodes:
        start(comps[f"containerd-{n.name}"])
    images.push_pause(f"{HOST}:{CLUSTER_REGISTRY_PORT}")
    for n in nodes:
        wait(f"containerd of {n.name}", comps[f"containerd-{n.name}"].healthy, 30, f"containerd-{n.name}")
        start(comps[f"kubelet-{n.name}"])
        start(comps[f"kube-proxy-{n.name}"])


def write_env() -> None:
    lines = {
        "KUBECONFIG": str(KUBECONFIG),
        "CLUSTER_REGISTRY": f"{HOST}:{CLUSTER_REGISTRY_PORT}",
        "ARTIFACT_STORE": f"{HOST}:{ARTIFACT_STORE_PORT}",
        "ARTIFACT_STORE_USER": ARTIFACT_STORE_USER,
        "ARTIFACT_STORE_PASSWORD": artifact_store_password(),
        "LOCALCLUSTER_APISERVER": f"https://{HOST}:{APISERVER_PORT}",
        "LOCALCLUSTER_CA": str(PKI / "ca.crt"),
        "LOCALCLUSTER_STORAGE_CLASSES": ",".join(STORAGE_CLASSES),
        "LOCALCLUSTER_VOLUMES": str(VOLUMES),
        # The same two registries as pods on the system nodes reach them (Service names).
        "LOCALCLUSTER_ARTIFACT_STORE_IN_CLUSTER": f"artifact-store.{HARNESS_NAMESPACE}.svc.cluster.local:5000",
        "LOCALCLUSTER_CLUSTER_REGISTRY_IN_CLUSTER": f"cluster-registry.{HARNESS_NAMESPACE}.svc.cluster.local:5000",
    }
    text = "".join(f"{k}={v}\n" for k, v in lines.items())
    if not ENV_FILE.exists() or ENV_FILE.read_text() != text:
        _write(ENV_FILE, text.encode())


def wait(what: str, pred: Callable[[], bool], timeout: float, comp: str | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        if comp is not None and recorded(comp) is None:
            raise SystemExit(f"localcluster: {comp} exited; see {LOGS / (comp + '.log')}")
        time.sleep(0.2)
    raise SystemExit(f"localcluster: timed out after {timeout:.0f}s waiting for {what}")


# --------------------------------------------------------------------------------------------------
# Commands


class Lock:
    def __enter__(self) -> Lock:
        STATE.mkdir(parents=True, exist_ok=True)
        self.f = open(STATE / "lock", "w")
        fcntl.flock(self.f, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.f, fcntl.LOCK_UN)
        self.f.close()


def missing_binaries() -> list[str]:
    need = ["etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl", "kwok", "registry"]
    return [b for b in need if not os.access(BIN / b, os.X_OK)]


def record_up_time(kind: str, seconds: float) -> None:
    """Print and append to logs/up.log how long `up` took (cold: no etcd data yet)."""
    line = f"{dt.datetime.now().isoformat(timespec='seconds')} {kind} {seconds:.1f}s"
    log(f"{kind} in {seconds:.1f}s")
    with open(LOGS / "up.log", "a") as f:
        f.write(line + "\n")


def cmd_up() -> int:
    t0 = time.monotonic()
    missing = missing_binaries()
    if missing:
        log(f"missing binaries in {BIN}: {', '.join(missing)} (run ci/toolchain)")
        return 2
    with Lock():
        for d in (PKI, PIDS, LOGS, VOLUMES):
            d.mkdir(parents=True, exist_ok=True)
        cold = not (STATE / "etcd").exists()
        ensure_pki()
        ensure_kubeconfig()
        ensure_blackhole()
        nodes = real_nodes()
        ensure_node_pki(nodes)
        for node in nodes:
            localnodes.ensure_node_net(node)
            localnodes.ensure_cgroups(node)
        comps = {c.name: c for c in components()}
        if all(recorded(n) for n in comps) and all(c.healthy() for c in comps.values()) and nodes_ready():
            write_env()
            record_up_time("already up", time.monotonic() - t0)
            return 0
        # Independent processes first; the apiserver retries etcd, the controllers retry the apiserver.
        for name in ("etcd", "cluster-registry", "artifact-store"):
            start(comps[name])
        wait("etcd", comps["etcd"].healthy, 60, "etcd")
        start(comps["kube-apiserver"])
        wait("kube-apiserver /readyz", comps["kube-apiserver"].healthy, 120, "kube-apiserver")
        bootstrap_objects()
        for name in ("kube-controller-manager", "kube-scheduler", "kwok", "provisioner"):
            start(comps[name])
        start_real_nodes(comps)
        for name, c in comps.items():
            wait(name, c.healthy, 60, name)
        wait("nodes Ready", nodes_ready, 60)
        wait("default service account", lambda: kubectl("get", "sa", "default", check=False).returncode == 0, 60)
        write_env()
        record_up_time("cold" if cold else "started", time.monotonic() - t0)
        log(f"env: {ENV_FILE}")
    return 0


ORDER_DOWN = [
    "provisioner", "kwok", "kube-scheduler", "kube-controller-manager",
    "kube-apiserver", "etcd", "cluster-registry", "artifact-store",
]


def cmd_down() -> int:
    with Lock():
        stop_real_nodes()
        names = ORDER_DOWN + sorted(p.stem for p in PIDS.glob("*.pid") if p.stem not in ORDER_DOWN)
        for name in names:
            stop(name)
        remove_blackhole()
        ENV_FILE.unlink(missing_ok=True)
    return 0


def stop_real_nodes() -> None:
    """Kubelets and kube-proxies, then every container (through each node's containerd), then the
    containerds and nodenet; then what they leave: mounts, cgroups, the nodes' namespaces."""
    names = localnodes.node_names(STATE)
    for n in names:
        stop(f"kubelet-{n}")
        stop(f"kube-proxy-{n}")
    for n in names:
        if recorded(f"containerd-{n}"):
            localnodes.stop_workloads(n, STATE)
        stop(f"containerd-{n}")
    stop("nodenet")
    localnodes.unmount_under(STATE / "nodes")
    localnodes.unmount_under(localnodes.RUN)
    for n in names:
        localnodes.remove_cgroups(n)
    localnodes.remove_net([localnodes.Node(n, 0, {}) for n in names])


def cmd_status() -> int:
    comps = components() if (PKI / "admin.crt").exists() else []
    rc = 0
    for c in comps:
        rec = recorded(c.name)
        ok = rec is not None and c.healthy()
        rc |= 0 if ok else 3
        print(f"{c.name:24s} {'running' if rec else 'stopped':8s} pid={rec[0] if rec else '-':<8} "
              f"{'healthy' if ok else 'unhealthy'}")
    if not comps:
        print("not initialised (run ci/localcluster up)")
        return 3
    if ENV_FILE.exists():
        print(f"env: {ENV_FILE}")
    return rc


def cmd_reset() -> int:
    cmd_down()
    with Lock():
        for p in STATE.iterdir():
            if p.name not in ("lock", "logs"):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    return 0


# --------------------------------------------------------------------------------------------------
# The storage provisioner (a long-running component started by `up`)


def provisioner() -> int:
    """Binds each unbound PVC of our StorageClasses to a new hostPath PV under VOLUMES.

    Polls once a second (a handful of objects: simpler and sturdier than watches). Released PVs
    with reclaim policy Delete are deleted together with their directory.
    """
    from kubernetes import client, config
    from kubernetes.client.rest import ApiException

    config.load_kube_config(str(KUBECONFIG))
    core = client.CoreV1Api()
    storage = client.StorageV1Api()
    running = True

    def on_term(*_: object) -> None:
        nonlocal running
        running = False

    signal.signal(signal.SIGTERM, on_term)
    while running:
        try:
            ours = {
                sc.metadata.name: sc
                for sc in storage.list_storage_class().items
                if sc.provisioner == PROVISIONER_NAME
            }
            pvs = {pv.metadata.name: pv for pv in core.list_persistent_volume().items}
            for pvc in core.list_persistent_volume_claim_for_all_namespaces().items:
                sc_name = pvc.spec.storage_class_name
                if sc_name not in ours or pvc.spec.volume_name or pvc.metadata.deletion_timestamp:
                    continue
                pv_name = f"pvc-{pvc.metadata.uid}"
                if pv_name in pvs:
                    continue
                directory = VOLUMES / f"{pvc.metadata.namespace}-{pvc.metadata.name}-{pvc.metadata.uid[:8]}"
                directory.mkdir(parents=True, exist_ok=True)
                directory.chmod(0o777)
                manifest = {
                    "apiVersion": "v1",
                    "kind": "PersistentVolume",
                    "metadata": {
                        "name": pv_name,
                        "annotations": {"pv.kubernetes.io/provisioned-by": PROVISIONER_NAME},
                        "labels": {"localcluster.clusterregistry.io/volume": "true"},
                    },
                    "spec": {
                        "capacity": {"storage": pvc.spec.resources.requests.get("storage", "1Gi")},
                        "accessModes": pvc.spec.access_modes or ["ReadWriteOnce"],
                        "persistentVolumeReclaimPolicy": ours[sc_name].reclaim_policy or "Delete",
                        "storageClassName": sc_name,
                        "volumeMode": pvc.spec.volume_mode or "Filesystem",
                        "hostPath": {"path": str(directory), "type": "Directory"},
                        "claimRef": {
                            "apiVersion": "v1", "kind": "PersistentVolumeClaim",
                            "namespace": pvc.metadata.namespace, "name": pvc.metadata.name,
                            "uid": pvc.metadata.uid,
                        },
                    },
                }
                try:
                    core.create_persistent_volume(manifest)
                    print(f"provisioned {pv_name} for {pvc.metadata.namespace}/{pvc.metadata.name} at {directory}",
                          flush=True)
                except ApiException as e:
                    if e.status != 409:
                        raise
            for pv in pvs.values():
                ann = pv.metadata.annotations or {}
                if ann.get("pv.kubernetes.io/provisioned-by") != PROVISIONER_NAME:
                    continue
                if pv.status.phase == "Released" and pv.spec.persistent_volume_reclaim_policy == "Delete":
                    path = Path(pv.spec.host_path.path)
                    if VOLUMES in path.parents:
                        shutil.rmtree(path, ignore_errors=True)
                    try:
                        core.delete_persistent_volume(pv.metadata.name)
                        print(f"deleted released {pv.metadata.name}", flush=True)
                    except ApiException as e:
                        if e.status != 404:
                            raise
        except Exception as e:  # keep serving: the apiserver may restart under us
            print(f"provisioner: {type(e).__name__}: {e}", flush=True)
            time.sleep(2)
        time.sleep(1)
    return 0


def main(argv: list[str]) -> int:
    cmds: dict[str, Callable[[], int]] = {
        "up": cmd_up, "down": cmd_down, "status": cmd_status, "reset": cmd_reset, "provisioner": provisioner,
    }
    if len(argv) != 1 or argv[0] not in cmds:
        print("usage: ci/localcluster up|down|status|reset", file=sys.stderr)
        return 2
    return cmds[argv[0]]()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
