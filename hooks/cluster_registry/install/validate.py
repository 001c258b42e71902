"""``cluster-registry validate``: the pre-install/pre-upgrade hook that refuses bad configurations.

Thin adapters read the cluster into :class:`checks.Facts`; :func:`checks.run` does the judging.

Exit codes (stable): 0 = no problems (warnings may be printed), 1 = at least one problem,
2 = usage or internal error (bad flags, unreadable values file, API server unreachable).
Output: one line per problem on stdout, ``ERROR [check-id] what is wrong (value: the key to
change)`` or ``WARNING [...]``, then a summary line; ``--format json`` prints one JSON document.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import click
import yaml
from kubernetes import client
from kubernetes.client import ApiException

from cluster_registry import kube, reference
from cluster_registry.errors import ConfigError, InvalidReferenceError
from cluster_registry.install import checks as C
from cluster_registry.install import schema as S
from cluster_registry.install import values as V
from cluster_registry.oci.auth import read_credentials_file

log = logging.getLogger(__name__)

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE = 0, 1, 2
DEFAULT_CLASS_ANNOTATIONS = (
    "storageclass.kubernetes.io/is-default-class",
    "storageclass.beta.kubernetes.io/is-default-class",
)
TOLERATED_TAINTS = {"CriticalAddonsOnly"}  # AKS system pools; the chart tolerates it


# --- adapters: Kubernetes objects -> facts (pure conversions, testable without a cluster) ---------


def parse_version(major: str, minor: str) -> tuple[int, int]:
    """``('1', '29+')`` -> ``(1, 29)`` (managed clusters append ``+``); ValueError when empty."""
    return int(re.sub(r"\D", "", major)), int(re.sub(r"\D", "", minor))


def node_fact(node: Mapping[str, Any]) -> C.Node:
    meta, spec, status = node.get("metadata") or {}, node.get("spec") or {}, node.get("status") or {}
    ready = any(
        c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or []
    )
    blocking = [
        t
        for t in spec.get("taints") or []
        if t.get("effect") in ("NoSchedule", "NoExecute") and t.get("key") not in TOLERATED_TAINTS
    ]
    return C.Node(
        name=meta.get("name", ""),
        labels=dict(meta.get("labels") or {}),
        ready=ready,
        schedulable=not spec.get("unschedulable") and not blocking,
    )


def storage_class_fact(sc: Mapping[str, Any]) -> C.StorageClass:
    meta = sc.get("metadata") or {}
    annotations = meta.get("annotations") or {}
    return C.StorageClass(
        name=meta.get("name", ""),
        provisioner=sc.get("provisioner", ""),
        is_default=any(annotations.get(a) == "true" for a in DEFAULT_CLASS_ANNOTATIONS),
        parameters=dict(sc.get("parameters") or {}),
    )


def volume_fact(pvc: Mapping[str, Any]) -> C.Volume:
    spec = pvc.get("spec") or {}
    return C.Volume(
        name=(pvc.get("metadata") or {}).get("name", ""),
        storage_class=spec.get("storageClassName") or "",
        requested=str(((spec.get("resources") or {}).get("requests") or {}).get("storage", "")),
        access_modes=tuple(spec.get("accessModes") or ()),
    )


def api_error_message(err: ApiException) -> str:
    """The API server's own words from a Status body (field causes when present)."""
    try:
        status = json.loads(err.body or "")
    except (TypeError, ValueError):
        return f"HTTP {err.status}: {err.reason}"
    causes = (status.get("details") or {}).get("causes") or []
    texts = [f"{c.get('field', '')}: {c.get('message', '')}".lstrip(": ") for c in causes if c.get("message")]
    return "; ".join(texts) or str(status.get("message") or f"HTTP {err.status}")


def with_expression(configuration: dict[str, Any], expression: str) -> dict[str, Any]:
    """The release's MutatingWebhookConfiguration with ``expression`` as every webhook's matchCondition,
    for a server-side dry-run update (the hooks may update that one object by name, and create none)."""
    webhooks = [{**w, "matchConditions": [{"name": "values", "expression": expression}]} for w in configuration.get("webhooks") or []]
    return {**configuration, "webhooks": webhooks}


def _raw(call: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Call a client method and return the API server's JSON as is (no model deserialisation)."""
    resp = call(*args, _preload_content=False, **kwargs)
    out = json.loads(resp.data)
    assert isinstance(out, dict)
    return out


# --- adapters: the cluster -------------------------------------------------------------------


def gather(
    api: client.ApiClient,
    values: V.Values,
    *,
    namespace: str,
    release: str,
    pvc_name: str | None,
    store_hosts: Iterable[str],
    insecure: set[str],
    credentials: tuple[str, str] | None,
    webhook_configuration: str = "",
) -> C.Facts:
    """Read every fact the checks need; a fact that cannot be read is recorded, not fatal.

    Raises ApiException/urllib3 errors only when the API server cannot be reached at all.
    """
    unavailable: list[str] = []
    version_info = client.VersionApi(api).get_code()  # the reachability probe: let it raise
    version: tuple[int, int] | None = None
    try:
        version = parse_version(version_info.major, version_info.minor)
    except (TypeError, ValueError):
        unavailable.append(
            f"cannot tell the Kubernetes version (major {version_info.major!r}, minor {version_info.minor!r}): not checked"
        )
    core, storage = client.CoreV1Api(api), client.StorageV1Api(api)
    nodes: tuple[C.Node, ...] | None = None
    classes: tuple[C.StorageClass, ...] | None = None
    volume: C.Volume | None = None
    match_error: str | None = None

    if values.any_ha:
        key, _, want = values.system_pool_label.partition("=")
        selector = f"{key}={want}" if want else key
        try:
            items = _raw(core.list_node, label_selector=selector).get("items", [])
            nodes = tuple(node_fact(n) for n in items)
        except ApiException as err:
            unavailable.append(f"cannot list nodes ({api_error_message(err)}): HA node count not checked")
    if values.enable_cluster_registry:
        try:
            items = _raw(storage.list_storage_class).get("items", [])
            classes = tuple(storage_class_fact(s) for s in items)
        except ApiException as err:
            unavailable.append(f"cannot list storage classes ({api_error_message(err)}): storage not checked")
        try:
            if values.uses_volume:
                claim = values.existing_claim or pvc_name
                volume = _find_volume(api, core, namespace, release, claim)
                if volume is None and values.existing_claim and namespace:
                    volume = C.Volume(values.existing_claim, "", "", exists=False)
        except ApiException as err:
            unavailable.append(
                f"cannot read the registry volume ({api_error_message(err)}): storage changes not checked"
            )
        if values.match_condition_expression and webhook_configuration:
            admission = client.AdmissionregistrationV1Api(api)
            try:
                current = _raw(admission.read_mutating_webhook_configuration, webhook_configuration)
                body = with_expression(current, values.match_condition_expression)
                admission.replace_mutating_webhook_configuration(webhook_configuration, body, dry_run="All")  # type: ignore[arg-type]
            except ApiException as err:
                if err.status in (400, 422):
                    match_error = api_error_message(err)
                elif err.status == 404:  # a first install: the API server checks it when helm creates it
                    unavailable.append("no webhook configuration yet (first install): expression checked when it is created")
                else:
                    unavailable.append(
                        f"cannot dry-run the match condition ({api_error_message(err)}): expression not checked"
                    )
    sideload_claim: bool | None = None
    if values.enable_local_registry and values.local_source == "persistentVolumeClaim" and values.local_claim and namespace:
        try:
            core.read_namespaced_persistent_volume_claim(values.local_claim, namespace, _preload_content=False)
            sideload_claim = True
        except ApiException as err:
            if err.status == 404:
                sideload_claim = False
            else:
                unavailable.append(f"cannot read the side-loading claim ({api_error_message(err)}): not checked")
    probes = tuple(probe_store(h, h in insecure, credentials) for h in sorted(set(store_hosts)))
    return C.Facts(
        kubernetes_version=version,
        nodes=nodes,
        storage_classes=classes,
        volume=volume,
        match_condition_error=match_error,
        store_probes=probes,
        sideload_claim_exists=sideload_claim,
        unavailable=tuple(unavailable),
    )


def _find_volume(
    api: client.ApiClient, core: client.CoreV1Api, namespace: str, release: str, pvc_name: str | None
) -> C.Volume | None:
    if not namespace:
        return None
    if pvc_name:
        try:
            return volume_fact(_raw(core.read_namespaced_persistent_volume_claim, pvc_name, namespace))
        except ApiException as err:
            if err.status == 404:
                return None
            raise
    if not release:
        return None
    items = _raw(
        core.list_namespaced_persistent_volume_claim, namespace, label_selector=f"app.kubernetes.io/instance={release}"
    ).get("items", [])
    registry = [p for p in items if (p["metadata"].get("labels") or {}).get("app.kubernetes.io/component") == "registry"]
    chosen = registry or items
    return volume_fact(chosen[0]) if len(chosen) == 1 else None


def probe_store(host: str, insecure: bool, credentials: tuple[str, str] | None, timeout: float = 5.0) -> C.StoreProbe:
    """Is ``host``'s ``/v2/`` reachable, and (when credentials are given) do they work? Never raises."""
    api_host = "registry-1.docker.io" if host == "docker.io" else host
    url = f"{'http' if insecure else 'https'}://{api_host}/v2/"
    try:
        _http_get(url, None, timeout)
        return C.StoreProbe(host, True)
    except urllib.error.HTTPError as err:
        if err.code != 401:
            return C.StoreProbe(host, False, f"GET {url} answered HTTP {err.code}")
        challenge = err.headers.get("WWW-Authenticate", "")
    except (urllib.error.URLError, OSError, ssl.SSLError) as err:
        reason = getattr(err, "reason", err)
        return C.StoreProbe(host, False, f"unreachable ({reason})")
    if credentials is None:
        return C.StoreProbe(host, True)  # reachable; anonymous pulls may still be allowed per repository
    basic = "Basic " + base64.b64encode(f"{credentials[0]}:{credentials[1]}".encode()).decode()
    try:
        if challenge.lower().startswith("bearer"):
            params = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
            realm = params.get("realm", "")
            query = urllib.parse.urlencode({k: v for k, v in params.items() if k == "service"})
            _http_get(f"{realm}?{query}" if query else realm, basic, timeout)
        else:
            _http_get(url, basic, timeout)
        return C.StoreProbe(host, True)
    except urllib.error.HTTPError as err:
        return C.StoreProbe(host, False, f"the credentials were rejected (HTTP {err.code})")
    except (urllib.error.URLError, OSError, ssl.SSLError) as err:
        return C.StoreProbe(host, False, f"token service unreachable ({getattr(err, 'reason', err)})")


def _http_get(url: str, authorization: str | None, timeout: float) -> None:
    request = urllib.request.Request(url, headers={"Authorization": authorization} if authorization else {})
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 (http(s) only)
        response.read(1024)


def check_schema(chart_dir: str, document: Any, schema_only: bool) -> None:
    """Exit 1 with helm's messages when ``document`` over the chart's defaults breaks its schema."""
    try:
        chart = S.load_chart(chart_dir)
    except ConfigError as err:
        raise click.UsageError(err.message) from None
    if not isinstance(document, dict):
        raise click.UsageError("the values file must hold a mapping")
    lines = S.errors(S.coalesce(chart.defaults, document), chart.schema)
    if lines:
        click.echo(S.report(chart.name, lines))
        sys.exit(EXIT_PROBLEMS)
    if schema_only:
        click.echo(f"validate: the values meet the schema of chart {chart.name}")
        sys.exit(EXIT_OK)


def store_hosts_of(values: V.Values, extra: Iterable[str]) -> list[str]:
    hosts = set(extra)
    for image in values.early_loading_images:
        try:
            hosts.add(reference.parse(image).host)
        except InvalidReferenceError:
            pass  # reported by the early-loading-images check
    return sorted(hosts)


# --- output ----------------------------------------------------------------------------------


def render_text(problems: list[C.Problem]) -> str:
    errors = sum(p.severity == C.Severity.ERROR for p in problems)
    lines = [p.render() for p in problems]
    verdict = "refusing this configuration" if errors else "configuration accepted"
    lines.append(f"validate: {errors} problem(s), {len(problems) - errors} warning(s): {verdict}")
    return "\n".join(lines)


def render_json(problems: list[C.Problem]) -> str:
    return json.dumps(
        {
            "ok": C.exit_code(problems) == 0,
            "problems": [
                {"check": p.check, "severity": p.severity.value, "message": p.message, "value": V.PREFIX + p.value if p.value else ""}
                for p in problems
            ],
        }
    )


def plan(values: V.Values) -> str:
    """What ``--dry-run`` prints: every check, and whether it would run or be skipped."""
    lines = [
        "would check [values] types, the GC cadence as a cron schedule, earlyLoading.images as image references "
        "(values only; value combinations are the chart's _validate.tpl)"
    ]
    for check in C.CHECKS:
        where = "reads the cluster" if check.needs_cluster else "values only"
        lines.append(f"would check [{check.id}] {check.description} ({where})")
    if not values.enable_cluster_registry:
        lines.append("note: enableClusterRegistry is false: storage, webhook and version checks find nothing to check")
    return "\n".join(lines)


@click.command("validate")
@click.option("--values", "values_file", required=True, type=click.Path(dir_okay=False), help="values (YAML): the rendered tree the chart mounts, or a values file to check with --chart")
@click.option("--release", default="", envvar="HELM_RELEASE", help="the Helm release name")
@click.option("--namespace", default="", envvar="POD_NAMESPACE", help="the release namespace")
@click.option("--kubeconfig", default=None, type=click.Path(dir_okay=False))
@click.option("--pvc-name", default=None, help="the registry's PVC (default: found by the release's labels)")
@click.option("--webhook-configuration", default="", help="the release's MutatingWebhookConfiguration: a dry-run update of it checks matchConditionExpression")
@click.option("--system-pool-label", default=None, help=f"KEY=VALUE of system-pool nodes (default: the value {V.K_SYSTEM_POOL_LABEL}, else {V.DEFAULT_SYSTEM_POOL_LABEL})")
@click.option("--artifact-store", "stores", multiple=True, help="artifact store HOST[:PORT] to probe (repeatable; earlyLoading hosts are added)")
@click.option("--insecure-registry", "insecure", multiple=True, help="HOST[:PORT] to probe over plain HTTP")
@click.option("--credentials-file", default=None, type=click.Path(dir_okay=False), help="YAML {username, password} for the artifact store")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.option("--termination-log", default=None, type=click.Path(dir_okay=False), help="also write the report here (a pod's terminationMessagePath)")
@click.option("--dry-run", is_flag=True, help="print the checks that would run, read nothing from the cluster")
@click.option("--chart", "chart_dir", default=None, type=click.Path(file_okay=False, exists=True),
              help="first check --values (over the chart's defaults) against this chart's values.schema.json, as helm would")  # fmt: skip
@click.option("--schema-only", is_flag=True, help="with --chart: stop after the schema check (no cluster needed: CI, GitOps repositories)")
def validate(
    values_file: str,
    release: str,
    namespace: str,
    kubeconfig: str | None,
    pvc_name: str | None,
    webhook_configuration: str,
    system_pool_label: str | None,
    stores: tuple[str, ...],
    insecure: tuple[str, ...],
    credentials_file: str | None,
    fmt: str,
    termination_log: str | None,
    dry_run: bool,
    chart_dir: str | None,
    schema_only: bool,
) -> None:
    """Refuse a bad configuration before install/upgrade. Exit 0 ok, 1 problems found, 2 usage/internal error."""
    try:
        document = yaml.safe_load(Path(values_file).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        click.echo(f"validate: cannot read values file {values_file}: {err}", err=True)
        sys.exit(EXIT_USAGE)
    if schema_only and not chart_dir:
        raise click.UsageError("--schema-only needs --chart")
    if chart_dir:
        check_schema(chart_dir, document, schema_only)
    values, value_problems = V.load(document)
    namespace = namespace or kube.pod_namespace()
    if system_pool_label:
        values = V.Values(**{**values.__dict__, "system_pool_label": system_pool_label})
    if dry_run:
        click.echo(plan(values))
        sys.exit(EXIT_OK)
    try:
        creds = read_credentials_file(credentials_file) if credentials_file else None
    except ConfigError as err:
        raise click.UsageError(err.message) from None
    credentials = (creds.username, creds.password) if creds else None
    try:
        api = kube.api_client(kubeconfig)
        facts = gather(
            api,
            values,
            namespace=namespace,
            release=release,
            pvc_name=pvc_name,
            webhook_configuration=webhook_configuration,
            store_hosts=store_hosts_of(values, stores) if values.enable_cluster_registry else stores,
            insecure=set(insecure),
            credentials=credentials,
        )
    except click.ClickException:
        raise
    except Exception as err:  # noqa: BLE001 (the API server unreachable or the client misconfigured)
        log.debug("gathering facts failed", exc_info=True)
        click.echo(f"validate: cannot read the cluster: {err}", err=True)
        sys.exit(EXIT_USAGE)
    problems = C.run(values, facts, value_problems)
    report = render_json(problems) if fmt == "json" else render_text(problems)
    click.echo(report)
    if termination_log:
        try:
            Path(termination_log).write_text(report[-4000:])
        except OSError as err:
            log.warning("cannot write the termination log %s: %s", termination_log, err)
    sys.exit(C.exit_code(problems))
