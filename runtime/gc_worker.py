"""PROCESS: garbage collection of idle flows and bands, in two phases, by messages only.

Runs in its own process (``gc``), started and supervised by the coordinator. It reads the shared
memory (never writes it), decides what is idle, and removes it through the coordinator:

::

    GC                         coordinator                          every shard
    |--Retire(txn,k,slot,gen)-->| ACTIVE -> RETIRING (phase 1)        |
    |<--------Ack(ok)-----------|   (a Provision now revives it)      |
    |--Prepare(txn,...)-------->|--Prepare------------------------->| yes iff nothing queued,
    |<--PrepareSent(shards)-----|                                    | no lease, nothing pending;
    |<--------Vote (relayed)----|<--Vote----------------------------| then fence
    |--Commit (all yes)-------->| RETIRING -> FREE, or refuse        |
    |                           |  if revived --Commit------------->| forget it
    |--Abort (a no / timeout)-->| RETIRING -> ACTIVE --Abort------->| unfence
    |<--------Ack---------------|

Steps of one cycle (:meth:`GcPlanner.plan`), every ``BANDGATE_GC_INTERVAL``:
 1. Snapshot the flow table: a flow is idle when no shard holds a lease on it; it is idle since
    the latest of its creation and every shard's last-idle stamp.
 2. A flow idle for ``BANDGATE_FLOW_GC_TIMEOUT`` is a candidate.
 3. Snapshot the band table: a dynamic band, not desired, with no flow and nothing queued is
    idle; the first cycle that sees it idle stamps it (GIE's grace period), and a band idle for
    ``BANDGATE_BAND_GC_TIMEOUT`` since that stamp is a candidate. A band that reconcile no longer
    wants is a candidate as soon as it is idle.
 4. Start a :class:`Removal` for each candidate not already being removed.

Invariants: the GC holds no lock and writes nothing shared; every decision it makes is
re-validated by the coordinator against ``(slot, generation)``; a removal the GC abandons (it
died) is aborted by the coordinator, so an entity is never left fenced.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, NoReturn, final

import msgspec

from ipc import codec, shm_layout as L
from ipc.framing import FramedProtocol
from ipc.messages import (
    Abort,
    Ack,
    Commit,
    EntityKind,
    GcHello,
    Prepare,
    PrepareSent,
    Retire,
    Shutdown,
    Vote,
)
from ipc.shm import Segment
from runtime import logsetup
from runtime.config import Config
from runtime.registry import BAND_UNDESIRED
from runtime.supervision import ChildSpec, ExitCode, child_setup

__all__ = ["GcPlanner", "Removal", "main"]

log = logging.getLogger(__name__)

# Removals in flight at once: enough to keep up with heavy churn, few enough that one cycle cannot
# flood the coordinator's and shards' queues.
MAX_CONCURRENT_REMOVALS: Final = 512


@dataclass(frozen=True, slots=True)
class Candidate:
    kind: int
    slot: int
    gen: int


@final
class GcPlanner:
    """Decides what is idle from shared-memory snapshots (steps 1-3). Pure; fake-clock tested."""

    def __init__(self, flow_timeout: float, band_timeout: float) -> None:
        self.flow_timeout_ns = int(flow_timeout * 1e9)
        self.band_timeout_ns = int(band_timeout * 1e9)
        self.band_idle_since: dict[tuple[int, int], int] = {}

    def plan(
        self, words: L.WordsView, layout: L.Layout, live_shards: Sequence[int], now_ns: int
    ) -> list[Candidate]:
        out: list[Candidate] = []
        w = words
        # 1-2. flows
        lease_rows = [layout.lease_row(s) for s in live_shards]
        for slot in range(int(w[L.H_FLOW_HWM])):
            base = layout.flow(slot)
            if w[base + L.F_STATE] != L.BandState.ACTIVE:
                continue
            idle_since = w[base + L.F_CREATED_NS]
            offset = slot * L.LEASE_WORDS
            leased = False
            for row in lease_rows:
                if w[row + offset + L.L_COUNT]:
                    leased = True
                    break
                stamp = w[row + offset + L.L_IDLE_NS]
                if stamp > idle_since:
                    idle_since = stamp
            if not leased and now_ns - idle_since >= self.flow_timeout_ns:
                out.append(Candidate(EntityKind.FLOW, slot, int(w[base + L.F_GEN])))
        # 3. bands
        seen: set[tuple[int, int]] = set()
        for slot in range(int(w[L.H_BAND_HWM])):
            base = layout.band(slot)
            flags = w[base + L.B_FLAGS]
            if (
                w[base + L.B_STATE] != L.BandState.ACTIVE
                or flags & (L.BAND_STATIC | L.BAND_DESIRED)
                or w[base + L.B_FLOWS]
            ):
                continue
            busy = 0  # queued, or dispatched and not yet released
            for s in live_shards:
                stats = layout.stats_band(s, slot)
                busy += w[stats + L.SB_LEN] + w[stats + L.SB_INFLIGHT]
            if busy:
                continue
            key = (slot, int(w[base + L.B_GEN]))
            seen.add(key)
            first = self.band_idle_since.setdefault(key, now_ns)
            if flags & BAND_UNDESIRED or now_ns - first >= self.band_timeout_ns:
                out.append(Candidate(EntityKind.BAND, slot, key[1]))
        for key in list(self.band_idle_since):
            if key not in seen:
                del self.band_idle_since[
                    key
                ]  # active again (or gone): the next idle period restarts
        return out

    def forget_band(self, slot: int, gen: int) -> None:
        self.band_idle_since.pop((slot, gen), None)


# Removal states
RETIRE_SENT: Final = "retire_sent"
PREPARE_SENT: Final = "prepare_sent"
VOTING: Final = "voting"
COMMIT_SENT: Final = "commit_sent"
ABORT_SENT: Final = "abort_sent"
DONE: Final = "done"

# Results
REMOVED: Final = "removed"
SKIPPED: Final = "skipped"  # phase 1 refused: not idle any more, or already gone
ABORTED: Final = "aborted"


@final
class Removal:
    """The two-phase removal of one entity, as a pure state machine.

    Each ``on_*`` method takes an event and returns the messages to send; :attr:`result` is set
    when the removal is over. Events that do not fit the current state (late or repeated
    messages) are ignored.
    """

    def __init__(self, txn: int, cand: Candidate, vote_timeout: float) -> None:
        self.txn = txn
        self.cand = cand
        self.vote_timeout = vote_timeout
        self.state = RETIRE_SENT
        self.waiting: set[int] = set()
        self.deadline = 0.0
        self.result = ""
        self.reason = ""
        self.timer: asyncio.TimerHandle | None = None  # the vote deadline, armed by the process

    def _msg(
        self, cls: type[Retire] | type[Prepare] | type[Commit] | type[Abort]
    ) -> Retire | Prepare | Commit | Abort:
        c = self.cand
        return cls(self.txn, c.kind, c.slot, c.gen)

    def start(self) -> list[object]:
        return [self._msg(Retire)]

    def _finish(self, result: str, reason: str = "") -> list[object]:
        self.state = DONE
        self.result = result
        self.reason = reason
        return []

    def _abort(self, reason: str) -> list[object]:
        self.state = ABORT_SENT
        self.reason = reason
        return [self._msg(Abort)]

    def on_ack(self, ok: bool, reason: str) -> list[object]:
        if self.state == RETIRE_SENT:
            if not ok:
                return self._finish(SKIPPED, reason)
            self.state = PREPARE_SENT
            return [self._msg(Prepare)]
        if self.state == COMMIT_SENT:
            return self._finish(REMOVED) if ok else self._finish(ABORTED, reason)
        if self.state == ABORT_SENT:
            return self._finish(ABORTED, self.reason)
        return []

    def on_prepare_sent(
        self, ok: bool, shard_ids: Sequence[int], now: float, reason: str = ""
    ) -> list[object]:
        if self.state != PREPARE_SENT:
            return []
        if not ok:
            # The coordinator already un-retired it (a revival): nothing to abort.
            return self._finish(ABORTED, reason)
        self.waiting = set(shard_ids)
        if not self.waiting:
            self.state = COMMIT_SENT
            return [self._msg(Commit)]
        self.state = VOTING
        self.deadline = now + self.vote_timeout
        return []

    def on_vote(self, shard_id: int, yes: bool, reason: str) -> list[object]:
        if self.state != VOTING or shard_id not in self.waiting:
            return []
        if not yes:
            return self._abort(f"shard {shard_id} voted no: {reason}")
        self.waiting.discard(shard_id)
        if not self.waiting:
            self.state = COMMIT_SENT
            return [self._msg(Commit)]
        return []

    def on_tick(self, now: float) -> list[object]:
        if self.state == VOTING and now >= self.deadline:
            return self._abort(f"shards {sorted(self.waiting)} did not vote in time")
        return []


@final
class GcLink(FramedProtocol):
    def __init__(self, gc: GcProcess) -> None:
        super().__init__(16 * 1024 * 1024)
        self.gc = gc

    def frames_received(self, frames: list[bytes]) -> None:
        for data in frames:
            self.gc.on_message(codec.from_coordinator(data))

    def on_close(self, exc: Exception | None) -> None:
        self.gc.lost()


@final
class GcProcess:
    """Runs the planner every interval and drives removals over the coordinator link."""

    def __init__(
        self, spec: ChildSpec, config: Config, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.spec = spec
        self.config = config
        self.clock = clock
        self.segment = Segment.attach(spec.shm_name, readonly=True)
        self.planner = GcPlanner(config.flow_gc_timeout, config.band_gc_timeout)
        self.removals: dict[int, Removal] = {}
        self.busy: set[tuple[int, int]] = set()
        self.acks: collections.deque[int] = collections.deque()
        self.next_txn = (os.getpid() & 0xFFFF) << 32  # distinct from a predecessor's txns
        self.link: GcLink | None = None
        self.loop = asyncio.get_running_loop()
        self.done = self.loop.create_future()
        self.counts = {REMOVED: 0, ABORTED: 0, SKIPPED: 0}
        self.summary_counts = dict(self.counts)
        self.summary_at = time.monotonic()

    async def run(self) -> int:
        _, link = await self.loop.create_unix_connection(
            lambda: GcLink(self), self.spec.internal_path
        )
        self.link = link
        link.send(codec.encode(GcHello(self.spec.token, os.getpid())))
        self.loop.call_later(self.config.gc_interval, self.cycle)
        await self.done
        return int(ExitCode.OK)

    def lost(self) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def live_shards(self) -> list[int]:
        w = self.segment.words
        layout = self.segment.layout
        return [
            s
            for s in range(layout.max_shards)
            if w[layout.shard(s) + L.SH_STATE] in (L.ShardState.ACTIVE, L.ShardState.DRAINING)
        ]

    def cycle(self) -> None:
        started = time.perf_counter()
        seg = self.segment
        candidates = self.planner.plan(
            seg.words, seg.layout, self.live_shards(), time.monotonic_ns()
        )
        begun = 0
        for cand in candidates:
            if len(self.removals) >= MAX_CONCURRENT_REMOVALS:
                break
            key = (cand.kind, cand.slot)
            if key in self.busy:
                continue
            self.next_txn += 1
            removal = Removal(self.next_txn, cand, self.config.gc_prepare_timeout)
            self.removals[removal.txn] = removal
            self.busy.add(key)
            self.send(removal, removal.start())
            begun += 1
        log.debug(
            "gc cycle candidates=%d begun=%d in_flight=%d took_ms=%.2f",
            len(candidates),
            begun,
            len(self.removals),
            (time.perf_counter() - started) * 1e3,
        )
        self.log_summary()
        self.loop.call_later(self.config.gc_interval, self.cycle)

    def log_summary(self) -> None:
        """GC removals at INFO, summed over at most a second so churn cannot flood the log."""
        now = time.monotonic()
        if now - self.summary_at < 1.0:
            return
        done = {k: v - self.summary_counts[k] for k, v in self.counts.items()}
        if done[REMOVED] or done[ABORTED]:
            log.info(
                "gc removed=%d aborted=%d skipped=%d in_flight=%d over_s=%.1f",
                done[REMOVED],
                done[ABORTED],
                done[SKIPPED],
                len(self.removals),
                now - self.summary_at,
            )
        self.summary_at = now
        self.summary_counts = dict(self.counts)

    def vote_deadline(self, txn: int) -> None:
        """A removal's vote timeout (one timer per removal in VOTING; nothing polls)."""
        removal = self.removals.get(txn)
        if removal is not None:
            self.send(removal, removal.on_tick(self.clock()))

    def send(self, removal: Removal, msgs: list[object]) -> None:
        delay = self.config.gc_phase_delay
        if delay and msgs:
            # Fault injection (tests): let admissions race with this step for a while.
            self.loop.call_later(random.random() * delay, self._send, removal, msgs)
            return
        self._send(removal, msgs)

    def _send(self, removal: Removal, msgs: list[object]) -> None:
        assert self.link is not None
        for msg in msgs:
            # Retire, Commit and Abort are answered by an Ack, in order; Prepare by PrepareSent.
            if not isinstance(msg, Prepare):
                self.acks.append(removal.txn)
            self.link.send(codec.encode(msg))
        if removal.state == DONE:
            self.finished(removal)
        elif removal.state == VOTING and removal.timer is None:
            removal.timer = self.loop.call_later(
                max(0.0, removal.deadline - self.clock()), self.vote_deadline, removal.txn
            )

    def finished(self, removal: Removal) -> None:
        self.removals.pop(removal.txn, None)
        if removal.timer is not None:
            removal.timer.cancel()  # most removals end long before their vote deadline
            removal.timer = None
        cand = removal.cand
        self.busy.discard((cand.kind, cand.slot))
        self.counts[removal.result] += 1
        kind = "band" if cand.kind == EntityKind.BAND else "flow"
        if removal.result == REMOVED and cand.kind == EntityKind.BAND:
            self.planner.forget_band(cand.slot, cand.gen)
        log.debug(
            "gc %s %s slot=%d gen=%d %s", kind, removal.result, cand.slot, cand.gen, removal.reason
        )

    def on_message(self, msg: object) -> None:
        if type(msg) is Ack:
            txn = self.acks.popleft()
            removal = self.removals.get(txn)
            if removal is not None:
                self.send(removal, removal.on_ack(msg.ok, msg.reason))
        elif type(msg) is PrepareSent:
            removal = self.removals.get(msg.txn)
            if removal is not None:
                self.send(
                    removal,
                    removal.on_prepare_sent(msg.ok, msg.shard_ids, self.clock(), msg.reason),
                )
        elif type(msg) is Vote:
            removal = self.removals.get(msg.txn)
            if removal is not None:
                self.send(removal, removal.on_vote(msg.shard_id, msg.yes, msg.reason))
        elif type(msg) is Shutdown:
            self.lost()
        else:
            log.warning("unexpected message for gc: %r", msg)


def main(spec: ChildSpec) -> NoReturn:
    """Entry point of the GC process."""
    child_setup(spec)
    config = msgspec.msgpack.decode(spec.config, type=Config)
    logsetup.setup(config.log_level, "gc")
    try:
        code = asyncio.run(_run(spec, config))
    except Exception:
        log.exception("gc crashed")
        code = ExitCode.ERROR
    sys.stdout.flush()
    os._exit(code)


async def _run(spec: ChildSpec, config: Config) -> int:
    return await GcProcess(spec, config).run()
