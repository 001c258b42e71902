"""The chart's `helm test` probe (chart/files/helm-test.py) against the registry as the chart runs it:
distribution with `auth: token` and the real token service, with the artifact reconciler's credential.
The probe ran only inside `helm test` before, where a header-case slip (Go sends `Www-Authenticate`)
was seen as a failed pod and nothing more."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_token_service import PUSHERS, Sources
from tests.support.cluster import ROOT
from tests.support.tokenfront import LocalFront, local_front

pytestmark = pytest.mark.integration
PROBE = ROOT / "chart" / "files" / "helm-test.py"


@pytest.fixture(scope="module", params=["isolated", "shared"])
def access(request: pytest.FixtureRequest) -> str:
    """registryAccess.mode, as the token service runs it and the chart tells the probe."""
    return str(request.param)


@pytest.fixture(scope="module")
def front(access: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFront[Sources]]:
    with local_front(tmp_path_factory.mktemp("probe-front"), Sources(), shared=access == "shared") as f:
        yield f


def probe(front: LocalFront[Sources], access: str, tmp: Path, user: str, password: str) -> subprocess.CompletedProcess[str]:
    creds = tmp / "credentials.yaml"
    creds.write_text(f"username: {user}\npassword: {password}\n")
    # the probe is told the access mode as the chart tells it: it checks what an anonymous caller gets
    return subprocess.run([sys.executable, str(PROBE), f"http://{front.registry.host}", str(creds), "rel-helm-test/probe", front.realm],
                          capture_output=True, text=True, timeout=60, env={**os.environ, "REGISTRY_ACCESS": access})  # fmt: skip


def test_the_probe_pushes_and_pulls_through_the_token_front(front: LocalFront[Sources], access: str, tmp_path: Path) -> None:
    done = probe(front, access, tmp_path, "artifact-reconciler", PUSHERS["artifact-reconciler"])
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["pushedAndPulled"].startswith("sha256:") and report["anonymousPull"] == {"shared": "served", "isolated": "refused"}[access], report


def test_the_probe_fails_clearly_without_a_push_credential(front: LocalFront[Sources], access: str, tmp_path: Path) -> None:
    done = probe(front, access, tmp_path, "artifact-reconciler", "wrong")
    assert done.returncode != 0 and "helm-test: get a push token: HTTP 401" in done.stderr, done.stderr
