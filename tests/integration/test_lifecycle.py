"""Lifecycle end to end: JIT flows and bands, flow GC, band GC, static and desired bands, limits."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from runtime import Outcome
from tests.conftest import wait_until

pytestmark = pytest.mark.integration

FAST_GC = {"FLOW_GC_TIMEOUT": "100ms", "BAND_GC_TIMEOUT": "200ms", "GC_INTERVAL": "20ms"}


def test_flow_then_band_are_collected_and_recreated_with_a_new_generation(start_daemon):
    d = start_daemon(SHARDS=2, BANDS="hi:100", **FAST_GC)
    with d.client() as c:
        with c.admit("tenant", 7) as adm:
            assert adm.dispatched
        stats = c.stats()
        assert stats["flows"] == 1 and 7 in stats["bands"]
        gen = stats["bands"][7]["generation"]
        # the flow goes first, the band after it (GIE scenario 24)
        wait_until(lambda: c.stats()["flows"] == 0, what="flow collected")
        wait_until(lambda: 7 not in c.stats()["bands"], what="band collected")
        stats = c.stats()
        assert stats["gc"]["flows_removed"] >= 1 and stats["gc"]["bands_removed"] >= 1
        # static band untouched, never used
        assert stats["bands"][100]["static"] and stats["bands"][100]["name"] == "hi"
        # the next request re-creates it, admitted in the same call
        with c.admit("tenant", 7) as adm:
            assert adm.dispatched
        assert c.stats()["bands"][7]["generation"] > 0
        rows = {b["priority"]: b for b in c.bands()}
        assert rows[7]["state"] == "dynamic" and rows[100]["state"] == "static"
        assert gen >= 1
    assert "band removed priority=7" in d.log()


def test_static_band_is_kept_after_use_with_its_configuration(start_daemon):
    # GIE scenario 34, decided: static bands are never collected, even after use.
    d = start_daemon(BANDS="critical:100:5000,standard:0", **FAST_GC)
    with d.client() as c:
        for prio in (100, 0, 3):
            with c.admit("t", prio):
                pass
        wait_until(lambda: c.stats()["flows"] == 0, what="flows collected")
        wait_until(lambda: 3 not in c.stats()["bands"], what="dynamic band collected")
        bands = c.stats()["bands"]
        assert set(bands) == {100, 0}
        assert bands[100]["name"] == "critical" and bands[100]["capacity_bytes"] == 5000
        assert bands[0]["name"] == "standard" and bands[0]["static"]


def test_request_queued_longer_than_both_timeouts_is_dispatched(start_daemon):
    d = start_daemon(MAX_INFLIGHT=1, **FAST_GC)
    with d.client() as c:
        with c.admit("witness", 60):
            pass  # band 60 idles from now: its removal marks both timeouts passing
        hold = c.admit("holder", 50)
        assert hold.dispatched
        result = {}

        def waiter():
            result["adm"] = c.admit("patient", 7, byte_size=10)

        t = threading.Thread(target=waiter)
        t.start()
        wait_until(lambda: c.stats()["len"] == 1, what="request queued")
        queued_at = time.monotonic()
        # Past both timeouts, while GC keeps running: the witness's idle flow and then its band
        # are collected; ours, queued, must not be.
        wait_until(lambda: 60 not in c.stats()["bands"], what="witness flow and band collected")
        # and the patient request itself has waited longer than both timeouts (100 + 200 ms)
        wait_until(lambda: time.monotonic() - queued_at > 0.35, what="both timeouts passed")
        stats = c.stats()
        assert (
            7 in stats["bands"]
            and stats["bands"][7]["len"] == 1
            and stats["bands"][7]["flows"] == 1
        )
        hold.release()
        t.join(10)
        adm = result["adm"]
        assert adm.outcome is Outcome.DISPATCHED
        assert adm.queued_seconds >= 0.3  # flow timeout + band timeout
        adm.release()


def test_reconcile_adds_retires_after_draining_and_keeps_static(start_daemon):
    d = start_daemon(
        MAX_INFLIGHT=1,
        BANDS="hi:100",
        FLOW_GC_TIMEOUT="200ms",
        BAND_GC_TIMEOUT="1h",
        GC_INTERVAL="20ms",
    )
    with d.client() as c:
        c.reconcile_priorities([5, 6])
        rows = {b["priority"]: b["state"] for b in c.bands()}
        assert rows == {100: "static", 6: "desired", 5: "desired"}
        # desired bands are not idle-collected (band timeout is long, but desired never goes)
        hold = c.admit("holder", 100)
        result = {}
        t = threading.Thread(target=lambda: result.setdefault("adm", c.admit("queued", 5)))
        t.start()
        wait_until(lambda: c.stats()["bands"][5]["len"] == 1, what="request queued in band 5")
        c.reconcile_priorities([6])  # band 5 no longer desired, but it holds a request
        assert c.stats()["bands"][5]["len"] == 1
        hold.release()
        t.join(10)
        assert result["adm"].dispatched
        result["adm"].release()
        # once drained (flow collected), band 5 is retired without waiting for the band timeout
        wait_until(lambda: 5 not in c.stats()["bands"], what="undesired band retired")
        rows = {b["priority"]: b["state"] for b in c.bands()}
        assert rows == {100: "static", 6: "desired"}
        c.reconcile_priorities([])
        wait_until(lambda: set(c.stats()["bands"]) == {100}, what="only static left")
    out = d.log()
    assert "band removed priority=5" in out and "band removed priority=6" in out


def test_flow_table_full_rejects_new_flows_only_until_gc_frees_slots(start_daemon):
    d = start_daemon(
        MAX_INFLIGHT=1,
        MAX_FLOWS=16,
        FLOW_GC_TIMEOUT="100ms",
        BAND_GC_TIMEOUT="1h",
        GC_INTERVAL="20ms",
    )

    async def scenario():
        async with d.async_client() as c:
            hold = await c.admit("f0", 0)
            waiters = [asyncio.ensure_future(c.admit(f"f{i}", 0)) for i in range(1, 16)]
            while (await c.stats())["len"] < 15:
                await asyncio.sleep(0.01)
            extra = await c.admit("one-too-many", 0)
            assert extra.outcome is Outcome.REJECTED_OTHER
            assert "BANDGATE_MAX_FLOWS" in extra.reason
            # existing flows unaffected: a known flow still queues
            again = asyncio.ensure_future(c.admit("f3", 0))
            await hold.release()
            for w in [*waiters, again]:
                adm = await w
                assert adm.dispatched
                await adm.release()
            # capacity comes back as GC frees slots
            for _ in range(500):
                if (await c.stats())["flows"] == 0:
                    break
                await asyncio.sleep(0.02)
            adm = await c.admit("one-too-many", 0)
            assert adm.dispatched
            await adm.release()

    asyncio.run(scenario())


def test_ten_thousand_first_requests_race_for_one_new_band(start_daemon):
    d = start_daemon(SHARDS=2)

    async def scenario():
        async with d.async_client() as c:

            async def one(i):
                adm = await c.admit(f"racer-{i % 100}", 4242)
                await adm.release()
                return adm.outcome

            outcomes = await asyncio.gather(*(one(i) for i in range(10_000)))
            assert outcomes.count(Outcome.DISPATCHED) == 10_000
            bands = [b for b in await c.bands() if b["priority"] == 4242]
            assert len(bands) == 1 and bands[0]["generation"] == 1
            assert (await c.stats())["flows"] == 100

    asyncio.run(scenario())
