"""Core behaviour of a real daemon through the client library (and raw shard connections).

Every test starts its own daemon with the ``start_daemon`` fixture, which stops it and checks that
no process, shared-memory object or socket file is left behind. Orderings are asserted through
events (the order in which admissions return while the budget is one unit and every waiter
releases right after recording), never through wall-clock time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from ipc import codec
from ipc.framing import HEADER, frame
from ipc.messages import Decided, GetStats, JsonReply, OutcomeCode, Release, Submit
from runtime import (
    Admission,
    AsyncAdmission,
    AsyncClient,
    BandgateError,
    Client,
    DaemonUnavailable,
    Outcome,
)
from tests.conftest import ROOT, wait_until

pytestmark = pytest.mark.integration

JOIN_TIMEOUT = 20.0


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def queued(c: Client) -> int:
    return int(c.stats()["len"])


def wait_queued(c: Client, n: int, what: str = "") -> None:
    wait_until(lambda: queued(c) == n, what=what or f"{n} requests queued")


class Recorder:
    """Admissions in threads of one Client; each records its label when its admit returns.

    A dispatched waiter releases its unit right after recording, so with a budget of one unit the
    recorded order is the dispatch order.
    """

    def __init__(self, client: Client) -> None:
        self.client = client
        self.order: list[str] = []
        self.results: dict[str, Admission] = {}
        self.errors: list[BaseException] = []
        self.lock = threading.Lock()
        self.threads: list[threading.Thread] = []

    def start(self, label: str, flow_id: str, priority: int = 0, **kw: Any) -> None:
        def run() -> None:
            try:
                adm = self.client.admit(flow_id, priority, **kw)
            except BaseException as exc:
                with self.lock:
                    self.errors.append(exc)
                return
            with self.lock:
                assert label not in self.results, f"two outcomes for {label}"
                self.order.append(label)
                self.results[label] = adm
            adm.release()

        t = threading.Thread(target=run, name=f"admit-{label}", daemon=True)
        t.start()
        self.threads.append(t)

    def join(self, timeout: float = JOIN_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in self.threads if t.is_alive()]
        assert not alive, f"admissions still waiting: {alive}; order so far {self.order}"
        assert not self.errors, self.errors


class RawShard:
    """A hand-driven connection to one shard socket (no library, no shard choice)."""

    def __init__(self, socket_dir: str, shard_id: int) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(os.path.join(socket_dir, f"shard-{shard_id}.sock"))
        self.buf = b""
        self.send_lock = threading.Lock()

    def send(self, msg: object) -> None:
        with self.send_lock:
            self.sock.sendall(frame(codec.encode(msg)))

    def recv(self, timeout: float = 15.0) -> object | None:
        """The next message, or None at EOF."""
        self.sock.settimeout(timeout)
        while True:
            if len(self.buf) >= 4:
                (size,) = HEADER.unpack_from(self.buf)
                if len(self.buf) >= 4 + size:
                    data = self.buf[4 : 4 + size]
                    self.buf = self.buf[4 + size :]
                    return codec.shard_to_client(data)
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.buf += chunk

    def close(self) -> None:
        self.sock.close()


# ---------------------------------------------------------------------------------------------
# client API
# ---------------------------------------------------------------------------------------------


def test_stats_document_shape(start_daemon):
    d = start_daemon(SHARDS=2, MAX_INFLIGHT=3, BANDS="hi:10,lo:0")
    with d.client() as c:
        s = c.stats()
        for key in ("len", "bytes", "inflight", "flows", "bands", "shards"):
            assert key in s, key
        assert (s["len"], s["bytes"], s["inflight"], s["flows"]) == (0, 0, 0, 0)
        assert set(s["bands"]) == {10, 0}
        assert all(type(p) is int for p in s["bands"])
        hi, lo = s["bands"][10], s["bands"][0]
        assert (hi["name"], lo["name"]) == ("hi", "lo")
        for band in (hi, lo):
            assert band["static"] is True
            assert (band["len"], band["bytes"], band["flows"]) == (0, 0, 0)
            assert band["capacity_bytes"] == 1_000_000_000
        assert [sh["id"] for sh in s["shards"]] == [0, 1]
        for sh in s["shards"]:
            assert sh["state"] == "active"
            assert sh["pid"] in d.all_pids()
            assert (sh["len"], sh["bytes"]) == (0, 0)

        a = c.admit("tenant", 10, byte_size=7)
        assert a.dispatched
        s = c.stats()
        assert s["inflight"] == 1 and s["flows"] == 1
        assert s["bands"][10]["flows"] == 1 and s["bands"][10]["dispatched"] == 1
        # a dynamic band appears on first use, from the default template
        b = c.admit("tenant", 5, byte_size=1)
        s = c.stats()
        assert s["bands"][5]["static"] is False and s["bands"][5]["flows"] == 1
        assert s["flows"] == 2 and s["inflight"] == 2
        a.release()
        b.release()
        wait_until(lambda: c.stats()["inflight"] == 0, what="inflight back to 0")
        # on the wire (and in `bandgate stats --json`) it is plain JSON: priority keys are strings
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(os.path.join(d.socket_dir, "control.sock"))
            sock.sendall(frame(codec.encode(GetStats())))
            sock.settimeout(10)
            buf = b""
            while len(buf) < 4 or len(buf) < 4 + HEADER.unpack_from(buf)[0]:
                chunk = sock.recv(65536)
                assert chunk, "control socket closed without a reply"
                buf += chunk
        finally:
            sock.close()
        reply = codec.from_coordinator(buf[4:])
        assert type(reply) is JsonReply
        assert set(json.loads(reply.body)["bands"]) == {"10", "5", "0"}


def test_admit_waits_for_release_and_admission_api(start_daemon):
    d = start_daemon(SHARDS=2, MAX_INFLIGHT=1)
    with Client(d.socket_dir) as c:
        assert c.socket_dir == d.socket_dir
        first = c.admit("a", 0)
        assert isinstance(first, Admission)
        assert first.outcome is Outcome.DISPATCHED and first.outcome == "dispatched"
        assert first.dispatched is True and first.reason == ""
        assert isinstance(first.queued_seconds, float) and first.queued_seconds >= 0
        got = threading.Event()
        result: list[Admission] = []

        def second() -> None:
            result.append(c.admit("b", 0))
            got.set()

        t = threading.Thread(target=second, daemon=True)
        t.start()
        wait_queued(c, 1, "second request queued behind the held unit")
        assert not got.is_set(), "second admit returned while the only unit was held"
        assert c.stats()["inflight"] == 1
        first.release()
        assert got.wait(JOIN_TIMEOUT), "second admit never dispatched after release"
        t.join(5)
        b = result[0]
        assert b.dispatched and b.queued_seconds > 0
        s = c.stats()
        assert s["inflight"] == 1 and s["len"] == 0
        # release is idempotent: a second call must not free a phantom unit
        first.release()
        first.release()
        b.release()
        b.release()
        wait_until(lambda: c.stats()["inflight"] == 0, what="unit returned")
        with c.admit("c", 0) as held:
            assert held.dispatched
            rec = Recorder(c)
            rec.start("w1", "w", 0)
            wait_queued(c, 1)
            rec.start("w2", "w", 0)
            wait_queued(c, 2, "two waiters: the budget is still exactly one unit")
        # leaving the with-block released the unit: both waiters get it in turn (the client put
        # them on different shards, so their order is not defined)
        rec.join()
        assert sorted(rec.order) == ["w1", "w2"]
        wait_until(lambda: c.stats()["inflight"] == 0, what="inflight 0")


def test_client_close_withdraws_waiting_and_rejects_later_use(start_daemon):
    d = start_daemon(SHARDS=1, MAX_INFLIGHT=1)
    with d.client() as observer:
        holder_client = Client(d.socket_dir)
        held = holder_client.admit("hold", 0)
        assert held.dispatched
        waiter = Client(d.socket_dir)
        rec = Recorder(waiter)
        rec.start("w", "flow-w", 0, byte_size=10)
        wait_queued(observer, 1)
        waiter.close()
        waiter.close()  # idempotent
        rec.join()
        adm = rec.results["w"]
        assert adm.outcome is Outcome.EVICTED_OTHER and not adm.dispatched
        # the daemon withdrew it: queue empty, bytes freed
        wait_until(lambda: observer.stats()["len"] == 0, what="withdrawn")
        assert observer.stats()["bytes"] == 0
        with pytest.raises(BandgateError):
            waiter.admit("x", 0)
        # the same with an AsyncClient: close() ends its waiting tasks with evicted_other

        async def run() -> None:
            ac = AsyncClient(d.socket_dir)
            task = asyncio.ensure_future(ac.admit("flow-a", 0, byte_size=20))

            async def is_queued() -> bool:
                return observer.stats()["len"] == 1

            await _await_until(is_queued, what="async waiter queued")
            await ac.close()
            await ac.close()  # idempotent
            adm = await asyncio.wait_for(task, JOIN_TIMEOUT)
            assert isinstance(adm, AsyncAdmission)
            assert adm.outcome is Outcome.EVICTED_OTHER and not adm.dispatched
            with pytest.raises(BandgateError):
                await ac.admit("x", 0)

        asyncio.run(run())
        wait_until(lambda: observer.stats()["len"] == 0, what="async waiter withdrawn")
        assert observer.stats()["bytes"] == 0
        holder_client.close()  # closing returns the held unit
        wait_until(lambda: observer.stats()["inflight"] == 0, what="unit returned on close")
        again = observer.admit("again", 0)
        assert again.dispatched
        again.release()


INVALID_ADMISSIONS: list[tuple[tuple[Any, ...], dict[str, Any], str]] = [
    (("",), {}, "flow_id"),
    (("é" * 600,), {}, "flow_id"),  # 600 characters, 1200 bytes of UTF-8
    (("x" * 1025,), {}, "flow_id"),
    ((b"bytes-id",), {}, "flow_id"),
    ((None,), {}, "flow_id"),
    (("f", 2**31), {}, "priority"),
    (("f", -(2**31) - 1), {}, "priority"),
    (("f", 2**40), {}, "priority"),
    (("f", 1.0), {}, "priority"),
    (("f", "1"), {}, "priority"),
    (("f", True), {}, "priority"),  # bool is not an int here (runtime/validation.py)
    (("f", 0), {"byte_size": -1}, "byte_size"),
    (("f", 0), {"byte_size": 1.5}, "byte_size"),
    (("f", 0), {"byte_size": False}, "byte_size"),
    (("f", 0), {"byte_size": 2**63}, "byte_size"),
    (("f", 0), {"ttl": 0}, "ttl"),
    (("f", 0), {"ttl": -1.0}, "ttl"),
    (("f", 0), {"ttl": float("nan")}, "ttl"),
    (("f", 0), {"ttl": float("inf")}, "ttl"),
    (("f", 0), {"ttl": True}, "ttl"),
    (("f", 0), {"ttl": "1"}, "ttl"),
]


def test_argument_validation(start_daemon, monkeypatch):
    d = start_daemon(SHARDS=1, MAX_INFLIGHT=0)
    monkeypatch.setenv("BANDGATE_SOCKET_DIR", d.socket_dir)
    with Client() as c:  # the socket directory from the environment
        assert c.socket_dir == d.socket_dir
        for args, kwargs, needle in INVALID_ADMISSIONS:
            with pytest.raises(ValueError, match=needle):
                c.admit(*args, **kwargs)
        # nothing reached the daemon, and the client is still usable
        s = c.stats()
        assert s["len"] == 0 and s["inflight"] == 0 and s["flows"] == 0
        for flow_id, priority, kw in [
            ("é" * 512, 0, {}),  # exactly 1024 bytes of UTF-8
            ("x" * 1024, 0, {}),
            ("f", 2**31 - 1, {}),
            ("f", -(2**31), {}),
            ("f", 0, {"byte_size": 0, "ttl": 1}),
            ("f", 0, {"ttl": 0.001}),
            ("unicode-ß-🚀", 3, {"byte_size": 10}),
        ]:
            a = c.admit(flow_id, priority, **kw)
            assert a.outcome is Outcome.DISPATCHED, (flow_id[:10], priority, kw, a)
            a.release()

    async def run() -> None:
        assert AsyncClient().socket_dir == d.socket_dir
        async with AsyncClient(d.socket_dir) as ac:
            for args, kwargs, needle in INVALID_ADMISSIONS:
                with pytest.raises(ValueError, match=needle):
                    await ac.admit(*args, **kwargs)
            adm = await ac.admit("valid", 0)
            assert adm.dispatched
            await adm.release()

    asyncio.run(run())


def test_flow_id_without_utf8_encoding_is_a_clear_value_error(start_daemon):
    d = start_daemon(SHARDS=1, MAX_INFLIGHT=0)
    with d.client() as c:
        with pytest.raises(ValueError, match="flow_id"):
            c.admit("bad-\ud800", 0)
        # the failed call left nothing behind: no request pending in the client
        assert not any(conn.pending for conn in c._core.shards.values())
        assert c.admit("valid", 0).dispatched


def test_daemon_unavailable(tmp_path):
    empty = str(tmp_path)
    with pytest.raises(DaemonUnavailable):
        Client(empty)
    with pytest.raises(DaemonUnavailable):
        Client(str(tmp_path / "does-not-exist"))

    async def run() -> None:
        ac = AsyncClient(empty)
        with pytest.raises(DaemonUnavailable):
            await ac.admit("f", 0)
        with pytest.raises(DaemonUnavailable):
            await ac.stats()
        await ac.close()
        with pytest.raises(DaemonUnavailable):
            async with AsyncClient(empty):
                pass

    asyncio.run(run())


def test_shutdown_evicts_waiting_requests_then_daemon_unavailable(start_daemon):
    d = start_daemon(SHARDS=2, MAX_INFLIGHT=1)
    with d.client() as c:
        holder = c.admit("holder", 0)
        rec = Recorder(c)
        for i in range(4):
            rec.start(f"w{i}", f"flow-{i}", i % 2, byte_size=10)
            wait_queued(c, i + 1)
        assert d.stop() == 0
        rec.join()
        assert len(rec.results) == 4
        for label, adm in rec.results.items():
            assert adm.outcome is Outcome.EVICTED_OTHER, (label, adm)
            assert "shutting down" in adm.reason, adm.reason
        holder.release()  # the daemon is gone: a no-op, never an error
        with pytest.raises(DaemonUnavailable):
            c.admit("f", 0)
        with pytest.raises(DaemonUnavailable):
            c.stats()


# ---------------------------------------------------------------------------------------------
# strict priority
# ---------------------------------------------------------------------------------------------


def test_strict_priority_one_shard(start_daemon):
    d = start_daemon(SHARDS=1, MAX_INFLIGHT=1, BANDS="hi:10,lo:0")
    with d.client() as c:
        holder = c.admit("holder", 0)
        assert holder.dispatched
        rec = Recorder(c)
        n = 0
        for i in range(4):
            rec.start(f"lo{i}", f"low-{i % 2}", 0, byte_size=3)
            n += 1
            wait_queued(c, n)
        for i in range(4):
            rec.start(f"hi{i}", f"high-{i % 2}", 10, byte_size=5)
            n += 1
            wait_queued(c, n)
        s = c.stats()
        assert s["bands"][0]["len"] == 4 and s["bands"][10]["len"] == 4
        assert s["bytes"] == 4 * 3 + 4 * 5
        holder.release()
        rec.join()
        assert [x[:2] for x in rec.order] == ["hi"] * 4 + ["lo"] * 4, rec.order
        # FCFS inside each band under global-strict fairness
        assert rec.order == [f"hi{i}" for i in range(4)] + [f"lo{i}" for i in range(4)]
        assert all(a.dispatched for a in rec.results.values())


def test_strict_priority_across_two_shards(start_daemon):
    """Low requests wait on shard 0, high ones on shard 1: no low dispatch while a high waits."""
    d = start_daemon(SHARDS=2, MAX_INFLIGHT=1, BANDS="hi:10,lo:0")
    with d.client() as c:
        holder = c.admit("holder", 5)
        assert holder.dispatched
        low, high = RawShard(d.socket_dir, 0), RawShard(d.socket_dir, 1)
        order: list[str] = []
        lock = threading.Lock()
        labels: dict[tuple[int, int], str] = {}
        outcomes: dict[str, int] = {}
        n_low = n_high = 6

        def reader(conn: RawShard, shard: int, expected: int) -> None:
            for _ in range(expected):
                msg = conn.recv()
                if msg is None:
                    return
                assert type(msg) is Decided
                label = labels[(shard, msg.id)]
                with lock:
                    order.append(label)
                    outcomes[label] = msg.outcome
                if msg.outcome == OutcomeCode.DISPATCHED:
                    conn.send(Release(msg.id))

        try:
            n = 0
            for i in range(n_low):
                labels[(0, i + 1)] = f"lo{i}"
                low.send(Submit(i + 1, f"low-{i % 3}", 0, 10, 0.0))
                n += 1
                wait_queued(c, n)
            for i in range(n_high):
                labels[(1, i + 1)] = f"hi{i}"
                high.send(Submit(i + 1, f"high-{i % 3}", 10, 10, 0.0))
                n += 1
                wait_queued(c, n)
            shards = {sh["id"]: sh for sh in c.stats()["shards"]}
            assert shards[0]["len"] == n_low and shards[1]["len"] == n_high
            threads = [
                threading.Thread(target=reader, args=(low, 0, n_low), daemon=True),
                threading.Thread(target=reader, args=(high, 1, n_high), daemon=True),
            ]
            for t in threads:
                t.start()
            holder.release()
            for t in threads:
                t.join(JOIN_TIMEOUT)
            assert not any(t.is_alive() for t in threads), f"stuck; order so far {order}"
        finally:
            low.close()
            high.close()
        assert all(o == OutcomeCode.DISPATCHED for o in outcomes.values()), outcomes
        assert [x[:2] for x in order] == ["hi"] * n_high + ["lo"] * n_low, order
        wait_until(lambda: c.stats()["inflight"] == 0, what="inflight 0")
    # Through the library, a burst of new flows is spread over both shards (fewest queued items
    # first); still every high request goes before every low one.
    with d.client() as c:
        holder = c.admit("holder", 10)
        rec = Recorder(c)
        n = 0
        for i in range(8):
            rec.start(f"lo{i}", f"low-{i}", 0)
            n += 1
            wait_queued(c, n)
        for i in range(8):
            rec.start(f"hi{i}", f"high-{i}", 10)
            n += 1
            wait_queued(c, n)
        rows = c.stats()["shards"]
        assert all(r["len"] > 0 for r in rows), f"burst not spread over both shards: {rows}"
        holder.release()
        rec.join()
        assert [x[:2] for x in rec.order] == ["hi"] * 8 + ["lo"] * 8, rec.order


# ---------------------------------------------------------------------------------------------
# ordering within a flow, fairness between flows
# ---------------------------------------------------------------------------------------------


def _queue_a6_b2(c: Client) -> list[str]:
    holder = c.admit("holder", 100)  # another band, dispatched at once
    assert holder.dispatched
    rec = Recorder(c)
    n = 0
    for i in range(6):
        rec.start(f"a{i}", "a", 0)
        n += 1
        wait_queued(c, n)
    for i in range(2):
        rec.start(f"b{i}", "b", 0)
        n += 1
        wait_queued(c, n)
    holder.release()
    rec.join()
    return [x[0] for x in rec.order]


def test_fcfs_and_global_strict(start_daemon):
    d = start_daemon(SHARDS=1, MAX_INFLIGHT=1)  # defaults: fcfs ordering, global-strict fairness
    with d.client() as c:
        # FCFS within a flow: queued order is dispatch order, whatever the deadlines
        holder = c.admit("holder", 50)
        rec = Recorder(c)
        ttls = [None, 60.0, 20.0, None, 40.0, 30.0, None, 10.0]
        for i, ttl in enumerate(ttls):
            rec.start(str(i), "one-flow", 0, byte_size=i, ttl=ttl)
            wait_queued(c, i + 1)
        holder.release()
        rec.join()
        assert rec.order == [str(i) for i in range(len(ttls))]
        # global-strict: a band of FCFS flows is one FIFO (A x6 then B x2)
        assert _queue_a6_b2(c) == list("aaaaaabb")


def test_round_robin_fairness_alternates(start_daemon):
    d = start_daemon(SHARDS=1, MAX_INFLIGHT=1, FAIRNESS="round-robin")
    with d.client() as c:
        order = _queue_a6_b2(c)
    assert order == list("ababaaaa"), order


def test_edf_shorter_deadline_first(start_daemon):
    d = start_daemon(SHARDS=1, MAX_INFLIGHT=1, ORDERING="edf")
    with d.client() as c:
        holder = c.admit("holder", 9)
        rec = Recorder(c)
        plan = [("none", None), ("t60", 60.0), ("t20", 20.0), ("t40", 40.0), ("t30", 30.0)]
        for i, (label, ttl) in enumerate(plan):
            rec.start(label, "one-flow", 0, ttl=ttl)
            wait_queued(c, i + 1)
        holder.release()
        rec.join()
        assert rec.order == ["t20", "t30", "t40", "t60", "none"]


# ---------------------------------------------------------------------------------------------
# capacity
# ---------------------------------------------------------------------------------------------


def test_band_capacity_counted_across_shards(start_daemon):
    d = start_daemon(SHARDS=2, MAX_INFLIGHT=1, BAND_MAX_BYTES=1000)
    with d.client() as c:
        holder = c.admit("holder", 7)
        assert holder.dispatched
        first, second = RawShard(d.socket_dir, 0), RawShard(d.socket_dir, 1)
        try:
            first.send(Submit(1, "tenant", 0, 600, 0.0))
            wait_queued(c, 1)
            second.send(Submit(1, "tenant", 0, 600, 0.0))
            msg = second.recv()
            assert type(msg) is Decided and msg.id == 1
            assert msg.outcome == OutcomeCode.REJECTED_CAPACITY, msg
            assert "1000" in msg.reason and "limit" in msg.reason, msg.reason
            assert "BANDGATE_BAND_MAX_BYTES" in msg.reason
            # a 400-byte one fits exactly (1000 <= 1000) on the other shard
            second.send(Submit(2, "tenant", 0, 400, 0.0))
            wait_queued(c, 2, "400-byte request admitted")
            s = c.stats()
            assert s["bytes"] == 1000 and s["bands"][0]["bytes"] == 1000
            assert [r["bytes"] for r in s["shards"]] == [600, 400]
            # one more byte anywhere is over the limit
            first.send(Submit(2, "tenant", 0, 1, 0.0))
            msg = first.recv()
            assert type(msg) is Decided and msg.id == 2
            assert msg.outcome == OutcomeCode.REJECTED_CAPACITY
            # a zero-byte request is never over a byte limit
            first.send(Submit(3, "tenant", 0, 0, 0.0))
            wait_queued(c, 3, "zero-byte request admitted")
            # another band has its own limit
            first.send(Submit(4, "other", 1, 900, 0.0))
            wait_queued(c, 4, "900 bytes in another band admitted")
        finally:
            first.close()
            second.close()
        wait_until(lambda: c.stats()["len"] == 0, what="closed connections withdraw requests")
        assert c.stats()["bytes"] == 0
        holder.release()
    # The same through the library: it sends the second 600 bytes of the flow to the shard
    # where the flow queues fewest bytes, i.e. the other one.
    with d.client() as c:
        holder = c.admit("tenant", 0)  # teaches the client the flow's slot
        rec = Recorder(c)
        rec.start("big", "tenant", 0, byte_size=600)
        wait_queued(c, 1)
        over = c.admit("tenant", 0, byte_size=600)
        assert over.outcome is Outcome.REJECTED_CAPACITY and not over.dispatched
        assert "limit" in over.reason and "1000" in over.reason
        over.release()  # no-op for a rejection
        fits = Recorder(c)
        fits.start("small", "tenant", 0, byte_size=400)
        wait_queued(c, 2)
        s = c.stats()
        assert sorted(r["bytes"] for r in s["shards"]) == [400, 600], s["shards"]
        holder.release()
        rec.join()
        fits.join()
        assert rec.results["big"].dispatched and fits.results["small"].dispatched


def test_global_max_bytes(start_daemon):
    d = start_daemon(SHARDS=2, MAX_INFLIGHT=1, MAX_BYTES=1000)
    with d.client() as c:
        holder = c.admit("holder", 9)
        rec = Recorder(c)
        rec.start("p5", "x", 5, byte_size=600)
        wait_queued(c, 1)
        over = c.admit("y", 3, byte_size=600)  # another band, another flow: global limit only
        assert over.outcome is Outcome.REJECTED_CAPACITY
        assert "BANDGATE_MAX_BYTES" in over.reason and "1000" in over.reason
        rec.start("p3", "y", 3, byte_size=400)
        wait_queued(c, 2)
        assert c.stats()["bytes"] == 1000
        holder.release()
        rec.join()
        assert rec.order == ["p5", "p3"]


_BURST_SCRIPT = r"""
import asyncio, sys
from runtime import AsyncClient, Outcome

socket_dir, tag, n, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])

async def main():
    async with AsyncClient(socket_dir) as c:
        await c.stats()
        print("connected", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)

        async def one(i):
            adm = await c.admit(f"{tag}-{i % 4}", 0, byte_size=size)
            print(adm.outcome.value, flush=True)

        await asyncio.gather(*(one(i) for i in range(n)))

asyncio.run(main())
"""


def _spawn_python(script: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", script, *args],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _kill(proc: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    proc.wait(10)
    for f in (proc.stdin, proc.stdout, proc.stderr):
        if f is not None:
            with contextlib.suppress(OSError):
                f.close()


def test_capacity_overshoot_at_most_one_request_per_other_shard(start_daemon):
    limit, size, per_proc, shards = 2000, 100, 120, 2
    d = start_daemon(SHARDS=shards, MAX_INFLIGHT=1, BAND_MAX_BYTES=limit)
    with d.client() as c:
        holder = c.admit("holder", 1)  # nothing in band 0 can dispatch: admitted == queued
        procs = [
            _spawn_python(_BURST_SCRIPT, d.socket_dir, t, str(per_proc), str(size)) for t in "pq"
        ]
        outcomes: list[str] = []
        lock = threading.Lock()

        def read(p: subprocess.Popen[str]) -> None:
            assert p.stdout is not None
            for line in p.stdout:
                with lock:
                    outcomes.append(line.strip())

        try:
            for p in procs:
                assert p.stdout is not None
                line = p.stdout.readline()
                assert line.strip() == "connected", (line, p.stderr.read() if p.poll() else "")
            readers = [threading.Thread(target=read, args=(p,), daemon=True) for p in procs]
            for t in readers:
                t.start()
            for p in procs:
                assert p.stdin is not None
                p.stdin.write("go\n")
                p.stdin.flush()

            def settled() -> bool:
                with lock:
                    rejected = outcomes.count("rejected_capacity")
                    others = [o for o in outcomes if o != "rejected_capacity"]
                assert not others, others  # nothing dispatches, nothing else may happen
                return rejected + queued(c) == 2 * per_proc

            wait_until(settled, timeout=30, what="every request queued or rejected")
            s = c.stats()
            admitted = s["bands"][0]["len"]
            assert s["bands"][0]["bytes"] == admitted * size
            assert admitted * size <= limit + (shards - 1) * size, s
            # nor under-used: a request is rejected only when the limit is really reached
            assert admitted * size >= limit, s
        finally:
            for p in procs:
                _kill(p)
        wait_until(lambda: c.stats()["len"] == 0, what="killed clients' requests withdrawn")
        assert c.stats()["bytes"] == 0
        holder.release()


# ---------------------------------------------------------------------------------------------
# TTL
# ---------------------------------------------------------------------------------------------


def test_ttl_eviction_frees_bytes_at_once(start_daemon):
    d = start_daemon(SHARDS=2, MAX_INFLIGHT=1)
    with d.client() as c:
        holder = c.admit("holder", 0)
        adm = c.admit("t", 0, byte_size=123, ttl=0.3)
        assert adm.outcome is Outcome.EVICTED_TTL and not adm.dispatched
        assert 0.3 <= adm.queued_seconds < 0.3 + 2.0, adm
        assert "ttl" in adm.reason
        # the shard takes it out of the queue before it answers: no wait needed
        s = c.stats()
        assert s["len"] == 0 and s["bytes"] == 0 and s["bands"][0]["bytes"] == 0
        assert sum(r["bytes"] for r in s["shards"]) == 0
        assert s["inflight"] == 1
        holder.release()
        wait_until(lambda: c.stats()["inflight"] == 0, what="inflight 0")
        # the expired request never took the unit
        assert c.stats()["bands"][0]["dispatched"] == 1
    # a ttl bounds the wait in the queue, not the time a dispatched request holds its unit
    with d.client() as c:
        a = c.admit("t", 0, ttl=0.2)
        assert a.dispatched
        rec = Recorder(c)
        rec.start("w", "w", 0, ttl=30)
        wait_queued(c, 1)
        # the dispatched one holds its unit past its ttl: still in flight
        time.sleep(0.4)
        assert c.stats()["inflight"] == 1
        a.release()
        rec.join()
        assert rec.results["w"].dispatched


def test_default_ttl_applies_when_ttl_is_none(start_daemon):
    d = start_daemon(SHARDS=1, MAX_INFLIGHT=1, DEFAULT_TTL="300ms")
    with d.client() as c:
        holder = c.admit("holder", 0)
        adm = c.admit("t", 0, byte_size=5)
        assert adm.outcome is Outcome.EVICTED_TTL
        assert 0.3 <= adm.queued_seconds < 0.3 + 2.0
        # an explicit ttl overrides the default
        rec = Recorder(c)
        rec.start("long", "t", 0, ttl=60)
        wait_queued(c, 1)
        time.sleep(0.6)  # twice the default ttl: it must still be queued
        assert queued(c) == 1
        holder.release()
        rec.join()
        assert rec.results["long"].dispatched


# ---------------------------------------------------------------------------------------------
# async cancellation
# ---------------------------------------------------------------------------------------------


async def _await_until(pred: Callable[[], Any], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not await pred():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


def test_async_cancel_withdraws_request(start_daemon):
    d = start_daemon(SHARDS=2, MAX_INFLIGHT=1)

    async def run() -> None:
        async with AsyncClient(d.socket_dir) as c:
            holder = await c.admit("holder", 0)
            assert isinstance(holder, AsyncAdmission) and holder.dispatched
            task = asyncio.ensure_future(c.admit("victim", 0, byte_size=77))

            async def is_queued() -> bool:
                return (await c.stats())["len"] == 1

            await _await_until(is_queued, what="victim queued")
            assert (await c.stats())["bytes"] == 77
            before = (await c.stats())["bands"][0]["dispatched"]
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

            async def withdrawn() -> bool:
                s = await c.stats()
                return s["len"] == 0 and s["bytes"] == 0

            await _await_until(withdrawn, what="cancelled request leaves the queue")
            await holder.release()
            await holder.release()

            async def idle() -> bool:
                return (await c.stats())["inflight"] == 0

            await _await_until(idle, what="unit returned")
            # a fresh admit gets the unit: the cancelled one was never dispatched
            fresh = await c.admit("fresh", 0)
            assert fresh.dispatched
            s = await c.stats()
            assert s["bands"][0]["dispatched"] == before + 1
            assert s["inflight"] == 1
            async with fresh:
                pass
            await _await_until(idle, what="unit returned by async context manager")

    asyncio.run(run())

    # Cancel waiters right after the unit is released: the shard dispatches one of them before
    # its Cancel arrives (the dispatch crosses the Cancel on the wire), and the client must give
    # that unit back itself. No unit may leak.
    async def run2() -> None:
        async with AsyncClient(d.socket_dir) as c:
            for _ in range(5):
                holders = [await c.admit("h", 0)]
                tasks = [asyncio.ensure_future(c.admit(f"v{i}", 0)) for i in range(20)]

                async def all_queued() -> bool:
                    return (await c.stats())["len"] == 20

                await _await_until(all_queued, what="20 queued")
                for h in holders:
                    await h.release()
                await asyncio.sleep(0)
                for t in tasks:
                    t.cancel()
                results = await asyncio.gather(*tasks, return_exceptions=True)
                for r in results:
                    if isinstance(r, AsyncAdmission):
                        await r.release()
                    else:
                        assert isinstance(r, asyncio.CancelledError), r

                async def drained() -> bool:
                    s = await c.stats()
                    return s["len"] == 0 and s["inflight"] == 0

                await _await_until(drained, what="queue empty and every unit back")
            # the budget is intact
            a = await c.admit("x", 0)
            assert a.dispatched
            await a.release()

    asyncio.run(run2())


def test_async_cancel_after_outcome_arrived_returns_unit(start_daemon):
    """Cancel tasks whose Decided(dispatched) has arrived but which have not resumed yet.

    The task raises CancelledError, so nobody will ever see (or release) its admission: the
    client must give the unit back itself, or the budget shrinks for good.
    """
    d = start_daemon(SHARDS=1, MAX_INFLIGHT=2)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        async with AsyncClient(d.socket_dir) as c:
            holders = [await c.admit("h", 0), await c.admit("h", 0)]
            tasks = [asyncio.ensure_future(c.admit(f"v{i}", 0)) for i in range(2)]

            async def both_queued() -> bool:
                return (await c.stats())["len"] == 2

            await _await_until(both_queued, what="2 queued")
            for h in holders:
                await h.release()
            await asyncio.sleep(0)  # the Release frames are written
            # Block the loop so both Decided(dispatched) frames wait in our socket buffer.
            time.sleep(0.5)
            cancelled = loop.create_future()

            def cancel_all() -> None:
                for t in tasks:
                    t.cancel()
                cancelled.set_result(None)

            # Runs in the next loop turn, after the reader has handed both outcomes to their
            # futures and before the admit tasks resume.
            loop.call_soon(loop.call_soon, cancel_all)
            await cancelled
            results = await asyncio.gather(*tasks, return_exceptions=True)
            for r in results:
                if isinstance(r, AsyncAdmission):
                    await r.release()  # had the outcome been delivered, we release it

            async def budget_back() -> bool:
                s = await c.stats()
                return s["inflight"] == 0 and s["len"] == 0

            await _await_until(
                budget_back, timeout=5, what="units of cancelled-but-dispatched admissions"
            )
            a, b = await c.admit("x", 0), await c.admit("y", 0)
            assert a.dispatched and b.dispatched
            await a.release()
            await b.release()

    asyncio.run(run())


# ---------------------------------------------------------------------------------------------
# a killed client returns its units and withdraws its queued requests
# ---------------------------------------------------------------------------------------------


_HOLDER_SCRIPT = r"""
import sys, threading, time
from runtime import Client

c = Client(sys.argv[1])
held = [c.admit("victim", 0), c.admit("victim", 0)]
assert all(a.dispatched for a in held), held
threading.Thread(target=lambda: c.admit("victim-q", 0, byte_size=50), daemon=True).start()
while c.stats()["len"] < 1:
    time.sleep(0.01)
print("holding", flush=True)
time.sleep(600)
"""


def test_killed_client_returns_units_and_withdraws(start_daemon):
    d = start_daemon(SHARDS=2, MAX_INFLIGHT=2)
    with d.client() as c:
        proc = _spawn_python(_HOLDER_SCRIPT, d.socket_dir)
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line.strip() == "holding", line
            s = c.stats()
            assert s["inflight"] == 2 and s["len"] == 1 and s["bytes"] == 50
            rec = Recorder(c)
            rec.start("mine", "survivor", 0)
            wait_queued(c, 2)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
            rec.join()
            assert rec.results["mine"].dispatched
            wait_until(lambda: c.stats()["inflight"] == 0, what="dead client's units returned")
            s = c.stats()
            assert s["len"] == 0 and s["bytes"] == 0
            # both units are usable again
            a, b = c.admit("x", 0), c.admit("y", 0)
            assert a.dispatched and b.dispatched
            a.release()
            b.release()
        finally:
            _kill(proc)


# ---------------------------------------------------------------------------------------------
# many concurrent callers on one client
# ---------------------------------------------------------------------------------------------


def test_many_concurrent_callers(start_daemon):
    limit = 4
    d = start_daemon(SHARDS=2, MAX_INFLIGHT=limit, BANDS="hi:10,lo:0")
    n_threads, per_thread = 16, 50
    with d.client() as c:
        counts: list[dict[str, int]] = [{} for _ in range(n_threads)]
        errors: list[BaseException] = []
        held_now = held_peak = 0
        lock = threading.Lock()

        def worker(k: int) -> None:
            nonlocal held_now, held_peak
            try:
                for i in range(per_thread):
                    adm = c.admit(f"flow-{k % 5}", 10 if i % 2 else 0, byte_size=i)
                    counts[k][adm.outcome.value] = counts[k].get(adm.outcome.value, 0) + 1
                    with lock:
                        held_now += 1
                        held_peak = max(held_peak, held_now)
                    time.sleep(0.0005)
                    with lock:
                        held_now -= 1
                    adm.release()
            except BaseException as exc:
                errors.append(exc)

        threads = [
            threading.Thread(target=worker, args=(k,), daemon=True) for k in range(n_threads)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads)
        assert not errors, errors
        for k in range(n_threads):
            assert counts[k] == {"dispatched": per_thread}, (k, counts[k])
        # nobody ever holds more units than the budget has
        assert held_peak <= limit, held_peak
        wait_until(lambda: c.stats()["inflight"] == 0, what="every unit returned")
        s = c.stats()
        total = n_threads * per_thread
        assert s["bands"][10]["dispatched"] + s["bands"][0]["dispatched"] == total
        assert sum(r["dispatched"] for r in s["shards"]) == total
        assert s["len"] == 0 and s["bytes"] == 0

    # 500 concurrent tasks on one AsyncClient
    n = 500

    async def run() -> None:
        async with AsyncClient(d.socket_dir) as ac:
            peak = inflight = 0

            async def one(i: int) -> str:
                nonlocal peak, inflight
                adm = await ac.admit(f"flow-{i % 7}", i % 3, byte_size=i)
                if adm.dispatched:
                    inflight += 1
                    peak = max(peak, inflight)
                    await asyncio.sleep(0)
                    inflight -= 1
                    await adm.release()
                return adm.outcome.value

            before = sum(b["dispatched"] for b in (await ac.stats())["bands"].values())
            outcomes = await asyncio.gather(*(one(i) for i in range(n)))
            assert outcomes == ["dispatched"] * n
            assert peak <= limit

            async def idle() -> bool:
                return (await ac.stats())["inflight"] == 0

            await _await_until(idle, what="every unit returned")
            s = await ac.stats()
            assert sum(b["dispatched"] for b in s["bands"].values()) == before + n
            assert s["len"] == 0 and s["bytes"] == 0

    asyncio.run(run())
