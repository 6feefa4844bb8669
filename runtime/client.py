"""LIBRARY: the client, in the caller's process — blocking (:class:`Client`) and asyncio
(:class:`AsyncClient`).

Peers: the coordinator's control socket (hello/topology, stats, reconcile, scaling) and one
connection per active shard (Submit/Cancel/Release -> Decided). The shared-memory segment is mapped
read-only to pick a shard: the one where the request's flow has the fewest queued bytes (GIE's
JSQ-bytes), then the one with the fewest queued items, then round-robin.

Guarantees:
- ``admit`` returns exactly one :class:`Admission` per call, for every outcome. A shard that is
  draining (RETRY) or whose connection breaks before the outcome arrives never yields an error:
  the request is resubmitted on another active shard (it was never dispatched, since a dispatch
  is only ever known through its outcome). Only when no shard can be reached for
  :data:`RESUBMIT_TIMEOUT` does the request end ``evicted_other``.
- Cancelling the task awaiting :meth:`AsyncClient.admit` sends Cancel: the shard withdraws the
  request at once. If its dispatch crossed the Cancel on the wire, the unit is released here.
- :meth:`Admission.release` is idempotent and a no-op for an outcome other than dispatched.
- Closing the client (or the process dying) closes the connections; the shards withdraw its
  queued requests and return its units.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import json
import os
import random
import threading
import time
from collections.abc import Iterable
from typing import Any, final

from ipc import codec, shm_layout as L
from ipc.errors import IPCError
from ipc.framing import FramedProtocol
from ipc.messages import (
    PROTOCOL_VERSION,
    Ack,
    Cancel,
    ClearSaturation,
    Decided,
    ErrorReply,
    GetBands,
    GetStats,
    Hello,
    JsonReply,
    OutcomeCode,
    Reconcile,
    Release,
    ReportSaturation,
    ScaleShards,
    Submit,
    Topology,
)
from ipc.shm import Segment
from runtime.config import ENV_PREFIX, default_socket_dir
from runtime.coordinator import control_socket_path
from runtime.outcome import OUTCOME_BY_CODE, BandgateError, DaemonUnavailable, Outcome
from runtime.validation import check_admission

__all__ = ["Admission", "AsyncAdmission", "AsyncClient", "Client"]

# How long a request may look for a live shard (shards restarting, all draining) before it ends
# evicted_other. A crashed shard is replaced in well under a second.
RESUBMIT_TIMEOUT = 10.0
MAX_FRAME = 16 * 1024 * 1024


def resolve_socket_dir(socket_dir: str | None) -> str:
    if socket_dir:
        return socket_dir
    return os.environ.get(f"{ENV_PREFIX}SOCKET_DIR") or default_socket_dir(os.environ)


class _Pending:
    __slots__ = (
        "byte_size",
        "cancelled",
        "flow_id",
        "future",
        "id",
        "priority",
        "shard",
        "started",
        "ttl",
    )

    def __init__(
        self,
        req_id: int,
        flow_id: str,
        priority: int,
        byte_size: int,
        ttl: float,
        future: asyncio.Future[Any],
    ) -> None:
        self.id = req_id
        self.flow_id = flow_id
        self.priority = priority
        self.byte_size = byte_size
        self.ttl = ttl
        self.future = future
        self.shard: _ShardConn | None = None
        self.started = time.monotonic()
        self.cancelled = False


@final
class _ShardConn(FramedProtocol):
    def __init__(self, core: _Core, shard_id: int) -> None:
        super().__init__(MAX_FRAME)
        self.core = core
        self.shard_id = shard_id
        self.pending: dict[int, _Pending] = {}
        self.draining = False

    def frames_received(self, frames: list[bytes]) -> None:
        decode = codec.shard_to_client
        core = self.core
        for data in frames:
            msg = decode(data)
            if type(msg) is Decided:
                p = self.pending.pop(msg.id, None)
                if p is not None:
                    core.decided(self, p, msg)
            else:
                assert type(msg) is ErrorReply
                core.protocol_error = f"{msg.code}: {msg.reason}"

    def on_close(self, exc: Exception | None) -> None:
        self.core.shard_lost(self)


@final
class _ControlConn(FramedProtocol):
    def __init__(self) -> None:
        super().__init__(MAX_FRAME)
        self.waiters: list[asyncio.Future[Any]] = []

    def frames_received(self, frames: list[bytes]) -> None:
        for data in frames:
            msg = codec.from_coordinator(data)
            if self.waiters:
                fut = self.waiters.pop(0)
                if not fut.done():
                    fut.set_result(msg)

    def on_close(self, exc: Exception | None) -> None:
        for fut in self.waiters:
            if not fut.done():
                fut.set_exception(DaemonUnavailable("the daemon closed the control connection"))
        self.waiters.clear()

    async def request(self, msg: object) -> Any:
        if self.closed:
            raise DaemonUnavailable("the daemon closed the control connection")
        fut = asyncio.get_running_loop().create_future()
        self.waiters.append(fut)
        self.send(codec.encode(msg))
        return await fut


class Admission:
    """The outcome of one admission. Holds a concurrency unit until released if dispatched."""

    __slots__ = (
        "_core",
        "_released",
        "_req_id",
        "_shard",
        "dispatched",
        "outcome",
        "queued_seconds",
        "reason",
    )

    def __init__(
        self,
        outcome: Outcome,
        reason: str,
        queued_seconds: float,
        core: _Core | None = None,
        shard: _ShardConn | None = None,
        req_id: int = 0,
    ) -> None:
        self.outcome = outcome
        self.dispatched = outcome is Outcome.DISPATCHED
        self.reason = reason
        self.queued_seconds = queued_seconds
        self._core = core
        self._shard = shard
        self._req_id = req_id
        self._released = not self.dispatched

    def __repr__(self) -> str:
        return f"{type(self).__name__}(outcome={self.outcome.value!r}, reason={self.reason!r}, queued_seconds={self.queued_seconds:.6f})"

    def _release_now(self) -> None:
        """Send Release (in the client's event loop thread)."""
        if self._released:
            return
        self._released = True
        shard = self._shard
        if shard is not None and not shard.closed:
            shard.send(codec.encode(Release(self._req_id)))

    def release(self) -> None:
        """Return the concurrency unit (idempotent; a no-op unless dispatched)."""
        if self._released or self._core is None:
            return
        self._core.call_in_loop(self._release_now)

    def __enter__(self) -> Admission:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@final
class AsyncAdmission(Admission):
    """:class:`Admission` for :class:`AsyncClient`: ``release()`` is awaited."""

    __slots__ = ()

    async def release(self) -> None:  # type: ignore[override]
        self._release_now()

    async def __aenter__(self) -> AsyncAdmission:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._release_now()


class _Core:
    """The client machinery; lives in one event loop (the caller's, or Client's thread)."""

    def __init__(self, socket_dir: str | None, admission_cls: type[Admission]) -> None:
        self.socket_dir = resolve_socket_dir(socket_dir)
        self.admission_cls = admission_cls
        self.loop: asyncio.AbstractEventLoop | None = None
        self.control: _ControlConn | None = None
        self.topology: Topology | None = None
        self.shards: dict[int, _ShardConn] = {}
        self.connecting: dict[int, asyncio.Task[_ShardConn]] = {}
        self.segment: Segment | None = None
        self.ids = itertools.count(1)
        self.flow_slots: dict[tuple[str, int], int] = {}
        self.rr = 0
        self.protocol_error = ""
        self.closed = False
        self.refreshing: asyncio.Task[None] | None = None
        self.connect_lock: asyncio.Lock | None = None
        self.tasks: set[asyncio.Future[Any]] = set()

    def spawn(self, coro: Any) -> None:
        """Run a background task, keeping a reference until it ends (the loop keeps weak ones)."""
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def call_in_loop(self, fn: Any) -> None:
        loop = self.loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            fn()
        else:
            loop.call_soon_threadsafe(fn)

    # -- connection -------------------------------------------------------------------------------
    async def connect(self) -> None:
        if self.control is not None and not self.control.closed:
            return
        if self.closed:
            raise BandgateError("client is closed")
        self.loop = asyncio.get_running_loop()
        if self.connect_lock is None:
            self.connect_lock = asyncio.Lock()
        async with self.connect_lock:
            if self.control is not None and not self.control.closed:
                return
            path = control_socket_path(self.socket_dir)
            try:
                _, control = await self.loop.create_unix_connection(_ControlConn, path)
            except (FileNotFoundError, ConnectionRefusedError, PermissionError) as exc:
                raise DaemonUnavailable(
                    f"no bandgate daemon at {self.socket_dir} ({exc.strerror or exc})"
                ) from exc
            self.control = control
            await self._hello()

    async def _hello(self) -> None:
        assert self.control is not None
        topo = await self.control.request(Hello(PROTOCOL_VERSION))
        if type(topo) is not Topology:
            raise DaemonUnavailable(f"unexpected hello reply from the daemon: {topo!r}")
        if topo.protocol != PROTOCOL_VERSION:
            raise DaemonUnavailable(
                f"daemon speaks protocol {topo.protocol}, this client {PROTOCOL_VERSION}"
            )
        if self.segment is None or self.segment.name != topo.shm_name:
            if self.segment is not None:
                self.segment.close()
            try:
                self.segment = Segment.attach(topo.shm_name, readonly=True)
            except IPCError:
                self.segment = None  # shard choice falls back to round-robin
        self.topology = topo

    async def refresh(self) -> None:
        """Re-read the topology (a shard drained, died or was added). Coalesced."""
        if self.refreshing is None or self.refreshing.done():
            self.refreshing = asyncio.ensure_future(self._refresh())
        await asyncio.shield(self.refreshing)

    async def _refresh(self) -> None:
        if self.control is None or self.control.closed:
            self.control = None
            await self.connect()
        else:
            await self._hello()

    async def shard_conn(self, shard_id: int, path: str) -> _ShardConn:
        conn = self.shards.get(shard_id)
        if conn is not None and not conn.closed:
            return conn
        task = self.connecting.get(shard_id)
        if task is None:
            task = asyncio.ensure_future(self._open_shard(shard_id, path))
            self.connecting[shard_id] = task
        try:
            return await asyncio.shield(task)
        finally:
            if task.done():
                self.connecting.pop(shard_id, None)

    async def _open_shard(self, shard_id: int, path: str) -> _ShardConn:
        assert self.loop is not None
        _, conn = await self.loop.create_unix_connection(lambda: _ShardConn(self, shard_id), path)
        self.shards[shard_id] = conn
        return conn

    # -- admission --------------------------------------------------------------------------------
    async def admit(
        self, flow_id: str, priority: int, byte_size: int, ttl: float | None
    ) -> Admission:
        problem = check_admission(flow_id, priority, byte_size, ttl)
        if problem:
            raise ValueError(problem)
        await self.connect()
        loop = self.loop
        assert loop is not None
        p = _Pending(
            next(self.ids), flow_id, priority, byte_size, float(ttl or 0.0), loop.create_future()
        )
        await self.submit(p)
        try:
            return await p.future  # type: ignore[no-any-return]
        except asyncio.CancelledError:
            p.cancelled = True
            fut = p.future
            if fut.done() and not fut.cancelled():
                # The outcome arrived before our task resumed: nobody will see this admission,
                # so a dispatched one gives its unit back here.
                fut.result()._release_now()
            else:
                shard = p.shard
                if shard is not None and not shard.closed and p.id in shard.pending:
                    shard.send(codec.encode(Cancel(p.id)))
            raise

    def choose(self, p: _Pending) -> Any:
        topo = self.topology
        assert topo is not None
        candidates = [
            s
            for s in topo.shards
            if s.state == "active" and not (s.id in self.shards and self.shards[s.id].draining)
        ]
        if len(candidates) <= 1:
            return candidates[0] if candidates else None
        seg = self.segment
        if seg is None:
            self.rr += 1
            return candidates[self.rr % len(candidates)]
        w = seg.words
        layout = seg.layout
        slot = self.flow_slots.get((p.flow_id, p.priority), -1)
        self.rr += 1
        n = len(candidates)
        best = None
        best_key: tuple[int, int] | None = None
        for i in range(n):
            s = candidates[(self.rr + i) % n]
            flow_bytes = w[layout.lease(s.id, slot) + L.L_BYTES] if slot >= 0 else 0
            key = (flow_bytes, w[layout.stats_row(s.id) + L.S_LEN])
            if best_key is None or key < best_key:
                best, best_key = s, key
        return best

    async def submit(self, p: _Pending) -> None:
        """Send ``p`` to a live active shard, refreshing the topology as needed."""
        deadline = p.started + RESUBMIT_TIMEOUT
        attempt = 0
        seg, topo = self.segment, self.topology
        if seg is not None and topo is not None and seg.words[L.H_EPOCH] != topo.epoch:
            # Shards were added, drained or replaced: learn the new topology first.
            with contextlib.suppress(BandgateError, OSError):
                await self.refresh()
        while True:
            info = self.choose(p)
            if info is not None:
                try:
                    conn = await self.shard_conn(info.id, info.path)
                except OSError:
                    conn = None
                if conn is not None and not conn.closed:
                    if p.future.done():
                        return
                    ttl = p.ttl
                    if ttl > 0:
                        # A resubmitted request keeps its deadline, not a fresh ttl.
                        waited = time.monotonic() - p.started
                        ttl -= waited
                        if ttl <= 0:
                            self.finish(
                                p,
                                OutcomeCode.EVICTED_TTL,
                                f"waited longer than its ttl of {p.ttl:g}s",
                                waited,
                            )
                            return
                    p.shard = conn
                    conn.pending[p.id] = p
                    conn.send(codec.encode(Submit(p.id, p.flow_id, p.priority, p.byte_size, ttl)))
                    return
            if time.monotonic() >= deadline:
                self.finish(
                    p, OutcomeCode.EVICTED_OTHER, "no live shard could take the request", 0.0
                )
                return
            attempt += 1
            # GIE's draining retry: a short random sleep, then the topology again.
            await asyncio.sleep(min(0.001 * attempt, 0.05) * (1 + random.random()))
            try:
                await self.refresh()
            except DaemonUnavailable as exc:
                self.finish(
                    p,
                    OutcomeCode.EVICTED_OTHER,
                    f"daemon gone: {exc}",
                    time.monotonic() - p.started,
                )
                return
            except (BandgateError, OSError):
                pass

    def decided(self, shard: _ShardConn, p: _Pending, msg: Decided) -> None:
        if msg.flow_slot >= 0:
            self.flow_slots[(p.flow_id, p.priority)] = msg.flow_slot
        if msg.outcome == OutcomeCode.RETRY:
            shard.draining = True
            p.shard = None
            if not p.cancelled:
                self.spawn(self._resubmit(p))
            return
        if p.cancelled or p.future.done():
            # Its awaiting task is gone: a dispatch that crossed our Cancel is given back now.
            if msg.outcome == OutcomeCode.DISPATCHED and not shard.closed:
                shard.send(codec.encode(Release(msg.id)))
            return
        adm = self.admission_cls(
            OUTCOME_BY_CODE[msg.outcome], msg.reason, msg.queued, self, shard, msg.id
        )
        p.future.set_result(adm)

    def finish(self, p: _Pending, outcome: int, reason: str, queued: float) -> None:
        if not p.future.done():
            p.future.set_result(self.admission_cls(OUTCOME_BY_CODE[outcome], reason, queued))

    async def _resubmit(self, p: _Pending) -> None:
        with contextlib.suppress(BandgateError, OSError):
            await self.refresh()
        await self.submit(p)

    def shard_lost(self, shard: _ShardConn) -> None:
        if self.shards.get(shard.shard_id) is shard:
            del self.shards[shard.shard_id]
        pending = list(shard.pending.values())
        shard.pending.clear()
        if self.closed:
            for p in pending:
                self.finish(
                    p, OutcomeCode.EVICTED_OTHER, "client closed", time.monotonic() - p.started
                )
            return
        for p in pending:
            p.shard = None
            if not p.cancelled:
                self.spawn(self._resubmit(p))

    # -- control ----------------------------------------------------------------------------------
    async def control_request(self, msg: object) -> Any:
        await self.connect()
        assert self.control is not None
        reply = await self.control.request(msg)
        if type(reply) is ErrorReply:
            raise BandgateError(f"{reply.code}: {reply.reason}")
        return reply

    async def stats(self) -> dict[str, Any]:
        reply = await self.control_request(GetStats())
        assert type(reply) is JsonReply
        data: dict[str, Any] = json.loads(reply.body)
        data["bands"] = {int(p): band for p, band in data["bands"].items()}
        return data

    async def bands(self) -> list[dict[str, Any]]:
        reply = await self.control_request(GetBands())
        assert type(reply) is JsonReply
        result: list[dict[str, Any]] = json.loads(reply.body)
        return result

    async def ack(self, msg: object) -> None:
        reply = await self.control_request(msg)
        assert type(reply) is Ack
        if not reply.ok:
            raise ValueError(reply.reason)

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for conn in list(self.shards.values()):
            conn.close()
        if self.control is not None:
            self.control.close()
        for conn in list(self.shards.values()):
            for p in list(conn.pending.values()):
                self.finish(
                    p, OutcomeCode.EVICTED_OTHER, "client closed", time.monotonic() - p.started
                )
            conn.pending.clear()
        if self.segment is not None:
            self.segment.close()
            self.segment = None
        await asyncio.sleep(0)


def _check_priorities(priorities: Iterable[int]) -> tuple[int, ...]:
    out = tuple(priorities)
    for p in out:
        problem = check_admission("x", p, 0, None)
        if problem:
            raise ValueError(problem)
    return out


MAX_ALLOWANCE = 2**40  # the daemon refuses larger grants (runtime.coordinator.MAX_ALLOWANCE)


def _check_allowance(allowance: int) -> int:
    if type(allowance) is not int or not 0 <= allowance <= MAX_ALLOWANCE:
        raise ValueError(f"allowance must be an int in [0, {MAX_ALLOWANCE}], not {allowance!r}")
    return allowance


@final
class AsyncClient:
    """asyncio client: one instance serves many tasks at once.

    Args:
        socket_dir: the daemon's socket directory; defaults to ``BANDGATE_SOCKET_DIR``, else the
            daemon's default directory.
    """

    def __init__(self, socket_dir: str | None = None) -> None:
        self._core = _Core(socket_dir, AsyncAdmission)

    @property
    def socket_dir(self) -> str:
        return self._core.socket_dir

    async def __aenter__(self) -> AsyncClient:
        await self._core.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def admit(
        self, flow_id: str, priority: int = 0, *, byte_size: int = 0, ttl: float | None = None
    ) -> AsyncAdmission:
        """Wait for the request's outcome. Raises only ValueError (misuse) and DaemonUnavailable."""
        adm = await self._core.admit(flow_id, priority, byte_size, ttl)
        assert isinstance(adm, AsyncAdmission)
        return adm

    async def stats(self) -> dict[str, Any]:
        return await self._core.stats()

    async def bands(self) -> list[dict[str, Any]]:
        return await self._core.bands()

    async def reconcile_priorities(self, priorities: Iterable[int]) -> None:
        await self._core.ack(Reconcile(_check_priorities(priorities)))

    async def scale_shards(self, n: int) -> None:
        if type(n) is not int or n < 1:
            raise ValueError(f"shard count must be a positive int, not {n!r}")
        await self._core.ack(ScaleShards(n))

    async def report_saturation(self, allowance: int, valid_for: float) -> None:
        """Act as the external saturation source (see :meth:`Client.report_saturation`)."""
        await self._core.ack(ReportSaturation(_check_allowance(allowance), float(valid_for)))

    async def clear_saturation(self) -> None:
        """Stop the external saturation gating (see :meth:`Client.clear_saturation`)."""
        await self._core.ack(ClearSaturation())

    async def close(self) -> None:
        await self._core.close()


@final
class Client:
    """Blocking client: one instance serves many threads at once.

    It runs its connections in a private event-loop thread; calls block the caller only.
    """

    def __init__(self, socket_dir: str | None = None) -> None:
        self._core = _Core(socket_dir, Admission)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="bandgate-client", daemon=True
        )
        self._thread.start()
        self._closed = False
        try:
            self._call(self._core.connect())
        except BaseException:
            self._stop_loop()
            raise

    @property
    def socket_dir(self) -> str:
        return self._core.socket_dir

    def _call(self, coro: Any) -> Any:
        if self._closed:
            coro.close()
            raise BandgateError("client is closed")
        fut: concurrent.futures.Future[Any] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return fut.result()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def admit(
        self, flow_id: str, priority: int = 0, *, byte_size: int = 0, ttl: float | None = None
    ) -> Admission:
        """Block until the request's outcome. Raises only ValueError and DaemonUnavailable."""
        problem = check_admission(flow_id, priority, byte_size, ttl)
        if problem:
            raise ValueError(problem)
        adm: Admission = self._call(self._core.admit(flow_id, priority, byte_size, ttl))
        return adm

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call(self._core.stats())
        return result

    def bands(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call(self._core.bands())
        return result

    def reconcile_priorities(self, priorities: Iterable[int]) -> None:
        self._call(self._core.ack(Reconcile(_check_priorities(priorities))))

    def scale_shards(self, n: int) -> None:
        if type(n) is not int or n < 1:
            raise ValueError(f"shard count must be a positive int, not {n!r}")
        self._call(self._core.ack(ScaleShards(n)))

    def report_saturation(self, allowance: int, valid_for: float) -> None:
        """Act as the external saturation source (the gateway's backend-metrics detector).

        From now on the daemon dispatches at most ``allowance`` more requests (over all shards)
        and none once ``valid_for`` seconds pass without a newer report: stale fails closed.
        """
        self._call(self._core.ack(ReportSaturation(_check_allowance(allowance), float(valid_for))))

    def clear_saturation(self) -> None:
        """The saturation source is going away on purpose: gate by the budget alone again."""
        self._call(self._core.ack(ClearSaturation()))

    def close(self) -> None:
        if self._closed:
            return
        with contextlib.suppress(Exception):
            self._call(self._core.close())
        self._closed = True
        self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()
