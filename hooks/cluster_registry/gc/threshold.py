"""Usage-threshold arithmetic (pure): usage percent, whether GC runs. Sizes and durations: ``units``."""

from __future__ import annotations

from dataclasses import dataclass

from cluster_registry.errors import ConfigError

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
