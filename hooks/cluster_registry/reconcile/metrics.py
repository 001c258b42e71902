"""Prometheus metrics of the reconcilers (one CollectorRegistry per process, so tests stay isolated)."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


@dataclass
class ArtifactMetrics:
    registry: CollectorRegistry
    copies: Counter
    copy_bytes: Counter
    copy_seconds: Histogram
    failures: Counter
    verifications: Counter
    queue_depth: Gauge
    queue_scheduled: Gauge
    artifacts: Gauge
    leader: Gauge


def artifact_metrics(registry: CollectorRegistry | None = None) -> ArtifactMetrics:
    r = registry or CollectorRegistry()
    return ArtifactMetrics(
        registry=r,
        copies=Counter(
            "cluster_registry_artifact_copies", "Copies attempted, by result (ready, failed, deferred)", ["result"], registry=r
        ),
        copy_bytes=Counter("cluster_registry_artifact_copy_bytes", "Bytes of blobs transferred into the cluster registry", registry=r),
        copy_seconds=Histogram(
            "cluster_registry_artifact_copy_duration_seconds",
            "Duration of copies, by result",
            ["result"],
            buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800),
            registry=r,
        ),
        failures=Counter(
            "cluster_registry_artifact_copy_failures", "Failed copies, by reason and kind (temporary, permanent)", ["reason", "kind"], registry=r
        ),
        verifications=Counter(
            "cluster_registry_artifact_verifications", "Re-verifications of Ready copies, by result (present, missing, error)", ["result"], registry=r
        ),
        queue_depth=Gauge("cluster_registry_artifact_queue_depth", "Destinations due for work now (waiting for a worker)", registry=r),
        queue_scheduled=Gauge("cluster_registry_artifact_queue_scheduled", "Destinations queued, due now or later (backoff, re-verification)", registry=r),
        artifacts=Gauge("cluster_registry_artifacts", "Artifacts known to the reconciler, by phase", ["phase"], registry=r),
        leader=Gauge("cluster_registry_leader", "1 while this process holds the leader Lease", ["controller"], registry=r),
    )


@dataclass
class ComponentMetrics:
    registry: CollectorRegistry
    reconciles: Counter
    renders: Counter
    components: Gauge
    leader: Gauge


def component_metrics(registry: CollectorRegistry | None = None) -> ComponentMetrics:
    r = registry or CollectorRegistry()
    return ComponentMetrics(
        registry=r,
        reconciles=Counter("cluster_registry_component_reconciles", "Component reconciles, by result (ok, error)", ["result"], registry=r),
        renders=Counter("cluster_registry_component_chart_renders", "helm template runs, by result (ok, error)", ["result"], registry=r),
        components=Gauge("cluster_registry_components", "Components, by Ready condition status", ["ready"], registry=r),
        leader=Gauge("cluster_registry_leader", "1 while this process holds the leader Lease", ["controller"], registry=r),
    )
