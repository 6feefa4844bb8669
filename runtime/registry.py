"""The coordinator's band and flow tables: provisioning, retirement and the two-phase removal.

Runs inside the coordinator process, which is the only writer of the band and flow tables (in
its own memory here, mirrored into the shared-memory tables for the GC process and for stats).
Pure: no I/O; the coordinator relays the messages these methods return. Unit tests drive it
with a fake clock.

Entity lifecycle (flows and dynamic bands alike)::

    FREE --provision--> ACTIVE --Retire (GC, phase 1)--> RETIRING --Commit--> FREE (gen kept)
                          ^                                  |
                          +---- Abort (GC) / a Provision ----+   (revival)

Invariants:
- A slot's generation increases every time it is allocated, so a message about an old
  occupant (a late Prepare, Commit or Abort) never matches the new one: every method checks
  ``(slot, gen)`` and does nothing on a mismatch.
- Every message is idempotent: a repeated Commit of a FREE slot, an Abort of an ACTIVE entity,
  a Retire of a RETIRING one change nothing.
- A Provision that finds its flow or band RETIRING revives it *and* returns the Abort to send to
  every shard, which the coordinator sends on each shard's channel before the Provisioned reply:
  a shard therefore never receives a Provisioned for an entity it still fences.
- Commit succeeds only for an entity still RETIRING under the same transaction; a revival in
  between makes it fail, and the GC counts an abort. Nothing is freed that a request could use.
- A band's ``flows`` count is the number of live flow slots referring to it (GIE's "one band
  lease per flow"): a band is retired only at zero.
- Static bands are never retired; desired bands (``reconcile``) are not retired while desired.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Final, final

from ipc import shm_layout as L
from ipc.messages import Abort, EntityKind
from runtime.config import Config, band_capacity

__all__ = ["BandRec", "FlowRec", "Registry", "RegistryFull"]

log = logging.getLogger(__name__)

FREE: Final = L.BandState.FREE
ACTIVE: Final = L.BandState.ACTIVE
RETIRING: Final = L.BandState.RETIRING
STATE_NAMES: Final = {FREE: "free", ACTIVE: "active", RETIRING: "retiring"}
# A band that reconcile no longer wants: collected as soon as it is empty, without idle timeout.
BAND_UNDESIRED: Final = 4


class RegistryFull(Exception):
    """The flow or band table has no free slot."""


@dataclass(slots=True)
class BandRec:
    slot: int
    priority: int
    gen: int
    name: str
    capacity: int
    static: bool
    state: int = ACTIVE
    desired: bool = False
    undesired: bool = False
    flows: int = 0
    txn: int = 0
    created_ns: int = 0


@dataclass(slots=True)
class FlowRec:
    slot: int
    flow_id: str
    priority: int
    gen: int
    band_slot: int
    state: int = ACTIVE
    txn: int = 0
    created_ns: int = 0


@dataclass(slots=True)
class _Slots:
    """Slot allocator: lowest free slot first, so the high-water mark stays low."""

    capacity: int
    hwm: int = 0
    free: list[int] = field(default_factory=list)
    gens: list[int] = field(default_factory=list)

    def allocate(self) -> tuple[int, int]:
        if self.free:
            slot = heapq.heappop(self.free)
        elif self.hwm < self.capacity:
            slot = self.hwm
            self.hwm += 1
            self.gens.append(0)
        else:
            raise RegistryFull
        self.gens[slot] += 1
        return slot, self.gens[slot]

    def release(self, slot: int) -> None:
        heapq.heappush(self.free, slot)


@final
class Registry:
    """Bands and flows, by slot, with the shared-memory mirror kept in step."""

    def __init__(
        self,
        words: L.Words,
        layout: L.Layout,
        config: Config,
        clock_ns: Callable[[], int],
    ) -> None:
        self.words = words
        self.layout = layout
        self.config = config
        self.clock_ns = clock_ns
        self.band_slots = _Slots(layout.max_bands)
        self.flow_slots = _Slots(layout.max_flows)
        self.bands: dict[int, BandRec] = {}  # slot -> record
        self.band_by_priority: dict[int, BandRec] = {}
        self.flows: dict[int, FlowRec] = {}  # slot -> record
        self.flow_by_key: dict[tuple[str, int], FlowRec] = {}
        self.counters = {"flows_removed": 0, "bands_removed": 0, "aborts": 0, "revivals": 0}
        for spec in config.bands:
            self._new_band(spec.priority, spec.name, band_capacity(config, spec.priority), True)

    # -- shared-memory mirror ----------------------------------------------------------------------
    def _write_band(self, band: BandRec) -> None:
        w = self.words
        base = self.layout.band(band.slot)
        flags = (
            (L.BAND_STATIC if band.static else 0)
            | (L.BAND_DESIRED if band.desired else 0)
            | (BAND_UNDESIRED if band.undesired else 0)
        )
        w[base + L.B_PRIORITY] = band.priority
        w[base + L.B_GEN] = band.gen
        w[base + L.B_FLAGS] = flags
        w[base + L.B_FLOWS] = band.flows
        w[base + L.B_CAPACITY] = band.capacity
        w[base + L.B_CREATED_NS] = band.created_ns
        w[base + L.B_STATE] = band.state
        w[L.H_BAND_HWM] = self.band_slots.hwm

    def _write_flow(self, flow: FlowRec) -> None:
        w = self.words
        base = self.layout.flow(flow.slot)
        w[base + L.F_GEN] = flow.gen
        w[base + L.F_BAND] = flow.band_slot
        w[base + L.F_CREATED_NS] = flow.created_ns
        w[base + L.F_STATE] = flow.state
        w[L.H_FLOW_HWM] = self.flow_slots.hwm

    # -- provisioning ------------------------------------------------------------------------------
    def _new_band(self, priority: int, name: str, capacity: int, static: bool) -> BandRec:
        slot, gen = self.band_slots.allocate()
        band = BandRec(slot, priority, gen, name, capacity, static, created_ns=self.clock_ns())
        self.bands[slot] = band
        self.band_by_priority[priority] = band
        self._write_band(band)
        log.info(
            "band provisioned priority=%d slot=%d gen=%d static=%s", priority, slot, gen, static
        )
        return band

    def provision(self, flow_id: str, priority: int) -> tuple[FlowRec, BandRec, list[Abort]]:
        """Resolve (creating or reviving) a flow and its band.

        Returns:
            The flow, its band, and the Aborts to send to every shard *before* the reply (one
            per revived entity).

        Raises:
            RegistryFull: with a message naming the limit, when a table has no free slot.
        """
        aborts: list[Abort] = []
        band = self.band_by_priority.get(priority)
        if band is None:
            try:
                band = self._new_band(
                    priority, f"dynamic-{priority}", self.config.band_max_bytes, False
                )
            except RegistryFull:
                raise RegistryFull(
                    f"band table full: {self.layout.max_bands} bands (BANDGATE_MAX_BANDS)"
                ) from None
        elif band.state == RETIRING:
            aborts.append(self._revive_band(band))
        key = (flow_id, priority)
        flow = self.flow_by_key.get(key)
        if flow is None:
            try:
                slot, gen = self.flow_slots.allocate()
            except RegistryFull:
                raise RegistryFull(
                    f"flow table full: {self.layout.max_flows} flows (BANDGATE_MAX_FLOWS)"
                ) from None
            flow = FlowRec(slot, flow_id, priority, gen, band.slot, created_ns=self.clock_ns())
            self.flows[slot] = flow
            self.flow_by_key[key] = flow
            band.flows += 1
            self._write_band(band)
            self._write_flow(flow)
        elif flow.state == RETIRING:
            aborts.append(self._revive_flow(flow))
        return flow, band, aborts

    def _revive_band(self, band: BandRec) -> Abort:
        msg = Abort(band.txn, EntityKind.BAND, band.slot, band.gen)
        band.state = ACTIVE
        band.txn = 0
        self._write_band(band)
        self.counters["revivals"] += 1
        log.info("band revived priority=%d gen=%d", band.priority, band.gen)
        return msg

    def _revive_flow(self, flow: FlowRec) -> Abort:
        msg = Abort(flow.txn, EntityKind.FLOW, flow.slot, flow.gen)
        flow.state = ACTIVE
        flow.txn = 0
        self._write_flow(flow)
        self.counters["revivals"] += 1
        return msg

    # -- two-phase removal (coordinator side) ----------------------------------------------------
    def _entity(self, kind: int, slot: int, gen: int) -> BandRec | FlowRec | None:
        rec: BandRec | FlowRec | None = (
            self.bands.get(slot) if kind == EntityKind.BAND else self.flows.get(slot)
        )
        if rec is None or rec.gen != gen:
            return None
        return rec

    def leases(self, flow_slot: int) -> int:
        """Leases of a flow summed over every shard's lease row (shard-written words)."""
        w = self.words
        total = 0
        for s in range(self.layout.max_shards):
            total += w[self.layout.lease(s, flow_slot) + L.L_COUNT]
        return total

    def band_busy(self, band_slot: int) -> int:
        """Requests of a band queued, or dispatched and unreleased, summed over every shard."""
        w = self.words
        total = 0
        for s in range(self.layout.max_shards):
            base = self.layout.stats_band(s, band_slot)
            total += w[base + L.SB_LEN] + w[base + L.SB_INFLIGHT]
        return total

    def retire(self, txn: int, kind: int, slot: int, gen: int) -> str:
        """Phase 1 (logical delete): '' if the entity is now RETIRING under ``txn``."""
        rec = self._entity(kind, slot, gen)
        if rec is None:
            return "no such entity (already removed or re-created)"
        if rec.state == RETIRING:
            return "" if rec.txn == txn else "already retiring under another transaction"
        if isinstance(rec, BandRec):
            if rec.static:
                return "static band"
            if rec.desired:
                return "desired band"
            if rec.flows:
                return f"band still has {rec.flows} flows"
            if self.band_busy(slot):
                return "band has queued or in-flight requests"
            rec.state = RETIRING
            rec.txn = txn
            self._write_band(rec)
        else:
            if self.leases(slot):
                return "flow is leased"
            rec.state = RETIRING
            rec.txn = txn
            self._write_flow(rec)
        return ""

    def preparable(self, txn: int, kind: int, slot: int, gen: int) -> str:
        rec = self._entity(kind, slot, gen)
        if rec is None or rec.state != RETIRING or rec.txn != txn:
            return "revived or removed"
        return ""

    def commit(self, txn: int, kind: int, slot: int, gen: int) -> str:
        """Phase 2b (physical delete): '' if freed now (or already freed by this txn)."""
        rec = self._entity(kind, slot, gen)
        if rec is None:
            return "no such entity"
        if rec.state == FREE:
            return ""  # repeated Commit
        if rec.state != RETIRING or rec.txn != txn:
            return "revived"
        rec.state = FREE
        if isinstance(rec, BandRec):
            del self.band_by_priority[rec.priority]
            del self.bands[slot]
            self._write_band(rec)
            self.band_slots.release(slot)
            self.counters["bands_removed"] += 1
            log.info("band removed priority=%d slot=%d gen=%d", rec.priority, slot, gen)
        else:
            del self.flow_by_key[(rec.flow_id, rec.priority)]
            del self.flows[slot]
            self._write_flow(rec)
            self.flow_slots.release(slot)
            band = self.bands[rec.band_slot]
            band.flows -= 1
            self._write_band(band)
            self.counters["flows_removed"] += 1
            log.debug("flow removed flow=%r priority=%d slot=%d", rec.flow_id, rec.priority, slot)
        return ""

    def abort(self, txn: int, kind: int, slot: int, gen: int) -> bool:
        """Back to ACTIVE if still RETIRING under ``txn``. True if that changed anything."""
        rec = self._entity(kind, slot, gen)
        if rec is None or rec.state != RETIRING or rec.txn != txn:
            return False
        rec.state = ACTIVE
        rec.txn = 0
        if isinstance(rec, BandRec):
            self._write_band(rec)
        else:
            self._write_flow(rec)
        self.counters["aborts"] += 1
        return True

    def abort_all(self) -> list[Abort]:
        """Abort every removal in progress (the GC process died)."""
        out = []
        for band in list(self.bands.values()):
            if band.state == RETIRING:
                out.append(Abort(band.txn, EntityKind.BAND, band.slot, band.gen))
                self.abort(band.txn, EntityKind.BAND, band.slot, band.gen)
        for flow in list(self.flows.values()):
            if flow.state == RETIRING:
                out.append(Abort(flow.txn, EntityKind.FLOW, flow.slot, flow.gen))
                self.abort(flow.txn, EntityKind.FLOW, flow.slot, flow.gen)
        return out

    # -- desired bands (GIE's ReconcilePriorities) -------------------------------------------------
    def reconcile(self, priorities: Iterable[int]) -> list[Abort]:
        """Make ``priorities`` the desired set; returns Aborts for bands revived by it."""
        desired = set(priorities)
        aborts: list[Abort] = []
        for priority in sorted(desired):
            band = self.band_by_priority.get(priority)
            if band is None:
                band = self._new_band(
                    priority, f"dynamic-{priority}", self.config.band_max_bytes, False
                )
            elif band.state == RETIRING:
                aborts.append(self._revive_band(band))
        for band in self.bands.values():
            if band.static:
                continue
            want = band.priority in desired
            if band.desired != want or band.undesired == want:
                band.desired = want
                band.undesired = not want
                self._write_band(band)
        return aborts

    def band_state_name(self, band: BandRec) -> str:
        if band.state == RETIRING:
            return "retiring"
        if band.static:
            return "static"
        if band.desired:
            return "desired"
        return "dynamic"
