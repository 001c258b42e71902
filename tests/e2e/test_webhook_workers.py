"""The webhook with two workers against the real API server (#20): the API server's pods reach it,
the supervisor's pod watch records their Artifacts (once per pod, not once per worker), and every
worker's own watch-fed view sees an Artifact turn Ready.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import os
import secrets
import ssl
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from cluster_registry import reference
from cluster_registry.certs import pki
from tests.e2e.test_webhook import Hook, artifacts, ensure_crds, free_port, pod, render_mwc, set_phase, stop
from tests.support.cluster import Cluster, wait_for

WORKERS = 2


def scrape(h: Hook) -> dict[str, float]:
    text = h.metrics()
    return {ln.rsplit(" ", 1)[0]: float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln and not ln.startswith("#")}


@pytest.fixture
def hook(cluster: Cluster, namespace: str, tmp_path: Path) -> Iterator[Hook]:
    ensure_crds(cluster)
    now = dt.datetime.now(dt.timezone.utc)
    ca = pki.new_ca(now)
    crt, key = pki.new_serving(ca[0], ca[1], ["localhost"], now, ip_addresses=["127.0.0.1"])
    (tmp_path / "tls.crt").write_bytes(crt)
    (tmp_path / "tls.key").write_bytes(key)
    port = free_port()
    log = tmp_path / "webhook.log"
    argv = [sys.executable, "-m", "cluster_registry", "--log-format", "json", "webhook", "--workers", str(WORKERS),
            "--listen", f"127.0.0.1:{port}", "--tls-cert", str(tmp_path / "tls.crt"), "--tls-key", str(tmp_path / "tls.key"),
            "--registry-host", cluster.cluster_registry, "--rewrite-policy", "WhenReady",
            "--kubeconfig", str(cluster.kubeconfig), "--batch-interval", "0.1", "--no-leader-election"]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=log.open("wb"), stderr=subprocess.STDOUT, env={**os.environ, "KUBECONFIG": str(cluster.kubeconfig)})
    h = Hook(proc, port, ca, log, cluster.cluster_registry)
    name = ""
    try:

        def serving() -> bool:  # every worker synced its view (it joins the port only then) and scraped itself
            assert proc.poll() is None, log.read_text()
            try:
                return sum(k.startswith("cluster_registry_webhook_artifacts_known{") for k in scrape(h)) == WORKERS
            except OSError:
                return False

        wait_for(serving, timeout=90, what="both webhook workers serving")
        mwc = render_mwc(cluster, f"wh-workers-{secrets.token_hex(3)}", f"https://127.0.0.1:{port}/mutate", ca[0],
                         f"request.namespace == '{namespace}'", "Ignore")  # fmt: skip
        name = mwc["metadata"]["name"]
        cluster.apply(mwc)
        yield h
    finally:
        if name:
            cluster.kubectl("delete", "mutatingwebhookconfiguration", name, "--ignore-not-found")
        stop(proc)


async def images_from_each_connection(h: Hook, namespace: str, image: str, n: int = 16) -> list[str]:
    """The image each of ``n`` reviews comes back with, each on a new connection (so the kernel spreads
    them over the workers)."""
    ctx = ssl.create_default_context(cadata=h.ca[0].decode())
    body: dict[str, Any] = {
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {"uid": "u", "kind": {"group": "", "version": "v1", "kind": "Pod"},
                    "resource": {"group": "", "version": "v1", "resource": "pods"}, "namespace": namespace,
                    "operation": "CREATE", "userInfo": {"username": "e2e"}, "object": pod("p", [image])},
    }  # fmt: skip
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx, force_close=True)) as s:

        async def one() -> str:
            async with s.post(f"https://127.0.0.1:{h.port}/mutate", json=body) as r:
                got = await r.json()
            ops = json.loads(base64.b64decode(got["response"].get("patch") or "W10="))
            return next((o["value"] for o in ops if o["path"] == "/spec/containers/0/image"), image)

        return list(await asyncio.gather(*(one() for _ in range(n))))


def test_workers_record_once_and_every_view_converges(cluster: Cluster, namespace: str, hook: Hook) -> None:
    src = f"{cluster.artifact_store}/e2e/workers:{secrets.token_hex(3)}"
    # a real pod through the API server: annotated by a worker, recorded by the supervisor's pod watch
    cluster.apply(pod("w", [src]), namespace)
    art = wait_for(lambda: artifacts(cluster, namespace).get(reference.normalize(src)), timeout=60, what="the pod's Artifact")
    assert art["metadata"]["generation"] == 1  # written once
    figures = scrape(hook)
    assert figures["cluster_registry_webhook_artifact_errors"] == 0
    assert "cluster_registry_webhook_pods_watched" in figures  # the one recorder's, no per-worker series
    # not Ready yet: no worker rewrites
    assert set(asyncio.run(images_from_each_connection(hook, namespace, src))) == {src}
    set_phase(cluster, namespace, art["metadata"]["name"], "Ready", "sha256:" + "ab" * 32)

    def all_rewritten() -> bool:
        got = asyncio.run(images_from_each_connection(hook, namespace, src))
        return all(im.startswith(cluster.cluster_registry) for im in got)

    wait_for(all_rewritten, timeout=30, interval=0.2, what="every worker's view to see the Artifact Ready")
    # each worker's own view holds it (one artifacts_known series per worker pid)
    known = {k: v for k, v in scrape(hook).items() if k.startswith("cluster_registry_webhook_artifacts_known{")}
    assert len(known) == WORKERS and all(v >= 1 for v in known.values()), known
    with urllib.request.urlopen(f"https://127.0.0.1:{hook.port}/readyz", context=ssl.create_default_context(cadata=hook.ca[0].decode()), timeout=5) as r:  # noqa: S310
        assert r.status == 200
