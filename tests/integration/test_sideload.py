"""Side loading between two real distribution registries on loopback: export -> OCI layout ->
sideload, digests compared; a corrupted layout refused with nothing tagged; a docker archive."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from cluster_registry import reference
from cluster_registry.cli import cli
from tests.support.ociimages import PLATFORMS, Pusher, assert_copied, push_index, push_referrer, push_signature
from tests.support.registry import Registry


def run(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def catalog(reg: Registry) -> list[str]:
    with urllib.request.urlopen(f"{reg.url}/v2/_catalog") as r:  # noqa: S310 (loopback test registry)
        return list(json.load(r).get("repositories") or [])


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_export_then_sideload_round_trip(src: Registry, dst: Registry, tmp_path: Path) -> None:
    ps, pd = Pusher(src.host), Pusher(dst.host)
    idx = push_index(ps, "org/app", "v1", PLATFORMS[:2], layers=[64 * 1024, 4096], seed=7, shared_base=8192)
    sig = push_signature(ps, "org/app", idx.digest)
    sbom = push_referrer(ps, "org/app", idx)
    layout = tmp_path / "drive" / "layout"

    out = run("export", f"{src.host}/org/app:v1", "-o", str(layout), "--insecure-registry", src.host)
    assert out.exit_code == 0, out.output
    summary = json.loads(out.output.strip().splitlines()[-1])
    assert summary["images"] == 1 and summary["referrers"] >= 2  # the signature tag and the OCI referrer

    out = run("sideload", str(tmp_path / "drive"), "--registry-host", dst.host, "--registry-insecure", "--no-artifacts")
    assert out.exit_code == 0, out.output
    pushed = json.loads(out.output.strip().splitlines()[-1])
    assert pushed["images"] == 1 and pushed["tags"] >= 2 and pushed["bytes_verified"] > 64 * 1024

    local = reference.local_repository(reference.parse(f"{src.host}/org/app"))
    assert local == f"127.0.0.1_{src.host.rsplit(':', 1)[1]}/org/app"
    assert_copied(ps, pd, idx, local)  # every manifest byte-identical, every blob hashed
    assert_copied(ps, pd, sig, local)
    assert_copied(ps, pd, sbom, local)
    body, _ = pd.get_manifest(local, "v1") or (b"", "")
    assert sha(body) == idx.digest
    sig_body, _ = pd.get_manifest(local, sig.tag or "") or (b"", "")
    assert sha(sig_body) == sig.digest

    # Sideloading the same drive again pushes no blob twice.
    again = run("sideload", str(tmp_path / "drive"), "--registry-host", dst.host, "--registry-insecure", "--no-artifacts")
    assert again.exit_code == 0, again.output
    assert json.loads(again.output.strip().splitlines()[-1])["bytes_pushed"] == 0


def test_corrupted_layout_is_refused_and_nothing_is_tagged(src: Registry, dst: Registry, tmp_path: Path) -> None:
    ps = Pusher(src.host)
    idx = push_index(ps, "org/app", "v1", PLATFORMS[:2], layers=[4096, 2048], seed=3)
    layout = tmp_path / "layout"
    assert run("export", f"{src.host}/org/app:v1", "-o", str(layout), "--insecure-registry", src.host).exit_code == 0

    # Flip one byte of the second platform's last layer: same size, other content.
    digest, size = idx.children[1].blobs[-1]
    blob = layout / "blobs" / "sha256" / digest.split(":", 1)[1]
    data = bytearray(blob.read_bytes())
    data[size // 2] ^= 0xFF
    blob.write_bytes(bytes(data))

    out = run("sideload", str(layout), "--registry-host", dst.host, "--registry-insecure", "--no-artifacts")
    assert out.exit_code == 1
    assert "nothing pushed" in out.output
    assert str(blob.relative_to(layout)) in out.output and digest in out.output and str(layout) in out.output
    assert f"hashes to {sha(bytes(data))}" in out.output
    assert catalog(dst) == []  # not a blob, not a manifest, not a tag

    # Truncated (a partial copy to the drive) is refused the same way, naming the sizes.
    blob.write_bytes(bytes(data[: size // 2]))
    out = run("sideload", str(layout), "--registry-host", dst.host, "--registry-insecure", "--no-artifacts")
    assert out.exit_code == 1 and f"is {size // 2} bytes, the manifest says {size}" in out.output
    assert catalog(dst) == []


def docker_save(path: Path, repo_tags: list[str], layers: list[bytes]) -> tuple[str, bytes]:
    config = json.dumps(
        {"architecture": "amd64", "os": "linux", "config": {}, "rootfs": {"type": "layers", "diff_ids": [sha(x) for x in layers]}}
    ).encode()
    files = {f"{sha(config)[7:]}.json": config}
    names = []
    for layer in layers:
        name = f"{sha(layer)[7:]}/layer.tar"
        files[name] = layer
        names.append(name)
    files["manifest.json"] = json.dumps([{"Config": f"{sha(config)[7:]}.json", "RepoTags": repo_tags, "Layers": names}]).encode()
    files["repositories"] = b"{}"
    with tarfile.open(path, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return sha(config), config


def tar_layer(content: bytes, name: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo(name)
        info.size = len(content)
        tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def test_docker_archive_import(dst: Registry, tmp_path: Path) -> None:
    layers = [tar_layer(b"base" * 5000, "etc/base"), tar_layer(b"app", "app/bin")]
    config_digest, _ = docker_save(tmp_path / "app.tar", ["myacr.azurecr.io/cnf/app:1.0"], layers)

    out = run("sideload", str(tmp_path / "app.tar"), "--registry-host", dst.host, "--registry-insecure", "--no-artifacts")
    assert out.exit_code == 0, out.output

    pd = Pusher(dst.host)
    repo = "myacr.azurecr.io/cnf/app"
    got = pd.get_manifest(repo, "1.0")
    assert got is not None
    manifest = json.loads(got[0])
    assert manifest["config"]["digest"] == config_digest
    assert [d["digest"] for d in manifest["layers"]] == [sha(x) for x in layers]  # the config's diff_ids
    for layer in layers:
        assert pd.blob_sha256(repo, sha(layer)) == (sha(layer), len(layer))


def test_docker_archive_with_a_corrupt_layer_pushes_nothing(dst: Registry, tmp_path: Path) -> None:
    layers = [tar_layer(b"base", "a"), tar_layer(b"app", "b")]
    docker_save(tmp_path / "app.tar", ["app:1"], layers)
    # Rewrite the archive with the second layer damaged.
    damaged = tmp_path / "damaged.tar"
    with tarfile.open(tmp_path / "app.tar") as src_tar, tarfile.open(damaged, "w") as out_tar:
        for m in src_tar.getmembers():
            data = src_tar.extractfile(m).read() if m.isfile() else b""  # type: ignore[union-attr]
            if m.name == f"{sha(layers[1])[7:]}/layer.tar":
                data = data[:-1] + b"X"
            m.size = len(data)
            out_tar.addfile(m, io.BytesIO(data))
    out = run("sideload", str(damaged), "--registry-host", dst.host, "--registry-insecure", "--no-artifacts")
    assert out.exit_code == 1
    assert f"damaged.tar: blob {sha(layers[1])} ({sha(layers[1])[7:]}/layer.tar) is corrupt" in out.output
    assert catalog(dst) == []


def test_a_gzip_bomb_beside_a_good_archive_fails_fast_and_pushes_nothing(dst: Registry, tmp_path: Path) -> None:
    """#16 item 14: a member declaring 64 GiB in a file of a few KiB, on the drive next to a good
    archive: the run fails on the bomb's header, with a clear message, before anything is pushed."""
    import gzip
    import time

    drive = tmp_path / "drive"
    drive.mkdir()
    docker_save(drive / "app.tar", ["app:1"], [tar_layer(b"base", "a")])
    huge = tarfile.TarInfo("blobs/sha256/" + "0" * 64)
    huge.size = 64 << 30
    (drive / "zbomb.tar.gz").write_bytes(gzip.compress(huge.tobuf(tarfile.PAX_FORMAT) + b"\0" * (1 << 20)))
    start = time.monotonic()
    out = run("sideload", str(drive), "--registry-host", dst.host, "--registry-insecure", "--no-artifacts")
    assert out.exit_code == 1
    assert "zbomb.tar.gz: expands to more than" in out.output and "refused as a decompression bomb" in out.output
    assert time.monotonic() - start < 10
    assert catalog(dst) == []
