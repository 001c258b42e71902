"""``cluster-registry registry-secret NAME``: create the registry Secret once (pre-install/pre-upgrade hook).

The Secret holds ``http-secret`` (distribution's shared http.secret) and ``credentials.yaml`` (the
``{username, password}`` the reconcilers push with and the gate accepts). An existing Secret is never
touched, so upgrades, re-runs and GitOps syncs keep the same values; nothing random is ever rendered
into a manifest. Prints one JSON line: ``{"secret": "NS/NAME", "created": true|false}``.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping
from typing import Any

import click
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from cluster_registry import kube

USERNAME = "cluster-registry"


def secret_body(name: str, namespace: str, labels: Mapping[str, str], http_secret: str, password: str) -> client.V1Secret:
    """The Secret with freshly made values (passed in: the caller draws them)."""
    return client.V1Secret(
        metadata=client.V1ObjectMeta(name=name, namespace=namespace, labels=dict(labels)),
        type="Opaque",
        string_data={
            "http-secret": http_secret,
            "credentials.yaml": json.dumps({"username": USERNAME, "password": password}) + "\n",
        },
    )


def ensure(core: Any, name: str, namespace: str, labels: Mapping[str, str]) -> bool:
    """Create the Secret unless it exists; True when this call created it."""
    try:
        core.read_namespaced_secret(name, namespace)
        return False
    except ApiException as err:
        if err.status != 404:
            raise
    body = secret_body(name, namespace, labels, secrets.token_hex(32), secrets.token_urlsafe(32))
    try:
        core.create_namespaced_secret(namespace, body)
    except ApiException as race:
        if race.status != 409:  # created meanwhile by a concurrent run: keep theirs
            raise
        return False
    return True


@click.command("registry-secret")
@click.argument("name")
@click.option("--labels", "labels_json", default="{}", help="the Secret's labels, a JSON object")
@click.option("--namespace", default="", help="the Secret's namespace (default: the pod's)")
@click.option("--kubeconfig", default=None, type=click.Path(dir_okay=False))
def registry_secret(name: str, labels_json: str, namespace: str, kubeconfig: str | None) -> None:
    """Create the registry Secret NAME once (http.secret and push credentials); an existing one is kept."""
    try:
        labels = json.loads(labels_json)
    except ValueError as err:
        raise click.BadParameter(f"not JSON: {err}", param_hint="--labels") from None
    if not isinstance(labels, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise click.BadParameter("must be a JSON object of strings", param_hint="--labels")
    namespace = namespace or kube.pod_namespace()
    if not namespace:
        raise click.UsageError("--namespace is required outside a pod")
    created = ensure(client.CoreV1Api(kube.api_client(kubeconfig)), name, namespace, labels)
    click.echo(json.dumps({"secret": f"{namespace}/{name}", "created": created}))
