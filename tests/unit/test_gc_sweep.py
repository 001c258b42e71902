"""The sweep's renames name exactly what distribution's own sweep deletes (registry/storage/vacuum.go):
a blob's directory (``RemoveBlob``: ``blobs/<algo>/<2 hex>/<hex>``) and a repository's layer link file
(``RemoveLayer``: ``repositories/<name>/_layers/<algo>/<hex>/link``), blobs first."""

from __future__ import annotations

from cluster_registry.gc import storage, sweep

BLOB = "sha256:" + "ab" * 32
LAYER = "sha256:" + "cd" * 32


def test_the_verdict_renames_what_distribution_would_delete() -> None:
    res = sweep.SweepResult(deleted_digests=[BLOB, LAYER], layer_links=[("team/app", LAYER)])
    marked = sweep.verdict("/data", 12.5, res)
    v2 = "/data/docker/registry/v2"
    assert marked.started == 12.5 and marked.blobs == 2
    assert marked.moves == [
        (BLOB, str(storage.blob_path("/data", BLOB).parent), f"blobs/sha256-{'ab' * 32}"),
        (LAYER, f"{v2}/blobs/sha256/cd/{'cd' * 32}", f"blobs/sha256-{'cd' * 32}"),
        (LAYER, f"{v2}/repositories/team/app/_layers/sha256/{'cd' * 32}/link", "links/0"),
    ]


def test_distributions_dry_run_output_is_read_into_blobs_and_layer_links() -> None:
    out = (f"team/app\nteam/app: marking manifest sha256:{'ef' * 32} \n\n1 blobs marked, 2 blobs and 0 manifests "
           f"eligible for deletion\nblob eligible for deletion: {BLOB}\nblob eligible for deletion: {LAYER}\n"
           f"team/app: layer link eligible for deletion: {LAYER}\n")  # fmt: skip
    res = sweep.parse_output(out)
    assert (res.blobs_marked, res.blobs_deleted) == (1, 2)
    assert res.deleted_digests == [BLOB, LAYER] and res.layer_links == [("team/app", LAYER)]
