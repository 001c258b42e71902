"""``cluster-registry certs``: create or renew the webhook's TLS Secret and patch the caBundle, and
the registry's serving certificate from the same CA.

The Secret (type ``kubernetes.io/tls``) holds ``ca.crt``, ``tls.crt``, ``tls.key`` and the CA's key
``ca.key`` (needed to renew with the same CA; mount only ``tls.crt``/``tls.key`` into the webhook).
The registry's Secret (``--registry-secret``) holds its ``tls.crt``/``tls.key`` and the CA bundle its
clients trust as ``ca.crt``, never the CA's key. distribution 3.0 reads its certificate once, at
start: when the registry's certificate changes, the registry Deployment is restarted (a rolling
restart, one pod at a time within its PDB; distribution drains in-flight requests on SIGTERM).
Parallel runs agree: the Secret is created with create (409: someone else won, read theirs) and
replaced with its resourceVersion (409: read again and decide again).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import click

from cluster_registry.certs import pki
from cluster_registry.errors import ConfigError, TemporaryError

log = logging.getLogger(__name__)


def _decode(secret: Any) -> dict[str, bytes]:
    return {k: base64.b64decode(v) for k, v in (secret.data or {}).items()}


def _encode(data: dict[str, bytes]) -> dict[str, bytes | str]:
    return {k: base64.b64encode(v).decode() for k, v in sorted(data.items())}


def ca_bundle_patch(mwc: dict[str, Any], service: str, namespace: str, bundle_b64: str) -> list[dict[str, Any]]:
    """JSON Patch ops setting caBundle on the webhooks that call ``service`` (pure).

    URL-mode webhooks (no ``clientConfig.service``) and webhooks of other services are left alone;
    each op is guarded by a ``test`` of the webhook's name so a concurrent reorder cannot misplace it.
    """
    ops: list[dict[str, Any]] = []
    for i, hook in enumerate(mwc.get("webhooks") or []):
        client_config = hook.get("clientConfig") or {}
        svc = client_config.get("service")
        if not svc or svc.get("name") != service or svc.get("namespace") != namespace:
            continue
        if client_config.get("caBundle") == bundle_b64:
            continue
        ops.append({"op": "test", "path": f"/webhooks/{i}/name", "value": hook["name"]})
        ops.append({"op": "add", "path": f"/webhooks/{i}/clientConfig/caBundle", "value": bundle_b64})
    return ops


@dataclass(frozen=True)
class Registry:
    """The registry's serving certificate: its Secret, its Service (the names), its Deployment."""

    secret: str
    service: str
    deployment: str = ""  # restarted when the certificate changes ("": nothing to restart)


def _settle(
    core: Any,
    namespace: str,
    secret_name: str,
    component: str,
    decide: Callable[[dict[str, bytes] | None], pki.Decision],
    dry_run: bool,
    before_write: Callable[[pki.Decision], None] = lambda _d: None,
) -> pki.Decision:
    """Read the Secret, ``decide``, write the decision unless KEEP (or a dry run); a concurrent
    change (409) is read and decided again."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    for _attempt in range(5):
        try:
            current = core.read_namespaced_secret(secret_name, namespace)
            existing: dict[str, bytes] | None = _decode(current)
        except ApiException as err:
            if err.status != 404:
                raise
            current, existing = None, None
        decision = decide(existing)
        if decision.action is pki.Action.KEEP or dry_run:
            return decision
        labels = {"app.kubernetes.io/managed-by": "cluster-registry", "app.kubernetes.io/component": component}
        meta = client.V1ObjectMeta(name=secret_name, namespace=namespace, labels=labels)
        body = client.V1Secret(metadata=meta, type="kubernetes.io/tls", data=_encode(decision.data))
        before_write(decision)
        try:
            if current is None:
                core.create_namespaced_secret(namespace, body)
            else:
                meta.resource_version = current.metadata.resource_version
                meta.labels = {**(current.metadata.labels or {}), **labels}
                meta.annotations = current.metadata.annotations
                core.replace_namespaced_secret(secret_name, namespace, body)
            log.info("%s TLS Secret %s: %s", component, secret_name, decision.reason, extra={"action": decision.action.value})
            return decision
        except ApiException as err:
            if err.status != 409:
                raise
            log.info("%s TLS Secret changed concurrently; deciding again", component)
    raise TemporaryError(f"Secret {namespace}/{secret_name} kept changing; try again")


def run(
    core: Any,
    admission: Any,
    namespace: str,
    secret_name: str,
    service: str,
    webhook_configuration: str,
    renew_before: dt.timedelta,
    dry_run: bool,
    now: dt.datetime,
    validity: dt.timedelta = pki.SERVING_VALIDITY,
    registry: Registry | None = None,
    apps: Any = None,
) -> dict[str, Any]:
    """Do the work against the API (blocking) and return the report."""
    names = pki.service_names(service, namespace)
    report: dict[str, Any] = {"secret": f"{namespace}/{secret_name}", "dryRun": dry_run}

    def publish_first(decision: pki.Decision) -> None:
        if decision.action is pki.Action.REGENERATE:
            # both CAs are trusted before the Secret (and so the served certificate) changes
            publish_bundle(admission, webhook_configuration, service, namespace, pki.bundle(decision.data), dry_run)

    decision = _settle(core, namespace, secret_name, "webhook",
                       lambda existing: pki.plan(existing, names, now, renew_before, validity), dry_run, publish_first)
    report.update(action=decision.action.value, reason=decision.reason)
    report["notAfter"] = pki.not_after(decision.data[pki.TLS_CERT]).isoformat()
    report.update(publish_bundle(admission, webhook_configuration, service, namespace, pki.bundle(decision.data), dry_run))
    if registry is not None:
        report["registry"] = issue_registry(core, apps, namespace, registry, decision.data, renew_before, dry_run, now, validity)
    return report


def issue_registry(
    core: Any, apps: Any, namespace: str, registry: Registry, ca: dict[str, bytes], renew_before: dt.timedelta,
    dry_run: bool, now: dt.datetime, validity: dt.timedelta,
) -> dict[str, Any]:
    """Create or renew the registry's serving certificate from the CA in ``ca``; restart the registry
    when the certificate it serves changed (distribution reads it only at start)."""
    from kubernetes.client.exceptions import ApiException

    names = pki.service_names(registry.service, namespace, short=True)
    decision = _settle(core, namespace, registry.secret, "registry",
                       lambda existing: pki.issued(existing, ca, names, now, renew_before, validity), dry_run)
    report: dict[str, Any] = {"secret": f"{namespace}/{registry.secret}", "action": decision.action.value,
                              "reason": decision.reason, "restarted": False}
    report["notAfter"] = pki.not_after(decision.data[pki.TLS_CERT]).isoformat()
    if decision.action is pki.Action.RENEW and registry.deployment and not dry_run:
        # The fingerprint as the restart trigger: a re-run for the same certificate changes nothing.
        stamp = pki.fingerprint(decision.data[pki.TLS_CERT])
        patch = {"spec": {"template": {"metadata": {"annotations": {RESTART_ANNOTATION: stamp}}}}}
        try:
            apps.patch_namespaced_deployment(registry.deployment, namespace, patch)
            report["restarted"] = True
        except ApiException as err:
            if err.status != 404:  # before the first install's Deployment exists: nothing serves yet
                raise
    return report


RESTART_ANNOTATION = "clusterregistry.io/serving-certificate"


def publish_bundle(
    admission: Any, webhook_configuration: str, service: str, namespace: str, bundle: bytes, dry_run: bool
) -> dict[str, Any]:
    """Set ``bundle`` as the caBundle of the configuration's webhooks that call ``service``."""
    from kubernetes.client.exceptions import ApiException

    try:
        mwc = admission.read_mutating_webhook_configuration(webhook_configuration)
    except ApiException as err:
        if err.status != 404:
            raise
        log.warning("MutatingWebhookConfiguration %s not found; caBundle not patched", webhook_configuration)
        return {"caBundlePatched": 0, "webhookConfiguration": "absent"}
    raw = admission.api_client.sanitize_for_serialization(mwc)
    ops = ca_bundle_patch(raw, service, namespace, base64.b64encode(bundle).decode())
    if ops and not dry_run:
        admission.patch_mutating_webhook_configuration(
            webhook_configuration, ops, _content_type="application/json-patch+json"
        )
    return {"caBundlePatched": len(ops) // 2}


@click.command()
@click.option("--secret", "secret_name", required=True, help="The TLS Secret to create or renew.")
@click.option("--service", required=True, help="The webhook's Service (the certificate's DNS names).")
@click.option("--webhook-configuration", required=True, help="The MutatingWebhookConfiguration to patch.")
@click.option("--renew-before", default="720h", show_default=True, help="Renew when expiring within this.")
@click.option("--validity", default="8760h", show_default=True, help="Lifetime of a new serving certificate.")
@click.option("--namespace", envvar=["CLUSTER_REGISTRY_CERTS_NAMESPACE", "POD_NAMESPACE"], default="", help="Release namespace.")
@click.option("--kubeconfig", type=click.Path(dir_okay=False), help="Default: in-cluster, then $KUBECONFIG.")
@click.option("--registry-secret", default="", help="Also issue the registry's serving certificate into this Secret.")
@click.option("--registry-service", default="", help="The registry's Service (the certificate's DNS names).")
@click.option("--registry-deployment", default="", help="The registry's Deployment, restarted when its certificate changes.")
@click.option("--dry-run", is_flag=True, help="Print what would be done; change nothing.")
def certs(
    secret_name: str,
    service: str,
    webhook_configuration: str,
    renew_before: str,
    validity: str,
    namespace: str,
    kubeconfig: str | None,
    registry_secret: str,
    registry_service: str,
    registry_deployment: str,
    dry_run: bool,
) -> None:
    """Create or renew the webhook's TLS Secret and patch the caBundle into its configuration."""
    from kubernetes import client

    from cluster_registry.kube import api_client, pod_namespace

    namespace = namespace or pod_namespace()
    if not namespace:
        raise click.UsageError("--namespace is required outside a pod")
    try:
        before = pki.parse_duration(renew_before)
        lifetime = pki.parse_duration(validity)
        if before >= lifetime:
            raise ConfigError(f"--renew-before ({renew_before}) must be shorter than --validity ({validity})")
    except ConfigError as err:
        raise click.BadParameter(str(err), param_hint="--renew-before/--validity") from err
    if bool(registry_secret) != bool(registry_service):
        raise click.UsageError("--registry-secret and --registry-service go together")
    registry = Registry(registry_secret, registry_service, registry_deployment) if registry_secret else None
    api = api_client(kubeconfig)
    report = run(
        client.CoreV1Api(api),
        client.AdmissionregistrationV1Api(api),
        namespace,
        secret_name,
        service,
        webhook_configuration,
        before,
        dry_run,
        dt.datetime.now(dt.timezone.utc),
        lifetime,
        registry,
        client.AppsV1Api(api),
    )
    if dry_run:
        click.echo(f"would {'leave' if report['action'] == 'unchanged' else 'make'} Secret {report['secret']} "
                   f"{report['action']} ({report['reason']}) and patch caBundle in {report['caBundlePatched']} webhook(s)")
    click.echo(json.dumps(report, sort_keys=True))
