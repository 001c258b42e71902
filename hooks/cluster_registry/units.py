"""Quantities and durations as operators write them (pure): the package's one parser of each.

* :func:`parse_quantity`: a Kubernetes resource quantity (``k8s.io/apimachinery/pkg/api/resource``):
  binary suffixes Ki..Ei, decimal suffixes k..E (and ``m`` = 1/1000), or a decimal exponent (``1e9``).
* :func:`parse_bytes`: a storage size: a quantity that is a positive number of bytes.
* :func:`parse_duration`: a Go duration (``1h30m``, ``90s``, ``500ms``) or plain seconds; with
  ``days`` also ``d`` (certificate lifetimes such as ``30d``).

Errors are :class:`UnitError`, a ``ConfigError`` that is also a ``ValueError``.
"""

from __future__ import annotations

import re
from fractions import Fraction

from cluster_registry.errors import ConfigError

_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL: dict[str, Fraction | int] = {"m": Fraction(1, 1000), "": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18}  # fmt: skip
_NUMBER = r"(?:\d+(?:\.\d+)?|\.\d+)"
_QUANTITY = re.compile(rf"([+-]?{_NUMBER})(Ki|Mi|Gi|Ti|Pi|Ei|[eE][+-]?\d+|m|k|M|G|T|P|E|)")
_SECONDS: dict[str, Fraction | int] = {"ms": Fraction(1, 1000), "s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION_PART = re.compile(rf"({_NUMBER})(ms|s|m|h|d)")


class UnitError(ConfigError, ValueError):
    """A quantity or duration that does not parse, or is out of range."""


def parse_quantity(text: str) -> Fraction:
    """The exact value of the Kubernetes quantity ``text``."""
    m = _QUANTITY.fullmatch(text.strip()) if isinstance(text, str) else None
    if not m:
        raise UnitError(f"{text!r} is not a Kubernetes quantity (e.g. 100Gi)")
    number, suffix = Fraction(m.group(1)), m.group(2)
    if suffix in _BINARY:
        return number * _BINARY[suffix]
    if suffix[:1] in ("e", "E") and len(suffix) > 1:
        exponent = int(suffix[1:])
        scale = Fraction(10 ** abs(exponent))
        return number * scale if exponent >= 0 else number / scale
    return number * _DECIMAL[suffix]


def parse_bytes(text: str) -> int:
    """Whole bytes in the storage size ``text`` (``100Gi``, ``1.5Ti``, ``500M``), at least one."""
    value = parse_quantity(text)
    if value < 1:
        raise UnitError(f"storage size {text!r} must be at least one byte")
    return int(value)


def parse_duration(text: str, *, days: bool = False, fractions: bool = True) -> float:
    """Seconds in ``text``: plain seconds (``45``) or unit parts in any order of size (``1h30m``).

    ``days`` admits ``d``; without ``fractions`` every part must be a whole number.
    """
    text = text.strip() if isinstance(text, str) else ""
    number = _NUMBER if fractions else r"\d+"
    if re.fullmatch(number, text):
        return float(Fraction(text))
    parts = _DURATION_PART.findall(text)
    units = "d, h, m, s or ms" if days else "h, m, s or ms"
    if (
        not parts
        or "".join(n + u for n, u in parts) != text
        or (not days and any(u == "d" for _, u in parts))
        or (not fractions and any("." in n for n, _ in parts))
    ):
        raise UnitError(f"{text!r} is not a duration (e.g. 30m, 1h30m, 90s; units {units})")
    return float(sum(Fraction(n) * _SECONDS[u] for n, u in parts))
