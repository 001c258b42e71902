"""Issue 19 item 5: GC's read-only window is surfaced where an operator looks, against the real API
server, a real distribution (``auth: token``) and a real token service: the Job's output, an Event on
the lock Lease, and the token service's `cluster_registry_gc_last_window_seconds` metric (the GC Job is
gone by the time anything scrapes)."""

from __future__ import annotations

from tests.e2e.test_gc import age_storage, front, run_gc  # noqa: F401 (fixtures)
from tests.support.cluster import Cluster, wait_for
from tests.support.ociimages import push_image
from tests.support.tokenfront import Front


def test_gc_reports_its_window_in_output_event_and_metric(cluster: Cluster, namespace: str, front: Front) -> None:  # noqa: F811
    push_image(front.pusher(), "window/old", "v1", layers=[8192], seed=31)
    age_storage(front.registry.storage)  # past the grace period, referenced by nothing: swept
    report = run_gc(cluster, namespace, front.registry.url, front.registry.storage, creds=front.gc_creds)
    window = report["windowSeconds"]
    assert report["ran"] and window > 0 and report["blobsDeleted"] > 0, report

    # The Job's output: a line for people just before the JSON report.
    lines = report["_stdout"].strip().splitlines()
    assert lines[-2].startswith(f"read-only window: writes were held off for {window:.3f}s (drain "), lines[-2:]

    # The lock Lease carries it, and an Event about the Lease says it.
    lease = cluster.kubectl_json("get", "lease", "gc-lock", "-n", namespace)
    assert abs(float(lease["metadata"]["annotations"]["clusterregistry.io/last-window-seconds"]) - window) <= 0.0011
    events = [e for e in cluster.kubectl_json("get", "events.events.k8s.io", "-n", namespace)["items"]
              if e.get("reason") == "ReadOnlyWindow"]
    assert [(e["regarding"]["kind"], e["regarding"]["name"], e["type"]) for e in events] == [("Lease", "gc-lock", "Normal")]
    assert events[0]["note"] == lines[-2]

    # The token service, which watches the Lease, exports it.
    def metric() -> float | None:
        value = front.service.metric("cluster_registry_gc_last_window_seconds")
        return value if value else None

    assert abs(wait_for(metric, timeout=30, what="the token service's window metric") - window) <= 0.0011
