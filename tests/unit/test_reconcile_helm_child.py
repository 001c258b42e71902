"""The helm child process that renders tenants' charts (#16 item 5): it gets nothing of ours (no API
server address, no kubeconfig, no credentials in its environment), a time limit and bounded output.
A stand-in `helm` (a script) plays the malicious chart's part."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from cluster_registry.errors import PermanentError, TemporaryError
from cluster_registry.reconcile import helm


def fake_helm(tmp_path: Path, body: str) -> str:
    path = tmp_path / "helm"
    path.write_text(f"#!{sys.executable}\nimport json, os, sys, time\n{body}\n")
    path.chmod(0o755)
    return str(path)


async def render(binary: str, **kw: object) -> str:
    return await helm.template(binary, release="r", namespace="t", ref="oci://reg.example/c", version="1.0",
                               values={}, docker_configs=[b'{"auths": {}}'], **kw)  # type: ignore[arg-type]  # fmt: skip


async def test_helm_sees_no_api_server_and_no_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "KUBERNETES_SERVICE_PORT": "443",
                        "KUBECONFIG": "/root/.kube/config", "REGISTRY_PASSWORD": "hunter2",
                        "AWS_SECRET_ACCESS_KEY": "x"}.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    out = await render(fake_helm(tmp_path, "print(json.dumps(dict(os.environ)))"))
    env = json.loads(out)
    assert set(env) <= {"PATH", "HOME", "KUBECONFIG", "HELM_CACHE_HOME", "HELM_CONFIG_HOME", "HELM_DATA_HOME", "LC_CTYPE"}
    assert env["KUBECONFIG"] == os.devnull
    assert "hunter2" not in out and "10.0.0.1" not in out


async def test_output_is_bounded(tmp_path: Path) -> None:
    binary = fake_helm(tmp_path, "chunk = b'a: b\\n' * 16384\nwhile True:\n    sys.stdout.buffer.write(chunk)")
    start = time.monotonic()
    with pytest.raises(PermanentError, match="renders more than 1048576 bytes"):
        await render(binary, max_output=1 << 20)
    assert time.monotonic() - start < 10


async def test_a_hanging_helm_is_killed_at_the_time_limit(tmp_path: Path) -> None:
    binary = fake_helm(tmp_path, "time.sleep(60)")
    start = time.monotonic()
    with pytest.raises(TemporaryError, match="timed out after 1s"):
        await render(binary, timeout=1.0)
    assert time.monotonic() - start < 5


async def test_stderr_is_kept_to_its_tail(tmp_path: Path) -> None:
    binary = fake_helm(tmp_path, "sys.stderr.write('x' * 1_000_000 + '\\nError: chart not found\\n'); sys.exit(1)")
    with pytest.raises(PermanentError, match="chart not found"):
        await render(binary)
