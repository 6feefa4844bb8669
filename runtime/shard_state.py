"""Pure state of one shard: bands -> flows -> queues, accounting, fences. No I/O.

Runs inside a shard worker process (``runtime.shard_worker``), which wires sockets, timers, the
budget and the coordinator channel to the steps here. Unit tests drive it directly.

Structure (GIE's registry shard + managed queues, one owner, no locks)::

    ShardCore
      bands: priority -> Band (slot, generation, capacity, fairness policy, flows)
      flows: (flow_id, priority) -> Flow (slot, generation, ordering policy, queue)
      pending: (flow_id, priority) -> [Request]   waiting for the coordinator to resolve the flow

Shared words written here (``words`` is the segment's int64 view, or a list in tests). This
shard's stats row and lease row only, so every word has one writer:

- lease row, per flow slot: ``L_COUNT`` = requests of the flow queued on this shard (a request
  holds its flow's lease from enqueue until it leaves the queue); ``L_IDLE_NS`` stamped when the
  count falls to 0; ``L_BYTES`` = queued bytes of the flow here.
- stats row: ``S_LEN``/``S_BYTES`` and per band slot ``SB_LEN``/``SB_BYTES`` = queued items;
  ``S_TOP_WAITING`` = the highest priority with a queued item (other shards read it to keep
  priority global).

Invariants:
- An item is in exactly one queue while ``state == QUEUED``; ``len``/``bytes`` of its flow, band
  and shard include it exactly then (enqueue adds, and the one removal path subtracts).
- A fenced flow or band (this shard voted yes to remove it) receives no new item: requests for it
  are parked in ``pending`` and re-resolved through the coordinator.
- This shard votes yes for a flow only if it holds no queued item and no pending request of it,
  and for a band only if none of its flows here holds an item and nothing is pending for it.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Final, final

from ipc import shm_layout as L
from runtime.policies import fairness as new_fairness, new_queue, ordering as get_ordering
from runtime.policies.fairness import FairnessPolicy
from runtime.policies.queues import SafeQueue

__all__ = ["Band", "Flow", "Request", "ShardCore"]

NEW: Final = 0
PENDING: Final = 1
QUEUED: Final = 2
DONE: Final = 3


@final
class Request:
    """One admission request on this shard."""

    __slots__ = (
        "byte_size",
        "conn",
        "deadline",
        "enqueue_time",
        "flow",
        "flow_id",
        "id",
        "priority",
        "seq",
        "state",
        "timer",
    )

    def __init__(
        self,
        conn: object,
        req_id: int,
        flow_id: str,
        priority: int,
        byte_size: int,
        enqueue_time: float,
        deadline: float,
        seq: int,
    ) -> None:
        self.conn = conn
        self.id = req_id
        self.flow_id = flow_id
        self.priority = priority
        self.byte_size = byte_size
        self.enqueue_time = enqueue_time
        self.deadline = deadline
        self.seq = seq
        self.state = NEW
        self.flow: Flow | None = None
        self.timer: object | None = None


@final
class Flow:
    """A flow's queue on this shard (GIE's managed queue)."""

    __slots__ = ("band", "fenced", "flow_id", "gen", "lease_base", "ordering", "queue", "slot")

    def __init__(self, flow_id: str, slot: int, gen: int, band: Band, ordering_name: str) -> None:
        self.flow_id = flow_id
        self.slot = slot
        self.gen = gen
        self.band = band
        self.ordering = get_ordering(ordering_name)
        self.queue: SafeQueue[Request] = new_queue(self.ordering)
        self.fenced = False
        self.lease_base = 0


@final
class Band:
    """A priority band on this shard."""

    __slots__ = (
        "arrivals",
        "bytes",
        "capacity",
        "fairness",
        "fenced",
        "flows",
        "gen",
        "inflight",
        "len",
        "name",
        "priority",
        "slot",
        "stats_base",
    )

    def __init__(
        self, priority: int, slot: int, gen: int, name: str, capacity: int, fairness: str
    ) -> None:
        self.priority = priority
        self.slot = slot
        self.gen = gen
        self.name = name
        self.capacity = capacity
        self.fairness: FairnessPolicy[Flow] = new_fairness(fairness)
        self.flows: dict[str, Flow] = {}
        self.len = 0
        self.bytes = 0
        self.inflight = 0  # dispatched from this band by this shard, not yet released
        self.fenced = False
        self.stats_base = 0
        # Queued items in arrival order, so the oldest wait is O(1) whatever the policies.
        self.arrivals: OrderedDict[int, Request] = OrderedDict()


def _monotonic_ns() -> int:
    return time.monotonic_ns()


@final
class ShardCore:
    """The queues of one shard and every accounting step on them."""

    def __init__(
        self,
        words: L.Words,
        layout: L.Layout,
        shard_id: int,
        fairness: str,
        ordering: str,
        clock_ns: Callable[[], int] = _monotonic_ns,
    ) -> None:
        self.words = words
        self.layout = layout
        self.shard_id = shard_id
        self.fairness_name = fairness
        self.ordering_name = ordering
        self.clock_ns = clock_ns
        self.stats_base = layout.stats_row(shard_id)
        self.lease_base = layout.lease_row(shard_id)
        self.bands: dict[int, Band] = {}
        self.bands_desc: list[Band] = []
        self.flows: dict[tuple[str, int], Flow] = {}
        self.pending: dict[tuple[str, int], list[Request]] = {}
        self.len = 0
        self.bytes = 0
        self.top_waiting = L.NO_PRIORITY

    # -- topology: bands and flows as the coordinator resolved them ------------------------------
    def install(
        self,
        flow_id: str,
        priority: int,
        flow_slot: int,
        flow_gen: int,
        band_slot: int,
        band_gen: int,
        band_name: str,
        capacity: int,
    ) -> Flow:
        """Create or refresh the band and flow the coordinator resolved (idempotent)."""
        band = self.bands.get(priority)
        if band is not None and (band.slot != band_slot or band.gen != band_gen):
            # The band was removed and re-created while this shard was not holding it. A band
            # this shard still holds items in is never committed (it votes no), so it is empty.
            self._drop_band(band)
            band = None
        if band is None:
            band = Band(priority, band_slot, band_gen, band_name, capacity, self.fairness_name)
            band.stats_base = self.layout.stats_band(self.shard_id, band_slot)
            self.bands[priority] = band
            self.bands_desc.append(band)
            self.bands_desc.sort(key=lambda b: -b.priority)
        band.capacity = capacity
        band.fenced = False
        key = (flow_id, priority)
        flow = self.flows.get(key)
        if flow is not None and (flow.slot != flow_slot or flow.gen != flow_gen):
            self._drop_flow(flow)
            flow = None
        if flow is None:
            flow = Flow(flow_id, flow_slot, flow_gen, band, self.ordering_name)
            flow.lease_base = self.layout.lease(self.shard_id, flow_slot)
            self.flows[key] = flow
            band.flows[flow_id] = flow
        flow.fenced = False
        return flow

    def resolve(self, flow_id: str, priority: int) -> Flow | None:
        """The flow to enqueue into, or None if it must be (re-)resolved by the coordinator."""
        flow = self.flows.get((flow_id, priority))
        if flow is None or flow.fenced or flow.band.fenced:
            return None
        return flow

    def park(self, req: Request) -> bool:
        """Hold a request until its flow is resolved. True if a Provision must be sent."""
        req.state = PENDING
        key = (req.flow_id, req.priority)
        waiting = self.pending.get(key)
        if waiting is None:
            self.pending[key] = [req]
            return True
        waiting.append(req)
        return False

    def take_pending(self, flow_id: str, priority: int) -> list[Request]:
        """The parked requests of a key, in arrival order (cancelled ones skipped)."""
        reqs = self.pending.pop((flow_id, priority), [])
        return [r for r in reqs if r.state == PENDING]

    def unpark(self, req: Request) -> None:
        """Forget a parked request (cancelled, expired or its connection closed)."""
        waiting = self.pending.get((req.flow_id, req.priority))
        if waiting is not None:
            try:
                waiting.remove(req)
            except ValueError:
                pass
        req.state = DONE

    # -- the queue: one add path, one removal path -------------------------------------------------
    def enqueue(self, req: Request, flow: Flow) -> None:
        """Add an admitted request; takes its flow's lease."""
        req.flow = flow
        req.state = QUEUED
        size = req.byte_size
        band = flow.band
        flow.queue.add(req)
        band.fairness.update(flow)
        w = self.words
        lb = flow.lease_base
        w[lb + L.L_COUNT] += 1
        w[lb + L.L_BYTES] += size
        band.len += 1
        band.bytes += size
        sb = band.stats_base
        w[sb + L.SB_LEN] = band.len
        w[sb + L.SB_BYTES] = band.bytes
        if not band.arrivals:
            w[sb + L.SB_OLDEST_NS] = int(req.enqueue_time * 1e9)
        band.arrivals[req.seq] = req
        self.len += 1
        self.bytes += size
        base = self.stats_base
        w[base + L.S_LEN] = self.len
        w[base + L.S_BYTES] = self.bytes
        if band.priority > self.top_waiting:
            self.top_waiting = band.priority
            w[base + L.S_TOP_WAITING] = band.priority

    def _account_removed(self, req: Request, flow: Flow) -> None:
        size = req.byte_size
        band = flow.band
        w = self.words
        lb = flow.lease_base
        count = w[lb + L.L_COUNT] - 1
        w[lb + L.L_COUNT] = count
        w[lb + L.L_BYTES] -= size
        if count == 0:
            w[lb + L.L_IDLE_NS] = self.clock_ns()
        band.len -= 1
        band.bytes -= size
        sb = band.stats_base
        w[sb + L.SB_LEN] = band.len
        w[sb + L.SB_BYTES] = band.bytes
        arrivals = band.arrivals
        if next(iter(arrivals)) == req.seq:
            del arrivals[req.seq]
            w[sb + L.SB_OLDEST_NS] = (
                int(next(iter(arrivals.values())).enqueue_time * 1e9) if arrivals else 0
            )
        else:
            del arrivals[req.seq]
        self.len -= 1
        self.bytes -= size
        base = self.stats_base
        w[base + L.S_LEN] = self.len
        w[base + L.S_BYTES] = self.bytes
        req.state = DONE

    def remove(self, req: Request) -> None:
        """Take a queued request out of its queue (cancel, TTL, withdrawal, shutdown)."""
        flow = req.flow
        assert flow is not None and req.state == QUEUED
        flow.queue.remove(req)
        flow.band.fairness.update(flow)
        self._account_removed(req, flow)
        if flow.band.len == 0:
            self.refresh_top()

    def top_band(self) -> Band | None:
        """The highest band with a queued item (head-of-line: dispatch serves it or nothing)."""
        for band in self.bands_desc:
            if band.len:
                return band
        return None

    def pop(self, band: Band) -> Request:
        """Remove and return the item the band's policies choose next; the band is non-empty."""
        flow = band.fairness.pick()
        assert flow is not None, "fairness returned no flow for a non-empty band"
        req: Request = flow.queue.pop_head()
        band.fairness.update(flow)
        band.fairness.dispatched(flow)
        self._account_removed(req, flow)
        if band.len == 0:
            self.refresh_top()
        return req

    def refresh_top(self) -> None:
        """Recompute and publish the highest waiting priority."""
        top = L.NO_PRIORITY
        for band in self.bands_desc:
            if band.len:
                top = band.priority
                break
        if top != self.top_waiting:
            self.top_waiting = top
            self.words[self.stats_base + L.S_TOP_WAITING] = top

    def dispatched(self, band: Band) -> None:
        """A request of ``band`` was dispatched: it holds the band until released."""
        band.inflight += 1
        self.words[band.stats_base + L.SB_INFLIGHT] = band.inflight

    def released(self, band: Band) -> None:
        band.inflight -= 1
        self.words[band.stats_base + L.SB_INFLIGHT] = band.inflight

    # -- two-phase removal (participant side) ------------------------------------------------------
    def flow_by_slot(self, slot: int, gen: int) -> Flow | None:
        for flow in self.flows.values():
            if flow.slot == slot and flow.gen == gen:
                return flow
        return None

    def band_by_slot(self, slot: int, gen: int) -> Band | None:
        for band in self.bands_desc:
            if band.slot == slot and band.gen == gen:
                return band
        return None

    def prepare_flow(self, slot: int, gen: int) -> str:
        """Vote on removing a flow: '' (yes, now fenced) or the reason for no."""
        flow = self.flow_by_slot(slot, gen)
        if flow is None:
            return ""  # never seen here: nothing to hold, and no cache entry to fence
        if len(flow.queue):
            return f"{len(flow.queue)} queued"
        if (flow.flow_id, flow.band.priority) in self.pending:
            return "request pending"
        flow.fenced = True
        return ""

    def prepare_band(self, slot: int, gen: int) -> str:
        band = self.band_by_slot(slot, gen)
        if band is None:
            return ""
        if band.len:
            return f"{band.len} queued"
        if band.inflight:
            return f"{band.inflight} dispatched and not released"
        for flow_id, priority in self.pending:
            if priority == band.priority:
                return f"request pending for flow {flow_id!r}"
        band.fenced = True
        return ""

    def abort(self, kind_is_band: bool, slot: int, gen: int) -> None:
        """Unfence (idempotent; unknown or newer generations are ignored)."""
        if kind_is_band:
            band = self.band_by_slot(slot, gen)
            if band is not None:
                band.fenced = False
        else:
            flow = self.flow_by_slot(slot, gen)
            if flow is not None:
                flow.fenced = False

    def commit(self, kind_is_band: bool, slot: int, gen: int) -> None:
        """Forget the entity (idempotent). Only a fenced, empty entity can be committed."""
        if kind_is_band:
            band = self.band_by_slot(slot, gen)
            if band is not None:
                self._drop_band(band)
        else:
            flow = self.flow_by_slot(slot, gen)
            if flow is not None:
                self._drop_flow(flow)

    def _drop_flow(self, flow: Flow) -> None:
        assert not len(flow.queue), "dropping a flow that holds items"
        key = (flow.flow_id, flow.band.priority)
        if self.flows.get(key) is flow:
            del self.flows[key]
        if flow.band.flows.get(flow.flow_id) is flow:
            del flow.band.flows[flow.flow_id]
        flow.band.fairness.forget(flow)
        # Leave the lease row clean for the slot's next owner.
        w = self.words
        w[flow.lease_base + L.L_COUNT] = 0
        w[flow.lease_base + L.L_BYTES] = 0

    def _drop_band(self, band: Band) -> None:
        for flow in list(band.flows.values()):
            self._drop_flow(flow)
        if self.bands.get(band.priority) is band:
            del self.bands[band.priority]
        self.bands_desc = [b for b in self.bands_desc if b is not band]
