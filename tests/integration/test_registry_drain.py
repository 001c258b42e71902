"""A pull in progress survives the registry pod's termination (#16 item 10): distribution (with the
chart's `http.draintimeout` and `auth: token`) gets SIGTERM, as the kubelet sends it on scale-down,
rollout or drain, while a client holding a pull token is still reading a blob straight from it (the
token service beside it is not in the data path: the token was issued before). Without the drain
timeout distribution drops the connection at once: the control case."""

from __future__ import annotations

import hashlib
import http.client
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from cluster_registry.gate import tokens
from cluster_registry.gate.access import Scope
from tests.support.cluster import ROOT
from tests.support.ociimages import Pusher, layer_chunks
from tests.support.registry import registry_binary, start_registry, wait_serving
from tests.support.tokenfront import ISSUER, SERVICE, Signing, new_signing

SIZE = 48 << 20


def chart_drain_timeout() -> str:
    out = subprocess.run([str(ROOT / ".cache" / "bin" / "helm"), "template", "t", str(ROOT / "chart"), "--kube-version", "1.35.0",
                          "--show-only", "templates/registry/configmap.yaml"], capture_output=True, text=True, check=True).stdout  # fmt: skip
    config = yaml.safe_load(yaml.safe_load(out)["data"]["config.yml"])
    return str(config["http"]["draintimeout"])


def as_the_chart_runs_it(config: Path, drain: str | None, signing: Signing) -> None:
    """The drain timeout under test, and token auth as the chart configures it (no realm is asked here)."""
    text = config.read_text()
    if drain:
        text = text.replace("http:\n", f"http:\n  draintimeout: {drain}\n", 1)
    auth = signing.auth("http://127.0.0.1:1/token")
    config.write_text(text + "auth:\n  token:\n" + "".join(f"    {k}: {v}\n" for k, v in auth.items()))


def slow_pull(host: str, path: str, token: str, terminate: list[subprocess.Popen[bytes]]) -> tuple[int, str]:
    """Read the blob at ~12 MiB/s; SIGTERM every process in ``terminate`` after the first MiBs."""
    h, _, port = host.rpartition(":")
    conn = http.client.HTTPConnection(h, int(port), timeout=60)
    conn.request("GET", path, headers={"Authorization": f"Bearer {token}"})
    resp = conn.getresponse()
    assert resp.status == 200
    digest, got = hashlib.sha256(), 0
    try:
        while chunk := resp.read(1 << 20):
            digest.update(chunk)
            got += len(chunk)
            if got == 4 << 20:
                for proc in terminate:
                    proc.send_signal(signal.SIGTERM)
            time.sleep(0.08)
    except (http.client.HTTPException, OSError):
        pass  # cut off: the caller sees it in the byte count
    return got, "sha256:" + digest.hexdigest()


@pytest.mark.parametrize("drain", [True, False], ids=["chart-drain", "no-drain-control"])
def test_a_pull_in_progress_survives_sigterm(tmp_path: Path, drain: bool) -> None:
    reg = start_registry(tmp_path / "r")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        digest = Pusher(reg.host).push_blob_stream("drain/app", layer_chunks(3, SIZE), SIZE)
        reg.stop()  # restart it with the drain setting under test
        signing = new_signing(tmp_path / "signing")
        signer = tokens.load_signer(signing.key.read_bytes(), ISSUER, SERVICE)
        config = tmp_path / "r" / "config.yml"
        as_the_chart_runs_it(config, chart_drain_timeout() if drain else None, signing)
        proc = subprocess.Popen([str(registry_binary()), "serve", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(proc)
        wait_serving(reg.host, ok=(401,))  # token auth: anonymous callers get nothing
        pull = tokens.issue(signer, "ns:a", (Scope("repository", "drain/app", ("pull",)),), 300, time.time())
        got, seen = slow_pull(reg.host, f"/v2/drain/app/blobs/{digest}", pull, [proc])
        if drain:
            assert (got, seen) == (SIZE, digest), "the pull was cut off by the pod's termination"
            assert proc.wait(30) is not None  # and distribution then exited
        else:
            assert got < SIZE, "the control: without a drain timeout distribution drops the pull"
        proc.wait(30)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        reg.stop()


