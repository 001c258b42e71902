"""The pull path on the local cluster's real nodes: pod start times and the CNF's install-to-rewritten time.

1. Installs chart/ (the webhook scoped to one namespace) and publishes the sample CNF (tests/support/cnf.py).
2. `helm install` of the CNF on the real system nodes; times until every Artifact is Ready, and until
   every CNF pod is rewritten and up (its pods are restarted as soon as the Artifacts are Ready).
3. Pod start time (create -> Ready) of the frontend image, removed from every node's containerd
   before each run, pulled (a) from the cluster registry through the node proxy (127.0.0.1:5050) and
   (b) from the artifact store (the same bytes, through the node's loopback to the store front).

Run: `flock /tmp/bench.lock .venv/bin/python bench/pullpath.py [--rounds N]`; the last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support import cnf  # noqa: E402
from tests.support.cluster import Cluster, ensure_up, exclusive_chart, pod_ready, wait_for  # noqa: E402

NODE_PROXY = "127.0.0.1:5050"


def cnf_up(cluster: Cluster, ns: str) -> bool:
    pods = [p for p in cluster.kubectl_json("get", "pods", "-n", ns, "-l", "app.kubernetes.io/part-of=sample-cnf")["items"]
            if not p["metadata"].get("deletionTimestamp")]
    kinds = {p["metadata"]["labels"].get("app.kubernetes.io/name") for p in pods}
    return {"frontend", "backend", "agent"} <= kinds and all(
        (pod_ready(p) or p["status"].get("phase") == "Succeeded")  # the reporter's Job pod completes
        and all(c["image"].startswith(NODE_PROXY + "/") for c in p["spec"]["containers"]) for p in pods)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    cluster = ensure_up()
    suffix = secrets.token_hex(3)
    release, ns, cnf_ns = f"bp{suffix[:4]}", f"crb-{suffix}", f"cnf-b-{suffix}"
    for n in (ns, cnf_ns):
        cluster.kubectl("create", "namespace", n)
    front = cnf.StoreFront(cluster).start()
    out: dict[str, Any] = {"bench": "pullpath", "rounds": args.rounds}
    try:
        with exclusive_chart():
            store_host = cnf.expose_store(cluster, cnf_ns, front)
            cnf.pull_secret(cluster, cnf_ns, store_host)
            images = cnf.push_images(cluster)
            version = f"{cnf.chart_version()}-bench{suffix}"  # the store's charts/sample-cnf is shared with tests
            chart_ref = cnf.push_chart(cluster, images, store_host, version)
            cnf.install_cluster_registry(cluster, release, ns, cnf.cluster_registry_values([cnf_ns], store_host))
            sources = {img.source(store_host) for img in images.values()}
            t0 = time.monotonic()
            cnf.install_cnf(cluster, "cnf", cnf_ns, chart_ref, version, extra=cnf.ON_SYSTEM_NODES)
            # the reporter CronJob runs every 30 minutes: a Job now, so its pod (and Artifact) exists
            cluster.kubectl("create", "job", "report-0", "--from=cronjob/cnf-reporter", "-n", cnf_ns)
            wait_for(lambda: sources <= {a["spec"]["sourceArtifact"] for a in cluster.kubectl_json(
                "get", "artifacts.clusterregistry.io", "-n", cnf_ns)["items"] if a.get("status", {}).get("phase") == "Ready"},
                timeout=600, interval=0.5, what="every Artifact Ready")
            out["install_to_artifacts_ready_s"] = round(time.monotonic() - t0, 1)
            cluster.kubectl("delete", "pods", "-n", cnf_ns, "-l", "app.kubernetes.io/part-of=sample-cnf", "--wait=false")
            wait_for(lambda: cnf_up(cluster, cnf_ns), timeout=600, interval=0.5, what="every CNF pod rewritten and up")
            out["install_to_pods_rewritten_up_s"] = round(time.monotonic() - t0, 1)

            digest = images["frontend"].digest
            via = {"cluster_registry": f"{NODE_PROXY}/{store_host.replace(':', '_')}/cnf/frontend@{digest}",
                   "artifact_store": f"{front.host}/cnf/frontend@{digest}"}  # via the node's loopback
            times: dict[str, list[float]] = {k: [] for k in via}
            for r in range(args.rounds):
                for k, image in via.items():
                    # in the CNF's namespace, with its pull Secret: the default isolated access serves it only
                    times[k].append(cnf.pod_start_seconds(cluster, cnf_ns, image, f"system-{r % 3}", "cnf/frontend",
                                                          cnf.REGISTRY_PULL_SECRET))
            for k, ts in times.items():
                out[f"pod_start_{k}_s"] = {"median": round(statistics.median(ts), 2), "runs": [round(t, 2) for t in ts]}
            out["image_bytes"] = images["frontend"].size
    finally:
        cluster.helm("uninstall", "cnf", "-n", cnf_ns, "--wait", "--timeout", "60s", check=False)
        cluster.helm("uninstall", release, "-n", ns, "--wait", "--timeout", "120s", check=False)
        for n in (cnf_ns, ns):
            cluster.kubectl("delete", "namespace", n, "--wait=false", check=False)
        front.stop()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
