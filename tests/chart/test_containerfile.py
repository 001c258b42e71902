"""hooks/Containerfile agrees with what the chart expects of the image (it is not built here: no engine)."""

from __future__ import annotations

import json
import re

from tests.chart.chartlib import ROOT, pod_spec, render, workloads

CONTAINERFILE = ROOT / "hooks" / "Containerfile"


def final_stage() -> list[str]:
    lines = [line.strip() for line in CONTAINERFILE.read_text().splitlines()]
    starts = [i for i, line in enumerate(lines) if line.upper().startswith("FROM ")]
    assert starts, "no FROM"
    return [line for line in lines[starts[-1]:] if line and not line.startswith("#")]


def test_image_is_slim_non_root_and_runs_the_cli() -> None:
    text = CONTAINERFILE.read_text()
    stage = final_stage()
    assert re.search(r"^ARG PYTHON_IMAGE=\S*python:3\.1[1-9]\S*-slim", text, re.M), "a slim Python base"
    assert stage[0] == "FROM ${PYTHON_IMAGE}"
    users = [line.split()[1] for line in stage if line.startswith("USER ")]
    assert users == ["65532:65532"]
    entry = [json.loads(line.split(None, 1)[1]) for line in stage if line.startswith("ENTRYPOINT ")]
    assert entry == [["cluster-registry"]]
    assert "pip install ." in text, "the image installs the package itself"
    for binary in ("/usr/local/bin/registry", "/usr/local/bin/helm"):  # GC's sweep, the component reconciler's charts
        assert any(line.startswith("COPY --from=") and line.endswith(binary) for line in stage), binary
    assert "HOME=/tmp" in text and "PYTHONDONTWRITEBYTECODE=1" in text, "nothing written outside the /tmp emptyDir"


def test_chart_runs_the_image_the_way_it_is_built() -> None:
    docs = render("enableEarlyLoading=true", "earlyLoading.images[0]=a.example/b:1", "enableLocalRegistry=true")
    seen = 0
    for doc in workloads(docs):
        spec = pod_spec(doc)
        for c in spec["containers"]:
            if "/cluster-registry:" not in c["image"]:
                continue
            seen += 1
            assert c["securityContext"]["readOnlyRootFilesystem"] is True
            assert "/tmp" in {m["mountPath"] for m in c.get("volumeMounts", [])}, f"{doc['metadata']['name']}: /tmp emptyDir"
            if "command" in c:  # only the registry-secret hook replaces the entrypoint, with the image's python
                assert c["command"][0] == "python", doc["metadata"]["name"]
            else:
                assert c["args"][0] in {"webhook", "token-service", "reconcile", "gc", "certs", "validate", "preload", "sideload",
                                        "node-proxy", "registry-secret"}
        assert spec["securityContext"]["runAsUser"] == 65532
    assert seen >= 10


def test_ci_images_reads_the_documented_config() -> None:
    """ci/images builds the image without an engine and takes USER, ENV, WORKDIR, ENTRYPOINT, CMD and
    LABELs from this file's final stage (tests/e2e/test_images.py checks the built image against it)."""
    import sys

    sys.path.insert(0, str(ROOT / "ci"))
    import images

    cfg = images.containerfile_config(CONTAINERFILE)
    env = dict(e.split("=", 1) for e in cfg["Env"])
    assert cfg["User"] == "65532:65532" and cfg["WorkingDir"] == "/tmp"
    assert cfg["Entrypoint"] == ["cluster-registry"] and cfg["Cmd"] == ["--help"]
    assert env["PATH"] == "/opt/venv/bin:" + images.DEFAULT_PATH, "${PATH} expanded against the base's PATH"
    assert env["HOME"] == "/tmp" and env["HELM_CACHE_HOME"] == "/tmp/helm/cache"
    assert cfg["Labels"]["org.opencontainers.image.title"] == "cluster-registry"
    assert images.containerfile_paths(CONTAINERFILE) == ["/opt/venv", "/usr/local/bin/registry", "/usr/local/bin/helm"]
