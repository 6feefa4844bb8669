"""Helpers shared by the fault and scaling tests (client-side probes of a live daemon)."""

from __future__ import annotations

import contextlib
from typing import Any

import psutil

from runtime import Client, Outcome
from tests.conftest import wait_until


def admit_release(c: Client, flow: str, priority: int = 0, **kw: Any) -> tuple[Outcome, str]:
    """Admit, give the unit straight back, and report the outcome."""
    adm = c.admit(flow, priority, **kw)
    adm.release()
    return adm.outcome, adm.reason


def assert_budget_intact(c: Client, limit: int) -> None:
    """Exactly ``limit`` units are free: that many dispatch at once, one more waits."""
    wait_until(lambda: c.stats()["inflight"] == 0, what="inflight back to 0")
    held = [c.admit("budget-probe", 1000, ttl=5.0) for _ in range(limit)]
    try:
        assert [a.outcome for a in held] == [Outcome.DISPATCHED] * limit, [a.reason for a in held]
        extra = c.admit("budget-probe", 1000, ttl=0.3)
        extra.release()
        assert extra.outcome is Outcome.EVICTED_TTL, f"budget over-returned: {extra!r}"
    finally:
        for a in held:
            a.release()
    wait_until(lambda: c.stats()["inflight"] == 0, what="inflight back to 0")


def assert_quiet(c: Client) -> None:
    """Nothing queued, nothing in flight (a Release is asynchronous: wait for the last ones)."""
    wait_until(
        lambda: (s := c.stats())["len"] == 0 and s["bytes"] == 0 and s["inflight"] == 0,
        what="queues empty and every unit released",
    )
    st = c.stats()
    for prio, band in st["bands"].items():
        assert (band["len"], band["bytes"]) == (0, 0), (prio, band)
    for shard in st["shards"]:
        assert (shard["len"], shard["bytes"], shard["inflight"]) == (0, 0, 0), shard


def running(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def procs_of(d: Any) -> list[psutil.Process]:
    """The daemon's processes now and those it had at start (that still exist)."""
    out = []
    for pid in d.all_pids() | {c.pid for c in d.children}:
        with contextlib.suppress(psutil.NoSuchProcess):
            out.append(psutil.Process(pid))
    return out


def shutdown(d: Any) -> None:
    """SIGTERM: the daemon exits 0 and every one of its processes is gone within 5 s."""
    procs = procs_of(d)
    assert d.stop() == 0, d.log_path.read_text(errors="replace")[-3000:]
    wait_until(
        lambda: not [p for p in procs if running(p)], timeout=5, what="every daemon process gone"
    )
