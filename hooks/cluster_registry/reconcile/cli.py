"""``cluster-registry reconcile artifacts|components``: the long-running reconcilers.

Each runs its controller only while holding a Lease in ``--namespace`` (``--no-leader-election``
to run without), and serves ``/healthz``, ``/readyz`` and ``/metrics`` on ``--http-listen``.
Every option is also an environment variable, e.g. ``CLUSTER_REGISTRY_RECONCILE_ARTIFACTS_WORKERS``.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

import click

from cluster_registry import kube as kubeconf
from cluster_registry.errors import ConfigError
from cluster_registry.health import HealthServer
from cluster_registry.kubeio import Kube
from cluster_registry.leader import LeaderElector, LeaseLock, default_identity
from cluster_registry.oci.auth import read_credentials_file
from cluster_registry.reconcile import artifacts as arts
from cluster_registry.reconcile import components as comps
from cluster_registry.reconcile import status as st
from cluster_registry.reconcile.metrics import artifact_metrics, component_metrics
from cluster_registry.reconcile.pullsecrets import KubeSecrets, PullSecrets, rotate_keys

log = logging.getLogger(__name__)


def _common(prefix: str, lease: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Options shared by both reconcilers."""

    def wrap(f: Callable[..., Any]) -> Callable[..., Any]:
        options = [
            click.option("--kubeconfig", type=click.Path(dir_okay=False), default=None, help="default: in-cluster, then $KUBECONFIG"),
            click.option(
                "--namespace", envvar=[f"{prefix}NAMESPACE", "POD_NAMESPACE"], default="default", show_default=True,
                help="the release namespace (holds the leader Lease)",
            ),
            click.option("--leader-election/--no-leader-election", default=True, show_default=True),
            click.option("--lease-name", default=lease, show_default=True),
            click.option("--lease-duration", type=float, default=15.0, show_default=True, help="seconds"),
            click.option("--renew-deadline", type=float, default=10.0, show_default=True, help="seconds"),
            click.option("--retry-period", type=float, default=2.0, show_default=True, help="seconds"),
            click.option("--http-listen", default="0.0.0.0:8080", show_default=True, help="/healthz /readyz /metrics"),
            click.option("--insecure-registry", multiple=True, help="registry host spoken to over plain HTTP (repeatable)"),
            click.option("--ca-bundle", type=click.Path(exists=True, dir_okay=False), default=None, help="extra CAs (PEM)"),
            click.option("--watch-namespace", default=None, help="reconcile only this namespace (default: every namespace)"),
        ]
        for option in reversed(options):
            f = option(f)
        return f

    return wrap


@click.group()
def reconcile() -> None:
    """The artifact and component reconcilers."""


@reconcile.command()
@_common("CLUSTER_REGISTRY_RECONCILE_ARTIFACTS_", "cluster-registry-artifact-reconciler")
@click.option("--registry-host", required=True, help="HOST:PORT of the cluster registry (where to push)")
@click.option("--registry-insecure", is_flag=True, help="push over plain HTTP")
@click.option("--registry-credentials-file", type=click.Path(dir_okay=False), default=None, help="YAML/JSON {username, password}")
@click.option("--workers", type=click.IntRange(1, 64), default=4, show_default=True)
@click.option("--verify-interval", type=float, default=600.0, show_default=True, help="seconds between re-verifications of Ready copies")
@click.option("--backoff-base", type=float, default=5.0, show_default=True, help="first retry after a temporary failure (s)")
@click.option("--backoff-max", type=float, default=300.0, show_default=True)
@click.option("--permanent-backoff-base", type=float, default=300.0, show_default=True, help="first retry after a permanent failure (s)")
@click.option("--permanent-backoff-max", type=float, default=3600.0, show_default=True)
@click.option("--deferred-retry", type=float, default=10.0, show_default=True, help="retry interval while GC holds the write lock (s)")
@click.option("--max-image-size", type=click.IntRange(0), default=0, show_default=True,
              help="bytes of blobs one image may declare; larger images fail before any blob is fetched (0: no limit)")
@click.option("--namespace-quota", type=click.IntRange(0), default=0, show_default=True,
              help="bytes of Ready images one namespace may hold; past it its Artifacts fail with QuotaExceeded (0: none)")
@click.option("--progress-delay", type=click.FloatRange(0), default=5.0, show_default=True,
              help="write Pending and Copying (status and Event) only for a copy still running this many seconds after it "
              "began; 0: at once (two more status writes and an Event per Artifact)")
@click.option("--pull-secret", default="", help="registryAccess isolated: keep this pull Secret in every namespace with an "
              "Artifact (empty: none, the registry is shared)")
@click.option("--pull-secret-host", default="", help="the registry host the pull Secrets are for: where the webhook rewrites to")
@click.option("--pull-keys", default="", help="the release's key Secret in --namespace (created when missing)")
def artifacts(
    kubeconfig: str | None, namespace: str, leader_election: bool, lease_name: str, lease_duration: float,
    renew_deadline: float, retry_period: float, http_listen: str, insecure_registry: tuple[str, ...],
    ca_bundle: str | None, watch_namespace: str | None, registry_host: str, registry_insecure: bool, registry_credentials_file: str | None,
    workers: int, verify_interval: float, backoff_base: float, backoff_max: float,
    permanent_backoff_base: float, permanent_backoff_max: float, deferred_retry: float, max_image_size: int,
    namespace_quota: int, progress_delay: float, pull_secret: str, pull_secret_host: str, pull_keys: str,
) -> None:
    """Copy every Artifact's image into the cluster registry and report its status."""
    identity = default_identity()
    config = arts.Config(
        registry_host=registry_host,
        registry_insecure=registry_insecure,
        registry_credentials=read_credentials_file(registry_credentials_file) if registry_credentials_file else None,
        registry_credentials_file=registry_credentials_file,
        workers=workers,
        insecure_registries=frozenset(insecure_registry),
        ca_bundle=ca_bundle,
        verify_interval=verify_interval,
        policy=st.BackoffPolicy(backoff_base, backoff_max, permanent_backoff_base, permanent_backoff_max, deferred_retry),
        identity=identity,
        watch_namespace=watch_namespace,
        max_image_size=max_image_size,
        namespace_quota=namespace_quota,
        progress_delay=progress_delay,
    )
    metrics = artifact_metrics()
    api = kubeconf.api_client(kubeconfig)
    kube = Kube(api)
    secrets = None
    if pull_secret:
        if not (pull_secret_host and pull_keys):
            raise click.UsageError("--pull-secret needs --pull-secret-host and --pull-keys")
        secrets = PullSecrets(KubeSecrets(kube.core), namespace, pull_keys, pull_secret, pull_secret_host)
    reconciler = arts.ArtifactReconciler(kube, config, metrics, pull_secrets=secrets)

    def synced() -> bool:
        return reconciler.informer is not None and reconciler.informer.synced.is_set()

    _serve(
        "artifacts", reconciler.run, api, namespace, identity, leader_election, lease_name, lease_duration,
        renew_deadline, retry_period, http_listen, metrics.registry, metrics.leader, synced,
    )


@reconcile.command()
@_common("CLUSTER_REGISTRY_RECONCILE_COMPONENTS_", "cluster-registry-component-reconciler")
@click.option("--helm", "helm_bin", default="helm", show_default=True, help="the helm binary")
@click.option("--workers", type=click.IntRange(1, 16), default=2, show_default=True)
@click.option("--resync", type=float, default=300.0, show_default=True, help="seconds between full resyncs")
@click.option("--kube-version", default=None, help="Kubernetes version charts are rendered for (default: the API server's)")
@click.option(
    "--registry-host", default=None,
    help="this installation's cluster registry; Components annotated clusterregistry.io/registry for another are skipped",
)
def components(
    kubeconfig: str | None, namespace: str, leader_election: bool, lease_name: str, lease_duration: float,
    renew_deadline: float, retry_period: float, http_listen: str, insecure_registry: tuple[str, ...],
    ca_bundle: str | None, watch_namespace: str | None, helm_bin: str, workers: int, resync: float,
    kube_version: str | None, registry_host: str | None,
) -> None:
    """Create the Artifacts of every Component (listed images, chart images) and report readiness."""
    identity = default_identity()
    config = comps.Config(
        helm=helm_bin, workers=workers, insecure_registries=frozenset(insecure_registry), ca_bundle=ca_bundle,
        resync=resync, identity=identity, watch_namespace=watch_namespace, kube_version=kube_version,
        registry_host=registry_host,
    )
    metrics = component_metrics()
    api = kubeconf.api_client(kubeconfig)
    reconciler = comps.ComponentReconciler(Kube(api), config, metrics)
    _serve(
        "components", reconciler.run, api, namespace, identity, leader_election, lease_name, lease_duration,
        renew_deadline, retry_period, http_listen, metrics.registry, metrics.leader, lambda: reconciler.synced,
    )


def _serve(
    name: str, work: Callable[[], Awaitable[None]], api: Any, namespace: str, identity: str, leader_election: bool,
    lease_name: str, lease_duration: float, renew_deadline: float, retry_period: float, http_listen: str,
    registry: Any, leader_gauge: Any, synced: Callable[[], bool],
) -> None:
    elector: LeaderElector | None = None
    if leader_election:
        elector = LeaderElector(
            LeaseLock(api, namespace, lease_name, identity, lease_duration),
            renew_deadline=renew_deadline, retry_period=retry_period,
        )

    def ready() -> bool | str:
        if elector is None:
            return True if synced() else "caches not synced yet"
        if time.monotonic() - elector.last_contact > lease_duration * 2:
            return "no answer from the API server"
        if elector.is_leader and not synced():
            return "leading; caches not synced yet"
        return True

    async def leading() -> None:
        leader_gauge.labels(name).set(1)
        try:
            await work()
        finally:
            leader_gauge.labels(name).set(0)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        server = HealthServer(http_listen, registry, ready=ready)
        await server.start()
        log.info("reconciler starting", extra={"reconciler": name, "identity": identity, "leader_election": leader_election})
        try:
            if elector is not None:
                await elector.run(leading, stop)
            else:
                task = asyncio.ensure_future(leading())
                stopper = asyncio.ensure_future(stop.wait())
                await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
                stopper.cancel()
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        finally:
            await server.stop()
            log.info("reconciler stopped", extra={"reconciler": name})

    try:
        asyncio.run(main())
    except ConfigError as err:
        raise click.ClickException(err.message) from None


__all__ = ["reconcile"]


@reconcile.command("rotate-pull-keys")
@click.option("--kubeconfig", type=click.Path(dir_okay=False), default=None, help="default: in-cluster, then $KUBECONFIG")
@click.option("--namespace", envvar="POD_NAMESPACE", required=True, help="the release namespace")
@click.option("--pull-keys", required=True, help="the release's key Secret")
def rotate_pull_keys(kubeconfig: str | None, namespace: str, pull_keys: str) -> None:
    """Rotate the pull-credential keys: previous <- current, current <- new (the artifact reconciler then
    rewrites every namespace's pull Secret; both keys authenticate meanwhile)."""
    try:
        rotate_keys(KubeSecrets(Kube(kubeconf.api_client(kubeconfig)).core), namespace, pull_keys)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    click.echo(f"rotated {namespace}/{pull_keys}")
