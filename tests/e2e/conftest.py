"""E2E fixtures: the local cluster (started on demand) and a fresh namespace per test."""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator

import pytest

from tests.support.cluster import Cluster, CommandError, ensure_up, wait_for


@pytest.fixture(scope="session")
def cluster() -> Cluster:
    """The running local cluster; `ci/localcluster up` is called when it is missing or unhealthy."""
    return ensure_up()


@pytest.fixture
def namespace(cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """A namespace named after the test, deleted (and waited for) afterwards."""
    base = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"e2e-{base}-{secrets.token_hex(3)}"
    cluster.kubectl("create", "namespace", name)
    wait_for(lambda: cluster.kubectl("get", "serviceaccount", "default", "-n", name, check=False),
             timeout=60, what=f"default service account in {name}")
    yield name
    try:
        cluster.kubectl("delete", "namespace", name, "--wait=false")
    except CommandError:
        pass
