"""Fault injection: kill -9 of shards, the GC process, the coordinator and clients.

A fault in one process must cost at most the requests that process held: never the daemon, never
a hang, never a leaked concurrency unit. Every test ends by checking the budget is exactly intact
(``limit`` units can be held at once and not one more).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import pytest

from runtime import BandgateError, Client, DaemonUnavailable, Outcome
from tests.conftest import ROOT, shm_objects, wait_until
from tests.helpers import (
    admit_release,
    assert_budget_intact,
    assert_quiet,
    running,
    shutdown,
)

pytestmark = pytest.mark.integration

# Liveness bounds (not speed assertions): generous for a loaded 2-core machine. A client waiting
# on a killed shard must get its outcome "within a second or two": we allow KILL_BOUND.
OUTCOME_BOUND = 10.0
KILL_BOUND = 5.0


def shard_pids(c: Client) -> dict[int, int]:
    return {s["id"]: s["pid"] for s in c.stats()["shards"]}


def active_shards(c: Client) -> dict[int, int]:
    return {s["id"]: s["pid"] for s in c.stats()["shards"] if s["state"] == "active"}


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_gone(procs: list[psutil.Process], timeout: float = 5.0) -> None:
    """Every process in ``procs`` exits within ``timeout`` (no orphans)."""
    deadline = time.monotonic() + timeout
    while still := [p for p in procs if running(p)]:
        if time.monotonic() > deadline:
            pytest.fail(f"processes still alive after {timeout}s: {still}")
        time.sleep(0.02)


def wait_queued(c: Client, n: int) -> None:
    wait_until(lambda: c.stats()["len"] >= n, what=f"{n} requests queued")


# -- shards -----------------------------------------------------------------------------------
def test_kill_shard_with_waiting_clients(start_daemon):
    """Waiters on the killed shard are re-queued elsewhere; the shard is replaced; budget intact."""
    d = start_daemon(SHARDS=2, MAX_INFLIGHT=2)
    with d.client() as c, ThreadPoolExecutor(16) as pool:
        held = [c.admit("holder", 5) for _ in range(2)]
        assert all(a.dispatched for a in held)
        futs = [pool.submit(admit_release, c, f"waiter-{i % 4}", i % 3) for i in range(12)]
        wait_queued(c, 12)
        before = c.stats()
        victim = max(before["shards"], key=lambda s: s["len"])
        assert victim["len"] > 0
        os.kill(victim["pid"], signal.SIGKILL)
        for a in held:
            a.release()  # a no-op for a unit held on the dead shard: the coordinator returns it
        deadline = time.monotonic() + KILL_BOUND
        results = [f.result(timeout=max(0.1, deadline - time.monotonic())) for f in futs]
        assert results == [(Outcome.DISPATCHED, "")] * 12
        wait_until(
            lambda: active_shards(c).get(victim["id"], victim["pid"]) != victim["pid"],
            what="replacement shard active",
        )
        st = c.stats()
        assert st["restarts"]["shard_restarts"] == 1
        assert not alive(victim["pid"])
        assert len(active_shards(c)) == 2
        assert_quiet(c)
        assert_budget_intact(c, 2)
    assert f"shard-{victim['id']} killed by SIGKILL" in d.log()
    shutdown(d)


def test_kill_only_shard_returns_its_units(start_daemon):
    """Units the dead shard had dispatched come back; its waiters run on the replacement."""
    d = start_daemon(SHARDS=1, MAX_INFLIGHT=3)
    with d.client() as c, ThreadPoolExecutor(8) as pool:
        held = [c.admit("holder", 0, byte_size=10) for _ in range(3)]
        assert all(a.dispatched for a in held)
        futs = [pool.submit(admit_release, c, "waiter", 0, byte_size=7) for _ in range(4)]
        wait_queued(c, 4)
        (pid,) = shard_pids(c).values()
        os.kill(pid, signal.SIGKILL)
        # The holders never release: the waiters can only run on the units the coordinator
        # returned for the dead shard (and on the replacement, the only shard).
        deadline = time.monotonic() + KILL_BOUND
        results = [f.result(timeout=max(0.1, deadline - time.monotonic())) for f in futs]
        assert results == [(Outcome.DISPATCHED, "")] * 4
        for a in held:
            a.release()  # no-op: their shard is gone
        new = wait_until(lambda: active_shards(c).get(0, pid) != pid and active_shards(c))
        assert new[0] != pid
        assert c.stats()["restarts"]["shard_restarts"] == 1
        assert_quiet(c)
        assert_budget_intact(c, 3)
    assert "returned 3 budget units of dead shard=0" in d.log()
    shutdown(d)


def test_kill_shard_capacity_and_leases_stay_right(start_daemon):
    """The dead shard's queued bytes stop counting at once (its rows are cleared), the re-queued
    requests count once, and every lease it held is gone (GC collects every flow afterwards)."""
    d = start_daemon(
        SHARDS=2,
        MAX_INFLIGHT=1,
        BAND_MAX_BYTES=1000,
        FLOW_GC_TIMEOUT="200ms",
        BAND_GC_TIMEOUT="400ms",
        GC_INTERVAL="20ms",
    )
    with d.client() as c, ThreadPoolExecutor(8) as pool:
        holder = c.admit("holder", 1)
        assert holder.dispatched
        keeper = next(s for s in c.stats()["shards"] if s["inflight"] == 1)
        futs = []
        for i in range(4):
            futs.append(pool.submit(admit_release, c, f"cap-{i}", 0, byte_size=200))
            wait_queued(c, i + 1)
        by_id = {s["id"]: s for s in c.stats()["shards"]}
        victim = next(s for s in by_id.values() if s["id"] != keeper["id"])
        assert victim["len"] > 0 and victim["bytes"] == 200 * victim["len"], by_id
        os.kill(victim["pid"], signal.SIGKILL)
        # The victim's waiters come back on a live shard (the keeper, or the replacement) and
        # still wait: the budget's only unit is held on the keeper.
        wait_until(
            lambda: active_shards(c).get(victim["id"], victim["pid"]) != victim["pid"],
            what="replacement shard active",
        )
        wait_until(
            lambda: (s := c.stats())["len"] == 4 and s["bands"][0]["bytes"] == 800,
            what="the four requests queued again, counted once",
        )
        assert not any(f.done() for f in futs)
        # 800 of 1000 bytes queued: 200 more fit, 1 byte over does not.
        futs.append(pool.submit(admit_release, c, "cap-fit", 0, byte_size=200))
        wait_until(lambda: c.stats()["bands"][0]["bytes"] == 1000, what="band exactly full")
        over = c.admit("cap-over", 0, byte_size=1)
        assert over.outcome is Outcome.REJECTED_CAPACITY, over
        holder.release()
        deadline = time.monotonic() + OUTCOME_BOUND
        results = [f.result(timeout=max(0.1, deadline - time.monotonic())) for f in futs]
        assert results == [(Outcome.DISPATCHED, "")] * 5
        assert_quiet(c)
        wait_until(
            lambda: (s := c.stats())["flows"] == 0 and not s["bands"],
            what="every flow collected: no lease of the dead shard survived",
        )
        assert_budget_intact(c, 1)
    shutdown(d)


def test_requeued_request_keeps_its_deadline(start_daemon):
    """A request moved off a dead shard still expires ``ttl`` after it was admitted."""
    d = start_daemon(SHARDS=2, MAX_INFLIGHT=1)
    ttl = 2.0
    with d.client() as c, ThreadPoolExecutor(4) as pool:
        holder = c.admit("holder", 1)
        keeper = next(s for s in c.stats()["shards"] if s["inflight"] == 1)
        victim_id = 1 - keeper["id"]

        def timed_admit() -> tuple[Any, float]:
            t0 = time.monotonic()
            adm = c.admit("ttl-flow", 0, ttl=ttl)
            return adm, time.monotonic() - t0

        futs = []
        while not any(s["len"] for s in c.stats()["shards"] if s["id"] == victim_id):
            futs.append(pool.submit(timed_admit))
            wait_queued(c, len(futs))
            assert len(futs) < 6
        time.sleep(ttl * 0.6)
        os.kill(shard_pids(c)[victim_id], signal.SIGKILL)
        for f in futs:
            adm, waited = f.result(timeout=OUTCOME_BOUND)
            assert adm.outcome is Outcome.EVICTED_TTL, adm
            # Liveness bound with a wide margin: a fresh TTL would end near 1.6 x ttl.
            assert waited < ttl + 0.75, f"expired after {waited:.2f}s for a ttl of {ttl}s"
        holder.release()
    shutdown(d)


def test_kill_draining_shard(start_daemon):
    """A draining shard that dies is not replaced; its waiters move to an active shard."""
    d = start_daemon(SHARDS=2, MAX_INFLIGHT=1)
    with d.client() as c, ThreadPoolExecutor(8) as pool:
        holder = c.admit("holder", 0)
        assert holder.dispatched
        futs: list[Future[tuple[Outcome, str]]] = []
        for i in range(8):
            futs.append(pool.submit(admit_release, c, "waiter", 0))
            wait_queued(c, i + 1)
        lens = {s["id"]: s["len"] for s in c.stats()["shards"]}
        assert lens[1] > 0, lens
        c.scale_shards(1)
        wait_until(
            lambda: [s["state"] for s in c.stats()["shards"]] == ["active", "draining"],
            what="shard 1 draining",
        )
        pid1 = shard_pids(c)[1]
        os.kill(pid1, signal.SIGKILL)
        wait_until(lambda: list(shard_pids(c)) == [0], what="dead draining shard gone")
        holder.release()
        deadline = time.monotonic() + KILL_BOUND
        results = [f.result(timeout=max(0.1, deadline - time.monotonic())) for f in futs]
        assert results == [(Outcome.DISPATCHED, "")] * 8
        st = c.stats()
        assert st["restarts"]["shard_restarts"] == 0
        assert [s["id"] for s in st["shards"]] == [0]
        assert_quiet(c)
        assert_budget_intact(c, 1)
    shutdown(d)


def test_crash_loop_stops_daemon(start_daemon):
    """A shard that dies at every start makes the daemon stop with a clear error."""
    d = start_daemon(SHARDS=1, MAX_INFLIGHT=2)
    killed: list[int] = []
    with d.client() as c:
        deadline = time.monotonic() + 15
        while d.proc.poll() is None and time.monotonic() < deadline:
            try:
                pids = shard_pids(c)
            except BandgateError:  # DaemonUnavailable, or a request racing the final teardown
                break
            pid = pids.get(0)
            if pid is not None and pid not in killed:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.005)
    wait_until(lambda: d.proc.poll() is not None, timeout=15, what="daemon to give up")
    assert d.proc.returncode == 3, d.log()[-2000:]
    assert 3 <= len(killed) <= 4, killed
    assert "shard-0 keeps crashing at start" in d.log()
    assert "failed to start" not in d.log()
    wait_gone(d.children)
    for pid in killed:
        assert not alive(pid)
    with pytest.raises(DaemonUnavailable):
        Client(d.socket_dir)


# -- clients ----------------------------------------------------------------------------------
CLIENT_SCRIPT = textwrap.dedent(
    """
    import sys, threading
    from runtime import Client
    c = Client(sys.argv[1])
    held = [c.admit("doomed", 0) for _ in range(int(sys.argv[2]))]
    assert all(a.dispatched for a in held), held
    for _ in range(3):
        threading.Thread(target=c.admit, args=("doomed-wait", 0), daemon=True).start()
    print("held", flush=True)
    threading.Event().wait()
    """
)


def test_killed_client_returns_its_units(start_daemon):
    d = start_daemon(SHARDS=2, MAX_INFLIGHT=3)
    proc = subprocess.Popen(
        [sys.executable, "-c", CLIENT_SCRIPT, d.socket_dir, "3"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "held"
        with d.client() as c:
            wait_until(lambda: c.stats()["len"] == 3, what="the doomed client's waiters queued")
            assert c.stats()["inflight"] == 3
            proc.kill()
            proc.wait(5)
            wait_until(lambda: c.stats()["len"] == 0, what="waiters withdrawn")
            assert_quiet(c)
            assert_budget_intact(c, 3)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        if proc.stdout is not None:
            proc.stdout.close()
    shutdown(d)


# -- GC ---------------------------------------------------------------------------------------
def test_kill_gc_resumes_and_collects_once(start_daemon):
    """GC killed mid-stream: a new one takes over, every flow and band is removed exactly once."""
    d = start_daemon(
        SHARDS=2,
        MAX_INFLIGHT=4,
        FLOW_GC_TIMEOUT="100ms",
        BAND_GC_TIMEOUT="200ms",
        GC_INTERVAL="20ms",
    )
    created: list[tuple[str, int]] = []
    stop = threading.Event()
    errors: list[BaseException] = []

    def churn() -> None:
        try:
            with d.client() as cc:
                i = 0
                while not stop.is_set():
                    flow, prio = f"gc-flow-{i}", 10 + i % 5
                    out = admit_release(cc, flow, prio)
                    assert out == (Outcome.DISPATCHED, ""), out
                    created.append((flow, prio))
                    i += 1
                    time.sleep(0.002)
        except BaseException as exc:
            errors.append(exc)

    with d.client() as c:
        gc_pid = c.stats()["gc_pid"]
        t = threading.Thread(target=churn)
        t.start()
        try:
            wait_until(lambda: c.stats()["gc"]["flows_removed"] >= 20, what="GC removing flows")
            os.kill(gc_pid, signal.SIGKILL)
            new_gc = wait_until(
                lambda: (p := c.stats()["gc_pid"]) not in (None, gc_pid) and p,
                what="GC replaced",
            )
            removed_at_restart = c.stats()["gc"]["flows_removed"]
            wait_until(
                lambda: c.stats()["gc"]["flows_removed"] >= removed_at_restart + 20,
                what="the new GC removing flows",
            )
        finally:
            stop.set()
            t.join(10)
        assert not errors, errors
        n = len(created)
        assert len(set(created)) == n
        wait_until(
            lambda: (st := c.stats())["flows"] == 0 and not st["bands"],
            timeout=10,
            what="every flow and band collected",
        )
        st = c.stats()
        assert st["restarts"]["gc_restarts"] == 1
        assert st["gc_pid"] == new_gc
        assert st["gc"]["flows_removed"] == n, (st["gc"], n)
        assert st["gc"]["bands_removed"] == 5, st["gc"]
        assert not alive(gc_pid)
        # A collected flow and band come back on use.
        assert admit_release(c, "gc-flow-0", 10) == (Outcome.DISPATCHED, "")
        assert_budget_intact(c, 4)
    shutdown(d)


# -- coordinator ------------------------------------------------------------------------------
def lock_run_id(socket_dir: str) -> str:
    return Path(socket_dir, "bandgate.lock").read_text().split()[1]


def test_kill_coordinator_no_orphans_and_restart(start_daemon):
    d = start_daemon(SHARDS=2, MAX_INFLIGHT=1)
    old_run = lock_run_id(d.socket_dir)
    old_objects = {o for o in shm_objects() if old_run in o}
    assert len(old_objects) == 2, old_objects
    c = d.client()
    pool = ThreadPoolExecutor(4)
    try:
        holder = c.admit("holder", 0)
        assert holder.dispatched
        waiters = [pool.submit(admit_release, c, "waiter", 0) for _ in range(3)]
        wait_queued(c, 3)
        st = c.stats()
        # Two shards, the GC and multiprocess' resource tracker.
        children = [psutil.Process(p) for p in d.all_pids() - {d.pid}]
        assert {s["pid"] for s in st["shards"]} | {st["gc_pid"]} <= {p.pid for p in children}
        os.kill(d.pid, signal.SIGKILL)
        d.proc.wait(5)
        wait_gone(children)
        # Waiting clients get an outcome, never a hang: evicted_other as the shards stop (or,
        # if a stopping shard returned the holder's unit first, dispatched by another one).
        deadline = time.monotonic() + 15
        for f in waiters:
            outcome, reason = f.result(timeout=max(0.1, deadline - time.monotonic()))
            assert outcome in (Outcome.EVICTED_OTHER, Outcome.DISPATCHED), (outcome, reason)
        holder.release()
    finally:
        c.close()
        pool.shutdown(wait=False, cancel_futures=True)

    d2 = start_daemon(socket_dir=d.socket_dir, SHARDS=2, MAX_INFLIGHT=1)
    assert not {o for o in shm_objects() if old_run in o}, "the dead daemon's objects were left"
    new_run = lock_run_id(d.socket_dir)
    assert new_run != old_run
    with d2.client() as c2:
        assert admit_release(c2, "after-restart", 0) == (Outcome.DISPATCHED, "")
        assert_budget_intact(c2, 1)
    assert "removed leftovers of a dead daemon" in d2.log()
    shutdown(d2)
    assert not {o for o in shm_objects() if old_run in o or new_run in o}
    assert sorted(os.listdir(d.socket_dir)) == []


def test_restart_while_an_old_shard_lingers(start_daemon):
    """A straggler of the dead daemon (here: stopped while its coordinator is killed, resumed
    once the new daemon runs) must not break the new daemon on the same directory."""
    d = start_daemon(SHARDS=1, MAX_INFLIGHT=2)
    with d.client() as c:
        old = psutil.Process(shard_pids(c)[0])
    os.kill(old.pid, signal.SIGSTOP)
    try:
        os.kill(d.pid, signal.SIGKILL)
        d.proc.wait(5)
        d2 = start_daemon(socket_dir=d.socket_dir, SHARDS=1, MAX_INFLIGHT=2)
    finally:
        os.kill(old.pid, signal.SIGCONT)
    try:
        wait_gone([old])  # it stops now: its coordinator is gone
        socks = sorted(n for n in os.listdir(d.socket_dir) if n.endswith(".sock"))
        assert socks == ["control.sock", "internal.sock", "shard-0.sock", "wake-0.sock"]
        with d2.client() as c2:
            assert admit_release(c2, "after-straggler", 0) == (Outcome.DISPATCHED, "")
    finally:
        # Stop it here: the fixture checks the first daemon's directory, which this one shares.
        shutdown(d2)


def test_second_daemon_refused(start_daemon):
    d = start_daemon(SHARDS=1, MAX_INFLIGHT=2)
    with d.client() as c:  # connected before the second daemon starts (see the next test)
        second = start_daemon(wait=False, socket_dir=d.socket_dir, SHARDS=1, MAX_INFLIGHT=2)
        assert second.proc.wait(15) == 5
        assert f"another bandgate daemon (pid {d.pid}) is running on {d.socket_dir}" in second.log()
        assert d.proc.poll() is None
        st = c.stats()
        assert (
            st["pid"] == d.pid
            and len(st["shards"]) == 1
            and st["restarts"]
            == {
                "shard_restarts": 0,
                "gc_restarts": 0,
            }
        )
    shutdown(d)


def test_second_daemon_leaves_first_intact(start_daemon):
    d = start_daemon(SHARDS=1, MAX_INFLIGHT=2)
    socks = sorted(n for n in os.listdir(d.socket_dir) if n.endswith(".sock"))
    second = start_daemon(wait=False, socket_dir=d.socket_dir, SHARDS=1, MAX_INFLIGHT=2)
    assert second.proc.wait(15) == 5
    assert sorted(n for n in os.listdir(d.socket_dir) if n.endswith(".sock")) == socks
    assert Path(d.socket_dir, "bandgate.lock").exists()
    with d.client() as c:  # a new client still finds the first daemon
        assert admit_release(c, "still-here", 0) == (Outcome.DISPATCHED, "")
    shutdown(d)
