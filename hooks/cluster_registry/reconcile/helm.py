"""Render a Component's chart with the real ``helm template`` (an adapter: subprocess, temp files).

Credentials reach helm only through a private registry-config file (a docker config JSON built from
the Component's pull secrets) in a temporary directory removed afterwards: never on the command
line, in the environment or in a message.

Tenants' charts are untrusted, so helm runs as a child with nothing of ours: an environment of PATH and
its own temporary homes only (no KUBERNETES_SERVICE_* address, ``KUBECONFIG=/dev/null``: it cannot
find the API server, let alone the service account's token), a time limit, and its output read only
up to ``max_output`` bytes (a chart rendering gigabytes is killed, not buffered).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import signal
import tempfile
from collections.abc import Iterable
from typing import Any

from cluster_registry.errors import ConfigError, PermanentError, TemporaryError

_TEMPORARY = re.compile(
    r"connection refused|i/o timeout|timeout|no such host|connection reset|unexpected EOF|too ?many ?requests"
    r"|(?:status|code|response)\D{0,8}(?:5\d\d|429)\b",
    re.I,
)


MAX_OUTPUT = 32 * 1024 * 1024  # bytes of rendered YAML: thousands of manifests


class OutputTooLarge(Exception):
    pass


async def _bounded(stream: asyncio.StreamReader, limit: int) -> bytes:
    """All of ``stream``, or OutputTooLarge as soon as it passes ``limit`` bytes."""
    chunks: list[bytes] = []
    size = 0
    while chunk := await stream.read(65536):
        size += len(chunk)
        if size > limit:
            raise OutputTooLarge()
        chunks.append(chunk)
    return b"".join(chunks)


async def _tail(stream: asyncio.StreamReader, keep: int) -> bytes:
    """The last ``keep`` bytes of ``stream`` (helm's message is at the end), read to its end."""
    tail = b""
    while chunk := await stream.read(65536):
        tail = (tail + chunk)[-keep:]
    return tail


async def _stop(proc: asyncio.subprocess.Process, readers: "list[asyncio.Task[bytes]]") -> None:
    """Kill helm's whole session and stop reading its pipes. The exit is awaited for a bounded time only:
    a reaped child whose exit notice asyncio misses must not hang the reconciler (seen in the unit suite)."""
    for task in readers:
        task.cancel()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(proc.wait(), 5)


def merge_docker_configs(configs: Iterable[bytes]) -> dict[str, Any]:
    """One ``{"auths": {...}}`` from several ``.dockerconfigjson``/``.dockercfg`` documents (first wins)."""
    auths: dict[str, Any] = {}
    for data in configs:
        try:
            doc = json.loads(data)
        except ValueError:
            raise ConfigError("a chart pull secret is not valid docker config JSON") from None
        if not isinstance(doc, dict):
            continue
        entries = doc["auths"] if isinstance(doc.get("auths"), dict) else doc
        for host, entry in entries.items():
            if isinstance(entry, dict):
                if "auth" not in entry and entry.get("username"):
                    raw = f"{entry['username']}:{entry.get('password', '')}".encode()
                    entry = {**entry, "auth": base64.b64encode(raw).decode()}
                key = re.sub(r"^[a-z]+://", "", host).split("/", 1)[0]
                auths.setdefault(key, entry)
    return {"auths": auths}


def chart_host(ref: str) -> str:
    return ref.removeprefix("oci://").split("/", 1)[0]


def _scrub(text: str) -> str:
    """The last meaningful line of helm's stderr, without anything that looks like a credential."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    line = lines[-1] if lines else "helm template failed"
    line = re.sub(r"(?i)(password|token|auth)[=:]\s*\S+", r"\1=***", line)
    return line[:500]


async def template(
    helm: str,
    *,
    release: str,
    namespace: str,
    ref: str,
    version: str | None,
    values: dict[str, Any] | None,
    docker_configs: Iterable[bytes] = (),
    plain_http: bool = False,
    ca_file: str | None = None,
    kube_version: str | None = None,
    timeout: float = 120.0,
    max_output: int = MAX_OUTPUT,
) -> str:
    """``helm template`` output (YAML). Raises TemporaryError (registry away) or PermanentError."""
    if not ref.startswith("oci://"):
        raise PermanentError(f"spec.chart.ref {ref!r} must be an oci:// reference")
    with tempfile.TemporaryDirectory(prefix="cr-helm-") as tmp:
        values_file = os.path.join(tmp, "values.json")
        with open(values_file, "w") as f:
            json.dump(values or {}, f)
        registry_config = os.path.join(tmp, "config.json")
        fd = os.open(registry_config, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(merge_docker_configs(docker_configs), f)
        cmd = [helm, "template", release, ref, "--namespace", namespace, "--values", values_file,
               "--registry-config", registry_config]
        if version:
            cmd += ["--version", version]
        if plain_http:
            cmd.append("--plain-http")
        if ca_file:
            cmd += ["--ca-file", ca_file]
        if kube_version:  # else helm assumes an old Kubernetes and kubeVersion constraints fail
            cmd += ["--kube-version", kube_version]
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": tmp,
            "KUBECONFIG": os.devnull,
            "HELM_CACHE_HOME": os.path.join(tmp, "cache"),
            "HELM_CONFIG_HOME": os.path.join(tmp, "config"),
            "HELM_DATA_HOME": os.path.join(tmp, "data"),
        }
        try:
            proc = await asyncio.create_subprocess_exec(
                *cmd, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                env=env, start_new_session=True,
            )
        except OSError as err:
            raise ConfigError(f"cannot run helm ({helm}): {err.strerror}") from None
        assert proc.stdout is not None and proc.stderr is not None
        tasks = [asyncio.ensure_future(_bounded(proc.stdout, max_output)), asyncio.ensure_future(_tail(proc.stderr, 64 << 10))]
        try:
            await asyncio.wait_for(asyncio.gather(*tasks, proc.wait()), timeout)
        except (asyncio.TimeoutError, OutputTooLarge) as exc:
            await _stop(proc, tasks)
            if isinstance(exc, OutputTooLarge):
                raise PermanentError(f"helm template {ref}: the chart renders more than {max_output} bytes") from None
            raise TemporaryError(f"helm template {ref} timed out after {timeout:.0f}s") from None
        out, err_out = tasks[0].result(), tasks[1].result()
        if proc.returncode != 0:
            message = f"helm template {ref}{':' + version if version else ''}: {_scrub(err_out.decode(errors='replace'))}"
            raise (TemporaryError if _TEMPORARY.search(message) else PermanentError)(message)
        return out.decode()
