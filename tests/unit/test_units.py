"""units: the one parser of quantities and durations (GC, validate, preload and certs all read through it)."""

from __future__ import annotations

from fractions import Fraction

import pytest

from cluster_registry.errors import ConfigError
from cluster_registry.units import UnitError, parse_bytes, parse_duration, parse_quantity


def test_one_dialect_for_every_caller() -> None:
    assert parse_quantity("100Gi") == parse_bytes("100Gi") == 100 * 2**30
    assert parse_quantity("250m") == Fraction(1, 4)  # CPU-style milli: a quantity, never a storage size
    with pytest.raises(UnitError):
        parse_bytes("250m")  # rounds to 0 bytes: refused
    assert parse_duration("1h30m") == 5400 and parse_duration("500ms") == 0.5 and parse_duration("60") == 60


@pytest.mark.parametrize("text", ["30d", "1d12h"])
def test_days_only_where_asked_for(text: str) -> None:
    with pytest.raises(UnitError):
        parse_duration(text)
    assert parse_duration(text, days=True) % 86400 in (0, 43200)


def test_whole_numbers_only_where_asked_for() -> None:
    assert parse_duration("1.5h") == 5400
    with pytest.raises(UnitError):
        parse_duration("1.5h", fractions=False)


def test_errors_are_config_errors_and_value_errors() -> None:
    for bad in (lambda: parse_quantity("100GB"), lambda: parse_duration("soon")):
        with pytest.raises(ConfigError) as err:
            bad()
        assert isinstance(err.value, ValueError)
