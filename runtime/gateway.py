"""PROCESS: the HTTP gateway (``bandgate gateway``), a reverse proxy for OpenAI-compatible APIs.

Peers: HTTP clients (downstream); one or more OpenAI-compatible servers such as vLLM (upstream,
``--upstream``); the bandgate daemon, through one :class:`~runtime.client.AsyncClient` (admission,
stats, saturation reports); and, unless ``--no-detector``, every upstream's ``/metrics`` through
the :class:`~runtime.detector.Detector` that runs in this process.

Each ``POST`` (an inference request) is admitted through bandgate before it is forwarded:

- flow id: the ``x-gateway-inference-fairness-id`` header (GIE's), else ``default-flow``;
- priority: the header named by ``BANDGATE_GATEWAY_PRIORITY_HEADER`` if present (an int32; a
  malformed value is a 400), else the ``model`` of the JSON body looked up in
  ``BANDGATE_GATEWAY_MODEL_PRIORITIES``, else that map's ``*`` entry, else 0;
- byte size: the length of the body; ttl: ``BANDGATE_GATEWAY_TTL`` (0 = the daemon's default).

A dispatched request goes to the upstream with the fewest requests in flight from this gateway
(ties round-robin), preferring upstreams the detector still gives allowance to; a refused
connection is retried on the next upstream. The response, streamed (SSE) or not, is forwarded
chunk by chunk as it arrives. Its concurrency unit is released when the response ends, when the
upstream fails, or when the client goes away (the handler is cancelled, or a write fails): the
forwarding runs inside ``async with admission`` so every path releases. A request whose client
goes away while it is queued is withdrawn from the daemon at once (its admission is cancelled).
Other methods (``GET /v1/models`` …) are forwarded at once, without admission.
``GET /metrics`` is the gateway's own (``bandgate_gateway_*``: admissions by outcome, priority
and model, responses by status, and the detector's view of each upstream); GIE's flow-control
metrics are the daemon's.

Refusals map as GIE's ``buildErrResponse``: ``rejected_capacity`` → 429; ``evicted_ttl`` and
``evicted_cancelled`` → 503; other outcomes → 500; a daemon that does not answer → 503. Every
refusal carries ``x-bandgate-outcome`` and ``x-bandgate-reason`` headers and an OpenAI-style JSON
error body. 429 and 503 carry ``Retry-After`` (GIE sends none), estimated from the queue the
request would join: ``ceil(queued in bands of its priority or higher / dispatch rate)`` seconds,
clamped to [1, 60], where both come from the daemon's stats polled every second (the rate is an
exponentially weighted mean of dispatches per second, at least 1).

Why aiohttp: one asyncio library that is both a server with streaming responses and handler
cancellation on client disconnect (which is how a queued request is withdrawn and a unit
released) and a client with streaming bodies and connection pooling, in the same event loop as
:class:`~runtime.client.AsyncClient`; it is mature and pure asyncio (no ASGI layer, no second
HTTP stack).

aiohttp, prometheus_client and the daemon client are imported when the gateway starts, not with
this module, so that building ``bandgate``'s command line (which imports it) stays fast.

Invariants: every admission that was dispatched is released exactly once, whatever ends the
request; a request is forwarded only once dispatched; per-upstream in-flight counts return to 0
when no request is in flight; nothing is logged per request above DEBUG.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import difflib
import logging
import math
import os
import signal
import sys
import textwrap
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import msgspec

from ipc.shm_layout import QUEUE_BUCKETS  # GIE's queue-duration buckets (reference §7)
from runtime.config import (
    DEFAULT_LOG_LEVEL,
    ENV_PREFIX,
    LOG_LEVELS,
    VARIABLES,
    ConfigError,
    Variable,
    format_duration,
    parse_duration,
    parse_size,
)
from runtime.detector import SAT_VARIABLES, Detector, Thresholds, pool_saturation
from runtime.outcome import BandgateError, Outcome
from runtime.supervision import ExitCode
from runtime.validation import INT32_MAX, INT32_MIN

if TYPE_CHECKING:
    import aiohttp
    from aiohttp import web
    from multidict import CIMultiDict
    from yarl import URL

    from runtime.client import AsyncClient

__all__ = [
    "DEFAULT_FLOW",
    "FAIRNESS_HEADER",
    "GATEWAY_VARIABLES",
    "Balancer",
    "Gateway",
    "GatewaySettings",
    "QueueEstimator",
    "add_gateway_parser",
    "parse_listen",
    "parse_model_priorities",
    "run_gateway",
    "status_for",
]

log = logging.getLogger("bandgate.gateway")

FAIRNESS_HEADER: Final = "x-gateway-inference-fairness-id"
DEFAULT_FLOW: Final = "default-flow"
DEFAULT_PRIORITY_HEADER: Final = "x-gateway-inference-priority"
OUTCOME_HEADER: Final = "x-bandgate-outcome"
REASON_HEADER: Final = "x-bandgate-reason"
QUEUED_HEADER: Final = "x-bandgate-queued-seconds"
DEFAULT_LISTEN: Final = "127.0.0.1:8080"
GATED_METHODS: Final = frozenset({"POST", "PUT", "PATCH"})
MAX_MODEL_LABELS: Final = 100
RETRY_AFTER_MIN: Final = 1
RETRY_AFTER_MAX: Final = 60
STATS_INTERVAL: Final = 1.0
# Headers that describe one hop, never forwarded (RFC 9110 §7.6.1), plus those aiohttp recomputes.
HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)

GATEWAY_VARIABLES: Final[tuple[Variable, ...]] = (
    Variable(
        f"{ENV_PREFIX}GATEWAY_PRIORITY_HEADER",
        DEFAULT_PRIORITY_HEADER,
        "Gateway: request header carrying a request's priority (a 32-bit integer, higher served "
        "first); it takes precedence over BANDGATE_GATEWAY_MODEL_PRIORITIES. 'none' = no such "
        "header.",
    ),
    Variable(
        f"{ENV_PREFIX}GATEWAY_MODEL_PRIORITIES",
        "(none)",
        "Gateway: priority of a request without the priority header, by the 'model' of its JSON "
        "body: comma-separated model=priority items, e.g. llama-70b=10,llama-8b=0; the item *=P "
        "sets the priority of every other model (default 0).",
    ),
    Variable(
        f"{ENV_PREFIX}GATEWAY_TTL",
        "0",
        "Gateway: queueing deadline of each request it admits; a duration, 0 = the daemon's "
        "BANDGATE_DEFAULT_TTL.",
    ),
)


# -- configuration -------------------------------------------------------------------------------
@dataclass(frozen=True)
class GatewaySettings:
    """The gateway's variables.

    Attributes:
        priority_header: Lower-case name of the priority header; empty = none.
        model_priorities: Priority by model name.
        default_priority: Priority of a request that neither the header nor the map sets.
        ttl: Queueing deadline of each request, None = the daemon's default.
        thresholds: The saturation detector's variables.
        log_level: One of :data:`runtime.config.LOG_LEVELS`.
    """

    priority_header: str = DEFAULT_PRIORITY_HEADER
    model_priorities: Mapping[str, int] = field(default_factory=dict)
    default_priority: int = 0
    ttl: float | None = None
    thresholds: Thresholds = field(default_factory=Thresholds)
    log_level: str = DEFAULT_LOG_LEVEL

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> GatewaySettings:
        """Reads the gateway's variables; unset or empty ones keep their default.

        ``BANDGATE_*`` names that neither the daemon nor the gateway knows are refused, as
        ``bandgate serve`` refuses them, so a typo does not pass silently.

        Args:
            environ: The environment.

        Returns:
            The settings.

        Raises:
            ConfigError: A variable is unknown, malformed or out of range; the message is one
                line naming the variable, its value and what is expected.
        """
        known = {v.name for v in (*VARIABLES, *SAT_VARIABLES, *GATEWAY_VARIABLES)}
        for name in sorted(environ):
            if name.upper().startswith(ENV_PREFIX) and name not in known:
                close = difflib.get_close_matches(name.upper(), sorted(known), n=1, cutoff=0.0)
                hint = f"; did you mean {close[0]}?" if close else ""
                raise ConfigError(f"{name}={environ[name]!r}: unknown variable{hint}")

        def get(suffix: str) -> str:
            return environ.get(ENV_PREFIX + suffix, "").strip()

        header = get("GATEWAY_PRIORITY_HEADER") or DEFAULT_PRIORITY_HEADER
        if header.lower() == "none":
            header = ""
        elif not all(c.isascii() and (c.isalnum() or c in "!#$%&'*+-.^_`|~") for c in header):
            raise ConfigError(
                f"{ENV_PREFIX}GATEWAY_PRIORITY_HEADER={header!r}: expected an HTTP header name "
                "(letters, digits and !#$%&'*+-.^_`|~), or none"
            )
        raw_map = get("GATEWAY_MODEL_PRIORITIES")
        try:
            priorities, default = parse_model_priorities(raw_map)
        except ValueError as exc:
            raise ConfigError(f"{ENV_PREFIX}GATEWAY_MODEL_PRIORITIES={raw_map!r}: {exc}") from None
        ttl: float | None = None
        if raw_ttl := get("GATEWAY_TTL"):
            try:
                ttl = parse_duration(raw_ttl) or None
            except ValueError:
                raise ConfigError(
                    f"{ENV_PREFIX}GATEWAY_TTL={raw_ttl!r}: expected a duration at least 0, "
                    "e.g. 30s, 250ms, 5m"
                ) from None
        level = (get("LOG_LEVEL") or DEFAULT_LOG_LEVEL).upper()
        if level not in LOG_LEVELS:
            raise ConfigError(
                f"{ENV_PREFIX}LOG_LEVEL={get('LOG_LEVEL')!r}: expected one of {', '.join(LOG_LEVELS)}"
            )
        return cls(header.lower(), priorities, default, ttl, Thresholds.from_env(environ), level)


def parse_model_priorities(text: str) -> tuple[dict[str, int], int]:
    """Parses ``model=priority`` items (``*`` = every other model).

    Model names may contain ``=``, ``/`` and ``:``; the priority follows the last ``=``.

    Args:
        text: Comma-separated items; empty = no map.

    Returns:
        ``(priority by model, priority of other models)``.

    Raises:
        ValueError: An item is malformed, a model is listed twice, or a priority is not an int32.
    """
    out: dict[str, int] = {}
    default: int | None = None
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        model, sep, raw = item.rpartition("=")
        model, raw = model.strip(), raw.strip()
        if not sep or not model:
            raise ValueError(f"item {item!r}: expected model=priority, e.g. llama-70b=10")
        try:
            priority = int(raw)
        except ValueError:
            priority = INT32_MAX + 1
        if not INT32_MIN <= priority <= INT32_MAX or not raw.lstrip("+-").isdigit():
            raise ValueError(f"item {item!r}: the priority must be a 32-bit integer")
        if model == "*":
            if default is not None:
                raise ValueError("'*' is listed twice")
            default = priority
        elif model in out:
            raise ValueError(f"model {model!r} is listed twice")
        else:
            out[model] = priority
    return out, 0 if default is None else default


def parse_listen(text: str) -> tuple[str, int]:
    """Parses ``HOST:PORT`` (``[v6addr]:PORT``; an empty host means loopback).

    Args:
        text: The ``--listen`` value.

    Returns:
        ``(host, port)``; port 0 asks for an ephemeral port.

    Raises:
        ValueError: Not HOST:PORT, or the port is not 0..65535.
    """
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"expected HOST:PORT with a port from 0 to 65535, not {text!r}")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


def _upstream_url(text: str) -> URL:
    from yarl import URL

    url = URL(text)
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(f"expected an http:// or https:// URL, not {text!r}")
    if url.query_string or url.fragment:
        raise ValueError(f"an upstream URL takes no query or fragment: {text!r}")
    return url


def status_for(outcome: Outcome) -> int:
    """The HTTP status of a refused request, as GIE's ``buildErrResponse``."""
    if outcome is Outcome.REJECTED_CAPACITY:
        return 429
    if outcome in (Outcome.EVICTED_TTL, Outcome.EVICTED_CANCELLED):
        return 503
    return 500


def _header_text(text: str) -> str:
    """A header-safe (printable ASCII, one line) rendering of ``text``."""
    safe = text.encode("ascii", "backslashreplace").decode("ascii")
    return "".join(c if " " <= c <= "~" else " " for c in safe)[:512]


class _Model(msgspec.Struct):
    model: str = ""


_decode_model = msgspec.json.Decoder(_Model).decode


def _model_of(body: bytes) -> str:
    if not body.startswith(b"{"):
        return ""
    try:
        return _decode_model(body).model
    except (msgspec.DecodeError, msgspec.ValidationError):
        return ""


# -- balancing -----------------------------------------------------------------------------------
class Upstream:
    """One upstream server and this gateway's requests in flight to it."""

    __slots__ = ("index", "inflight", "url")

    def __init__(self, index: int, url: URL) -> None:
        self.index = index
        self.url = url
        self.inflight = 0

    def target(self, path_qs: str) -> URL:
        """The upstream URL of a request for ``path_qs`` (the upstream's path is a prefix)."""
        from yarl import URL

        base = str(self.url).rstrip("/")
        return URL(base + path_qs, encoded=True)


class Balancer:
    """Least in-flight requests, ties broken round-robin.

    With a detector, upstreams that still have allowance are preferred, then those with fresh
    metrics, then any.
    """

    def __init__(self, upstreams: Sequence[Upstream]) -> None:
        self.upstreams = list(upstreams)
        self._next = 0

    def pick(
        self, detector: Detector | None = None, exclude: frozenset[int] = frozenset()
    ) -> Upstream | None:
        """Chooses the upstream for one request.

        Args:
            detector: Prefer upstreams it gives allowance to (None = no preference).
            exclude: Indexes not to choose (already tried for this request).

        Returns:
            The upstream, or None if every one is excluded.
        """
        n = len(self.upstreams)
        start = self._next
        self._next = (start + 1) % n
        order = [self.upstreams[(start + i) % n] for i in range(n)]
        candidates = [u for u in order if u.index not in exclude]
        if detector is not None and len(candidates) > 1:
            for prefer in (detector.has_capacity, detector.fresh):
                preferred = [u for u in candidates if prefer(u.index)]
                if preferred:
                    candidates = preferred
                    break
        if not candidates:
            return None
        return min(candidates, key=lambda u: u.inflight)


# -- Retry-After ---------------------------------------------------------------------------------
class QueueEstimator:
    """Estimates ``Retry-After`` from the daemon's queue and recent dispatch rate.

    Args:
        client: The daemon client whose ``stats()`` it polls.
        interval: Seconds between polls.
    """

    def __init__(self, client: AsyncClient, interval: float = STATS_INTERVAL) -> None:
        self.client = client
        self.interval = interval
        self.queued: dict[int, int] = {}
        self.rate = 0.0
        self._last: tuple[float, dict[int, tuple[int, int]]] | None = None

    def update(self, stats: Mapping[str, Any], now: float) -> None:
        """Folds one stats document in (``now`` is monotonic seconds)."""
        bands: Mapping[int, Mapping[str, Any]] = stats.get("bands", {})
        self.queued = {int(p): int(b.get("len", 0)) for p, b in bands.items()}
        counters = {
            int(p): (int(b.get("generation", 0)), int(b.get("dispatched", 0)))
            for p, b in bands.items()
        }
        if self._last is not None:
            then, before = self._last
            delta = 0
            for p, (gen, count) in counters.items():
                old = before.get(p)
                delta += (
                    count - old[1]
                    if old is not None and old[0] == gen and count >= old[1]
                    else count
                )
            if now > then:
                sample = delta / (now - then)
                self.rate = sample if self.rate == 0.0 else 0.5 * self.rate + 0.5 * sample
        self._last = (now, counters)

    def retry_after(self, priority: int) -> int:
        """Seconds a refused request of ``priority`` should wait, in [1, 60]."""
        ahead = sum(n for p, n in self.queued.items() if p >= priority)
        seconds = math.ceil(ahead / max(self.rate, 1.0))
        return min(RETRY_AFTER_MAX, max(RETRY_AFTER_MIN, seconds))

    async def run(self) -> None:
        """Poll until cancelled; a daemon that does not answer leaves the last estimate."""
        while True:
            try:
                stats = await self.client.stats()
            except (BandgateError, OSError) as exc:
                log.debug("stats unavailable for Retry-After: %s", exc)
            else:
                self.update(stats, time.monotonic())
            await asyncio.sleep(self.interval)


# -- metrics -------------------------------------------------------------------------------------
class _Metrics:
    """The gateway's own metrics, in a private registry.

    GIE's flow-control metrics (reference §7) are the daemon's (``BANDGATE_METRICS_ADDR``); the
    gateway adds what only it knows: models, HTTP status codes and the upstreams. The
    ``model_name`` label comes from request bodies, so only the first :data:`MAX_MODEL_LABELS`
    distinct models get their own; later ones are labelled ``other``.
    """

    def __init__(self) -> None:
        import prometheus_client

        self.registry = prometheus_client.CollectorRegistry(auto_describe=True)
        self.admission = prometheus_client.Histogram(
            "bandgate_gateway_admission_duration_seconds",
            "Time from a request's arrival at the gateway to its outcome, by outcome, priority "
            "and model.",
            ("outcome", "priority", "model_name"),
            buckets=QUEUE_BUCKETS,
            registry=self.registry,
        )
        self.waiting = prometheus_client.Gauge(
            "bandgate_gateway_waiting_requests",
            "Requests of this gateway waiting for their outcome, by priority and model.",
            ("priority", "model_name"),
            registry=self.registry,
        )
        self.pool_saturation = prometheus_client.Gauge(
            "bandgate_gateway_pool_saturation",
            "GIE's gradient saturation of the upstreams (mean of max(waiting / queue threshold, "
            "kv / kv threshold), stale = 1; >= 1 reads saturated); NaN without the detector.",
            registry=self.registry,
        )
        self.responses = prometheus_client.Counter(
            "bandgate_gateway_responses",
            "Responses of the gateway by status code (refusals and upstream answers).",
            ("code",),
            registry=self.registry,
        )
        self.upstream_inflight = prometheus_client.Gauge(
            "bandgate_gateway_upstream_inflight",
            "Requests in flight to each upstream from this gateway.",
            ("upstream",),
            registry=self.registry,
        )
        self.upstream_waiting = prometheus_client.Gauge(
            "bandgate_gateway_upstream_waiting_requests",
            "vllm:num_requests_waiting of each upstream at its last successful scrape.",
            ("upstream",),
            registry=self.registry,
        )
        self.upstream_kv = prometheus_client.Gauge(
            "bandgate_gateway_upstream_kv_cache_usage",
            "KV-cache usage of each upstream at its last successful scrape (fraction).",
            ("upstream",),
            registry=self.registry,
        )
        self.upstream_fresh = prometheus_client.Gauge(
            "bandgate_gateway_upstream_metrics_fresh",
            "1 if the upstream's metrics are fresh, else 0 (it then counts as saturated).",
            ("upstream",),
            registry=self.registry,
        )
        self.allowance = prometheus_client.Gauge(
            "bandgate_gateway_saturation_allowance",
            "Dispatches the detector allowed at its last report.",
            registry=self.registry,
        )
        self._models: set[str] = set()

    def model_label(self, model: str) -> str:
        """The ``model_name`` label of ``model`` (bounded cardinality)."""
        if model in self._models:
            return model
        if len(self._models) < MAX_MODEL_LABELS:
            self._models.add(model)
            return model
        return "other"


# -- the proxy -----------------------------------------------------------------------------------
class Gateway:
    """The reverse proxy's state and handlers.

    Args:
        upstreams: The upstreams' base URLs.
        settings: The gateway's variables.
        socket_dir: The daemon's socket directory (None: ``BANDGATE_SOCKET_DIR`` or the default).
        detector: Whether to run the saturation detector.
        max_body: Largest request body accepted, in bytes.
    """

    def __init__(
        self,
        upstreams: Sequence[str],
        settings: GatewaySettings,
        socket_dir: str | None = None,
        *,
        detector: bool = True,
        max_body: int = 32 * 1024 * 1024,
    ) -> None:
        from runtime.client import AsyncClient

        if not upstreams:
            raise ValueError("at least one upstream is needed")
        self.settings = settings
        self.upstreams = [Upstream(i, _upstream_url(u)) for i, u in enumerate(upstreams)]
        self.balancer = Balancer(self.upstreams)
        self.client = AsyncClient(socket_dir)
        self.estimator = QueueEstimator(self.client)
        self.metrics = _Metrics()
        self.use_detector = detector
        self.detector: Detector | None = None
        self.max_body = max_body
        self.session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def app(self) -> web.Application:
        """The aiohttp application (run it with ``handler_cancellation=True``)."""
        from aiohttp import web

        app = web.Application(client_max_size=self.max_body)
        app.router.add_get("/metrics", self._metrics_handler)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        app.on_startup.append(self._startup)
        app.on_cleanup.append(self._cleanup)
        return app

    async def _startup(self, app: web.Application) -> None:
        import aiohttp

        self.session = aiohttp.ClientSession(
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=60),
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
        )
        try:
            await self.client.stats()
        except (BandgateError, OSError) as exc:
            log.warning("no bandgate daemon yet (%s); requests get 503 until one answers", exc)
        self._tasks.append(asyncio.ensure_future(self.estimator.run()))
        if not self.use_detector:
            # A detector left behind by an earlier gateway would keep the daemon gated.
            with contextlib.suppress(BandgateError, OSError):
                await self.client.clear_saturation()
        if self.use_detector:
            self.detector = Detector(
                [str(u.url) for u in self.upstreams],
                self.settings.thresholds,
                self.session,
                self.client.report_saturation,
            )
            self._tasks.append(asyncio.ensure_future(self.detector.run()))

    async def _cleanup(self, app: web.Application) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if self.detector is not None:
            await self.detector.close()
            # Stopping on purpose: the daemon goes back to its budget alone (a crashed gateway
            # instead leaves its credit to go stale, which fails closed).
            with contextlib.suppress(BandgateError, OSError):
                await self.client.clear_saturation()
        if self.session is not None:
            await self.session.close()
        await self.client.close()

    # -- admission ------------------------------------------------------------------------------
    def _priority(self, request: web.Request, model: str) -> int:
        settings = self.settings
        if settings.priority_header:
            raw = request.headers.get(settings.priority_header)
            if raw is not None:
                text = raw.strip()
                if not text.lstrip("+-").isdigit() or len(text) > 12:
                    raise ValueError(
                        f"{settings.priority_header} must be a 32-bit integer, not {raw!r}"
                    )
                priority = int(text)
                if not INT32_MIN <= priority <= INT32_MAX:
                    raise ValueError(
                        f"{settings.priority_header} must be a 32-bit integer, not {raw!r}"
                    )
                return priority
        return settings.model_priorities.get(model, settings.default_priority)

    def _refusal(
        self, status: int, outcome: str, reason: str, retry_after: int | None = None
    ) -> web.Response:
        from aiohttp import web

        headers = {OUTCOME_HEADER: outcome, REASON_HEADER: _header_text(reason) or outcome}
        if retry_after is not None:
            headers["Retry-After"] = str(retry_after)
        body = {
            "error": {"message": reason or outcome, "type": outcome, "param": None, "code": status}
        }
        self.metrics.responses.labels(str(status)).inc()
        return web.json_response(body, status=status, headers=headers)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.method not in GATED_METHODS:
            return await self._forward(request, await request.read(), gated=False)
        body = await request.read()
        flow = request.headers.get(FAIRNESS_HEADER, "").strip() or DEFAULT_FLOW
        model = _model_of(body)
        try:
            priority = self._priority(request, model)
        except ValueError as exc:
            return self._refusal(400, "bad_request", str(exc))
        m = self.metrics
        started = time.monotonic()
        model_label = m.model_label(model)
        waiting = m.waiting.labels(str(priority), model_label)
        waiting.inc()
        try:
            adm = await self.client.admit(
                flow, priority, byte_size=len(body), ttl=self.settings.ttl
            )
        except ValueError as exc:
            return self._refusal(400, "bad_request", str(exc))
        except (BandgateError, OSError) as exc:
            return self._refusal(
                503, "unavailable", f"bandgate daemon unavailable: {exc}", RETRY_AFTER_MIN
            )
        finally:
            waiting.dec()
        m.admission.labels(adm.outcome.value, str(priority), model_label).observe(
            time.monotonic() - started
        )
        if not adm.dispatched:
            status = status_for(adm.outcome)
            retry = self.estimator.retry_after(priority) if status in (429, 503) else None
            return self._refusal(status, adm.outcome.value, adm.reason, retry)
        async with adm:
            return await self._forward(request, body, gated=True, queued=adm.queued_seconds)

    # -- forwarding -----------------------------------------------------------------------------
    def _request_headers(self, request: web.Request) -> CIMultiDict[str]:
        from multidict import CIMultiDict

        headers: CIMultiDict[str] = CIMultiDict()
        for name, value in request.headers.items():
            if name.lower() not in HOP_BY_HOP:
                headers.add(name, value)
        peer = request.remote or ""
        prior = request.headers.get("X-Forwarded-For")
        headers["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
        headers["X-Forwarded-Proto"] = request.scheme
        if request.host:
            headers["X-Forwarded-Host"] = request.host
        return headers

    async def _forward(
        self, request: web.Request, body: bytes, *, gated: bool, queued: float | None = None
    ) -> web.StreamResponse:
        import aiohttp

        assert self.session is not None
        detector = self.detector if gated else None
        headers = self._request_headers(request)
        tried: set[int] = set()
        last_error = ""
        while True:
            upstream = self.balancer.pick(detector, frozenset(tried))
            if upstream is None:
                return self._refusal(
                    502, "upstream_unavailable", f"no upstream reachable: {last_error}"
                )
            tried.add(upstream.index)
            upstream.inflight += 1
            self.metrics.upstream_inflight.labels(str(upstream.url)).set(upstream.inflight)
            token = detector.note_routed(upstream.index) if detector is not None else 0
            try:
                try:
                    upstream_resp = await self.session.request(
                        request.method,
                        upstream.target(request.raw_path),
                        headers=headers,
                        data=body or None,
                        allow_redirects=False,
                    )
                except aiohttp.ClientConnectorError as exc:
                    why = exc.os_error.strerror or str(exc)
                    last_error = f"{upstream.url}: {why}"
                    log.warning("upstream %s unreachable: %s", upstream.url, why)
                    continue
                except aiohttp.ClientError as exc:
                    return self._refusal(502, "upstream_error", f"{upstream.url}: {exc}")
                async with upstream_resp:
                    return await self._relay(request, upstream_resp, queued)
            finally:
                upstream.inflight -= 1
                self.metrics.upstream_inflight.labels(str(upstream.url)).set(upstream.inflight)
                if detector is not None:
                    detector.note_completed(upstream.index, token)

    async def _relay(
        self, request: web.Request, upstream_resp: aiohttp.ClientResponse, queued: float | None
    ) -> web.StreamResponse:
        import aiohttp
        from aiohttp import web
        from multidict import CIMultiDict

        headers: CIMultiDict[str] = CIMultiDict()
        for name, value in upstream_resp.headers.items():
            if name.lower() not in HOP_BY_HOP or name.lower() == "content-length":
                headers.add(name, value)
        if queued is not None:
            headers[QUEUED_HEADER] = f"{queued:.6f}"
        resp = web.StreamResponse(
            status=upstream_resp.status, reason=upstream_resp.reason, headers=headers
        )
        self.metrics.responses.labels(str(upstream_resp.status)).inc()
        try:
            await resp.prepare(request)
            async for chunk in upstream_resp.content.iter_any():
                await resp.write(chunk)
        except ConnectionError:
            # The client went away: the caller's ``async with`` releases the unit and closes the
            # upstream response (the server sees the disconnect and can abort the generation).
            log.debug("client of %s went away mid-response", request.raw_path)
            upstream_resp.close()
            return resp
        except aiohttp.ClientError as exc:
            # The upstream broke off: end the downstream connection without a clean end, so the
            # client sees a truncated response rather than a complete one.
            log.warning("upstream %s broke off a response: %s", upstream_resp.url.origin(), exc)
            request.protocol.force_close()
            return resp
        await resp.write_eof()
        return resp

    # -- metrics --------------------------------------------------------------------------------
    async def _metrics_handler(self, request: web.Request) -> web.Response:
        import prometheus_client
        from aiohttp import web

        m = self.metrics
        detector = self.detector
        if detector is not None:
            m.allowance.set(detector.allowance)
            m.pool_saturation.set(
                pool_saturation(detector.states, detector.thresholds, time.monotonic())
            )
            for state in detector.snapshot():
                m.upstream_fresh.labels(state["url"]).set(1 if state["fresh"] else 0)
                if state["waiting"] is not None:
                    m.upstream_waiting.labels(state["url"]).set(state["waiting"])
                    m.upstream_kv.labels(state["url"]).set(state["kv"])
        else:
            m.pool_saturation.set(math.nan)
        return web.Response(
            body=prometheus_client.generate_latest(m.registry),
            headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST},
        )


# -- process -------------------------------------------------------------------------------------
async def _serve(args: argparse.Namespace, settings: GatewaySettings) -> int:
    from aiohttp import web

    host, port = parse_listen(args.listen)
    gateway = Gateway(
        args.upstream,
        settings,
        args.socket_dir,
        detector=not args.no_detector,
        max_body=args.max_body,
    )
    runner = web.AppRunner(
        gateway.app(),
        handler_cancellation=True,
        access_log=None,
        shutdown_timeout=args.shutdown_timeout,
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        log.error("cannot listen on %s: %s", args.listen, exc.strerror or exc)
        await runner.cleanup()
        return ExitCode.ERROR
    bound = int(runner.addresses[0][1])
    shown = f"[{host}]" if ":" in host else host
    sys.stdout.write(
        f"bandgate gateway ready listen=http://{shown}:{bound} socket_dir={gateway.client.socket_dir} "
        f"upstreams={','.join(str(u.url) for u in gateway.upstreams)} "
        f"detector={'off' if args.no_detector else 'on'}\n"
    )
    sys.stdout.flush()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info(
        "stopping: no new connections, waiting up to %s for requests in flight",
        format_duration(args.shutdown_timeout),
    )
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(sig)
    await runner.cleanup()
    log.info("stopped")
    return ExitCode.OK


def _duration_arg(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _size_arg(text: str) -> int:
    try:
        size = parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if size < 1:
        raise argparse.ArgumentTypeError("must be at least 1 byte")
    return size


def _listen_arg(text: str) -> str:
    try:
        parse_listen(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _upstream_arg(text: str) -> str:
    try:
        _upstream_url(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _describe(variables: Sequence[Variable]) -> str:
    width = max(len(v.name) for v in variables)
    lines = []
    for v in variables:
        lines.append(f"  {v.name:<{width}}  default {v.default}")
        lines.extend(textwrap.wrap(v.help, 96, initial_indent="      ", subsequent_indent="      "))
    return "\n".join(lines)


GATEWAY_EPILOG = """\
Each POST is admitted through the bandgate daemon (flow from {fairness},
default {default_flow}; priority from the priority header or the model map; byte size = body
length) and forwarded once dispatched. Refusals: rejected_capacity -> 429, evicted_ttl and
evicted_cancelled -> 503, others -> 500, with x-bandgate-outcome and x-bandgate-reason
headers; 429 and 503 carry Retry-After. GET /metrics serves the gateway's own metrics.

Environment (also BANDGATE_LOG_LEVEL and BANDGATE_SOCKET_DIR):

{variables}
"""


def add_gateway_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Adds the ``gateway`` command to ``bandgate``'s subparsers.

    Args:
        subparsers: The object returned by ``ArgumentParser.add_subparsers``.

    Returns:
        The ``gateway`` parser.
    """
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "gateway",
        help="run the HTTP gateway: a reverse proxy for OpenAI-compatible servers",
        description="Reverse proxy for OpenAI-compatible APIs (vLLM...) that admits every "
        "request through the bandgate daemon. Prints a line containing 'ready' once it serves.",
        epilog=GATEWAY_EPILOG.format(
            fairness=FAIRNESS_HEADER,
            default_flow=DEFAULT_FLOW,
            variables=_describe((*GATEWAY_VARIABLES, *SAT_VARIABLES)),
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--upstream",
        action="append",
        required=True,
        type=_upstream_arg,
        metavar="URL",
        help="base URL of an OpenAI-compatible server, e.g. http://127.0.0.1:8000; repeat for "
        "several (balanced by least requests in flight)",
    )
    parser.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        type=_listen_arg,
        metavar="HOST:PORT",
        help=f"address to serve on (default {DEFAULT_LISTEN}, loopback; port 0 = ephemeral)",
    )
    parser.add_argument(
        "--socket-dir",
        help="the daemon's socket directory (default: BANDGATE_SOCKET_DIR or the default)",
    )
    parser.add_argument(
        "--no-detector",
        action="store_true",
        help="do not scrape the upstreams' /metrics: dispatch is gated by the daemon's "
        "concurrency budget only (for servers without vLLM metrics)",
    )
    parser.add_argument(
        "--max-body",
        default=32 * 1024 * 1024,
        type=_size_arg,
        metavar="SIZE",
        help="largest request body accepted (default 32MiB); larger ones get 413",
    )
    parser.add_argument(
        "--shutdown-timeout",
        default=10.0,
        type=_duration_arg,
        metavar="DURATION",
        help="on SIGTERM/SIGINT, how long requests in flight may finish (default 10s)",
    )
    return parser


def run_gateway(args: argparse.Namespace) -> int:
    """Runs ``bandgate gateway`` until SIGTERM or SIGINT.

    Args:
        args: The parsed arguments of the parser made by :func:`add_gateway_parser`.

    Returns:
        The exit code: 0 after a signal, 2 for a bad variable, 1 if it cannot listen.
    """
    try:
        settings = GatewaySettings.from_env(os.environ)
    except ConfigError as exc:
        sys.stderr.write(f"bandgate gateway: {exc}\n")
        return ExitCode.CONFIG_ERROR
    from runtime import logsetup

    logsetup.setup(settings.log_level, "gateway")
    return asyncio.run(_serve(args, settings))


def main(argv: list[str] | None = None) -> int:
    """``python -m runtime.gateway``: the same as ``bandgate gateway``."""
    parser = argparse.ArgumentParser(prog="bandgate")
    add_gateway_parser(parser.add_subparsers(dest="command", required=True))
    return run_gateway(
        parser.parse_args(["gateway", *(argv if argv is not None else sys.argv[1:])])
    )


if __name__ == "__main__":
    sys.exit(main())
