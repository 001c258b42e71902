"""registryTLS (#15) on the local cluster, the chart installed with its defaults (TLS on; shared access,
so anonymous pulls exercise the path without pull Secrets): a real node's containerd pulls a rewritten
image through its node proxy (plain HTTP on 127.0.0.1:5050, TLS from the proxy to the Service); plain
HTTP to the registry pods' ports gets nothing (attack: a pod sniffing or speaking plain HTTP); a
renewal of the registry's certificate (the certs CronJob's code, with a renew-before longer than the
certificate's remaining life) rolls the registry pods while pulls through the node proxy go on, every
one of them served."""

from __future__ import annotations

import base64
import json
import os
import secrets
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from tests.support import cnf
from tests.support.cluster import Cluster, component_pods, exclusive_chart, pod_ready, wait_for
from tests.support.ociimages import Image, Pusher, push_runnable
from tests.support.podview import from_netns

pytestmark = pytest.mark.e2e
HTTPD = ["/bin/busybox", "httpd", "-f", "-p", "8080", "-h", "/www"]
PAGE = b"served through TLS\n"


@dataclass
class Env:
    release: str
    namespace: str
    full: str  # the chart's fullname
    ca_file: str
    image: Image
    repo: str


def _secret(cluster: Cluster, namespace: str, name: str) -> dict[str, bytes]:
    got = cluster.kubectl_json("get", "secret", name, "-n", namespace)
    return {k: base64.b64decode(v) for k, v in got["data"].items()}


def pod_ips(cluster: Cluster, env: Env) -> list[str]:
    return [p["status"]["podIP"] for p in component_pods(cluster, env.namespace, "registry") if pod_ready(p)]


@pytest.fixture(scope="module")
def env(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    suffix = secrets.token_hex(3)
    release, namespace = f"tls{suffix[:4]}", f"crtls-{suffix}"
    full = cnf.fullname(release)
    cluster.kubectl("create", "namespace", namespace)
    values: dict[str, Any] = {"global": {"networkfunctionextension": {
        "webhook": {"pod": {"mutation": {"matchConditionExpression": "request.namespace == 'cluster-registry-no-such-ns'"}}},
        "systemPool": {"required": True},
        "registryAccess": {"mode": "shared"},
        "clusterRegistry": {"storageSize": "1Gi", "clusterRegistryGCCadence": ""},
    }}}  # fmt: skip
    with exclusive_chart():
        try:
            cnf.install_cluster_registry(cluster, release, namespace, values)
            ca = tmp_path_factory.mktemp("tls") / "ca.crt"
            ca.write_bytes(_secret(cluster, namespace, f"{full}-registry-tls")["ca.crt"])
            creds = yaml.safe_load(_secret(cluster, namespace, f"{full}-registry-push-artifact-reconciler")["credentials.yaml"])
            ip = [p["status"]["podIP"] for p in component_pods(cluster, namespace, "registry") if pod_ready(p)][0]
            pusher = Pusher(f"{ip}:5000", (creds["username"], creds["password"]), str(ca))
            assert pusher.scheme == "https"
            repo = f"tls-{suffix}/web"
            image = push_runnable(pusher, repo, "1", entrypoint=HTTPD, files={"/www/index.html": PAGE})
            yield Env(release, namespace, full, str(ca), image, repo)
        finally:
            cluster.helm("uninstall", release, "-n", namespace, "--wait", "--timeout", "120s", check=False)
            cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def test_plain_http_to_the_registry_pods_gets_nothing(cluster: Cluster, env: Env) -> None:
    ips = pod_ips(cluster, env)
    assert ips
    for ip in ips:
        plain = from_netns(cnf.NODE_NETNS, [  # "upgrade": False: what plain HTTP itself gets
            {"url": f"http://{ip}:5000/v2/_catalog", "upgrade": False},
            {"url": f"http://{ip}:5000/v2/{env.repo}/manifests/1", "upgrade": False},
            {"url": f"http://{ip}:5002/token?service=cluster-registry&scope=repository:{env.repo}:pull", "upgrade": False},
        ])  # fmt: skip
        for answer in plain[:2]:  # Go's TLS server answers a plain request with a fixed 400, nothing else
            assert answer["status"] == 400 and "HTTPS server" in answer["body"], answer
            assert env.repo not in answer["body"]
        assert plain[2]["status"] == 0 and "token" not in plain[2].get("body", ""), plain[2]
        tls = from_netns(cnf.NODE_NETNS, [{"url": f"https://{ip}:5000/v2/"}], ca_file=env.ca_file)
        assert tls[0]["status"] == 401 and "realm=" in tls[0]["www_authenticate"], "over TLS with the chart's CA it answers"


def served_certificates(cluster: Cluster, env: Env) -> set[bytes]:
    """The certificate each Ready registry pod serves on 5000 and 5002 (DER)."""
    ctx = ssl.create_default_context(cafile=env.ca_file)
    ctx.check_hostname = False
    out = set()
    for ip in pod_ips(cluster, env):
        for port in (5000, 5002):
            with socket.create_connection((ip, port), timeout=10) as raw, ctx.wrap_socket(raw) as s:
                der = s.getpeercert(binary_form=True)
                assert der is not None
                out.add(der)
    return out


def node_pull(env: Env) -> list[dict[str, Any]]:
    """An anonymous pull of the image's manifest and page layer through the node proxy, from a real
    node's network namespace (containerd's view): token at 127.0.0.1:5051, registry at 127.0.0.1:5050."""
    token = from_netns(cnf.NODE_NETNS, [{"url": f"http://127.0.0.1:5051/token?service=cluster-registry&scope=repository:{env.repo}:pull"}])[0]
    if token["status"] != 200:
        return [token]
    bearer = {"Authorization": "Bearer " + json.loads(token["body"])["token"]}
    accept = {"Accept": env.image.media_type}
    return from_netns(cnf.NODE_NETNS, [
        {"url": f"http://127.0.0.1:5050/v2/{env.repo}/manifests/{env.image.digest}", "headers": {**bearer, **accept}},
        {"url": f"http://127.0.0.1:5050/v2/{env.repo}/blobs/{env.image.blobs[0][0]}", "method": "HEAD", "headers": bearer},
    ])  # fmt: skip


def test_a_real_node_pulls_through_its_node_proxy_over_tls(cluster: Cluster, env: Env, namespace: str) -> None:
    nodes = sorted(n["metadata"]["name"] for n in
                   cluster.kubectl_json("get", "nodes", "-l", "localcluster.clusterregistry.io/real=true")["items"])
    image = f"127.0.0.1:5050/{env.repo}@{env.image.digest}"
    name = "tls-web"
    cluster.apply({"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": name, "labels": {"clusterregistry.io/skip": "true"}},
                   "spec": {"nodeName": nodes[0], "terminationGracePeriodSeconds": 1, "tolerations": [{"operator": "Exists"}],
                            "containers": [{"name": "web", "image": image, "ports": [{"containerPort": 8080}],
                                            "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1}}]}},
                  namespace)  # fmt: skip
    pod = wait_for(lambda: (lambda p: p if pod_ready(p) else None)(cluster.kubectl_json("get", "pod", "-n", namespace, name)),
                   timeout=180, interval=1, what=f"{name} Ready (its image pulled through 127.0.0.1:5050)")
    page = from_netns(cnf.NODE_NETNS, [{"url": f"http://{pod['status']['podIP']}:8080/"}])[0]
    assert page["status"] == 200 and page["body"].encode() == PAGE, "the image's bytes, as pushed"


def test_a_certificate_renewal_rolls_the_registry_while_pulls_go_on(cluster: Cluster, env: Env) -> None:
    first = node_pull(env)
    assert [r["status"] for r in first] == [200, 200] and first[0]["digest"] == env.image.digest, first
    before = served_certificates(cluster, env)
    results: list[list[int]] = []
    stop = threading.Event()

    def pull_loop() -> None:
        while not stop.is_set():
            got = node_pull(env)
            results.append([r["status"] for r in got])

    puller = threading.Thread(target=pull_loop, daemon=True)
    puller.start()
    try:
        time.sleep(2)
        argv = [sys.executable, "-m", "cluster_registry", "certs", "--secret", f"{env.full}-webhook-tls",
                "--service", f"{env.full}-webhook", "--webhook-configuration", f"{env.full}-webhook",
                "--registry-secret", f"{env.full}-registry-tls", "--registry-service", f"{env.full}-registry",
                "--registry-deployment", f"{env.full}-registry", "--renew-before", "8800h", "--validity", "9000h",
                "--namespace", env.namespace, "--kubeconfig", str(cluster.kubeconfig)]  # fmt: skip
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=120,
                              env={**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}, cwd=Path(__file__).parents[2])
        assert proc.returncode == 0, proc.stderr
        report = yaml.safe_load(proc.stdout.strip().splitlines()[-1])["registry"]
        assert report["action"] == "renewed" and report["restarted"] is True, report
        cluster.kubectl("rollout", "status", f"deployment/{env.full}-registry", "-n", env.namespace, "--timeout=300s",
                        timeout=330)
        cnf.wait_replicas(cluster, env.namespace)
    finally:
        stop.set()
        puller.join(60)
    after = served_certificates(cluster, env)
    new = x509.load_pem_x509_certificate(_secret(cluster, env.namespace, f"{env.full}-registry-tls")["tls.crt"])
    assert after == {new.public_bytes(Encoding.DER)} and not (after & before), "every pod serves the renewed certificate"
    assert len(results) >= 5, f"pulls ran through the roll: {len(results)}"
    assert all(r == [200, 200] for r in results), f"every pull during the renewal was served: {results}"
