"""#16 item 11 against the real API server: `cluster-registry gc` whose sweep hangs is aborted at
`--max-window`, releases the write lock and says so with a `SweepAborted` Warning Event on the lock
Lease (read back from the API server), besides its failed report and exit status.
(tests/integration/test_gc_max_window.py covers the abort itself with the window's parts in process.)"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from tests.e2e.test_gc import ensure_crds, env_for
from tests.integration.test_gc_max_window import hanging_registry
from tests.support.cluster import Cluster
from tests.support.ociimages import Pusher, push_image
from tests.support.registry import run_registry

MESSAGE = ("the sweep outlasted the maximum read-only window of 2s: it was aborted, the write lock released "
           "and writes resumed; nothing it had not finished was deleted")  # fmt: skip


def test_gc_sweep_aborted_event_on_the_lock_lease(cluster: Cluster, namespace: str, tmp_path: Path) -> None:
    ensure_crds(cluster)
    (tmp_path / "bin").mkdir()
    with run_registry(tmp_path / "registry") as reg:
        push_image(Pusher(reg.host), "hang/app", "v1", layers=[4096], seed=41)
        argv = [sys.executable, "-m", "cluster_registry", "--log-format", "json", "gc", "--once", "--registry-url",
                reg.url, "--storage-root", str(reg.storage), "--storage-size", "1Gi", "--lock-name", "gc-lock",
                "--namespace", namespace, "--artifact-namespace", namespace,
                "--sweep-mode", "distribution", "--registry-binary", hanging_registry(tmp_path / "bin"),
                "--max-window", "2s"]  # fmt: skip
        start = time.monotonic()
        proc = subprocess.run(argv, env=env_for(cluster), capture_output=True, text=True, timeout=120)
        took = time.monotonic() - start
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 1 and report["error"] == MESSAGE, (report, proc.stderr[-3000:])
    assert took < 30, f"gc took {took:.0f}s: the hung sweep was not cut at the window"

    # The write lock is free again: no holder left on the Lease.
    lease = cluster.kubectl_json("get", "lease", "gc-lock", "-n", namespace)
    assert not lease["spec"].get("holderIdentity"), lease["spec"]

    events = [e for e in cluster.kubectl_json("get", "events.events.k8s.io", "-n", namespace)["items"]
              if e.get("reason") == "SweepAborted"]  # fmt: skip
    assert len(events) == 1, events
    event = events[0]
    assert event["type"] == "Warning" and event["action"] == "Sweep", event
    assert (event["regarding"]["kind"], event["regarding"]["name"], event["regarding"]["namespace"]) == \
        ("Lease", "gc-lock", namespace)
    assert event["regarding"]["apiVersion"] == "coordination.k8s.io/v1"
    assert event["note"] == MESSAGE
