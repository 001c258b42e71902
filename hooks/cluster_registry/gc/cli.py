"""``cluster-registry gc``: one GC run (``--once``, what the CronJob runs) or a run every ``--interval``.

The last line on stdout is the JSON report of counters; exit 1 when the run failed.
"""

from __future__ import annotations

import json
import os
import sys
import time

import click

from cluster_registry import kube
from cluster_registry.gc import objectstore
from cluster_registry.gc.run import Options, Report, run_once
from cluster_registry.oci.auth import read_credentials_file
from cluster_registry.units import parse_bytes, parse_duration


def _metrics(listen: str | None) -> object | None:
    if not listen:
        return None
    from prometheus_client import CollectorRegistry, Gauge, start_http_server

    reg = CollectorRegistry()
    host, _, port = listen.rpartition(":")
    start_http_server(int(port), addr=host or "0.0.0.0", registry=reg)
    return {
        name: Gauge(f"cluster_registry_gc_{name}", help_, registry=reg)
        for name, help_ in [
            ("last_run_timestamp_seconds", "when the last GC run ended"),
            ("last_run_success", "1 if the last GC run succeeded"),
            ("usage_bytes", "registry usage after the last run"),
            ("bytes_freed", "bytes freed by the last run"),
            ("manifests_deleted", "manifests deleted by the last run"),
            ("blobs_deleted", "blobs deleted by the last run"),
            ("artifacts_deleted", "Artifacts deleted by the last run"),
            ("window_seconds", "read-only window of the last run"),
            ("run_seconds", "duration of the last run"),
        ]
    }


def _observe(gauges: object | None, rep: Report) -> None:
    if not isinstance(gauges, dict):
        return
    values = {
        "last_run_timestamp_seconds": time.time(),
        "last_run_success": 0 if rep.error else 1,
        "usage_bytes": rep.usageBytesAfter,
        "bytes_freed": rep.bytesFreed,
        "manifests_deleted": rep.manifestsDeleted,
        "blobs_deleted": rep.blobsDeleted,
        "artifacts_deleted": rep.artifactsDeleted,
        "window_seconds": rep.windowSeconds,
        "run_seconds": rep.runSeconds,
    }
    for k, v in values.items():
        gauges[k].set(v)


@click.command()
@click.option("--dry-run", is_flag=True, help="Delete nothing; print what would be deleted.")
@click.option("--once", is_flag=True, help="One run, then exit (the CronJob); otherwise run every --interval.")
@click.option("--interval", default="24h", show_default=True, help="Between runs when not --once.")
@click.option("--registry-url", default="http://127.0.0.1:5000", show_default=True, help="The registry API (distribution).")
@click.option("--registry-credentials-file", type=click.Path(dir_okay=False), help="YAML/JSON {username, password} for deletes.")
@click.option("--registry-host", "registry_hosts", multiple=True, help="How pods name the cluster registry (rewritten references); repeatable.")
@click.option("--storage-root", type=click.Path(file_okay=False),
              help="The filesystem driver's rootdirectory (usage, inventory); without it both go through the API.")  # fmt: skip
@click.option("--object-storage", is_flag=True,
              help="Read usage and blobs freed from the s3 bucket or azure container of --registry-config.")  # fmt: skip
@click.option("--storage-size", default="100Gi", show_default=True, help="The registry volume's size.")
@click.option("--threshold", default=0, show_default=True, type=click.IntRange(0, 100), help="Run only at or above this usage percent; 0 always runs.")
@click.option("--grace", default="1h", show_default=True, help="Images copied within this period are kept.")
@click.option("--lock-name", default="cluster-registry-gc", show_default=True, help="The GC Lease (the write lock the token service replicas honour).")
@click.option("--namespace", envvar=["CLUSTER_REGISTRY_GC_NAMESPACE", "POD_NAMESPACE"], default="default", show_default=True)
@click.option("--kubeconfig", type=click.Path(dir_okay=False))
@click.option("--registry-config", type=click.Path(dir_okay=False), help="Config for `registry garbage-collect` (default: generated over --storage-root).")
@click.option("--registry-binary", help="The distribution `registry` binary (default: PATH, then .cache/bin).")
@click.option("--drain-timeout", default="60s", show_default=True, help="How long to wait for every token service replica to acknowledge the lock (its push tokens dead).")
@click.option("--quiet-wait", default="30s", show_default=True,
              help="Before the lock, wait at most this long for the push tokens the token service replicas issued to die (their heartbeats say when), so the read-only window does not spend their TTL; 0 turns it off.")
@click.option("--max-window", default="5m", show_default=True,
              help="The read-only window's bound: a sweep still running then is aborted and writes resume.")
@click.option("--lease-duration", default=15, show_default=True, type=click.IntRange(5, 45), help="The lock's TTL in seconds (a dead GC frees writes within it).")
@click.option("--no-sweep", is_flag=True, help="Soft delete only; skip the read-only window.")
@click.option("--sweep-mode", type=click.Choice(["online", "trash", "distribution"]), default="online", show_default=True,
              help="online (filesystem driver): distribution's mark, then the renames of what goes out of the "
                   "registry's tree, run before the window; the window puts back what was written since names, the "
                   "rest is deleted after. trash: the mark and the renames inside the window. distribution: `registry garbage-collect` deletes inside the window (object storage "
                   "always sweeps this way).")  # fmt: skip
@click.option("--metrics-listen", help="HOST:PORT to serve Prometheus metrics on while running.")
@click.option("--artifact-namespace", "artifact_namespaces", multiple=True,
              help="Delete Artifacts only in these namespaces (repeatable; default all). References are read cluster-wide.")  # fmt: skip
def gc(
    dry_run: bool,
    once: bool,
    interval: str,
    registry_url: str,
    registry_credentials_file: str | None,
    registry_hosts: tuple[str, ...],
    storage_root: str | None,
    object_storage: bool,
    storage_size: str,
    threshold: int,
    grace: str,
    lock_name: str,
    namespace: str,
    kubeconfig: str | None,
    registry_config: str | None,
    registry_binary: str | None,
    drain_timeout: str,
    quiet_wait: str,
    max_window: str,
    lease_duration: int,
    no_sweep: bool,
    sweep_mode: str,
    metrics_listen: str | None,
    artifact_namespaces: tuple[str, ...],
) -> None:
    """Garbage-collect the cluster registry."""
    if object_storage and not registry_config:
        raise click.UsageError("--object-storage reads the store from --registry-config")
    opts = Options(
        registry_url=registry_url,
        storage_root=os.path.abspath(storage_root) if storage_root else None,
        storage_size=parse_bytes(storage_size),
        threshold=threshold,
        grace=int(parse_duration(grace)),
        lock_name=lock_name,
        namespace=namespace,
        registry_config=registry_config,
        registry_binary=registry_binary,
        credentials=read_credentials_file(registry_credentials_file) if registry_credentials_file else None,
        local_hosts=frozenset(registry_hosts),
        drain_timeout=float(parse_duration(drain_timeout)),
        quiet_wait=float(parse_duration(quiet_wait)),
        max_window=float(parse_duration(max_window)),
        lease_seconds=lease_duration,
        dry_run=dry_run,
        sweep=not no_sweep,
        sweep_mode=sweep_mode,
        artifact_namespaces=frozenset(artifact_namespaces),
        object_store=objectstore.load(registry_config) if object_storage and registry_config else None,
    )
    api = kube.api_client(kubeconfig)
    gauges = _metrics(metrics_listen)
    pause = parse_duration(interval)
    while True:
        rep = run_once(opts, api)
        _observe(gauges, rep)
        if rep.windowSeconds:
            print(rep.window_line())
        print(json.dumps(rep.as_dict(), sort_keys=True), flush=True)
        if once or pause <= 0:
            sys.exit(1 if rep.error else 0)
        time.sleep(pause)
