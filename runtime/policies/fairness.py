"""Fairness (inter-flow) policies: which flow of a priority band is served next.

Role: a port of GIE's inter-flow policies (``framework/plugins/interflow`` at #2097,
``flowcontrol/fairness`` later). Within one band the dispatch loop asks the band's fairness
policy for a flow, then dispatches the head of that flow's queue.

Process: one policy instance per band per shard worker, built by name from the ``FAIRNESS``
registry in ``runtime.policies``. It is owned by that shard's loop (single writer, no locks).
Its state is incremental, so ``pick`` costs O(log F) rather than a scan over the band's F
flows; the shard keeps it current through the calls below.

Calling protocol (the shard MUST follow it; a policy relies on nothing else):

1. ``update(flow)`` when the flow joins the band and after EVERY change to ``flow.queue``
   (add, remove, pop). The policy reads ``len(flow.queue)`` and ``flow.queue.peek_head()``.
2. ``forget(flow)`` when the flow leaves the band (it is empty or being dropped).
3. ``pick()`` to choose; then, if the head of the picked flow is dispatched, the shard pops it,
   calls ``update(flow)`` and then ``dispatched(flow)``. If saturation stops the cycle after a
   ``pick`` (head-of-line blocking), the shard calls nothing and no state changes.

Invariants (every implementation):

* ``pick`` returns None iff every tracked flow is empty, and never returns an empty flow or a
  flow forgotten since its last ``update``.
* ``pick`` is observably side-effect free: two calls with nothing in between return the same
  flow. (In GIE round-robin the cursor moved inside ``Pick``, so when head-of-line blocking
  then stopped the cycle, the chosen flow lost its turn.)
* Every choice is deterministic: ties are broken by ``flow_id``, never by dict or hash order
  (GIE's best-head policy kept the first queue in map order).
"""

from __future__ import annotations

import heapq
import itertools
from bisect import bisect_left, bisect_right
from typing import Final, Generic, Protocol, TypeVar, final

from runtime.policies.ordering import OrderingPolicy
from runtime.policies.queues import QueueItem, QueueView, SortKey

__all__ = [
    "FairnessPolicy",
    "FlowView",
    "GlobalStrict",
    "IncompatibleOrdering",
    "RoundRobin",
]


class FlowView(Protocol):
    """What a fairness policy reads from a flow: its id, its queue and its ordering."""

    @property
    def flow_id(self) -> str:
        """Unique within the band."""
        ...

    @property
    def queue(self) -> QueueView[QueueItem]:
        """The flow's queue; the policy only reads its length and head."""
        ...

    @property
    def ordering(self) -> OrderingPolicy:
        """The flow's ordering policy, whose key ranks its head."""
        ...


F = TypeVar("F", bound=FlowView)


class IncompatibleOrdering(ValueError):
    """Flows with different ordering policies were put in one ``global-strict`` band.

    Their head keys do not measure the same thing (an FCFS key starts with an enqueue time,
    an EDF key with a deadline), so no global order exists. GIE reports the same condition as
    ``ErrIncompatiblePriorityType``.
    """


class FairnessPolicy(Protocol[F]):
    """Chooses the next flow of one band to serve; see the module docstring for the protocol.

    Implementations MUST keep the module invariants, MUST cost at most O(log F) amortised per
    call, and MUST NOT modify flows or their queues.
    """

    @property
    def name(self) -> str:
        """Registry name, as written in configuration."""
        ...

    def update(self, flow: F) -> None:
        """Start tracking ``flow``, or re-read its queue after a change."""
        ...

    def forget(self, flow: F) -> None:
        """Stop tracking the flow with ``flow.flow_id``; a no-op for an unknown flow."""
        ...

    def pick(self) -> F | None:
        """The non-empty flow to serve next, or None when every tracked flow is empty."""
        ...

    def dispatched(self, flow: F) -> None:
        """Record that the head of ``flow``, as chosen by the last ``pick``, was dispatched."""
        ...


# A global-strict heap entry: (head key, flow id, head seq, push number, flow). The push number
# is unique per entry, so tuple comparison never reaches the flow object.
_HeadEntry = tuple[SortKey, str, int, int, F]

# Extra dead entries tolerated in the global-strict heap beyond twice the live ones, so that a
# small band does not rebuild its heap on almost every update.
_HEAP_SLACK: Final = 64


@final
class GlobalStrict(Generic[F]):
    """Serve the flow whose head has the smallest ordering key (GIE's "BestHead").

    The band behaves like one priority queue over all its flows' heads, so a busy flow can
    starve the others; that is the point of this policy. Ties (equal keys, which the built-in
    orderings never produce within a shard) go to the smaller ``flow_id``.

    State is a heap of head entries with lazy deletion. ``update`` pushes an entry only when a
    flow's head changes; an entry is dead when its flow was forgotten, emptied or got a new
    head, and ``pick`` discards dead entries it finds on top. When dead entries outnumber live
    ones by more than ``_HEAP_SLACK``, the heap is rebuilt from the live entries. Every flow of
    the band MUST use the same ordering (by name); otherwise ``update`` raises
    ``IncompatibleOrdering``.
    """

    __slots__ = ("_counter", "_flows", "_heap", "_live", "_ordering_counts")
    name: Final = "global-strict"

    def __init__(self) -> None:
        """Create the policy for one band with no flows."""
        # Invariant: tracked flows, i.e. updated and not forgotten since, by flow_id.
        self._flows: dict[str, F] = {}
        # Invariant: ``_live[fid]`` is the one live heap entry of a tracked flow ``fid`` and
        # records its head seq as of the last update; empty flows have no entry.
        self._live: dict[str, _HeadEntry[F]] = {}
        # Invariant: contains every entry of ``_live``; any other entry is dead.
        self._heap: list[_HeadEntry[F]] = []
        # Invariant: ordering name -> number of tracked flows using it; at most one key.
        self._ordering_counts: dict[str, int] = {}
        self._counter = itertools.count()

    def update(self, flow: F) -> None:
        """Track ``flow`` and push a heap entry if its head changed, in O(log F).

        Raises:
            IncompatibleOrdering: the band already tracks flows with a different ordering.
        """
        fid = flow.flow_id
        known = self._flows.get(fid)
        if known is not flow:
            if known is not None:
                self.forget(known)
            self._track(flow)
        head = flow.queue.peek_head()
        entry = self._live.get(fid)
        if head is None:
            if entry is not None:
                del self._live[fid]
        elif entry is None or entry[2] != head.seq:
            self._push(flow, head)

    def forget(self, flow: F) -> None:
        """Stop tracking the flow with ``flow.flow_id``; its heap entry becomes dead."""
        known = self._flows.pop(flow.flow_id, None)
        if known is None:
            return
        self._live.pop(flow.flow_id, None)
        name = known.ordering.name
        remaining = self._ordering_counts[name] - 1
        if remaining:
            self._ordering_counts[name] = remaining
        else:
            del self._ordering_counts[name]

    def pick(self) -> F | None:
        """The tracked flow with the smallest head key (ties: smaller ``flow_id``), or None.

        Dead entries found on top of the heap are dropped. A live entry whose recorded head no
        longer matches the queue (the shard changed it without ``update``) is refreshed, so
        the answer is always computed from the queues' current heads.
        """
        heap, live = self._heap, self._live
        while heap:
            entry = heap[0]
            if live.get(entry[1]) is not entry:
                heapq.heappop(heap)
                continue
            flow = entry[4]
            head = flow.queue.peek_head()
            if head is not None and head.seq == entry[2]:
                return flow
            heapq.heappop(heap)
            del live[entry[1]]
            if head is not None:
                self._push(flow, head)
        return None

    def dispatched(self, flow: F) -> None:
        """No-op: the choice depends only on the heads, which ``update`` already recorded."""
        del flow

    def _track(self, flow: F) -> None:
        """Add ``flow`` to the tracked flows after checking its ordering fits the band."""
        name = flow.ordering.name
        counts = self._ordering_counts
        if counts and name not in counts:
            raise IncompatibleOrdering(
                f"flow {flow.flow_id!r} uses ordering {name!r} but this global-strict band "
                f"already holds flows ordered by {next(iter(counts))!r}"
            )
        counts[name] = counts.get(name, 0) + 1
        self._flows[flow.flow_id] = flow

    def _push(self, flow: F, head: QueueItem) -> None:
        """Make a new entry for ``flow`` with ``head`` the live one, in O(log F)."""
        entry = (flow.ordering.key(head), flow.flow_id, head.seq, next(self._counter), flow)
        heap = self._heap
        if heap and heap[0] is self._live.get(flow.flow_id):
            # The usual dispatch path: the served flow's old entry is on top; replace it in
            # one sift instead of leaving it for ``pick`` to pop.
            heapq.heapreplace(heap, entry)
        else:
            heapq.heappush(heap, entry)
        self._live[flow.flow_id] = entry
        if len(self._heap) > 2 * len(self._live) + _HEAP_SLACK:
            self._heap = list(self._live.values())
            heapq.heapify(self._heap)


@final
class RoundRobin(Generic[F]):
    """Serve non-empty flows in turn, in ``flow_id`` order, one dispatch per flow per turn.

    Turns are counted in dispatches, not bytes. ``pick`` returns the first non-empty flow whose
    id is strictly greater than the cursor, wrapping around to the smallest; the cursor is the
    id of the flow last passed to ``dispatched``, and it moves only there. If the cursor's flow
    has gone, the turn continues from where it would have been (by bisection), so a flow that
    joins or leaves never makes another flow skip or repeat its turn. (GIE restarts from the
    first flow in that case.)
    """

    __slots__ = ("_cursor", "_flows", "_ready")
    name: Final = "round-robin"

    def __init__(self) -> None:
        """Create the policy for one band with no flows."""
        # Invariant: tracked flows, i.e. updated and not forgotten since, by flow_id.
        self._flows: dict[str, F] = {}
        # Invariant: sorted ids of the tracked flows that were non-empty at their last update.
        self._ready: list[str] = []
        # The flow_id last passed to ``dispatched``, or None before the first dispatch.
        self._cursor: str | None = None

    def update(self, flow: F) -> None:
        """Track ``flow`` and file it as ready or not by its length, in O(log F)."""
        fid = flow.flow_id
        self._flows[fid] = flow
        ready = self._ready
        i = bisect_left(ready, fid)
        present = i < len(ready) and ready[i] == fid
        if len(flow.queue):
            if not present:
                ready.insert(i, fid)
        elif present:
            del ready[i]

    def forget(self, flow: F) -> None:
        """Stop tracking the flow with ``flow.flow_id``; the cursor is left where it is."""
        fid = flow.flow_id
        if self._flows.pop(fid, None) is None:
            return
        ready = self._ready
        i = bisect_left(ready, fid)
        if i < len(ready) and ready[i] == fid:
            del ready[i]

    def pick(self) -> F | None:
        """The first non-empty flow after the cursor in ``flow_id`` order (wrapping), or None.

        A ready flow found empty (the shard emptied it without ``update``) is filed as not
        ready and skipped.
        """
        ready = self._ready
        while ready:
            i = 0 if self._cursor is None else bisect_right(ready, self._cursor)
            if i == len(ready):
                i = 0
            flow = self._flows[ready[i]]
            if len(flow.queue):
                return flow
            del ready[i]
        return None

    def dispatched(self, flow: F) -> None:
        """End ``flow``'s turn: the next ``pick`` starts strictly after it."""
        self._cursor = flow.flow_id
