"""The project's container images, built here without pulling any base image: `ci/images [build|push]`.

* ``cluster-registry``: a Debian base made by ``mmdebstrap`` from Debian's archive (python3,
  ca-certificates, the ``nonroot`` user 65532), the project's wheel and its dependencies in
  ``/opt/venv`` with compiled bytecode, ``helm`` and distribution's ``registry`` from ``.cache/bin``.
  USER, ENV, WORKDIR, ENTRYPOINT, CMD and LABELs are read from ``hooks/Containerfile``'s final
  stage, so the documented build and this one cannot drift apart (tests/chart/test_containerfile.py).
* ``registry``: the same base layer and distribution's ``registry`` at ``/bin/registry`` (the path and
  entrypoint of the upstream image).
* ``pause``: the sandbox image of the local cluster's containerd, Kubernetes' own ``pause.c`` (from the
  pinned module) linked statically.

Each image is an OCI layout under ``.cache/images/<name>/`` (its blobs hard-linked from one shared
store). Layers are deterministic tar+gzip (sorted entries, fixed times and owners) and cached by the
hash of their inputs: after a code change only the project's layer is rebuilt (a warm rebuild takes
seconds). ``push`` copies the layouts with skopeo into the local cluster's registries and writes
``.cache/images/images.json`` (the references and digests tests install with). Root is needed
(mmdebstrap's root mode, a chroot to install the wheels).
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / ".cache" / "bin"
OUT = ROOT / ".cache" / "images"
WORK = OUT / "work"
BLOBS = OUT / "blobs" / "sha256"
MANIFEST = OUT / "images.json"
CONTAINERFILE = ROOT / "hooks" / "Containerfile"
EPOCH = 1700000000  # every file time in every layer, and SOURCE_DATE_EPOCH of mmdebstrap and pip
SUITE = "bookworm"
BASE_PACKAGES = ("python3", "ca-certificates")
BASE_EXCLUDES = ("/usr/share/man/*", "/usr/share/doc/*", "/usr/share/locale/*", "/usr/share/info/*",
                 "/usr/share/lintian/*", "/usr/share/zoneinfo/right/*", "/usr/share/zoneinfo/posix/*")
# Nothing in the images needs perl (it comes with debconf's tooling): the biggest part of the base.
BASE_PURGE = ("perl", "perl-modules-5.36", "libperl5.36")
NONROOT = 65532
PYVER = "python3.11"  # bookworm's
SITE = f"opt/venv/lib/{PYVER}/site-packages"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def log(msg: str) -> None:
    print(f"[images] {msg}", file=sys.stderr, flush=True)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def key_of(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def app_version() -> str:
    import yaml

    return str(yaml.safe_load((ROOT / "chart" / "Chart.yaml").read_text())["appVersion"])


# --------------------------------------------------------------------------------------------------
# The image configuration from hooks/Containerfile's final stage


def containerfile_config(path: Path = CONTAINERFILE) -> dict[str, Any]:
    """USER, ENV, WORKDIR, ENTRYPOINT, CMD and LABELs of the final stage, as an OCI image config's
    ``config`` ("${PATH}" expands to the default PATH, as on a Debian base image)."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())  # join continuation lines
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    starts = [i for i, ln in enumerate(lines) if ln.upper().startswith("FROM ")]
    env: dict[str, str] = {"PATH": DEFAULT_PATH}
    labels: dict[str, str] = {}
    cfg: dict[str, Any] = {}
    for line in lines[starts[-1] + 1:]:
        word, _, rest = line.partition(" ")
        word = word.upper()
        if word in ("ENV", "LABEL"):
            for k, v in re.findall(r'(\S+?)=("(?:[^"\\]|\\.)*"|\S+)', rest):
                v = v[1:-1] if v.startswith('"') else v
                if word == "ENV":
                    env[k] = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: env.get(m[1] or m[2], ""), v)
                else:
                    labels[k] = v
        elif word == "USER":
            cfg["User"] = rest.strip()
        elif word == "WORKDIR":
            cfg["WorkingDir"] = rest.strip()
        elif word in ("ENTRYPOINT", "CMD"):
            cfg["Entrypoint" if word == "ENTRYPOINT" else "Cmd"] = json.loads(rest)
    cfg["Env"] = [f"{k}={v}" for k, v in env.items()]
    cfg["Labels"] = labels
    return cfg


def containerfile_paths(path: Path = CONTAINERFILE) -> list[str]:
    """Destinations of the final stage's COPY lines: the files the image must carry."""
    lines = path.read_text().splitlines()
    starts = [i for i, ln in enumerate(lines) if ln.upper().startswith("FROM ")]
    return [ln.split()[-1] for ln in lines[starts[-1]:] if ln.startswith("COPY ")]


# --------------------------------------------------------------------------------------------------
# Layers: deterministic tar+gzip, cached by the hash of their inputs


@dataclass(frozen=True)
class Layer:
    digest: str  # sha256:<hex> of the gzip blob
    diff_id: str  # sha256:<hex> of the uncompressed tar
    size: int
    what: str

    def descriptor(self) -> dict[str, Any]:
        return {"mediaType": OCI_LAYER, "digest": self.digest, "size": self.size}


class _Hashing(io.RawIOBase):
    """A write-only file that hashes what passes through to TARGET."""

    def __init__(self, target: Any) -> None:
        self.target, self.h, self.n = target, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self.h.update(b)
        self.n += len(b)
        self.target.write(b)
        return len(b)


def _store_blob(tmp: Path, digest_hex: str) -> None:
    BLOBS.mkdir(parents=True, exist_ok=True)
    tmp.replace(BLOBS / digest_hex)


def from_cache(name: str, key: str) -> Layer | None:
    meta = WORK / "layers" / f"{name}.json"
    if meta.exists():
        doc = json.loads(meta.read_text())
        if doc["key"] == key and (BLOBS / doc["digest"].split(":")[1]).exists():
            return Layer(doc["digest"], doc["diff_id"], doc["size"], name)
    return None


def cached_layer(name: str, key: str, build: Any) -> Layer:
    """The layer NAME for inputs KEY: from the cache, or written by BUILD(tarfile) into a new blob."""
    if layer := from_cache(name, key):
        return layer
    meta = WORK / "layers" / f"{name}.json"
    t0 = time.monotonic()
    BLOBS.mkdir(parents=True, exist_ok=True)
    tmp = BLOBS / f".{name}.tmp"
    with open(tmp, "wb") as raw:
        outer = _Hashing(raw)
        with gzip.GzipFile(fileobj=outer, mode="wb", compresslevel=6, mtime=0, filename="") as gz:
            inner = _Hashing(gz)
            with tarfile.open(fileobj=inner, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                build(tar)
    layer = Layer("sha256:" + outer.h.hexdigest(), "sha256:" + inner.h.hexdigest(), outer.n, name)
    _store_blob(tmp, outer.h.hexdigest())
    meta.parent.mkdir(parents=True, exist_ok=True)
    meta.write_text(json.dumps({"key": key, "digest": layer.digest, "diff_id": layer.diff_id, "size": layer.size}))
    log(f"layer {name}: {layer.size / 1e6:.1f} MB in {time.monotonic() - t0:.1f}s")
    return layer


def _normal(info: tarfile.TarInfo, uid: int = 0, gid: int = 0) -> tarfile.TarInfo:
    info.mtime = EPOCH
    info.uid, info.gid, info.uname, info.gname = uid, gid, "", ""
    info.pax_headers = {}
    return info


def add_tree(tar: tarfile.TarFile, base: Path, rel: Iterable[str]) -> None:
    """Add the paths REL (relative to BASE, parents before children) with normalised metadata."""
    for r in rel:
        info = _normal(tar.gettarinfo(str(base / r), arcname=r))
        if info.isfile():
            with open(base / r, "rb") as f:
                tar.addfile(info, f)
        else:
            tar.addfile(info)


def walk(base: Path, top: str) -> Iterator[str]:
    """TOP and everything below it, relative to BASE, sorted, parents first."""
    yield top
    p = base / top
    if p.is_dir() and not p.is_symlink():
        for child in sorted(os.listdir(p)):
            yield from walk(base, f"{top}/{child}")


def add_file(tar: tarfile.TarFile, arcname: str, data: bytes, mode: int = 0o644) -> None:
    info = _normal(tarfile.TarInfo(arcname))
    info.size, info.mode = len(data), mode
    tar.addfile(info, io.BytesIO(data))


def add_dir(tar: tarfile.TarFile, arcname: str, mode: int = 0o755) -> None:
    info = _normal(tarfile.TarInfo(arcname))
    info.type, info.mode = tarfile.DIRTYPE, mode
    tar.addfile(info)


# --------------------------------------------------------------------------------------------------
# The Debian base and the Python environment


def base_tar() -> Path:
    """The Debian rootfs tarball of mmdebstrap (built once per package list)."""
    hooks = [
        f'echo "nonroot:x:{NONROOT}:{NONROOT}:nonroot:/tmp:/usr/sbin/nologin" >> "$1/etc/passwd"',
        f'echo "nonroot:x:{NONROOT}:" >> "$1/etc/group"',
        'chroot "$1" dpkg --purge --force-depends ' + " ".join(BASE_PURGE),
        'rm -rf "$1"/var/cache/* "$1"/var/lib/apt/lists/* "$1"/var/log/* "$1"/usr/share/perl5/Debconf/*.pm.orig',
    ]
    key = key_of(SUITE, BASE_PACKAGES, BASE_EXCLUDES, hooks, "essential")
    path = WORK / f"base-{key}.tar"
    tmp = WORK / f"base-{key}.tmp.tar"  # mmdebstrap picks its output format from the extension
    if path.exists():
        return path
    WORK.mkdir(parents=True, exist_ok=True)
    argv = ["mmdebstrap", "--variant=essential", f"--include={','.join(BASE_PACKAGES)}", "--quiet"]
    argv += [f"--dpkgopt=path-exclude={p}" for p in BASE_EXCLUDES]
    argv += [f"--customize-hook={h}" for h in hooks]
    argv += [SUITE, str(tmp)]
    log(f"mmdebstrap {SUITE} ({', '.join(BASE_PACKAGES)})")
    t0 = time.monotonic()
    subprocess.run(argv, check=True, env={**os.environ, "SOURCE_DATE_EPOCH": str(EPOCH)},
                   stdout=subprocess.DEVNULL)
    os.replace(tmp, path)
    log(f"base rootfs in {time.monotonic() - t0:.1f}s")
    return path


def base_layer(tarball: Path) -> Layer:
    """The base rootfs as a layer, device nodes left out (the runtime mounts /dev)."""

    def build(tar: tarfile.TarFile) -> None:
        with tarfile.open(tarball) as src:
            for info in src:
                if info.name.startswith("./dev/") and info.name != "./dev/":
                    continue
                info.name = info.name.removeprefix("./").rstrip("/") or "."
                if info.name == ".":
                    continue
                _normal(info, info.uid, info.gid)
                tar.addfile(info, src.extractfile(info) if info.isfile() else None)

    return cached_layer("base", key_of(tarball.name), build)


def chroot(stage: Path, *argv: str) -> None:
    env = {"PATH": f"/opt/venv/bin:{DEFAULT_PATH}", "HOME": "/root", "LANG": "C.UTF-8",
           "SOURCE_DATE_EPOCH": str(EPOCH), "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_CACHE_DIR": "1"}
    subprocess.run(["chroot", str(stage), *argv], check=True, env=env, stdout=subprocess.DEVNULL)


def dependencies(src: Path = ROOT) -> list[str]:
    import tomllib

    return list(tomllib.loads((src / "pyproject.toml").read_text())["project"]["dependencies"])


def venv_stage(tarball: Path, src: Path = ROOT, name: str = "stage") -> tuple[Path, Layer]:
    """A chroot of the base with /opt/venv holding SRC's dependencies; their layer. NAME keeps a
    release's stage apart from the working tree's (each would otherwise rebuild the other's)."""
    deps = dependencies(src)
    key = key_of(tarball.name, deps, "venv")
    stage = WORK / name
    stamp = WORK / f"{name}.key"
    if not (stamp.exists() and stamp.read_text() == key):
        t0 = time.monotonic()
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir(parents=True)
        subprocess.run(["tar", "-xf", str(tarball), "-C", str(stage)], check=True)
        wheels = stage / "wheels"
        log(f"wheels of {len(deps)} dependencies")
        pip = [str(ROOT / ".venv" / "bin" / "pip"), "-q", "--disable-pip-version-check"]
        subprocess.run([*pip, "wheel", "-w", str(wheels), *deps], check=True)
        subprocess.run([*pip, "download", "--no-deps", "-d", str(wheels / "pip"), "pip"], check=True)
        (wheels / "requirements.txt").write_text("\n".join(deps) + "\n")
        pip_whl = next((wheels / "pip").glob("pip-*.whl")).name
        chroot(stage, "/usr/bin/python3", "-m", "venv", "--without-pip", "/opt/venv")
        chroot(stage, "/opt/venv/bin/python", f"/wheels/pip/{pip_whl}/pip", "install", "--no-index",
               "--find-links=/wheels", "--no-compile", "-r", "/wheels/requirements.txt")
        chroot(stage, "/opt/venv/bin/python", "-m", "compileall", "-q", "--invalidation-mode", "unchecked-hash",
               f"/{SITE}")
        stamp.write_text(key)
        (WORK / f"{name}.app").unlink(missing_ok=True)
        log(f"dependencies installed in {time.monotonic() - t0:.1f}s")
    # The stage may already hold an app install (app_layer): the dependency layer never carries it.
    deps_only = [r for r in walk(stage, "opt") if not is_app_file(r)]
    layer = cached_layer(f"{name}-venv", key, lambda tar: add_tree(tar, stage, deps_only))
    return stage, layer


def is_app_file(rel: str) -> bool:
    """Whether REL (relative to a stage) belongs to the project's own install, not its dependencies."""
    top = rel.removeprefix(f"{SITE}/").split("/")[0]
    return rel == "opt/venv/bin/cluster-registry" or (
        rel.startswith(f"{SITE}/") and (top == "cluster_registry" or re.fullmatch(r"cluster_registry-.*\.dist-info", top) is not None))


def source_key(src: Path = ROOT) -> str:
    h = hashlib.sha256((src / "pyproject.toml").read_bytes())
    for p in sorted((src / "hooks" / "cluster_registry").rglob("*")):
        if p.is_file() and "__pycache__" not in p.parts:
            h.update(str(p.relative_to(src)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:24]


def app_layer(stage: Path, src: Path = ROOT) -> Layer:
    """SRC's wheel installed into the stage's venv (no dependencies) and compiled."""
    key = source_key(src)
    if layer := from_cache(f"{stage.name}-app", key):
        return layer
    t0 = time.monotonic()
    dist = WORK / "dist"
    shutil.rmtree(dist, ignore_errors=True)
    subprocess.run([str(ROOT / ".venv" / "bin" / "pip"), "-q", "--disable-pip-version-check", "wheel",
                    "--no-deps", "-w", str(dist), str(src)], check=True,
                   env={**os.environ, "SOURCE_DATE_EPOCH": str(EPOCH)}, stdout=subprocess.DEVNULL)
    wheel = next(dist.glob("cluster_registry-*.whl"))
    # The previous build's files go first, so the layer holds exactly this wheel's.
    site = stage / SITE
    for old in [*site.glob("cluster_registry"), *site.glob("cluster_registry-*.dist-info")]:
        shutil.rmtree(old)
    (stage / "opt/venv/bin/cluster-registry").unlink(missing_ok=True)
    shutil.copy(wheel, stage / "tmp" / wheel.name)
    pip_whl = next((stage / "wheels" / "pip").glob("pip-*.whl")).name
    chroot(stage, "/opt/venv/bin/python", f"/wheels/pip/{pip_whl}/pip", "install", "--no-deps", "--no-index", "--no-compile", f"/tmp/{wheel.name}")
    (stage / "tmp" / wheel.name).unlink()
    chroot(stage, "/opt/venv/bin/python", "-m", "compileall", "-q", "--invalidation-mode", "unchecked-hash",
           f"/{SITE}/cluster_registry")
    rel = ["opt/venv/bin/cluster-registry"]
    for top in sorted([*site.glob("cluster_registry"), *site.glob("cluster_registry-*.dist-info")]):
        rel += walk(stage, str(top.relative_to(stage)))
    layer = cached_layer(f"{stage.name}-app", key, lambda tar: add_tree(tar, stage, rel))
    log(f"project layer in {time.monotonic() - t0:.1f}s")
    return layer


def binaries_layer(name: str, files: dict[str, Path]) -> Layer:
    """Executables at the given paths in the image (every parent directory exists in the base)."""
    key = key_of({k: (str(v), v.stat().st_size, v.stat().st_mtime_ns) for k, v in files.items()})

    def build(tar: tarfile.TarFile) -> None:
        for arc, src in sorted(files.items()):
            info = _normal(tar.gettarinfo(str(src), arcname=arc.lstrip("/")))
            info.mode = 0o755
            with open(src, "rb") as f:
                tar.addfile(info, f)

    return cached_layer(name, key, build)


def pause_binary() -> Path:
    """Kubernetes' pause.c from the pinned module, linked statically."""
    gomod = ROOT / "ci" / "k8s" / "go.mod"
    version = re.search(r"^require k8s.io/kubernetes (v\S+)$", gomod.read_text(), re.M)
    assert version, gomod
    modcache = subprocess.run(["go", "env", "GOMODCACHE"], capture_output=True, text=True, check=True).stdout.strip()
    src = Path(modcache) / f"k8s.io/kubernetes@{version[1]}/build/pause/linux/pause.c"
    out = WORK / f"pause-{version[1]}"
    if not out.exists():
        WORK.mkdir(parents=True, exist_ok=True)
        subprocess.run(["gcc", "-Os", "-static", "-Wall", "-Werror", f'-DVERSION="{version[1]}"', "-o", str(out), str(src)],
                       check=True)
        subprocess.run(["strip", str(out)], check=True)
    return out


# --------------------------------------------------------------------------------------------------
# Images and OCI layouts


@dataclass(frozen=True)
class Built:
    name: str
    repositories: tuple[str, ...]  # where `push` puts it in a registry
    tag: str
    digest: str
    size: int  # compressed: manifest + config + layers
    layout: Path
    seconds: float


def write_image(name: str, repositories: tuple[str, ...], tag: str, layers: list[Layer], config: dict[str, Any],
                history: list[str], seconds: float) -> Built:
    doc = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(EPOCH)),
        "architecture": "amd64",
        "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [la.diff_id for la in layers]},
        "history": [{"created_by": h} for h in history],
    }
    cfg = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    cfg_hex = hashlib.sha256(cfg).hexdigest()
    BLOBS.mkdir(parents=True, exist_ok=True)
    (BLOBS / cfg_hex).write_bytes(cfg)
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": f"sha256:{cfg_hex}", "size": len(cfg)},
        "layers": [la.descriptor() for la in layers],
    }, sort_keys=True, separators=(",", ":")).encode()
    m_hex = hashlib.sha256(manifest).hexdigest()
    (BLOBS / m_hex).write_bytes(manifest)
    layout = OUT / name
    shutil.rmtree(layout, ignore_errors=True)
    (layout / "blobs" / "sha256").mkdir(parents=True)
    for h in [m_hex, cfg_hex, *(la.digest.split(":")[1] for la in layers)]:
        os.link(BLOBS / h, layout / "blobs" / "sha256" / h)
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (layout / "index.json").write_text(json.dumps({
        "schemaVersion": 2,
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": f"sha256:{m_hex}", "size": len(manifest),
                       "annotations": {"org.opencontainers.image.ref.name": tag}}],
    }, indent=1))
    size = len(manifest) + len(cfg) + sum(la.size for la in layers)
    return Built(name, repositories, tag, f"sha256:{m_hex}", size, layout, seconds)


def build_all() -> list[Built]:
    built: list[Built] = []
    t0 = time.monotonic()
    tarball = base_tar()
    base = base_layer(tarball)
    built.append(project_image("cluster-registry", app_version(), tarball, ROOT, "stage", "cluster-registry", t0))
    t1 = time.monotonic()
    registry = binaries_layer("registry", {"/usr/bin/registry": BIN / "registry"})  # /bin -> usr/bin in the base
    version = re.search(r"v(\d+\.\d+\.\d+)", subprocess.run([str(BIN / "registry"), "--version"], capture_output=True,
                                                         text=True, check=True).stdout)
    assert version
    built.append(write_image(
        # the chart's default repository (docker.io/library/registry) and distribution's own name
        "registry", ("library/registry", "distribution/registry"), version[1], [base, registry],
        {"Entrypoint": ["registry"], "Cmd": ["serve", "/etc/distribution/config.yml"],
         "Env": [f"PATH={DEFAULT_PATH}"], "WorkingDir": "/",
         "Labels": {"org.opencontainers.image.title": "distribution registry"}},
        ["mmdebstrap " + SUITE, "registry"], time.monotonic() - t1))
    built.append(pause_image())
    return built


def project_image(name: str, tag: str, tarball: Path, src: Path, stage_name: str, what: str, t0: float) -> Built:
    """The project's image from source tree SRC: the base, helm and registry, SRC's dependencies, SRC itself."""
    stage, venv = venv_stage(tarball, src, stage_name)
    tools = binaries_layer("tools", {"/usr/local/bin/registry": BIN / "registry", "/usr/local/bin/helm": BIN / "helm"})
    return write_image(name, ("cluster-registry/cluster-registry",), tag,
                       [base_layer(tarball), tools, venv, app_layer(stage, src)],
                       containerfile_config(src / "hooks" / "Containerfile"),
                       ["mmdebstrap " + SUITE, "helm, registry", "/opt/venv: dependencies", f"/opt/venv: {what}"],
                       time.monotonic() - t0)


def build_release(rev: str, tag: str) -> Built:
    """The project's image as released at git revision REV (its code and dependencies on today's
    base), tagged TAG: what tests/e2e/test_upgrade.py installs the last release's chart with."""
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="release-src-") as tmp:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        return project_image(f"cluster-registry-{tag}", tag, base_tar(), Path(tmp), "stage-release",
                             f"cluster-registry at {rev}", t0)


def pause_image() -> Built:
    t0 = time.monotonic()
    pause = binaries_layer("pause", {"/pause": pause_binary()})
    return write_image(
        "pause", ("localcluster/pause",), "3.10", [pause],
        {"Entrypoint": ["/pause"], "User": "65535:65535", "Env": [f"PATH={DEFAULT_PATH}"], "WorkingDir": "/"},
        ["pause.c"], time.monotonic() - t0)


def push_pause(host: str) -> None:
    """The sandbox image of the local cluster's containerds, in the cluster registry (ci/localcluster up)."""
    push([pause_image()], [(host, None)])


# --------------------------------------------------------------------------------------------------
# Push


def push(built: list[Built], targets: list[tuple[str, tuple[str, str] | None]]) -> dict[str, Any]:
    """Copy each layout to every target registry (plain HTTP) with skopeo, digests preserved."""
    out: dict[str, Any] = {}
    for b in built:
        refs = {}
        for host, creds in targets:
            for repo in b.repositories:
                dest = f"{host}/{repo}:{b.tag}"
                refs.setdefault(host, f"{dest}@{b.digest}")
                if tagged(host, repo, b.tag, b.digest, creds):
                    continue
                argv = ["skopeo", "copy", "-q", "--preserve-digests", "--dest-tls-verify=false",
                        f"oci:{b.layout}:{b.tag}", f"docker://{dest}"]
                if creds:
                    argv.insert(2, f"--dest-creds={creds[0]}:{creds[1]}")
                subprocess.run(argv, check=True)
        out[b.name] = {"repository": b.repositories[0], "tag": b.tag, "digest": b.digest, "size": b.size,
                       "layout": str(b.layout), "seconds": round(b.seconds, 1), "refs": refs}
    return out


# The names the chart's default values give the images (the real nodes' containerd mirrors these
# registries to the local cluster's registry: ci/localnodes.py).
DEFAULT_NAMES = {"cluster-registry": ("ghcr.io/cluster-registry/cluster-registry",),
                 "registry": ("docker.io/library/registry",)}


def forget_stale(built: list[Built]) -> None:
    """Untag an older build on every real node of the local cluster, so that the next pod pulls
    this one (the chart's pullPolicy is IfNotPresent); running containers keep theirs."""
    nodes = ROOT / ".cache" / "localcluster" / "nodes"
    socks = sorted(Path("/run/localcluster").glob("*/containerd.sock")) if nodes.is_dir() else []
    for sock in socks:
        ctr = ["ctr", "-a", str(sock), "-n", "k8s.io", "images"]
        listed = subprocess.run([*ctr, "ls"], capture_output=True, text=True)
        have = dict(line.split()[0:3:2] for line in listed.stdout.splitlines()[1:] if line.strip())
        for b in built:
            for name in DEFAULT_NAMES.get(b.name, ()):
                for ref in (f"{name}:{b.tag}", *(f"{h}/{r}:{b.tag}" for h, _ in local_targets() for r in b.repositories)):
                    if ref in have and have[ref] != b.digest:
                        subprocess.run([*ctr, "rm", ref], capture_output=True)
                        log(f"{sock.parent.name}: untagged the older {ref}")


def tagged(host: str, repo: str, tag: str, digest: str, creds: tuple[str, str] | None) -> bool:
    """True when HOST already serves DIGEST under TAG (a push would change nothing)."""
    import base64
    import urllib.error
    import urllib.request

    req = urllib.request.Request(f"http://{host}/v2/{repo}/manifests/{tag}", method="HEAD",
                                 headers={"Accept": OCI_MANIFEST})
    if creds:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=10) as r:  # noqa: S310 (the local cluster's registries)
            return r.headers.get("Docker-Content-Digest") == digest
    except (urllib.error.URLError, OSError):
        return False


def local_targets() -> list[tuple[str, tuple[str, str] | None]]:
    """The local cluster's two registries, when `ci/localcluster up` has written its env file."""
    env_file = ROOT / ".cache" / "localcluster" / "env"
    if not env_file.exists():
        return []
    env = dict(line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line)
    return [(env["CLUSTER_REGISTRY"], None),
            (env["ARTIFACT_STORE"], (env["ARTIFACT_STORE_USER"], env["ARTIFACT_STORE_PASSWORD"]))]


def main(argv: list[str]) -> int:
    if argv not in ([], ["build"], ["push"]) and not (len(argv) == 3 and argv[0] == "push-release"):
        print("usage: ci/images [build|push|push-release REV TAG]", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("ci/images: needs root (mmdebstrap's root mode, chroot)", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    OUT.mkdir(parents=True, exist_ok=True)
    lock = open(OUT / "lock", "w")  # e2e sessions run `push` at once: one build at a time
    fcntl.flock(lock, fcntl.LOCK_EX)
    if argv[:1] == ["push-release"]:  # another revision's image beside the working tree's (no forget_stale)
        release = build_release(argv[1], argv[2])
        print(json.dumps(push([release], local_targets())[release.name]))
        return 0
    built = build_all()
    summary: dict[str, Any] = {b.name: {"digest": b.digest, "size": b.size, "seconds": round(b.seconds, 1)}
                               for b in built}
    if argv == ["push"]:
        targets = local_targets()
        if not targets:
            print("ci/images: no local cluster (run ci/localcluster up first)", file=sys.stderr)
            return 2
        summary = push(built, targets)
        MANIFEST.write_text(json.dumps(summary, indent=1) + "\n")
        forget_stale(built)
    print(json.dumps({"seconds": round(time.monotonic() - t0, 1),
                      "images": {k: {"digest": v["digest"], "size": v["size"]} for k, v in summary.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
