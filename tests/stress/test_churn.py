"""Churn: 200,000 distinct flow ids through the daemon; flow table and memory come back."""

from __future__ import annotations

import asyncio
import gc as pygc

import psutil
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.stress, pytest.mark.timeout(400)]


def daemon_rss(pids: list[int]) -> int:
    """Resident memory of the daemon's processes, shared-memory pages counted once per process."""
    return sum(psutil.Process(pid).memory_info().rss for pid in pids)


def test_two_hundred_thousand_flows_leave_no_trace(start_daemon, soak):
    flows = 1_000_000 if soak else 200_000
    d = start_daemon(
        SHARDS=2,
        MAX_FLOWS=65536,
        FLOW_GC_TIMEOUT="50ms",
        BAND_GC_TIMEOUT="100ms",
        GC_INTERVAL="10ms",
        BANDS="churn:0",
        LOG_LEVEL="WARNING",
    )

    async def scenario() -> dict[str, int]:
        async with d.async_client() as c:
            stats = await c.stats()
            pids = [stats["pid"], stats["gc_pid"], *(s["pid"] for s in stats["shards"])]
            # warm-up: a few requests so every process has loaded its code paths
            for i in range(200):
                await (await c.admit(f"warm-{i}", 0)).release()
            while (await c.stats())["flows"]:
                await asyncio.sleep(0.05)
            before = daemon_rss(pids)
            todo = iter(range(flows))
            outcomes = {"dispatched": 0, "other": 0}

            async def worker() -> None:
                for i in todo:
                    adm = await c.admit(f"churn-{i}", 0, byte_size=100)
                    outcomes["dispatched" if adm.dispatched else "other"] += 1
                    await adm.release()

            peak_flows = 0

            async def watch() -> None:
                nonlocal peak_flows
                while True:
                    peak_flows = max(peak_flows, (await c.stats())["flows"])
                    await asyncio.sleep(0.2)

            watcher = asyncio.ensure_future(watch())
            await asyncio.gather(*(worker() for _ in range(64)))
            watcher.cancel()
            for _ in range(600):
                if (await c.stats())["flows"] == 0:
                    break
                await asyncio.sleep(0.05)
            final = await c.stats()
            after = daemon_rss(pids)
            return {
                "dispatched": outcomes["dispatched"],
                "other": outcomes["other"],
                "flows_left": final["flows"],
                "flows_removed": final["gc"]["flows_removed"],
                "peak_flows": peak_flows,
                "rss_before": before,
                "rss_after": after,
            }

    result = asyncio.run(scenario())
    pygc.collect()
    print(f"churn: {result}")
    assert result["dispatched"] == flows and result["other"] == 0
    assert result["flows_left"] == 0
    assert result["flows_removed"] >= flows
    assert result["rss_after"] <= result["rss_before"] * 1.10, result
