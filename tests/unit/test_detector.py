"""The gateway's saturation detector: parsing vLLM metrics, GIE's thresholds as an allowance,
staleness failing closed, and counting what was routed since a scrape."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from runtime.config import ConfigError
from runtime.detector import (
    Detector,
    Reading,
    Thresholds,
    parse_vllm_metrics,
    pool_saturation,
    upstream_allowance,
)
from tests.fakes.vllm import STATE, make_app

GPU_TEXT = """\
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="a"} 2.0
vllm:num_requests_waiting{model_name="b"} 1.0
# HELP vllm:gpu_cache_usage_perc GPU KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{model_name="a"} 0.25
vllm:gpu_cache_usage_perc{model_name="b"} 0.5
# HELP vllm:request_success_total Count of successfully processed requests.
# TYPE vllm:request_success_total counter
vllm:request_success_total{finished_reason="stop",model_name="a"} 7.0
"""


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# -- parsing -------------------------------------------------------------------------------------
def test_parse_sums_waiting_and_takes_the_highest_kv() -> None:
    assert parse_vllm_metrics(GPU_TEXT) == Reading(3.0, 0.5)


def test_parse_prefers_the_newer_kv_name() -> None:
    text = GPU_TEXT + (
        "# TYPE vllm:kv_cache_usage_perc gauge\n"
        'vllm:kv_cache_usage_perc{engine="0",model_name="a"} 0.75\n'
    )
    assert parse_vllm_metrics(text) == Reading(3.0, 0.75)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("# TYPE vllm:gpu_cache_usage_perc gauge\nvllm:gpu_cache_usage_perc 0.1\n", "num_requests"),
        ("# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting 1\n", "cache_usage"),
        ("vllm:num_requests_waiting{ 1 2 3\n", "unparsable"),
        ("", "num_requests"),
    ],
)
def test_parse_rejects_incomplete_metrics(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_vllm_metrics(text)


# -- thresholds ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("waiting", "kv", "expected"),
    [
        (0, 0.0, 6),
        (3, 0.5, 3),
        (5, 0.8, 1),  # at both edges: GIE still sees capacity, one more request may go
        (6, 0.0, 0),
        (0, 0.81, 0),
        (2.5, 0.0, 3),
    ],
)
def test_allowance_follows_gie_thresholds(waiting: float, kv: float, expected: int) -> None:
    assert upstream_allowance(Reading(waiting, kv), Thresholds()) == expected


def test_allowance_is_zero_without_a_reading() -> None:
    assert upstream_allowance(None, Thresholds()) == 0
    assert upstream_allowance(Reading(float("nan"), 0.0), Thresholds()) == 0


def test_thresholds_defaults_are_gie_defaults() -> None:
    t = Thresholds.from_env({})
    assert (t.queue_depth, t.kv_cache, t.staleness, t.scrape_interval) == (5, 0.8, 0.2, 0.05)


def test_thresholds_from_env() -> None:
    t = Thresholds.from_env(
        {
            "BANDGATE_SAT_QUEUE_DEPTH": "0",
            "BANDGATE_SAT_KV_CACHE": "1",
            "BANDGATE_SAT_STALENESS": "1s",
            "BANDGATE_SAT_SCRAPE_INTERVAL": "250ms",
        }
    )
    assert (t.queue_depth, t.kv_cache, t.staleness, t.scrape_interval) == (0, 1.0, 1.0, 0.25)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("BANDGATE_SAT_QUEUE_DEPTH", "-1"),
        ("BANDGATE_SAT_QUEUE_DEPTH", "five"),
        ("BANDGATE_SAT_QUEUE_DEPTH", "1000001"),
        ("BANDGATE_SAT_KV_CACHE", "0"),
        ("BANDGATE_SAT_KV_CACHE", "1.5"),
        ("BANDGATE_SAT_KV_CACHE", "nan"),
        ("BANDGATE_SAT_STALENESS", "0"),
        ("BANDGATE_SAT_STALENESS", "soon"),
        ("BANDGATE_SAT_SCRAPE_INTERVAL", "200ms"),
    ],
)
def test_thresholds_reject_bad_values_naming_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name) as info:
        Thresholds.from_env({name: value})
    assert "\n" not in str(info.value)


# -- evaluation ----------------------------------------------------------------------------------
async def _noop_report(allowance: int, valid_for: float) -> None:
    return None


def _detector(n: int, clock: Clock, thresholds: Thresholds | None = None) -> Detector:
    # evaluate() needs no session; scrape tests below use a real one.
    return Detector(
        [f"http://127.0.0.1:{9000 + i}" for i in range(n)],
        thresholds or Thresholds(),
        None,  # type: ignore[arg-type]
        _noop_report,
        clock=clock,
    )


def test_evaluate_sums_fresh_upstreams_and_fails_closed_on_stale() -> None:
    clock = Clock()
    d = _detector(3, clock)
    d.states[0].reading, d.states[0].scraped_at = Reading(1, 0.1), clock.now - 0.05
    d.states[1].reading, d.states[1].scraped_at = Reading(0, 0.1), clock.now - 0.25  # stale
    d.states[2].reading, d.states[2].scraped_at = Reading(9, 0.1), clock.now  # over the queue
    allowance, valid_for = d.evaluate()
    assert allowance == 5
    assert valid_for == pytest.approx(0.15)  # until upstream 0's reading goes stale
    assert [s.allowance for s in d.states] == [5, 0, 0]


def test_evaluate_with_nothing_fresh_is_zero() -> None:
    clock = Clock()
    d = _detector(2, clock)
    assert d.evaluate() == (0, 0.2)
    d.states[0].reading, d.states[0].scraped_at = Reading(0, 0.0), clock.now
    clock.now += 0.21
    assert d.evaluate()[0] == 0


def test_routed_and_finished_requests_move_the_allowance_between_scrapes() -> None:
    async def scenario() -> None:
        clock = Clock()
        d = _detector(2, clock)
        for state, waiting in zip(d.states, (2, 0), strict=True):
            state.reading, state.scraped_at = Reading(waiting, 0.0), clock.now
        first = d.note_routed(0)
        d.note_routed(0)
        allowance, _ = d.evaluate()
        assert [s.allowance for s in d.states] == [2, 6]  # 6 - (2 waiting + 2 sent)
        assert allowance == 8
        assert d.has_capacity(0)
        d.note_routed(0)
        d.note_routed(0)
        assert not d.has_capacity(0) and d.states[0].remaining() == 0
        d.note_completed(0, first)  # a finished request frees a slot
        assert d.evaluate()[0] == (6 - (2 + 4 - 1)) + 6
        for _ in range(10):
            d.note_completed(1, 0)
        assert d.states[1].since_reading() == (0, 10)
        assert d.evaluate()[0] == 1 + 6  # never more than queue depth + 1 per upstream
        await d.close()

    asyncio.run(scenario())


def test_requests_sent_just_before_a_scrape_count_until_they_finish() -> None:
    reports: list[int] = []

    async def report(allowance: int, valid_for: float) -> None:
        reports.append(allowance)

    async def scenario() -> None:
        app = make_app()
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        try:
            async with aiohttp.ClientSession() as session:
                d = Detector([str(server.make_url("/"))], Thresholds(), session, report)
                settings = app[STATE].settings
                a = d.note_routed(0)
                settings["waiting"] = 1  # the server saw it... or maybe not: counted
                assert await d.scrape_once() == 6 - 2
                d.note_completed(0, a)
                await d._evaluate_and_report()
                assert reports[-1] == 6 - 1
                b = d.note_routed(0)  # routed after the scrape: counted
                assert d.evaluate()[0] == 6 - 2
                assert await d.scrape_once() == 6 - 2  # b unfinished when this scrape was sent
                d.note_completed(0, b)
                assert d.evaluate()[0] == 6 - 1
                c = d.note_routed(0)
                d.note_completed(0, c)  # finished before the next scrape: the server saw it
                settings["waiting"] = 0
                assert await d.scrape_once() == 6
                await d.close()
        finally:
            await server.close()

    asyncio.run(scenario())


def test_pool_saturation_is_gie_gradient() -> None:
    clock = Clock()
    d = _detector(2, clock)
    t = d.thresholds
    assert pool_saturation([], t, clock.now) == 1.0
    assert pool_saturation(d.states, t, clock.now) == 1.0  # nothing read yet
    d.states[0].reading, d.states[0].scraped_at = Reading(1, 0.4), clock.now
    d.states[1].reading, d.states[1].scraped_at = Reading(10, 0.0), clock.now
    assert pool_saturation(d.states, t, clock.now) == pytest.approx((0.5 + 2.0) / 2)


# -- scraping a server that speaks vLLM's format -------------------------------------------------
def test_scrape_reports_allowance_and_fails_closed_when_metrics_fail(
    caplog: pytest.LogCaptureFixture,
) -> None:
    reports: list[tuple[int, float]] = []

    async def report(allowance: int, valid_for: float) -> None:
        reports.append((allowance, valid_for))

    async def scenario() -> None:
        app = make_app()
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        try:
            async with aiohttp.ClientSession() as session:
                url = str(server.make_url("/"))
                thresholds = Thresholds(queue_depth=3, staleness=1.0, scrape_interval=0.05)
                d = Detector([url], thresholds, session, report)
                state = app[STATE]
                state.settings["waiting"] = 1
                assert await d.scrape_once() == 3
                state.settings["kv_name"] = "kv_cache_usage_perc"
                state.settings["kv"] = 0.9
                assert await d.scrape_once() == 0
                state.settings["kv"] = 0.1
                assert await d.scrape_once() == 3
                state.settings["fail_metrics"] = True
                # The failed scrapes keep the previous reading, still fresh for 1 s.
                assert await d.scrape_once() == 3
                assert await d.scrape_once() == 3
                d.states[0].scraped_at = d.clock() - 2.0
                assert await d.scrape_once() == 0
                state.settings["fail_metrics"] = False
                assert await d.scrape_once() == 3
                assert state.scrapes == 7
        finally:
            await server.close()

    with caplog.at_level(logging.INFO, logger="bandgate.detector"):
        asyncio.run(scenario())
    assert [a for a, _ in reports] == [3, 0, 3, 3, 3, 0, 3]
    assert all(0 < v <= 1.0 for _, v in reports)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "HTTP 500" in warnings[0].getMessage()  # once, not per scrape
    assert any("available again" in r.getMessage() for r in caplog.records)


def test_unreachable_upstream_counts_as_saturated() -> None:
    reports: list[int] = []

    async def report(allowance: int, valid_for: float) -> None:
        reports.append(allowance)

    async def scenario() -> None:
        async with aiohttp.ClientSession() as session:
            # Port 9 (discard) on loopback: nothing listens there.
            d = Detector(["http://127.0.0.1:9"], Thresholds(), session, report)
            assert await d.scrape_once() == 0
            assert d.states[0].error

    asyncio.run(scenario())
    assert reports == [0]
