"""``cluster-registry certs``: create or renew the webhook's TLS Secret and patch the caBundle.

The Secret (type ``kubernetes.io/tls``) holds ``ca.crt``, ``tls.crt``, ``tls.key`` and the CA's key
``ca.key`` (needed to renew with the same CA; mount only ``tls.crt``/``tls.key`` into the webhook).
Parallel runs agree: the Secret is created with create (409: someone else won, read theirs) and
replaced with its resourceVersion (409: read again and decide again).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
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
) -> dict[str, Any]:
    """Do the work against the API (blocking) and return the report."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    names = pki.service_names(service, namespace)
    report: dict[str, Any] = {"secret": f"{namespace}/{secret_name}", "dryRun": dry_run}
    for _attempt in range(5):
        try:
            current = core.read_namespaced_secret(secret_name, namespace)
            existing: dict[str, bytes] | None = _decode(current)
        except ApiException as err:
            if err.status != 404:
                raise
            current, existing = None, None
        decision = pki.plan(existing, names, now, renew_before, validity)
        report.update(action=decision.action.value, reason=decision.reason)
        if decision.action is pki.Action.KEEP or dry_run:
            break
        labels = {"app.kubernetes.io/managed-by": "cluster-registry", "app.kubernetes.io/component": "webhook"}
        meta = client.V1ObjectMeta(name=secret_name, namespace=namespace, labels=labels)
        body = client.V1Secret(metadata=meta, type="kubernetes.io/tls", data=_encode(decision.data))
        if decision.action is pki.Action.REGENERATE:
            # both CAs are trusted before the Secret (and so the served certificate) changes
            publish_bundle(admission, webhook_configuration, service, namespace, pki.bundle(decision.data), dry_run)
        try:
            if current is None:
                core.create_namespaced_secret(namespace, body)
            else:
                meta.resource_version = current.metadata.resource_version
                meta.labels = {**(current.metadata.labels or {}), **labels}
                meta.annotations = current.metadata.annotations
                core.replace_namespaced_secret(secret_name, namespace, body)
            log.info("webhook TLS Secret %s: %s", secret_name, decision.reason, extra={"action": decision.action.value})
            break
        except ApiException as err:
            if err.status != 409:
                raise
            log.info("webhook TLS Secret changed concurrently; deciding again")
    else:
        raise TemporaryError(f"Secret {namespace}/{secret_name} kept changing; try again")
    report["notAfter"] = pki.not_after(decision.data[pki.TLS_CERT]).isoformat()
    report.update(publish_bundle(admission, webhook_configuration, service, namespace, pki.bundle(decision.data), dry_run))
    return report


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
@click.option("--dry-run", is_flag=True, help="Print what would be done; change nothing.")
def certs(
    secret_name: str,
    service: str,
    webhook_configuration: str,
    renew_before: str,
    validity: str,
    namespace: str,
    kubeconfig: str | None,
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
    )
    if dry_run:
        click.echo(f"would {'leave' if report['action'] == 'unchanged' else 'make'} Secret {report['secret']} "
                   f"{report['action']} ({report['reason']}) and patch caBundle in {report['caBundlePatched']} webhook(s)")
    click.echo(json.dumps(report, sort_keys=True))
