"""Per-flow queues: the containers that hold a flow's waiting requests inside one shard.

Role: a port of GIE's ``framework/plugins/queue`` package. A flow's queue stores its queued
items in the order its ordering policy wants them dispatched; the shard's dispatch loop reads
the head, and pops or removes items as they are dispatched, expire or are cancelled.

Process: these objects live inside one shard worker process and are touched only by that
shard's loop (single writer). They hold no locks and are not thread-safe; the shard's
ownership of its queues replaces Go's per-queue mutex.

Peers: ``runtime.policies.ordering`` supplies the sort key and names the queue kind it needs
(``OrderingPolicy.queue_kind``); ``runtime.policies.fairness`` reads ``len`` and
``peek_head`` to choose between flows; ``runtime.policies.new_queue`` builds a queue for an
ordering from the ``QUEUES`` registry.

Item contract: an item is any object with ``seq`` (an int, unique within the shard and
increasing in arrival order), ``enqueue_time``, ``deadline`` and ``byte_size``. Queues
identify items by ``seq`` plus object identity and never add attributes to them (items use
``__slots__``); Go's per-item handle is replaced by this lookup.

Invariants (every implementation, at every moment between calls):

* ``len(q)`` is the number of items added and not yet removed, popped or drained.
* ``q.byte_size`` is the sum of ``byte_size`` over exactly those items.
* ``q.peek_head()`` is the item ``pop_head`` would return, and is never a removed item.
* A failed ``remove`` (``ItemNotFound``) changes neither ``len`` nor ``byte_size``.

Unlike Go's ``MaxMinHeap``, whose ``Remove`` swaps in the last leaf and only sifts it down
(so an arbitrary removal can break heap order), ``HeapQueue`` removes lazily and can never
break order. Queues are unbounded; capacity is the shard's business.
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar, final

__all__ = [
    "HeapQueue",
    "ItemNotFound",
    "KeyFn",
    "ListQueue",
    "QueueItem",
    "QueueView",
    "SafeQueue",
    "SortKey",
]

SortKey = tuple[float, ...]
"""A dispatch key: the item with the smaller key is dispatched first (ints compare as floats)."""


class QueueItem(Protocol):
    """What a queue and the policies read from an item. Queues MUST NOT write to items."""

    @property
    def seq(self) -> int:
        """Unique within a shard, increasing in arrival order."""
        ...

    @property
    def enqueue_time(self) -> float:
        """Monotonic seconds at which the shard accepted the item."""
        ...

    @property
    def deadline(self) -> float:
        """Monotonic seconds at which the item expires; ``math.inf`` without a TTL."""
        ...

    @property
    def byte_size(self) -> int:
        """Bytes the item counts against capacity limits."""
        ...


T = TypeVar("T", bound=QueueItem)
T_co = TypeVar("T_co", bound=QueueItem, covariant=True)

KeyFn = Callable[[QueueItem], SortKey]
"""The sort key function an ordering policy hands to a queue."""


class ItemNotFound(LookupError):
    """The item is not in this queue (already removed, popped, drained, or never added here)."""


class QueueView(Protocol[T_co]):
    """The read-only part of a ``SafeQueue``: all a fairness policy may look at."""

    def __len__(self) -> int:
        """Number of items in the queue."""
        ...

    def peek_head(self) -> T_co | None:
        """The item that would be dispatched next, or None when the queue is empty."""
        ...


class SafeQueue(Protocol[T]):
    """A flow's queue of items, constructed as ``Queue(key)``.

    Implementations MUST keep the module invariants after every call, MUST run ``add``,
    ``pop_head`` and ``remove`` in at most O(log n) (amortised), ``peek_head`` and ``len`` in
    O(1) (amortised), and MUST NOT mutate items. A queue MUST reject (``ValueError``) an item
    whose ``seq`` it already holds rather than silently double-count it.
    """

    def add(self, item: T) -> None:
        """Insert ``item``.

        Raises:
            ValueError: an item with the same ``seq`` is already in the queue.
        """
        ...

    def remove(self, item: T) -> None:
        """Remove ``item`` from wherever it sits in the queue.

        Raises:
            ItemNotFound: ``item`` is not in this queue; the queue is left unchanged.
        """
        ...

    def peek_head(self) -> T | None:
        """The item ``pop_head`` would return, or None when the queue is empty."""
        ...

    def pop_head(self) -> T:
        """Remove and return the head item.

        Raises:
            IndexError: the queue is empty.
        """
        ...

    def drain(self) -> list[T]:
        """Remove and return every item, head first; an empty queue returns ``[]``."""
        ...

    @property
    def byte_size(self) -> int:
        """Sum of ``byte_size`` over the items in the queue."""
        ...

    def __len__(self) -> int:
        """Number of items in the queue."""
        ...

    def __bool__(self) -> bool:
        """True when the queue holds at least one item."""
        ...


@final
class ListQueue(Generic[T]):
    """FIFO queue in insertion order, for orderings whose key follows arrival (FCFS).

    An ``OrderedDict`` keyed by ``seq`` gives O(1) add, remove, peek and pop. A plain dict
    would not do: after deletions at the front, ``next(iter(d))`` walks over the holes the
    deleted entries leave, which makes a stream of pops quadratic. ``key`` is accepted for a
    uniform constructor and ignored: the shard adds items in arrival order.
    """

    __slots__ = ("_bytes", "_items")

    def __init__(self, key: Callable[[T], SortKey]) -> None:
        """Create an empty queue.

        Args:
            key: the ordering's sort key; unused, insertion order is the dispatch order.
        """
        del key
        # Invariant: ``_items[i.seq] is i`` for every queued item i, in insertion order.
        self._items: OrderedDict[int, T] = OrderedDict()
        # Invariant: ``_bytes == sum(i.byte_size for i in _items.values())``.
        self._bytes = 0

    def add(self, item: T) -> None:
        """Append ``item`` at the tail.

        Raises:
            ValueError: an item with the same ``seq`` is already in the queue.
        """
        seq = item.seq
        if seq in self._items:
            raise ValueError(f"item seq={seq} is already queued")
        self._items[seq] = item
        self._bytes += item.byte_size

    def remove(self, item: T) -> None:
        """Remove ``item`` in O(1).

        Raises:
            ItemNotFound: ``item`` is not in this queue; the queue is left unchanged.
        """
        if self._items.get(item.seq) is not item:
            raise ItemNotFound(f"item seq={item.seq} is not in this queue")
        del self._items[item.seq]
        self._bytes -= item.byte_size

    def peek_head(self) -> T | None:
        """The oldest item, or None when the queue is empty."""
        if not self._items:
            return None
        return next(iter(self._items.values()))

    def pop_head(self) -> T:
        """Remove and return the oldest item.

        Raises:
            IndexError: the queue is empty.
        """
        if not self._items:
            raise IndexError("pop_head from an empty queue")
        _, item = self._items.popitem(last=False)
        self._bytes -= item.byte_size
        return item

    def drain(self) -> list[T]:
        """Remove and return every item, oldest first."""
        items = list(self._items.values())
        self._items.clear()
        self._bytes = 0
        return items

    @property
    def byte_size(self) -> int:
        """Sum of ``byte_size`` over the items in the queue."""
        return self._bytes

    def __len__(self) -> int:
        """Number of items in the queue."""
        return len(self._items)

    def __bool__(self) -> bool:
        """True when the queue holds at least one item."""
        return bool(self._items)

    def __repr__(self) -> str:
        """Size summary; items are not listed."""
        return f"ListQueue(len={len(self._items)}, byte_size={self._bytes})"


# A heap entry: (key, seq, push number, item). The push number is unique per entry, so tuple
# comparison never reaches the item (items need not be orderable), even when the same seq is
# removed and added again and its dead entry is still in the heap.
_Entry = tuple[SortKey, int, int, T]


@final
class HeapQueue(Generic[T]):
    """Priority queue ordered by ``key`` (smallest first), for orderings such as EDF.

    A binary heap (``heapq``) with lazy deletion. ``remove`` only forgets the item's entry in
    the live map; the dead entry stays in the heap until it reaches the top (where ``peek_head``
    and ``pop_head`` discard it) or until dead entries outnumber live ones, when the heap is
    rebuilt from the live entries in O(n). ``add`` and ``pop_head`` are O(log n), ``remove`` is
    O(1) amortised, and the heap never holds more than about twice the live items. ``len`` and
    ``byte_size`` come from the live map, so they are exact at every moment.
    """

    __slots__ = ("_bytes", "_counter", "_heap", "_key", "_live")

    def __init__(self, key: Callable[[T], SortKey]) -> None:
        """Create an empty queue.

        Args:
            key: sort key; the item with the smallest key is the head.
        """
        self._key = key
        # Invariant: every live entry is in ``_heap``; any other entry in it is dead.
        self._heap: list[_Entry[T]] = []
        # Invariant: ``_live[i.seq]`` is the one live heap entry of queued item i.
        self._live: dict[int, _Entry[T]] = {}
        # Invariant: ``_bytes == sum(e[3].byte_size for e in _live.values())``.
        self._bytes = 0
        self._counter = itertools.count()

    def add(self, item: T) -> None:
        """Insert ``item`` in O(log n).

        Raises:
            ValueError: an item with the same ``seq`` is already in the queue.
        """
        seq = item.seq
        if seq in self._live:
            raise ValueError(f"item seq={seq} is already queued")
        entry = (self._key(item), seq, next(self._counter), item)
        heapq.heappush(self._heap, entry)
        self._live[seq] = entry
        self._bytes += item.byte_size

    def remove(self, item: T) -> None:
        """Remove ``item`` wherever it sits, in O(1) amortised.

        Raises:
            ItemNotFound: ``item`` is not in this queue; the queue is left unchanged.
        """
        entry = self._live.get(item.seq)
        if entry is None or entry[3] is not item:
            raise ItemNotFound(f"item seq={item.seq} is not in this queue")
        del self._live[item.seq]
        self._bytes -= item.byte_size
        if len(self._heap) > 2 * len(self._live):
            self._compact()

    def peek_head(self) -> T | None:
        """The item with the smallest key, or None when the queue is empty."""
        self._discard_dead_top()
        return self._heap[0][3] if self._heap else None

    def pop_head(self) -> T:
        """Remove and return the item with the smallest key, in O(log n).

        Raises:
            IndexError: the queue is empty.
        """
        self._discard_dead_top()
        if not self._heap:
            raise IndexError("pop_head from an empty queue")
        _, seq, _, item = heapq.heappop(self._heap)
        del self._live[seq]
        self._bytes -= item.byte_size
        return item

    def drain(self) -> list[T]:
        """Remove and return every item, smallest key first, in O(n log n)."""
        items = [entry[3] for entry in sorted(self._live.values())]
        self._heap.clear()
        self._live.clear()
        self._bytes = 0
        return items

    @property
    def byte_size(self) -> int:
        """Sum of ``byte_size`` over the items in the queue."""
        return self._bytes

    def __len__(self) -> int:
        """Number of items in the queue."""
        return len(self._live)

    def __bool__(self) -> bool:
        """True when the queue holds at least one item."""
        return bool(self._live)

    def __repr__(self) -> str:
        """Size summary; items are not listed."""
        return (
            f"HeapQueue(len={len(self._live)}, byte_size={self._bytes}, "
            f"heap_entries={len(self._heap)})"
        )

    def _discard_dead_top(self) -> None:
        """Pop dead entries off the top until the top is live or the heap is empty."""
        heap, live = self._heap, self._live
        while heap and live.get(heap[0][1]) is not heap[0]:
            heapq.heappop(heap)

    def _compact(self) -> None:
        """Rebuild the heap from the live entries only (O(n)); called when most are dead."""
        self._heap = list(self._live.values())
        heapq.heapify(self._heap)
