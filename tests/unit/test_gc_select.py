"""GC selection rules (the pure core), table-driven."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from cluster_registry.gc.select import (
    Artifact,
    Component,
    Inputs,
    Manifest,
    Owner,
    Workload,
    select,
    targets,
)

NOW = datetime(2026, 1, 10, 12, 0, tzinfo=timezone.utc)
OLD = NOW - timedelta(days=3)
LOCAL = "registry.local:5000"
INDEX = "application/vnd.oci.image.index.v1+json"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def d(n: int) -> str:
    return "sha256:" + f"{n:064x}"


REPO = "myacr.azurecr.io/app"
SRC = "myacr.azurecr.io/app:1.0"
NGINX_REPO = "docker.io/library/nginx"


def img(repo: str, n: int, *tags: str, children: tuple[str, ...] = (), pushed: datetime = OLD) -> Manifest:
    return Manifest(repo, d(n), INDEX if children else MANIFEST, frozenset(tags), children, pushed)


def art(source: str = SRC, *owners: Owner, ns: str = "cnf", name: str = "a", digest: str | None = None,
        synced: datetime = OLD, component: str | None = None, sideloaded: bool = False) -> Artifact:  # fmt: skip
    return Artifact(ns, name, source, uid=f"u-{name}", resource_version="1", digest=digest, owners=owners,
                    component=component, sideloaded=sideloaded, last_sync=synced, created=synced)  # fmt: skip


def owner(kind: str, uid: str, name: str = "o") -> Owner:
    return Owner("apps/v1", kind, name, uid)


def wl(kind: str, uid: str, *images: str, name: str = "w") -> Workload:
    return Workload(kind, "cnf", name, uid, images)


def run(manifests: list[Manifest], artifacts: list[Artifact] = [], workloads: list[Workload] = [],
        components: list[Component] = [], live: set[str] = set(), hosts: frozenset[str] = frozenset({LOCAL}),
        ) -> tuple[set[str], set[str]]:  # fmt: skip
    """(deleted manifest digests, deleted Artifact names)."""
    live_uids = frozenset(live | {w.uid for w in workloads})
    sel = select(Inputs(tuple(manifests), tuple(artifacts), tuple(workloads), tuple(components), live_uids,
                        NOW, timedelta(hours=1), hosts))  # fmt: skip
    return {m.digest for m in sel.delete_manifests}, {a.name for a, _ in sel.delete_artifacts}


# (case, workloads, artifact owners, live uids, kept?)
OWNER_CASES = [
    ("nothing references it", [], [], set(), False),
    ("live pod, source ref", [wl("Pod", "p1", SRC)], [], set(), True),
    ("live pod, rewritten ref", [wl("Pod", "p1", f"{LOCAL}/myacr.azurecr.io/app:1.0")], [], set(), True),
    ("pod imageID by digest", [wl("Pod", "p1", f"docker-pullable://{LOCAL}/myacr.azurecr.io/app@{d(1)}")], [], set(), True),
    ("Deployment template", [wl("Deployment", "dep", SRC)], [owner("Deployment", "dep")], set(), True),
    ("Deployment scaled to zero keeps via template", [wl("Deployment", "dep", SRC)], [], set(), True),
    ("ReplicaSet kept for rollback", [wl("Deployment", "dep", "myacr.azurecr.io/app:2.0"), wl("ReplicaSet", "rs1", SRC)],
     [owner("Deployment", "dep")], set(), True),
    ("old ReplicaSet deleted: Deployment alone does not keep an image it no longer names",
     [wl("Deployment", "dep", "myacr.azurecr.io/app:2.0")], [owner("Deployment", "dep")], set(), False),
    ("StatefulSet", [wl("StatefulSet", "sts", SRC)], [owner("StatefulSet", "sts")], set(), True),
    ("StatefulSet history (ControllerRevision)", [wl("StatefulSet", "sts", "myacr.azurecr.io/app:2.0"),
     wl("ControllerRevision", "cr1", SRC)], [owner("StatefulSet", "sts")], set(), True),
    ("DaemonSet", [wl("DaemonSet", "ds", SRC)], [owner("DaemonSet", "ds")], set(), True),
    ("CronJob between runs (Jobs deleted)", [wl("CronJob", "cj", SRC)], [owner("CronJob", "cj")], set(), True),
    ("CronJob deleted", [], [owner("CronJob", "cj")], set(), False),
    ("bare Job", [wl("Job", "job", SRC)], [owner("Job", "job")], set(), True),
    ("pod going down (controller alive) dereferences nothing", [wl("ReplicaSet", "rs", SRC)],
     [owner("ReplicaSet", "rs")], set(), True),
    ("bare pod deleted", [], [Owner("v1", "Pod", "p", "p1")], set(), False),
    ("custom owner alive by uid", [], [Owner("example.com/v1", "Rollout", "r", "cr-uid")], {"cr-uid"}, True),
    ("custom owner gone", [], [Owner("example.com/v1", "Rollout", "r", "cr-uid")], set(), False),
]  # fmt: skip


@pytest.mark.parametrize("case,workloads,owners,live,kept", OWNER_CASES, ids=[c[0] for c in OWNER_CASES])
def test_owner_rules(case: str, workloads: list[Workload], owners: list[Owner], live: set[str], kept: bool) -> None:
    deleted, arts = run([img(REPO, 1, "1.0"), img(REPO, 2, "2.0")], [art(SRC, *owners, digest=d(1))], workloads,
                        live=live | {"keep-2"})  # fmt: skip
    assert (d(1) not in deleted) is kept, case
    assert ("a" not in arts) is kept, case


@pytest.mark.parametrize(
    "why,artifact,components,manifest_pushed,kept",
    [
        ("synced within grace", art(synced=NOW - timedelta(minutes=59)), [], OLD, True),
        ("synced before grace", art(synced=NOW - timedelta(minutes=61)), [], OLD, False),
        ("pushed within grace, no Artifact", None, [], NOW - timedelta(minutes=5), True),
        ("Component-labelled Artifact", art(component="cnf1"), [], OLD, True),
        ("sideloaded Artifact", art(sideloaded=True), [], OLD, True),
        ("listed by a Component", None, [Component("cnf", "cnf1", (SRC,))], OLD, True),
        ("no Artifact, old push, unreferenced", None, [], OLD, False),
    ],
)
def test_component_and_grace(why: str, artifact: Artifact | None, components: list[Component],
                             manifest_pushed: datetime, kept: bool) -> None:  # fmt: skip
    deleted, _ = run([img(REPO, 1, "1.0", pushed=manifest_pushed)], [artifact] if artifact else [], [], components)
    assert (d(1) not in deleted) is kept, why


def test_multi_platform_index_children_kept_and_deleted_together() -> None:
    kept_index = img(REPO, 10, "1.0", children=(d(11), d(12)))
    dead_index = img(REPO, 20, "0.9", children=(d(12), d(21)))  # shares d(12) with the kept index
    manifests = [kept_index, img(REPO, 11), img(REPO, 12), dead_index, img(REPO, 21)]
    live = [wl("Deployment", "dep", SRC)]
    sel = select(Inputs(tuple(manifests), (), tuple(live), (), frozenset({"dep"}), NOW, timedelta(hours=1),
                        frozenset({LOCAL})))  # fmt: skip
    deleted = [m.digest for m in sel.delete_manifests]
    assert set(deleted) == {d(20), d(21)}
    assert deleted.index(d(20)) < deleted.index(d(21)), "index deleted before its platform manifest"
    assert any(r.startswith("index") for r in sel.reasons(REPO, d(12)))


def test_pod_pinned_to_a_platform_manifest_keeps_just_that() -> None:
    manifests = [img(REPO, 10, "1.0", children=(d(11), d(12))), img(REPO, 11), img(REPO, 12)]
    deleted, _ = run(manifests, workloads=[wl("Pod", "p", f"myacr.azurecr.io/app@{d(11)}")])
    assert deleted == {d(10), d(12)}


def test_image_shared_by_two_owners_one_deleted() -> None:
    # Two namespaces' Artifacts for one image; one owner is gone, the other lives.
    gone = art(SRC, owner("Deployment", "dep-a"), ns="a", name="x")
    alive = art(SRC, owner("Deployment", "dep-b"), ns="b", name="x2")
    deleted, arts = run([img(REPO, 1, "1.0")], [gone, alive], [wl("Deployment", "dep-b", SRC)])
    assert deleted == set()
    assert arts == set(), "an Artifact whose image another owner keeps is not deleted"
    # Same Artifact, two owners recorded, one deleted.
    both = art(SRC, owner("Deployment", "dep-a"), owner("StatefulSet", "sts-b"))
    deleted, arts = run([img(REPO, 1, "1.0")], [both], [wl("StatefulSet", "sts-b", SRC)])
    assert deleted == set() and arts == set()
    # And when the second goes too, both go.
    deleted, arts = run([img(REPO, 1, "1.0")], [both], [])
    assert deleted == {d(1)} and arts == {"a"}


def test_tag_and_digest_and_other_repositories() -> None:
    manifests = [img(REPO, 1, "1.0"), img(REPO, 2), img(NGINX_REPO, 3, "latest")]
    deleted, _ = run(manifests, workloads=[wl("Pod", "p", "nginx"), wl("Pod", "q", f"myacr.azurecr.io/app@{d(2)}")])
    assert deleted == {d(1)}


def test_unknown_local_host_reads_both_ways() -> None:
    assert (f"myacr.azurecr.io/app", "1.0", None) in targets("cr.svc:5000/myacr.azurecr.io/app:1.0", frozenset())
    deleted, _ = run([img(REPO, 1, "1.0")], workloads=[wl("Pod", "p", "cr.svc:5000/myacr.azurecr.io/app:1.0")],
                     hosts=frozenset())  # fmt: skip
    assert deleted == set()


def test_artifact_whose_image_is_missing_is_deleted_when_unreferenced() -> None:
    _, arts = run([], [art("myacr.azurecr.io/gone:1", name="gone")])
    assert arts == {"gone"}


def test_bad_references_are_ignored() -> None:
    # A bare image ID parses as some Docker Hub name; it simply matches nothing.
    assert run([img(REPO, 1, "1.0")], workloads=[wl("Pod", "p", "sha256:" + "a" * 64)])[0] == {d(1)}
    assert targets("UPPER CASE", frozenset()) == []


def test_attached_artifacts_follow_their_subject() -> None:
    image = img(REPO, 1, "1.0")
    gone = img(REPO, 2, "0.9")
    sig = img(REPO, 3, f"sha256-{d(1)[7:]}.sig")  # cosign signature of the kept image
    att = img(REPO, 4, f"sha256-{d(2)[7:]}.att")  # attestation of the deleted one
    referrer = Manifest(REPO, d(5), MANIFEST, frozenset(), (), OLD, subject=d(1))  # OCI 1.1 referrer, untagged
    referrer_gone = Manifest(REPO, d(6), MANIFEST, frozenset(), (), OLD, subject=d(2))
    deleted, _ = run([image, gone, sig, att, referrer, referrer_gone], workloads=[wl("Pod", "p", SRC)])
    assert deleted == {d(2), d(4), d(6)}


@pytest.mark.parametrize(
    "source",
    [SRC, f"{SRC}@{d(1)}"],
    ids=["tag-only source, status digest older than the tag", "tag@digest source (copied by digest, untagged)"],
)
def test_every_digest_an_artifact_status_pins_is_kept(source: str) -> None:
    """#15: namespace A's pods run ``…/app:1.0@<A's verified digest>`` while the shared tag moved on for B;
    the untagged digest A pins stays as long as A's owner or pods reference it."""
    manifests = [img(REPO, 1), img(REPO, 2, "1.0")]  # d(1) no longer tagged
    a = art(source, Owner("example.com/v1", "Rollout", "r", "cr-a"), ns="a", name="a", digest=d(1))
    b = art(SRC, Owner("example.com/v1", "Rollout", "r", "cr-b"), ns="b", name="b", digest=d(2))
    deleted, arts = run(manifests, [a, b], live={"cr-a", "cr-b"})
    assert deleted == set() and arts == set()
    pinned = wl("Deployment", "dep-a", f"{LOCAL}/myacr.azurecr.io/app:1.0@{d(1)}")  # the webhook's pinned rewrite
    deleted, _ = run(manifests, [art(source, ns="a", name="a", digest=d(1))], [pinned])
    assert d(1) not in deleted
