"""Object-storage benchmark: copy into and pull from distribution on filesystem, S3 and Azure blob
storage, side by side in one run (a script, not a test).

Each backend runs one distribution registry on loopback with the chart's own rendering of its
storage config (``registry/_config.tpl``): the filesystem driver on local disk, the s3 driver on
moto's S3 server, the azure driver on Azurite (``ci/objectstores``; both servers keep their data in
memory, the filesystem driver writes to disk). One source registry (filesystem) holds the image:
``--layers`` layers of ``--layer-mib`` MiB (default 4 x 64 MiB).

* copy: ``cluster-registry copy`` from the source into a fresh bucket/container/directory of each
  backend (wall seconds of the whole process; MB/s over the blob bytes, MB = 10^6 bytes).
* pull: every layer of the copied image downloaded from the backend's registry, the layers in
  parallel, bytes hashed and checked (what a node's pull costs the registry).

Beside the copy: the CPU seconds the destination registry and the storage server (moto, Azurite)
spent during it, to tell the emulator's cost from distribution's.

Each backend runs ``--rounds`` times (default 3), the backends' order rotated by round; the best and
the median are reported, with the ratio of each backend's median MB/s to the filesystem's. The last
line is one JSON object.

    .venv/bin/python bench/objectstore.py [--rounds 3] [--layers 4] [--layer-mib 64]
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support import objectstores  # noqa: E402
from tests.support.ociimages import Image, Pusher, push_image  # noqa: E402
from tests.support.registry import cpu_seconds, run_registry  # noqa: E402

BACKENDS = ("filesystem", *objectstores.BACKENDS)


def store_for(backend: str, tmp: Path) -> objectstores.Store:
    if backend != "filesystem":
        return objectstores.create(backend)
    return objectstores.Store("filesystem", "disk", {}, {"REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY": str(tmp / "disk")}, "")


def copy(src: str, dst: str) -> float:
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "cluster_registry", "copy", src, dst, "--src-insecure", "--dest-insecure"],
                   check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT / "hooks")})  # fmt: skip
    return time.monotonic() - t0


def pull_blob(host: str, repo: str, digest: str, size: int) -> None:
    h, _, port = host.rpartition(":")
    conn = http.client.HTTPConnection(h, int(port), timeout=600)
    conn.request("GET", f"/v2/{repo}/blobs/{digest}")
    resp = conn.getresponse()
    assert resp.status == 200, (resp.status, resp.read()[:200])
    sha, n = hashlib.sha256(), 0
    while chunk := resp.read(1 << 20):
        sha.update(chunk)
        n += len(chunk)
    conn.close()
    assert ("sha256:" + sha.hexdigest(), n) == (digest, size), f"{repo}@{digest} pulled wrong"


def pull(host: str, repo: str, image: Image) -> float:
    t0 = time.monotonic()
    with ThreadPoolExecutor(len(image.blobs)) as pool:
        list(pool.map(lambda b: pull_blob(host, repo, b[0], b[1]), image.blobs))
    return time.monotonic() - t0


def server_pid(backend: str) -> int | None:
    name = {"s3": "s3", "azure": "azurite"}.get(backend)
    return int((ROOT / f".cache/objectstores/{name}.pid").read_text()) if name else None


def one_round(backend: str, source: str, image: Image, tmp: Path) -> tuple[float, float, float, float]:
    """(copy s, pull s, CPU seconds of the destination registry and of the storage server during the copy)."""
    store = store_for(backend, tmp)
    server = server_pid(backend)
    try:
        with objectstores.replicas(store, tmp, 1) as rs:
            dst = rs.members[0]
            cpu0 = cpu_seconds(dst.proc.pid), cpu_seconds(server) if server else 0.0
            copy_s = copy(f"{source}/bench/app:v1", f"{dst.host}/bench/app:v1")
            reg_cpu, srv_cpu = cpu_seconds(dst.proc.pid) - cpu0[0], (cpu_seconds(server) - cpu0[1]) if server else 0.0
            return copy_s, pull(dst.host, "bench/app", image), reg_cpu, srv_cpu
    finally:
        if backend == "filesystem":
            shutil.rmtree(tmp / "disk", ignore_errors=True)
        else:
            objectstores.destroy(store)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--layer-mib", type=int, default=64)
    args = ap.parse_args()
    objectstores.servers()
    base = Path(tempfile.mkdtemp(prefix="bench-objectstore-", dir=os.environ.get("BENCH_TMP")))
    times: dict[str, dict[str, list[float]]] = {b: {"copy": [], "pull": [], "reg_cpu": [], "srv_cpu": []} for b in BACKENDS}
    with run_registry(base / "source") as src:
        image = push_image(Pusher(src.host), "bench/app", "v1", layers=[args.layer_mib << 20] * args.layers, seed=7)
        mb = sum(size for _, size in image.blobs) / 1e6
        for rnd in range(args.rounds):
            order = BACKENDS[rnd % len(BACKENDS):] + BACKENDS[: rnd % len(BACKENDS)]
            for backend in order:
                c, p, rc, sc = one_round(backend, src.host, image, base / f"{backend}-{rnd}")
                for k, v in (("copy", c), ("pull", p), ("reg_cpu", rc), ("srv_cpu", sc)):
                    times[backend][k].append(v)
                print(f"round {rnd} {backend}: copy {c:.2f}s ({mb / c:.0f} MB/s; CPU s: registry {rc:.2f}, "
                      f"storage server {sc:.2f}), pull {p:.2f}s ({mb / p:.0f} MB/s)", flush=True)  # fmt: skip
    out: dict[str, Any] = {"bench": "objectstore", "mb": round(mb, 1), "rounds": args.rounds,
                           "servers": {"s3": "moto server (in memory)", "azure": "Azurite (in memory)",
                                       "filesystem": "local disk"}}  # fmt: skip
    for backend, t in times.items():
        for what in ("copy", "pull"):
            out[f"{backend}_{what}_mbps_best"] = round(mb / min(t[what]), 1)
            out[f"{backend}_{what}_mbps_median"] = round(mb / statistics.median(t[what]), 1)
        out[f"{backend}_copy_registry_cpu_s_median"] = round(statistics.median(t["reg_cpu"]), 2)
        if backend != "filesystem":
            out[f"{backend}_copy_server_cpu_s_median"] = round(statistics.median(t["srv_cpu"]), 2)
    for backend in objectstores.BACKENDS:
        for what in ("copy", "pull"):
            out[f"{backend}_{what}_vs_filesystem_median"] = round(
                out[f"{backend}_{what}_mbps_median"] / out[f"filesystem_{what}_mbps_median"], 3)
    print(json.dumps(out, sort_keys=True))


if __name__ == "__main__":
    main()
