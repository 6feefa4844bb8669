"""PROCESS: the coordinator — owns configuration, shared memory and the registry; supervises.

Runs as the ``bandgate serve`` main process. Peers:

- shard workers and the GC process, on ``<socket_dir>/internal.sock`` (authenticated by the
  run's random token): Provision/Provisioned, the two-phase removal relay, drain reports;
- clients and the CLI, on ``<socket_dir>/control.sock``: Hello/Topology, stats, bands,
  reconcile, shard scaling;
- the kernel: process sentinels (a dead child is noticed as fast as a message), signals.

Start-up, numbered as in :meth:`Coordinator.start`:
 1. Take the socket directory's lock file (``flock``; a second daemon refuses) and remove what a
    killed predecessor left (its run id is in the lock file).
 2. Create the shared-memory segment and the budget semaphore (owner-only permissions).
 3. Listen on the internal socket, spawn the shards and the GC process, wait for their hellos.
 4. Listen on the control socket; print the ``ready`` line.

Shutdown (SIGTERM/SIGINT; a second signal forces it): close the control socket, tell every shard
to stop (each gives its waiting requests ``evicted_other``), wait up to
``BANDGATE_SHUTDOWN_TIMEOUT``, kill what remains, then remove the segment, the semaphore, the
sockets and the lock file, and exit 0.

Invariants:
- The coordinator is the only writer of the shared header, shard, band and flow tables.
- The Abort that revives an entity is sent on every shard channel before the Provisioned reply
  that uses it (channels are FIFO), so no shard gets a flow it still fences.
- A dead shard's budget units (its ``S_HELD`` word) are returned and its stats and lease rows
  zeroed before a replacement is started in its place.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import secrets
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any, final

import msgspec

from ipc import codec, shm_layout as L
from ipc.budget import Budget, unlink_budget
from ipc.framing import FramedProtocol
from ipc.messages import (
    PROTOCOL_VERSION,
    Abort,
    Ack,
    ClearSaturation,
    Commit,
    ErrorReply,
    GcHello,
    GetBands,
    GetStats,
    Hello,
    JsonReply,
    Prepare,
    PrepareSent,
    Provision,
    Provisioned,
    Reconcile,
    ReportSaturation,
    Retire,
    ScaleShards,
    SetDraining,
    ShardDrained,
    ShardHello,
    ShardInfo,
    Shutdown,
    Topology,
    TopologyChanged,
    Vote,
)
from ipc.names import budget_name, new_run_id, shm_name
from ipc.shm import Segment, unlink_segment
from runtime import gc_worker, shard_worker
from runtime.config import Config, socket_gid
from runtime.metrics import MetricsServer
from runtime.registry import Registry, RegistryFull
from runtime.supervision import ChildSpec, ExitCode, context
from runtime.validation import check_admission

__all__ = ["AlreadyRunning", "Coordinator", "control_socket_path"]

log = logging.getLogger(__name__)

LOCK_NAME = "bandgate.lock"
CONTROL_NAME = "control.sock"
INTERNAL_NAME = "internal.sock"
# A child that dies this soon after it started, this many times in a row, is crash-looping:
# the daemon stops with an error instead of restarting it forever.
STARTUP_GRACE = 5.0
CRASH_LOOP_LIMIT = 3
BOOT_TIMEOUT = 30.0
# Largest saturation credit one report may grant: far beyond any pool, and the sum with the
# dispatch count stays inside an int64 word.
MAX_ALLOWANCE = 2**40


def control_socket_path(socket_dir: str) -> str:
    return os.path.join(socket_dir, CONTROL_NAME)


class AlreadyRunning(Exception):
    """Another live daemon holds the socket directory."""


class BootFailed(Exception):
    """A child could not start (crash loop or timeout)."""


@dataclass(slots=True)
class Child:
    role: str
    shard_id: int
    proc: Any
    started: float
    link: InternalConn | None = None
    state: int = L.ShardState.STARTING
    crashes: int = 0
    stopping: bool = False


@dataclass(slots=True)
class PendingTxn:
    waiting: set[int] = field(default_factory=set)


@final
class ControlConn(FramedProtocol):
    """A client or CLI connection to the control socket."""

    def __init__(self, coord: Coordinator) -> None:
        super().__init__(coord.config.max_frame)
        self.coord = coord

    def frames_received(self, frames: list[bytes]) -> None:
        for data in frames:
            try:
                msg = codec.to_coordinator(data)
            except codec.DecodeError as exc:
                self.fail("bad_message", f"undecodable message: {exc}")
                return
            try:
                reply = self.coord.on_control(msg)
            except Exception as exc:  # a bug must cost this request, not the connection's peer
                log.exception("control request %s failed", type(msg).__name__)
                self.fail("internal_error", f"{type(msg).__name__} failed: {exc}")
                return
            if reply is None:
                self.fail("unexpected_message", f"{type(msg).__name__} is not a control request")
                return
            self.send(codec.encode(reply))

    def fail(self, code: str, reason: str) -> None:
        log.warning("closing control connection: %s: %s", code, reason)
        self.send(codec.encode(ErrorReply(code, reason)))
        self.close()

    def protocol_failed(self, exc: Exception) -> None:
        self.fail("bad_frame", str(exc))

    def truncated(self, size: int) -> None:
        log.warning(
            "closing control connection: truncated_frame: %d bytes of an unfinished frame", size
        )


@final
class InternalConn(FramedProtocol):
    """A shard worker's or the GC process's link to the coordinator."""

    def __init__(self, coord: Coordinator) -> None:
        super().__init__(16 * 1024 * 1024)
        self.coord = coord
        self.child: Child | None = None

    def frames_received(self, frames: list[bytes]) -> None:
        for data in frames:
            try:
                msg = codec.to_coordinator(data)
            except codec.DecodeError as exc:
                log.error("bad internal message: %s", exc)
                self.close()
                return
            self.coord.on_internal(self, msg)

    def protocol_failed(self, exc: Exception) -> None:
        log.error("bad internal frame: %s", exc)
        self.close()

    def on_close(self, exc: Exception | None) -> None:
        if self.child is not None and self.child.link is self:
            self.child.link = None


@final
class Coordinator:
    """The daemon's main process."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.dir = config.socket_dir
        self.run_id = new_run_id()
        self.token = secrets.token_hex(16)
        self.ctx = context()
        self.segment: Segment | None = None
        self.budget: Budget | None = None
        self.registry: Registry | None = None
        self.lock_fd = -1
        self.children: dict[str, Child] = {}  # "shard-<id>" / "gc" -> child
        self.gc_link: InternalConn | None = None
        self.txns: dict[int, PendingTxn] = {}
        self.servers: list[asyncio.AbstractServer] = []
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stopping = False
        self.signals = 0
        self.exit_code = ExitCode.OK
        self.done: asyncio.Future[None] | None = None
        self.booted: asyncio.Future[None] | None = None
        self.epoch = 0
        self.counters = {"shard_restarts": 0, "gc_restarts": 0}
        self.spec_config = msgspec.msgpack.encode(config)
        self.wake_sock: Any = None
        self.metrics: MetricsServer | None = None
        # Histogram words of shards that died, carried over so exported counters never go back.
        self.dead_hist = [0] * (L.STATS_HEADER_WORDS - L.S_QUEUE_HIST)

    # -- 1. lock and clean ------------------------------------------------------------------------
    def take_directory(self) -> None:
        """Create and lock the socket directory; clean a dead predecessor's leftovers."""
        mode = 0o750 if self.config.socket_group else 0o700
        os.makedirs(self.dir, mode=mode, exist_ok=True)
        st = os.stat(self.dir)
        if st.st_uid != os.getuid():
            raise AlreadyRunning(f"socket directory {self.dir} belongs to another user")
        path = os.path.join(self.dir, LOCK_NAME)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            old = os.read(fd, 256).decode(errors="replace").split()
            os.close(fd)
            pid = old[0] if old else "?"
            raise AlreadyRunning(
                f"another bandgate daemon (pid {pid}) is running on {self.dir}"
            ) from None
        # The directory is ours from here on (a refused daemon must not touch it).
        os.chmod(self.dir, mode)
        if self.config.socket_group:
            os.chown(self.dir, -1, socket_gid(self.config))
        old = os.read(fd, 256).decode(errors="replace").split()
        if len(old) >= 2:
            old_run = old[1]
            removed = [
                name
                for name, gone in (
                    (shm_name(old_run), unlink_segment(shm_name(old_run))),
                    (budget_name(old_run), unlink_budget(budget_name(old_run))),
                )
                if gone
            ]
            if removed:
                log.warning("removed leftovers of a dead daemon (pid %s): %s", old[0], removed)
        for name in os.listdir(self.dir):
            if name.endswith(".sock"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.dir, name))
        os.lseek(fd, 0, os.SEEK_SET)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {self.run_id}\n".encode())
        self.lock_fd = fd

    # -- start ------------------------------------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.loop = loop
        self.done = loop.create_future()
        self.booted = loop.create_future()
        # 1. lock and clean
        self.take_directory()
        # 2. shared memory and the budget
        cfg = self.config
        layout = L.Layout(cfg.max_shards, cfg.max_bands, cfg.max_flows)
        shm_mode = 0o660 if cfg.socket_group else 0o600
        gid = socket_gid(cfg)
        self.segment = Segment.create(
            shm_name(self.run_id), layout, mode=shm_mode, gid=gid, coord_pid=os.getpid()
        )
        w = self.segment.words
        w[L.H_MAX_INFLIGHT] = cfg.max_inflight
        w[L.H_MAX_BYTES] = cfg.max_bytes
        self.budget = Budget.create(
            budget_name(self.run_id), cfg.max_inflight, mode=shm_mode, gid=gid
        )
        self.registry = Registry(w, layout, cfg, time.monotonic_ns)
        import socket as _socket

        self.wake_sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM)
        self.wake_sock.setblocking(False)
        # 3. internal socket, children
        internal = os.path.join(self.dir, INTERNAL_NAME)
        server = await loop.create_unix_server(lambda: InternalConn(self), internal)
        os.chmod(internal, 0o600)
        self.servers.append(server)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.on_signal)
        for shard_id in range(cfg.shards):
            self.spawn("shard", shard_id)
        self.spawn("gc", 0)
        try:
            await asyncio.wait_for(asyncio.shield(self.booted), BOOT_TIMEOUT)
        except TimeoutError:
            raise BootFailed(f"children did not start within {BOOT_TIMEOUT:.0f}s") from None
        # 4. control socket, ready
        control = control_socket_path(self.dir)
        server = await loop.create_unix_server(lambda: ControlConn(self), control)
        os.chmod(control, 0o660 if cfg.socket_group else 0o600)
        if gid >= 0:
            os.chown(control, -1, gid)
        self.servers.append(server)
        if cfg.metrics_addr:
            self.metrics = MetricsServer(self)
            try:
                await self.metrics.start(cfg.metrics_addr)
            except OSError as exc:
                raise BootFailed(
                    f"BANDGATE_METRICS_ADDR={cfg.metrics_addr}: cannot listen: {exc.strerror or exc}"
                ) from None
        print(
            f"bandgate ready socket_dir={self.dir} shards={cfg.shards} pid={os.getpid()}",
            flush=True,
        )
        log.info(
            "ready socket_dir=%s shards=%d max_inflight=%d", self.dir, cfg.shards, cfg.max_inflight
        )

    def _check_booted(self) -> None:
        if self.booted is None or self.booted.done():
            return
        if all(c.link is not None for c in self.children.values()):
            self.booted.set_result(None)

    # -- children ---------------------------------------------------------------------------------
    def spawn(self, role: str, shard_id: int) -> Child:
        assert self.segment is not None and self.budget is not None and self.loop is not None
        spec = ChildSpec(
            role=role,
            shard_id=shard_id,
            run_id=self.run_id,
            token=self.token,
            config=self.spec_config,
            internal_path=os.path.join(self.dir, INTERNAL_NAME),
            shm_name=self.segment.name,
            budget_name=self.budget.name,
            coordinator_pid=os.getpid(),
        )
        name = f"shard-{shard_id}" if role == "shard" else "gc"
        target = shard_worker.main if role == "shard" else gc_worker.main
        proc = self.ctx.Process(target=target, args=(spec,), name=name, daemon=False)
        proc.start()
        old = self.children.get(name)
        child = Child(role, shard_id, proc, time.monotonic(), crashes=old.crashes if old else 0)
        self.children[name] = child
        if role == "shard":
            w = self.segment.words
            base = self.segment.layout.shard(shard_id)
            w[base + L.SH_PID] = proc.pid
            w[base + L.SH_INCARNATION] += 1
            w[base + L.SH_STATE] = L.ShardState.STARTING
        self.loop.add_reader(proc.sentinel, self.on_child_exit, name, child)
        log.info("spawned %s pid=%d", name, proc.pid)
        return child

    def on_child_exit(self, name: str, child: Child) -> None:
        """A process sentinel fired: reap, repair shared state, restart or give up."""
        if self.segment is None:
            return  # after cleanup(): the daemon is gone, nothing to repair
        assert self.loop is not None and self.registry is not None
        self.loop.remove_reader(child.proc.sentinel)
        # The sentinel closes as the process exits; the zombie is reapable a moment later.
        child.proc.join(2)
        code = child.proc.exitcode
        if self.children.get(name) is child:
            del self.children[name]
        if child.link is not None:
            child.link.close()
        if child.role == "shard":
            self.repair_dead_shard(child.shard_id)
        else:
            self.gc_link = None
            for abort in self.registry.abort_all():
                self.broadcast(abort)
            self.txns.clear()
        if self.stopping or child.stopping:
            log.info("%s exited code=%s", name, code)
            self._maybe_done()
            return
        if code == -signal.SIGKILL:
            log.error("%s killed by SIGKILL (possible OOM) pid=%d", name, child.proc.pid)
        else:
            log.error("%s died code=%s pid=%d", name, code, child.proc.pid)
        if time.monotonic() - child.started < STARTUP_GRACE:
            child.crashes += 1
        else:
            child.crashes = 0
        if child.crashes >= CRASH_LOOP_LIMIT:
            log.error(
                "%s keeps crashing at start (%d times, last code=%s); stopping",
                name,
                child.crashes,
                code,
            )
            self.exit_code = ExitCode.BOOT_ERROR
            self.shutdown(f"{name} keeps crashing")
            return
        if child.role == "shard" and child.state == L.ShardState.DRAINING:
            return  # a draining shard that died is not replaced
        new = self.spawn(child.role, child.shard_id)
        new.crashes = child.crashes
        self.counters["shard_restarts" if child.role == "shard" else "gc_restarts"] += 1

    def repair_dead_shard(self, shard_id: int) -> None:
        """Return a dead shard's units and clear its rows (it can write them no more)."""
        assert self.segment is not None and self.budget is not None
        seg = self.segment
        w = seg.words
        layout = seg.layout
        row = layout.stats_row(shard_id)
        w[L.H_DISPATCHED_BASE] += w[row + L.S_DISPATCHED]
        for i in range(len(self.dead_hist)):
            self.dead_hist[i] += w[row + L.S_QUEUE_HIST + i]
        held = int(w[row + L.S_HELD])
        if held > 0:
            self.budget.release(held)
            log.warning("returned %d budget units of dead shard=%d", held, shard_id)
        seg.zero(row, layout.stats_row_words)
        w[row + L.S_TOP_WAITING] = L.NO_PRIORITY
        seg.zero(layout.lease_row(shard_id), layout.lease_row_words)
        w[layout.shard(shard_id) + L.SH_STATE] = L.ShardState.FREE
        self.bump_epoch()
        # Votes it owed will never come: answer no for it, so GC aborts at once.
        for txn, pending in list(self.txns.items()):
            if shard_id in pending.waiting:
                pending.waiting.discard(shard_id)
                self.to_gc(Vote(txn, shard_id, False, f"shard {shard_id} died"))
        # Units came back: wake everyone who may be waiting for one.
        self.wake_all()

    def bump_epoch(self) -> None:
        assert self.segment is not None
        self.epoch += 1
        self.segment.words[L.H_EPOCH] = self.epoch
        for child in self.children.values():
            if child.role == "shard" and child.link is not None:
                child.link.send(codec.encode(TopologyChanged(self.epoch)))

    def wake_all(self) -> None:
        for child in self.children.values():
            if child.role == "shard":
                with contextlib.suppress(OSError):
                    self.wake_sock.sendto(
                        b"\0", shard_worker.wake_socket_path(self.dir, child.shard_id)
                    )

    # -- messages from children -------------------------------------------------------------------
    def on_internal(self, conn: InternalConn, msg: object) -> None:
        registry = self.registry
        assert registry is not None and self.segment is not None
        if conn.child is None:
            self.hello(conn, msg)
            return
        t = type(msg)
        if t is Provision:
            self.provision(conn, msg)  # type: ignore[arg-type]
        elif t is Vote:
            pending = self.txns.get(msg.txn)  # type: ignore[attr-defined]
            if pending is not None:
                pending.waiting.discard(msg.shard_id)  # type: ignore[attr-defined]
                if not pending.waiting:
                    del self.txns[msg.txn]  # type: ignore[attr-defined]
            self.to_gc(msg)
        elif t is ShardDrained:
            name = f"shard-{msg.shard_id}"  # type: ignore[attr-defined]
            child = self.children.get(name)
            if child is not None and child.state == L.ShardState.DRAINING:
                child.stopping = True
                if child.link is not None:
                    child.link.send(codec.encode(Shutdown("drained")))
                log.info("removing drained %s", name)
        elif t is Retire:
            reason = registry.retire(msg.txn, msg.kind, msg.slot, msg.gen)  # type: ignore[attr-defined]
            conn.send(codec.encode(Ack(not reason, reason)))
        elif t is Prepare:
            self.relay_prepare(conn, msg)  # type: ignore[arg-type]
        elif t is Commit:
            reason = registry.commit(msg.txn, msg.kind, msg.slot, msg.gen)  # type: ignore[attr-defined]
            if not reason:
                self.broadcast(msg)
            self.txns.pop(msg.txn, None)  # type: ignore[attr-defined]
            conn.send(codec.encode(Ack(not reason, reason)))
        elif t is Abort:
            if registry.abort(msg.txn, msg.kind, msg.slot, msg.gen):  # type: ignore[attr-defined]
                self.broadcast(msg)
            self.txns.pop(msg.txn, None)  # type: ignore[attr-defined]
            conn.send(codec.encode(Ack(True, "")))
        else:
            log.error("unexpected internal message %r", msg)

    def hello(self, conn: InternalConn, msg: object) -> None:
        if type(msg) is ShardHello and _token_ok(msg.token, self.token):
            child = self.children.get(f"shard-{msg.shard_id}")
            if child is None or child.proc.pid != msg.pid:
                conn.close()
                return
            conn.child = child
            child.link = conn
            assert self.segment is not None
            if child.state == L.ShardState.DRAINING:
                # Scaled down while it was starting: it drains from its first moment.
                conn.send(codec.encode(SetDraining()))
            else:
                child.state = L.ShardState.ACTIVE
            self.segment.words[self.segment.layout.shard(child.shard_id) + L.SH_STATE] = child.state
            self.bump_epoch()
            log.info("shard up shard=%d pid=%d", child.shard_id, msg.pid)
        elif type(msg) is GcHello and _token_ok(msg.token, self.token):
            child = self.children.get("gc")
            if child is None or child.proc.pid != msg.pid:
                conn.close()
                return
            conn.child = child
            child.link = conn
            child.state = L.ShardState.ACTIVE
            self.gc_link = conn
            # A new GC knows nothing of its predecessor's removals: abort them all.
            assert self.registry is not None
            for abort in self.registry.abort_all():
                self.broadcast(abort)
            self.txns.clear()
            log.info("gc up pid=%d", msg.pid)
        else:
            log.warning("internal connection without a valid hello; closing")
            conn.close()
            return
        self._check_booted()

    def provision(self, conn: InternalConn, msg: Provision) -> None:
        registry = self.registry
        assert registry is not None
        problem = check_admission(msg.flow_id, msg.priority, 0, None)
        if problem:
            conn.send(codec.encode(Provisioned(msg.req, False, problem, msg.flow_id, msg.priority)))
            return
        try:
            flow, band, aborts = registry.provision(msg.flow_id, msg.priority)
        except RegistryFull as exc:
            conn.send(
                codec.encode(Provisioned(msg.req, False, str(exc), msg.flow_id, msg.priority))
            )
            return
        for abort in aborts:
            self.broadcast(abort)
            self.txns.pop(abort.txn, None)
        conn.send(
            codec.encode(
                Provisioned(
                    msg.req,
                    True,
                    "",
                    msg.flow_id,
                    msg.priority,
                    flow.slot,
                    flow.gen,
                    band.slot,
                    band.gen,
                    band.capacity,
                    band.name,
                )
            )
        )

    def relay_prepare(self, conn: InternalConn, msg: Prepare) -> None:
        assert self.registry is not None
        reason = self.registry.preparable(msg.txn, msg.kind, msg.slot, msg.gen)
        if reason:
            conn.send(codec.encode(PrepareSent(msg.txn, False, (), reason)))
            return
        ids = []
        for child in self.children.values():
            if child.role == "shard" and child.link is not None:
                child.link.send(codec.encode(msg))
                ids.append(child.shard_id)
        self.txns[msg.txn] = PendingTxn(set(ids))
        conn.send(codec.encode(PrepareSent(msg.txn, True, tuple(sorted(ids)))))

    def broadcast(self, msg: object) -> None:
        data = codec.encode(msg)
        for child in self.children.values():
            if child.role == "shard" and child.link is not None:
                child.link.send(data)

    def to_gc(self, msg: object) -> None:
        if self.gc_link is not None:
            self.gc_link.send(codec.encode(msg))

    # -- control requests -------------------------------------------------------------------------
    def on_control(self, msg: object) -> object | None:
        if self.segment is None:
            return ErrorReply("shutting_down", "the daemon is stopping")
        t = type(msg)
        if t is Hello:
            return self.topology()
        if t is GetStats:
            return JsonReply(json.dumps(self.stats()).encode())
        if t is GetBands:
            return JsonReply(json.dumps(self.bands()).encode())
        if t is Reconcile:
            return self.reconcile(msg.priorities)  # type: ignore[attr-defined]
        if t is ScaleShards:
            return self.scale(msg.n)  # type: ignore[attr-defined]
        if t is ClearSaturation:
            return self.clear_saturation()
        if t is ReportSaturation:
            return self.report_saturation(msg.allowance, msg.valid_for)  # type: ignore[attr-defined]
        return None

    def reconcile(self, priorities: tuple[int, ...]) -> Ack:
        """Apply a desired set of bands, all or nothing."""
        registry = self.registry
        assert registry is not None
        for priority in priorities:
            problem = check_admission("x", priority, 0, None)
            if problem:
                return Ack(False, problem)
        new = {p for p in priorities if p not in registry.band_by_priority}
        free = registry.layout.max_bands - len(registry.bands)
        if len(new) > free:
            return Ack(
                False,
                f"{len(new)} new bands do not fit: {free} free of {registry.layout.max_bands}"
                " (BANDGATE_MAX_BANDS)",
            )
        for abort in registry.reconcile(priorities):
            self.broadcast(abort)
        return Ack(True, "")

    def total_dispatched(self) -> int:
        assert self.segment is not None
        w = self.segment.words
        layout = self.segment.layout
        return int(w[L.H_DISPATCHED_BASE]) + sum(
            int(w[layout.stats_row(s) + L.S_DISPATCHED]) for s in range(layout.max_shards)
        )

    def clear_saturation(self) -> Ack:
        """Stop gating on external credit (its source stopped on purpose)."""
        assert self.segment is not None
        w = self.segment.words
        if w[L.H_SAT_MODE]:
            w[L.H_SAT_MODE] = 0
            log.info("external saturation source cleared; dispatch gated by the budget alone")
            self.wake_all()
        return Ack(True, "")

    def report_saturation(self, allowance: int, valid_for: float) -> Ack:
        """Grant ``allowance`` more dispatches, valid for ``valid_for`` seconds (then fail closed)."""
        if not 0 <= allowance <= MAX_ALLOWANCE or not 0 < valid_for <= 3600:
            return Ack(
                False,
                f"allowance must be in [0, {MAX_ALLOWANCE}] and valid_for in (0, 3600] seconds",
            )
        assert self.segment is not None
        w = self.segment.words
        w[L.H_SAT_LIMIT] = self.total_dispatched() + allowance
        w[L.H_SAT_EXPIRES_NS] = time.monotonic_ns() + int(valid_for * 1e9)
        if not w[L.H_SAT_MODE]:
            log.info("external saturation source reporting; dispatch now also needs its credit")
        w[L.H_SAT_MODE] = 1
        if allowance:
            self.wake_all()
        return Ack(True, "")

    def topology(self) -> Topology:
        assert self.segment is not None
        shards = []
        for child in sorted(self.children.values(), key=lambda c: c.shard_id):
            if child.role != "shard" or child.link is None:
                continue
            state = "draining" if child.state == L.ShardState.DRAINING else "active"
            shards.append(
                ShardInfo(
                    child.shard_id,
                    shard_worker.shard_socket_path(self.dir, child.shard_id),
                    state,
                    child.proc.pid,
                )
            )
        return Topology(
            PROTOCOL_VERSION, self.segment.name, self.epoch, tuple(shards), self.config.max_flows
        )

    def scale(self, n: int) -> Ack:
        """Change the number of active shards (GIE's draining semantics on the way down)."""
        assert self.segment is not None
        if not 1 <= n <= self.config.max_shards:
            return Ack(
                False,
                f"shard count must be between 1 and {self.config.max_shards} (BANDGATE_MAX_SHARDS)",
            )
        shards = [c for c in self.children.values() if c.role == "shard"]
        active = sorted(
            (c for c in shards if c.state != L.ShardState.DRAINING), key=lambda c: c.shard_id
        )
        w = self.segment.words
        if n < len(active):
            for child in active[n:]:
                child.state = L.ShardState.DRAINING
                w[self.segment.layout.shard(child.shard_id) + L.SH_STATE] = L.ShardState.DRAINING
                if child.link is not None:
                    child.link.send(codec.encode(SetDraining()))
                log.info("shard draining shard=%d", child.shard_id)
            self.bump_epoch()
        else:
            used = {c.shard_id for c in shards}
            free = (i for i in range(self.config.max_shards) if i not in used)
            for _ in range(n - len(active)):
                shard_id = next(free, None)
                if shard_id is None:
                    return Ack(False, "no free shard slot (BANDGATE_MAX_SHARDS)")
                self.spawn("shard", shard_id)
        return Ack(True, "")

    def stats(self) -> dict[str, Any]:
        """The daemon's statistics (the ``stats()`` / ``bandgate stats --json`` document)."""
        seg = self.segment
        registry = self.registry
        assert seg is not None and registry is not None
        w = seg.words
        layout = seg.layout
        shard_rows = []
        for child in sorted(self.children.values(), key=lambda c: c.shard_id):
            if child.role != "shard":
                continue
            row = layout.stats_row(child.shard_id)
            shard_rows.append(
                {
                    "id": child.shard_id,
                    "pid": child.proc.pid,
                    "state": "draining"
                    if child.state == L.ShardState.DRAINING
                    else ("active" if child.link else "starting"),
                    "len": int(w[row + L.S_LEN]),
                    "bytes": int(w[row + L.S_BYTES]),
                    "inflight": int(w[row + L.S_INFLIGHT]),
                    "dispatched": int(w[row + L.S_DISPATCHED]),
                    "oldest_wait": self.shard_oldest_wait(child.shard_id),
                }
            )
        bands: dict[int, dict[str, Any]] = {}
        now_ns = time.monotonic_ns()
        for band in sorted(registry.bands.values(), key=lambda b: -b.priority):
            length = size = dispatched = inflight_band = 0
            for s in range(layout.max_shards):
                base = layout.stats_band(s, band.slot)
                length += w[base + L.SB_LEN]
                size += w[base + L.SB_BYTES]
                dispatched += w[base + L.SB_DISPATCHED]
                inflight_band += w[base + L.SB_INFLIGHT]
            oldest = 0
            for s in range(layout.max_shards):
                stamp = w[layout.stats_band(s, band.slot) + L.SB_OLDEST_NS]
                if stamp and (not oldest or stamp < oldest):
                    oldest = stamp
            bands[band.priority] = {
                "oldest_wait": max(0.0, (now_ns - oldest) / 1e9) if oldest and length else 0.0,
                "name": band.name,
                "static": band.static,
                "state": registry.band_state_name(band),
                "generation": band.gen,
                "len": int(length),
                "bytes": int(size),
                "capacity_bytes": band.capacity,
                "flows": band.flows,
                "dispatched": int(dispatched),
                "inflight": int(inflight_band),
            }
        inflight = sum(r["inflight"] for r in shard_rows)
        gc = self.children.get("gc")
        return {
            "pid": os.getpid(),
            "gc_pid": gc.proc.pid if gc is not None else None,
            "socket_dir": self.dir,
            "metrics_addr": self.metrics.address if self.metrics else "",
            "len": sum(r["len"] for r in shard_rows),
            "bytes": sum(r["bytes"] for r in shard_rows),
            "inflight": inflight,
            "max_inflight": self.config.max_inflight,
            "max_bytes": self.config.max_bytes,
            "flows": len(registry.flows),
            "bands": bands,
            "shards": shard_rows,
            "busiest_flows": self.busiest_flows(),
            "saturation": self.saturation_state(inflight),
            "gc": dict(registry.counters),
            "restarts": dict(self.counters),
        }

    def shard_oldest_wait(self, shard_id: int) -> float:
        """Seconds the oldest request queued on a shard has waited (0.0 if none)."""
        seg, registry = self.segment, self.registry
        assert seg is not None and registry is not None
        w = seg.words
        oldest = 0
        for band in registry.bands.values():
            base = seg.layout.stats_band(shard_id, band.slot)
            stamp = w[base + L.SB_OLDEST_NS]
            if stamp and w[base + L.SB_LEN] and (not oldest or stamp < oldest):
                oldest = stamp
        return max(0.0, (time.monotonic_ns() - oldest) / 1e9) if oldest else 0.0

    def queued_flows(self) -> list[tuple[int, int, str, int]]:
        """``(len, bytes, flow_id, priority)`` of every flow with queued requests, busiest first.

        Summed over the live shards' lease rows (each written by its shard).
        """
        seg, registry = self.segment, self.registry
        assert seg is not None and registry is not None
        w = seg.words
        layout = seg.layout
        rows = [
            layout.lease_row(s) for s in range(layout.max_shards) if w[layout.shard(s) + L.SH_STATE]
        ]
        found = []
        for slot, flow in registry.flows.items():
            offset = slot * L.LEASE_WORDS
            count = size = 0
            for row in rows:
                count += w[row + offset + L.L_COUNT]
                size += w[row + offset + L.L_BYTES]
            if count:
                found.append((int(count), int(size), flow.flow_id, flow.priority))
        found.sort(key=lambda t: (-t[0], -t[1], t[2]))
        return found

    def busiest_flows(self, limit: int = 10) -> list[dict[str, Any]]:
        """The flows with the most queued requests (for stats and ``bandgate top``)."""
        return [
            {"flow_id": fid, "priority": prio, "len": n, "bytes": b}
            for n, b, fid, prio in self.queued_flows()[:limit]
        ]

    def saturation_state(self, inflight: int) -> dict[str, Any]:
        assert self.segment is not None and self.budget is not None
        w = self.segment.words
        budget_free = None if self.budget.unlimited else self.budget.free
        saturated = budget_free == 0
        if w[L.H_SAT_MODE]:
            fresh = time.monotonic_ns() < w[L.H_SAT_EXPIRES_NS]
            left = max(0, int(w[L.H_SAT_LIMIT]) - self.total_dispatched())
            saturated = saturated or not fresh or left == 0
            return {
                "source": "external",
                "saturated": saturated,
                "budget_free": budget_free,
                "allowance_left": left,
                "fresh": fresh,
            }
        return {
            "source": "budget",
            "saturated": saturated,
            "budget_free": budget_free,
            "allowance_left": None,
            "fresh": None,
        }

    def health_problems(self) -> list[str]:
        """Why the daemon is not healthy: every shard and the GC process must be up."""
        problems = []
        if self.stopping:
            problems.append("shutting down")
        if "gc" not in self.children or self.children["gc"].link is None:
            problems.append("gc process not up")
        active = 0
        for child in self.children.values():
            if child.role == "shard":
                if child.link is None:
                    problems.append(f"shard {child.shard_id} not up")
                elif child.state != L.ShardState.DRAINING:
                    active += 1
        if not active:
            problems.append("no active shard")
        return problems

    def bands(self) -> list[dict[str, Any]]:
        assert self.registry is not None
        return [
            {
                "priority": b.priority,
                "name": b.name,
                "state": self.registry.band_state_name(b),
                "generation": b.gen,
                "flows": b.flows,
            }
            for b in sorted(self.registry.bands.values(), key=lambda b: -b.priority)
        ]

    # -- shutdown ---------------------------------------------------------------------------------
    def on_signal(self) -> None:
        self.signals += 1
        if self.signals == 1:
            self.shutdown("shutting down")
        else:
            log.warning("second signal: forcing shutdown")
            for child in self.children.values():
                with contextlib.suppress(Exception):
                    child.proc.kill()
            self._maybe_done(force=True)

    def shutdown(self, reason: str) -> None:
        if self.stopping:
            return
        self.stopping = True
        assert self.loop is not None
        if self.booted is not None and not self.booted.done():
            self.booted.set_exception(BootFailed(reason))
        log.info("shutdown started reason=%s", reason)
        for server in self.servers:
            server.close()
        for child in self.children.values():
            child.stopping = True
            if child.link is not None:
                child.link.send(codec.encode(Shutdown(reason)))
            else:
                with contextlib.suppress(Exception):
                    child.proc.terminate()
        self.loop.call_later(self.config.shutdown_timeout, self._kill_remaining)
        self._maybe_done()

    def _kill_remaining(self) -> None:
        for name, child in list(self.children.items()):
            log.warning("%s did not stop in time; killing", name)
            with contextlib.suppress(Exception):
                child.proc.kill()

    def _maybe_done(self, force: bool = False) -> None:
        if (
            self.stopping
            and (force or not self.children)
            and self.done is not None
            and not self.done.done()
        ):
            self.done.set_result(None)

    def cleanup(self) -> None:
        """Remove every kernel object and file this daemon created (idempotent)."""
        for child in list(self.children.values()):
            with contextlib.suppress(Exception):
                child.proc.kill()
                child.proc.join(5)
        if self.segment is not None:
            self.segment.unlink()
            self.segment.close()
            self.segment = None
        if self.budget is not None:
            self.budget.unlink()
            self.budget.close()
            self.budget = None
        if self.wake_sock is not None:
            self.wake_sock.close()
        if self.lock_fd < 0:
            return  # the directory is another daemon's (or was never ours): touch nothing in it
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(self.dir):
                if name.endswith(".sock"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(self.dir, name))
        if self.lock_fd >= 0:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.dir, LOCK_NAME))
            os.close(self.lock_fd)
            self.lock_fd = -1

    async def run(self) -> int:
        try:
            await self.start()
            assert self.done is not None
            await self.done
        except BootFailed as exc:
            log.error("daemon failed to start: %s", exc)
            print(f"bandgate: failed to start: {exc}", file=sys.stderr)
            self.exit_code = ExitCode.BOOT_ERROR
        finally:
            for server in self.servers:
                server.close()
            if self.metrics is not None:
                self.metrics.close()
            self.cleanup()
        log.info("stopped")
        return int(self.exit_code)


def _token_ok(given: str, token: str) -> bool:
    """Constant-time comparison that accepts any string a peer may send."""
    return secrets.compare_digest(given.encode("utf-8", "surrogatepass"), token.encode())


def serve(config: Config) -> int:
    """Run the daemon in the foreground until SIGTERM/SIGINT; returns the exit code."""
    coord = Coordinator(config)
    try:
        return asyncio.run(coord.run())
    except AlreadyRunning as exc:
        print(f"bandgate: {exc}", file=sys.stderr)
        return int(ExitCode.ALREADY_RUNNING)
