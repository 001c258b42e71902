#!/usr/bin/env python3
"""Benchmark the write gate's read path: pulling one large blob through `cluster-registry gate` against
pulling it from the registry directly (the gate must not be the bottleneck of a node's pull).

A real distribution registry on 127.0.0.1 holds one blob of --size MiB (random-looking bytes); the
gate runs as the chart runs it (`cluster-registry gate`), with the lock disabled (no Kubernetes
needed: reads never consult it). Each round pulls the blob once directly and once through the gate,
in alternating order; the best round of each is reported, the median beside it.

Prints one JSON line last: {"size_mib", "rounds", "direct_mbps", "gate_mbps", "ratio", ...}.
Usage: .venv/bin/python bench/gate.py [--size 256] [--rounds 3]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.ociimages import Pusher, layer_chunks  # noqa: E402
from tests.support.registry import free_port, run_registry, wait_serving  # noqa: E402


def pull_seconds(host: str, repo: str, digest: str) -> float:
    h, _, port = host.rpartition(":")
    conn = http.client.HTTPConnection(h, int(port), timeout=300)
    t0 = time.perf_counter()
    conn.request("GET", f"/v2/{repo}/blobs/{digest}")
    resp = conn.getresponse()
    if resp.status != 200:
        raise SystemExit(f"GET {host} blob: {resp.status}")
    while resp.read(1 << 20):
        pass
    conn.close()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=256, help="blob size in MiB")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    size = args.size << 20
    with tempfile.TemporaryDirectory(prefix="bench-gate-", dir=os.environ.get("BENCH_TMP")) as tmp, \
            run_registry(Path(tmp) / "registry") as reg:  # fmt: skip
        digest = Pusher(reg.host).push_blob_stream("bench/gate", layer_chunks(7, size), size)
        port = free_port()
        env = {**os.environ, "PYTHONPATH": str(ROOT / "hooks")}
        gate = subprocess.Popen(
            [sys.executable, "-m", "cluster_registry", "gate", "--listen", f"127.0.0.1:{port}", "--upstream", reg.url,
             "--lock-name", ""],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            via = f"127.0.0.1:{port}"
            wait_serving(via)
            direct_s: list[float] = []
            gate_s: list[float] = []
            for r in range(args.rounds):
                order = [(reg.host, direct_s), (via, gate_s)]
                for host, out in order if r % 2 == 0 else order[::-1]:
                    out.append(pull_seconds(host, "bench/gate", digest))
        finally:
            gate.terminate()
            gate.wait(10)
    mbps = lambda s: round(size / s / 1e6, 1)  # noqa: E731
    result = {
        "size_mib": args.size,
        "rounds": args.rounds,
        "direct_mbps": mbps(min(direct_s)),
        "gate_mbps": mbps(min(gate_s)),
        "direct_mbps_median": mbps(statistics.median(direct_s)),
        "gate_mbps_median": mbps(statistics.median(gate_s)),
        "ratio": round(min(direct_s) / min(gate_s), 3),
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
