"""The images `make images` builds (ci/images), unpacked from their OCI layouts and run with the real
runc the local cluster's nodes use: as the image says (USER, ENV, WORKDIR) with a read-only root
filesystem and only /tmp writable, as the chart runs them."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.cluster import ROOT

sys.path.insert(0, str(ROOT / "ci"))
import images  # noqa: E402 (ci/ is not a package)

pytestmark = pytest.mark.e2e


def blob(layout: Path, digest: str) -> bytes:
    return (layout / "blobs" / "sha256" / digest.split(":", 1)[1]).read_bytes()


def manifest_and_config(layout: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads(blob(layout, index["manifests"][0]["digest"]))
    return manifest, json.loads(blob(layout, manifest["config"]["digest"]))


@pytest.fixture(scope="module")
def built() -> dict[str, Path]:
    """Every image, built (or found current) by `ci/images build`."""
    subprocess.run([str(ROOT / "ci" / "images"), "build"], check=True, capture_output=True, timeout=1200)
    return {name: images.OUT / name for name in ("cluster-registry", "registry", "pause")}


@pytest.fixture(scope="module")
def rootfs(built: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each image's layers applied in order into a directory (digests checked on the way)."""
    out = {}
    for name, layout in built.items():
        root = tmp_path_factory.mktemp(name) / "rootfs"
        root.mkdir()
        manifest, config = manifest_and_config(layout)
        for layer, diff_id in zip(manifest["layers"], config["rootfs"]["diff_ids"], strict=True):
            data = blob(layout, layer["digest"])
            assert "sha256:" + hashlib.sha256(data).hexdigest() == layer["digest"]
            raw = gzip.decompress(data)
            assert "sha256:" + hashlib.sha256(raw).hexdigest() == diff_id, "diff_id is the uncompressed tar's digest"
            with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
                assert not [m.name for m in tar if ".wh." in m.name], "no whiteouts: layers only add"
                tar.extractall(root, filter="fully_trusted")
        out[name] = root
    return out


def run(root: Path, config: dict[str, Any], args: list[str], tmp: Path, name: str) -> subprocess.CompletedProcess[str]:
    """ARGS in ROOT with runc: the image's user, env and workdir, root read-only, a tmpfs on /tmp, no network."""
    bundle = tmp / name
    bundle.mkdir()
    subprocess.run(["runc", "spec", "--bundle", str(bundle)], check=True)
    spec = json.loads((bundle / "config.json").read_text())
    user = config.get("User", "0:0")
    uid, _, gid = user.partition(":")
    spec["process"].update(terminal=False, args=args, env=config.get("Env", []), cwd=config.get("WorkingDir") or "/",
                           user={"uid": int(uid), "gid": int(gid or uid)})
    spec["root"] = {"path": str(root), "readonly": True}
    spec["mounts"].append({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
                           "options": ["nosuid", "nodev", "mode=1777", "size=64m"]})
    spec["hostname"] = "image-test"
    (bundle / "config.json").write_text(json.dumps(spec))
    return subprocess.run(["runc", "--root", str(tmp / "runc-state"), "run", "--bundle", str(bundle), f"images-{name}-{tmp.name[-8:]}"],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def project(built: dict[str, Path], rootfs: dict[str, Path], tmp_path: Path) -> Iterator[Any]:
    _, config = manifest_and_config(built["cluster-registry"])

    def go(*args: str, name: str = "c") -> subprocess.CompletedProcess[str]:
        return run(rootfs["cluster-registry"], config["config"], list(args), tmp_path, name)

    yield go


def test_the_image_config_is_the_containerfiles(built: dict[str, Path], rootfs: dict[str, Path]) -> None:
    """ci/images and hooks/Containerfile build the same image: user, env, workdir, entrypoint, files."""
    _, config = manifest_and_config(built["cluster-registry"])
    cfg = config["config"]
    documented = images.containerfile_config()
    assert cfg == documented
    assert cfg["User"] == "65532:65532" and cfg["Entrypoint"] == ["cluster-registry"] and cfg["WorkingDir"] == "/tmp"
    env = dict(e.split("=", 1) for e in cfg["Env"])
    assert env["PATH"].startswith("/opt/venv/bin:") and env["HOME"] == "/tmp" and env["PYTHONDONTWRITEBYTECODE"] == "1"
    for path in images.containerfile_paths():  # every COPY destination of the documented build
        assert (rootfs["cluster-registry"] / path.lstrip("/")).exists(), path
    passwd = (rootfs["cluster-registry"] / "etc" / "passwd").read_text()
    assert "nonroot:x:65532:65532:" in passwd


def test_the_project_runs_as_65532_from_compiled_bytecode(project: Any, rootfs: dict[str, Path]) -> None:
    out = project("python", "-c", "import os, cluster_registry.cli as c; print(os.getuid(), os.getgid(), c.__cached__)")
    assert out.returncode == 0, out.stderr
    uid, gid, cached = out.stdout.split()
    assert (uid, gid) == ("65532", "65532")
    assert (rootfs["cluster-registry"] / cached.lstrip("/")).is_file(), "bytecode shipped in the image"
    version = project("cluster-registry", "--version", name="v")
    assert version.returncode == 0 and images.app_version() in version.stdout, version


def test_registry_and_helm_run_and_nothing_is_written_outside_tmp(project: Any) -> None:
    """Every subcommand loads, registry and helm answer, with / read-only: a write anywhere but /tmp fails."""
    script = (
        "set -e; registry --version; helm version --short; for c in $(cluster-registry --help | "
        "sed -n '/^Commands:/,$p' | awk 'NR>1{print $1}'); do cluster-registry $c --help >/dev/null; echo ok $c; done; "
        "touch /tmp/ok; if touch /opt/venv/x 2>/dev/null || touch /x 2>/dev/null; then echo WRITABLE; fi")
    out = project("sh", "-c", script)
    assert out.returncode == 0, out.stderr
    assert "v3.0.0" in out.stdout and "v3." in out.stdout.split("\n")[1]
    assert "ok webhook" in out.stdout and "ok gc" in out.stdout and "ok node-proxy" in out.stdout
    assert "WRITABLE" not in out.stdout


def test_registry_and_pause_images_run(built: dict[str, Path], rootfs: dict[str, Path], tmp_path: Path) -> None:
    _, reg = manifest_and_config(built["registry"])
    out = run(rootfs["registry"], {**reg["config"], "User": "65532:65532"}, ["/bin/registry", "--version"], tmp_path, "r")
    assert out.returncode == 0 and "v3.0.0" in out.stdout, out
    _, pause = manifest_and_config(built["pause"])
    assert pause["config"]["Entrypoint"] == ["/pause"]
    out = run(rootfs["pause"], pause["config"], ["/pause", "-v"], tmp_path, "p")
    assert out.returncode == 0 and "pause.c" in out.stderr + out.stdout, out


def test_layers_are_deterministic(tmp_path: Path) -> None:
    """The same files give the same layer digest whenever and by whoever they were written (times,
    owners and order are normalised), so a rebuild of unchanged inputs pushes nothing new."""
    import os
    import time

    tree = tmp_path / "tree"
    (tree / "opt" / "b").mkdir(parents=True)
    (tree / "opt" / "b" / "z.txt").write_text("z")
    (tree / "opt" / "a.txt").write_text("a")
    digests = []
    for n in range(2):
        os.utime(tree / "opt" / "a.txt", (time.time() + n * 1000,) * 2)
        layer = images.cached_layer(f"test-{tmp_path.name}-{n}", f"k{n}",
                                    lambda tar: images.add_tree(tar, tree, images.walk(tree, "opt")))
        digests.append((layer.digest, layer.diff_id))
        (images.WORK / "layers" / f"test-{tmp_path.name}-{n}.json").unlink()
    assert digests[0] == digests[1]
    assert shutil.which("runc"), "runc (Debian's) is what the nodes run containers with"


def test_the_dependency_layer_carries_no_project_file(built: dict[str, Path]) -> None:
    """The project's files live in its own layer only: a dependency layer rebuilt from a stage that already
    held an app install once carried 200 of them (an image whose bytes depended on build order)."""
    layout = built["cluster-registry"]
    manifest, config = manifest_and_config(layout)
    steps = [h["created_by"] for h in config["history"]]
    names = {}
    for step, layer in zip(steps, manifest["layers"], strict=True):
        with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob(layout, layer["digest"])))) as tar:
            names[step] = tar.getnames()
    deps = names["/opt/venv: dependencies"]
    assert deps and not [n for n in deps if images.is_app_file(n)]
    app = names["/opt/venv: cluster-registry"]
    assert f"{images.SITE}/cluster_registry/cli.py" in app and all(images.is_app_file(n) for n in app)
