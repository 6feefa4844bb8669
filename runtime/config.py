"""Daemon configuration: every tunable is a ``BANDGATE_*`` environment variable.

Role:
    Runs in the coordinator process, once, at start: :func:`load` reads the environment, applies
    the defaults (the ``DEFAULT_*`` constants below, most of them GIE's) and validates every
    value. The resulting :class:`Config` is a frozen msgspec Struct; it travels to the shard and
    GC processes as msgpack bytes (``msgspec.msgpack.encode(config)`` /
    ``msgspec.msgpack.Decoder(Config)``), so children never read the environment themselves.

Peers:
    ``runtime.__main__`` calls :func:`load` and prints :func:`describe_variables` for
    ``bandgate serve --help``; the README's variable table is built from :data:`VARIABLES` too.
    Fairness and ordering policies appear here only as *names* (:data:`FAIRNESS_NAMES`,
    :data:`ORDERING_NAMES`); a unit test next to ``runtime.policies`` checks that these tuples
    match its registries, so this module imports nothing from there.

Invariants:
    - :func:`load` reads exactly the names in :data:`VARIABLES`, in table order, and nothing
      else with the ``BANDGATE_`` prefix. Any other ``BANDGATE_*`` name in the environment (the
      prefix compared case-insensitively) is an error suggesting the closest known name, so a
      typo never passes silently.
    - Every :class:`Config` returned by :func:`load` satisfies all the rules in
      :data:`VARIABLES`, including the cross-variable ones (``shards <= max_shards``,
      ``band_gc_timeout >= flow_gc_timeout``, ``gc_interval <= flow_gc_timeout``,
      ``max_bands > len(bands)``).
    - A bad value raises :class:`ConfigError` whose message is one line of the form
      ``NAME='value': what was expected``; a cross-variable error names both variables and
      values. Values are shown with ``repr``, so a value holding a newline still yields one
      line. Only the first problem found is reported.
    - Leading and trailing whitespace is stripped from every value. An empty value is validated
      like any other: it is meaningful only for ``BANDGATE_BANDS`` and ``BANDGATE_SOCKET_GROUP``
      (both mean "none") and an error everywhere else.

Value syntax:
    - integer: plain ASCII decimal digits; a sign only where a priority is expected.
    - duration (seconds, float): a decimal number with an optional unit ``ms``, ``s``, ``m`` or
      ``h`` (no unit means seconds), see :func:`parse_duration`.
    - size (bytes, int): a decimal number with an optional decimal (``KB``, ``MB``, ``GB``, also
      ``k``, ``m``, ``g``) or binary (``KiB``, ``MiB``, ``GiB``) unit, see :func:`parse_size`.
"""

from __future__ import annotations

import difflib
import grp
import os
import re
import textwrap
import threading
from collections.abc import Mapping
from decimal import Decimal
from fractions import Fraction
from typing import Final

import msgspec

__all__ = [
    "BAND_GC_TIMEOUT_FACTOR",
    "DEFAULT_BANDS",
    "DEFAULT_BAND_MAX_BYTES",
    "DEFAULT_DEFAULT_TTL",
    "DEFAULT_FAIRNESS",
    "DEFAULT_FLOW_GC_TIMEOUT",
    "DEFAULT_GC_PHASE_DELAY",
    "DEFAULT_GC_PREPARE_TIMEOUT",
    "DEFAULT_LOG_LEVEL",
    "DEFAULT_MAX_BANDS",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_FLOWS",
    "DEFAULT_MAX_FRAME",
    "DEFAULT_MAX_INFLIGHT",
    "DEFAULT_METRICS_ADDR",
    "DEFAULT_METRICS_MAX_FLOWS",
    "DEFAULT_ORDERING",
    "DEFAULT_SHUTDOWN_TIMEOUT",
    "DEFAULT_SOCKET_GROUP",
    "ENV_PREFIX",
    "FAIRNESS_NAMES",
    "GC_INTERVAL_DIVISOR",
    "LOG_LEVELS",
    "MAX_BAND_NAME_LENGTH",
    "MAX_DURATION",
    "MAX_GC_INTERVAL",
    "MAX_INFLIGHT_LIMIT",
    "MAX_MAX_BANDS",
    "MAX_MAX_FLOWS",
    "MAX_MAX_FRAME",
    "MAX_MAX_SHARDS",
    "MAX_PRIORITY",
    "MAX_SIZE",
    "MAX_SOCKET_DIR_BYTES",
    "MIN_GC_INTERVAL",
    "MIN_MAX_FLOWS",
    "MIN_MAX_FRAME",
    "MIN_MAX_SHARDS",
    "MIN_PRIORITY",
    "ORDERING_NAMES",
    "VARIABLES",
    "BandSpec",
    "Config",
    "ConfigError",
    "Variable",
    "available_cpus",
    "band_capacity",
    "default_socket_dir",
    "describe_variables",
    "format_duration",
    "format_size",
    "load",
    "parse_duration",
    "parse_size",
    "socket_gid",
]

# --------------------------------------------------------------------------------------------
# Defaults and limits. Prose elsewhere names these constants and never restates their values.
# --------------------------------------------------------------------------------------------

ENV_PREFIX: Final = "BANDGATE_"
"""Prefix shared by every variable; any other name with it is rejected as a likely typo."""

DEFAULT_MAX_INFLIGHT: Final = 100
"""Global concurrency budget (dispatched, not yet released requests).

GIE's concurrency detector default ``MaxConcurrency`` per endpoint. Set it to your backends'
total concurrent-request capacity.
"""

MAX_INFLIGHT_LIMIT: Final = 2**31 - 1
"""Largest budget: the budget is a counting semaphore, whose value is a C ``int``."""

DEFAULT_MAX_BYTES: Final = 0
"""Global queued-bytes limit across all bands and shards; 0 means no limit (GIE ``MaxBytes``)."""

MAX_SIZE: Final = 2**63 - 1
"""Largest byte count any size variable accepts, so it fits a signed 64-bit shared-memory word."""

DEFAULT_BANDS: Final = ""
"""No static bands: every band is dynamic, as in GIE's EPP, which configured none."""

DEFAULT_BAND_MAX_BYTES: Final = 1_000_000_000
"""Queued-bytes limit of a band that sets none (GIE's band ``MaxBytes`` default, decimal 1 GB)."""

MAX_BAND_NAME_LENGTH: Final = 64
"""Longest static band name."""

MIN_PRIORITY: Final = -(2**31)
"""Lowest band priority (int32, as priorities are stored in shared memory)."""

MAX_PRIORITY: Final = 2**31 - 1
"""Highest band priority (int32)."""

FAIRNESS_NAMES: Final = ("global-strict", "round-robin")
"""Names of the inter-flow fairness policies; must match ``runtime.policies``' registry."""

DEFAULT_FAIRNESS: Final = "global-strict"
"""GIE's default fairness plugin (``global-strict-fairness-policy``)."""

ORDERING_NAMES: Final = ("fcfs", "edf")
"""Names of the intra-flow ordering policies; must match ``runtime.policies``' registry."""

DEFAULT_ORDERING: Final = "fcfs"
"""GIE's default ordering policy (``FCFS``)."""

DEFAULT_DEFAULT_TTL: Final = 0.0
"""Request TTL, in seconds, when the client gives none; 0 means none (GIE ``DefaultRequestTTL``)."""

DEFAULT_FLOW_GC_TIMEOUT: Final = 300.0
"""Seconds a flow must stay idle before it is collected (GIE ``defaultFlowGCTimeout``)."""

BAND_GC_TIMEOUT_FACTOR: Final = 2
"""The band GC timeout defaults to this multiple of the flow GC timeout.

GIE: ``defaultPriorityBandGCTimeout = 2 * defaultFlowGCTimeout``, "to ensure flows are cleaned up
first".
"""

GC_INTERVAL_DIVISOR: Final = 4
"""The GC interval defaults to the flow GC timeout divided by this, then clamped.

GIE ticks once per flow GC timeout, so a flow lives up to twice its timeout; ticking a few times
per timeout bounds the overshoot to a fraction of it at a negligible cost (one shared-memory scan).
"""

MIN_GC_INTERVAL: Final = 0.005
"""Lower clamp of the default GC interval, in seconds, so tiny test timeouts do not spin."""

MAX_GC_INTERVAL: Final = 30.0
"""Upper clamp of the default GC interval, in seconds, so long timeouts still see prompt GC."""

DEFAULT_GC_PREPARE_TIMEOUT: Final = 2.0
# Fault injection for tests: GC waits a random time up to this between the steps of a removal,
# widening the windows in which requests race with it. 0 (no delay) in production.
DEFAULT_GC_PHASE_DELAY: Final = 0.0
# Prometheus endpoint: loopback only unless the operator opens it; "0" turns it off.
DEFAULT_METRICS_ADDR: Final = "127.0.0.1:9464"
# Flow ids become a label; past this many flows per scrape the rest are summed as "other".
DEFAULT_METRICS_MAX_FLOWS: Final = 100
"""Seconds GC waits for every shard's prepare vote (phase 2) before it aborts the removal."""

DEFAULT_MAX_FLOWS: Final = 65536
"""Slots in the shared-memory flow table (fixed at start)."""

MIN_MAX_FLOWS: Final = 16
"""Smallest flow table."""

MAX_MAX_FLOWS: Final = 4_194_304
"""Largest flow table; bounds the shared-memory segment (lease rows grow with it)."""

DEFAULT_MAX_BANDS: Final = 256
"""Slots in the shared-memory band table (static bands plus dynamic ones)."""

MAX_MAX_BANDS: Final = 65536
"""Largest band table."""

DEFAULT_MAX_FRAME: Final = 65536
"""Largest wire frame, in bytes, a shard or the coordinator accepts."""

MIN_MAX_FRAME: Final = 4096
"""Smallest accepted frame limit: room for any control message."""

MAX_MAX_FRAME: Final = 16 * 1024 * 1024
"""Largest accepted frame limit: a peer can make a process buffer this much per connection."""

MIN_MAX_SHARDS: Final = 16
"""The shard table has at least this many rows, so the daemon can scale up past its start count."""

MAX_MAX_SHARDS: Final = 1024
"""Largest shard table."""

DEFAULT_SHUTDOWN_TIMEOUT: Final = 10.0
"""Seconds the coordinator lets children drain after SIGTERM before it kills them."""

DEFAULT_SOCKET_GROUP: Final = ""
"""No group: sockets are accessible to their owner only."""

LOG_LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR")
"""Accepted log levels (matched case-insensitively, stored upper-case)."""

DEFAULT_LOG_LEVEL: Final = "INFO"
"""Lifecycle events only; per-GC-cycle and per-request detail is DEBUG."""

MAX_DURATION: Final = threading.TIMEOUT_MAX
"""Longest duration accepted, in seconds: durations end up as blocking-wait timeouts."""

# A Unix socket path must fit sun_path: 108 bytes on Linux, including the terminating NUL. The
# daemon places its sockets directly in the socket directory; this reserve leaves room for "/" and
# a socket file name of up to 15 bytes (e.g. "shard-1023.sock").
_SUN_PATH_BYTES: Final = 108
_SOCKET_NAME_RESERVE: Final = 16
MAX_SOCKET_DIR_BYTES: Final = _SUN_PATH_BYTES - 1 - _SOCKET_NAME_RESERVE
"""Longest socket directory, in bytes of its file-system encoding."""

_DURATION_EXAMPLES: Final = "such as 0.5, 250ms, 30s, 5m or 1h"
_SIZE_EXAMPLES: Final = "such as 1024, 10KB, 10MB, 1GB or 64KiB"
_BANDS_EXAMPLE: Final = "critical:100,standard:0,sheddable:-100"

# --------------------------------------------------------------------------------------------
# Types
# --------------------------------------------------------------------------------------------


class ConfigError(ValueError):
    """A ``BANDGATE_*`` variable is malformed, out of range or unknown.

    The message is a single line that names the variable, repeats its value and says what is
    expected, so ``bandgate serve`` can print it as is.
    """


class BandSpec(msgspec.Struct, frozen=True, array_like=True):
    """A static priority band, from ``BANDGATE_BANDS``. Static bands are never collected.

    Attributes:
        name: Band name, unique among static bands, matching ``[A-Za-z0-9_.-]`` and at most
            :data:`MAX_BAND_NAME_LENGTH` characters.
        priority: Band priority, unique, in ``MIN_PRIORITY..MAX_PRIORITY``; higher is served first.
        max_bytes: Queued-bytes limit of this band; 0 means :attr:`Config.band_max_bytes`
            (use :func:`band_capacity` rather than reading it directly).
    """

    name: str
    priority: int
    max_bytes: int


class Config(msgspec.Struct, frozen=True):
    """The validated daemon configuration; built by :func:`load`, immutable afterwards.

    Durations are float seconds, sizes are int bytes. Field order is part of the msgpack form
    exchanged between processes of one daemon (all from the same installation).

    Attributes:
        socket_dir: Absolute directory holding the daemon's Unix sockets.
        shards: Shard workers started.
        max_shards: Rows of the shared-memory shard table; the upper bound for runtime scaling.
        max_inflight: Global concurrency budget; 0 means no limit.
        max_bytes: Global queued-bytes limit; 0 means no limit.
        bands: Static bands. Invariant: sorted by priority, highest first; names and priorities
            unique.
        band_max_bytes: Queued-bytes limit of a band that sets none (every dynamic band).
        fairness: Inter-flow fairness policy name, one of :data:`FAIRNESS_NAMES`.
        ordering: Intra-flow ordering policy name, one of :data:`ORDERING_NAMES`.
        default_ttl: Request TTL when the client gives none; 0 means none.
        flow_gc_timeout: Idle time after which a flow is collected.
        band_gc_timeout: Idle time after which a dynamic band is collected.
            Invariant: ``band_gc_timeout >= flow_gc_timeout``.
        gc_interval: Period of the GC process's cycle.
            Invariant: ``gc_interval <= flow_gc_timeout``.
        gc_prepare_timeout: How long GC waits for shard votes in phase 2 before aborting.
        max_flows: Slots in the shared-memory flow table.
        max_bands: Slots in the shared-memory band table. Invariant: ``max_bands > len(bands)``.
        max_frame: Largest wire frame accepted, in bytes.
        shutdown_timeout: Drain deadline after SIGTERM.
        socket_group: Group (name or numeric gid) given access to the sockets; "" means owner only.
        log_level: One of :data:`LOG_LEVELS`.
    """

    socket_dir: str
    shards: int
    max_shards: int
    max_inflight: int
    max_bytes: int
    bands: tuple[BandSpec, ...]
    band_max_bytes: int
    fairness: str
    ordering: str
    default_ttl: float
    flow_gc_timeout: float
    band_gc_timeout: float
    gc_interval: float
    gc_prepare_timeout: float
    max_flows: int
    max_bands: int
    max_frame: int
    shutdown_timeout: float
    socket_group: str
    log_level: str
    gc_phase_delay: float = 0.0
    metrics_addr: str = ""
    metrics_max_flows: int = 100


class Variable(msgspec.Struct, frozen=True):
    """One environment variable, as documented by ``bandgate serve --help`` and the README.

    Attributes:
        name: The variable's name, with the :data:`ENV_PREFIX`.
        default: Human-readable default (a value in the variable's own syntax, or a rule).
        help: What the variable controls and which values it accepts.
    """

    name: str
    default: str
    help: str


# --------------------------------------------------------------------------------------------
# Value parsers and formatters
# --------------------------------------------------------------------------------------------

_DURATION_RE: Final = re.compile(
    r"(?P<number>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(?P<unit>ms|s|m|h)?", re.ASCII
)
_DURATION_UNITS: Final[Mapping[str, Fraction]] = {
    "": Fraction(1),
    "ms": Fraction(1, 1000),
    "s": Fraction(1),
    "m": Fraction(60),
    "h": Fraction(3600),
}

_SIZE_RE: Final = re.compile(r"(?P<number>[0-9]+(?:\.[0-9]+)?)\s*(?P<unit>[A-Za-z]*)", re.ASCII)
_KB: Final = 1000
_KIB: Final = 1024
_SIZE_UNITS: Final[Mapping[str, int]] = {
    "": 1,
    "b": 1,
    "k": _KB,
    "kb": _KB,
    "m": _KB**2,
    "mb": _KB**2,
    "g": _KB**3,
    "gb": _KB**3,
    "ki": _KIB,
    "kib": _KIB,
    "mi": _KIB**2,
    "mib": _KIB**2,
    "gi": _KIB**3,
    "gib": _KIB**3,
}
# Units format_size may emit, largest first; each parses back through _SIZE_UNITS.
_SIZE_FORMAT_UNITS: Final = (
    ("GiB", _KIB**3),
    ("GB", _KB**3),
    ("MiB", _KIB**2),
    ("MB", _KB**2),
    ("KiB", _KIB),
    ("KB", _KB),
)

_UNSIGNED_INT_RE: Final = re.compile(r"[0-9]+", re.ASCII)
_SIGNED_INT_RE: Final = re.compile(r"[+-]?[0-9]+", re.ASCII)
_MAX_INT_DIGITS: Final = 64
_BAND_NAME_RE: Final = re.compile(rf"[A-Za-z0-9_.-]{{1,{MAX_BAND_NAME_LENGTH}}}", re.ASCII)


def parse_duration(text: str) -> float:
    """Parses a duration into seconds.

    Accepts a non-negative decimal number with an optional unit: ``ms``, ``s``, ``m`` or ``h``
    (no unit means seconds), e.g. ``0.5``, ``2``, ``250ms``, ``1.5s``, ``5m``, ``1h``. Surrounding
    whitespace is ignored. Units are case-sensitive, as in Go's ``time.ParseDuration``.

    Args:
        text: The text to parse.

    Returns:
        The duration in seconds.

    Raises:
        ValueError: The text is not a duration, is negative, or exceeds :data:`MAX_DURATION`.
    """
    stripped = text.strip()
    if stripped.startswith("-") and _DURATION_RE.fullmatch(stripped[1:]):
        raise ValueError(f"negative duration: {text!r}")
    match = _DURATION_RE.fullmatch(stripped)
    if match is None:
        raise ValueError(f"not a duration: {text!r}")
    # Exact rational arithmetic keeps "0.1h" at exactly 360 s before the one rounding to float.
    exact = Fraction(match["number"]) * _DURATION_UNITS[match["unit"] or ""]
    if exact > MAX_DURATION:
        raise ValueError(f"duration too long: {text!r}")
    return float(exact)


def parse_size(text: str) -> int:
    """Parses a byte size.

    Accepts a non-negative decimal number with an optional unit: decimal ``KB``, ``MB``, ``GB``
    (also ``k``, ``m``, ``g``), binary ``KiB``, ``MiB``, ``GiB`` (also ``Ki``, ``Mi``, ``Gi``) or
    ``B``; units are case-insensitive. A fraction is accepted if the result is a whole number of
    bytes (``1.5KB`` is 1500). Surrounding whitespace is ignored.

    Args:
        text: The text to parse.

    Returns:
        The size in bytes.

    Raises:
        ValueError: The text is not a size, is negative, or is not a whole number of bytes.
    """
    stripped = text.strip()
    if stripped.startswith("-") and _SIZE_RE.fullmatch(stripped[1:]):
        raise ValueError(f"negative size: {text!r}")
    match = _SIZE_RE.fullmatch(stripped)
    if match is None:
        raise ValueError(f"not a size: {text!r}")
    multiplier = _SIZE_UNITS.get(match["unit"].lower())
    if multiplier is None:
        raise ValueError(f"unknown size unit {match['unit']!r} in {text!r}")
    exact = Fraction(match["number"]) * multiplier
    if exact.denominator != 1:
        raise ValueError(f"not a whole number of bytes: {text!r}")
    return exact.numerator


def format_duration(seconds: float) -> str:
    """Formats seconds in the largest unit that represents them exactly.

    The result parses back to the same value with :func:`parse_duration`.

    Args:
        seconds: A non-negative duration in seconds.

    Returns:
        Text such as ``0``, ``250ms``, ``30s``, ``5m`` or ``1h``.
    """
    if seconds == 0:
        return "0"
    for unit, size in (("h", 3600), ("m", 60), ("s", 1)):
        if seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    millis = seconds * 1000
    if millis.is_integer() and float(Fraction(int(millis), 1000)) == seconds:
        return f"{int(millis)}ms"
    return f"{Decimal(repr(seconds)):f}s"


def format_size(size: int) -> str:
    """Formats bytes in the largest unit that represents them exactly.

    The result parses back to the same value with :func:`parse_size`.

    Args:
        size: A non-negative byte count.

    Returns:
        Text such as ``0``, ``1000``, ``64KiB``, ``16MiB`` or ``1GB``.
    """
    if size > 0:
        for unit, multiplier in _SIZE_FORMAT_UNITS:
            if size % multiplier == 0:
                return f"{size // multiplier}{unit}"
    return str(size)


# --------------------------------------------------------------------------------------------
# Derived defaults and lookups
# --------------------------------------------------------------------------------------------


def available_cpus() -> int:
    """Returns the number of CPUs this process may run on (its affinity mask, not the host's).

    Returns:
        At least 1.
    """
    return max(1, len(os.sched_getaffinity(0)))


def default_socket_dir(environ: Mapping[str, str]) -> str:
    """Returns the socket directory used when ``BANDGATE_SOCKET_DIR`` is unset.

    Args:
        environ: The environment to consult for ``XDG_RUNTIME_DIR``.

    Returns:
        ``$XDG_RUNTIME_DIR/bandgate`` if ``XDG_RUNTIME_DIR`` is set and not blank, else
        ``/tmp/bandgate-<uid>``.
    """
    runtime_dir = environ.get("XDG_RUNTIME_DIR", "").strip()
    if runtime_dir:
        return os.path.join(runtime_dir, "bandgate")
    return f"/tmp/bandgate-{os.getuid()}"


def band_capacity(config: Config, priority: int) -> int:
    """Returns the queued-bytes limit of the band at ``priority``.

    Args:
        config: The daemon configuration.
        priority: A band priority, static or dynamic.

    Returns:
        The static band's ``max_bytes`` if that band exists and sets one, else
        ``config.band_max_bytes``.
    """
    for band in config.bands:
        if band.priority == priority:
            return band.max_bytes or config.band_max_bytes
    return config.band_max_bytes


# --------------------------------------------------------------------------------------------
# The variable table
# --------------------------------------------------------------------------------------------

VARIABLES: Final[tuple[Variable, ...]] = (
    Variable(
        "BANDGATE_SOCKET_DIR",
        "$XDG_RUNTIME_DIR/bandgate",
        "Directory for the daemon's Unix sockets; an absolute path of at most "
        f"{MAX_SOCKET_DIR_BYTES} bytes. Without XDG_RUNTIME_DIR the default is "
        "/tmp/bandgate-<uid>.",
    ),
    Variable(
        "BANDGATE_SHARDS",
        "available CPUs",
        "Shard worker processes started; an integer from 1 to BANDGATE_MAX_SHARDS. The default "
        "is the number of CPUs the process may run on, at most BANDGATE_MAX_SHARDS.",
    ),
    Variable(
        "BANDGATE_MAX_SHARDS",
        f"max({MIN_MAX_SHARDS}, BANDGATE_SHARDS)",
        "Rows of the shared-memory shard table, the upper bound for scaling shards at run time; "
        f"an integer from 1 to {MAX_MAX_SHARDS}.",
    ),
    Variable(
        "BANDGATE_MAX_INFLIGHT",
        str(DEFAULT_MAX_INFLIGHT),
        "Global concurrency budget: requests dispatched and not yet released. Set it to your "
        "backends' total concurrent-request capacity. An integer from 0 (no limit) to "
        f"{MAX_INFLIGHT_LIMIT}.",
    ),
    Variable(
        "BANDGATE_MAX_BYTES",
        format_size(DEFAULT_MAX_BYTES),
        "Global limit on queued request bytes, across all bands and shards; a size, 0 = no limit.",
    ),
    Variable(
        "BANDGATE_BANDS",
        "(none)",
        "Static priority bands, never collected: comma-separated name:priority or "
        f"name:priority:max_bytes items, e.g. {_BANDS_EXAMPLE}. Names are unique, "
        f"1-{MAX_BAND_NAME_LENGTH} characters of [A-Za-z0-9_.-]; priorities are unique 32-bit "
        "integers, higher served first; max_bytes is a size, 0 = BANDGATE_BAND_MAX_BYTES.",
    ),
    Variable(
        "BANDGATE_BAND_MAX_BYTES",
        format_size(DEFAULT_BAND_MAX_BYTES),
        "Queued-bytes limit of each band that sets none (all dynamic bands); a size > 0.",
    ),
    Variable(
        "BANDGATE_FAIRNESS",
        DEFAULT_FAIRNESS,
        "Fairness policy choosing the flow to serve within a band; one of "
        f"{', '.join(FAIRNESS_NAMES)}.",
    ),
    Variable(
        "BANDGATE_ORDERING",
        DEFAULT_ORDERING,
        "Ordering policy choosing the request to serve within a flow; one of "
        f"{', '.join(ORDERING_NAMES)}.",
    ),
    Variable(
        "BANDGATE_DEFAULT_TTL",
        format_duration(DEFAULT_DEFAULT_TTL),
        "Queueing deadline of a request that sets none; a duration, 0 = none.",
    ),
    Variable(
        "BANDGATE_FLOW_GC_TIMEOUT",
        format_duration(DEFAULT_FLOW_GC_TIMEOUT),
        "Idle time after which a flow is garbage-collected; a duration > 0.",
    ),
    Variable(
        "BANDGATE_BAND_GC_TIMEOUT",
        f"{BAND_GC_TIMEOUT_FACTOR} x BANDGATE_FLOW_GC_TIMEOUT",
        "Idle time after which a dynamic band is garbage-collected; a duration, at least "
        "BANDGATE_FLOW_GC_TIMEOUT so that flows are collected first.",
    ),
    Variable(
        "BANDGATE_GC_INTERVAL",
        f"flow GC timeout / {GC_INTERVAL_DIVISOR}",
        "Period of the garbage-collection cycle; a duration > 0, at most "
        "BANDGATE_FLOW_GC_TIMEOUT. The default is clamped to "
        f"[{format_duration(MIN_GC_INTERVAL)}, {format_duration(MAX_GC_INTERVAL)}].",
    ),
    Variable(
        "BANDGATE_GC_PREPARE_TIMEOUT",
        format_duration(DEFAULT_GC_PREPARE_TIMEOUT),
        "How long garbage collection waits for every shard's vote before it aborts a removal; "
        "a duration > 0.",
    ),
    Variable(
        "BANDGATE_MAX_FLOWS",
        str(DEFAULT_MAX_FLOWS),
        "Capacity of the shared-memory flow table (live flows at once); an integer from "
        f"{MIN_MAX_FLOWS} to {MAX_MAX_FLOWS}.",
    ),
    Variable(
        "BANDGATE_MAX_BANDS",
        str(DEFAULT_MAX_BANDS),
        "Capacity of the shared-memory band table (static plus dynamic bands); an integer "
        f"greater than the number of static bands, at most {MAX_MAX_BANDS}.",
    ),
    Variable(
        "BANDGATE_MAX_FRAME",
        format_size(DEFAULT_MAX_FRAME),
        f"Largest wire frame accepted; a size from {format_size(MIN_MAX_FRAME)} to "
        f"{format_size(MAX_MAX_FRAME)}.",
    ),
    Variable(
        "BANDGATE_SHUTDOWN_TIMEOUT",
        format_duration(DEFAULT_SHUTDOWN_TIMEOUT),
        "How long a stopping daemon waits for its processes to exit (waiting requests get "
        "evicted_other at once) before it kills them; a duration > 0.",
    ),
    Variable(
        "BANDGATE_SOCKET_GROUP",
        "(owner only)",
        "Existing group (name or numeric gid) given read-write access to the sockets; "
        "empty = owner only.",
    ),
    Variable(
        "BANDGATE_LOG_LEVEL",
        DEFAULT_LOG_LEVEL,
        f"Log level; one of {', '.join(LOG_LEVELS)} (case-insensitive).",
    ),
    Variable(
        "BANDGATE_GC_PHASE_DELAY",
        format_duration(DEFAULT_GC_PHASE_DELAY),
        "Testing knob: garbage collection waits a random time up to this between the steps "
        "of a removal, to widen the races with admissions; a duration, 0 = none.",
    ),
    Variable(
        "BANDGATE_METRICS_ADDR",
        DEFAULT_METRICS_ADDR,
        "HOST:PORT of the Prometheus endpoint (/metrics, /healthz); 0 = off. Loopback by default.",
    ),
    Variable(
        "BANDGATE_METRICS_MAX_FLOWS",
        str(DEFAULT_METRICS_MAX_FLOWS),
        "Most flow ids exported as metric labels (the busiest); the rest are summed under "
        'fairness_id="other". An integer from 1 to 100000.',
    ),
)

_KNOWN_NAMES: Final = frozenset(variable.name for variable in VARIABLES)


def describe_variables() -> str:
    """Renders :data:`VARIABLES` as a plain-text table for ``bandgate serve --help``.

    Returns:
        One header row and one entry per variable in table order, with the name, default and
        help columns aligned; long help text wraps under the help column.
    """
    name_width = max(len("VARIABLE"), *(len(v.name) for v in VARIABLES))
    default_width = max(len("DEFAULT"), *(len(v.default) for v in VARIABLES))
    indent = " " * (name_width + default_width + 4)
    help_width = max(40, 100 - len(indent))
    lines = [f"{'VARIABLE':<{name_width}}  {'DEFAULT':<{default_width}}  DESCRIPTION"]
    for variable in VARIABLES:
        wrapped = textwrap.wrap(variable.help, help_width, break_on_hyphens=False) or [""]
        lines.append(
            f"{variable.name:<{name_width}}  {variable.default:<{default_width}}  {wrapped[0]}"
        )
        lines.extend(indent + more for more in wrapped[1:])
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _fail(name: str, raw: str, detail: str) -> ConfigError:
    """Builds the one-line error ``NAME='raw': detail`` (``repr`` escapes any newline)."""
    return ConfigError(f"{name}={raw!r}: {detail}")


def other_commands_variables() -> tuple[Variable, ...]:
    """Variables read by ``bandgate gateway`` (and its detector), not by the daemon.

    The daemon accepts and ignores them, so one environment can configure both commands.
    """
    from runtime.detector import SAT_VARIABLES
    from runtime.gateway import GATEWAY_VARIABLES

    return (*GATEWAY_VARIABLES, *SAT_VARIABLES)


def _check_unknown(environ: Mapping[str, str]) -> None:
    """Rejects ``BANDGATE_*`` names (prefix case-insensitive) no bandgate command reads."""
    known = _KNOWN_NAMES | {v.name for v in other_commands_variables()}
    suffixes = {name[len(ENV_PREFIX) :]: name for name in known}
    for name in sorted(environ):
        if not name.upper().startswith(ENV_PREFIX) or name in known:
            continue
        closest = difflib.get_close_matches(
            name[len(ENV_PREFIX) :].upper(), sorted(suffixes), n=1, cutoff=0.0
        )
        raise _fail(
            name,
            environ[name],
            f"unknown variable; did you mean {suffixes[closest[0]]}? "
            "(`bandgate serve --help` lists them all)",
        )


def _parse_int(text: str, low: int, high: int, *, signed: bool = False) -> int | None:
    """Returns ``text`` as a plain decimal integer in ``[low, high]``, else None."""
    pattern = _SIGNED_INT_RE if signed else _UNSIGNED_INT_RE
    # The length check keeps int() clear of its digit limit for absurdly long input.
    if pattern.fullmatch(text) is None or len(text) > _MAX_INT_DIGITS:
        return None
    value = int(text)
    return value if low <= value <= high else None


def _integer(name: str, raw: str, low: int, high: int, expected: str | None = None) -> int:
    """Parses an unsigned integer variable in ``[low, high]``; ``expected`` overrides the hint."""
    value = _parse_int(raw.strip(), low, high)
    if value is None:
        raise _fail(name, raw, f"expected {expected or f'an integer from {low} to {high}'}")
    return value


def _size(name: str, raw: str, low: int, high: int, expected: str) -> int:
    """Parses a size variable in ``[low, high]``; ``expected`` completes the error message."""
    try:
        value = parse_size(raw)
    except ValueError:
        raise _fail(name, raw, f"expected {expected}") from None
    if not low <= value <= high:
        raise _fail(name, raw, f"expected {expected}")
    return value


def _duration(name: str, raw: str, *, allow_zero: bool) -> float:
    """Parses a duration variable, which must be positive unless ``allow_zero``."""
    bound = "at least 0" if allow_zero else "greater than 0"
    try:
        value = parse_duration(raw)
    except ValueError:
        raise _fail(name, raw, f"expected a duration {bound}, {_DURATION_EXAMPLES}") from None
    if value == 0 and not allow_zero:
        raise _fail(name, raw, f"expected a duration {bound}, {_DURATION_EXAMPLES}")
    return value


def _choice(name: str, raw: str, choices: tuple[str, ...]) -> str:
    """Matches a variable case-insensitively against ``choices``; returns the canonical choice."""
    text = raw.strip()
    for choice in choices:
        if text.lower() == choice.lower():
            return choice
    listed = ", ".join(repr(choice) for choice in choices)
    canonical = {choice.lower(): choice for choice in choices}
    hint = difflib.get_close_matches(text.lower(), list(canonical), n=1)
    suffix = f" (did you mean {canonical[hint[0]]!r}?)" if hint else ""
    raise _fail(name, raw, f"expected one of {listed}{suffix}")


def _socket_dir(name: str, raw: str) -> str:
    """Checks the socket directory is absolute and short enough for socket paths inside it."""
    text = raw.strip()
    if not text or not os.path.isabs(text):
        raise _fail(name, raw, "expected an absolute directory path")
    if "\0" in text or len(os.fsencode(text)) > MAX_SOCKET_DIR_BYTES:
        raise _fail(
            name,
            raw,
            f"expected an absolute directory path of at most {MAX_SOCKET_DIR_BYTES} bytes "
            "(socket paths must fit the Unix sun_path limit)",
        )
    return text


def _bands(name: str, raw: str) -> tuple[BandSpec, ...]:
    """Parses the static band list; the result is sorted by priority, highest first."""
    text = raw.strip()
    if not text:
        return ()
    syntax = f"expected name:priority or name:priority:max_bytes items, e.g. {_BANDS_EXAMPLE}"

    def item_error(item: str, problem: str) -> ConfigError:
        return _fail(name, raw, f"item {item!r}: {problem}")

    by_name: dict[str, str] = {}
    by_priority: dict[int, str] = {}
    bands: list[BandSpec] = []
    for raw_item in text.split(","):
        item = raw_item.strip()
        fields = [field.strip() for field in item.split(":")]
        if not item or len(fields) not in (2, 3):
            raise item_error(item, syntax)
        band_name, priority_text = fields[0], fields[1]
        if _BAND_NAME_RE.fullmatch(band_name) is None:
            raise item_error(
                item,
                f"expected a band name of 1 to {MAX_BAND_NAME_LENGTH} characters from "
                "[A-Za-z0-9_.-]",
            )
        if _SIGNED_INT_RE.fullmatch(priority_text) is None:
            raise item_error(item, f"priority {priority_text!r}: expected an integer")
        priority = _parse_int(priority_text, MIN_PRIORITY, MAX_PRIORITY, signed=True)
        if priority is None:
            raise item_error(
                item,
                f"priority {priority_text!r}: expected a 32-bit integer from {MIN_PRIORITY} "
                f"to {MAX_PRIORITY}",
            )
        max_bytes = 0
        if len(fields) == 3:
            try:
                max_bytes = parse_size(fields[2])
            except ValueError:
                max_bytes = -1
            if not 0 <= max_bytes <= MAX_SIZE:
                raise item_error(
                    item,
                    f"max_bytes {fields[2]!r}: expected a size {_SIZE_EXAMPLES} "
                    "(0 = BANDGATE_BAND_MAX_BYTES)",
                )
        if band_name in by_name:
            raise item_error(
                item, f"band name {band_name!r} already used by {by_name[band_name]!r}"
            )
        if priority in by_priority:
            raise item_error(item, f"priority {priority} already used by {by_priority[priority]!r}")
        by_name[band_name] = item
        by_priority[priority] = item
        bands.append(BandSpec(band_name, priority, max_bytes))
    bands.sort(key=lambda band: band.priority, reverse=True)
    return tuple(bands)


def _listen_addr(name: str, raw: str) -> str:
    """``HOST:PORT`` (an IPv6 host in brackets) or ``0`` (off, returned as "")."""
    text = raw.strip()
    if text == "0":
        return ""
    host, sep, port = text.rpartition(":")
    port_ok = _parse_int(port, 0, 65535) is not None
    if not sep or not host or not port_ok:
        raise _fail(name, raw, "expected HOST:PORT such as 127.0.0.1:9464, or 0 for off")
    return text


def socket_gid(config: Config) -> int:
    """The gid of ``BANDGATE_SOCKET_GROUP``, or -1 when sockets are owner-only."""
    group = config.socket_group
    if not group:
        return -1
    return int(group) if group.isdigit() else grp.getgrnam(group).gr_gid


def _socket_group(name: str, raw: str) -> str:
    """Checks the socket group exists, by name or numeric gid; "" means none."""
    text = raw.strip()
    if not text:
        return ""
    try:
        if _UNSIGNED_INT_RE.fullmatch(text):
            grp.getgrgid(int(text))
        else:
            grp.getgrnam(text)
    except (KeyError, OverflowError):
        raise _fail(name, raw, "expected the name or numeric gid of an existing group") from None
    return text


def _show(name: str, raw: str | None, value: float) -> str:
    """Names a variable and its value for a cross-variable error; a default is marked as one."""
    if raw is None:
        return f"{name}={format_duration(value)} (default)"
    return f"{name}={raw!r}"


def load(environ: Mapping[str, str] | None = None) -> Config:
    """Builds the daemon configuration from ``BANDGATE_*`` environment variables.

    Reads exactly the names in :data:`VARIABLES` (plus ``XDG_RUNTIME_DIR`` for the default
    socket directory); unset names take their defaults.

    Args:
        environ: The environment to read; ``None`` means ``os.environ``.

    Returns:
        A configuration satisfying every rule in :data:`VARIABLES`.

    Raises:
        ConfigError: An unknown ``BANDGATE_*`` name is set, or a value is malformed, out of range
            or inconsistent with another variable. The first problem found is reported.
    """
    env: Mapping[str, str] = os.environ if environ is None else environ
    _check_unknown(env)
    # Reading through this table is what keeps load() and VARIABLES in step: asking for a name
    # that is not in VARIABLES is a KeyError, not a silently ignored variable.
    values: dict[str, str | None] = {
        variable.name: env.get(variable.name) for variable in VARIABLES
    }

    def take(name: str) -> str | None:
        return values[name]

    raw_dir = take("BANDGATE_SOCKET_DIR")
    socket_dir = (
        default_socket_dir(env) if raw_dir is None else _socket_dir("BANDGATE_SOCKET_DIR", raw_dir)
    )

    # Shards: an explicit BANDGATE_MAX_SHARDS caps the CPU-count default of BANDGATE_SHARDS, and
    # an explicit BANDGATE_SHARDS raises the default of BANDGATE_MAX_SHARDS.
    raw_shards = take("BANDGATE_SHARDS")
    raw_max_shards = take("BANDGATE_MAX_SHARDS")
    explicit_max_shards = (
        None
        if raw_max_shards is None
        else _integer("BANDGATE_MAX_SHARDS", raw_max_shards, 1, MAX_MAX_SHARDS)
    )
    if raw_shards is None:
        shards = min(available_cpus(), explicit_max_shards or MAX_MAX_SHARDS)
    else:
        shards = _integer("BANDGATE_SHARDS", raw_shards, 1, MAX_MAX_SHARDS)
    max_shards = max(MIN_MAX_SHARDS, shards) if explicit_max_shards is None else explicit_max_shards
    if shards > max_shards:
        raise ConfigError(
            f"BANDGATE_SHARDS={raw_shards!r} exceeds BANDGATE_MAX_SHARDS={raw_max_shards!r}: "
            "expected at most BANDGATE_MAX_SHARDS shards"
        )

    raw = take("BANDGATE_MAX_INFLIGHT")
    max_inflight = (
        DEFAULT_MAX_INFLIGHT
        if raw is None
        else _integer(
            "BANDGATE_MAX_INFLIGHT",
            raw,
            0,
            MAX_INFLIGHT_LIMIT,
            f"an integer from 0 (no limit) to {MAX_INFLIGHT_LIMIT}",
        )
    )

    raw = take("BANDGATE_MAX_BYTES")
    max_bytes = (
        DEFAULT_MAX_BYTES
        if raw is None
        else _size(
            "BANDGATE_MAX_BYTES", raw, 0, MAX_SIZE, f"a size (0 = no limit) {_SIZE_EXAMPLES}"
        )
    )

    raw_bands = take("BANDGATE_BANDS")
    bands = _bands("BANDGATE_BANDS", DEFAULT_BANDS if raw_bands is None else raw_bands)

    raw = take("BANDGATE_BAND_MAX_BYTES")
    band_max_bytes = (
        DEFAULT_BAND_MAX_BYTES
        if raw is None
        else _size(
            "BANDGATE_BAND_MAX_BYTES", raw, 1, MAX_SIZE, f"a size greater than 0 {_SIZE_EXAMPLES}"
        )
    )

    raw = take("BANDGATE_FAIRNESS")
    fairness = (
        DEFAULT_FAIRNESS if raw is None else _choice("BANDGATE_FAIRNESS", raw, FAIRNESS_NAMES)
    )
    raw = take("BANDGATE_ORDERING")
    ordering = (
        DEFAULT_ORDERING if raw is None else _choice("BANDGATE_ORDERING", raw, ORDERING_NAMES)
    )

    raw = take("BANDGATE_DEFAULT_TTL")
    default_ttl = (
        DEFAULT_DEFAULT_TTL
        if raw is None
        else _duration("BANDGATE_DEFAULT_TTL", raw, allow_zero=True)
    )

    # GC timing: the band timeout and the interval default from the flow timeout and are
    # checked against it (GIE: flows must be collected before their bands).
    raw_flow_gc = take("BANDGATE_FLOW_GC_TIMEOUT")
    flow_gc_timeout = (
        DEFAULT_FLOW_GC_TIMEOUT
        if raw_flow_gc is None
        else _duration("BANDGATE_FLOW_GC_TIMEOUT", raw_flow_gc, allow_zero=False)
    )
    flow_shown = _show("BANDGATE_FLOW_GC_TIMEOUT", raw_flow_gc, flow_gc_timeout)

    raw_band_gc = take("BANDGATE_BAND_GC_TIMEOUT")
    if raw_band_gc is None:
        band_gc_timeout = min(BAND_GC_TIMEOUT_FACTOR * flow_gc_timeout, MAX_DURATION)
    else:
        band_gc_timeout = _duration("BANDGATE_BAND_GC_TIMEOUT", raw_band_gc, allow_zero=False)
        if band_gc_timeout < flow_gc_timeout:
            raise ConfigError(
                f"BANDGATE_BAND_GC_TIMEOUT={raw_band_gc!r} is shorter than {flow_shown}: "
                "expected a band GC timeout at least the flow GC timeout, so that flows are "
                "collected before their bands"
            )

    raw_interval = take("BANDGATE_GC_INTERVAL")
    if raw_interval is None:
        gc_interval = min(
            max(flow_gc_timeout / GC_INTERVAL_DIVISOR, MIN_GC_INTERVAL),
            MAX_GC_INTERVAL,
            flow_gc_timeout,
        )
    else:
        gc_interval = _duration("BANDGATE_GC_INTERVAL", raw_interval, allow_zero=False)
        if gc_interval > flow_gc_timeout:
            raise ConfigError(
                f"BANDGATE_GC_INTERVAL={raw_interval!r} is longer than {flow_shown}: "
                "expected a GC interval at most the flow GC timeout"
            )

    raw = take("BANDGATE_GC_PREPARE_TIMEOUT")
    gc_prepare_timeout = (
        DEFAULT_GC_PREPARE_TIMEOUT
        if raw is None
        else _duration("BANDGATE_GC_PREPARE_TIMEOUT", raw, allow_zero=False)
    )

    raw = take("BANDGATE_GC_PHASE_DELAY")
    gc_phase_delay = (
        DEFAULT_GC_PHASE_DELAY
        if raw is None
        else _duration("BANDGATE_GC_PHASE_DELAY", raw, allow_zero=True)
    )

    raw = take("BANDGATE_METRICS_ADDR")
    metrics_addr = (
        DEFAULT_METRICS_ADDR if raw is None else _listen_addr("BANDGATE_METRICS_ADDR", raw)
    )
    raw = take("BANDGATE_METRICS_MAX_FLOWS")
    metrics_max_flows = (
        DEFAULT_METRICS_MAX_FLOWS
        if raw is None
        else _integer("BANDGATE_METRICS_MAX_FLOWS", raw, 1, 100_000)
    )

    raw = take("BANDGATE_MAX_FLOWS")
    max_flows = (
        DEFAULT_MAX_FLOWS
        if raw is None
        else _integer("BANDGATE_MAX_FLOWS", raw, MIN_MAX_FLOWS, MAX_MAX_FLOWS)
    )

    # One band slot beyond the static bands, so at least one dynamic band can exist.
    min_bands = len(bands) + 1
    raw_max_bands = take("BANDGATE_MAX_BANDS")
    if raw_max_bands is None:
        max_bands = DEFAULT_MAX_BANDS
        if max_bands < min_bands:
            raise ConfigError(
                f"BANDGATE_BANDS={raw_bands!r} configures {len(bands)} bands: expected fewer "
                f"than BANDGATE_MAX_BANDS={max_bands} (default); raise BANDGATE_MAX_BANDS"
            )
    else:
        max_bands = _integer(
            "BANDGATE_MAX_BANDS",
            raw_max_bands,
            min_bands,
            MAX_MAX_BANDS,
            f"an integer from {min_bands} (one more than the static bands in BANDGATE_BANDS) "
            f"to {MAX_MAX_BANDS}",
        )

    raw = take("BANDGATE_MAX_FRAME")
    max_frame = (
        DEFAULT_MAX_FRAME
        if raw is None
        else _size(
            "BANDGATE_MAX_FRAME",
            raw,
            MIN_MAX_FRAME,
            MAX_MAX_FRAME,
            f"a size from {format_size(MIN_MAX_FRAME)} to {format_size(MAX_MAX_FRAME)}, "
            "such as 64KiB or 1MiB",
        )
    )

    raw = take("BANDGATE_SHUTDOWN_TIMEOUT")
    shutdown_timeout = (
        DEFAULT_SHUTDOWN_TIMEOUT
        if raw is None
        else _duration("BANDGATE_SHUTDOWN_TIMEOUT", raw, allow_zero=False)
    )

    raw = take("BANDGATE_SOCKET_GROUP")
    socket_group = (
        DEFAULT_SOCKET_GROUP if raw is None else _socket_group("BANDGATE_SOCKET_GROUP", raw)
    )

    raw = take("BANDGATE_LOG_LEVEL")
    log_level = DEFAULT_LOG_LEVEL if raw is None else _choice("BANDGATE_LOG_LEVEL", raw, LOG_LEVELS)

    return Config(
        socket_dir=socket_dir,
        shards=shards,
        max_shards=max_shards,
        max_inflight=max_inflight,
        max_bytes=max_bytes,
        bands=bands,
        band_max_bytes=band_max_bytes,
        fairness=fairness,
        ordering=ordering,
        default_ttl=default_ttl,
        flow_gc_timeout=flow_gc_timeout,
        band_gc_timeout=band_gc_timeout,
        gc_interval=gc_interval,
        gc_prepare_timeout=gc_prepare_timeout,
        max_flows=max_flows,
        max_bands=max_bands,
        max_frame=max_frame,
        shutdown_timeout=shutdown_timeout,
        socket_group=socket_group,
        log_level=log_level,
        gc_phase_delay=gc_phase_delay,
        metrics_addr=metrics_addr,
        metrics_max_flows=metrics_max_flows,
    )
