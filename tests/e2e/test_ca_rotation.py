"""#16 item 12 on the real API server: the chart installed, its webhook replicas running on the real
nodes, and a CA regeneration driven by the chart's own certs CronJob template (a Job made from it, run
in the cluster with the chart's ServiceAccount) while a client keeps creating pods (server-side dry
runs, which the API server sends through the webhook like any create).

failurePolicy is Ignore, so a failed webhook call would not fail the create: every admitted pod is
checked for the rewrite and the webhook's annotation instead. Throughout, the caBundle is sampled: it
must go old CA -> both CAs -> new CA, and every replica must serve a certificate of the new CA before
the old CA leaves the bundle (the overlap's end is reached by back-dating the recorded rotation time:
the CronJob's next run then trims, as it would an hour later)."""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from cluster_registry.certs import pki
from tests.e2e.test_chart_runs import CHART, VALUES, Release
from tests.support.cluster import Cluster, adopt_crds, component_pods, exclusive_chart, three_ready, wait_for

SOURCE = "myacr.azurecr.io/rotation/app"


@contextlib.contextmanager
def installed(cluster: Cluster, prefix: str, *sets: str) -> Iterator[Release]:
    """The chart installed (HA defaults, system pool required: the user nodes are kwok-simulated) under
    the chart lock with extra ``--set`` values; uninstalled afterwards."""
    rel = Release(f"{prefix}{secrets.token_hex(2)}", f"e2e-{prefix}-{secrets.token_hex(3)}")
    with exclusive_chart():
        cluster.kubectl("create", "namespace", rel.namespace)
        adopt_crds(cluster, rel.name, rel.namespace)
        try:
            args = [a for s in (f"{VALUES}.systemPool.required=true", *sets) for a in ("--set", s)]
            cluster.helm("install", rel.name, str(CHART), "-n", rel.namespace, "--wait", "--wait-for-jobs",
                         "--timeout", "480s", *args, timeout=540)  # fmt: skip
            yield rel
        finally:
            cluster.helm("uninstall", rel.name, "-n", rel.namespace, "--wait", "--timeout", "120s", check=False)
            cluster.kubectl("delete", "namespace", rel.namespace, "--wait=false", check=False)


@pytest.fixture(scope="module")
def release(cluster: Cluster) -> Iterator[Release]:
    # Always: every pod is rewritten at once, so an unrewritten one can only be a missed webhook call.
    with installed(cluster, "rot", f"{VALUES}.webhook.rewritePolicy=Always") as rel:
        yield rel


def fingerprints(pem: bytes) -> tuple[str, ...]:
    return tuple(c.fingerprint(hashes.SHA256()).hex()[:16] for c in x509.load_pem_x509_certificates(pem))


def issued_by(cert_pem: bytes, ca_pem: bytes) -> bool:
    try:
        x509.load_pem_x509_certificate(cert_pem).verify_directly_issued_by(x509.load_pem_x509_certificate(ca_pem))
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


@dataclass
class Load:
    """Pods created (dry run) one after another, each checked for the webhook's rewrite."""

    registry_host: str
    ok: int = 0
    failed: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self, cluster: Cluster, namespace: str) -> None:
        core = cluster.core()
        i = 0
        while not self.stop.is_set():
            i += 1
            body = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"p{i}"},
                    "spec": {"containers": [{"name": "app", "image": f"{SOURCE}:{i % 7}"}]}}  # fmt: skip
            try:
                pod = core.create_namespaced_pod(namespace, body, dry_run="All", _request_timeout=30)
            except ApiException as err:
                self.failed.append(f"p{i}: {err.status} {err.reason}")
                continue
            image = pod.spec.containers[0].image
            annotations = pod.metadata.annotations or {}
            if not image.startswith(f"{self.registry_host}/") or "clusterregistry.io/sources" not in annotations:
                self.failed.append(f"p{i}: admitted as {image} with annotations {sorted(annotations)}")
            else:
                self.ok += 1
            self.stop.wait(0.1)


@dataclass
class Bundles:
    """The caBundle's successive values (as CA fingerprints), sampled every 100 ms."""

    seen: list[tuple[str, ...]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self, cluster: Cluster, name: str) -> None:
        admission = client.AdmissionregistrationV1Api(cluster.api_client())
        while not self.stop.is_set():
            mwc = admission.read_mutating_webhook_configuration(name)
            now = fingerprints(base64.b64decode((mwc.webhooks or [])[0].client_config.ca_bundle or ""))
            if not self.seen or self.seen[-1] != now:
                self.seen.append(now)
            self.stop.wait(0.1)


def served(ip: str, port: int) -> bytes:
    """The serving certificate a webhook replica presents (unverified: the caller checks its issuer)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection((ip, port), timeout=10) as raw, ctx.wrap_socket(raw) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der
    return ssl.DER_cert_to_PEM_cert(der).encode()


def webhook_endpoints(cluster: Cluster, rel: Release) -> list[tuple[str, int]]:
    out = []
    for p in three_ready(cluster, rel.namespace, "webhook"):
        port = next(cp["containerPort"] for c in p["spec"]["containers"] for cp in c.get("ports", []) if cp.get("name") == "https")
        out.append((p["status"]["podIP"], port))
    return out


def restarts(cluster: Cluster, rel: Release) -> dict[str, int]:
    """The webhook pods and their restart counts."""
    return {p["metadata"]["name"]: p["status"]["containerStatuses"][0]["restartCount"]
            for p in component_pods(cluster, rel.namespace, "webhook")}  # fmt: skip


def tls_secret(cluster: Cluster, rel: Release) -> dict[str, bytes]:
    got = cluster.kubectl_json("get", "secret", "-n", rel.namespace, f"{rel.prefix}-webhook-tls")
    return {k: base64.b64decode(v) for k, v in got["data"].items()}


def run_job(cluster: Cluster, rel: Release, name: str, extra_args: list[str]) -> dict[str, Any]:
    """A Job made from the chart's certs CronJob (its image, ServiceAccount, args + EXTRA_ARGS); its report."""
    cronjob = cluster.kubectl_json("get", "cronjob", "-n", rel.namespace, f"{rel.prefix}-certs")
    spec = cronjob["spec"]["jobTemplate"]["spec"]
    spec["template"]["spec"]["containers"][0]["args"] += extra_args
    cluster.apply({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name, "namespace": rel.namespace},
                   "spec": spec})  # fmt: skip
    cluster.kubectl("wait", "-n", rel.namespace, "--for=condition=complete", f"job/{name}", "--timeout=180s", timeout=200)
    logs = "".join(text for pod, text in cluster.namespace_logs(rel.namespace).items() if pod.startswith(f"{name}-"))
    report: dict[str, Any] = json.loads([line for line in logs.splitlines() if line.startswith('{"') and '"action"' in line][-1])
    return report


def test_no_admission_call_fails_across_a_ca_rotation(cluster: Cluster, release: Release, namespace: str) -> None:
    mwc_name = f"{release.prefix}-webhook"
    deployment = cluster.kubectl_json("get", "deployment", "-n", release.namespace, f"{release.prefix}-webhook")
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    registry_host = args[args.index("--registry-host") + 1]
    old = tls_secret(cluster, release)
    endpoints = webhook_endpoints(cluster, release)
    replicas = restarts(cluster, release)
    assert all(issued_by(served(*ep), old[pki.CA_CERT]) for ep in endpoints)

    load, bundles = Load(registry_host), Bundles()
    threads = [threading.Thread(target=load.run, args=(cluster, namespace), daemon=True),
               threading.Thread(target=bundles.run, args=(cluster, mwc_name), daemon=True)]  # fmt: skip
    for t in threads:
        t.start()
    start = time.monotonic()
    try:
        wait_for(lambda: load.ok >= 10 or load.failed, timeout=60, what="the first admitted pods")
        assert not load.failed, load.failed[:5]

        # The CA is about to expire (as the CronJob would find it ten years on): a new CA.
        regen = run_job(cluster, release, f"{release.prefix}-rotate", ["--renew-before", "87600h", "--validity", "87700h"])
        assert regen["action"] == "regenerated", regen
        regenerated = time.monotonic()
        new = tls_secret(cluster, release)
        assert new[pki.CA_CERT] != old[pki.CA_CERT] and new[pki.CA_PREVIOUS] == old[pki.CA_CERT]

        # Every replica reloads the remounted files and serves a certificate of the new CA.
        wait_for(lambda: all(issued_by(served(*ep), new[pki.CA_CERT]) for ep in endpoints), timeout=120, interval=1,
                 what="every webhook replica serving the new CA's certificate")  # fmt: skip
        reloaded_in = time.monotonic() - regenerated

        # The overlap is over (back-dated instead of waited for): the CronJob's own Job trims the old CA.
        past = (dt.datetime.now(dt.timezone.utc) - pki.OVERLAP - dt.timedelta(minutes=5)).isoformat()
        cluster.kubectl("patch", "secret", "-n", release.namespace, f"{release.prefix}-webhook-tls", "--type=merge", "-p",
                        json.dumps({"data": {pki.ROTATED_AT: base64.b64encode(past.encode()).decode()}}))  # fmt: skip
        trim = run_job(cluster, release, f"{release.prefix}-trim", [])
        assert trim["action"] == "trimmed", trim
        assert pki.CA_PREVIOUS not in tls_secret(cluster, release)
        time.sleep(3)  # admissions after the trim, with the bundle holding the new CA alone
    finally:
        load.stop.set()
        bundles.stop.set()
        for t in threads:
            t.join(timeout=40)
    took = time.monotonic() - start

    old_ca, new_ca = fingerprints(old[pki.CA_CERT]), fingerprints(new[pki.CA_CERT])
    assert bundles.seen == [old_ca, new_ca + old_ca, new_ca], bundles.seen
    assert not load.failed, f"{len(load.failed)} of {len(load.failed) + load.ok} admissions missed: {load.failed[:5]}"
    assert load.ok >= took, f"only {load.ok} pods admitted in {took:.0f}s"
    print(f"\nCA rotation: {load.ok} pods admitted and rewritten in {took:.1f}s, none missed; "
          f"every replica served the new CA's certificate {reloaded_in:.1f}s after the Job changed the Secret")

    # At the end each replica serves a certificate of the new CA, trusted by the bundle for the Service's name.
    bundle = base64.b64decode(cluster.kubectl_json("get", "mutatingwebhookconfiguration", mwc_name)["webhooks"][0]
                              ["clientConfig"]["caBundle"])  # fmt: skip
    ctx = ssl.create_default_context(cadata=bundle.decode())
    for ip, port in endpoints:
        with socket.create_connection((ip, port), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname=f"{release.prefix}-webhook.{release.namespace}.svc") as tls:
                assert tls.version()
    assert restarts(cluster, release) == replicas, "the same replicas reloaded the certificate, none restarted"
