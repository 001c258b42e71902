"""GC's write lock with distribution's token auth, against the real API server: a real distribution
(``auth: token``), a real ``cluster-registry token-service`` (its Leases and Secrets in the cluster) and a
real ``cluster-registry gc --once``.

The property the sweep relies on (``gc/lock.py``): once GC holds the lock no push token is issued, and
the sweep starts only after every push token issued before the lock has died at distribution.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster_registry.gate.protocol import LOCK_HEADER
from tests.e2e.test_gc import age_storage, start_gc
from tests.support.cluster import Cluster
from tests.support.ociimages import push_image
from tests.support.tokenfront import Front, token, token_front

pytestmark = pytest.mark.e2e
PUSH_TTL, GRACE = 15, 5.0  # the chart's push token lifetime; the token service's grace (gate/service.py PUSH_GRACE)


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
    with token_front(cluster, namespace, tmp_path, push_ttl=PUSH_TTL) as f:
        yield f


def lock_holder(cluster: Cluster, namespace: str) -> str | None:
    out = cluster.kubectl("get", "lease", "gc-lock", "-n", namespace, "-o", "jsonpath={.spec.holderIdentity}", check=False)
    return out.strip() or None


def test_the_sweep_waits_for_push_tokens_issued_before_the_lock_and_none_is_issued_during_it(
    cluster: Cluster, namespace: str, front: Front
) -> None:
    pusher = front.pusher()
    for i in range(4):
        push_image(pusher, f"doomed/app{i % 2}", f"t{i}", layers=[1024, 512], seed=700 + i)
    age_storage(front.registry.storage)
    # --quiet-wait: GC waits this long, unlocked, for a pause in the pushes; this copy never pauses
    gc = start_gc(cluster, namespace, front.registry.url, front.registry.storage, front.gc_creds, "--grace", "1h",
                  "--quiet-wait", "3s")  # fmt: skip
    try:
        # A copy keeps taking push tokens until GC locks: the last one granted is the latest a token
        # service can have issued before the lock; the first refusal comes once it sees the lock.
        early, t0, refused = "", 0.0, None
        deadline = time.monotonic() + 120
        while refused is None and time.monotonic() < deadline:
            status, headers, jwt = token(front.realm, "repository:late/app:pull,push")
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
        assert token(front.realm, "repository:doomed/app0:pull", "gc")[0] == 200, "pulls go on"
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
    assert token(front.realm, "repository:late/app:pull,push")[0] == 200, "writes resume"
    push_image(pusher, "late/app", "v1", layers=[256], seed=799)


def test_a_push_token_taken_just_before_gc_dies_before_the_window_not_inside_it(
    cluster: Cluster, namespace: str, front: Front
) -> None:
    push_image(front.pusher(), "quiet/app", "v1", layers=[1024], seed=760)
    age_storage(front.registry.storage)
    status, _, _ = token(front.realm, "repository:quiet/other:pull,push")
    t0 = time.monotonic()
    assert status == 200
    gc = start_gc(cluster, namespace, front.registry.url, front.registry.storage, front.gc_creds, "--grace", "1h")
    out, err = gc.communicate(timeout=240)
    took = time.monotonic() - t0
    report = json.loads(out.strip().splitlines()[-1])
    assert gc.returncode == 0 and "error" not in report and report["blobsDeleted"] > 0, (report, err[-2000:])
    # the heartbeat said when the token dies: GC waited for it with writes open, then locked a quiet registry
    assert report["quietWaitSeconds"] > 5 and took >= PUSH_TTL + GRACE - 1.5, (report, took)
    assert report["gatesAcked"] == 1 and report["drainSeconds"] < 3, report
    assert report["windowSeconds"] < 5, report
