"""Peer (a): the same flow control in one asyncio process — the no-IPC ceiling.

What it is: a gate that lives in the caller's event loop and applies bandgate's own policy
objects (``runtime.policies``: ``fairness(name)``, ``ordering(name)``, ``new_queue``) to strict
priority bands under a concurrency limit. ``admit`` enqueues the request in its flow's queue and
runs the same dispatch cycle a shard runs (bands from highest priority down; the band's fairness
policy picks a flow, the flow's queue gives its head; stop when the budget is spent); a
dispatched request's future is resolved and it holds one unit until ``release``.

What it leaves out, on purpose: processes, sockets, framing, shared memory, the semaphore,
leases and garbage collection. It is what a team gets if every caller lives in one process, and
so the ceiling any cross-process design can approach.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import math
import time
from typing import Any, final

from runtime.policies import fairness as new_fairness, new_queue, ordering as get_ordering

__all__ = ["InprocAdmission", "InprocGate"]


@final
class _Item:
    __slots__ = ("byte_size", "deadline", "enqueue_time", "flow", "future", "seq", "timer")

    def __init__(
        self, seq: int, now: float, deadline: float, byte_size: int, flow: _Flow, fut: Any
    ) -> None:
        self.seq = seq
        self.enqueue_time = now
        self.deadline = deadline
        self.byte_size = byte_size
        self.flow = flow
        self.future = fut
        self.timer: asyncio.TimerHandle | None = None


@final
class _Flow:
    __slots__ = ("band", "flow_id", "ordering", "queue")

    def __init__(self, flow_id: str, ordering: Any, band: _Band) -> None:
        self.flow_id = flow_id
        self.ordering = ordering
        self.queue: Any = new_queue(ordering)
        self.band = band


@final
class _Band:
    __slots__ = ("flows", "len", "policy", "priority")

    def __init__(self, priority: int, fairness: str) -> None:
        self.priority = priority
        self.policy: Any = new_fairness(fairness)
        self.flows: dict[str, _Flow] = {}
        self.len = 0


@final
class InprocAdmission:
    __slots__ = ("_gate", "_released", "outcome", "queued_seconds")

    def __init__(self, gate: InprocGate, outcome: str, queued: float) -> None:
        self._gate = gate
        self.outcome = outcome
        self.queued_seconds = queued
        self._released = outcome != "dispatched"

    @property
    def dispatched(self) -> bool:
        return self.outcome == "dispatched"

    async def release(self) -> None:
        if not self._released:
            self._released = True
            self._gate._release()


@final
class InprocGate:
    """Strict priority bands, fair flows, a concurrency limit; one event loop, no IPC.

    Args:
        limit: units of concurrency; 0 means no limit.
        fairness: a ``runtime.policies.FAIRNESS`` name.
        ordering: a ``runtime.policies.ORDERING`` name.
    """

    def __init__(self, limit: int, fairness: str = "global-strict", ordering: str = "fcfs") -> None:
        self.limit = limit
        self.fairness = fairness
        self.ordering = get_ordering(ordering)
        self.inflight = 0
        self.queued = 0
        self._bands: dict[int, _Band] = {}
        self._order: list[_Band] = []  # highest priority first
        self._neg_keys: list[int] = []  # -priority, sorted, parallel to _order
        self._seq = itertools.count()
        self.dispatched_total = 0

    # -- public --------------------------------------------------------------------------------
    async def admit(
        self, flow_id: str, priority: int = 0, *, byte_size: int = 0, ttl: float | None = None
    ) -> InprocAdmission:
        loop = asyncio.get_running_loop()
        band = self._bands.get(priority)
        if band is None:
            band = self._new_band(priority)
        flow = band.flows.get(flow_id)
        if flow is None:
            flow = band.flows[flow_id] = _Flow(flow_id, self.ordering, band)
        now = time.monotonic()
        fut = loop.create_future()
        item = _Item(next(self._seq), now, now + ttl if ttl else math.inf, byte_size, flow, fut)
        flow.queue.add(item)
        band.len += 1
        self.queued += 1
        band.policy.update(flow)
        if ttl:
            item.timer = loop.call_at(loop.time() + ttl, self._expire, item)
        self._dispatch()
        try:
            outcome = await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled() and fut.result() == "dispatched":
                self._release()  # dispatched, but the caller is gone: give the unit back
            else:
                self._withdraw(item, "evicted_cancelled")
            raise
        return InprocAdmission(self, outcome, time.monotonic() - now)

    def stats(self) -> dict[str, int]:
        return {"inflight": self.inflight, "len": self.queued, "bands": len(self._bands)}

    # -- the dispatch cycle ----------------------------------------------------------------------
    def _dispatch(self) -> None:
        limit = self.limit
        while self.queued and (limit == 0 or self.inflight < limit):
            for band in self._order:
                if band.len:
                    flow = band.policy.pick()
                    if flow is not None:
                        break
            else:  # pragma: no cover - queued > 0 implies a non-empty band
                return
            item = flow.queue.pop_head()
            band.len -= 1
            self.queued -= 1
            band.policy.update(flow)
            band.policy.dispatched(flow)
            if item.timer is not None:
                item.timer.cancel()
            if item.future.done():  # cancelled while queued; its waiter is on its way out
                continue
            self.inflight += 1
            self.dispatched_total += 1
            item.future.set_result("dispatched")

    def _release(self) -> None:
        self.inflight -= 1
        self._dispatch()

    def _withdraw(self, item: _Item, outcome: str) -> None:
        flow = item.flow
        try:
            flow.queue.remove(item)
        except LookupError:
            return  # already dispatched
        flow.band.len -= 1
        self.queued -= 1
        flow.band.policy.update(flow)
        if item.timer is not None:
            item.timer.cancel()
        if not item.future.done():
            item.future.set_result(outcome)

    def _expire(self, item: _Item) -> None:
        item.timer = None
        self._withdraw(item, "evicted_ttl")

    def _new_band(self, priority: int) -> _Band:
        band = self._bands[priority] = _Band(priority, self.fairness)
        i = bisect.bisect_left(self._neg_keys, -priority)
        self._neg_keys.insert(i, -priority)
        self._order.insert(i, band)
        return band
