"""Issue 19 item 1, the pure core: what `gc.select.select()` decides for early-loaded images, as the
issue checked it. Before, preload's Artifacts had no owner and no Component, so the daily GC deleted
them after the grace period; recorded in the release's Component they are kept while it lists them."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from cluster_registry.gc.select import Artifact, Component, Inputs, Manifest, select
from cluster_registry.install import preload as PL

NOW = datetime(2026, 1, 10, 12, 0, tzinfo=timezone.utc)
PAST_GRACE = NOW - timedelta(hours=2)
SOURCE = "myacr.azurecr.io/cnf/app:1.0"
DIGEST = "sha256:" + "1" * 64
RECORD = "r-cluster-registry-early-loading"


def decide(artifact: Artifact, components: tuple[Component, ...]) -> tuple[bool, bool]:
    """(image deleted, Artifact deleted) by one GC run past the grace period."""
    manifest = Manifest("myacr.azurecr.io/cnf/app", DIGEST, "application/vnd.oci.image.manifest.v1+json",
                        frozenset({"1.0"}), (), PAST_GRACE)
    sel = select(Inputs((manifest,), (artifact,), (), components, frozenset(), NOW, timedelta(hours=1), frozenset()))
    return bool(sel.delete_manifests), bool(sel.delete_artifacts)


def early_loaded(component: str | None) -> Artifact:
    return Artifact("ops", "a", SOURCE, uid="u", resource_version="1", digest=DIGEST, component=component,
                    last_sync=PAST_GRACE, created=PAST_GRACE)


def test_an_ownerless_preloaded_image_is_collected_past_the_grace_period() -> None:
    assert decide(early_loaded(None), ()) == (True, True)  # what the issue found


def test_a_recorded_image_is_kept_while_the_release_lists_it_and_goes_when_removed() -> None:
    body = PL.recorded_component(RECORD, "ops", [SOURCE], "cm-uid")
    listed = Component("ops", RECORD, tuple(body["spec"]["images"]))
    assert decide(early_loaded(RECORD), (listed,)) == (False, False)
    # Removed from earlyLoading.images: the Component lists nothing and the component reconciler
    # released the Artifact (label and ownerReference gone), so the next run collects the image.
    emptied = Component("ops", RECORD, tuple(PL.recorded_component(RECORD, "ops", [], "cm-uid")["spec"]["images"]))
    assert decide(early_loaded(None), (emptied,)) == (True, True)
