"""Distribution on real object storage: the S3 (moto) and Azure blob (Azurite) servers of
``ci/objectstores``, a fresh bucket or container per test, and registry replicas running the chart's
own rendering of distribution's config (``registry/_config.tpl``) with the keys in the environment,
as the chart's pods get them."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.support.registry import free_port, registry_binary

ROOT = Path(__file__).resolve().parents[2]
BACKENDS = ("s3", "azure")


def servers() -> dict[str, str]:
    """Start the servers if they are not running (idempotent) and return their endpoints and keys."""
    subprocess.run([str(ROOT / "ci/objectstores"), "start"], check=True, capture_output=True)
    env = (ROOT / ".cache/objectstores/env").read_text().splitlines()
    return dict(line.split("=", 1) for line in env if "=" in line)


@dataclass
class Store:
    """A fresh bucket (s3) or container (azure), the chart values that name it, and the keys."""

    backend: str
    name: str
    values: dict[str, Any]
    env: dict[str, str]  # REGISTRY_STORAGE_* as the chart's storageEnv passes them
    endpoint: str


def create(backend: str, endpoint_host: str | None = None) -> Store:
    """A new empty store. ``endpoint_host`` replaces 127.0.0.1 in the endpoint the values name (how
    pods reach the host's server through a forward-annotated Service)."""
    srv = servers()
    name = f"registry-{secrets.token_hex(4)}"
    if backend == "s3":
        import boto3

        boto3.client("s3", endpoint_url=srv["S3_ENDPOINT"], region_name=srv["S3_REGION"],
                     aws_access_key_id=srv["S3_ACCESS_KEY"], aws_secret_access_key=srv["S3_SECRET_KEY"]
                     ).create_bucket(Bucket=name)  # fmt: skip
        endpoint = srv["S3_ENDPOINT"]
        storage = {"driver": "s3", "s3": {"bucket": name, "region": srv["S3_REGION"], "forcePathStyle": True,
                                          "regionEndpoint": _host(endpoint, endpoint_host), "secretName": "registry-s3"}}  # fmt: skip
        env = {"REGISTRY_STORAGE_S3_ACCESSKEY": srv["S3_ACCESS_KEY"], "REGISTRY_STORAGE_S3_SECRETKEY": srv["S3_SECRET_KEY"]}
    elif backend == "azure":
        from azure.storage.blob import BlobServiceClient

        endpoint = srv["AZURE_SERVICE_URL"]
        key = {"account_name": srv["AZURE_ACCOUNT_NAME"], "account_key": srv["AZURE_ACCOUNT_KEY"]}
        with BlobServiceClient(endpoint, credential=key) as svc:
            svc.create_container(name)
        storage = {"driver": "azure", "azure": {"accountName": srv["AZURE_ACCOUNT_NAME"], "container": name,
                                                "serviceURL": _host(endpoint, endpoint_host), "secretName": "registry-azure"}}  # fmt: skip
        env = {"REGISTRY_STORAGE_AZURE_ACCOUNTKEY": srv["AZURE_ACCOUNT_KEY"]}
    else:
        raise ValueError(backend)
    values = {"global": {"networkfunctionextension": {"clusterRegistry": {"storage": storage}}}}
    return Store(backend, name, values, env, endpoint)


@contextlib.contextmanager
def fresh(backend: str, endpoint_host: str | None = None) -> Iterator[Store]:
    """``create``, then ``destroy`` afterwards."""
    store = create(backend, endpoint_host)
    try:
        yield store
    finally:
        destroy(store)


def destroy(store: Store) -> None:
    """Delete the bucket or container and everything in it (both servers hold their data in memory)."""
    srv = servers()
    if store.backend == "s3":
        import boto3

        s3 = boto3.resource("s3", endpoint_url=srv["S3_ENDPOINT"], region_name=srv["S3_REGION"],
                            aws_access_key_id=srv["S3_ACCESS_KEY"], aws_secret_access_key=srv["S3_SECRET_KEY"])  # fmt: skip
        bucket = s3.Bucket(store.name)
        bucket.objects.all().delete()
        for upload in bucket.multipart_uploads.all():
            upload.abort()
        bucket.delete()
    elif store.backend == "azure":
        from azure.storage.blob import BlobServiceClient

        key = {"account_name": srv["AZURE_ACCOUNT_NAME"], "account_key": srv["AZURE_ACCOUNT_KEY"]}
        with BlobServiceClient(srv["AZURE_SERVICE_URL"], credential=key) as svc:
            svc.delete_container(store.name)


def _host(url: str, host: str | None) -> str:
    return url.replace("127.0.0.1", host, 1) if host else url


def chart_config(store: Store, tmp: Path, token_auth: dict[str, str] | None = None) -> Path:
    """distribution's config.yml as the chart renders it for ``store`` (the registry ConfigMap), its
    ``auth.token`` section replaced by ``token_auth`` (a token service on loopback), or dropped."""
    tmp.mkdir(parents=True, exist_ok=True)
    values = tmp / f"{store.backend}-values.yaml"
    values.write_text(yaml.safe_dump(store.values))
    out = subprocess.run([str(ROOT / ".cache/bin/helm"), "template", "objectstore", str(ROOT / "chart"), "-f", str(values),
                          "--show-only", "templates/registry/configmap.yaml"], check=True, capture_output=True, text=True).stdout  # fmt: skip
    rendered = yaml.safe_load(yaml.safe_load(out)["data"]["config.yml"])
    # These replicas test the storage driver, not access: without the token auth section (tested with the
    # token service in test_token_service.py) the harness's clients need no realm, and without the chart's
    # TLS (its certificate is issued in the cluster; tested in test_nodeproxy_tls.py, e2e test_registry_tls.py).
    rendered.pop("auth", None)
    rendered.get("http", {}).pop("tls", None)
    if token_auth:
        rendered["auth"] = {"token": token_auth}
    config = tmp / f"{store.backend}-config.yml"
    config.write_text(yaml.safe_dump(rendered))
    return config


@dataclass
class Replica:
    host: str
    proc: subprocess.Popen[bytes]
    log: Path
    debug: str = ""  # its debug listener (/metrics, /debug/health), as the token service reads it

    @property
    def url(self) -> str:
        return f"http://{self.host}"


@dataclass
class Replicas:
    """Distribution processes sharing one store and one http secret (uploads move between them)."""

    config: Path
    env: dict[str, str]
    tmp: Path
    members: list[Replica] = field(default_factory=list)

    def start(self) -> Replica:
        port, debug = free_port(), free_port()
        log = self.tmp / f"replica-{port}.log"
        env = {**os.environ, **self.env, "REGISTRY_HTTP_ADDR": f"127.0.0.1:{port}",
               "REGISTRY_HTTP_DEBUG_ADDR": f"127.0.0.1:{debug}"}  # fmt: skip
        proc = subprocess.Popen([str(registry_binary()), "serve", str(self.config)], env=env, stdin=subprocess.DEVNULL,
                                stdout=open(log, "ab"), stderr=subprocess.STDOUT)  # fmt: skip
        r = Replica(f"127.0.0.1:{port}", proc, log, f"http://127.0.0.1:{debug}")
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"registry exited with {proc.returncode}: {log.read_text()[-2000:]}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("registry did not start listening")
            time.sleep(0.05)
        self.members.append(r)
        return r

    def kill(self, r: Replica) -> None:
        r.proc.send_signal(signal.SIGKILL)
        r.proc.wait(10)

    def stop(self) -> None:
        for r in self.members:
            if r.proc.poll() is None:
                r.proc.terminate()
        for r in self.members:
            try:
                r.proc.wait(10)
            except subprocess.TimeoutExpired:
                r.proc.kill()


@contextlib.contextmanager
def replicas(store: Store, tmp: Path, n: int, env: dict[str, str] | None = None,
             token_auth: dict[str, str] | None = None) -> Iterator[Replicas]:  # fmt: skip
    config = chart_config(store, tmp, token_auth)
    rs = Replicas(config, {**store.env, "REGISTRY_HTTP_SECRET": secrets.token_hex(16), **(env or {})}, tmp)
    try:
        for _ in range(n):
            rs.start()
        yield rs
    finally:
        rs.stop()
