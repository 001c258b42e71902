"""Marks every test by the layer folder it lives in, so `pytest -m unit` etc. select a layer."""

from __future__ import annotations

from pathlib import Path

import pytest

_LAYERS = {"unit", "chart", "integration", "e2e", "gitops"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        layer = Path(str(item.fspath)).relative_to(Path(__file__).parent).parts[0]
        if layer in _LAYERS:
            item.add_marker(getattr(pytest.mark, layer))
