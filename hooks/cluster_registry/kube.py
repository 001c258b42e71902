"""Kubernetes client configuration (in-cluster first, then a kubeconfig) and the pod's own namespace."""

from __future__ import annotations

import os
from pathlib import Path

from kubernetes import client, config

SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def api_client(kubeconfig: str | None = None) -> client.ApiClient:
    """An ApiClient for the pod's service account, or for ``kubeconfig`` / $KUBECONFIG when given."""
    path = kubeconfig or os.environ.get("KUBECONFIG")
    if not path and os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config()  # type: ignore[no-untyped-call]
        return client.ApiClient()
    cfg = client.Configuration()
    config.load_kube_config(config_file=path, client_configuration=cfg)  # type: ignore[no-untyped-call]
    return client.ApiClient(cfg)


def pod_namespace(default: str = "") -> str:
    """The namespace this pod runs in: $POD_NAMESPACE (downward API), else the service account's, else ``default``."""
    if namespace := os.environ.get("POD_NAMESPACE"):
        return namespace
    try:
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip() or default
    except OSError:
        return default
