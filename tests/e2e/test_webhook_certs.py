"""`cluster-registry certs` against the real API server: Secret creation, idempotence, parallel runs,
renewal with the same CA, caBundle patching (service-mode webhooks only), dry-run."""

from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from tests.support.cluster import Cluster

NEVER = "request.namespace == 'cluster-registry-e2e-no-such-namespace'"


def run_certs(cluster: Cluster, namespace: str, mwc: str, *extra: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "cluster_registry", "certs", "--secret", "wh-tls", "--service", "wh",
            "--webhook-configuration", mwc, "--namespace", namespace, "--kubeconfig", str(cluster.kubeconfig), *extra]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, env={**os.environ, "KUBECONFIG": str(cluster.kubeconfig)})


def report(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert proc.returncode == 0, proc.stderr
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def secret_data(cluster: Cluster, namespace: str) -> dict[str, bytes]:
    got = cluster.kubectl_json("get", "secret", "wh-tls", "-n", namespace)
    assert got["type"] == "kubernetes.io/tls"
    return {k: base64.b64decode(v) for k, v in got["data"].items()}


@pytest.fixture
def mwc(cluster: Cluster, namespace: str) -> Iterator[str]:
    name = f"certs-e2e-{secrets.token_hex(3)}"
    hook: dict[str, Any] = {
        "admissionReviewVersions": ["v1"], "sideEffects": "None", "failurePolicy": "Ignore",
        "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]}],
        "matchConditions": [{"name": "never", "expression": NEVER}],
    }  # fmt: skip
    cluster.apply({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": name},
        "webhooks": [
            {**hook, "name": "url.clusterregistry.io", "clientConfig": {"url": "https://127.0.0.1:1/mutate"}},
            {**hook, "name": "pods.clusterregistry.io",
             "clientConfig": {"service": {"name": "wh", "namespace": namespace, "path": "/mutate", "port": 443}}},
        ],
    })  # fmt: skip
    yield name
    cluster.kubectl("delete", "mutatingwebhookconfiguration", name, "--ignore-not-found")


def bundles(cluster: Cluster, name: str) -> list[str | None]:
    got = cluster.kubectl_json("get", "mutatingwebhookconfiguration", name)
    return [w["clientConfig"].get("caBundle") for w in got["webhooks"]]


def test_certs_create_keep_renew_and_patch_ca_bundle(cluster: Cluster, namespace: str, mwc: str) -> None:
    dry = run_certs(cluster, namespace, mwc, "--dry-run")
    assert report(dry)["action"] == "created" and "would make" in dry.stdout
    assert cluster.kubectl("get", "secret", "wh-tls", "-n", namespace, "--ignore-not-found").strip() == ""
    assert bundles(cluster, mwc) == [None, None]

    first = report(run_certs(cluster, namespace, mwc))
    assert first["action"] == "created" and first["caBundlePatched"] == 1
    data = secret_data(cluster, namespace)
    assert set(data) == {"ca.crt", "ca.key", "tls.crt", "tls.key"}
    serving = x509.load_pem_x509_certificate(data["tls.crt"])
    serving.verify_directly_issued_by(x509.load_pem_x509_certificate(data["ca.crt"]))
    sans = serving.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert sans == [f"wh.{namespace}.svc", f"wh.{namespace}.svc.cluster.local"]
    url_bundle, svc_bundle = bundles(cluster, mwc)
    assert url_bundle is None  # URL mode is left alone
    assert svc_bundle is not None and base64.b64decode(svc_bundle) == data["ca.crt"]

    again = report(run_certs(cluster, namespace, mwc))
    assert again["action"] == "unchanged" and again["caBundlePatched"] == 0
    assert secret_data(cluster, namespace) == data

    renewed = report(run_certs(cluster, namespace, mwc, "--renew-before", "8800h", "--validity", "9000h"))
    assert renewed["action"] == "renewed" and renewed["caBundlePatched"] == 0
    new = secret_data(cluster, namespace)
    assert new["ca.crt"] == data["ca.crt"] and new["tls.crt"] != data["tls.crt"]
    x509.load_pem_x509_certificate(new["tls.crt"]).verify_directly_issued_by(x509.load_pem_x509_certificate(data["ca.crt"]))
    assert bundles(cluster, mwc)[1] == svc_bundle
    assert report(run_certs(cluster, namespace, mwc))["action"] == "unchanged"


def test_certs_parallel_runs_agree(cluster: Cluster, namespace: str, mwc: str) -> None:
    argv = [sys.executable, "-m", "cluster_registry", "certs", "--secret", "wh-tls", "--service", "wh",
            "--webhook-configuration", mwc, "--namespace", namespace, "--kubeconfig", str(cluster.kubeconfig)]  # fmt: skip
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    actions = sorted(json.loads(o[0].strip().splitlines()[-1])["action"] for o in outs)
    assert actions.count("created") == 1 and actions.count("unchanged") == 3, actions
    data = secret_data(cluster, namespace)
    assert base64.b64decode(bundles(cluster, mwc)[1] or "") == data["ca.crt"]


def test_registry_certificate_from_the_same_ca_renewal_restarts_the_registry(cluster: Cluster, namespace: str, mwc: str) -> None:
    """registryTLS (#15): the same run issues the registry's serving certificate from the webhook's CA
    (its Secret holds the trust bundle, never the CA key); a renewal patches the registry Deployment's
    pod template once (distribution reads its certificate only at start), a re-run changes nothing."""
    cluster.apply({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "reg", "namespace": namespace},
                   "spec": {"replicas": 0, "selector": {"matchLabels": {"app": "reg"}},
                            "template": {"metadata": {"labels": {"app": "reg"}},
                                         "spec": {"containers": [{"name": "r", "image": "registry.invalid/none"}]}}}},
                  namespace)  # fmt: skip
    registry = ("--registry-secret", "reg-tls", "--registry-service", "reg", "--registry-deployment", "reg")

    def reg_data() -> dict[str, bytes]:
        got = cluster.kubectl_json("get", "secret", "reg-tls", "-n", namespace)
        return {k: base64.b64decode(v) for k, v in got["data"].items()}

    def restarted() -> str | None:
        template = cluster.kubectl_json("get", "deployment", "reg", "-n", namespace)["spec"]["template"]["metadata"]
        return (template.get("annotations") or {}).get("clusterregistry.io/serving-certificate")

    first = report(run_certs(cluster, namespace, mwc, *registry))["registry"]
    assert first["action"] == "created" and first["restarted"] is False
    data = reg_data()
    assert set(data) == {"ca.crt", "tls.crt", "tls.key"}, "the CA key stays in the webhook's Secret"
    assert data["ca.crt"] == secret_data(cluster, namespace)["ca.crt"]
    cert = x509.load_pem_x509_certificate(data["tls.crt"])
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(data["ca.crt"]))
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert sans == ["reg", f"reg.{namespace}", f"reg.{namespace}.svc", f"reg.{namespace}.svc.cluster.local"]
    assert restarted() is None, "nothing served the certificate before: no restart"

    renewed = report(run_certs(cluster, namespace, mwc, *registry, "--renew-before", "8800h", "--validity", "9000h"))["registry"]
    assert renewed["action"] == "renewed" and renewed["restarted"] is True
    new = reg_data()
    assert new["tls.crt"] != data["tls.crt"] and new["ca.crt"] == data["ca.crt"]
    fingerprint = x509.load_pem_x509_certificate(new["tls.crt"]).fingerprint(hashes.SHA256()).hex()
    assert restarted() == fingerprint, "the registry's pods roll to serve the new certificate"
    again = report(run_certs(cluster, namespace, mwc, *registry))["registry"]
    assert again["action"] == "unchanged" and again["restarted"] is False and reg_data() == new
