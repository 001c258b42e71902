"""What the artifact and component reconcilers share: the newest-wins object cache their event
handlers fill, and their workers' wait for the next due key of a :class:`~.queue.DelayQueue`."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from cluster_registry.kubeio import Obj, key_of
from cluster_registry.reconcile.queue import DelayQueue


def resource_version(obj: Obj) -> int:
    """The object's resourceVersion as a number (0 when absent or not a number)."""
    try:
        return int((obj.get("metadata") or {}).get("resourceVersion") or 0)
    except ValueError:
        return 0


def store_newer(cache: dict[str, Obj], obj: Obj) -> None:
    """Keep ``obj`` in ``cache`` unless the cache already holds a newer version of it."""
    key = key_of(obj)
    old = cache.get(key)
    if old is None or resource_version(obj) >= resource_version(old):
        cache[key] = obj


async def next_due(queue: DelayQueue, wake: asyncio.Event, clock: Callable[[], float]) -> str:
    """Wait for the next due key of ``queue`` (now marked as processing) and return it.

    Sleeps until the earliest scheduled key is due or ``wake`` is set (something was added).
    """
    while True:
        now = clock()
        key = queue.pop(now)
        if key is not None:
            return key
        nxt = queue.next_due()
        wake.clear()
        try:
            await asyncio.wait_for(wake.wait(), None if nxt is None else max(0.01, nxt - now))
        except asyncio.TimeoutError:
            pass
