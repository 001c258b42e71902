"""registryAccess (#15): what isolated mode (the default) renders, and that shared renders none of it."""

from __future__ import annotations

import pytest

from tests.chart.chartlib import pod_spec, render, workloads
from tests.chart.test_render import _command, _without_filesystem, containers

PREFIX = "t-cluster-registry-"
ISOLATED = ("registryAccess.mode=isolated", "registryAccess.pullSecretName=tenant-pull",
            "registryAccess.pullCredentialRotation=0 4 * * 1")  # fmt: skip


def argv_of(docs: list[dict], command: str) -> list[str]:
    (args,) = [c["args"] for w in workloads(docs) for c in containers(w) if " ".join(c.get("args", [])).startswith(command + " ")]
    return list(args)


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_isolated_wires_the_pull_secret_through_webhook_reconciler_and_rotation() -> None:
    docs = render(*ISOLATED)
    webhook, reconciler = argv_of(docs, "webhook"), argv_of(docs, "reconcile artifacts")
    assert flag(webhook, "--pull-secret") == flag(reconciler, "--pull-secret") == "tenant-pull"
    # the Secret is for the host the webhook rewrites to, and names the key Secret the rotation updates
    assert flag(reconciler, "--pull-secret-host") == flag(webhook, "--registry-host")
    (cron,) = [w for w in workloads(docs) if w["kind"] == "CronJob" and w["metadata"]["name"] == PREFIX + "pull-keys"]
    assert cron["spec"]["schedule"] == "0 4 * * 1"
    rotate = argv_of(docs, "reconcile rotate-pull-keys")
    assert flag(rotate, "--pull-keys") == flag(reconciler, "--pull-keys") == PREFIX + "pull-keys"
    assert pod_spec(cron)["serviceAccountName"] == PREFIX + "pull-keys"
    for args in (webhook, reconciler, rotate):  # every flag parses as the pod's CLI would parse it
        cmd, rest = _command(args)
        with _without_filesystem(cmd).make_context("x", list(rest)) as ctx:
            assert ctx.params is not None


def test_isolated_is_the_default() -> None:
    docs = render()
    assert flag(argv_of(docs, "webhook"), "--pull-secret") == "cluster-registry-pull"
    assert [d for d in docs if d["kind"] == "CronJob" and d["metadata"]["name"] == PREFIX + "pull-keys"]


def test_shared_renders_no_pull_secret_and_no_rotation() -> None:
    docs = render("registryAccess.mode=shared")
    assert "--pull-secret" not in argv_of(docs, "webhook") + argv_of(docs, "reconcile artifacts")
    assert not [d for d in docs if d["metadata"]["name"] == PREFIX + "pull-keys"]


def test_an_unknown_mode_is_refused() -> None:
    from tests.chart.chartlib import render_error

    assert "registryAccess" in render_error("registryAccess.mode=open")
