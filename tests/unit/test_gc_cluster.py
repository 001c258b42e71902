"""GC's reading of Kubernetes objects into image lists (pure helpers of the adapter)."""

from __future__ import annotations

from cluster_registry.gc.cluster import parse_time, pod_images, template_images


def test_pod_images_include_spec_and_running_image_ids() -> None:
    pod = {
        "spec": {"initContainers": [{"name": "i", "image": "busybox"}], "containers": [{"name": "c", "image": "nginx:1"}]},
        "status": {"containerStatuses": [{"image": "docker.io/library/nginx:1",
                                          "imageID": "docker.io/library/nginx@sha256:" + "a" * 64}]},
    }  # fmt: skip
    assert pod_images(pod) == ("busybox", "nginx:1", "docker.io/library/nginx:1", "docker.io/library/nginx@sha256:" + "a" * 64)


def test_template_images_of_every_templated_kind() -> None:
    spec = {"containers": [{"name": "c", "image": "app:1"}], "initContainers": [{"name": "i", "image": "init:1"}]}
    for kind in ("Deployment", "ReplicaSet", "StatefulSet", "DaemonSet", "Job", "ReplicationController"):
        assert set(template_images(kind, {"spec": {"template": {"spec": spec}}})) == {"app:1", "init:1"}, kind
    assert template_images("CronJob", {"spec": {"jobTemplate": {"spec": {"template": {"spec": spec}}}}}) == ("init:1", "app:1")
    # A StatefulSet's/DaemonSet's rollback history: the template patch inside a ControllerRevision.
    assert template_images("ControllerRevision", {"data": {"spec": {"template": {"spec": spec}}}}) == ("init:1", "app:1")
    assert template_images("ControllerRevision", {"data": {}}) == ()


def test_parse_time() -> None:
    t = parse_time("2026-01-02T03:04:05Z")
    assert t is not None and t.tzinfo is not None and t.hour == 3
    assert parse_time("") is None and parse_time(None) is None and parse_time("yesterday") is None
