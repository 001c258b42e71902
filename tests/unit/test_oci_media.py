from __future__ import annotations

import json

import pytest

from cluster_registry.oci import media
from cluster_registry.oci.errors import CorruptBlobError, UnsupportedManifestError

D1, D2, D3 = ("sha256:" + c * 64 for c in "123")


def desc(d: str, size: int = 10, mt: str = "application/octet-stream", **kw: object) -> dict[str, object]:
    return {"mediaType": mt, "digest": d, "size": size, **kw}


DOCKER = json.dumps({"schemaVersion": 2, "mediaType": media.DOCKER_MANIFEST,
                     "config": desc(D1, mt="application/vnd.docker.container.image.v1+json"),
                     "layers": [desc(D2, 100), desc(D3, 200)]}).encode()
OCI_NO_MT = json.dumps({"schemaVersion": 2, "config": desc(D1, mt="application/vnd.oci.image.config.v1+json"),
                        "layers": [desc(D2)]}).encode()
INDEX = json.dumps({"schemaVersion": 2, "mediaType": media.OCI_INDEX,
                    "manifests": [desc(D1, mt=media.OCI_MANIFEST, platform={"os": "linux", "architecture": "amd64"}),
                                  desc(D2, mt=media.OCI_MANIFEST, platform={"os": "linux", "architecture": "arm64", "variant": "v8"})]}).encode()
LIST_NO_MT = json.dumps({"schemaVersion": 2, "manifests": []}).encode()
SCHEMA1 = json.dumps({"schemaVersion": 1, "name": "x", "fsLayers": []}).encode()


@pytest.mark.parametrize(
    ("body", "ctype", "want"),
    [
        (DOCKER, media.DOCKER_MANIFEST, media.DOCKER_MANIFEST),
        (DOCKER, "application/json", media.DOCKER_MANIFEST),  # the body's mediaType wins
        (OCI_NO_MT, media.OCI_MANIFEST + "; charset=utf-8", media.OCI_MANIFEST),
        (OCI_NO_MT, None, media.OCI_MANIFEST),
        (INDEX, None, media.OCI_INDEX),
        (LIST_NO_MT, media.DOCKER_MANIFEST_LIST, media.DOCKER_MANIFEST_LIST),
        (LIST_NO_MT, None, media.OCI_INDEX),
        (SCHEMA1, None, media.DOCKER_SCHEMA1),
    ],
)
def test_detect_media_type(body: bytes, ctype: str | None, want: str) -> None:
    assert media.detect_media_type(body, ctype) == want


def test_inspect_image_and_index() -> None:
    info = media.inspect(DOCKER, media.DOCKER_MANIFEST)
    assert [d["digest"] for d in info.blobs] == [D1, D2, D3] and not info.is_index
    idx = media.inspect(INDEX, media.OCI_INDEX)
    assert idx.is_index and [d["digest"] for d in idx.children] == [D1, D2]
    assert [media.platform_string(d.get("platform")) for d in idx.children] == ["linux/amd64", "linux/arm64/v8"]


def test_inspect_rejects() -> None:
    with pytest.raises(UnsupportedManifestError, match="schema 1"):
        media.inspect(SCHEMA1, media.DOCKER_SCHEMA1)
    with pytest.raises(UnsupportedManifestError):
        media.inspect(b"{}", "text/plain")
    bad = json.dumps({"schemaVersion": 2, "mediaType": media.OCI_MANIFEST, "config": desc("md5:abc"), "layers": []}).encode()
    with pytest.raises(UnsupportedManifestError):
        media.inspect(bad, media.OCI_MANIFEST)
    with pytest.raises(UnsupportedManifestError):
        media.detect_media_type(b"not json", None)


def test_subject_and_artifact_type() -> None:
    body = json.dumps({"schemaVersion": 2, "mediaType": media.OCI_MANIFEST, "artifactType": "application/x.sbom",
                       "config": desc(D1, mt="application/vnd.oci.empty.v1+json"), "layers": [],
                       "subject": desc(D2, mt=media.OCI_MANIFEST)}).encode()
    info = media.inspect(body, media.OCI_MANIFEST)
    assert info.subject is not None and info.subject["digest"] == D2
    assert info.artifact_type == "application/x.sbom"


def test_foreign_layers_skipped() -> None:
    body = json.dumps({"schemaVersion": 2, "mediaType": media.DOCKER_MANIFEST, "config": desc(D1),
                       "layers": [desc(D2, mt="application/vnd.docker.image.rootfs.foreign.diff.tar.gzip", urls=["https://x"]),
                                  desc(D3)]}).encode()
    assert [d["digest"] for d in media.copyable_blobs(media.inspect(body, media.DOCKER_MANIFEST))] == [D1, D3]


def test_verify_manifest() -> None:
    d = media.digest_of(DOCKER)
    media.verify_manifest(DOCKER, d, "x")
    with pytest.raises(CorruptBlobError):
        media.verify_manifest(DOCKER + b" ", d, "x")


def test_attached_tags() -> None:
    d = "sha256:" + "ab" * 32
    p = "sha256-" + "ab" * 32
    assert media.is_attached_tag(p, d)
    assert media.is_attached_tag(p + ".sig", d) and media.is_attached_tag(p + ".att", d)
    assert not media.is_attached_tag(p + "x", d)
    assert not media.is_attached_tag(p + ".", d)
    assert not media.is_attached_tag("sha256-" + "cd" * 32 + ".sig", d)
    assert not media.is_attached_tag("latest", d)
