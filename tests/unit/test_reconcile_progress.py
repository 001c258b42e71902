"""Progress writes only for work that lasts (#20, a cluster's worth of images): with a progress delay a
quick copy costs an Artifact one status write and one Event, a slow one still shows Copying first.

Without it a new Artifact costs 6 API writes (create, Pending, Copying and its Event, Ready and its
Event); bench/fleet.py's target is 3."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from cluster_registry import reference
from cluster_registry.oci.auth import Credentials
from cluster_registry.oci.copy import CopyResult
from cluster_registry.reconcile.worker import reported_after
from tests.unit.test_reconcile_artifacts import Clock, FakeKube, Script, drain, make, result


class Log:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def report(self, what: str, seconds: float = 0.0) -> Any:
        async def run() -> None:
            self.lines.append(f"{what} begun")
            await asyncio.sleep(seconds)
            self.lines.append(f"{what} done")
        return run


async def test_a_body_that_ends_before_the_delay_never_reports() -> None:
    log = Log()
    async with reported_after(0.2, log.report("copying")):
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.3)
    assert log.lines == []


async def test_a_body_that_lasts_reports_once_and_the_report_ends_before_the_result() -> None:
    log = Log()
    async with reported_after(0.02, log.report("copying", seconds=0.1)):
        await asyncio.sleep(0.05)  # ends while the report is under way: it is finished first
    log.lines.append("result")
    assert log.lines == ["copying begun", "copying done", "result"]


async def test_no_delay_reports_before_the_body() -> None:
    log = Log()
    async with reported_after(0, log.report("copying")):
        log.lines.append("body")
    assert log.lines == ["copying begun", "copying done", "body"]


async def test_a_failed_deferred_report_is_logged_and_the_body_counts(caplog: pytest.LogCaptureFixture) -> None:
    async def broken() -> None:
        raise RuntimeError("API server away")

    with caplog.at_level(logging.WARNING):
        async with reported_after(0.01, broken):
            await asyncio.sleep(0.05)
    assert "a progress report failed" in caplog.text


class SlowScript(Script):
    def __init__(self, seconds: float, *answers: Any) -> None:
        super().__init__(*answers)
        self.seconds = seconds

    async def copy(self, src: reference.Reference, dst: reference.Reference, creds: Credentials | None) -> CopyResult:
        await asyncio.sleep(self.seconds)
        return await super().copy(src, dst, creds)


async def test_a_quick_copy_writes_ready_and_its_event_only_for_every_namespace() -> None:
    kube, clock, script = FakeKube(), Clock(), Script(result())
    r = make(script, kube, clock, progress_delay=5.0)
    for ns in ("a", "b"):
        r.on_event("ADDED", kube.add(ns, "nginx", "docker.io/library/nginx:1.25"))
    assert not r._tasks  # no Pending write queued
    await drain(r, kube)
    assert [(key, w.get("phase")) for key, w in kube.status_writes] == [("a/nginx", "Ready"), ("b/nginx", "Ready")]
    assert [e[2] for e in kube.events] == ["Copied", "Copied"]
    assert len(script.calls) == 1


async def test_a_slow_copy_still_shows_copying_before_ready() -> None:
    kube, clock, script = FakeKube(), Clock(), SlowScript(0.2, result())
    r = make(script, kube, clock, progress_delay=0.05)
    r.on_event("ADDED", kube.add("a", "big", "ghcr.io/x/big:1"))
    await drain(r, kube)
    assert [w.get("phase") for _, w in kube.status_writes] == ["Copying", "Ready"]
    assert [e[2] for e in kube.events] == ["Copying", "Copied"]
