"""OCI layouts and docker archives on disk: reading, source mapping, verification, writing."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest

from cluster_registry.oci import layout as L
from cluster_registry.install.sideload import artifact_source

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def write_image(w: L.LayoutWriter, layers: list[bytes], *, arch: str = "amd64") -> L.ManifestDoc:
    config = json.dumps({"os": "linux", "architecture": arch, "rootfs": {"type": "layers", "diff_ids": [sha(x) for x in layers]}}).encode()
    w.write_bytes(sha(config), config)
    for layer in layers:
        w.write_bytes(sha(layer), layer)
    body = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha(config), "size": len(config)},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": sha(x), "size": len(x)} for x in layers],
        }
    ).encode()
    w.write_bytes(sha(body), body)
    return L.ManifestDoc(sha(body), OCI_MANIFEST, body)


def layout_with_image(root: Path, source: str = "myacr.azurecr.io/app:1.0") -> tuple[L.ManifestDoc, list[bytes]]:
    w = L.LayoutWriter(root)
    layers = [b"layer-one" * 100, b"layer-two"]
    top = write_image(w, layers)
    from cluster_registry import reference

    w.add(L.index_descriptor(top, reference.parse(source)))
    w.save()
    return top, layers


def test_written_layout_reads_back_with_its_source(tmp_path: Path) -> None:
    top, layers = layout_with_image(tmp_path)
    index = json.loads((tmp_path / "index.json").read_text())
    ann = index["manifests"][0]["annotations"]
    assert ann[L.REF_NAME] == "1.0"
    assert ann[L.CONTAINERD_NAME] == "myacr.azurecr.io/app:1.0"
    assert ann[L.SOURCE] == f"myacr.azurecr.io/app:1.0@{top.digest}"
    assert json.loads((tmp_path / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    (entry,) = L.read_input(L.Input(tmp_path))
    assert str(entry.source) == f"myacr.azurecr.io/app:1.0@{top.digest}"
    assert entry.top == top
    assert {b.digest for b in entry.blobs} == {sha(x) for x in layers} | {entry.blobs[0].digest}
    assert L.verify([entry]) == sum(b.size for b in entry.blobs)
    assert artifact_source(entry) == "myacr.azurecr.io/app:1.0"


def test_layout_in_a_tar_reads_alike(tmp_path: Path) -> None:
    top, _ = layout_with_image(tmp_path / "layout")
    archive = tmp_path / "drive" / "app.tar"
    archive.parent.mkdir()
    with tarfile.open(archive, "w") as tar:
        tar.add(tmp_path / "layout", arcname=".")
    (src,) = L.discover(tmp_path / "drive")
    (entry,) = L.read_input(src)
    assert entry.top == top
    L.verify([entry])


def test_index_children_and_platforms(tmp_path: Path) -> None:
    w = L.LayoutWriter(tmp_path)
    amd = write_image(w, [b"a"], arch="amd64")
    arm = write_image(w, [b"b"], arch="arm64")
    body = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {"mediaType": OCI_MANIFEST, "digest": amd.digest, "size": len(amd.body), "platform": {"os": "linux", "architecture": "amd64"}},
                {"mediaType": OCI_MANIFEST, "digest": arm.digest, "size": len(arm.body), "platform": {"os": "linux", "architecture": "arm64"}},
            ],
        }
    ).encode()
    w.write_bytes(sha(body), body)
    w.add({"mediaType": OCI_INDEX, "digest": sha(body), "size": len(body), "annotations": {L.CONTAINERD_NAME: "ghcr.io/org/multi:2"}})
    w.save()
    (entry,) = L.read_input(L.Input(tmp_path))
    assert [m.digest for m in entry.manifests] == [amd.digest, arm.digest, sha(body)]
    assert entry.platforms == ("linux/amd64", "linux/arm64")
    assert str(entry.source) == f"ghcr.io/org/multi:2@{sha(body)}"


def corrupt(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def test_corrupt_blob_names_file_and_digest(tmp_path: Path) -> None:
    _, layers = layout_with_image(tmp_path)
    bad = tmp_path / "blobs" / "sha256" / sha(layers[1]).split(":")[1]
    corrupt(bad, b"layer-twX")  # same size, other content
    entries = L.read_input(L.Input(tmp_path))
    with pytest.raises(L.InputError) as err:
        L.verify(entries)
    text = str(err.value)
    assert str(tmp_path) in text and sha(layers[1]) in text and f"blobs/sha256/{sha(layers[1])[7:]}" in text
    assert f"hashes to {sha(b'layer-twX')}" in text


def test_truncated_blob(tmp_path: Path) -> None:
    _, layers = layout_with_image(tmp_path)
    bad = tmp_path / "blobs" / "sha256" / sha(layers[0]).split(":")[1]
    corrupt(bad, layers[0][:50])
    with pytest.raises(L.InputError, match=rf"{sha(layers[0])}.* is 50 bytes, the manifest says 900: truncated"):
        L.verify(L.read_input(L.Input(tmp_path)))


def test_missing_blob(tmp_path: Path) -> None:
    _, layers = layout_with_image(tmp_path)
    (tmp_path / "blobs" / "sha256" / sha(layers[0]).split(":")[1]).unlink()
    with pytest.raises(L.InputError, match=rf"{sha(layers[0])}.*is missing: the input is partial"):
        L.verify(L.read_input(L.Input(tmp_path)))


def test_corrupt_manifest_fails_at_read(tmp_path: Path) -> None:
    top, _ = layout_with_image(tmp_path)
    path = tmp_path / "blobs" / "sha256" / top.digest.split(":")[1]
    path.write_bytes(path.read_bytes().replace(b"layer.v1.tar", b"layer.v1.taR"))
    with pytest.raises(L.InputError, match=rf"manifest {top.digest} .* is corrupt"):
        L.read_input(L.Input(tmp_path))


def test_missing_index_is_partial(tmp_path: Path) -> None:
    layout_with_image(tmp_path)
    (tmp_path / "index.json").unlink()
    with pytest.raises(L.InputError, match="neither an OCI image layout nor a docker archive"):
        L.read_input(L.Input(tmp_path))


@pytest.mark.parametrize(
    ("annotations", "default", "want"),
    [
        ({L.SOURCE: "h.io/a:1", L.CONTAINERD_NAME: "x.io/b:2"}, None, "h.io/a:1"),
        ({L.CONTAINERD_NAME: "nginx:1.25"}, None, "docker.io/library/nginx:1.25"),
        ({L.REF_NAME: "registry.k8s.io/pause:3.9"}, None, "registry.k8s.io/pause:3.9"),
        ({L.REF_NAME: "v2"}, "ghcr.io/org/app", "ghcr.io/org/app:v2"),
    ],
)
def test_source_mapping(annotations: dict[str, str], default: str | None, want: str) -> None:
    assert str(L.source_from_annotations(annotations, default)) == want


@pytest.mark.parametrize("annotations", [{}, {L.REF_NAME: "v2"}, {L.SOURCE: "Not A Ref"}])
def test_unmappable_source(annotations: dict[str, str]) -> None:
    with pytest.raises(L.InputError):
        L.source_from_annotations(annotations, None)


def docker_archive(path: Path, layers: list[bytes], tags: list[str] | None, *, tamper: bytes | None = None) -> str:
    config = json.dumps({"os": "linux", "architecture": "arm64", "variant": "v8", "rootfs": {"type": "layers", "diff_ids": [sha(x) for x in layers]}}).encode()
    config_name = sha(config)[7:] + ".json"
    files: dict[str, bytes] = {config_name: config}
    names = []
    for i, layer in enumerate(layers):
        name = f"{i:064x}/layer.tar"
        files[name] = tamper if (tamper is not None and i == len(layers) - 1) else layer
        names.append(name)
    files["manifest.json"] = json.dumps([{"Config": config_name, "RepoTags": tags, "Layers": names}]).encode()
    with tarfile.open(path, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return sha(config)


def test_docker_archive(tmp_path: Path) -> None:
    layers = [b"base" * 1000, b"app"]
    config = docker_archive(tmp_path / "img.tar", layers, ["myacr.azurecr.io/app:1.0", "nginx:1.25"])
    entries = L.read_input(L.Input(tmp_path / "img.tar"))
    assert [str(e.source).split("@")[0] for e in entries] == ["myacr.azurecr.io/app:1.0", "docker.io/library/nginx:1.25"]
    entry = entries[0]
    manifest: dict[str, Any] = json.loads(entry.top.body)
    assert manifest["config"]["digest"] == config
    assert [layer["digest"] for layer in manifest["layers"]] == [sha(x) for x in layers]
    assert entry.top.digest == sha(entry.top.body) == entry.source.digest
    assert entry.platforms == ("linux/arm64/v8",)
    assert L.verify(entries) > 0


def test_docker_archive_corrupt_layer(tmp_path: Path) -> None:
    layers = [b"base", b"app"]
    docker_archive(tmp_path / "img.tar", layers, ["app:1"], tamper=b"apX")
    with pytest.raises(L.InputError) as err:
        L.verify(L.read_input(L.Input(tmp_path / "img.tar")))
    assert f"img.tar: blob {sha(b'app')} ({1:064x}/layer.tar) is corrupt" in str(err.value)


def test_docker_archive_without_tags(tmp_path: Path) -> None:
    docker_archive(tmp_path / "img.tar", [b"x"], None)
    with pytest.raises(L.InputError, match="has no RepoTags"):
        L.read_input(L.Input(tmp_path / "img.tar"))


def test_not_a_tar(tmp_path: Path) -> None:
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(L.InputError, match="junk.tar: not a readable tar archive"):
        L.read_input(L.Input(tmp_path / "junk.tar"))


def test_discover(tmp_path: Path) -> None:
    layout_with_image(tmp_path / "a")
    docker_archive(tmp_path / "b.tar", [b"x"], ["b:1"])
    (tmp_path / "notes.txt").write_text("ignored")
    assert [Path(s.where).name for s in L.discover(tmp_path)] == ["a", "b.tar"]
    with pytest.raises(L.InputError, match="holds no OCI layout"):
        L.discover(tmp_path / "a" / "blobs")


def test_writer_refuses_wrong_content(tmp_path: Path) -> None:
    w = L.LayoutWriter(tmp_path)
    with pytest.raises(L.InputError):
        with w.sink(sha(b"right"), 5) as f:
            f.write(b"wrong")
    assert not w.has(sha(b"right"), 5)
    assert not list((tmp_path / "blobs" / "sha256").iterdir())  # no partial file left behind


def test_sideload_dry_run_verifies_and_pushes_nothing(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from cluster_registry.cli import cli

    top, layers = layout_with_image(tmp_path / "drive" / "l1")
    out = CliRunner().invoke(cli, ["sideload", str(tmp_path / "drive"), "--registry-host", "127.0.0.1:9", "--dry-run"])
    assert out.exit_code == 0, out.output
    assert f"would push image myacr.azurecr.io/app:1.0@{top.digest} -> 127.0.0.1:9/myacr.azurecr.io/app:1.0@{top.digest}" in out.output
    assert json.loads(out.output.strip().splitlines()[-1])["images"] == 1

    (tmp_path / "drive" / "l1" / "blobs" / "sha256" / sha(layers[0])[7:]).write_bytes(b"x")
    out = CliRunner().invoke(cli, ["sideload", str(tmp_path / "drive"), "--registry-host", "127.0.0.1:9", "--dry-run"])
    assert out.exit_code == 1
    assert "sideload: refused, nothing pushed:" in out.output and sha(layers[0]) in out.output
