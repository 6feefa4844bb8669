"""Shard scaling at run time: ``bandgate shards scale N`` and ``Client.scale_shards(n)``.

A shard taken out drains: it accepts no new request (clients move them to active shards without
an error), keeps dispatching its queue, and is removed once empty and with no unit outstanding.
Priority, capacity and leases stay correct throughout.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import psutil
import pytest

from runtime import Client, Outcome
from tests.conftest import ROOT, wait_until
from tests.helpers import (
    admit_release,
    assert_budget_intact,
    assert_quiet,
    shutdown,
)

pytestmark = pytest.mark.integration

OUTCOME_BOUND = 10.0


# -- helpers (kept local: each test module stands alone) --------------------------------------


def states(c: Client) -> dict[int, str]:
    return {s["id"]: s["state"] for s in c.stats()["shards"]}


def n_active(c: Client) -> int:
    return sum(state == "active" for state in states(c).values())


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# -- tests ------------------------------------------------------------------------------------
def test_scale_2_3_1_under_load_loses_nothing(start_daemon, soak):
    """Mixed load while scaling 2 -> 3 -> 1 -> 2: every request gets exactly one outcome, the
    expected one; queues, units and leases all come back to zero."""
    rounds = 4 if soak else 1
    d = start_daemon(
        SHARDS=2,
        MAX_INFLIGHT=4,
        FLOW_GC_TIMEOUT="200ms",
        BAND_GC_TIMEOUT="400ms",
        GC_INTERVAL="20ms",
    )
    stop = threading.Event()
    outcomes: Counter[str] = Counter()
    unexpected: list[Any] = []
    sent = Counter[str]()
    lock = threading.Lock()

    def worker(k: int) -> None:
        rng = random.Random(k)
        try:
            with d.client() as cc:
                while not stop.is_set():
                    flow = f"tenant-{rng.randrange(6)}"
                    prio = rng.choice((0, 0, 5, 10))
                    size = rng.randrange(0, 4096)
                    with lock:
                        sent["n"] += 1
                    adm = cc.admit(flow, prio, byte_size=size, ttl=30.0)
                    if adm.dispatched:
                        time.sleep(rng.random() * 0.003)
                    adm.release()
                    with lock:
                        outcomes[adm.outcome.value] += 1
                        if adm.outcome is not Outcome.DISPATCHED:
                            unexpected.append((flow, prio, adm.outcome, adm.reason))
        except BaseException as exc:
            with lock:
                unexpected.append(exc)

    def done() -> int:
        with lock:
            return outcomes.total()

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    removed_pids: list[int] = []
    try:
        with d.client() as c:
            for _ in range(rounds):
                for target in (3, 1, 2):
                    before = {s["id"]: s["pid"] for s in c.stats()["shards"]}
                    done_at = done()
                    c.scale_shards(target)
                    wait_until(
                        lambda t=target: (
                            (s := states(c))
                            and list(s.values()).count("active") == t
                            and "draining" not in s.values()
                            and "starting" not in s.values()
                        ),
                        timeout=15,
                        what=f"{target} active shards and no draining one",
                    )
                    after = {s["id"] for s in c.stats()["shards"]}
                    removed_pids += [pid for sid, pid in before.items() if sid not in after]
                    # The load kept flowing across the change.
                    wait_until(lambda n=done_at: done() >= n + 50, what="load still served")
    finally:
        stop.set()
        for t in threads:
            t.join(OUTCOME_BOUND)
    assert not any(t.is_alive() for t in threads), "a client is stuck in admit()"
    assert not unexpected, unexpected[:10]
    assert outcomes.total() == sent["n"] and set(outcomes) == {"dispatched"}
    for pid in removed_pids:
        assert wait_until(lambda p=pid: gone(p), timeout=5, what=f"drained shard {pid} exit")
    with d.client() as c:
        assert_quiet(c)
        st = c.stats()
        assert st["restarts"] == {"shard_restarts": 0, "gc_restarts": 0}
        assert sorted(s["id"] for s in st["shards"]) == [0, 1]
        # Every lease was dropped: GC can collect every flow and band.
        wait_until(
            lambda: (s := c.stats())["flows"] == 0 and not s["bands"],
            what="all flows and bands collected",
        )
        assert_budget_intact(c, 4)
    shutdown(d)


def test_draining_shard_keeps_dispatching_in_priority_order(start_daemon):
    """The draining shard's queue is served (after higher bands elsewhere), new requests go to
    active shards, and the shard is removed only once empty and with no unit outstanding."""
    d = start_daemon(SHARDS=2, MAX_INFLIGHT=1)
    order: list[str] = []
    order_lock = threading.Lock()

    def ordered(c: Client, name: str, flow: str, prio: int) -> Outcome:
        adm = c.admit(flow, prio, byte_size=100)
        with order_lock:
            order.append(name)
        adm.release()
        return adm.outcome

    with d.client() as c, ThreadPoolExecutor(16) as pool:
        holder = c.admit("holder", 0)
        assert holder.dispatched
        futs: list[Future[Outcome]] = []
        for i in range(6):
            futs.append(pool.submit(ordered, c, f"low-{i}", f"low-{i % 2}", 0))
            wait_until(lambda n=i + 1: c.stats()["len"] == n, what=f"{i + 1} low queued")
        lens = {s["id"]: s["len"] for s in c.stats()["shards"]}
        assert lens[0] > 0 and lens[1] > 0, lens
        draining_len = lens[1]
        c.scale_shards(1)
        wait_until(lambda: states(c) == {0: "active", 1: "draining"}, what="shard 1 draining")
        pid1 = next(s["pid"] for s in c.stats()["shards"] if s["id"] == 1)
        # New requests (high priority) go to the active shard only.
        for i in range(4):
            futs.append(pool.submit(ordered, c, f"high-{i}", "high", 10))
        wait_until(lambda: c.stats()["len"] == 10, what="high queued")
        st = c.stats()
        by_id = {s["id"]: s for s in st["shards"]}
        assert by_id[1]["len"] == draining_len
        assert by_id[0]["len"] == 10 - draining_len
        assert st["bands"][10]["len"] == 4
        # The draining shard holds queued items: it is not removed.
        time.sleep(0.2)
        assert states(c) == {0: "active", 1: "draining"}
        holder.release()
        results = [f.result(timeout=OUTCOME_BOUND) for f in futs]
        assert results == [Outcome.DISPATCHED] * 10
        assert sorted(order[:4]) == [f"high-{i}" for i in range(4)], order
        assert sorted(order[4:]) == [f"low-{i}" for i in range(6)], order
        wait_until(lambda: states(c) == {0: "active"}, what="drained shard removed")
        wait_until(lambda: gone(pid1), timeout=5, what="drained shard process exit")
        assert_quiet(c)
        assert_budget_intact(c, 1)
    shutdown(d)


def test_draining_shard_waits_for_outstanding_units(start_daemon):
    d = start_daemon(SHARDS=2, MAX_INFLIGHT=4)
    with d.client() as c:
        held = []
        while True:  # hold units until one is on shard 1
            held.append(c.admit(f"h{len(held)}", 0))
            assert held[-1].dispatched
            if {s["id"]: s["inflight"] for s in c.stats()["shards"]}[1]:
                break
            assert len(held) < 4
        c.scale_shards(1)
        wait_until(lambda: states(c) == {0: "active", 1: "draining"}, what="shard 1 draining")
        # New work still flows, on shard 0, while shard 1 waits for its unit.
        for i in range(20):
            assert admit_release(c, f"new-{i}", 0) == (Outcome.DISPATCHED, "")
        assert states(c) == {0: "active", 1: "draining"}
        assert next(s for s in c.stats()["shards"] if s["id"] == 1)["dispatched"] == 1
        for a in held:
            a.release()
        wait_until(lambda: states(c) == {0: "active"}, what="drained shard removed")
        assert_quiet(c)
        assert_budget_intact(c, 4)
    shutdown(d)


def test_capacity_is_global_across_scaling(start_daemon):
    """A band's byte limit counts every shard, draining ones included."""
    d = start_daemon(SHARDS=2, MAX_INFLIGHT=1, BAND_MAX_BYTES=1000)
    with d.client() as c, ThreadPoolExecutor(8) as pool:
        holder = c.admit("holder", 1)
        assert holder.dispatched
        futs = []
        for i in range(4):
            futs.append(pool.submit(admit_release, c, f"f{i % 2}", 0, byte_size=200))
            wait_until(lambda n=i + 1: c.stats()["len"] == n, what="queued")
        assert all(s["bytes"] > 0 for s in c.stats()["shards"])
        c.scale_shards(1)
        wait_until(lambda: states(c) == {0: "active", 1: "draining"}, what="shard 1 draining")
        # 800 of 1000 bytes queued across both shards: 200 fit, 201 do not.
        futs.append(pool.submit(admit_release, c, "f0", 0, byte_size=200))
        wait_until(lambda: c.stats()["bands"][0]["bytes"] == 1000, what="band full")
        over = c.admit("f1", 0, byte_size=1)
        assert over.outcome is Outcome.REJECTED_CAPACITY, over
        holder.release()
        assert [f.result(timeout=OUTCOME_BOUND) for f in futs] == [(Outcome.DISPATCHED, "")] * 5
        wait_until(lambda: states(c) == {0: "active"}, what="drained shard removed")
        assert_quiet(c)
    shutdown(d)


def test_scale_down_while_new_shards_start(start_daemon):
    d = start_daemon(SHARDS=1, MAX_INFLIGHT=2)
    with d.client() as c:
        c.scale_shards(3)
        c.scale_shards(1)  # shards 1 and 2 have not said hello yet
        wait_until(
            lambda: "starting" not in states(c).values(), timeout=15, what="new shards started"
        )
        wait_until(lambda: states(c) == {0: "active"}, timeout=3, what="only shard 0 left")
        assert admit_release(c, "x", 0) == (Outcome.DISPATCHED, "")
    shutdown(d)


def test_scale_bounds_and_cli(start_daemon):
    d = start_daemon(SHARDS=1, MAX_SHARDS=3, MAX_INFLIGHT=2)

    def cli(*args: str, env_dir: bool = False) -> subprocess.CompletedProcess[str]:
        """``bandgate shards ...``, given the directory by option or by BANDGATE_SOCKET_DIR."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("BANDGATE_")}
        argv = [sys.executable, "-m", "runtime", "shards"]
        if env_dir:
            env["BANDGATE_SOCKET_DIR"] = d.socket_dir
        else:
            argv += ["--socket-dir", d.socket_dir]
        return subprocess.run(
            argv + list(args), cwd=ROOT, env=env, capture_output=True, text=True, timeout=30
        )

    with d.client() as c:
        with pytest.raises(ValueError, match="between 1 and 3"):
            c.scale_shards(4)
        with pytest.raises(ValueError, match="positive int"):
            c.scale_shards(0)
        assert states(c) == {0: "active"}
        r = cli("scale", "3", env_dir=True)
        assert r.returncode == 0, r.stderr
        wait_until(lambda: states(c) == {0: "active", 1: "active", 2: "active"}, what="3 active")
        r = cli("scale", "9")
        assert r.returncode != 0 and "between 1 and 3" in r.stderr, r
        r = cli("scale", "1")
        assert r.returncode == 0, r.stderr
        wait_until(lambda: states(c) == {0: "active"}, what="back to one shard")
        r = cli()
        assert r.returncode == 0 and r.stdout.split()[:2] == ["shard", "0"], r
        assert admit_release(c, "x", 0) == (Outcome.DISPATCHED, "")
        assert_budget_intact(c, 2)
    shutdown(d)


def test_scale_back_up_reuses_nothing_stale(start_daemon):
    """Down then up again: new shards start with clean rows; stats and leases stay exact."""
    d = start_daemon(SHARDS=3, MAX_INFLIGHT=2)
    with d.client() as c:
        for i in range(30):
            assert admit_release(c, f"w{i % 5}", i % 3, byte_size=10) == (Outcome.DISPATCHED, "")
        c.scale_shards(1)
        wait_until(lambda: states(c) == {0: "active"}, what="scaled down")
        c.scale_shards(3)
        wait_until(lambda: list(states(c).values()) == ["active"] * 3, what="scaled up")
        for s in c.stats()["shards"]:
            if s["id"]:
                assert (s["len"], s["bytes"], s["inflight"], s["dispatched"]) == (0, 0, 0, 0), s
        for i in range(30):
            assert admit_release(c, f"w{i % 5}", i % 3, byte_size=10) == (Outcome.DISPATCHED, "")
        assert_quiet(c)
        assert_budget_intact(c, 2)
    shutdown(d)
