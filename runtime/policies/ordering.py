"""Ordering (intra-flow) policies: which of a flow's queued items goes first.

Role: a port of GIE's intra-flow dispatch policies (``framework/plugins/intraflow`` at #2097,
``flowcontrol/ordering`` later). An ordering policy is a pure sort key plus the kind of queue
that keeps items in that order; the head of the flow's queue is the item it selects. The same
key lets the ``global-strict`` fairness policy compare heads across the flows of a band.

Process: policies are stateless singletons, built by name inside each shard worker from the
``ORDERING`` registry in ``runtime.policies``; only names cross process boundaries.

Invariants:

* ``key`` is total and deterministic: it ends in ``item.seq``, which is unique within a shard,
  so no two items of a shard ever have equal keys and ties never fall to dict or hash order.
* A smaller key means dispatched sooner.
* With ``queue_kind == "list"`` the key MUST agree with arrival order (the list queue ignores
  the key and keeps insertion order).
"""

from __future__ import annotations

from typing import Final, Protocol, final

from runtime.policies.queues import QueueItem, SortKey

__all__ = ["EDF", "FCFS", "OrderingPolicy"]


class OrderingPolicy(Protocol):
    """Orders the items of one flow.

    Implementations MUST be stateless (one instance serves every flow of a shard) and their
    ``key`` MUST be a pure function of the item's immutable fields that breaks every tie on
    ``seq``. ``queue_kind`` MUST name an entry of ``runtime.policies.QUEUES``.
    """

    @property
    def name(self) -> str:
        """Registry name, as written in configuration."""
        ...

    @property
    def queue_kind(self) -> str:
        """The ``QUEUES`` entry able to keep items in this order."""
        ...

    def key(self, item: QueueItem, /) -> SortKey:
        """Sort key of ``item``; the smaller key is dispatched first."""
        ...


@final
class FCFS:
    """First come, first served: key ``(enqueue_time, seq)``.

    Kept in a list queue, whose insertion order is the arrival order. The key is still needed:
    ``global-strict`` fairness compares the heads of different flows with it, which makes a
    band of FCFS flows behave like one FIFO.
    """

    __slots__ = ()
    name: Final = "fcfs"
    queue_kind: Final = "list"

    def key(self, item: QueueItem, /) -> SortKey:
        """Return ``(enqueue_time, seq)``."""
        return (item.enqueue_time, item.seq)

    def __repr__(self) -> str:
        """The registry name."""
        return "FCFS()"


@final
class EDF:
    """Earliest deadline first: key ``(deadline, enqueue_time, seq)``.

    An item without a TTL has ``deadline == math.inf`` and so sorts after every item that has
    one; items with equal deadlines, including two without any, fall back to FCFS order. Kept
    in a heap queue, since arrival order says nothing about deadline order.
    """

    __slots__ = ()
    name: Final = "edf"
    queue_kind: Final = "heap"

    def key(self, item: QueueItem, /) -> SortKey:
        """Return ``(deadline, enqueue_time, seq)``."""
        return (item.deadline, item.enqueue_time, item.seq)

    def __repr__(self) -> str:
        """The registry name."""
        return "EDF()"
