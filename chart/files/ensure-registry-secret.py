"""Create the registry Secret once: `http-secret` (distribution's shared http.secret) and
`credentials.yaml` (the {username, password} the reconcilers push with and the gate accepts).

Run by the chart's pre-install/pre-upgrade hook Job with the project's image (it has the kubernetes
client). An existing Secret is never touched, so upgrades, re-runs and GitOps syncs keep the same
values; nothing random is ever rendered into a manifest.

Usage: python ensure-registry-secret.py NAME LABELS_JSON   (namespace from $POD_NAMESPACE)
"""

from __future__ import annotations

import json
import os
import secrets
import sys

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException


def main(argv: list[str]) -> int:
    name, labels = argv[1], json.loads(argv[2])
    namespace = os.environ["POD_NAMESPACE"]
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    core = client.CoreV1Api()
    try:
        core.read_namespaced_secret(name, namespace)
        created = False
    except ApiException as err:
        if err.status != 404:
            raise
        body = client.V1Secret(
            metadata=client.V1ObjectMeta(name=name, namespace=namespace, labels=labels),
            type="Opaque",
            string_data={
                "http-secret": secrets.token_hex(32),
                "credentials.yaml": json.dumps({"username": "cluster-registry", "password": secrets.token_urlsafe(32)}) + "\n",
            },
        )
        try:
            core.create_namespaced_secret(namespace, body)
            created = True
        except ApiException as race:
            if race.status != 409:  # created meanwhile by a concurrent run: keep theirs
                raise
            created = False
    print(json.dumps({"secret": f"{namespace}/{name}", "created": created}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
