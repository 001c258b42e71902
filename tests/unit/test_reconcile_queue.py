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
