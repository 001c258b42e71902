"""Integration tests run against real distribution registries started on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.registry import Registry, registry_binary, run_registry


@pytest.fixture(autouse=True, scope="session")
def _registry_binary() -> None:
    # A missing binary is a broken toolchain: fail loudly rather than skip the layer.
    assert registry_binary() is not None, "no distribution registry binary: run ci/toolchain"


@pytest.fixture
def src(tmp_path: Path) -> Iterator[Registry]:
    with run_registry(tmp_path / "src") as reg:
        yield reg


@pytest.fixture
def dst(tmp_path: Path) -> Iterator[Registry]:
    with run_registry(tmp_path / "dst") as reg:
        yield reg
