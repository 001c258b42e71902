"""A deduplicating delaying work queue and the Artifact -> destination grouping. Pure: no clock, no I/O.

The queue follows client-go's workqueue semantics: a key is queued at most once (adding it again
only moves its due time earlier), a key being processed is never handed to a second worker, and a
key added while it is processed is queued again when the worker calls :meth:`DelayQueue.done`.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field


@dataclass
class DelayQueue:
    _due: dict[str, float] = field(default_factory=dict)  # queued key -> due time
    _heap: list[tuple[float, int, str]] = field(default_factory=list)
    _processing: set[str] = field(default_factory=set)
    _dirty: dict[str, float] = field(default_factory=dict)  # added while processing -> earliest due
    _seq: int = 0

    def add(self, key: str, at: float) -> None:
        """Queue ``key`` to be due at ``at``, or earlier if it already is."""
        if key in self._processing:
            self._dirty[key] = min(at, self._dirty.get(key, at))
            return
        if key in self._due and self._due[key] <= at:
            return
        self._due[key] = at
        self._seq += 1
        heapq.heappush(self._heap, (at, self._seq, key))

    def pop(self, now: float) -> str | None:
        """The earliest due key (now marked as processing), or None when nothing is due."""
        while self._heap:
            at, _, key = self._heap[0]
            if self._due.get(key) != at:  # a stale entry: the key moved earlier or was forgotten
                heapq.heappop(self._heap)
                continue
            if at > now:
                return None
            heapq.heappop(self._heap)
            del self._due[key]
            self._processing.add(key)
            return key
        return None

    def done(self, key: str, next_at: float | None = None) -> None:
        """A worker finished ``key``; queue it again at ``next_at`` and/or when it was added meanwhile."""
        self._processing.discard(key)
        times = [t for t in (next_at, self._dirty.pop(key, None)) if t is not None]
        if times:
            self.add(key, min(times))

    def forget(self, key: str) -> None:
        """Drop ``key`` from the queue (not from processing: ``done`` still must be called)."""
        self._due.pop(key, None)
        self._dirty.pop(key, None)

    def next_due(self) -> float | None:
        while self._heap and self._due.get(self._heap[0][2]) != self._heap[0][0]:
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else None

    def scheduled(self, key: str) -> float | None:
        """When ``key`` is due (queued or re-queued after processing), or None."""
        return self._due.get(key, self._dirty.get(key))

    def processing(self, key: str) -> bool:
        return key in self._processing

    def __len__(self) -> int:
        """Queued keys (due or not), excluding those being processed."""
        return len(self._due)

    def due_count(self, now: float) -> int:
        return sum(1 for at in self._due.values() if at <= now)


@dataclass
class Groups:
    """Artifacts grouped by their destination: one copy serves every Artifact of the same source."""

    _dest: dict[str, str] = field(default_factory=dict)  # artifact key -> destination
    _members: dict[str, set[str]] = field(default_factory=dict)  # destination -> artifact keys

    def set(self, key: str, dest: str | None) -> str | None:
        """Record ``key``'s destination (None: forget the key); return its previous destination."""
        old = self._dest.pop(key, None)
        if old is not None:
            members = self._members.get(old, set())
            members.discard(key)
            if not members:
                self._members.pop(old, None)
        if dest is not None:
            self._dest[key] = dest
            self._members.setdefault(dest, set()).add(key)
        return old

    def dest(self, key: str) -> str | None:
        return self._dest.get(key)

    def members(self, dest: str) -> list[str]:
        return sorted(self._members.get(dest, ()))

    def keys(self) -> list[str]:
        return sorted(self._dest)

    def destinations(self) -> list[str]:
        return sorted(self._members)
