"""Chart-test helpers: `helm template` of chart/ with values files and --set flags, parsed and cached."""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "chart"
BIN = ROOT / ".cache" / "bin"
KUBE_VERSION = "1.35.0"  # the pinned control plane (ci/toolchain K8S); helm built from source reports 1.20
RELEASE, NAMESPACE = "t", "crs"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
PREFIX = "global.networkfunctionextension."

Doc = dict[str, Any]


def tool(name: str) -> str:
    path = BIN / name
    assert path.is_file(), f"{path} is missing: run ci/toolchain"
    return str(path)


def helm_template(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("helm"), "template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--kube-version", KUBE_VERSION, *args],
        capture_output=True, text=True, check=False,
    )


@functools.lru_cache(maxsize=None)
def _render(files: tuple[str, ...], sets: tuple[str, ...]) -> tuple[str, tuple[Doc, ...]]:
    args: list[str] = []
    for f in files:
        args += ["-f", f]
    for s in sets:
        args += ["--set", s if s.startswith("global.") else PREFIX + s]
    result = helm_template(*args)
    assert result.returncode == 0, result.stderr
    docs = tuple(d for d in yaml.safe_load_all(result.stdout) if d)
    return result.stdout, docs


def render(*sets: str, files: tuple[str, ...] = ()) -> list[Doc]:
    """Parsed manifests; `sets` are `key=value` relative to global.networkfunctionextension."""
    return list(_render(tuple(files), tuple(sets))[1])


def render_text(*sets: str, files: tuple[str, ...] = ()) -> str:
    return _render(tuple(files), tuple(sets))[0]


def render_error(*sets: str, files: tuple[str, ...] = ()) -> str:
    """The error of a render that must fail (asserts that it does)."""
    args: list[str] = []
    for f in files:
        args += ["-f", f]
    for s in sets:
        args += ["--set", PREFIX + s]
    result = helm_template(*args)
    assert result.returncode != 0, f"rendering with {sets} succeeded but must fail"
    return result.stderr


def find(docs: list[Doc], kind: str, name_suffix: str = "") -> Doc:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(name_suffix)]
    assert len(matches) == 1, f"expected one {kind} *{name_suffix}, found {[d['metadata']['name'] for d in matches]}"
    return matches[0]


def all_of(docs: list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def pod_spec(doc: Doc) -> Doc:
    if doc["kind"] == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return doc["spec"]["template"]["spec"]


def workloads(docs: list[Doc]) -> list[Doc]:
    return [d for d in docs if d["kind"] in ("Deployment", "Job", "CronJob")]
