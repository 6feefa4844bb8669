"""PROCESS: one shard worker — client connections, band queues, the dispatch loop.

Runs in its own process (``shard-<id>``), started by the coordinator. Peers:

- clients, on ``<socket_dir>/shard-<id>.sock``: ``Submit`` / ``Cancel`` / ``Release`` in,
  ``Decided`` out (:mod:`ipc.messages`);
- the coordinator, on its internal socket: ``Provision`` out / ``Provisioned`` in (just-in-time
  flows and bands), the two-phase removal (``Prepare`` -> ``Vote``, ``Commit``, ``Abort``),
  ``SetDraining`` / ``ShardDrained``, ``Shutdown``;
- other shards, through shared memory (their stats rows) and one-byte wake datagrams on
  ``<socket_dir>/wake-<id>.sock``.

The loop is event driven: a dispatch cycle runs after a batch of arrivals, a release, a wake or
an expiry, and dispatches as many items as the budget allows (GIE dispatches one per cycle and
polls every millisecond). Deadlines are asyncio timers; nothing polls.

Invariants enforced here:
- Exactly one ``Decided`` per ``Submit`` (``_finish`` is the only sender and removes the request
  from its connection first), except for a connection that closed: its requests are withdrawn.
- A unit taken from the budget is recorded in this shard's ``S_HELD`` word right after
  ``try_acquire`` and removed right before ``release``; the coordinator returns ``S_HELD`` units
  of a dead shard.
- Priority is global: before taking budget for band *p*, the shard checks every other shard's
  ``S_TOP_WAITING``; if one waits in a higher band it does not dispatch (head-of-line), and that
  shard wakes it when its own top waiting band falls. At equal priority the shard whose oldest
  item is older (by more than ``AGE_SLACK_NS``) goes first, so no shard starves another.
- Liveness: a unit is never handed to a shard that is not woken. A shard that backs off wakes
  the shard it backs off for; a release wakes the entitled shard (or dispatches locally); a shard
  whose top waiting band falls wakes every waiting shard.
- Capacity is global: an item is admitted only if the queued bytes of its band (and of the
  daemon) summed over every shard's stats row stay within the limit. Shards check concurrently,
  each against the others' published sums, so the overshoot is at most one request per other
  shard (each publishes its enqueue before handling the next message).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import signal
import socket
import sys
import time
from bisect import bisect_left
from typing import NoReturn, final

import msgspec

from ipc import codec, shm_layout as L
from ipc.budget import Budget
from ipc.framing import FramedProtocol
from ipc.messages import (
    PROTOCOL_VERSION,
    Abort,
    Cancel,
    Commit,
    Decided,
    EntityKind,
    ErrorReply,
    OutcomeCode,
    Prepare,
    Provision,
    Provisioned,
    Release,
    SetDraining,
    ShardDrained,
    ShardHello,
    Shutdown,
    Submit,
    TopologyChanged,
    Vote,
)
from ipc.shm import Segment
from runtime import logsetup
from runtime.config import Config, socket_gid
from runtime.shard_state import PENDING, QUEUED, Band, Flow, Request, ShardCore
from runtime.supervision import ChildSpec, ExitCode, child_setup
from runtime.validation import check_submit

__all__ = ["main", "shard_socket_path", "wake_socket_path"]

log = logging.getLogger(__name__)

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
# At equal priority a shard leaves the next unit to another shard whose oldest waiting item is
# older than its own by more than this: global arrival order within a millisecond, without a
# cross-process wake-up for every dispatch when both shards' heads are about as old.
AGE_SLACK_NS = 1_000_000


def shard_socket_path(socket_dir: str, shard_id: int) -> str:
    return os.path.join(socket_dir, f"shard-{shard_id}.sock")


def wake_socket_path(socket_dir: str, shard_id: int) -> str:
    return os.path.join(socket_dir, f"wake-{shard_id}.sock")


@final
class ClientConn(FramedProtocol):
    """One client connection: its live requests and its dispatched, unreleased ids."""

    def __init__(self, worker: ShardWorker) -> None:
        super().__init__(worker.config.max_frame)
        self.worker = worker
        self.requests: dict[int, Request] = {}
        self.dispatched: dict[int, Band] = {}  # request id -> its band, until released

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.worker.conns.add(self)

    def frames_received(self, frames: list[bytes]) -> None:
        worker = self.worker
        decode = codec.client_to_shard
        for data in frames:
            try:
                msg = decode(data)
            except codec.DecodeError as exc:
                self.fail("bad_message", f"undecodable message: {exc}")
                return
            if type(msg) is Submit:
                problem = check_submit(msg)
                if problem:
                    self.fail("bad_submit", problem)
                    return
                if msg.id in self.requests or msg.id in self.dispatched:
                    self.fail("duplicate_id", f"request id {msg.id} is already in use")
                    return
                worker.on_submit(self, msg)
            elif type(msg) is Release:
                band = self.dispatched.pop(msg.id, None)
                if band is not None:
                    worker.return_unit(band)
            else:
                assert type(msg) is Cancel
                req = self.requests.get(msg.id)
                if req is not None:
                    worker.cancel(req, OutcomeCode.EVICTED_CANCELLED, "cancelled by the client")
        worker.after_batch()

    def fail(self, code: str, reason: str) -> None:
        """Answer a protocol violation with an error frame and drop this connection only."""
        log.warning("closing client connection: %s: %s", code, reason)
        self.send(codec.encode(ErrorReply(code, reason)))
        self.close()

    def protocol_failed(self, exc: Exception) -> None:
        self.fail("bad_frame", str(exc))

    def truncated(self, size: int) -> None:
        log.warning(
            "closing client connection: truncated_frame: %d bytes of an unfinished frame", size
        )

    def on_close(self, exc: Exception | None) -> None:
        self.worker.conn_closed(self)


@final
class CoordinatorLink(FramedProtocol):
    """The shard's connection to the coordinator's internal socket."""

    def __init__(self, worker: ShardWorker) -> None:
        super().__init__(16 * 1024 * 1024)
        self.worker = worker

    def frames_received(self, frames: list[bytes]) -> None:
        for data in frames:
            self.worker.on_coordinator(codec.from_coordinator(data))
        self.worker.after_batch()

    def on_close(self, exc: Exception | None) -> None:
        self.worker.coordinator_lost()


@final
class ShardWorker:
    """Wires sockets, timers, the budget and the coordinator link to :class:`ShardCore`."""

    def __init__(self, spec: ChildSpec, config: Config) -> None:
        self.spec = spec
        self.config = config
        self.shard_id = spec.shard_id
        self.loop = asyncio.get_running_loop()
        self.segment = Segment.attach(spec.shm_name)
        self.layout = self.segment.layout
        self.words = self.segment.words
        self.budget = Budget.attach(spec.budget_name, config.max_inflight)
        self.limited = not self.budget.unlimited
        self.core = ShardCore(
            self.words, self.layout, self.shard_id, config.fairness, config.ordering
        )
        self.stats_base = self.layout.stats_row(self.shard_id)
        self.conns: set[ClientConn] = set()
        self.link: CoordinatorLink | None = None
        self.server: asyncio.AbstractServer | None = None
        self.seq = 0
        self.next_provision = 0
        self.dispatch_scheduled = False
        self.draining = False
        self.drained_sent = False
        self.stopping = False
        self.done = self.loop.create_future()
        self.exit_code = ExitCode.OK
        self.epoch = -1
        self.others: list[tuple[int, str]] = []
        self.last_top = L.NO_PRIORITY
        self.default_ttl = config.default_ttl
        self.wake_path = wake_socket_path(config.socket_dir, self.shard_id)
        self.wake_sock: socket.socket | None = None
        self.bound: dict[str, tuple[int, int]] = {}  # socket path -> (dev, inode) we created
        self.poke_sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.poke_sock.setblocking(False)

    # -- start and stop ----------------------------------------------------------------------------
    async def run(self) -> int:
        # Our rows are ours from now on: start them clean (the coordinator zeroed a dead
        # predecessor's rows already; this also covers a first start on a reused segment).
        self.segment.zero(self.stats_base, self.layout.stats_row_words)
        self.segment.zero(self.layout.lease_row(self.shard_id), self.layout.lease_row_words)
        self.words[self.stats_base + L.S_TOP_WAITING] = L.NO_PRIORITY
        self.words[self.stats_base + L.S_PID] = os.getpid()

        self._bind_wake()
        # The coordinator link first: a client may connect the moment the socket exists (a
        # restarted shard keeps its path), and its first request may need a Provision.
        _, link = await self.loop.create_unix_connection(
            lambda: CoordinatorLink(self), self.spec.internal_path
        )
        self.link = link
        path = shard_socket_path(self.config.socket_dir, self.shard_id)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self.server = await self.loop.create_unix_server(lambda: ClientConn(self), path)
        self.own_path(path)
        link.send(codec.encode(ShardHello(self.spec.token, self.shard_id, os.getpid())))
        self.loop.add_signal_handler(signal.SIGTERM, self.stop, "shutting down")
        self.refresh_others()
        log.info(
            "shard ready shard=%d pid=%d protocol=%d", self.shard_id, os.getpid(), PROTOCOL_VERSION
        )
        await self.done
        return int(self.exit_code)

    def _bind_wake(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.wake_path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(self.wake_path)
        self.own_path(self.wake_path)
        sock.setblocking(False)
        self.wake_sock = sock
        self.loop.add_reader(sock.fileno(), self.on_wake)

    def own_path(self, path: str) -> None:
        """Set a socket file's mode and group, and remember which file is ours."""
        gid = socket_gid(self.config)
        os.chmod(path, 0o660 if gid >= 0 else 0o600)
        if gid >= 0:
            os.chown(path, -1, gid)
        st = os.stat(path)
        self.bound[path] = (st.st_dev, st.st_ino)

    def stop(self, reason: str) -> None:
        """Graceful stop: refuse new work, evict everything waiting, flush, exit."""
        if self.stopping:
            return
        self.stopping = True
        log.info("shard stopping shard=%d reason=%s", self.shard_id, reason)
        if self.server is not None:
            self.server.close()
        for conn in list(self.conns):
            for req in list(conn.requests.values()):
                self.cancel(req, OutcomeCode.EVICTED_OTHER, reason)
        for conn in list(self.conns):
            conn.close()
        self.loop.call_soon(self._finish_stop)

    def _finish_stop(self) -> None:
        for path, ident in self.bound.items():
            # Only our own file: a daemon started since (after a crash of ours) may have bound
            # the same path, and its socket must survive our late exit.
            with contextlib.suppress(FileNotFoundError):
                st = os.stat(path)
                if (st.st_dev, st.st_ino) == ident:
                    os.unlink(path)
        if self.link is not None:
            self.link.close()
        if not self.done.done():
            self.done.set_result(None)

    def coordinator_lost(self) -> None:
        if not self.stopping:
            log.error("coordinator connection lost; stopping shard=%d", self.shard_id)
            self.exit_code = ExitCode.ERROR
            self.stop("coordinator lost")

    # -- admission --------------------------------------------------------------------------------
    def on_submit(self, conn: ClientConn, msg: Submit) -> None:
        if self.draining or self.stopping:
            reason = "shard draining" if self.draining else "shard stopping"
            conn.send(codec.encode(Decided(msg.id, OutcomeCode.RETRY, reason, 0.0)))
            return
        now = time.monotonic()
        ttl = msg.ttl or self.default_ttl
        deadline = now + ttl if ttl > 0 else math.inf
        self.seq += 1
        req = Request(
            conn, msg.id, msg.flow_id, msg.priority, msg.byte_size, now, deadline, self.seq
        )
        conn.requests[msg.id] = req
        if ttl > 0:
            req.timer = self.loop.call_at(deadline, self.expire, req, ttl)
        flow = self.core.resolve(msg.flow_id, msg.priority)
        if flow is None:
            if self.core.park(req):
                self.provision(msg.flow_id, msg.priority)
        else:
            self.admit(req, flow)

    def provision(self, flow_id: str, priority: int) -> None:
        self.next_provision += 1
        assert self.link is not None
        self.link.send(codec.encode(Provision(self.next_provision, flow_id, priority)))

    def admit(self, req: Request, flow: Flow) -> None:
        problem = self.capacity_problem(flow.band.slot, flow.band.capacity, flow.band.bytes, req)
        if problem:
            self._finish(req, OutcomeCode.REJECTED_CAPACITY, problem)
            return
        self.core.enqueue(req, flow)
        self.schedule_dispatch()

    def capacity_problem(self, band_slot: int, capacity: int, band_bytes: int, req: Request) -> str:
        """'' if queuing ``req`` keeps its band and the daemon within their limits."""
        w = self.words
        if w[L.H_EPOCH] != self.epoch:
            self.refresh_others()
        size = req.byte_size
        total = band_bytes + size
        offset = L.STATS_HEADER_WORDS + band_slot * L.STATS_BAND_WORDS + L.SB_BYTES
        for row, _ in self.others:
            total += w[row + offset]
        if total > capacity:
            return (
                f"band {req.priority} would queue {total} bytes, over its limit of {capacity}"
                " (BANDGATE_BAND_MAX_BYTES)"
            )
        max_bytes = self.config.max_bytes
        if max_bytes:
            total = self.core.bytes + size
            for row, _ in self.others:
                total += w[row + L.S_BYTES]
            if total > max_bytes:
                return f"daemon would queue {total} bytes, over BANDGATE_MAX_BYTES={max_bytes}"
        return ""

    def expire(self, req: Request, ttl: float) -> None:
        req.timer = None
        self.cancel(req, OutcomeCode.EVICTED_TTL, f"waited longer than its ttl of {ttl:g}s")
        self.after_batch()

    def cancel(self, req: Request, outcome: int, reason: str) -> None:
        """Take a waiting request out (queued or parked) and give it ``outcome``."""
        if req.state == QUEUED:
            self.core.remove(req)
        elif req.state == PENDING:
            self.core.unpark(req)
        else:
            return
        self._finish(req, outcome, reason)

    def _finish(self, req: Request, outcome: int, reason: str) -> None:
        """Send the one outcome of a request. The only place that answers a Submit."""
        if req.timer is not None:
            req.timer.cancel()  # type: ignore[attr-defined]
            req.timer = None
        conn: ClientConn = req.conn  # type: ignore[assignment]
        del conn.requests[req.id]
        w = self.words
        base = self.stats_base
        queued = time.monotonic() - req.enqueue_time
        hist = base + L.S_QUEUE_HIST + (outcome - 1) * L.QD_BLOCK
        w[hist + bisect_left(L.QUEUE_BUCKETS, queued)] += 1
        w[hist + L.QD_BLOCK - 1] += int(queued * 1e9)
        if outcome == OutcomeCode.DISPATCHED:
            band = req.flow.band  # type: ignore[union-attr]  # a dispatched request was queued
            conn.dispatched[req.id] = band
            self.core.dispatched(band)
            w[base + L.S_INFLIGHT] += 1
            w[base + L.S_DISPATCHED] += 1
            w[band.stats_base + L.SB_DISPATCHED] += 1
        elif outcome in (OutcomeCode.REJECTED_CAPACITY, OutcomeCode.REJECTED_OTHER):
            w[base + L.S_REJECTED] += 1
        else:
            w[base + L.S_EVICTED] += 1
        slot = req.flow.slot if req.flow is not None else -1
        conn.send(
            codec.encode(
                Decided(req.id, outcome, reason, time.monotonic() - req.enqueue_time, slot)
            )
        )

    # -- dispatch --------------------------------------------------------------------------------
    def schedule_dispatch(self) -> None:
        if not self.dispatch_scheduled:
            self.dispatch_scheduled = True
            self.loop.call_soon(self.dispatch_cycle)

    def dispatch_cycle(self) -> None:
        """Dispatch while the budget allows, highest band first, head-of-line when saturated."""
        self.dispatch_scheduled = False
        started = time.perf_counter()
        core = self.core
        budget = self.budget
        w = self.words
        held = self.stats_base + L.S_HELD
        limited = self.limited
        external = bool(w[L.H_SAT_MODE])
        while True:
            band = core.top_band()
            if band is None:
                break
            if limited or external:
                other = self.entitled_elsewhere(band)
                if other:
                    self.wake(other)  # it goes first; its dispatch will wake us if we are next
                    break
                if external and self.externally_saturated():
                    break
                if limited:
                    if not budget.try_acquire():
                        break
                    w[held] += 1
            req = core.pop(band)
            self._finish(req, OutcomeCode.DISPATCHED, "")
        took = time.perf_counter() - started
        hist = self.stats_base + L.S_CYCLE_HIST
        w[hist + bisect_left(L.CYCLE_BUCKETS, took)] += 1
        w[hist + L.CYCLE_BLOCK - 1] += int(took * 1e9)
        self.after_batch()

    def externally_saturated(self) -> bool:
        """The external saturation credit is used up or stale (fails closed).

        Shards check concurrently, so the credit can be overrun by at most one dispatch per other
        shard. The coordinator wakes every shard when a new report grants credit.
        """
        w = self.words
        if time.monotonic_ns() >= w[L.H_SAT_EXPIRES_NS]:
            return True
        disp = L.S_DISPATCHED
        total = w[L.H_DISPATCHED_BASE] + w[self.stats_base + disp]
        for row, _ in self.others:
            total += w[row + disp]
        return total >= w[L.H_SAT_LIMIT]

    def entitled_elsewhere(self, band: Band) -> str:
        """The wake path of a shard that should get the next unit before ``band``'s head, or ''.

        Priority first: a shard waiting in a higher band always goes first (no inversion).
        Then age, at equal priority: a shard whose oldest item in this band arrived more than
        :data:`AGE_SLACK_NS` before ours goes first, so the same band on different shards is
        served in arrival order (within the slack) and neither shard can starve the other by
        recycling the units its own clients release.
        """
        w = self.words
        if w[L.H_EPOCH] != self.epoch:
            self.refresh_others()
        priority = band.priority
        mine = w[band.stats_base + L.SB_OLDEST_NS] - AGE_SLACK_NS
        oldest = L.STATS_HEADER_WORDS + band.slot * L.STATS_BAND_WORDS + L.SB_OLDEST_NS
        best = ""
        best_key: tuple[int, int] | None = None
        for row, path in self.others:
            top = w[row + L.S_TOP_WAITING]
            if top < priority:
                continue
            if top > priority:
                key = (top, 1 << 62)
            else:
                theirs = w[row + oldest]
                if not theirs or theirs >= mine:
                    continue
                key = (top, -theirs)
            if best_key is None or key > best_key:
                best, best_key = path, key
        return best

    def most_entitled_elsewhere(self) -> str:
        """The wake path of the other shard waiting in the highest band ('' if none waits)."""
        w = self.words
        if w[L.H_EPOCH] != self.epoch:
            self.refresh_others()
        best = ""
        best_top = L.NO_PRIORITY
        for row, path in self.others:
            top = w[row + L.S_TOP_WAITING]
            if top > best_top:
                best, best_top = path, top
        return best

    def refresh_others(self) -> None:
        """Re-read which other shards exist (after the coordinator bumps the epoch)."""
        w = self.words
        self.epoch = int(w[L.H_EPOCH])
        others = []
        for s in range(self.layout.max_shards):
            if s == self.shard_id:
                continue
            state = w[self.layout.shard(s) + L.SH_STATE]
            if state in (L.ShardState.ACTIVE, L.ShardState.DRAINING):
                others.append(
                    (self.layout.stats_row(s), wake_socket_path(self.config.socket_dir, s))
                )
        self.others = others

    def return_unit(self, band: Band) -> None:
        """A dispatched request of ``band`` was released (or its client vanished)."""
        self.core.released(band)
        w = self.words
        base = self.stats_base
        w[base + L.S_INFLIGHT] -= 1
        if self.limited:
            w[base + L.S_HELD] -= 1
            self.budget.release()
            # Hand the unit to whoever is entitled to it: ourselves (no wake-up needed), or the
            # one shard that waits higher or longer. Waking every waiting shard on every release
            # would double the CPU per dispatch on two shards.
            top_band = self.core.top_band()
            other = (
                self.entitled_elsewhere(top_band)
                if top_band is not None
                else self.most_entitled_elsewhere()
            )
            if other:
                self.wake(other)
            elif top_band is not None:
                self.schedule_dispatch()

    def poke(self, at_least: int) -> None:
        """Wake every other shard waiting in a band >= ``at_least``: a unit may be free for it."""
        if self.words[L.H_EPOCH] != self.epoch:
            self.refresh_others()
        w = self.words
        top = L.S_TOP_WAITING
        for row, path in self.others:
            waiting = w[row + top]
            if waiting != L.NO_PRIORITY and waiting >= at_least:
                self.wake(path)

    def wake(self, path: str) -> None:
        """Send one wake datagram to another shard."""
        # A full buffer means a wake is already pending; a missing peer has nothing to wake.
        with contextlib.suppress(OSError):
            self.poke_sock.sendto(b"\0", path)

    def on_wake(self) -> None:
        sock = self.wake_sock
        assert sock is not None
        while True:
            try:
                sock.recv(64)
            except BlockingIOError:
                break
        if self.core.top_waiting != L.NO_PRIORITY:
            self.schedule_dispatch()

    def after_batch(self) -> None:
        """After any change: wake shards we held back, and report a finished drain."""
        top = self.core.top_waiting
        if top < self.last_top and (self.limited or self.words[L.H_SAT_MODE]):
            # We no longer wait as high as before: shards held back by our old top may go.
            self.poke(at_least=L.NO_PRIORITY + 1)
        self.last_top = top
        if self.draining and not self.drained_sent and self.is_empty():
            self.drained_sent = True
            assert self.link is not None
            self.link.send(codec.encode(ShardDrained(self.shard_id)))
            log.info("shard drained shard=%d", self.shard_id)

    def is_empty(self) -> bool:
        return (
            self.core.len == 0
            and not self.core.pending
            and self.words[self.stats_base + L.S_INFLIGHT] == 0
        )

    def conn_closed(self, conn: ClientConn) -> None:
        """A client went away: withdraw its waiting requests, return its units."""
        self.conns.discard(conn)
        for req in list(conn.requests.values()):
            if req.state == QUEUED:
                self.core.remove(req)
            elif req.state == PENDING:
                self.core.unpark(req)
            if req.timer is not None:
                req.timer.cancel()  # type: ignore[attr-defined]
                req.timer = None
        conn.requests.clear()
        for band in conn.dispatched.values():
            self.return_unit(band)
        conn.dispatched.clear()
        self.after_batch()

    # -- coordinator messages ----------------------------------------------------------------------
    def on_coordinator(self, msg: object) -> None:
        core = self.core
        if type(msg) is Provisioned:
            reqs = core.take_pending(msg.flow_id, msg.priority)
            if not msg.ok:
                for req in reqs:
                    self._finish(req, OutcomeCode.REJECTED_OTHER, msg.reason)
                return
            flow = core.install(
                msg.flow_id,
                msg.priority,
                msg.flow_slot,
                msg.flow_gen,
                msg.band_slot,
                msg.band_gen,
                msg.band_name,
                msg.band_capacity,
            )
            for req in reqs:
                self.admit(req, flow)
        elif type(msg) is Prepare:
            is_band = msg.kind == EntityKind.BAND
            reason = (
                core.prepare_band(msg.slot, msg.gen)
                if is_band
                else core.prepare_flow(msg.slot, msg.gen)
            )
            assert self.link is not None
            self.link.send(codec.encode(Vote(msg.txn, self.shard_id, not reason, reason)))
        elif type(msg) is Commit:
            core.commit(msg.kind == EntityKind.BAND, msg.slot, msg.gen)
        elif type(msg) is Abort:
            core.abort(msg.kind == EntityKind.BAND, msg.slot, msg.gen)
            # Requests parked behind a fence wait for the Provisioned that follows the Abort.
        elif type(msg) is SetDraining:
            if not self.draining:
                self.draining = True
                log.info("shard draining shard=%d", self.shard_id)
        elif type(msg) is TopologyChanged:
            self.refresh_others()
        elif type(msg) is Shutdown:
            self.stop(msg.reason)
        else:
            log.warning("unexpected message from coordinator: %r", msg)


def main(spec: ChildSpec) -> NoReturn:
    """Entry point of a shard worker process."""
    child_setup(spec)
    config = msgspec.msgpack.decode(spec.config, type=Config)
    logsetup.setup(config.log_level, f"shard-{spec.shard_id}")
    try:
        code = asyncio.run(_run(spec, config))
    except Exception:
        log.exception("shard crashed shard=%d", spec.shard_id)
        code = ExitCode.ERROR
    sys.stdout.flush()
    os._exit(code)


async def _run(spec: ChildSpec, config: Config) -> int:
    worker = ShardWorker(spec, config)
    return await worker.run()
