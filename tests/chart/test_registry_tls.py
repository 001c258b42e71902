"""registryTLS (#15): the registry Service serves TLS with a certificate from the chart's CA, every
client trusts that CA (and only the CA bundle is mounted, never a key), the node proxy originates TLS;
off renders the plain-HTTP chart; bad combinations are refused."""

from __future__ import annotations

import pytest
import yaml

from tests.chart.chartlib import NAMESPACE, RELEASE, Doc, find, pod_spec, render, render_error, workloads
from tests.chart.test_rbac import EVERYTHING

pytestmark = pytest.mark.chart

SVC = f"{RELEASE}-cluster-registry-registry"
TLS_SECRET = f"{SVC}-tls"
CA = "/etc/cluster-registry/registry-ca/ca.crt"


def _containers(doc: Doc) -> list[Doc]:
    return list(pod_spec(doc)["containers"])


def _ca_volumes(doc: Doc) -> list[Doc]:
    return [v for v in pod_spec(doc).get("volumes") or [] if v.get("secret", {}).get("secretName") == TLS_SECRET]


def test_distribution_and_the_token_service_serve_tls_from_the_registry_secret() -> None:
    docs = render()
    config = yaml.safe_load(find(docs, "ConfigMap", "-registry")["data"]["config.yml"])
    assert config["http"]["tls"] == {"certificate": "/etc/distribution/tls/tls.crt", "key": "/etc/distribution/tls/tls.key",
                                     "minimumtls": "tls1.2"}
    dep = find(docs, "Deployment", "-registry")
    registry, token = _containers(dep)
    assert {"name": "tls", "mountPath": "/etc/distribution/tls", "readOnly": True} in registry["volumeMounts"]
    args = token["args"]
    assert args[args.index("--tls-cert") + 1] == "/etc/cluster-registry/tls/tls.crt"
    assert registry["readinessProbe"]["httpGet"]["scheme"] == "HTTPS" == token["livenessProbe"]["httpGet"]["scheme"]
    (tls,) = [v for v in pod_spec(dep)["volumes"] if v["name"] == "tls"]
    assert tls["secret"] == {"secretName": TLS_SECRET, "items": [{"key": "tls.crt", "path": "tls.crt"},
                                                                 {"key": "tls.key", "path": "tls.key"}]}


def test_the_certs_jobs_issue_the_registry_certificate_and_may_restart_only_the_registry() -> None:
    docs = render()
    for doc in (find(docs, "Job", "-certs-issue"), find(docs, "CronJob", "-certs")):
        args = _containers(doc)[0]["args"]
        assert args[args.index("--registry-secret") + 1] == TLS_SECRET
        assert args[args.index("--registry-service") + 1] == SVC
        assert args[args.index("--registry-deployment") + 1] == SVC


def test_every_registry_client_trusts_the_chart_ca_and_sees_no_key() -> None:
    docs = render(*EVERYTHING)
    clients = 0
    for doc in workloads(docs) + [find(docs, "DaemonSet", "-node-proxy")]:
        for c in _containers(doc):
            env = {e["name"]: e.get("value") for e in c.get("env") or []}
            realms = env.get("CLUSTER_REGISTRY_TOKEN_REALMS")
            if realms is None and "--ca-file" not in (c.get("args") or []):
                continue
            clients += 1
            if realms is not None:
                assert realms.endswith(f"=https://{SVC}.{NAMESPACE}.svc:5002/token"), doc["metadata"]["name"]
                assert env["CLUSTER_REGISTRY_CA_BUNDLE"] == CA
                assert "--registry-insecure" not in (c.get("args") or [])
            (vol,) = _ca_volumes(doc)
            assert vol["secret"]["items"] == [{"key": "ca.crt", "path": "ca.crt"}], "the CA bundle only, never tls.key"
    assert clients >= 4, "reconciler, GC, sideload and the node proxy"
    gc = _containers(find(docs, "CronJob", "-gc"))[0]["args"]
    assert gc[gc.index("--registry-url") + 1] == f"https://{SVC}.{NAMESPACE}.svc:5000"
    proxy = _containers(find(docs, "DaemonSet", "-node-proxy"))[0]["args"]
    assert proxy[proxy.index("--ca-file") + 1] == CA
    probe = find(docs, "Pod", "-helm-test")["spec"]["containers"][0]
    assert probe["command"][2] == f"https://{SVC}.{NAMESPACE}.svc:5000"
    assert {"name": "SSL_CERT_FILE", "value": CA} in probe["env"]
    endpoint = find(docs, "ServiceMonitor", "-registry")["spec"]["endpoints"][0]
    assert endpoint["scheme"] == "https" and endpoint["tlsConfig"] == {
        "serverName": f"{SVC}.{NAMESPACE}.svc", "ca": {"secret": {"name": TLS_SECRET, "key": "ca.crt"}}}


def test_off_renders_plain_http_and_mounts_nothing() -> None:
    docs = render(*EVERYTHING, "registryTLS.enabled=false")
    config = yaml.safe_load(find(docs, "ConfigMap", "-registry")["data"]["config.yml"])
    assert "tls" not in config["http"]
    assert not [d for d in workloads(docs) + [find(docs, "DaemonSet", "-node-proxy")] if _ca_volumes(d)]
    reconciler = _containers(find(docs, "Deployment", "-artifact-reconciler"))[0]["args"]
    assert "--registry-insecure" in reconciler
    assert "--ca-file" not in _containers(find(docs, "DaemonSet", "-node-proxy"))[0]["args"]
    assert "--registry-secret" not in _containers(find(docs, "Job", "-certs-issue"))[0]["args"]


@pytest.mark.parametrize(("sets", "message"), [
    (("webhook.tls.mode=certManager",), "registryTLS.enabled=true needs the in-cluster webhook"),
    (("webhook.url=https://127.0.0.1:18443/mutate", "webhook.caBundle=Zm9v"), "registryTLS.enabled=true needs the in-cluster webhook"),
    (("nodeProxy.enabled=false",), "needs global.networkfunctionextension.webhook.registryHost"),
])
def test_bad_combinations_are_refused(sets: tuple[str, ...], message: str) -> None:
    assert message in render_error(*sets)
