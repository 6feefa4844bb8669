"""Unit tests of the pure shard state, :class:`runtime.shard_state.ShardCore`.

``words`` is a plain list of zeros sized like a real segment, so every shared-memory word the
core writes (its stats row and its lease row) can be checked directly. The clock is injected.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings, strategies as st

from ipc import shm_layout as L
from runtime.shard_state import DONE, PENDING, QUEUED, Request, ShardCore

LAYOUT = L.Layout(max_shards=3, max_bands=4, max_flows=8)
SHARD = 1  # not 0, so a row offset mistake cannot hide behind row 0


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000

    def __call__(self) -> int:
        return self.now


def make(fairness: str = "global-strict", ordering: str = "fcfs", shard: int = SHARD):
    words = [0] * LAYOUT.total_words
    clock = Clock()
    core = ShardCore(words, LAYOUT, shard, fairness, ordering, clock_ns=clock)
    return core, words, clock


_seq = iter(range(1, 10**9))


def req(
    flow_id: str = "f",
    priority: int = 0,
    size: int = 0,
    *,
    t: float | None = None,
    deadline: float = math.inf,
) -> Request:
    seq = next(_seq)
    return Request(
        None, seq, flow_id, priority, size, float(seq) if t is None else t, deadline, seq
    )


# band slot b and flow slot f per test are chosen by hand, as the coordinator would
def install(core: ShardCore, flow_id: str, priority: int, flow_slot: int, band_slot: int, *, flow_gen: int = 1, band_gen: int = 1, capacity: int = 10**9):  # fmt: skip
    return core.install(
        flow_id, priority, flow_slot, flow_gen, band_slot, band_gen, f"band-{priority}", capacity
    )


def s_word(words: list[int], k: int) -> int:
    return words[LAYOUT.stats_row(SHARD) + k]


def sb_word(words: list[int], band_slot: int, k: int) -> int:
    return words[LAYOUT.stats_band(SHARD, band_slot) + k]


def lease_word(words: list[int], flow_slot: int, k: int) -> int:
    return words[LAYOUT.lease(SHARD, flow_slot) + k]


def only_own_rows_written(words: list[int]) -> bool:
    """Every non-zero word lies in this shard's stats row or lease row (single writer)."""
    stats = range(LAYOUT.stats_row(SHARD), LAYOUT.stats_row(SHARD) + LAYOUT.stats_row_words)
    lease = range(LAYOUT.lease_row(SHARD), LAYOUT.lease_row(SHARD) + LAYOUT.lease_row_words)
    return all(w == 0 or i in stats or i in lease for i, w in enumerate(words))


# ---------------------------------------------------------------------------------------------
# install / resolve / park / take_pending
# ---------------------------------------------------------------------------------------------


def test_install_creates_band_and_flow_and_is_idempotent():
    core, words, _ = make()
    assert core.resolve("f", 5) is None
    flow = install(core, "f", 5, flow_slot=3, band_slot=2, capacity=100)
    band = flow.band
    assert (band.priority, band.slot, band.gen, band.name, band.capacity) == (
        5,
        2,
        1,
        "band-5",
        100,
    )
    assert (flow.flow_id, flow.slot, flow.gen) == ("f", 3, 1)
    assert flow.lease_base == LAYOUT.lease(SHARD, 3)
    assert band.stats_base == LAYOUT.stats_band(SHARD, 2)
    assert core.resolve("f", 5) is flow
    assert core.resolve("f", 6) is None and core.resolve("g", 5) is None
    again = install(core, "f", 5, flow_slot=3, band_slot=2, capacity=200)
    assert again is flow and flow.band is band and band.capacity == 200
    g = install(core, "g", 5, flow_slot=4, band_slot=2)
    assert g.band is band and set(band.flows) == {"f", "g"}
    assert [b.priority for b in core.bands_desc] == [5]
    install(core, "h", 9, flow_slot=5, band_slot=1)
    install(core, "i", -3, flow_slot=6, band_slot=3)
    assert [b.priority for b in core.bands_desc] == [9, 5, -3]
    assert all(w == 0 for w in words)  # installing touches no shared word


def test_park_and_take_pending_in_arrival_order():
    core, _, _ = make()
    a, b, c = req("f", 5), req("f", 5), req("f", 5)
    other = req("g", 5)
    assert core.park(a) is True  # first one: a Provision must be sent
    assert core.park(b) is False
    assert core.park(c) is False
    assert core.park(other) is True  # another key
    assert a.state == PENDING
    core.unpark(b)  # cancelled while waiting
    assert b.state == DONE
    assert core.take_pending("f", 5) == [a, c]
    assert core.take_pending("f", 5) == []
    assert core.take_pending("g", 5) == [other]
    assert core.pending == {}
    # a request that went DONE by another path is skipped too
    d, e = req("f", 5), req("f", 5)
    core.park(d)
    core.park(e)
    d.state = DONE
    assert core.take_pending("f", 5) == [e]


# ---------------------------------------------------------------------------------------------
# enqueue / remove / pop accounting
# ---------------------------------------------------------------------------------------------


def test_enqueue_accounting():
    core, words, clock = make()
    flow = install(core, "f", 5, flow_slot=3, band_slot=2)
    r1, r2 = req("f", 5, 10), req("f", 5, 32)
    core.enqueue(r1, flow)
    assert r1.state == QUEUED and r1.flow is flow
    core.enqueue(r2, flow)
    assert lease_word(words, 3, L.L_COUNT) == 2
    assert lease_word(words, 3, L.L_BYTES) == 42
    assert lease_word(words, 3, L.L_IDLE_NS) == 0
    assert (sb_word(words, 2, L.SB_LEN), sb_word(words, 2, L.SB_BYTES)) == (2, 42)
    assert (s_word(words, L.S_LEN), s_word(words, L.S_BYTES)) == (2, 42)
    assert s_word(words, L.S_TOP_WAITING) == 5 == core.top_waiting
    assert (core.len, core.bytes) == (2, 42)
    assert (flow.band.len, flow.band.bytes) == (2, 42)
    assert only_own_rows_written(words)
    del clock


def test_remove_and_pop_accounting_and_idle_stamp():
    core, words, clock = make()
    hi = install(core, "h", 9, flow_slot=1, band_slot=0)
    lo = install(core, "l", 2, flow_slot=2, band_slot=1)
    a, b = req("h", 9, 7), req("h", 9, 5)
    c = req("l", 2, 100)
    for r, f in ((a, hi), (b, hi), (c, lo)):
        core.enqueue(r, f)
    assert s_word(words, L.S_TOP_WAITING) == 9
    clock.now = 111
    core.remove(a)  # not the last of its flow: no idle stamp
    assert a.state == DONE
    assert lease_word(words, 1, L.L_COUNT) == 1 and lease_word(words, 1, L.L_BYTES) == 5
    assert lease_word(words, 1, L.L_IDLE_NS) == 0
    assert (sb_word(words, 0, L.SB_LEN), sb_word(words, 0, L.SB_BYTES)) == (1, 5)
    assert (s_word(words, L.S_LEN), s_word(words, L.S_BYTES)) == (2, 105)
    clock.now = 222
    assert core.top_band() is hi.band
    got = core.pop(hi.band)
    assert got is b and b.state == DONE
    assert lease_word(words, 1, L.L_COUNT) == 0 and lease_word(words, 1, L.L_BYTES) == 0
    assert lease_word(words, 1, L.L_IDLE_NS) == 222  # stamped when the count fell to 0
    assert (sb_word(words, 0, L.SB_LEN), sb_word(words, 0, L.SB_BYTES)) == (0, 0)
    # the high band emptied: the published top falls to the next band
    assert s_word(words, L.S_TOP_WAITING) == 2 == core.top_waiting
    assert core.top_band() is lo.band
    clock.now = 333
    core.remove(c)
    assert lease_word(words, 2, L.L_IDLE_NS) == 333
    assert s_word(words, L.S_TOP_WAITING) == L.NO_PRIORITY == core.top_waiting
    assert (s_word(words, L.S_LEN), s_word(words, L.S_BYTES)) == (0, 0)
    assert (core.len, core.bytes) == (0, 0)
    assert core.top_band() is None
    assert only_own_rows_written([0 if w == L.NO_PRIORITY else w for w in words])


def test_oldest_wait_word_follows_the_oldest_queued_item():
    core, words, _ = make()
    f = install(core, "f", 0, flow_slot=0, band_slot=0)
    g = install(core, "g", 0, flow_slot=1, band_slot=0)
    a, b, c = req("f", t=1.5), req("g", t=2.5), req("f", t=3.5)
    for r, fl in ((a, f), (b, g), (c, f)):
        core.enqueue(r, fl)
    assert sb_word(words, 0, L.SB_OLDEST_NS) == 1_500_000_000
    core.remove(b)  # not the oldest
    assert sb_word(words, 0, L.SB_OLDEST_NS) == 1_500_000_000
    assert core.pop(f.band) is a
    assert sb_word(words, 0, L.SB_OLDEST_NS) == 3_500_000_000
    core.remove(c)
    assert sb_word(words, 0, L.SB_OLDEST_NS) == 0


def test_top_band_is_head_of_line():
    core, _, _ = make()
    hi = install(core, "h", 20, flow_slot=0, band_slot=0)
    lo = install(core, "l", 10, flow_slot=1, band_slot=1)
    assert core.top_band() is None
    core.enqueue(req("l", 10), lo)
    assert core.top_band() is lo.band
    core.enqueue(req("h", 20), hi)
    # the highest band with an item, whatever else waits (the caller stops there if saturated)
    assert core.top_band() is hi.band
    assert core.top_band() is hi.band  # no side effect


def test_gie_scenario_68_priority_20_drains_first():
    """3 items at 20 and 3 at 10: the first three pops are priority 20, then the 10s."""
    core, words, _ = make()
    hi = install(core, "h", 20, flow_slot=0, band_slot=0)
    lo = install(core, "l", 10, flow_slot=1, band_slot=1)
    for _ in range(3):  # low ones arrive first
        core.enqueue(req("l", 10), lo)
    for _ in range(3):
        core.enqueue(req("h", 20), hi)
    popped = []
    for cycle in range(6):
        band = core.top_band()
        assert band is not None
        popped.append(core.pop(band).priority)
        if cycle < 3:
            assert sb_word(words, 1, L.SB_LEN) == 3  # the low queue is untouched meanwhile
    assert popped == [20, 20, 20, 10, 10, 10]
    assert core.top_band() is None


def test_global_strict_fcfs_across_flows_and_round_robin():
    core, _, _ = make("global-strict")
    a = install(core, "a", 0, flow_slot=0, band_slot=0)
    b = install(core, "b", 0, flow_slot=1, band_slot=0)
    order = [("a", a)] * 6 + [("b", b)] * 2
    for fid, fl in order:
        core.enqueue(req(fid), fl)
    assert [core.pop(a.band).flow_id for _ in range(8)] == list("aaaaaabb")

    core, _, _ = make("round-robin")
    a = install(core, "a", 0, flow_slot=0, band_slot=0)
    b = install(core, "b", 0, flow_slot=1, band_slot=0)
    order = [("a", a)] * 6 + [("b", b)] * 2
    for fid, fl in order:
        core.enqueue(req(fid), fl)
    assert [core.pop(a.band).flow_id for _ in range(8)] == list("ababaaaa")


def test_edf_ordering_pops_earliest_deadline():
    core, _, _ = make(ordering="edf")
    f = install(core, "f", 0, flow_slot=0, band_slot=0)
    items = [req("f", deadline=d) for d in (50.0, math.inf, 10.0, 30.0, 10.0)]
    for r in items:
        core.enqueue(r, f)
    core.remove(items[3])  # arbitrary removal keeps heap order
    got = [core.pop(f.band) for _ in range(4)]
    assert got == [items[2], items[4], items[0], items[1]]


# ---------------------------------------------------------------------------------------------
# fences: prepare / abort / commit
# ---------------------------------------------------------------------------------------------


def test_prepare_flow_votes_and_fences():
    core, _, _ = make()
    f = install(core, "f", 5, flow_slot=3, band_slot=2)
    # never seen here: yes, nothing to fence
    assert core.prepare_flow(7, 1) == ""
    # queued item: no, and not fenced
    r = req("f", 5)
    core.enqueue(r, f)
    assert core.prepare_flow(3, 1) != ""
    assert not f.fenced and core.resolve("f", 5) is f
    core.remove(r)
    # pending request for the key: no
    p = req("f", 5)
    core.park(p)
    assert core.prepare_flow(3, 1) != ""
    assert not f.fenced
    core.take_pending("f", 5)
    # an older generation: yes, but the current flow is not fenced by it
    assert core.prepare_flow(3, 0) == ""
    assert core.resolve("f", 5) is f
    # idle: yes, and fenced; resolve sends new requests to the coordinator
    assert core.prepare_flow(3, 1) == ""
    assert f.fenced and core.resolve("f", 5) is None
    assert core.prepare_flow(3, 1) == ""  # idempotent
    # an Abort for another generation does not unfence; the right one does
    core.abort(False, 3, 2)
    assert core.resolve("f", 5) is None
    core.abort(False, 3, 1)
    assert core.resolve("f", 5) is f
    core.abort(False, 3, 1)  # idempotent
    assert core.resolve("f", 5) is f


def test_prepare_band_votes_and_fences():
    core, _, _ = make()
    f = install(core, "f", 5, flow_slot=3, band_slot=2)
    g = install(core, "g", 5, flow_slot=4, band_slot=2)
    other = install(core, "o", 6, flow_slot=5, band_slot=1)
    assert core.prepare_band(0, 1) == ""  # unknown band
    r = req("g", 5)
    core.enqueue(r, g)  # an item in any flow of the band: no
    assert core.prepare_band(2, 1) != ""
    assert not f.band.fenced
    core.remove(r)
    p = req("new-flow", 5)  # pending for a flow of this band not installed yet: no
    core.park(p)
    assert core.prepare_band(2, 1) != ""
    core.take_pending("new-flow", 5)
    q = req("o", 6)  # pending or queued in another band does not matter
    core.enqueue(q, other)
    core.park(req("zz", 6))
    assert core.prepare_band(2, 1) == ""
    assert f.band.fenced
    assert core.resolve("f", 5) is None and core.resolve("g", 5) is None
    assert core.resolve("o", 6) is other
    core.abort(True, 2, 1)
    assert core.resolve("f", 5) is f and core.resolve("g", 5) is g


def test_commit_flow_drops_it_and_clears_its_lease_words():
    core, words, _ = make()
    f = install(core, "f", 5, flow_slot=3, band_slot=2)
    keep = install(core, "k", 5, flow_slot=4, band_slot=2)
    r = req("f", 5, 9)
    core.enqueue(r, f)
    core.remove(r)
    assert lease_word(words, 3, L.L_IDLE_NS) != 0
    # stale values a crashed predecessor could have left in the slot's words
    words[LAYOUT.lease(SHARD, 3) + L.L_COUNT] = 4
    words[LAYOUT.lease(SHARD, 3) + L.L_BYTES] = 77
    assert core.prepare_flow(3, 1) == ""
    core.commit(False, 3, 1)
    assert ("f", 5) not in core.flows and "f" not in f.band.flows
    assert core.resolve("f", 5) is None
    assert lease_word(words, 3, L.L_COUNT) == 0 and lease_word(words, 3, L.L_BYTES) == 0
    core.commit(False, 3, 1)  # idempotent
    # the band and its other flow live on and still work
    assert core.resolve("k", 5) is keep and 5 in core.bands
    core.enqueue(req("k", 5), keep)
    assert core.pop(keep.band).flow_id == "k"
    # the slot can be installed again for a new flow, at a new generation
    again = install(core, "f", 5, flow_slot=3, band_slot=2, flow_gen=2)
    assert again is not f and core.resolve("f", 5) is again


def test_commit_band_drops_it_with_its_flows():
    core, words, _ = make()
    f = install(core, "f", 5, flow_slot=3, band_slot=2)
    install(core, "g", 5, flow_slot=4, band_slot=2)
    hi = install(core, "h", 9, flow_slot=5, band_slot=1)
    words[LAYOUT.lease(SHARD, 4) + L.L_BYTES] = 13
    assert core.prepare_band(2, 1) == ""
    core.commit(True, 2, 1)
    assert 5 not in core.bands and [b.priority for b in core.bands_desc] == [9]
    assert core.resolve("f", 5) is None and core.resolve("g", 5) is None
    assert ("f", 5) not in core.flows and ("g", 5) not in core.flows
    assert lease_word(words, 4, L.L_BYTES) == 0
    core.commit(True, 2, 1)  # idempotent
    assert core.resolve("h", 9) is hi
    # the priority comes back as a new band generation
    again = install(core, "f", 5, flow_slot=3, band_slot=2, band_gen=2)
    assert again is not f and again.band.gen == 2
    assert [b.priority for b in core.bands_desc] == [9, 5]


def test_commit_of_another_generation_is_ignored():
    core, _, _ = make()
    f = install(core, "f", 5, flow_slot=3, band_slot=2, flow_gen=2, band_gen=2)
    core.commit(False, 3, 1)
    core.commit(True, 2, 1)
    assert core.resolve("f", 5) is f


def test_install_of_a_new_generation_replaces_the_old():
    core, words, _ = make()
    old = install(core, "f", 5, flow_slot=3, band_slot=2)
    old_band = old.band
    # a new flow generation (the slot was freed and re-allocated elsewhere meanwhile)
    new = install(core, "f", 5, flow_slot=6, band_slot=2, flow_gen=1)
    assert new is not old and new.slot == 6 and core.resolve("f", 5) is new
    assert new.band is old_band and old_band.flows["f"] is new
    r = req("f", 5, 3)
    core.enqueue(r, new)
    assert lease_word(words, 6, L.L_COUNT) == 1 and lease_word(words, 3, L.L_COUNT) == 0
    core.remove(r)
    # a new band generation: the old band and all its flows are dropped, one band per priority
    newer = install(core, "f", 5, flow_slot=6, band_slot=2, band_gen=2)
    assert newer.band is not old_band and newer.band.gen == 2
    assert [b for b in core.bands_desc if b.priority == 5] == [newer.band]
    assert core.bands[5] is newer.band and set(newer.band.flows) == {"f"}
    # a re-install clears a fence (the coordinator revived it)
    assert core.prepare_flow(6, 1) == ""
    assert core.resolve("f", 5) is None
    assert install(core, "f", 5, flow_slot=6, band_slot=2, band_gen=2) is newer
    assert core.resolve("f", 5) is newer


# ---------------------------------------------------------------------------------------------
# invariants under random operations
# ---------------------------------------------------------------------------------------------

FLOWS = [("a", 7, 0, 0), ("b", 7, 1, 0), ("c", 3, 2, 1), ("d", -1, 3, 2)]  # id, prio, fslot, bslot


@settings(max_examples=150, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["enqueue", "remove", "pop"]), st.integers(0, 3), st.integers(0, 50)
        ),
        max_size=60,
    ),
    fairness=st.sampled_from(["global-strict", "round-robin"]),
    ordering=st.sampled_from(["fcfs", "edf"]),
)
def test_accounting_invariants_hold_under_random_operations(ops, fairness, ordering):
    core, words, clock = make(fairness, ordering)
    flows = {fid: install(core, fid, prio, fs, bs) for fid, prio, fs, bs in FLOWS}
    queued: list[Request] = []
    for op, k, size in ops:
        clock.now += 1
        fid, prio, _, _ = FLOWS[k]
        if op == "enqueue":
            r = req(fid, prio, size, deadline=float(size))
            core.enqueue(r, flows[fid])
            queued.append(r)
        elif op == "remove" and queued:
            r = queued.pop(size % len(queued))
            core.remove(r)
        elif op == "pop":
            band = core.top_band()
            if band is None:
                assert not queued
                continue
            # head-of-line: the popped item is from the highest band holding anything
            assert band.priority == max(r.priority for r in queued)
            r = core.pop(band)
            assert r.priority == band.priority
            queued.remove(r)
        # invariants after every step
        assert all(r.state == QUEUED for r in queued)
        assert core.len == len(queued) == s_word(words, L.S_LEN)
        assert core.bytes == sum(r.byte_size for r in queued) == s_word(words, L.S_BYTES)
        top = max((r.priority for r in queued), default=L.NO_PRIORITY)
        assert core.top_waiting == top
        if queued or s_word(words, L.S_TOP_WAITING) != 0:
            assert s_word(words, L.S_TOP_WAITING) == top
        for fid, _, fs, _ in FLOWS:
            mine = [r for r in queued if r.flow_id == fid]
            assert lease_word(words, fs, L.L_COUNT) == len(mine) == len(flows[fid].queue)
            assert lease_word(words, fs, L.L_BYTES) == sum(r.byte_size for r in mine)
        for band in core.bands_desc:
            mine = [r for r in queued if r.priority == band.priority]
            assert band.len == len(mine) == sb_word(words, band.slot, L.SB_LEN)
            assert (
                band.bytes
                == sum(r.byte_size for r in mine)
                == sb_word(words, band.slot, L.SB_BYTES)
            )
    assert only_own_rows_written([0 if w == L.NO_PRIORITY else w for w in words])


@pytest.mark.parametrize("shard", [0, 2])
def test_other_shard_ids_write_their_own_rows(shard):
    core, words, _ = make(shard=shard)
    f = core.install("f", 1, 2, 1, 3, 1, "b", 100)
    core.enqueue(req("f", 1, 11), f)
    assert words[LAYOUT.stats_row(shard) + L.S_BYTES] == 11
    assert words[LAYOUT.lease(shard, 2) + L.L_BYTES] == 11
    assert words[LAYOUT.stats_band(shard, 3) + L.SB_BYTES] == 11
    assert sum(1 for w in words if w) == len(
        [
            LAYOUT.stats_row(shard) + L.S_LEN,
            LAYOUT.stats_row(shard) + L.S_BYTES,
            LAYOUT.stats_row(shard) + L.S_TOP_WAITING,
            LAYOUT.stats_band(shard, 3) + L.SB_LEN,
            LAYOUT.stats_band(shard, 3) + L.SB_BYTES,
            LAYOUT.stats_band(shard, 3) + L.SB_OLDEST_NS,
            LAYOUT.lease(shard, 2) + L.L_COUNT,
            LAYOUT.lease(shard, 2) + L.L_BYTES,
        ]
    )
