"""GC's write lock with distribution's token auth, against the real API server: a real distribution
(``auth: token``), a real ``cluster-registry token-service`` (its Leases and Secrets in the cluster) and a
real ``cluster-registry gc --once``.

The property the sweep relies on (``gc/lock.py``): once GC holds the lock no push token is issued, and
the sweep starts only after every push token issued before the lock has died at distribution.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cluster_registry.gate import tokens
from cluster_registry.gate.protocol import LOCK_HEADER
from tests.e2e.test_gc import age_storage, env_for, start_gc
from tests.support.cluster import Cluster, wait_for
from tests.support.ociimages import Pusher, push_image
from tests.support.registry import Registry, free_port, run_registry

pytestmark = pytest.mark.e2e
PASSWORDS = {"artifact-reconciler": "reconciler-e2e-pw", "gc": "gc-e2e-pw"}
PUSH_TTL, GRACE = 15, 5.0  # the token service's defaults (gate/service.py PUSH_GRACE)


@dataclass
class Front:
    registry: Registry
    realm: str
    gc_creds: Path


def token(f: Front, component: str, scope: str) -> tuple[int, dict[str, str], str]:
    req = urllib.request.Request(f"{f.realm}?service=cluster-registry&scope={scope}")
    req.add_header("Authorization", "Basic " + base64.b64encode(f"{component}:{PASSWORDS[component]}".encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), str(json.loads(r.read())["token"])
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), ""


def start_upload(f: Front, repo: str, jwt: str) -> int:
    req = urllib.request.Request(f"{f.registry.url}/v2/{repo}/blobs/uploads/", data=b"", method="POST",
                                 headers={"Authorization": f"Bearer {jwt}"})  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code


@pytest.fixture
def front(cluster: Cluster, namespace: str, tmp_path: Path) -> Iterator[Front]:
    for component, password in PASSWORDS.items():
        cluster.kubectl("create", "secret", "generic", f"push-{component}", "-n", namespace,
                        f"--from-literal=credentials.yaml=username: {component}\npassword: {password}\n")  # fmt: skip
    key = tmp_path / "key.pem"
    key.write_bytes(tokens.new_private_key_pem())
    (tmp_path / "jwks.json").write_text(tokens.jwks(tokens.load_signer(key.read_bytes(), "", "").key.public_key()))
    port, debug = free_port(), free_port()
    realm = f"http://127.0.0.1:{port}/token"
    auth = {"realm": realm, "service": "cluster-registry", "issuer": "cluster-registry-token-service",
            "jwks": str(tmp_path / "jwks.json")}  # fmt: skip
    gc_creds = tmp_path / "gc.yaml"
    gc_creds.write_text(f"username: gc\npassword: {PASSWORDS['gc']}\n")
    with run_registry(tmp_path / "registry", token_auth=auth, debug_port=debug) as reg:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cluster_registry", "--log-format", "json", "token-service", "--listen",
             f"127.0.0.1:{port}", "--signing-key", str(key), "--access", "shared",
             *(x for c in PASSWORDS for x in ("--pusher", f"{c}=push-{c}")), "--registry-debug",
             f"http://127.0.0.1:{debug}", "--lock-name", "gc-lock", "--namespace", namespace, "--identity", "ts-0"],
            env=env_for(cluster), stdout=subprocess.DEVNULL, stderr=open(tmp_path / "token-service.log", "wb"),
        )  # fmt: skip
        f = Front(reg, realm, gc_creds)
        try:
            # ready, and its first heartbeat written: push tokens are refused until GC can know of it
            wait_for(lambda: token(f, "artifact-reconciler", "repository:probe/x:pull,push")[0] == 200, timeout=60,
                     what="the token service to issue push tokens")  # fmt: skip
            yield f
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def lock_holder(cluster: Cluster, namespace: str) -> str | None:
    out = cluster.kubectl("get", "lease", "gc-lock", "-n", namespace, "-o", "jsonpath={.spec.holderIdentity}", check=False)
    return out.strip() or None


def test_the_sweep_waits_for_push_tokens_issued_before_the_lock_and_none_is_issued_during_it(
    cluster: Cluster, namespace: str, front: Front
) -> None:
    pusher = Pusher(front.registry.host, auth=("artifact-reconciler", PASSWORDS["artifact-reconciler"]))
    for i in range(4):
        push_image(pusher, f"doomed/app{i % 2}", f"t{i}", layers=[1024, 512], seed=700 + i)
    age_storage(front.registry.storage)
    gc = start_gc(cluster, namespace, front.registry.url, front.registry.storage, front.gc_creds, "--grace", "1h")
    try:
        # A copy keeps taking push tokens until GC locks: the last one granted is the latest a token
        # service can have issued before the lock; the first refusal comes once it sees the lock.
        early, t0, refused = "", 0.0, None
        deadline = time.monotonic() + 120
        while refused is None and time.monotonic() < deadline:
            status, headers, jwt = token(front, "artifact-reconciler", "repository:late/app:pull,push")
            if status == 200:
                early, t0 = jwt, time.time()
            else:
                refused = (status, headers)
            time.sleep(0.1)
        locked_at = time.time()
        assert early and refused is not None, "GC never locked"
        assert refused[0] == 503 and refused[1].get(LOCK_HEADER) == "gc", refused
        assert lock_holder(cluster, namespace), "refused because GC holds the lock"
        assert locked_at < t0 + 3, "the refusal follows the last grant closely"
        assert token(front, "gc", "repository:doomed/app0:pull")[0] == 200, "pulls go on"
        # the early token is still alive at distribution: this is why GC must wait for it
        assert start_upload(front, "late/app", early) == 202
        time.sleep(max(0.0, t0 + PUSH_TTL + 1 - time.time()))
        assert gc.poll() is None and lock_holder(cluster, namespace), "still in the window"
        assert start_upload(front, "late/app", early) == 401, "dead at distribution once its TTL passed"
        out, err = gc.communicate(timeout=240)
    finally:
        if gc.poll() is None:
            gc.kill()
    report = json.loads(out.strip().splitlines()[-1])
    assert gc.returncode == 0 and "error" not in report, (report, err[-2000:])
    assert report["gatesAcked"] == 1 and report["blobsDeleted"] > 0, report
    # the sweep began no earlier than the early token's death plus the grace
    assert locked_at + report["drainSeconds"] >= t0 + PUSH_TTL + GRACE - 1.5, (report, locked_at - t0)
    assert report["windowSeconds"] < 60, report
    assert not lock_holder(cluster, namespace)
    assert token(front, "artifact-reconciler", "repository:late/app:pull,push")[0] == 200, "writes resume"
    push_image(pusher, "late/app", "v1", layers=[256], seed=799)
