"""Usage-threshold arithmetic (pure): Kubernetes quantities, usage percent, whether GC runs."""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from cluster_registry.errors import ConfigError

_SUFFIX = {
    "": 1,
    "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
}  # fmt: skip
_QUANTITY = re.compile(r"([0-9]+(?:\.[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E|)")


def parse_quantity(text: str) -> int:
    """Bytes in a Kubernetes storage quantity (``100Gi``, ``1.5Ti``, ``500M``, ``1073741824``)."""
    m = _QUANTITY.fullmatch(text.strip())
    if not m:
        raise ConfigError(f"invalid storage size {text!r}: expected a quantity such as 100Gi")
    try:
        value = Decimal(m.group(1)) * _SUFFIX[m.group(2)]
    except (InvalidOperation, KeyError) as err:  # pragma: no cover - the regex admits neither
        raise ConfigError(f"invalid storage size {text!r}") from err
    if value <= 0:
        raise ConfigError(f"invalid storage size {text!r}: must be positive")
    return int(value)


def usage_percent(used: int, size: int) -> float:
    """``used`` as a percentage of ``size`` (may exceed 100 when the volume is overcommitted)."""
    return used * 100.0 / size


@dataclass(frozen=True)
class ThresholdDecision:
    used_bytes: int
    size_bytes: int
    threshold_percent: int
    run: bool

    @property
    def percent(self) -> float:
        return usage_percent(self.used_bytes, self.size_bytes)


def decide(used: int, size: int, threshold_percent: int) -> ThresholdDecision:
    """GC runs when usage is at or above ``threshold_percent`` of ``size``; a threshold of 0 always runs.

    Integer arithmetic (``used * 100 >= threshold * size``) so a value exactly at the threshold runs.
    """
    if not 0 <= threshold_percent <= 100:
        raise ConfigError(f"invalid threshold {threshold_percent}: must be a percentage from 0 to 100")
    if size <= 0:
        raise ConfigError("invalid storage size: must be positive")
    run = threshold_percent == 0 or used * 100 >= threshold_percent * size
    return ThresholdDecision(used, size, threshold_percent, run)


_DURATION = re.compile(r"(?:([0-9]+)h)?(?:([0-9]+)m)?(?:([0-9]+)s)?")


def parse_duration(text: str) -> int:
    """Seconds in a Go-style duration (``1h``, ``90m``, ``1h30m``, ``45s``) or plain seconds."""
    text = text.strip()
    if text.isdigit():
        return int(text)
    m = _DURATION.fullmatch(text)
    if not text or not m:
        raise ConfigError(f"invalid duration {text!r}: expected e.g. 1h, 30m, 45s")
    h, mi, s = (int(g) if g else 0 for g in m.groups())
    return h * 3600 + mi * 60 + s
