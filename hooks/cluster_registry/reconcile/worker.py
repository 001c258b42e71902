"""What the artifact and component reconcilers share: the newest-wins object cache their event
handlers fill, their workers' wait for the next due key of a :class:`~.queue.DelayQueue`, and
progress reports made only for work that lasts."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from cluster_registry.kubeio import Obj, key_of
from cluster_registry.reconcile.queue import DelayQueue

log = logging.getLogger(__name__)


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


@contextlib.asynccontextmanager
async def reported_after(delay: float, report: Callable[[], Awaitable[None]]) -> AsyncIterator[None]:
    """Run ``report`` once the body has been running for ``delay`` seconds (before it, when 0).

    A progress write (an Artifact's Copying status and Event) says nothing a client needs when the
    result follows within a second, and costs the API server two writes per object: a body that ends
    first never reports. A report under way when the body ends is finished first, so it never lands
    after the result. A deferred report's failure is logged, not raised: the body's result counts.
    """
    if delay <= 0:
        await report()
        yield
        return
    begun = asyncio.Event()

    async def later() -> None:
        await asyncio.sleep(delay)
        begun.set()
        try:
            await report()
        except Exception:  # noqa: BLE001 - a progress report is never worth the result
            log.warning("a progress report failed", exc_info=True)

    task = asyncio.ensure_future(later())
    try:
        yield
    finally:
        if not begun.is_set():
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)
