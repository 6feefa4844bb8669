"""LIBRARY: the saturation detector, in the gateway process (``bandgate gateway``).

Peers: every upstream's Prometheus ``/metrics`` endpoint (HTTP GET, vLLM's metric names), and the
daemon, to which it reports through a callback (the gateway passes
``AsyncClient.report_saturation``). It is GIE's utilisation detector (reference §6) turned into a
dispatch *allowance*, so that the daemon can count the requests it dispatches between two scrapes
instead of trusting a stale "not saturated" for a whole refresh period:

- Every :attr:`Thresholds.scrape_interval` it GETs each upstream's ``/metrics`` and reads
  ``vllm:num_requests_waiting`` and the KV-cache usage (``vllm:kv_cache_usage_perc``, or the older
  ``vllm:gpu_cache_usage_perc``; a fraction 0..1). Several series of one name (one per model or
  engine) are summed for the queue and maxed for the KV cache.
- An upstream has capacity, as in GIE, iff its metrics are fresh (the scrape that produced them
  was sent at most :attr:`Thresholds.staleness` ago), ``waiting <= queue_depth`` and
  ``kv <= kv_cache``. Its allowance is then ``queue_depth + 1 - waiting``: each dispatched request
  adds at most one waiting request, so after that many the upstream is at most one past the edge
  where GIE would stop. Stale, failing, unparsable or KV-over-threshold upstreams allow 0 (fail
  closed), so no fresh upstream means allowance 0, and an empty pool too.
- Between scrapes the gateway tells it what it routes to each upstream and what finishes there
  (:meth:`Detector.note_routed`, :meth:`Detector.note_completed`), and the upstream's waiting
  count is estimated as ``waiting + unseen + routed - completed``: ``routed`` and ``completed``
  count since the scrape was sent (a request sent adds at most one waiting request; one that
  finished frees its slot and KV blocks so that a waiting request can run), and ``unseen`` is the
  number of requests routed in the interval before the scrape was sent and not finished by then,
  which the server may not have queued yet when it answered (on the wire, being tokenised). Those
  are counted although most were seen (the estimate errs high, the allowance low), and each is
  credited back when it finishes. The allowance ``queue_depth + 1 - estimate`` is clamped to
  ``[0, queue_depth + 1]``.
- After every scrape round, and again as soon as a request finishes at an upstream with less
  than half its allowance left (one report at a time, so they coalesce), it reports ``(sum of allowances, valid_for)``: the daemon dispatches at most that
  many more requests, counted over all shards from the moment of the report, and treats the pool
  as saturated if no newer report arrives within ``valid_for`` (the time until the oldest reading
  that contributed goes stale). Without the completion credit a pool could take at most
  ``queue_depth + 1`` requests per upstream per scrape interval, however fast it served them.

aiohttp and prometheus_client are imported on first use, so that importing this module (for its
variables, from ``bandgate``'s command line) stays cheap.

Invariants: a reading older than the staleness threshold never contributes; a scrape never
blocks longer than half the staleness threshold (so the readings of the others are still fresh
when it ends); a failure is logged once when it starts and once when it ends, never per scrape.
Residual overshoot: requests that a server takes longer than one scrape interval to count as
waiting after the gateway sent them; a finished request whose freed slot cannot take a waiting
one (its KV blocks too few for the next prompt); and dispatches the daemon decided but the
gateway had not yet heard of when a report reset the daemon's count.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from runtime.config import ENV_PREFIX, ConfigError, Variable, format_duration, parse_duration

if TYPE_CHECKING:
    import aiohttp

__all__ = [
    "KV_METRICS",
    "SAT_VARIABLES",
    "WAITING_METRIC",
    "Detector",
    "Reading",
    "Thresholds",
    "UpstreamState",
    "parse_vllm_metrics",
    "pool_saturation",
    "upstream_allowance",
]

log = logging.getLogger("bandgate.detector")

WAITING_METRIC: Final = "vllm:num_requests_waiting"
# Newer vLLM first; the older name is still exported by many deployed versions.
KV_METRICS: Final = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
MAX_QUEUE_DEPTH: Final = 1_000_000

SAT_VARIABLES: Final[tuple[Variable, ...]] = (
    Variable(
        f"{ENV_PREFIX}SAT_QUEUE_DEPTH",
        "5",
        "Gateway saturation detector: an upstream has capacity while vllm:num_requests_waiting "
        "is at most this (GIE's QueueDepthThreshold); an integer from 0 to 1000000.",
    ),
    Variable(
        f"{ENV_PREFIX}SAT_KV_CACHE",
        "0.8",
        "Gateway saturation detector: an upstream has capacity while its KV-cache usage "
        "(vllm:kv_cache_usage_perc or vllm:gpu_cache_usage_perc) is at most this fraction "
        "(GIE's KVCacheUtilThreshold); a number greater than 0, at most 1.",
    ),
    Variable(
        f"{ENV_PREFIX}SAT_STALENESS",
        "200ms",
        "Gateway saturation detector: metrics older than this count as no capacity (fail "
        "closed), and the daemon treats the pool as saturated when no report came for this long "
        "(GIE's MetricsStalenessThreshold); a duration > 0.",
    ),
    Variable(
        f"{ENV_PREFIX}SAT_SCRAPE_INTERVAL",
        "50ms",
        "Gateway saturation detector: period of the /metrics scrapes of every upstream (GIE's "
        "metrics refresh); a duration > 0, less than BANDGATE_SAT_STALENESS.",
    ),
)


@dataclass(frozen=True)
class Thresholds:
    """The detector's variables (GIE's defaults).

    Attributes:
        queue_depth: Most waiting requests at which an upstream still has capacity.
        kv_cache: Highest KV-cache usage (fraction) at which an upstream still has capacity.
        staleness: Age after which a reading no longer counts, in seconds.
        scrape_interval: Period of the scrapes, in seconds; less than ``staleness``.
    """

    queue_depth: int = 5
    kv_cache: float = 0.8
    staleness: float = 0.2
    scrape_interval: float = 0.05

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Thresholds:
        """Reads the ``BANDGATE_SAT_*`` variables; unset or empty ones keep their default.

        Args:
            environ: The environment.

        Returns:
            The thresholds.

        Raises:
            ConfigError: A value is malformed or out of range; the message is one line naming
                the variable, its value and what is expected.
        """
        default = cls()

        def raw(suffix: str) -> tuple[str, str] | None:
            name = ENV_PREFIX + suffix
            value = environ.get(name, "").strip()
            return (name, value) if value else None

        queue_depth = default.queue_depth
        if item := raw("SAT_QUEUE_DEPTH"):
            name, value = item
            if not value.isdigit() or len(value) > 7 or int(value) > MAX_QUEUE_DEPTH:
                raise ConfigError(
                    f"{name}={value!r}: expected an integer from 0 to {MAX_QUEUE_DEPTH}"
                )
            queue_depth = int(value)
        kv_cache = default.kv_cache
        if item := raw("SAT_KV_CACHE"):
            name, value = item
            try:
                kv_cache = float(value)
            except ValueError:
                kv_cache = math.nan
            if not 0.0 < kv_cache <= 1.0:
                raise ConfigError(f"{name}={value!r}: expected a number greater than 0, at most 1")
        staleness = _duration(raw("SAT_STALENESS"), default.staleness)
        interval = _duration(raw("SAT_SCRAPE_INTERVAL"), default.scrape_interval)
        if interval >= staleness:
            name = f"{ENV_PREFIX}SAT_SCRAPE_INTERVAL"
            raise ConfigError(
                f"{name}={format_duration(interval)!r}: expected a duration less than "
                f"{ENV_PREFIX}SAT_STALENESS ({format_duration(staleness)}), or every reading "
                "would be stale before the next one"
            )
        return cls(queue_depth, kv_cache, staleness, interval)


def _duration(item: tuple[str, str] | None, default: float) -> float:
    if item is None:
        return default
    name, value = item
    try:
        seconds = parse_duration(value)
    except ValueError:
        seconds = 0.0
    if seconds <= 0:
        raise ConfigError(
            f"{name}={value!r}: expected a duration greater than 0, e.g. 50ms, 0.2, 1s"
        )
    return seconds


@dataclass(frozen=True)
class Reading:
    """What one scrape of one upstream says.

    Attributes:
        waiting: Requests waiting in the server's queue (summed over its series).
        kv: KV-cache usage, a fraction 0..1 (the highest of its series).
    """

    waiting: float
    kv: float


def parse_vllm_metrics(text: str) -> Reading:
    """Parses a Prometheus text exposition with vLLM's metric names.

    Args:
        text: The body of a ``/metrics`` response.

    Returns:
        The reading.

    Raises:
        ValueError: The text does not parse, or lacks the waiting-requests or KV-cache metric.
    """
    from prometheus_client.parser import text_string_to_metric_families

    waiting: float | None = None
    kv: dict[str, float] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == WAITING_METRIC:
                    waiting = (waiting or 0.0) + float(sample.value)
                elif sample.name in KV_METRICS:
                    kv[sample.name] = max(kv.get(sample.name, 0.0), float(sample.value))
    except Exception as exc:
        raise ValueError(f"unparsable metrics: {exc}") from exc
    if waiting is None:
        raise ValueError(f"no {WAITING_METRIC} in the metrics")
    for name in KV_METRICS:
        if name in kv:
            return Reading(waiting, kv[name])
    raise ValueError(f"no {' or '.join(KV_METRICS)} in the metrics")


def upstream_allowance(
    reading: Reading | None, thresholds: Thresholds, routed: int = 0, completed: int = 0
) -> int:
    """How many more requests a fresh upstream may take before it is past GIE's edge.

    Args:
        reading: The upstream's fresh reading, or None (none, or stale).
        thresholds: The detector's thresholds.
        routed: Requests routed to it that the reading may not include.
        completed: Requests that finished there since the reading was taken.

    Returns:
        ``queue_depth + 1 - (waiting + routed - completed)`` clamped to ``[0, queue_depth + 1]``;
        0 without a reading or with the KV cache over its threshold.
    """
    if reading is None or math.isnan(reading.waiting) or math.isnan(reading.kv):
        return 0
    if reading.kv > thresholds.kv_cache:
        return 0
    waiting = math.ceil(reading.waiting) + routed - completed
    return min(thresholds.queue_depth + 1, max(0, thresholds.queue_depth + 1 - waiting))


class UpstreamState:
    """The detector's view of one upstream.

    Attributes:
        url: The upstream's base URL.
        metrics_url: Its ``/metrics`` URL.
        reading: The last successful reading, or None.
        scraped_at: Monotonic time the scrape that produced ``reading`` was sent.
        error: Why the last scrape failed; empty if it succeeded.
        allowance: This upstream's part of the last report.
        routed: Requests the gateway routed to it (cumulative).
        completed: Requests routed to it that have finished (cumulative).
        round: Scrapes sent so far; a request is tagged with the round it was routed in.
        unfinished_in_round: Requests routed in the current round not finished yet.
        marks: ``(routed, completed, unseen)`` when the scrape of ``reading`` was sent.
        routed_at_report: Value of ``routed`` at the last report.
    """

    __slots__ = (
        "allowance",
        "completed",
        "error",
        "marks",
        "metrics_url",
        "reading",
        "round",
        "routed",
        "routed_at_report",
        "scraped_at",
        "unfinished_in_round",
        "url",
    )

    def __init__(self, url: str) -> None:
        self.url = url
        self.metrics_url = url.rstrip("/") + "/metrics"
        self.reading: Reading | None = None
        self.scraped_at: float | None = None
        self.error = ""
        self.allowance = 0
        self.routed = 0
        self.completed = 0
        self.round = 0
        self.unfinished_in_round = 0
        self.marks = (0, 0, 0)
        self.routed_at_report = 0

    def fresh(self, now: float, staleness: float) -> bool:
        """Whether the reading may still be trusted at ``now``."""
        return self.scraped_at is not None and now - self.scraped_at <= staleness

    def since_reading(self) -> tuple[int, int]:
        """``(unseen + routed since the reading, completed since the reading)``."""
        routed, completed, unseen = self.marks
        return unseen + self.routed - routed, self.completed - completed

    def remaining(self) -> int:
        """Allowance of the last report minus the requests routed here since."""
        return self.allowance - (self.routed - self.routed_at_report)


def pool_saturation(states: Sequence[UpstreamState], thresholds: Thresholds, now: float) -> float:
    """GIE's gradient saturation ([latest] utilisation detector), for dashboards.

    Mean over upstreams of ``max(waiting / queue_depth, kv / kv_cache)``, a stale or missing
    reading counting 1.0, an empty pool 1.0; >= 1.0 reads "saturated". The gate itself uses the
    allowance, not this number.

    Args:
        states: The upstreams.
        thresholds: The detector's thresholds.
        now: Monotonic now.

    Returns:
        The saturation.
    """
    if not states:
        return 1.0
    total = 0.0
    for state in states:
        reading = state.reading
        if reading is None or not state.fresh(now, thresholds.staleness):
            total += 1.0
            continue
        total += max(
            reading.waiting / max(thresholds.queue_depth, 1), reading.kv / thresholds.kv_cache
        )
    return total / len(states)


Report = Callable[[int, float], Awaitable[None]]


class Detector:
    """Scrapes the upstreams and reports the pool's allowance to the daemon.

    Args:
        upstreams: The upstreams' base URLs (``/metrics`` is appended).
        thresholds: The detector's variables.
        session: The HTTP session used for the scrapes (owned by the caller).
        report: Called with ``(allowance, valid_for)`` after every scrape round.
        clock: Monotonic clock (tests substitute their own).
    """

    def __init__(
        self,
        upstreams: Sequence[str],
        thresholds: Thresholds,
        session: aiohttp.ClientSession,
        report: Report,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        import aiohttp

        self.thresholds = thresholds
        self.states = [UpstreamState(url) for url in upstreams]
        self.session = session
        self.report = report
        self.clock = clock
        self.allowance = 0
        self.reports = 0
        self.report_error = ""
        self._timeout = aiohttp.ClientTimeout(total=thresholds.staleness / 2)
        self._report_lock = asyncio.Lock()
        self._crediting: asyncio.Task[None] | None = None
        self._credit_pending = False

    def note_routed(self, index: int) -> int:
        """Counts a request the gateway sends to upstream ``index``.

        Returns:
            The token to give :meth:`note_completed` when the request finishes.
        """
        state = self.states[index]
        state.routed += 1
        state.unfinished_in_round += 1
        return state.round

    def has_capacity(self, index: int) -> bool:
        """Whether upstream ``index`` has allowance left since the last report."""
        return self.states[index].remaining() > 0

    def fresh(self, index: int) -> bool:
        """Whether upstream ``index`` has a fresh reading now."""
        return self.states[index].fresh(self.clock(), self.thresholds.staleness)

    async def _scrape(self, state: UpstreamState) -> None:
        import aiohttp

        sent = self.clock()
        marks = (state.routed, state.completed, state.unfinished_in_round)
        state.round += 1
        state.unfinished_in_round = 0
        try:
            async with self.session.get(state.metrics_url, timeout=self._timeout) as resp:
                if resp.status != 200:
                    raise ValueError(f"HTTP {resp.status}")
                text = await resp.text()
            reading = parse_vllm_metrics(text)
        except (aiohttp.ClientError, TimeoutError, ValueError, UnicodeDecodeError) as exc:
            error = str(exc) or type(exc).__name__
            if not state.error:
                log.warning(
                    "metrics of %s unavailable (%s): it counts as saturated",
                    state.url,
                    error,
                )
            state.error = error
            return
        if state.error:
            log.info("metrics of %s available again", state.url)
        state.error = ""
        state.reading = reading
        state.scraped_at = sent
        state.marks = marks

    def evaluate(self) -> tuple[int, float]:
        """Computes every upstream's allowance now; ``remaining()`` counts from here.

        Returns:
            ``(allowance, valid_for)``: the pool's allowance and how long it may be trusted.
        """
        now = self.clock()
        staleness = self.thresholds.staleness
        total = 0
        valid_until = math.inf
        for state in self.states:
            allowance = 0
            if state.fresh(now, staleness):
                allowance = upstream_allowance(
                    state.reading, self.thresholds, *state.since_reading()
                )
                if allowance > 0:
                    assert state.scraped_at is not None
                    valid_until = min(valid_until, state.scraped_at + staleness)
            state.allowance = allowance
            state.routed_at_report = state.routed
            total += allowance
        valid_for = valid_until - now if total > 0 else staleness
        self.allowance = total
        return total, max(valid_for, 0.001)

    def note_completed(self, index: int, token: int) -> None:
        """Counts a request routed to upstream ``index`` that has finished; reports soon.

        Args:
            index: The upstream.
            token: What :meth:`note_routed` returned for the request.
        """
        state = self.states[index]
        state.completed += 1
        if token == state.round:
            state.unfinished_in_round -= 1
        # While the upstream has half its allowance left, the credit can wait for a later report.
        if state.remaining() > (self.thresholds.queue_depth + 1) // 2:
            return
        self._credit_pending = True
        if self._crediting is None or self._crediting.done():
            self._crediting = asyncio.ensure_future(self._credit())

    async def _credit(self) -> None:
        while self._credit_pending:
            self._credit_pending = False
            await self._evaluate_and_report()

    async def _evaluate_and_report(self) -> int:
        async with self._report_lock:
            allowance, valid_for = self.evaluate()
            try:
                await self.report(allowance, valid_for)
            except Exception as exc:
                error = str(exc) or type(exc).__name__
                if not self.report_error:
                    log.warning("cannot report saturation to the daemon: %s", error)
                self.report_error = error
            else:
                if self.report_error:
                    log.info("reporting saturation to the daemon again")
                self.report_error = ""
                self.reports += 1
        return allowance

    async def scrape_once(self) -> int:
        """One round: scrape every upstream at once, evaluate, report.

        Returns:
            The allowance reported.
        """
        await asyncio.gather(*(self._scrape(state) for state in self.states))
        return await self._evaluate_and_report()

    async def close(self) -> None:
        """Stops a pending completion report (the caller cancels :meth:`run`)."""
        task = self._crediting
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def run(self) -> None:
        """Scrape and report every scrape interval until cancelled."""
        interval = self.thresholds.scrape_interval
        while True:
            started = self.clock()
            await self.scrape_once()
            await asyncio.sleep(max(0.0, started + interval - self.clock()))

    def snapshot(self) -> list[dict[str, Any]]:
        """Every upstream's state, for the gateway's metrics and logs."""
        now = self.clock()
        out = []
        for state in self.states:
            reading = state.reading
            out.append(
                {
                    "url": state.url,
                    "fresh": state.fresh(now, self.thresholds.staleness),
                    "waiting": None if reading is None else reading.waiting,
                    "kv": None if reading is None else reading.kv,
                    "allowance": state.allowance,
                    "remaining": state.remaining(),
                    "error": state.error,
                }
            )
        return out
