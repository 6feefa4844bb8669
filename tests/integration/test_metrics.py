"""The Prometheus endpoint, scraped and parsed with prometheus_client's own parser."""

from __future__ import annotations

import asyncio
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import wait_until

pytestmark = pytest.mark.integration


def scrape(addr: str, path: str = "/metrics") -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://{addr}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_cover_queues_outcomes_lifecycle_and_cap_flow_labels(start_daemon):
    d = start_daemon(
        SHARDS=2,
        MAX_INFLIGHT=1,
        METRICS_ADDR="127.0.0.1:0",
        METRICS_MAX_FLOWS=2,
        BANDS="hi:10",
        FLOW_GC_TIMEOUT="150ms",
        BAND_GC_TIMEOUT="300ms",
        GC_INTERVAL="20ms",
    )

    async def scenario():
        async with d.async_client() as c:
            addr = (await c.stats())["metrics_addr"]
            assert addr.startswith("127.0.0.1:")
            hold = await c.admit("holder", 10)
            waiters = [
                asyncio.ensure_future(c.admit(f, 10, byte_size=100))
                for f in ("a", "a", "a", "b", "b", "c")
            ]
            ttl = asyncio.ensure_future(c.admit("d", 10, ttl=0.05))
            while (await c.stats())["len"] < 6 or not ttl.done():
                await asyncio.sleep(0.01)
            status, text = await asyncio.to_thread(scrape, addr)
            assert status == 200
            m = samples(text)
            q = "inference_extension_flow_control_queue_size"
            assert m[(q, (("fairness_id", "a"), ("priority", "10")))] == 3
            assert m[(q, (("fairness_id", "b"), ("priority", "10")))] == 2
            # the third flow is over the cap of 2 labelled flows
            assert m[(q, (("fairness_id", "other"), ("priority", "10")))] == 1
            assert not any(k[0] == q and ("fairness_id", "c") in k[1] for k in m)
            assert (
                m[
                    (
                        "inference_extension_flow_control_queue_bytes",
                        (("fairness_id", "a"), ("priority", "10")),
                    )
                ]
                == 300
            )
            assert m[("inference_extension_flow_control_pool_saturation", ())] == 1.0
            assert m[("bandgate_budget_in_use", ())] == 1
            assert m[("bandgate_requests_total", (("outcome", "evicted_ttl"),))] == 1
            assert (
                m[
                    (
                        "inference_extension_flow_control_request_queue_duration_seconds_count",
                        (("outcome", "evicted_ttl"),),
                    )
                ]
                == 1
            )
            assert (
                m[("inference_extension_flow_control_dispatch_cycle_duration_seconds_count", ())]
                >= 1
            )
            assert m[("bandgate_bands", (("state", "static"),))] == 1
            assert m[("bandgate_shards", (("state", "active"),))] == 2
            await hold.release()
            for w in asyncio.as_completed(waiters):  # one unit: release each as it is dispatched
                await (await w).release()
            status, text = await asyncio.to_thread(scrape, addr)
            m = samples(text)
            assert m[("bandgate_requests_total", (("outcome", "dispatched"),))] == 7
            assert (
                m[
                    (
                        "inference_extension_flow_control_request_queue_duration_seconds_bucket",
                        (("le", "+Inf"), ("outcome", "dispatched")),
                    )
                ]
                == 7
            )
            # a collected flow's series are gone
            for _ in range(300):
                if (await c.stats())["flows"] == 0:
                    break
                await asyncio.sleep(0.02)
            status, text = await asyncio.to_thread(scrape, addr)
            m = samples(text)
            assert not any(k[0] == q for k in m)
            assert m[("bandgate_gc_removals_total", (("kind", "flow"),))] >= 5
            assert m[("bandgate_flows", ())] == 0
            status, body = await asyncio.to_thread(scrape, addr, "/healthz")
            assert (status, body) == (200, "ok\n")
            assert (await asyncio.to_thread(scrape, addr, "/nope"))[0] == 404

    asyncio.run(scenario())


def test_metrics_port_in_use_is_a_clear_start_error(start_daemon):
    first = start_daemon(METRICS_ADDR="127.0.0.1:0")
    with first.client() as c:
        addr = c.stats()["metrics_addr"]
    second = start_daemon(wait=False, METRICS_ADDR=addr)
    wait_until(lambda: second.proc.poll() is not None, timeout=30, what="second daemon exits")
    assert second.proc.returncode == 3
    assert "BANDGATE_METRICS_ADDR" in second.log() and "cannot listen" in second.log()
