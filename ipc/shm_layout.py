"""Byte layout of the shared-memory segment, and who writes each word.

The segment is an array of native int64 words, read and written through
``memoryview.cast("q")``; every word is 8-byte aligned, so a store is never torn. The layout::

    header      HEADER_WORDS                       coordinator (written once at start, plus epoch/hwm)
    shard table max_shards  x SHARD_WORDS          coordinator
    band table  max_bands   x BAND_WORDS           coordinator
    flow table  max_flows   x FLOW_WORDS           coordinator
    stats       max_shards  x (STATS_HEADER_WORDS + max_bands x STATS_BAND_WORDS)   shard s: row s
    leases      max_shards  x max_flows x LEASE_WORDS                               shard s: row s

Invariant (single writer per word): the coordinator writes the header and the three tables; shard
*s* writes only stats row *s* and lease row *s*. The one exception is a dead shard's rows, which
the coordinator zeroes after the shard's process is reaped and before its replacement starts
(ownership passes to the coordinator while nobody else can write them). Clients and the GC process
never write. No word is guarded by a cross-process lock.

Readers sum rows and treat multi-word records as hints: a record can be read half-old, half-new
while the coordinator rewrites it, so nobody acts on a table row without the coordinator
re-validating it against ``(slot, generation)`` (GC's Retire/Prepare/Commit all carry both).
"""

from __future__ import annotations

from typing import Final, Protocol, final

__all__ = [
    "MAGIC",
    "NO_PRIORITY",
    "VERSION",
    "BandState",
    "Layout",
    "ShardState",
    "Words",
    "WordsView",
]


class WordsView(Protocol):
    """Read access to the segment's int64 words (``memoryview.cast("q")``, or a list in tests)."""

    def __getitem__(self, index: int, /) -> int: ...


class Words(WordsView, Protocol):
    """Read-write access to the segment's int64 words."""

    def __setitem__(self, index: int, value: int, /) -> None: ...


MAGIC: Final = 0x42414E4447415445  # "BANDGATE"
VERSION: Final = 1
NO_PRIORITY: Final = -(2**63)  # "no waiting band" in a stats row's TOP_WAITING word

# header words
H_MAGIC, H_VERSION, H_MAX_SHARDS, H_MAX_BANDS, H_MAX_FLOWS, H_COORD_PID = range(6)
H_EPOCH = 6  # bumped by the coordinator on every topology change (shard added/draining/removed)
H_FLOW_HWM = 7  # flow slots >= this were never used: readers stop scanning here
H_BAND_HWM = 8
H_MAX_INFLIGHT = 9
H_MAX_BYTES = 10
# External saturation credit (coordinator-written, from ReportSaturation): when H_SAT_MODE is 1, a
# shard may dispatch only while (H_DISPATCHED_BASE + sum of every S_DISPATCHED) < H_SAT_LIMIT and
# CLOCK_MONOTONIC ns < H_SAT_EXPIRES_NS (stale credit fails closed).
H_SAT_MODE = 11
H_SAT_LIMIT = 12
H_SAT_EXPIRES_NS = 13
H_DISPATCHED_BASE = 14  # dispatches counted by shards that died (their rows were zeroed)
HEADER_WORDS: Final = 16

# shard table row
SH_STATE, SH_PID, SH_INCARNATION = range(3)
SHARD_WORDS: Final = 4

# band table row
B_STATE, B_PRIORITY, B_GEN, B_FLAGS, B_FLOWS, B_CAPACITY, B_CREATED_NS = range(7)
BAND_WORDS: Final = 8
BAND_STATIC: Final = 1
BAND_DESIRED: Final = 2

# flow table row
F_STATE, F_GEN, F_BAND, F_CREATED_NS = range(4)
FLOW_WORDS: Final = 4

# stats row header (shard-written)
S_HELD = 0  # budget units this shard took from the semaphore and has not returned
S_INFLIGHT = 1  # dispatched, not yet released (== S_HELD when a limit is set)
S_LEN = 2
S_BYTES = 3
S_TOP_WAITING = 4  # highest priority with a queued item on this shard, or NO_PRIORITY
S_DISPATCHED = 5  # cumulative counters, for stats and benchmarks
S_REJECTED = 6
S_EVICTED = 7
S_PID = 8
# Histograms (shard-written, cumulative), read by the metrics endpoint. Queue duration: one block of
# QD_BLOCK words per outcome code 1..6: a count per bucket of QUEUE_BUCKETS, one for +Inf, then the
# sum in ns. Dispatch cycle duration: one block of CYCLE_BLOCK words for CYCLE_BUCKETS.
QUEUE_BUCKETS: Final = (
    0.0001,
    0.0005,
    0.001,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)  # GIE's request_queue_duration_seconds buckets
CYCLE_BUCKETS: Final = (0.00001, 0.00005, 0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1)
QD_BLOCK: Final = len(QUEUE_BUCKETS) + 2
CYCLE_BLOCK: Final = len(CYCLE_BUCKETS) + 2
S_QUEUE_HIST = 16  # outcome o (1..6) starts at S_QUEUE_HIST + (o - 1) * QD_BLOCK
S_CYCLE_HIST = S_QUEUE_HIST + 6 * QD_BLOCK
STATS_HEADER_WORDS: Final = S_CYCLE_HIST + CYCLE_BLOCK
# stats per band slot
SB_LEN, SB_BYTES, SB_DISPATCHED = range(3)
SB_OLDEST_NS = 3  # enqueue time (CLOCK_MONOTONIC ns) of the oldest queued item, 0 when empty
SB_INFLIGHT = 4  # dispatched by this shard and not yet released
STATS_BAND_WORDS: Final = 8

# lease row per flow slot (shard-written)
L_COUNT = 0  # requests of this flow being admitted or queued on this shard
L_IDLE_NS = 1  # CLOCK_MONOTONIC ns when L_COUNT last fell to 0
L_BYTES = 2  # queued bytes of this flow on this shard (clients pick shards by it, as GIE's JSQ)
LEASE_WORDS: Final = 4


class BandState:
    FREE: Final = 0
    ACTIVE: Final = 1
    RETIRING: Final = 2


class ShardState:
    FREE: Final = 0
    ACTIVE: Final = 1
    DRAINING: Final = 2
    STARTING: Final = 3

    NAMES: Final = {0: "free", 1: "active", 2: "draining", 3: "starting"}


@final
class Layout:
    """Word offsets for one (max_shards, max_bands, max_flows) sizing."""

    def __init__(self, max_shards: int, max_bands: int, max_flows: int) -> None:
        self.max_shards = max_shards
        self.max_bands = max_bands
        self.max_flows = max_flows
        self.shard_table = HEADER_WORDS
        self.band_table = self.shard_table + max_shards * SHARD_WORDS
        self.flow_table = self.band_table + max_bands * BAND_WORDS
        self.stats = self.flow_table + max_flows * FLOW_WORDS
        self.stats_row_words = STATS_HEADER_WORDS + max_bands * STATS_BAND_WORDS
        self.leases = self.stats + max_shards * self.stats_row_words
        self.lease_row_words = max_flows * LEASE_WORDS
        self.total_words = self.leases + max_shards * self.lease_row_words

    @property
    def size_bytes(self) -> int:
        return self.total_words * 8

    def shard(self, s: int) -> int:
        return self.shard_table + s * SHARD_WORDS

    def band(self, b: int) -> int:
        return self.band_table + b * BAND_WORDS

    def flow(self, f: int) -> int:
        return self.flow_table + f * FLOW_WORDS

    def stats_row(self, s: int) -> int:
        return self.stats + s * self.stats_row_words

    def stats_band(self, s: int, b: int) -> int:
        return self.stats_row(s) + STATS_HEADER_WORDS + b * STATS_BAND_WORDS

    def lease_row(self, s: int) -> int:
        return self.leases + s * self.lease_row_words

    def lease(self, s: int, f: int) -> int:
        return self.lease_row(s) + f * LEASE_WORDS
