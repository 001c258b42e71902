"""The deduplicating delaying queue and the destination grouping (pure)."""

from __future__ import annotations

from cluster_registry.reconcile.queue import DelayQueue, Groups


def test_queue_dedupes_and_moves_due_time_earlier_only() -> None:
    q = DelayQueue()
    q.add("a", 10)
    q.add("a", 20)
    q.add("b", 5)
    assert len(q) == 2 and q.scheduled("a") == 10
    q.add("a", 1)
    assert q.scheduled("a") == 1 and q.next_due() == 1
    assert q.pop(0) is None
    assert q.pop(100) == "a"
    assert q.pop(100) == "b"
    assert q.pop(100) is None and len(q) == 0


def test_queue_never_hands_a_processing_key_twice_and_requeues_when_dirty() -> None:
    q = DelayQueue()
    q.add("a", 0)
    assert q.pop(0) == "a" and q.processing("a")
    q.add("a", 0)  # an event while a worker holds "a"
    assert q.pop(0) is None, "the same key must not go to a second worker"
    assert q.scheduled("a") == 0
    q.done("a", next_at=50)  # the worker wants it back at 50, the event wants it now
    assert q.scheduled("a") == 0 and q.pop(0) == "a"
    q.done("a", next_at=50)
    assert q.pop(49) is None and q.pop(50) == "a"
    q.done("a")
    assert len(q) == 0 and q.next_due() is None


def test_queue_forget_and_due_count() -> None:
    q = DelayQueue()
    for i, k in enumerate("abcd"):
        q.add(k, i * 10)
    q.forget("b")
    assert len(q) == 3 and q.due_count(15) == 1 and q.due_count(30) == 3
    assert [q.pop(100) for _ in range(4)] == ["a", "c", "d", None]


def test_groups_dedupe_by_destination() -> None:
    g = Groups()
    assert g.set("ns1/a", "reg/x:1") is None
    g.set("ns2/a", "reg/x:1")
    g.set("ns2/b", "reg/y:1")
    assert g.members("reg/x:1") == ["ns1/a", "ns2/a"]
    assert g.destinations() == ["reg/x:1", "reg/y:1"]
    assert g.set("ns1/a", "reg/z:1") == "reg/x:1"  # spec changed: moves group
    assert g.members("reg/x:1") == ["ns2/a"] and g.members("reg/z:1") == ["ns1/a"]
    g.set("ns2/a", None)
    assert g.members("reg/x:1") == [] and "reg/x:1" not in g.destinations()
    assert g.dest("ns2/b") == "reg/y:1" and g.keys() == ["ns1/a", "ns2/b"]


# --- the informer's list/watch/relist logic, with a scripted API ----------------------------------

import asyncio  # noqa: E402
from typing import Any, Iterator  # noqa: E402

from kubernetes.client.exceptions import ApiException  # noqa: E402

from cluster_registry.kubeio import Informer  # noqa: E402


def obj(name: str, rv: int) -> dict[str, Any]:
    return {"metadata": {"namespace": "n", "name": name, "resourceVersion": str(rv)}}


class ScriptedApi:
    def __init__(self) -> None:
        self.lists = [([obj("a", 1), obj("b", 2)], "2"), ([obj("b", 5), obj("c", 6)], "6")]
        self.watch_calls: list[str] = []
        self.informer: Informer | None = None

    def list(self, plural: str, label_selector: str | None, namespace: str | None) -> tuple[list[dict[str, Any]], str]:
        return self.lists.pop(0)

    def watch(self, plural: str, rv: str, selector: str | None, timeout: int, stopper: Any, namespace: str | None
              ) -> Iterator[tuple[str, dict[str, Any]]]:
        self.watch_calls.append(rv)
        if len(self.watch_calls) == 1:
            yield "MODIFIED", obj("a", 3)
            yield "BOOKMARK", {"metadata": {"resourceVersion": "4"}}
            return  # the server closed the watch: resume from the bookmark's version
        if len(self.watch_calls) == 2:
            raise ApiException(status=410, reason="Gone")  # too old: relist
        assert self.informer is not None
        self.informer.stop()
        yield "ADDED", obj("d", 7)


async def test_informer_resumes_from_bookmarks_relists_on_410_and_reports_vanished_objects() -> None:
    api = ScriptedApi()
    seen: list[tuple[str, str]] = []
    loop = asyncio.get_running_loop()

    def on_event(type_: str, o: dict[str, Any]) -> None:
        seen.append((type_, o["metadata"]["name"]))

    informer = Informer(api, "artifacts", loop, on_event)  # type: ignore[arg-type]
    api.informer = informer
    informer.start()
    assert informer._thread is not None
    await asyncio.to_thread(informer._thread.join, 10)
    await asyncio.sleep(0.05)  # let call_soon_threadsafe callbacks run
    assert api.watch_calls == ["2", "4", "6"]
    assert seen[:3] == [("ADDED", "a"), ("ADDED", "b"), ("MODIFIED", "a")]
    assert sorted(seen[3:]) == [("ADDED", "b"), ("ADDED", "c"), ("DELETED", "a")]  # relist: a vanished
    assert informer.synced.is_set() and sorted(informer.cache) == ["n/b", "n/c", "n/d"]
    assert ("ADDED", "d") not in seen  # nothing is delivered once stopped
