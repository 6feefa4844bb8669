"""Prometheus metrics and health, served by the coordinator.

Runs inside the coordinator process, on its event loop (so it reads the registry without races):
``GET /metrics`` renders every metric from shared memory and the registry at scrape time, through
a ``prometheus_client`` collector; ``GET /healthz`` answers 200 when every shard and the GC process
are up, 503 otherwise. Listens on ``BANDGATE_METRICS_ADDR`` (loopback by default; ``0`` = off).

Names follow GIE (``inference_extension_flow_control_*``, reference §7) where a metric exists
there; bandgate's own are ``bandgate_*``. Aggregation over processes is by summing the shards'
rows (each written by one shard); a dead shard's histogram counts are carried over by the
coordinator before its row is zeroed, so counters never go backwards.

Cardinality: the ``fairness_id`` label is given to the ``BANDGATE_METRICS_MAX_FLOWS`` busiest flows
only; the rest of each priority is summed under ``fairness_id="other"``. Since every scrape is
built from current state, a collected flow's series simply stop being exported.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, final

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ipc import shm_layout as L
from runtime.outcome import OUTCOME_BY_CODE

if TYPE_CHECKING:
    from runtime.coordinator import Coordinator

__all__ = ["MetricsServer"]

log = logging.getLogger(__name__)

GIE = "inference_extension_flow_control_"
HIST_START = L.S_QUEUE_HIST
HIST_WORDS = L.STATS_HEADER_WORDS - L.S_QUEUE_HIST


def _histogram(
    name: str,
    doc: str,
    bounds: tuple[float, ...],
    counts: list[int],
    sum_ns: int,
    labels: list[str],
    values: list[str],
    family: HistogramMetricFamily | None = None,
) -> HistogramMetricFamily:
    fam = family or HistogramMetricFamily(name, doc, labels=labels)
    cumulative = 0
    buckets = []
    for bound, count in zip((*map(str, bounds), "+Inf"), counts, strict=True):
        cumulative += count
        buckets.append((bound, float(cumulative)))
    fam.add_metric(values, buckets, sum_ns / 1e9)
    return fam


@final
class _Collector:
    def __init__(self, coord: Coordinator) -> None:
        self.coord = coord

    def collect(self) -> Iterator[Metric]:
        coord = self.coord
        seg, registry = coord.segment, coord.registry
        if seg is None or registry is None:
            return
        w = seg.words
        layout = seg.layout
        live = [s for s in range(layout.max_shards) if w[layout.shard(s) + L.SH_STATE]]
        stats = coord.stats()

        # -- per-flow queue gauges (GIE names), capped cardinality
        size = GaugeMetricFamily(
            GIE + "queue_size",
            "Requests queued, by flow and priority.",
            labels=["fairness_id", "priority"],
        )
        qbytes = GaugeMetricFamily(
            GIE + "queue_bytes",
            "Bytes queued, by flow and priority.",
            labels=["fairness_id", "priority"],
        )
        per_flow = coord.queued_flows()
        cap = coord.config.metrics_max_flows
        other: dict[int, list[int]] = {}
        for count, nbytes, flow_id, priority in per_flow[:cap]:
            size.add_metric([flow_id, str(priority)], count)
            qbytes.add_metric([flow_id, str(priority)], nbytes)
        for count, nbytes, _, priority in per_flow[cap:]:
            acc = other.setdefault(priority, [0, 0])
            acc[0] += count
            acc[1] += nbytes
        for priority, (count, nbytes) in sorted(other.items()):
            size.add_metric(["other", str(priority)], count)
            qbytes.add_metric(["other", str(priority)], nbytes)
        yield size
        yield qbytes

        # -- histograms: queue duration by outcome, dispatch cycle duration
        hist = list(coord.dead_hist)
        for s in live:
            base = layout.stats_row(s) + HIST_START
            for i in range(HIST_WORDS):
                hist[i] += w[base + i]
        qd = HistogramMetricFamily(
            GIE + "request_queue_duration_seconds",
            "Time from arrival at a shard to the request's outcome, by outcome.",
            labels=["outcome"],
        )
        requests = CounterMetricFamily(
            "bandgate_requests", "Requests by outcome.", labels=["outcome"]
        )
        for code in range(1, 7):
            start = (code - 1) * L.QD_BLOCK
            counts = hist[start : start + L.QD_BLOCK - 1]
            outcome = OUTCOME_BY_CODE[code].value
            _histogram(
                "", "", L.QUEUE_BUCKETS, counts, hist[start + L.QD_BLOCK - 1], [], [outcome], qd
            )
            requests.add_metric([outcome], sum(counts))
        yield qd
        yield requests
        start = L.S_CYCLE_HIST - HIST_START
        yield _histogram(
            GIE + "dispatch_cycle_duration_seconds",
            "Duration of one dispatch cycle (a wake-up that dispatches as much as allowed).",
            L.CYCLE_BUCKETS,
            hist[start : start + L.CYCLE_BLOCK - 1],
            hist[start + L.CYCLE_BLOCK - 1],
            [],
            [],
        )

        # -- saturation and capacity
        sat = stats["saturation"]
        limit = stats["max_inflight"]
        level = 1.0 if sat["saturated"] else (stats["inflight"] / limit if limit else 0.0)
        yield GaugeMetricFamily(
            GIE + "pool_saturation",
            "1.0 = saturated: the budget is used up or the external credit is spent or stale.",
            value=level,
        )
        band_util = GaugeMetricFamily(
            "bandgate_band_capacity_utilisation",
            "Queued bytes of a band over its limit.",
            labels=["priority", "name"],
        )
        for priority, band in stats["bands"].items():
            band_util.add_metric(
                [str(priority), band["name"]], band["bytes"] / band["capacity_bytes"]
            )
        yield band_util
        if stats["max_bytes"]:
            yield GaugeMetricFamily(
                "bandgate_capacity_utilisation",
                "Queued bytes over BANDGATE_MAX_BYTES.",
                value=stats["bytes"] / stats["max_bytes"],
            )
        yield GaugeMetricFamily(
            "bandgate_budget_in_use",
            "Dispatched requests not yet released.",
            value=stats["inflight"],
        )
        yield GaugeMetricFamily(
            "bandgate_budget_limit", "BANDGATE_MAX_INFLIGHT (0 = no limit).", value=limit
        )
        yield GaugeMetricFamily(
            "bandgate_queued_requests", "Requests queued in the whole daemon.", value=stats["len"]
        )
        yield GaugeMetricFamily(
            "bandgate_queued_bytes", "Bytes queued in the whole daemon.", value=stats["bytes"]
        )

        # -- lifecycle
        yield GaugeMetricFamily("bandgate_flows", "Live flows.", value=stats["flows"])
        by_state = GaugeMetricFamily("bandgate_bands", "Bands by state.", labels=["state"])
        states: dict[str, int] = {"static": 0, "desired": 0, "dynamic": 0, "retiring": 0}
        for band in stats["bands"].values():
            states[band["state"]] = states.get(band["state"], 0) + 1
        for state, n in states.items():
            by_state.add_metric([state], n)
        yield by_state
        gc = stats["gc"]
        removals = CounterMetricFamily(
            "bandgate_gc_removals", "Flows and bands removed by GC.", labels=["kind"]
        )
        removals.add_metric(["flow"], gc["flows_removed"])
        removals.add_metric(["band"], gc["bands_removed"])
        yield removals
        yield CounterMetricFamily(
            "bandgate_gc_aborts",
            "Two-phase removals aborted (a shard said no or did not answer).",
            value=gc["aborts"],
        )
        yield CounterMetricFamily(
            "bandgate_gc_revivals",
            "Retiring flows or bands revived by a request.",
            value=gc["revivals"],
        )
        restarts = CounterMetricFamily(
            "bandgate_restarts", "Processes restarted after a crash.", labels=["role"]
        )
        restarts.add_metric(["shard"], stats["restarts"]["shard_restarts"])
        restarts.add_metric(["gc"], stats["restarts"]["gc_restarts"])
        yield restarts
        shards = GaugeMetricFamily("bandgate_shards", "Shard processes by state.", labels=["state"])
        by_shard_state: dict[str, int] = {"active": 0, "draining": 0, "starting": 0}
        for shard in stats["shards"]:
            by_shard_state[shard["state"]] = by_shard_state.get(shard["state"], 0) + 1
        for state, n in by_shard_state.items():
            shards.add_metric([state], n)
        yield shards


@final
class MetricsServer:
    """A minimal HTTP/1.1 server for /metrics and /healthz on the coordinator's loop."""

    def __init__(self, coord: Coordinator) -> None:
        self.coord = coord
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(coord))
        self.server: asyncio.AbstractServer | None = None
        self.address = ""

    async def start(self, addr: str) -> str:
        host, _, port = addr.rpartition(":")
        host = host.strip("[]")
        self.server = await asyncio.start_server(self._handle, host, int(port))
        sock = self.server.sockets[0].getsockname()
        self.address = f"{sock[0]}:{sock[1]}"
        log.info("metrics listening on http://%s/metrics", self.address)
        return self.address

    def close(self) -> None:
        if self.server is not None:
            self.server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            line = request.split(b"\r\n", 1)[0].decode("latin-1").split()
            method, path = (line[0], line[1]) if len(line) >= 2 else ("", "")
            status, ctype, body = self.respond(method, path.split("?", 1)[0])
            head = f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            writer.write(head.encode() + body)
            await writer.drain()
        except (
            TimeoutError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ConnectionError,
        ):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def respond(self, method: str, path: str) -> tuple[str, str, bytes]:
        if method != "GET":
            return "405 Method Not Allowed", "text/plain", b"GET only\n"
        if path == "/metrics":
            started = time.perf_counter()
            body = generate_latest(self.registry)
            log.debug(
                "metrics rendered bytes=%d ms=%.2f",
                len(body),
                (time.perf_counter() - started) * 1e3,
            )
            return "200 OK", CONTENT_TYPE_LATEST, body
        if path == "/healthz":
            problems = self.coord.health_problems()
            if problems:
                return (
                    "503 Service Unavailable",
                    "text/plain",
                    ("\n".join(problems) + "\n").encode(),
                )
            return "200 OK", "text/plain", b"ok\n"
        return "404 Not Found", "text/plain", b"not found\n"
