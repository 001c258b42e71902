"""Threshold arithmetic, and the storage sizes and durations GC reads (``units``)."""

from __future__ import annotations

import pytest

from cluster_registry.errors import ConfigError
from cluster_registry.gc.threshold import decide
from cluster_registry.units import parse_bytes, parse_duration

GI = 2**30


@pytest.mark.parametrize(
    "text,expected",
    [("100Gi", 100 * GI), ("1Ti", 2**40), ("1.5Gi", 3 * 2**29), ("500M", 500 * 10**6), ("1024", 1024),
     ("2Ki", 2048), ("1G", 10**9)],
)  # fmt: skip
def test_parse_bytes(text: str, expected: int) -> None:
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "Gi", "100gi", "-1Gi", "0", "1.Gi", "10 Gi", "100ki"])
def test_parse_bytes_rejects(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_bytes(text)


@pytest.mark.parametrize(
    "used,size,threshold,run",
    [
        (0, 100 * GI, 0, True),  # 0 always runs, even empty
        (79 * GI, 100 * GI, 80, False),
        (80 * GI, 100 * GI, 80, True),  # exactly at the threshold runs
        (80 * GI - 1, 100 * GI, 80, False),  # one byte below does not
        (120 * GI, 100 * GI, 100, True),  # overcommitted
        (99 * GI, 100 * GI, 100, False),
        (1, 3, 33, True),  # 33.3% >= 33%: no float rounding trouble
        (1, 3, 34, False),
    ],
)
def test_decide(used: int, size: int, threshold: int, run: bool) -> None:
    dec = decide(used, size, threshold)
    assert dec.run is run
    assert dec.percent == pytest.approx(used * 100 / size)


@pytest.mark.parametrize("threshold", [-1, 101])
def test_decide_rejects_bad_threshold(threshold: int) -> None:
    with pytest.raises(ConfigError):
        decide(1, 10, threshold)


@pytest.mark.parametrize("text,seconds", [("1h", 3600), ("90m", 5400), ("1h30m", 5400), ("45s", 45), ("60", 60)])
def test_parse_duration(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "1d", "h", "-1h"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_duration(text)
