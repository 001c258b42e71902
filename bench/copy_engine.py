"""Copy-engine benchmark: cluster-registry copy vs skopeo copy vs crane copy (a script, not a test).

Cases, each copied by every tool into its own fresh destination registry (distribution v3 on
loopback, plain HTTP), from one shared source registry:

  a  one image of 4 x 256 MiB layers (1 GiB)
  b  a 3-platform OCI index, ~100 MB per platform (2 x 50 MB layers each)
  c  one image of 200 layers of ~100 KB
  d  re-copy of (a) into a destination that already holds it

Also the ingest ceiling: the four (a) blobs uploaded in parallel from memory (POST + PUT) into a
fresh registry: how fast the destination itself can take them (best of at least 3 tries). And the
splice bound: the same four blobs copied from the source with no work in user space (each GET
spliced into its PUT in the kernel, nothing verified): the fastest copy any tool could make on
this machine, where the source registry, the copier and the destination share the cores.

Each tool runs ``--rounds`` times per case (default 2) in an order rotated by round and case,
each run into a fresh registry after ``sync``; the best run is reported (the least disturbed by
other load), and beside it the median (``s_median``, ``ratio_<peer>_median``,
``engine_vs_ceiling_median``): one run swings by 10-20% here with the disk's flush speed.
Reported per tool: wall seconds (whole process, interpreter start-up included), MB/s over the
image's blob bytes (MB = 10^6 bytes), the CPU seconds of the tool and of the two registries
during its run (the three share the machine's cores), and for the engine its own in-process
seconds and the peak RSS of the copy process. Ratios are engine MB/s (wall) over the peer's.
The last line is one JSON object.

    .venv/bin/python bench/copy_engine.py [--only a,b,c,d] [--skip-peers]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.ociimages import PLATFORMS, Image, Pusher, layer_chunks, push_image, push_index  # noqa: E402
from tests.support.registry import Registry, cpu_seconds, run_measured, start_registry  # noqa: E402

MiB = 1 << 20


def run(cmd: list[str], timeout: float = 1800) -> tuple[float, int, str]:
    """(wall seconds, peak RSS KiB, stdout) of one process; raises on failure."""
    m = run_measured(cmd, timeout=timeout, cwd=ROOT)
    if m.code != 0:
        raise RuntimeError(f"{cmd[0]} failed: {m.stderr[-2000:]} {m.stdout[-500:]}")
    return m.wall, m.rss_kib, m.stdout


def children_cpu() -> float:
    """CPU seconds of every child process waited for so far (the tools, not the registries)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def registry_cpu(*regs: Registry) -> float:
    """CPU seconds the running registries have used so far."""
    return sum(cpu_seconds(reg.proc.pid) for reg in regs)


def engine(src: str, dst: str) -> dict[str, Any]:
    wall, rss, out = run([sys.executable, "-m", "cluster_registry", "copy", src, dst, "--src-insecure", "--dest-insecure"])
    summary = json.loads(out.strip().splitlines()[-1])
    return {"wall": wall, "engine_seconds": summary["seconds"], "rss_mb": round(rss / 1024, 1), "summary": summary}


def skopeo(src: str, dst: str, multi: bool) -> dict[str, Any]:
    cmd = ["skopeo", "copy", "--src-tls-verify=false", "--dest-tls-verify=false", "-q"]
    cmd += ["--multi-arch", "all"] if multi else []
    wall, rss, _ = run(cmd + [f"docker://{src}", f"docker://{dst}"])
    return {"wall": wall, "rss_mb": round(rss / 1024, 1)}


def crane(src: str, dst: str) -> dict[str, Any]:
    binary = str(ROOT / ".cache/bin/crane") if (ROOT / ".cache/bin/crane").exists() else "crane"
    wall, rss, _ = run([binary, "copy", "--insecure", src, dst])
    return {"wall": wall, "rss_mb": round(rss / 1024, 1)}


def ingest_ceiling(host: str, blobs: list[tuple[str, bytes]], parallel: int) -> float:
    """MB/s of POST + monolithic PUT uploads of ``blobs`` from memory, ``parallel`` threads with
    blocking sockets (so the probe itself is not limited to one core)."""
    def one(i: int, digest: str, data: bytes) -> None:
        conn, put = _start_upload(host, f"ceiling{i}", digest)
        conn.request("PUT", put, body=memoryview(data),
                     headers={"Content-Type": "application/octet-stream", "Content-Length": str(len(data))})
        r = conn.getresponse()
        body = r.read()
        assert r.status == 201, (r.status, body[:200])
        conn.close()

    t0 = time.monotonic()
    with ThreadPoolExecutor(parallel) as pool:
        list(pool.map(lambda a: one(*a), [(i, d, b) for i, (d, b) in enumerate(blobs)]))
    return sum(len(b) for _, b in blobs) / (time.monotonic() - t0) / 1e6


def splice_bound(src: str, dst: str, repo: str, blobs: list[tuple[str, int]]) -> float:
    """MB/s of the fastest copy of ``blobs`` any tool could make here: each source GET handed to
    the destination's PUT inside the kernel (``splice``: no byte enters this process, nothing is
    verified), all in parallel. A copier also hashes and moves every byte through user space."""
    def one(digest: str, size: int) -> None:
        up, put = _start_upload(dst, repo, digest)
        up.putrequest("PUT", put)
        up.putheader("Content-Type", "application/octet-stream")
        up.putheader("Content-Length", str(size))
        up.endheaders()
        name, _, port = src.rpartition(":")
        with socket.create_connection((name, int(port)), timeout=600) as down:
            down.sendall(f"GET /v2/{repo}/blobs/{digest} HTTP/1.1\r\nHost: {src}\r\n\r\n".encode())
            head = b""
            while not head.endswith(b"\r\n\r\n"):  # byte by byte: the body must stay in the socket
                head += down.recv(1)
            assert head.startswith(b"HTTP/1.1 200") and f"\r\ncontent-length: {size}\r\n".encode() in head.lower()
            assert up.sock is not None
            down.settimeout(None)  # splice wants blocking descriptors (a timeout makes them non-blocking)
            up.sock.settimeout(None)
            pipe_r, pipe_w = os.pipe()
            try:
                left = size
                while left:
                    n = os.splice(down.fileno(), pipe_w, min(left, 1 << 20))
                    assert n > 0, "source closed early"
                    left -= n
                    while n:
                        n -= os.splice(pipe_r, up.sock.fileno(), n)
            finally:
                os.close(pipe_r)
                os.close(pipe_w)
        r = up.getresponse()
        r.read()
        assert r.status == 201, r.status
        up.close()

    t0 = time.monotonic()
    with ThreadPoolExecutor(len(blobs)) as pool:
        list(pool.map(lambda b: one(*b), blobs))
    return sum(size for _, size in blobs) / (time.monotonic() - t0) / 1e6


def _start_upload(host: str, repo: str, digest: str) -> tuple[http.client.HTTPConnection, str]:
    """A connection to registry ``host`` with an upload to ``repo`` opened, and the path of the PUT
    that finishes it as blob ``digest``."""
    name, _, port = host.rpartition(":")
    conn = http.client.HTTPConnection(name, int(port), timeout=600)
    conn.request("POST", f"/v2/{repo}/blobs/uploads/")
    r = conn.getresponse()
    r.read()
    assert r.status == 202, r.status
    loc = r.getheader("Location", "")
    loc = loc.split("://", 1)[1].split("/", 1)[1] if "://" in loc else loc.lstrip("/")
    return conn, f"/{loc}{'&' if '?' in loc else '?'}digest={digest}"


def blob_bytes(img: Image) -> int:
    return sum(size for _, size in img.all_blobs())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="a,b,c,d")
    ap.add_argument("--skip-peers", action="store_true")
    ap.add_argument("--scale", type=float, default=1.0, help="shrink every size (smoke runs)")
    ap.add_argument("--rounds", type=int, default=2, help="runs per tool and case; the best is reported")
    args = ap.parse_args()
    cases = args.only.split(",")
    work = Path(tempfile.mkdtemp(prefix="bench-copy-", dir=os.environ.get("BENCH_TMP")))
    started: list[Registry] = []

    def registry(name: str) -> Registry:
        reg = start_registry(work / name)
        started.append(reg)
        return reg

    def done(reg: Registry) -> None:
        reg.stop()
        shutil.rmtree(reg.root, ignore_errors=True)

    peers = [] if args.skip_peers else [
        p for p in ("skopeo", "crane") if shutil.which(p) or (ROOT / ".cache/bin" / p).exists()
    ]
    if not args.skip_peers and len(peers) < 2:
        print(f"warning: only these peers are installed: {peers}", file=sys.stderr)
    figures: dict[str, Any] = {"tools": {}}
    # The engine runs from this tree: compile its modules as the container image ships them
    # (hooks/Containerfile runs compileall), else every run pays for compiling them from source
    # wherever PYTHONDONTWRITEBYTECODE is set.
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "hooks" / "cluster_registry")], check=True)
    load_before = os.getloadavg()[0]
    try:
        src = registry("src")
        sp = Pusher(src.host)
        big = int(256 * MiB * args.scale)
        t0 = time.monotonic()
        images: dict[str, Image] = {}
        if "a" in cases or "d" in cases:
            images["a"] = push_image(sp, "bench/a", "1", layers=[big] * 4, seed=101)
        if "b" in cases:
            images["b"] = push_index(sp, "bench/b", "1", PLATFORMS[:3], layers=[int(50e6 * args.scale)] * 2, seed=102)
        if "c" in cases:
            images["c"] = push_image(sp, "bench/c", "1", layers=[100_000 + i for i in range(200)], seed=103)
        print(f"source images pushed in {time.monotonic() - t0:.1f}s", file=sys.stderr)

        for tool in ["engine", *peers]:
            figures["tools"][tool] = {}
        tools = ["engine", *peers]
        for n, case in enumerate(c for c in ("a", "b", "c") if c in cases):
            img = images[case]
            size = blob_bytes(img)
            row: dict[str, Any] = {"bytes": size}
            trials: dict[str, list[dict[str, Any]]] = {t: [] for t in tools}
            for rnd in range(args.rounds):
                # Rotate who goes first by round and by case: with --rounds 1 the engine is not always
                # the first to run after the source pushes or the previous case's clean-up.
                first = (rnd + n) % len(tools)
                order = tools[first:] + tools[:first]
                for tool in order:
                    dst = registry(f"dst-{case}-{tool}-{rnd}")
                    s, d = f"{src.host}/{img.repo}:1", f"{dst.host}/{img.repo}:1"
                    os.sync()  # start each run without the previous one's dirty pages in flight
                    cpu0, reg0 = children_cpu(), registry_cpu(src, dst)
                    res = engine(s, d) if tool == "engine" else skopeo(s, d, case == "b") if tool == "skopeo" else crane(s, d)
                    res["cpu_s"] = round(children_cpu() - cpu0, 2)
                    res["registries_cpu_s"] = round(registry_cpu(src, dst) - reg0, 2)
                    res["mbps"] = round(size / res["wall"] / 1e6, 1)
                    if tool == "engine":
                        res["mbps_in_process"] = round(size / res["engine_seconds"] / 1e6, 1)
                        res.pop("summary")
                    if case == "a" and "d" in cases:  # (d): the same copy again, everything present; best of 3
                        tries = [engine(s, d) if tool == "engine" else (
                            skopeo(s, d, False) if tool == "skopeo" else crane(s, d)) for _ in range(3)]
                        res["recopy"] = min(tries, key=lambda t: t["wall"])
                        if tool == "engine":
                            res["recopy"]["engine_seconds"] = min(t["engine_seconds"] for t in tries)
                            assert all(t["summary"]["bytes_copied"] == 0 for t in tries)
                        res["recopy"].pop("summary", None)
                    trials[tool].append(res)
                    print(f"{case} round {rnd} {tool}: {json.dumps(res)}", file=sys.stderr)
                    done(dst)
            for tool in tools:  # best of the rounds: the run least disturbed by the machine's other load
                best = dict(min(trials[tool], key=lambda t: t["wall"]))
                best["wall_median"] = statistics.median(t["wall"] for t in trials[tool])
                if tool == "engine":
                    best["engine_seconds"] = min(t["engine_seconds"] for t in trials[tool])
                    best["mbps_in_process"] = round(size / best["engine_seconds"] / 1e6, 1)
                    best["rss_mb"] = max(t["rss_mb"] for t in trials[tool])
                if "recopy" in best:
                    best["recopy"] = dict(min((t["recopy"] for t in trials[tool]), key=lambda r: r["wall"]))
                    if tool == "engine":
                        best["recopy"]["engine_seconds"] = min(t["recopy"]["engine_seconds"] for t in trials[tool])
                row[tool] = best
            for peer in peers:
                row[f"ratio_{peer}"] = round(row["engine"]["mbps"] / row[peer]["mbps"], 2)
                row[f"ratio_{peer}_median"] = round(row[peer]["wall_median"] / row["engine"]["wall_median"], 2)
                row[f"ratio_{peer}_in_process"] = round(row["engine"]["mbps_in_process"] / row[peer]["mbps"], 2)
            figures[case] = row

        if "a" in images:
            def reference(key: str, measure: Callable[[Registry], float]) -> None:
                """``figures[key]``: the best MB/s of ``measure`` into a fresh registry, its median beside.
                At least 3 tries whatever --rounds says: one try swings 2x with the disk's flush speed
                (the registry fsyncs each blob), and a reference must not fall below a copy."""
                tries = []
                for rnd in range(max(args.rounds, 3)):
                    dst = registry(f"{key}-{rnd}")
                    os.sync()
                    tries.append(measure(dst))
                    done(dst)
                figures[key] = round(max(tries), 1)
                figures[f"{key}_median"] = round(statistics.median(tries), 1)

            blobs = []
            for i in range(4):
                data = b"".join(layer_chunks(101 * 100_003 + i, big))
                blobs.append(("sha256:" + __import__("hashlib").sha256(data).hexdigest(), data))
            for parallel in (4, 1):
                reference(f"ceiling_mbps_p{parallel}", lambda dst: ingest_ceiling(dst.host, blobs, parallel))
            del blobs
            # The same four blobs copied with no work in user space: what any copier could reach.
            layers = [b for b in images["a"].all_blobs() if b[1] == big]
            reference("splice_bound_mbps", lambda dst: splice_bound(src.host, dst.host, images["a"].repo, layers))
            if "a" in figures:
                figures["a"]["engine_vs_splice_bound"] = round(figures["a"]["engine"]["mbps"] / figures["splice_bound_mbps"], 2)
                figures["a"]["engine_vs_ceiling"] = round(figures["a"]["engine"]["mbps"] / figures["ceiling_mbps_p4"], 2)
                figures["a"]["engine_in_process_vs_ceiling"] = round(
                    figures["a"]["engine"]["mbps_in_process"] / figures["ceiling_mbps_p4"], 2)
                median_mbps = figures["a"]["bytes"] / figures["a"]["engine"]["wall_median"] / 1e6
                figures["a"]["engine_vs_ceiling_median"] = round(median_mbps / figures["ceiling_mbps_p4_median"], 2)
    finally:
        for reg in started:
            reg.stop()
        shutil.rmtree(work, ignore_errors=True)

    compact: dict[str, Any] = {}
    for case in ("a", "b", "c"):
        if case in figures:
            r = figures[case]
            compact[case] = {"MB": round(r["bytes"] / 1e6, 1)} | {
                t: {"s": round(r[t]["wall"], 2), "s_median": round(r[t]["wall_median"], 2), "MBps": r[t]["mbps"], "cpu_s": r[t]["cpu_s"],
                    "reg_cpu_s": r[t]["registries_cpu_s"]} | (
                    {"engine_s": r[t]["engine_seconds"], "rss_mb": r[t]["rss_mb"]} if t == "engine" else {"rss_mb": r[t]["rss_mb"]})
                for t in ["engine", *peers]
            } | {k: v for k, v in r.items() if k.startswith(("ratio_", "engine_"))}
    if "a" in figures and "d" in cases:
        compact["d"] = {t: {"s": round(figures["a"][t]["recopy"]["wall"], 3)} for t in ["engine", *peers]}
        compact["d"]["engine"]["engine_s"] = figures["a"]["engine"]["recopy"]["engine_seconds"]
    for k in ("ceiling_mbps_p4", "ceiling_mbps_p1", "ceiling_mbps_p4_median", "ceiling_mbps_p1_median",
              "splice_bound_mbps", "splice_bound_mbps_median"):
        if k in figures:
            compact[k] = figures[k]
    compact["loadavg_1m"] = [round(load_before, 1), round(os.getloadavg()[0], 1)]
    compact["cpus"] = os.cpu_count()
    print(json.dumps(compact, sort_keys=True))


if __name__ == "__main__":
    main()
