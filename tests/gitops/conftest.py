"""GitOps fixtures: the local cluster (started on demand), as tests/e2e has it."""

from __future__ import annotations

import pytest

from tests.support.cluster import Cluster, ensure_up


@pytest.fixture(scope="session")
def cluster() -> Cluster:
    """The running local cluster; `ci/localcluster up` is called when it is missing or unhealthy."""
    return ensure_up()
