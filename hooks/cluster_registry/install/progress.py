"""Early-loading progress: which wanted images are Ready, how many bytes, and why the rest are not.

Pure: takes the wanted images and the Artifact objects as read, returns a summary and the text
``preload`` logs and prints. No I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cluster_registry import api, reference


@dataclass(frozen=True)
class Wanted:
    source: str  # normalised
    namespace: str
    origin: str = ""  # where it was named: values, component ns/name, chart REF

    @property
    def artifact(self) -> str:
        return reference.artifact_name(self.source)


@dataclass(frozen=True)
class ImageState:
    wanted: Wanted
    phase: str  # an api.Phase value, or "Missing"
    message: str = ""
    size: int = 0

    @property
    def ready(self) -> bool:
        return self.phase == api.Phase.READY.value


@dataclass(frozen=True)
class Summary:
    states: tuple[ImageState, ...]

    @property
    def total(self) -> int:
        return len(self.states)

    @property
    def ready(self) -> int:
        return sum(s.ready for s in self.states)

    @property
    def bytes_ready(self) -> int:
        return sum(s.size for s in self.states if s.ready)

    @property
    def done(self) -> bool:
        return self.ready == self.total

    @property
    def failed(self) -> tuple[ImageState, ...]:
        return tuple(s for s in self.states if s.phase == api.Phase.FAILED.value)

    @property
    def deferred(self) -> int:
        return sum(s.phase == api.Phase.DEFERRED.value for s in self.states)

    def line(self) -> str:
        text = f"{self.ready} of {self.total} images Ready ({human(self.bytes_ready)})"
        counts: dict[str, int] = {}
        for s in self.states:
            if not s.ready:
                counts[s.phase] = counts.get(s.phase, 0) + 1
        if counts:
            text += "; " + ", ".join(f"{n} {phase}" for phase, n in sorted(counts.items()))
        if self.deferred:
            text += " (Deferred: the registry's GC write lock is held; waiting)"
        return text

    def not_ready_report(self) -> list[str]:
        return [
            f"NOT READY {s.wanted.source} (Artifact {s.wanted.namespace}/{s.wanted.artifact}"
            f"{', from ' + s.wanted.origin if s.wanted.origin else ''}): {s.phase}"
            + (f": {s.message}" if s.message else "")
            for s in self.states
            if not s.ready
        ]


def state_of(wanted: Wanted, obj: Mapping[str, Any] | None) -> ImageState:
    if obj is None:
        return ImageState(wanted, "Missing", "the Artifact does not exist")
    status = obj.get("status") or {}
    phase = status.get("phase") or api.Phase.PENDING.value
    message = ""
    for cond in status.get("conditions") or []:
        if cond.get("type") == "Ready":
            message = str(cond.get("message") or cond.get("reason") or "")
    if phase == api.Phase.PENDING.value and not message:
        message = "waiting for the artifact reconciler"
    raw_size = status.get("size")
    size = raw_size if isinstance(raw_size, int) else 0
    return ImageState(wanted, phase, message, size)


def summarize(wanted: list[Wanted], objects: Mapping[tuple[str, str], Mapping[str, Any]]) -> Summary:
    """``objects``: Artifacts by (namespace, name)."""
    return Summary(tuple(state_of(w, objects.get((w.namespace, w.artifact))) for w in wanted))


def human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"
