"""Render tests: the chart's objects and the numbers DESIGN.md fixes, asserted on `helm template` output."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest
import yaml

from tests.chart.chartlib import (
    NAMESPACE,
    RELEASE,
    Doc,
    all_of,
    find,
    helm_template,
    pod_spec,
    render,
    render_error,
    workloads,
)

HA_COMPONENTS = ("registry", "webhook")
SELECTOR_KEYS = {"app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/component"}


def containers(doc: Doc) -> list[Doc]:
    spec = pod_spec(doc)
    return list(spec.get("initContainers", [])) + list(spec["containers"])


def deployment(docs: list[Doc], component: str) -> Doc:
    return find(docs, "Deployment", f"-{component}")


# -- HA: the seed's numbers ------------------------------------------------------------------------


@pytest.mark.parametrize("component", HA_COMPONENTS)
def test_ha_with_autoscaling_is_3_to_5_at_80_percent(component: str) -> None:
    docs = render()
    dep = deployment(docs, component)
    assert dep["spec"]["replicas"] == 3, "never below the HPA's minimum: a fresh install starts 3 pods (issue 19)"
    assert dep["spec"]["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 1}}
    hpa = find(docs, "HorizontalPodAutoscaler", f"-{component}")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": dep["metadata"]["name"]}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 5)
    targets = {m["resource"]["name"]: m["resource"]["target"] for m in hpa["spec"]["metrics"]}
    assert targets == {r: {"type": "Utilization", "averageUtilization": 80} for r in ("cpu", "memory")}
    pdb = find(docs, "PodDisruptionBudget", f"-{component}")
    assert pdb["spec"] == {"minAvailable": 2, "selector": dep["spec"]["selector"]}
    anti = pod_spec(dep)["affinity"]["podAntiAffinity"]
    assert "requiredDuringSchedulingIgnoredDuringExecution" not in anti
    (term,) = anti["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["weight"] == 100
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert term["podAffinityTerm"]["labelSelector"] == dep["spec"]["selector"]


@pytest.mark.parametrize("component", HA_COMPONENTS)
def test_ha_without_autoscaling_is_3_replicas_and_no_hpa(component: str) -> None:
    docs = render(f"{component if component == 'webhook' else 'clusterRegistry'}.autoScaling.enabled=false")
    assert deployment(docs, component)["spec"]["replicas"] == 3
    assert not [d for d in all_of(docs, "HorizontalPodAutoscaler") if d["metadata"]["name"].endswith(f"-{component}")]
    assert find(docs, "PodDisruptionBudget", f"-{component}")["spec"]["minAvailable"] == 2


@pytest.mark.parametrize("component", HA_COMPONENTS)
def test_ha_off_is_one_replica_no_pdb_no_hpa_even_with_autoscaling_on(component: str) -> None:
    key = "webhook" if component == "webhook" else "clusterRegistry"
    docs = render(f"{key}.highAvailability.enabled=false")  # autoScaling stays true: HA off wins
    dep = deployment(docs, component)
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 1
    names = [d["metadata"]["name"] for d in all_of(docs, "HorizontalPodAutoscaler") + all_of(docs, "PodDisruptionBudget")]
    assert not [n for n in names if n.endswith(f"-{component}")]
    assert "podAntiAffinity" not in pod_spec(dep)["affinity"]
    other = "registry" if component == "webhook" else "webhook"
    assert find(docs, "PodDisruptionBudget", f"-{other}")  # the other component keeps its HA


def test_registry_storage_is_rwx_with_ha_and_rwo_without() -> None:
    pvc = find(render(), "PersistentVolumeClaim", "-registry")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["spec"]["resources"]["requests"]["storage"] == "100Gi"
    assert "storageClassName" not in pvc["spec"], "\"\" means the cluster default: the field must be absent"
    docs = render("clusterRegistry.highAvailability.enabled=false", "clusterRegistry.storageClassName=nexus-shared",
                  "clusterRegistry.storageSize=2Ti")
    pvc = find(docs, "PersistentVolumeClaim", "-registry")
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert pvc["spec"]["storageClassName"] == "nexus-shared"
    assert pvc["spec"]["resources"]["requests"]["storage"] == "2Ti"
    # One RWO volume: a rolling update must not start a second pod elsewhere first.
    assert deployment(docs, "registry")["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0
    claim = [v for v in pod_spec(deployment(docs, "registry"))["volumes"] if v["name"] == "data"][0]
    assert claim["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]


SCALES = {
    "small": ({"cpu": "100m", "memory": "250Mi"}, {"cpu": "100m", "memory": "2Gi"}),
    "medium": ({"cpu": "250m", "memory": "500Mi"}, {"cpu": "500m", "memory": "2Gi"}),
    "large": ({"cpu": "500m", "memory": "1Gi"}, {"cpu": "1", "memory": "4Gi"}),
}


@pytest.mark.parametrize("scale", sorted(SCALES))
def test_registry_resources_follow_scale(scale: str) -> None:
    docs = render() if scale == "medium" else render(f"clusterRegistry.registryService.scale={scale}")
    (registry,) = [c for c in containers(deployment(docs, "registry")) if c["name"] == "registry"]
    requests, limits = SCALES[scale]
    assert registry["resources"] == {"requests": requests, "limits": limits}


# -- every pod ------------------------------------------------------------------------------------

EVERYTHING = ("enableEarlyLoading=true", "earlyLoading.images[0]=myacr.azurecr.io/nginx:1.0.0", "enableLocalRegistry=true",
              "serviceMonitor.enabled=true", "networkPolicy.enabled=true")


@pytest.mark.parametrize("required", [False, True])
def test_every_pod_has_limits_security_and_system_pool_placement(required: bool) -> None:
    docs = render(*EVERYTHING, f"systemPool.required={str(required).lower()}")
    pods = workloads(docs)
    assert len(pods) >= 12
    for doc in pods:
        spec, where = pod_spec(doc), f"{doc['kind']} {doc['metadata']['name']}"
        for c in containers(doc):
            res = c.get("resources", {})
            for part in ("requests", "limits"):
                assert set(res.get(part, {})) == {"cpu", "memory"}, f"{where}/{c['name']}: {part}"
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"] == {"drop": ["ALL"]}, where
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        node = spec["affinity"]["nodeAffinity"]
        expr = {"key": "kubernetes.azure.com/mode", "operator": "In", "values": ["system"]}
        if required:
            assert node == {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [expr]}]}}, where
        else:
            assert node == {"preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 100, "preference": {"matchExpressions": [expr]}}]}, where
        assert {"key": "CriticalAddonsOnly", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"], where


def test_system_pool_label_and_extra_tolerations_are_configurable() -> None:
    docs = render("systemPool.nodeLabel=agentpool=sys", "extraTolerations[0].key=kwok.x-k8s.io/node",
                  "extraTolerations[0].operator=Exists")
    spec = pod_spec(deployment(docs, "webhook"))
    (term,) = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert term == {"matchExpressions": [{"key": "agentpool", "operator": "In", "values": ["sys"]}]}
    assert {"key": "kwok.x-k8s.io/node", "operator": "Exists"} in spec["tolerations"]


def test_long_running_containers_have_http_readiness_probes() -> None:
    for dep in all_of(render(), "Deployment"):
        pod_ports = {p["containerPort"] for c in containers(dep) for p in c["ports"]}
        for c in containers(dep):
            assert "httpGet" in c["readinessProbe"], f"{dep['metadata']['name']}/{c['name']}"
            port = c["readinessProbe"]["httpGet"]["port"]
            # a name must be the container's own; a number may be a sibling's (distribution's health,
            # relayed by the token service from the loopback debug listener)
            declared = pod_ports if isinstance(port, int) else {p["name"] for p in c["ports"]}
            assert port in declared, f"{c['name']}: probe port {port} is not declared"


def test_every_container_gets_the_release_namespace_from_the_downward_api() -> None:
    for doc in workloads(render(*EVERYTHING)):
        for c in containers(doc):
            if c["name"] == "registry":
                continue  # distribution itself needs no namespace
            env = {e["name"]: e for e in c.get("env", [])}
            assert env["POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}, doc["metadata"]["name"]


# -- labels and selectors -------------------------------------------------------------------------


def test_selectors_are_the_immutable_labels_only_and_match_their_pods() -> None:
    docs = render(*EVERYTHING)
    seen: dict[str, str] = {}
    for dep in all_of(docs, "Deployment"):
        selector = dep["spec"]["selector"]["matchLabels"]
        assert set(selector) == SELECTOR_KEYS, dep["metadata"]["name"]
        assert selector["app.kubernetes.io/instance"] == RELEASE
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items()
        assert labels["app.kubernetes.io/version"] and labels["helm.sh/chart"].startswith("cluster-registry-")
        component = selector["app.kubernetes.io/component"]
        assert component not in seen, f"two Deployments share the selector of {component}"
        seen[component] = dep["metadata"]["name"]
    pod_labels = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"] for d in all_of(docs, "Deployment")}
    for svc in all_of(docs, "Service"):
        sel = svc["spec"]["selector"]
        assert set(sel) == SELECTOR_KEYS
        matched = [n for n, labels in pod_labels.items() if sel.items() <= labels.items()]
        assert matched == [svc["metadata"]["name"]], f"Service {svc['metadata']['name']} selects {matched}"
    for kind in ("PodDisruptionBudget", "NetworkPolicy", "ServiceMonitor"):
        for obj in all_of(docs, kind):
            sel = obj["spec"].get("selector", obj["spec"].get("podSelector"))["matchLabels"]
            assert set(sel) == SELECTOR_KEYS, obj["metadata"]["name"]
    for obj in docs:
        labels = obj["metadata"]["labels"]
        for key in ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/managed-by", "helm.sh/chart"):
            assert key in labels, f"{obj['kind']} {obj['metadata']['name']} lacks {key}"
        if obj["kind"] not in ("ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "MutatingWebhookConfiguration"):
            assert obj["metadata"]["namespace"] == NAMESPACE, obj["metadata"]["name"]


def test_common_labels_reach_every_object_but_never_a_selector() -> None:
    docs = render("commonLabels.team=platform")
    assert all(d["metadata"]["labels"]["team"] == "platform" for d in docs)
    assert all("team" not in d["spec"]["selector"]["matchLabels"] for d in all_of(docs, "Deployment"))


# -- webhook --------------------------------------------------------------------------------------


def mwc(docs: list[Doc]) -> Doc:
    return find(docs, "MutatingWebhookConfiguration")["webhooks"][0]


def test_webhook_configuration_rules_and_defaults() -> None:
    docs = render()
    hook = mwc(docs)
    assert hook["admissionReviewVersions"] == ["v1"]
    assert hook["sideEffects"] == "None"  # #16: the webhook only answers
    assert hook["failurePolicy"] == "Ignore"
    assert 1 <= hook["timeoutSeconds"] <= 10
    assert hook["reinvocationPolicy"] == "IfNeeded"
    rules = {(tuple(r["operations"]), tuple(r["resources"])) for r in hook["rules"]}
    assert rules == {(("CREATE",), ("pods",)), (("UPDATE",), ("pods/ephemeralcontainers",))}
    assert all(r["apiGroups"] == [""] and r["apiVersions"] == ["v1"] for r in hook["rules"])
    svc = find(docs, "Service", "-webhook")
    ref = hook["clientConfig"]["service"]
    assert (ref["name"], ref["namespace"], ref["path"]) == (svc["metadata"]["name"], NAMESPACE, "/mutate")
    assert ref["port"] in [p["port"] for p in svc["spec"]["ports"]]
    assert "caBundle" not in hook["clientConfig"], "the caBundle is written in the cluster, never rendered"
    assert hook["objectSelector"] == {"matchExpressions": [{"key": "clusterregistry.io/skip", "operator": "NotIn", "values": ["true"]}]}


@pytest.mark.parametrize("namespace", ["crs", "other-ns"])
def test_webhook_always_excludes_kube_system_and_the_release_namespace(namespace: str) -> None:
    result = helm_template("--set", "global.networkfunctionextension.webhook.excludeNamespaces[0]=monitoring")
    if namespace != NAMESPACE:
        result = subprocess.run([*result.args[:5], namespace, *result.args[6:]], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    (expr,) = mwc(docs)["namespaceSelector"]["matchExpressions"]
    assert expr["key"] == "kubernetes.io/metadata.name" and expr["operator"] == "NotIn"
    assert expr["values"] == ["kube-system", namespace, "monitoring"]
    (condition,) = mwc(docs)["matchConditions"]
    assert condition["expression"] == f"!(request.namespace in ['kube-system', '{namespace}'])"


@pytest.mark.parametrize("expression", [
    "request.namespace != 'kube-system'",
    "!(request.namespace in [\"kube-system\", 'a\\\\b']) && object.metadata.?labels[?'x'].orValue('') != \"y: z\"",
])
def test_match_condition_expression_passes_through_verbatim(expression: str, tmp_path: Any) -> None:
    values = tmp_path / "v.yaml"
    values.write_text(yaml.safe_dump({"global": {"networkfunctionextension": {"webhook": {"pod": {"mutation": {"matchConditionExpression": expression}}}}}}))
    (condition,) = mwc(render(files=(str(values),)))["matchConditions"]
    assert condition["expression"] == expression


def test_webhook_container_flags() -> None:
    docs = render("webhook.excludeRegistries[0]=mcr.microsoft.com", "webhook.excludeRegistries[1]=*.corp",
                  "webhook.allowRegistries[0]=myacr.azurecr.io", "webhook.rewritePolicy=Always")
    dep = deployment(docs, "webhook")
    (c,) = containers(dep)
    args = c["args"]
    assert args[0] == "webhook"
    pairs = list(zip(args[1::2], args[2::2]))
    assert ("--registry-host", "127.0.0.1:5050") in pairs  # the node proxy (docs/pull-path.md)
    assert ("--rewrite-policy", "Always") in pairs
    assert [v for k, v in pairs if k == "--exclude-registry"] == ["mcr.microsoft.com", "*.corp"]
    assert [v for k, v in pairs if k == "--allow-registry"] == ["myacr.azurecr.io"]
    assert ("--namespace", "$(POD_NAMESPACE)") in pairs
    mount = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}["tls"]
    assert dict(pairs)["--tls-cert"] == f"{mount}/tls.crt" and dict(pairs)["--tls-key"] == f"{mount}/tls.key"
    tls = [v for v in pod_spec(dep)["volumes"] if v["name"] == "tls"][0]["secret"]["secretName"]
    job = find(docs, "Job", "-certs-issue")
    certs_args = containers(job)[0]["args"]
    assert certs_args[certs_args.index("--secret") + 1] == tls
    assert certs_args[certs_args.index("--webhook-configuration") + 1] == find(docs, "MutatingWebhookConfiguration")["metadata"]["name"]
    assert certs_args[certs_args.index("--service") + 1] == find(docs, "Service", "-webhook")["metadata"]["name"]


def test_registry_host_follows_node_port_or_the_value() -> None:
    def host(*sets: str) -> str:
        args = containers(deployment(render(*sets), "webhook"))[0]["args"]
        return str(args[args.index("--registry-host") + 1])
    assert host() == "127.0.0.1:5050" and host("nodeProxy.port=5151") == "127.0.0.1:5151"
    assert host("clusterRegistry.registryService.type=NodePort", "clusterRegistry.registryService.nodePort=30500",
                "nodeProxy.enabled=false", "registryTLS.enabled=false") == "localhost:30500"
    assert host("webhook.registryHost=registry.example:443") == "registry.example:443"
    assert host("nodeProxy.enabled=false", "registryTLS.enabled=false") == f"{RELEASE}-cluster-registry-registry.{NAMESPACE}.svc.cluster.local:5000"


def test_url_mode_deploys_no_webhook_and_no_certs_machinery() -> None:
    docs = render("webhook.url=https://127.0.0.1:18443/mutate", "webhook.caBundle=Zm9v", "registryTLS.enabled=false")
    client = mwc(docs)["clientConfig"]
    assert client == {"url": "https://127.0.0.1:18443/mutate", "caBundle": "Zm9v"}
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert not [n for n in names if "webhook" in n[1] and n[0] != "MutatingWebhookConfiguration"]
    assert not [n for n in names if "certs" in n[1]]
    assert deployment(docs, "registry") and deployment(docs, "artifact-reconciler")


def test_cert_manager_mode_replaces_the_certs_jobs() -> None:
    docs = render("webhook.tls.mode=certManager", "registryTLS.enabled=false")
    cert = find(docs, "Certificate")
    dep = deployment(docs, "webhook")
    tls = [v for v in pod_spec(dep)["volumes"] if v["name"] == "tls"][0]["secret"]["secretName"]
    assert cert["spec"]["secretName"] == tls
    assert f"{find(docs, 'Service', '-webhook')['metadata']['name']}.{NAMESPACE}.svc" in cert["spec"]["dnsNames"]
    assert find(docs, "Issuer")["metadata"]["name"] == cert["spec"]["issuerRef"]["name"]
    annotations = find(docs, "MutatingWebhookConfiguration")["metadata"]["annotations"]
    assert annotations["cert-manager.io/inject-ca-from"] == f"{NAMESPACE}/{cert['metadata']['name']}"
    assert not [d for d in docs if "certs" in d["metadata"]["name"]]
    docs = render("webhook.tls.mode=certManager", "webhook.tls.certManager.issuerRef.name=corp", "webhook.tls.certManager.issuerRef.kind=ClusterIssuer",
                  "registryTLS.enabled=false")
    assert find(docs, "Certificate")["spec"]["issuerRef"] == {"name": "corp", "kind": "ClusterIssuer", "group": "cert-manager.io"}
    assert not all_of(docs, "Issuer")


# -- TLS rotation, hooks and GC -------------------------------------------------------------------


def hook(doc: Doc) -> tuple[set[str], int, set[str]]:
    a = doc["metadata"].get("annotations", {})
    return set(a.get("helm.sh/hook", "").split(",")) - {""}, int(a.get("helm.sh/hook-weight", 0)), set(a.get("helm.sh/hook-delete-policy", "").split(","))


def test_certs_jobs_run_before_and_after_install_and_a_cronjob_rotates() -> None:
    docs = render()
    issue, cabundle = find(docs, "Job", "-certs-issue"), find(docs, "Job", "-certs-cabundle")
    assert hook(issue)[0] == {"pre-install", "pre-upgrade"}
    assert hook(cabundle)[0] == {"post-install", "post-upgrade"}
    rotate = find(docs, "CronJob", "-certs")
    assert rotate["spec"]["concurrencyPolicy"] == "Forbid"
    assert containers(rotate)[0]["args"] == containers(issue)[0]["args"] == containers(cabundle)[0]["args"]
    assert containers(issue)[0]["args"][:1] == ["certs"] and "--renew-before" in containers(issue)[0]["args"]
    assert pod_spec(rotate)["serviceAccountName"] == find(docs, "ServiceAccount", "-certs")["metadata"]["name"]
    assert not hook(find(docs, "ServiceAccount", "-certs"))[0], "the CronJob's ServiceAccount is a release object"


def test_hooks_get_their_rbac_first_and_clean_up() -> None:
    docs = render(*EVERYTHING)
    jobs = all_of(docs, "Job")
    assert {j["metadata"]["name"].removeprefix(f"{RELEASE}-cluster-registry-") for j in jobs} == {
        "validate", "registry-secret", "certs-issue", "certs-cabundle", "preload", "sideload"}
    rbac = [d for d in docs if d["kind"] in ("ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding", "ConfigMap")
            and d["metadata"]["name"].endswith("-hooks")]
    assert len(rbac) == 6
    for job in jobs:
        events, weight, policy = hook(job)
        assert events and "before-hook-creation" in policy, job["metadata"]["name"]
        assert job["spec"]["backoffLimit"] >= 0 and job["spec"]["activeDeadlineSeconds"] > 0
        assert pod_spec(job)["restartPolicy"] == "Never"
        assert pod_spec(job)["serviceAccountName"].endswith("-hooks")
        for obj in rbac:
            obj_events, obj_weight, _ = hook(obj)
            assert events <= obj_events, f"{obj['kind']} must exist for {events}"
            assert obj_weight < weight, f"{obj['kind']} (weight {obj_weight}) must come before {job['metadata']['name']} ({weight})"
    order = sorted((hook(j)[1], j["metadata"]["name"]) for j in jobs if "pre-install" in hook(j)[0])
    assert order[0][1].endswith("-validate"), "validation runs before anything is created"
    preload = find(docs, "Job", "-preload")
    assert hook(preload)[0] == {"post-install", "post-upgrade"}
    assert hook(preload)[1] > hook(find(docs, "Job", "-certs-cabundle"))[1], "preload after the webhook has its caBundle"
    assert preload["spec"]["activeDeadlineSeconds"] == 30 * 60 + 300
    args = containers(preload)[0]["args"]
    values_cm = find(docs, "ConfigMap", "-hooks")
    loaded = yaml.safe_load(values_cm["data"]["values.yaml"])
    assert loaded["global"]["networkfunctionextension"]["earlyLoading"]["images"] == ["myacr.azurecr.io/nginx:1.0.0"]
    assert args[:3] == ["preload", "--values", "/etc/cluster-registry/hooks/values.yaml"]


def test_no_preload_or_sideload_without_their_switches() -> None:
    names = {d["metadata"]["name"] for d in render()}
    assert not {n for n in names if n.endswith(("-preload", "-sideload"))}


def test_registry_secret_comes_from_a_hook_or_an_existing_secret_never_from_the_template() -> None:
    docs = render()
    assert not all_of(docs, "Secret"), "no Secret is rendered: random data would churn on every sync"
    job = find(docs, "Job", "-registry-secret")
    assert hook(job)[0] == {"pre-install", "pre-upgrade"}
    name = f"{RELEASE}-cluster-registry-registry"
    assert containers(job)[0]["args"][:2] == ["registry-secret", name]
    env = {e["name"]: e for e in containers(deployment(docs, "registry"))[0]["env"]}
    assert env["REGISTRY_HTTP_SECRET"]["valueFrom"]["secretKeyRef"] == {"name": name, "key": "http-secret"}
    pushers = [f"{c}={name}-push-{c}" for c in ("artifact-reconciler", "sideload", "gc")]
    assert containers(job)[0]["args"][2:10] == ["--token-secret", f"{name}-token",
                                                *(x for p in pushers for x in ("--push-secret", p))]  # fmt: skip
    docs = render("clusterRegistry.existingSecret=mine")
    job = find(docs, "Job", "-registry-secret")
    assert containers(job)[0]["args"][:2] == ["registry-secret", "--token-secret"], "the token key and push credentials only"
    env = {e["name"]: e for e in containers(deployment(docs, "registry"))[0]["env"]}
    assert env["REGISTRY_HTTP_SECRET"]["valueFrom"]["secretKeyRef"]["name"] == "mine"


def test_gc_cronjob_by_cadence() -> None:
    docs = render("clusterRegistry.clusterRegistryGCCadence=30 2 * * 0", "clusterRegistry.clusterRegistryGCThreshold=80")
    gc = find(docs, "CronJob", "-gc")
    assert gc["spec"]["schedule"] == "30 2 * * 0"
    assert gc["spec"]["concurrencyPolicy"] == "Forbid"
    args = containers(gc)[0]["args"]
    pairs = dict(zip(args[2::2], args[3::2])) if args[:2] == ["gc", "--once"] else {}
    assert pairs["--threshold"] == "80" and pairs["--storage-size"] == "100Gi"
    assert pairs["--lock-name"] == gc["metadata"]["name"]
    assert pairs["--registry-host"] == "127.0.0.1:5050", "GC must know rewritten references"
    mounted = {m["name"]: m["mountPath"] for m in containers(gc)[0]["volumeMounts"]}
    assert pairs["--registry-credentials-file"].startswith(mounted["credentials"] + "/")
    gc_secret = [v for v in pod_spec(gc)["volumes"] if v["name"] == "credentials"][0]["secret"]["secretName"]
    assert gc_secret.endswith("-registry-push-gc"), "GC's own credential, not a shared one"
    token = [c for c in containers(deployment(docs, "registry")) if c["name"] == "token"][0]["args"]
    assert token[token.index("--lock-name") + 1] == pairs["--lock-name"], "GC and the token service must agree on the Lease"
    mounts = {m["name"]: m["mountPath"] for m in containers(gc)[0]["volumeMounts"]}
    assert mounts["data"] == pairs["--storage-root"]
    claim = [v for v in pod_spec(gc)["volumes"] if v["name"] == "data"][0]["persistentVolumeClaim"]["claimName"]
    assert claim == find(docs, "PersistentVolumeClaim", "-registry")["metadata"]["name"]
    assert "podAffinity" not in pod_spec(gc)["affinity"]
    default = containers(find(render(), "CronJob", "-gc"))[0]["args"]
    assert default[default.index("--threshold") + 1] == "0", "a threshold of 0 is a value, not a missing one"


def test_gc_disabled_removes_the_cronjob_and_its_rbac() -> None:
    docs = render(files=("chart/ci/gc-disabled-values.yaml",))
    assert not [d for d in docs if d["metadata"]["name"].endswith("-gc")]
    assert find(docs, "CronJob", "-certs")  # the certificate rotation stays


def test_gc_on_a_rwo_volume_runs_next_to_the_registry() -> None:
    docs = render("clusterRegistry.highAvailability.enabled=false")
    term = pod_spec(find(docs, "CronJob", "-gc"))["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"] == deployment(docs, "registry")["spec"]["selector"]


# -- RBAC -----------------------------------------------------------------------------------------


def rules_of(docs: list[Doc], sa_suffix: str) -> list[Doc]:
    sa_names = {d["metadata"]["name"] for d in all_of(docs, "ServiceAccount") if d["metadata"]["name"].endswith(sa_suffix)}
    out: list[Doc] = []
    for binding in all_of(docs, "RoleBinding") + all_of(docs, "ClusterRoleBinding"):
        if {s["name"] for s in binding["subjects"]} & sa_names:
            role = find(docs, binding["roleRef"]["kind"], binding["roleRef"]["name"])
            out += role["rules"]
    return out


def test_rbac_is_least_privilege() -> None:
    docs = render(*EVERYTHING)
    for role in all_of(docs, "Role") + all_of(docs, "ClusterRole"):
        for rule in role["rules"]:
            assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"], role["metadata"]["name"]
    webhook = rules_of(docs, "-webhook")
    assert webhook, "the webhook's ServiceAccount is bound"
    assert not [r for r in webhook if "secrets" in r["resources"]], "the webhook cannot read Secrets"
    # writes nothing but Artifacts (create, patch) and its leader Lease (by name): tests/chart/test_rbac.py
    assert not [r for r in webhook if set(r["verbs"]) & {"delete", "deletecollection", "update"} and r["resources"] != ["leases"]]
    for component in ("-artifact-reconciler", "-component-reconciler"):
        secret_rules = [r for r in rules_of(docs, component) if "secrets" in r["resources"]]
        # no list/watch; isolated (the default): the artifact reconciler creates pull Secrets, updates them by name
        assert {v for r in secret_rules for v in r["verbs"]} <= {"get", "create", "update"}, f"{component}: no list/watch"
        assert all(r.get("resourceNames") for r in secret_rules if "update" in r["verbs"]), f"{component}: updates by name"
    for component in ("-registry", "-gc", "-certs", "-hooks"):
        for rule in rules_of(docs, component):
            if "secrets" in rule["resources"] and set(rule["verbs"]) - {"create"}:
                assert rule.get("resourceNames"), f"{component} touches Secrets only by name"
            if "mutatingwebhookconfigurations" in rule["resources"] and set(rule["verbs"]) - {"create"}:
                assert rule["resourceNames"] == [find(docs, "MutatingWebhookConfiguration")["metadata"]["name"]]
    registry = rules_of(docs, "-registry")
    assert {res for r in registry for res in r["resources"]} == {"leases", "secrets", "artifacts"}, \
        "the token service touches Leases and its Secrets (by name) only, and (isolated) reads Artifacts"
    assert all(set(r["verbs"]) <= {"list", "watch"} for r in registry if "artifacts" in r["resources"])
    service_accounts = {d["metadata"]["name"] for d in all_of(docs, "ServiceAccount")}
    used = {pod_spec(w)["serviceAccountName"] for w in workloads(docs)}
    assert used <= service_accounts
    deployments = all_of(docs, "Deployment")
    assert len({pod_spec(d)["serviceAccountName"] for d in deployments}) == len(deployments), "one ServiceAccount per component"


# -- CRDs -----------------------------------------------------------------------------------------


def _walk_structural(node: Doc, path: str) -> None:
    assert "type" in node or node.get("x-kubernetes-int-or-string") or node.get("x-kubernetes-preserve-unknown-fields"), path
    for key, child in node.get("properties", {}).items():
        _walk_structural(child, f"{path}.{key}")
    if "items" in node:
        _walk_structural(node["items"], f"{path}[]")


def test_crds_match_the_api_module() -> None:
    from cluster_registry import api

    docs = render()
    crds = {d["metadata"]["name"]: d for d in all_of(docs, "CustomResourceDefinition")}
    assert set(crds) == {f"{api.ARTIFACTS}.{api.GROUP}", f"{api.COMPONENTS}.{api.GROUP}"}
    columns = {"artifacts": ["Source", "Phase", "Digest", "Size", "Local", "Age"], "components": ["Ready", "Images", "Age"]}
    types = {
        "artifacts": (api.ArtifactSpec, api.ArtifactStatus),
        "components": (api.ComponentSpec, api.ComponentStatus),
    }
    for plural, (spec_type, status_type) in types.items():
        crd = crds[f"{plural}.{api.GROUP}"]
        assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        assert crd["spec"]["scope"] == "Namespaced" and crd["spec"]["group"] == api.GROUP
        (version,) = crd["spec"]["versions"]
        assert (version["name"], version["served"], version["storage"]) == (api.VERSION, True, True)
        assert version["subresources"] == {"status": {}}
        assert [c["name"] for c in version["additionalPrinterColumns"]] == columns[plural]
        schema = version["schema"]["openAPIV3Schema"]
        _walk_structural(schema, plural)
        props = schema["properties"]
        assert set(props["spec"]["properties"]) == set(spec_type.__annotations__)
        assert set(props["status"]["properties"]) == set(status_type.__annotations__)
        conditions = props["status"]["properties"]["conditions"]["items"]["properties"]
        assert set(conditions) == set(api.Condition.__annotations__)
    artifact = crds[f"artifacts.{api.GROUP}"]["spec"]["versions"][0]
    assert artifact["schema"]["openAPIV3Schema"]["properties"]["spec"]["required"] == ["sourceArtifact"]
    assert artifact["additionalPrinterColumns"][0]["jsonPath"] == ".spec.sourceArtifact"
    phases = artifact["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]["phase"]["enum"]
    assert phases == [p.value for p in api.Phase]
    owner = artifact["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["owners"]["items"]
    assert set(owner["properties"]) == set(owner["required"]) == set(api.OwnerRef.__annotations__)
    chart = crds[f"components.{api.GROUP}"]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["chart"]
    assert set(chart["properties"]) == set(api.ComponentChart.__annotations__)
    assert not all_of(render("crds.enabled=false"), "CustomResourceDefinition")
    assert "annotations" not in find(render("crds.keep=false"), "CustomResourceDefinition", "artifacts.clusterregistry.io")["metadata"]


# -- registry configuration -----------------------------------------------------------------------


def test_distribution_config() -> None:
    docs = render()
    cm = find(docs, "ConfigMap", "-registry")
    config = yaml.safe_load(cm["data"]["config.yml"])
    assert config["storage"]["delete"] == {"enabled": True}
    assert config["storage"]["filesystem"]["rootdirectory"] == "/var/lib/registry"
    assert config["http"]["addr"] == "0.0.0.0:5000", "distribution serves every byte itself"
    assert config["http"]["debug"]["addr"] == "127.0.0.1:5001", "pprof and expvar stay on the pod's loopback"
    assert config["auth"]["token"] == {
        "realm": "http://127.0.0.1:5051/token", "service": "cluster-registry", "issuer": "cluster-registry-token-service",
        "jwks": "/etc/distribution/token/jwks.json"}, "the node proxy's token port: where nodes reach the realm"
    assert "secret" not in config["http"], "http.secret comes from the Secret through REGISTRY_HTTP_SECRET"
    assert config["health"]["storagedriver"]["enabled"] is True
    dep = deployment(docs, "registry")
    registry, token = containers(dep)
    assert registry["command"] == ["/bin/registry", "serve", "/etc/distribution/config.yml"]
    assert registry["image"] == "docker.io/library/registry:3.0.0"
    assert registry["ports"] == [{"name": "registry", "containerPort": 5000, "protocol": "TCP"}]
    assert token["args"][:3] == ["token-service", "--listen", "0.0.0.0:5002"]
    assert token["ports"] == [{"name": "token", "containerPort": 5002, "protocol": "TCP"}]
    args = token["args"]
    assert args[args.index("--access") + 1] == "isolated"
    shared = [c for c in containers(deployment(render("registryAccess.mode=shared"), "registry")) if c["name"] == "token"]
    assert shared[0]["args"][shared[0]["args"].index("--access") + 1] == "shared"
    assert {args[i + 1] for i, a in enumerate(args) if a == "--pusher"} == {
        f"{c}=t-cluster-registry-registry-push-{c}" for c in ("artifact-reconciler", "sideload", "gc")}
    # each side of the token key Secret sees only its part
    mounts = {c["name"]: {m["name"] for m in c["volumeMounts"]} for c in (registry, token)}
    vols = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert "token-jwks" in mounts["registry"] and "token-key" not in mounts["registry"]
    assert "token-key" in mounts["token"] and "token-jwks" not in mounts["token"]
    assert [i["key"] for i in vols["token-key"]["secret"]["items"]] == ["key.pem"]
    assert [i["key"] for i in vols["token-jwks"]["secret"]["items"]] == ["jwks.json"]
    assert "checksum/config" in dep["spec"]["template"]["metadata"]["annotations"]
    changed = deployment(render("clusterRegistry.storage.driver=s3", "clusterRegistry.storage.s3.bucket=b",
                                "clusterRegistry.storage.s3.region=r", "clusterRegistry.storage.s3.secretName=keys"), "registry")
    assert changed["spec"]["template"]["metadata"]["annotations"]["checksum/config"] != dep["spec"]["template"]["metadata"]["annotations"]["checksum/config"]


def test_object_storage_has_no_pvc_and_takes_keys_from_a_secret() -> None:
    docs = render(files=("chart/ci/object-storage-values.yaml",))
    assert not all_of(docs, "PersistentVolumeClaim")
    config = yaml.safe_load(find(docs, "ConfigMap", "-registry")["data"]["config.yml"])
    assert config["storage"]["s3"]["bucket"] == "cluster-registry" and "filesystem" not in config["storage"]
    assert config["storage"]["redirect"] == {"disable": True}, "clients pull through distribution, never from the bucket"
    gc = find(docs, "CronJob", "-gc")
    for doc in (deployment(docs, "registry"), gc):
        c = containers(doc)[0]
        env = {e["name"]: e.get("valueFrom", {}).get("secretKeyRef") for e in c.get("env", [])}
        assert env["REGISTRY_STORAGE_S3_SECRETKEY"] == {"name": "registry-s3", "key": "secretkey"}
        assert env["REGISTRY_STORAGE_S3_ACCESSKEY"] == {"name": "registry-s3", "key": "accesskey"}
        assert "data" not in {v["name"] for v in pod_spec(doc)["volumes"]}
    args = containers(gc)[0]["args"]
    assert "--storage-root" not in args, "usage and inventory through the registry API"
    assert args[args.index("--registry-config") + 1] == "/etc/distribution/config.yml", "the sweep uses the s3 driver config"


def test_images_are_configurable_by_repository_tag_and_digest() -> None:
    digest = "sha256:" + "a" * 64
    docs = render("image.registry=myacr.azurecr.io", "image.repository=cr/app", "image.tag=9.9.9", f"image.digest={digest}",
                  "clusterRegistry.image.tag=3.0.1")
    images = {c["image"] for w in workloads(docs) for c in containers(w)}
    assert images == {f"myacr.azurecr.io/cr/app:9.9.9@{digest}", "docker.io/library/registry:3.0.1"}
    default = {c["image"] for w in workloads(render()) for c in containers(w)}
    assert "ghcr.io/cluster-registry/cluster-registry:0.1.0" in default


# -- the chart's commands exist in the CLI --------------------------------------------------------


def _command(words: list[str]) -> tuple[Any, list[str]]:
    import click

    from cluster_registry.cli import cli

    ctx = click.Context(cli)
    cmd: Any = cli
    rest = list(words)
    while isinstance(cmd, click.Group) and rest and not rest[0].startswith("-"):
        sub = cmd.get_command(ctx, rest[0])
        assert sub is not None, f"`cluster-registry {' '.join(words[:1])}` does not exist"
        cmd, rest = sub, rest[1:]
    return cmd, rest


def _without_filesystem(cmd: Any) -> Any:
    """CMD with its path parameters no longer checked against this machine's filesystem (the paths are
    the pod's mounts); everything else parses as strictly as in the pod."""
    import copy

    import click

    def relaxed(p: click.Parameter) -> click.Parameter:
        if not isinstance(p.type, click.Path):
            return p
        q = copy.copy(p)
        q.type = click.Path(file_okay=p.type.file_okay, dir_okay=p.type.dir_okay)
        return q

    strict = copy.copy(cmd)
    strict.params = [relaxed(p) for p in cmd.params]
    return strict


CHART_COMMANDS = ["webhook", "token-service", "reconcile artifacts", "reconcile components", "gc", "certs", "validate", "preload", "sideload", "registry-secret"]


@pytest.mark.parametrize("command", CHART_COMMANDS)
def test_every_flag_the_chart_passes_exists_in_the_cli(command: str) -> None:
    """docs/contracts.md flags, checked against the click commands as implemented."""
    import click

    docs = render(*EVERYTHING)
    argvs = []
    for w in workloads(docs):
        for c in containers(w):
            if c["image"].startswith("ghcr.io/cluster-registry/") and "args" in c and " ".join(c["args"]).startswith(command + " "):
                argvs.append(c["args"])
    assert argvs, f"no container runs `cluster-registry {command}`"
    for argv in argvs:
        cmd, rest = _command(argv)
        known = {opt for p in cmd.params for opt in (*p.opts, *p.secondary_opts)}
        flags = [a for a in rest if a.startswith("--")]
        assert set(flags) <= known, f"`cluster-registry {command}` lacks {sorted(set(flags) - known)}"
        try:  # strict: a wrong arity or a value outside a flag's choices fails here, as in the pod
            with _without_filesystem(cmd).make_context(command, list(rest)) as ctx:
                assert ctx.params is not None
        except click.ClickException as err:
            pytest.fail(f"`cluster-registry {command}` refuses the chart's argv {rest}: {err.format_message()}")


# -- determinism and invalid input ----------------------------------------------------------------


def test_two_renders_are_byte_identical() -> None:
    args = ["-f", "chart/ci/early-loading-values.yaml"]
    first, second = helm_template(*args), helm_template(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout


@pytest.mark.parametrize(("sets", "message"), [
    (("clusterRegistry.storageSize=100G",), "storageSize"),
    (("clusterRegistry.clusterRegistryGCThreshold=101",), "clusterRegistryGCThreshold"),
    (("clusterRegistry.clusterRegistryGCThreshold=-1",), "clusterRegistryGCThreshold"),
    (("clusterRegistry.clusterRegistryGCCadence=every day",), "clusterRegistryGCCadence"),
    (("clusterRegistry.registryService.scale=huge",), "scale"),
    (("webhook.failurePolicy=Sometimes",), "failurePolicy"),
    (("webhook.rewritePolicy=Never",), "rewritePolicy"),
    (("clusterRegistry.highAvailibility.enabled=false",), "highAvailibility"),
    (("enableClusterRegistry=yes",), "enableClusterRegistry"),
    (("webhook.url=http://example:8443/mutate",), "webhook/url"),
])
def test_schema_rejects_bad_values(sets: tuple[str, ...], message: str) -> None:
    error = render_error(*sets)
    assert "schema" in error and message in error, error


@pytest.mark.parametrize(("sets", "message"), [
    (("enableClusterRegistry=false", "enableEarlyLoading=true"), "enableEarlyLoading=true needs"),
    (("enableClusterRegistry=false", "enableLocalRegistry=true"), "enableLocalRegistry=true needs"),
    (("clusterRegistry.storageAccessMode=ReadWriteOnce",), "needs ReadWriteMany"),
    (("clusterRegistry.storage.driver=s3",), "needs storage.s3.bucket"),
    (("clusterRegistry.storage.driver=azure",), "needs storage.azure.accountName"),
    (("clusterRegistry.registryService.nodePort=30500",), "not NodePort"),
    (("webhook.caBundle=Zm9v",), "only used in URL mode"),
])
def test_invalid_combinations_fail_with_a_clear_message(sets: tuple[str, ...], message: str) -> None:
    error = render_error(*sets)
    assert message in error, error


def test_cluster_registry_off_leaves_crds_only() -> None:
    docs = render("enableClusterRegistry=false", "hooks.validate.enabled=false")
    assert {d["kind"] for d in docs} == {"CustomResourceDefinition"}


def test_hooks_values_configmap_holds_the_values_tree() -> None:
    cm = find(render(), "ConfigMap", "-hooks")
    values = yaml.safe_load(cm["data"]["values.yaml"])
    chart_defaults = yaml.safe_load(open("chart/values.yaml"))
    assert values == chart_defaults
    assert json.dumps(values)  # plain data


def test_kubernetes_older_than_1_30_is_refused() -> None:
    old = subprocess.run([*helm_template().args[:-1], "1.29.9"], capture_output=True, text=True, check=False)
    assert old.returncode != 0 and "needs Kubernetes 1.30 or later" in old.stderr, old.stderr
    dev = subprocess.run([*helm_template().args[:-1], "0.0.0-master"], capture_output=True, text=True, check=False)
    assert dev.returncode == 0, "a development build's unknown version is not refused"


def test_templates_use_no_cluster_lookups_or_random_data() -> None:
    """GitOps safety: nothing churns per render (random, generated certs, time), and `lookup` only where
    its empty answer under `helm template` renders the defaults: the live volume's size (a refusal) and
    the live replica count (kept when an HPA scaled above the minimum)."""
    from tests.chart.chartlib import CHART

    lookups = {"_validate.tpl", "_scaling.tpl"}

    forbidden = ("lookup", "randAlpha", "randAlphaNum", "randNumeric", "randAscii", "randBytes", "uuidv4",
                 "genCA", "genSelfSignedCert", "genSignedCert", "genPrivateKey", "now", "date ")
    for path in sorted((CHART / "templates").rglob("*")):
        if path.is_file():
            actions = " ".join(part.split("}}")[0] for part in path.read_text().split("{{")[1:])
            words = set(actions.replace("(", " ").replace(")", " ").replace("|", " ").split())
            allowed = {"lookup"} if path.name in lookups else set()
            assert not words & {f.strip() for f in forbidden} - allowed, f"{path.name}: {words & set(forbidden)}"


def test_webhook_pods_never_see_the_ca_key() -> None:
    """The TLS Secret also holds ca.key (the certs Job signs renewals with it); the webhook mounts only its pair."""
    (volume,) = [v for v in pod_spec(deployment(render(), "webhook"))["volumes"] if "secret" in v]
    assert sorted(item["key"] for item in volume["secret"]["items"]) == ["tls.crt", "tls.key"]


def test_both_reconcilers_reach_source_registries_the_same_way() -> None:
    """Plain-HTTP sources and extra CAs apply to chart pulls (component reconciler) as to image copies."""
    docs = render(
        "global.networkfunctionextension.artifactReconciler.caBundleConfigMap=lab-ca",
        "global.networkfunctionextension.artifactReconciler.insecureRegistries={lab:5000}",
    )
    for component in ("artifact-reconciler", "component-reconciler"):
        spec = pod_spec(deployment(docs, component))
        args = spec["containers"][0]["args"]
        assert args[args.index("--insecure-registry") + 1] == "lab:5000", component
        assert args[args.index("--ca-bundle") + 1] == "/etc/cluster-registry/ca/ca.crt", component
        assert {"name": "ca", "configMap": {"name": "lab-ca"}} in spec["volumes"], component
