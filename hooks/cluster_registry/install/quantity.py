"""Kubernetes resource quantities (``100Gi``, ``1.5T``, ``500M``), parsed to an exact number of bytes.

Pure. Follows ``k8s.io/apimachinery/pkg/api/resource``: binary suffixes Ki..Ei, decimal suffixes
k..E (and ``m`` = 1/1000), or a decimal exponent (``1e9``).
"""

from __future__ import annotations

import re
from fractions import Fraction

_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL: dict[str, Fraction | int] = {"m": Fraction(1, 1000), "": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18}
_QUANTITY = re.compile(r"([+-]?(?:\d+\.?\d*|\.\d+))(Ki|Mi|Gi|Ti|Pi|Ei|[eE][+-]?\d+|m|k|M|G|T|P|E|)")


def parse_quantity(text: str) -> Fraction:
    """The value of ``text``; raise ValueError when it is not a Kubernetes quantity."""
    m = _QUANTITY.fullmatch(text.strip()) if isinstance(text, str) else None
    if not m:
        raise ValueError(f"{text!r} is not a Kubernetes quantity (e.g. 100Gi)")
    number, suffix = Fraction(m.group(1)), m.group(2)
    if suffix in _BINARY:
        return number * _BINARY[suffix]
    if suffix[:1] in ("e", "E") and len(suffix) > 1:
        exponent = int(suffix[1:])
        scale = Fraction(10**abs(exponent))
        return number * scale if exponent >= 0 else number / scale
    return number * _DECIMAL[suffix]


def format_bytes(value: Fraction | int) -> str:
    """A short human form: 107374182400 -> '100Gi'; exact binary multiples keep their suffix."""
    n = Fraction(value)
    for suffix, size in reversed(list(_BINARY.items())):
        if n >= size and (n / size).denominator == 1:
            return f"{int(n / size)}{suffix}"
    if n.denominator == 1:
        return str(int(n))
    return f"{float(n):g}"
