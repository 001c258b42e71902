"""`cluster-registry export` against a real distribution registry (basic auth) on loopback."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from cluster_registry.cli import cli
from cluster_registry.oci import layout as L
from tests.support.ociimages import Pusher, push_image
from tests.support.registry import Registry, run_registry


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Registry]:
    with run_registry(tmp_path / "store", htpasswd=("u", "p")) as reg:
        yield reg


def run(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_export_with_credentials_adds_to_a_layout(store: Registry, tmp_path: Path) -> None:
    p = Pusher(store.host, auth=("u", "p"))
    a = push_image(p, "cnf/a", "1.0", layers=[8192, 4096], seed=1, docker=True)
    b = push_image(p, "cnf/b", "2.0", layers=[(1 * 100_003 + 0, 8192)], seed=2)  # shares a's first layer
    creds = tmp_path / "creds.yaml"
    creds.write_text("username: u\npassword: p\n")
    out_dir = tmp_path / "layout"
    common = ["-o", str(out_dir), "--insecure-registry", store.host, "--credentials-file", str(creds), "--as-host", "myacr.azurecr.io"]

    first = run("export", f"{store.host}/cnf/a:1.0", *common)
    assert first.exit_code == 0, first.output
    assert json.loads(first.output.strip().splitlines()[-1])["blobs_written"] == 3

    second = run("export", f"{store.host}/cnf/b:2.0", *common)
    assert second.exit_code == 0, second.output
    summary = json.loads(second.output.strip().splitlines()[-1])
    assert (summary["blobs_written"], summary["blobs_present"]) == (1, 1)  # the shared layer is not fetched again

    entries = L.read_input(L.Input(out_dir))
    assert sorted(str(e.source) for e in entries) == sorted(
        [f"myacr.azurecr.io/cnf/a:1.0@{a.digest}", f"myacr.azurecr.io/cnf/b:2.0@{b.digest}"]
    )
    assert {e.top.body for e in entries} == {a.manifest, b.manifest}  # exact bytes (a is Docker schema 2)
    L.verify(entries)
    for digest, size in a.all_blobs() + b.all_blobs():
        data = (out_dir / "blobs" / "sha256" / digest[7:]).read_bytes()
        assert ("sha256:" + hashlib.sha256(data).hexdigest(), len(data)) == (digest, size)


def test_export_failures(store: Registry, tmp_path: Path) -> None:
    out = run("export", f"{store.host}/cnf/none:1", "-o", str(tmp_path / "l"), "--insecure-registry", store.host)
    assert out.exit_code == 1
    assert out.output.startswith("export: failed after 0 images: ")
    assert "requires credentials and none were given" in out.output
    creds = tmp_path / "creds.yaml"
    creds.write_text("username: u\npassword: p\n")
    out = run("export", f"{store.host}/cnf/none:1", "-o", str(tmp_path / "l"), "--insecure-registry", store.host, "--credentials-file", str(creds))
    assert out.exit_code == 1 and "cnf/none" in out.output, out.output
    assert not (tmp_path / "l" / "index.json").exists()  # the index is written only when every image is in
    assert run("export", "-o", str(tmp_path / "l")).exit_code == 2
