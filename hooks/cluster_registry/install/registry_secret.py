"""``cluster-registry registry-secret [NAME]``: create the registry's Secrets once (pre-install/pre-upgrade hook).

- NAME (the registry Secret, unless the operator brings one): ``http-secret`` (distribution's shared
  http.secret) and ``credentials.yaml`` (a legacy ``{username, password}``, kept for old readers).
- ``--token-secret``: the token service's signing key (``key.pem``, EC P-256) and the public keys
  distribution trusts (``jwks.json``). Rotate by adding the new public key to ``jwks.json``, rolling
  the registry, then replacing ``key.pem`` (docs/security.md).
- ``--push-secret COMPONENT=NAME`` (repeatable): a component's own push credential
  (``credentials.yaml``: ``{username: COMPONENT, password}``), mounted only into that component;
  the token service reads it by name every few seconds, so a new password needs no restart.

An existing Secret is never touched, so upgrades, re-runs and GitOps syncs keep the same values;
nothing random is ever rendered into a manifest. Prints one JSON line:
``{"secrets": {"NS/NAME": created, ...}}``.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Mapping
from typing import Any

import click
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from cluster_registry import kube
from cluster_registry.gate import access, tokens

USERNAME = "cluster-registry"

Data = Callable[[], dict[str, str]]


def credentials_yaml(username: str, password: str) -> str:
    return json.dumps({"username": username, "password": password}) + "\n"


def registry_data() -> dict[str, str]:
    return {"http-secret": secrets.token_hex(32), "credentials.yaml": credentials_yaml(USERNAME, secrets.token_urlsafe(32))}


def token_data() -> dict[str, str]:
    pem = tokens.new_private_key_pem()
    return {"key.pem": pem.decode(), "jwks.json": tokens.jwks(tokens.load_signer(pem, "", "").key.public_key())}


def push_data(component: str) -> Data:
    return lambda: {"credentials.yaml": credentials_yaml(component, secrets.token_urlsafe(32))}


def ensure(core: Any, name: str, namespace: str, labels: Mapping[str, str], data: Data = registry_data) -> bool:
    """Create the Secret with fresh ``data()`` unless it exists; True when this call created it."""
    try:
        core.read_namespaced_secret(name, namespace)
        return False
    except ApiException as err:
        if err.status != 404:
            raise
    body = client.V1Secret(
        metadata=client.V1ObjectMeta(name=name, namespace=namespace, labels=dict(labels)), type="Opaque", string_data=data()
    )
    try:
        core.create_namespaced_secret(namespace, body)
    except ApiException as race:
        if race.status != 409:  # created meanwhile by a concurrent run: keep theirs
            raise
        return False
    return True


@click.command("registry-secret")
@click.argument("name", default="")
@click.option("--token-secret", default="", help="the token service's signing-key Secret")
@click.option("--push-secret", "push_secrets", multiple=True, help="COMPONENT=NAME: a component's push credential Secret")
@click.option("--labels", "labels_json", default="{}", help="the Secrets' labels, a JSON object")
@click.option("--namespace", default="", help="the Secrets' namespace (default: the pod's)")
@click.option("--kubeconfig", default=None, type=click.Path(dir_okay=False))
def registry_secret(name: str, token_secret: str, push_secrets: tuple[str, ...], labels_json: str, namespace: str,
                    kubeconfig: str | None) -> None:  # fmt: skip
    """Create the registry's Secrets once (NAME: http.secret; the token key; each pusher's credential)."""
    try:
        labels = json.loads(labels_json)
    except ValueError as err:
        raise click.BadParameter(f"not JSON: {err}", param_hint="--labels") from None
    if not isinstance(labels, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise click.BadParameter("must be a JSON object of strings", param_hint="--labels")
    wanted: list[tuple[str, Data]] = [(name, registry_data)] if name else []
    if token_secret:
        wanted.append((token_secret, token_data))
    for item in push_secrets:
        component, sep, secret = item.partition("=")
        if not sep or component not in access.PUSHERS or not secret:
            raise click.BadParameter(f"expected COMPONENT=NAME with COMPONENT one of {sorted(access.PUSHERS)}",
                                     param_hint="--push-secret")  # fmt: skip
        wanted.append((secret, push_data(component)))
    namespace = namespace or kube.pod_namespace()
    if not namespace:
        raise click.UsageError("--namespace is required outside a pod")
    core = client.CoreV1Api(kube.api_client(kubeconfig))
    created = {f"{namespace}/{n}": ensure(core, n, namespace, labels, data) for n, data in wanted}
    click.echo(json.dumps({"secrets": created}))
