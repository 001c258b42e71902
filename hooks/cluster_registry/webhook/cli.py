"""``cluster-registry webhook``: serve the pod mutating admission webhook."""

from __future__ import annotations

import asyncio
import logging
import os
import sys

import click
import uvloop
from prometheus_client import CollectorRegistry

from cluster_registry.errors import ConfigError
from cluster_registry.webhook.mutate import Mutator, Policy, Settings
from cluster_registry.webhook.pods import KubePods, PodWatch
from cluster_registry.webhook.recorder import KubeArtifactApi, Recorder, Recording
from cluster_registry.certs.serving import TlsFiles
from cluster_registry.webhook.server import Limits, Webhook, serve_forever
from cluster_registry.webhook.view import ArtifactView
from cluster_registry.webhook.workers import fit, memory_limit, supervise

log = logging.getLogger(__name__)


def split_host_port(text: str, default_port: int = 8443) -> tuple[str, int]:
    """``HOST:PORT``, ``[v6]:PORT``, or a bare host (default port)."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.lstrip(":")
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host, port = text, ""
    try:
        return host or "0.0.0.0", int(port) if port else default_port
    except ValueError as err:
        raise ConfigError(f"bad address {text!r}: the port must be a number") from err


@click.command()
@click.option("--listen", default="0.0.0.0:8443", show_default=True, help="HOST:PORT to serve HTTPS on.")
@click.option("--tls-cert", type=click.Path(dir_okay=False), help="PEM certificate chain (reloaded on change).")
@click.option("--tls-key", type=click.Path(dir_okay=False), help="PEM private key (reloaded on change).")
@click.option("--registry-host", required=True, help="The cluster registry as nodes pull from it (HOST:PORT).")
@click.option(
    "--rewrite-policy",
    type=click.Choice([p.value for p in Policy]),
    default=Policy.WHEN_READY.value,
    show_default=True,
    help="WhenReady: rewrite once the Artifact is Ready; Always: rewrite unconditionally.",
)
@click.option("--exclude-registry", multiple=True, help="Source registry never rewritten (repeatable; *.domain ok).")
@click.option("--allow-registry", multiple=True, help="Only rewrite these source registries (repeatable).")
@click.option("--kubeconfig", type=click.Path(dir_okay=False), help="Default: in-cluster, then $KUBECONFIG.")
@click.option(
    "--namespace",
    envvar=["CLUSTER_REGISTRY_WEBHOOK_NAMESPACE", "POD_NAMESPACE"],
    default="",
    help="The release namespace.",
)
@click.option(
    "--exclude-namespace",
    multiple=True,
    envvar="CLUSTER_REGISTRY_WEBHOOK_EXCLUDE_NAMESPACES",
    help="Namespace never rewritten nor recorded (repeatable; kube-system and --namespace always are).",
)
@click.option(
    "--record-unannotated/--no-record-unannotated",
    default=False,
    show_default=True,
    help="Record Artifacts for pods the webhook did not annotate too (pods older than the webhook): only "
    "right when the webhook's scope is the namespace exclusion alone.",
)
@click.option(
    "--pull-secret",
    envvar="CLUSTER_REGISTRY_WEBHOOK_PULL_SECRET",
    default="",
    help="Add this Secret (the namespace's pull credential) to pods with a rewritten image: the registry "
    "serves only authenticated pulls (registryAccess isolated). Empty: none (shared).",
)
@click.option("--leader-election/--no-leader-election", default=True, show_default=True,
              help="Record Artifacts only in the replica holding the Lease (in --namespace).")
@click.option("--lease-name", default="cluster-registry-webhook", show_default=True)
@click.option("--max-body-bytes", default=Limits.max_body, show_default=True, help="Larger request bodies get 413.")
@click.option("--max-concurrent", default=Limits.concurrent, show_default=True, help="Requests read and parsed at once.")
@click.option("--tls-reload-interval", default=5.0, show_default=True, help="Seconds between TLS file checks.")
@click.option("--batch-interval", default=0.2, show_default=True, help="Seconds to batch Artifact writes.")
@click.option(
    "--workers",
    type=click.IntRange(min=0),
    default=1,
    show_default=True,
    envvar="CLUSTER_REGISTRY_WEBHOOK_WORKERS",
    help="Serving processes on the one port, one per CPU (0: as many as this process may run on). "
    "Above 1 a supervisor runs them and the pod watch.",
)
@click.option("--serve-only", is_flag=True, hidden=True, help="A worker of a supervisor: no pod watch.")
@click.option(
    "--offline",
    is_flag=True,
    hidden=True,
    help="No API server: nothing is Ready and no Artifact is written (benchmarks, local trials).",
)
def webhook(
    listen: str,
    tls_cert: str | None,
    tls_key: str | None,
    registry_host: str,
    rewrite_policy: str,
    exclude_registry: tuple[str, ...],
    allow_registry: tuple[str, ...],
    kubeconfig: str | None,
    namespace: str,
    exclude_namespace: tuple[str, ...],
    record_unannotated: bool,
    pull_secret: str,
    leader_election: bool,
    lease_name: str,
    max_body_bytes: int,
    max_concurrent: int,
    tls_reload_interval: float,
    batch_interval: float,
    workers: int,
    serve_only: bool,
    offline: bool,
) -> None:
    """Serve the pod mutating admission webhook (AdmissionReview v1 on /mutate)."""
    host, port = split_host_port(listen)
    if not (tls_cert and tls_key):
        raise click.UsageError("--tls-cert and --tls-key are required (the API server only calls HTTPS)")
    excluded = (*exclude_namespace, namespace) if namespace else exclude_namespace
    mutator = Mutator(Settings.build(registry_host, rewrite_policy, exclude_registry, allow_registry, excluded, pull_secret))
    limits = Limits(max_body=max_body_bytes, concurrent=max_concurrent)
    tls = TlsFiles(str(tls_cert), str(tls_key))
    wanted = workers or len(os.sched_getaffinity(0))
    count = wanted if serve_only else fit(wanted, memory_limit())
    if count < wanted:
        log.warning("fewer webhook workers than asked: more would not fit in the memory limit",
                    extra={"asked": wanted, "workers": count, "memory_limit": memory_limit()})
    metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "") if serve_only else ""
    recording: Recording | None = None
    elector = None
    if offline:
        view = ArtifactView(None)
    else:
        from cluster_registry.kube import api_client
        from cluster_registry.kubeio import Kube
        from cluster_registry.leader import LeaderElector, LeaseLock

        client = api_client(kubeconfig)
        kube = Kube(client)
        view = ArtifactView(kube)
        if not serve_only:  # a worker leaves the pod watch to its supervisor: once per pod
            pods = PodWatch(KubePods(client), mutator, record_unannotated=record_unannotated)
            recording = Recording(Recorder(KubeArtifactApi(kube), view, batch_interval=batch_interval), pods)
            # without a namespace for its Lease (a trial outside the cluster) every process records
            elector = LeaderElector(LeaseLock(client, namespace, lease_name)) if leader_election and namespace else None
    # uvloop: its transports and TLS are compiled, a good part of each request's cost on asyncio's.
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        if count > 1 and not serve_only:
            tls.reload_if_changed()  # a missing or bad pair fails here, once, not in every worker
            runner.run(supervise(sys.argv[1:], count, recording, elector))
        else:
            hook = Webhook(mutator, view, tls, CollectorRegistry(), recording=recording, elector=elector, limits=limits,
                           multiprocess_dir=metrics_dir)
            runner.run(serve_forever(hook, host, port, tls_reload_interval, worker=serve_only))
