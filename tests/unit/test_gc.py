"""The GC process's pure parts: the idle planner (fake clock) and the two-phase Removal machine."""

from __future__ import annotations

from ipc import shm_layout as L
from ipc.messages import Abort, Commit, EntityKind, Prepare, Retire
from runtime.gc_worker import (
    ABORTED,
    DONE,
    REMOVED,
    SKIPPED,
    Candidate,
    GcPlanner,
    Removal,
)
from runtime.registry import BAND_UNDESIRED

FLOW, BAND = EntityKind.FLOW, EntityKind.BAND
S = 1_000_000_000  # ns per second
SHARDS = [0, 1]


def world(max_flows=8, max_bands=4):
    layout = L.Layout(2, max_bands, max_flows)
    return [0] * layout.total_words, layout


def add_flow(w, layout, slot, gen=1, created=0, band=0):
    base = layout.flow(slot)
    w[base + L.F_STATE] = L.BandState.ACTIVE
    w[base + L.F_GEN] = gen
    w[base + L.F_BAND] = band
    w[base + L.F_CREATED_NS] = created
    w[L.H_FLOW_HWM] = max(w[L.H_FLOW_HWM], slot + 1)


def add_band(w, layout, slot, gen=1, flags=0, flows=0):
    base = layout.band(slot)
    w[base + L.B_STATE] = L.BandState.ACTIVE
    w[base + L.B_GEN] = gen
    w[base + L.B_FLAGS] = flags
    w[base + L.B_FLOWS] = flows
    w[L.H_BAND_HWM] = max(w[L.H_BAND_HWM], slot + 1)


def test_flow_collected_only_after_timeout_since_latest_idle_stamp():
    # GIE scenarios 7 and 9: idle for the timeout is collected; a recent use restarts the wait.
    w, layout = world()
    add_flow(w, layout, 0, created=0)
    planner = GcPlanner(flow_timeout=10, band_timeout=20)
    assert planner.plan(w, layout, SHARDS, 9 * S) == []
    assert planner.plan(w, layout, SHARDS, 10 * S) == [Candidate(FLOW, 0, 1)]
    w[layout.lease(1, 0) + L.L_IDLE_NS] = 9 * S  # used on shard 1 until t=9
    assert planner.plan(w, layout, SHARDS, 18 * S) == []
    assert planner.plan(w, layout, SHARDS, 19 * S) == [Candidate(FLOW, 0, 1)]


def test_leased_flow_is_never_a_candidate():
    # GIE scenarios 8 and 10: a lease beats any timestamp.
    w, layout = world()
    add_flow(w, layout, 0, created=0)
    w[layout.lease(0, 0) + L.L_COUNT] = 1
    planner = GcPlanner(flow_timeout=10, band_timeout=20)
    assert planner.plan(w, layout, SHARDS, 1000 * S) == []


def test_dead_shard_rows_are_ignored():
    w, layout = world()
    add_flow(w, layout, 0, created=0)
    w[layout.lease(1, 0) + L.L_COUNT] = 1  # shard 1 is not live
    planner = GcPlanner(flow_timeout=10, band_timeout=20)
    assert planner.plan(w, layout, [0], 11 * S) == [Candidate(FLOW, 0, 1)]


def test_band_needs_grace_observation_then_timeout():
    # GIE scenario 24/28: stamped on first idle observation, collected after the band timeout.
    w, layout = world()
    add_band(w, layout, 0)
    planner = GcPlanner(flow_timeout=10, band_timeout=20)
    assert planner.plan(w, layout, SHARDS, 100 * S) == []  # first sighting stamps
    assert planner.plan(w, layout, SHARDS, 119 * S) == []
    assert planner.plan(w, layout, SHARDS, 120 * S) == [Candidate(BAND, 0, 1)]


def test_band_activity_resets_the_idle_stamp():
    w, layout = world()
    add_band(w, layout, 0)
    planner = GcPlanner(flow_timeout=10, band_timeout=20)
    planner.plan(w, layout, SHARDS, 0)
    w[layout.band(0) + L.B_FLOWS] = 1  # a flow joined (scenario 28)
    assert planner.plan(w, layout, SHARDS, 15 * S) == []
    w[layout.band(0) + L.B_FLOWS] = 0
    assert planner.plan(w, layout, SHARDS, 30 * S) == []  # stamped again at 30
    w[layout.stats_band(1, 0) + L.SB_LEN] = 2  # queued items keep it too
    assert planner.plan(w, layout, SHARDS, 60 * S) == []
    w[layout.stats_band(1, 0) + L.SB_LEN] = 0
    assert planner.plan(w, layout, SHARDS, 61 * S) == []
    assert planner.plan(w, layout, SHARDS, 81 * S) == [Candidate(BAND, 0, 1)]


def test_static_and_desired_bands_are_never_candidates():
    # GIE scenario 25 and 34 (static bands are kept even after use).
    w, layout = world()
    add_band(w, layout, 0, flags=L.BAND_STATIC)
    add_band(w, layout, 1, flags=L.BAND_DESIRED)
    planner = GcPlanner(flow_timeout=10, band_timeout=20)
    for t in (0, 100, 10_000):
        assert planner.plan(w, layout, SHARDS, t * S) == []


def test_undesired_band_is_collected_as_soon_as_idle():
    w, layout = world()
    add_band(w, layout, 0, flags=BAND_UNDESIRED, flows=1)
    planner = GcPlanner(flow_timeout=10, band_timeout=1000)
    assert planner.plan(w, layout, SHARDS, 0) == []  # still has a flow
    w[layout.band(0) + L.B_FLOWS] = 0
    assert planner.plan(w, layout, SHARDS, 1 * S) == [Candidate(BAND, 0, 1)]


def test_non_active_entities_are_skipped():
    w, layout = world()
    add_flow(w, layout, 0)
    w[layout.flow(0) + L.F_STATE] = L.BandState.RETIRING
    add_band(w, layout, 0)
    w[layout.band(0) + L.B_STATE] = L.BandState.RETIRING
    planner = GcPlanner(flow_timeout=1, band_timeout=1)
    assert planner.plan(w, layout, SHARDS, 100 * S) == []


# --- the two-phase Removal --------------------------------------------------------------------
CAND = Candidate(FLOW, 3, 7)


def started(timeout=2.0):
    r = Removal(42, CAND, timeout)
    assert r.start() == [Retire(42, FLOW, 3, 7)]
    return r


def prepared(shards=(0, 1), now=100.0):
    r = started()
    assert r.on_ack(True, "") == [Prepare(42, FLOW, 3, 7)]
    assert r.on_prepare_sent(True, shards, now) == []
    return r


def test_happy_path_commits_after_every_yes():
    r = prepared()
    assert r.on_vote(0, True, "") == []
    assert r.on_vote(1, True, "") == [Commit(42, FLOW, 3, 7)]
    assert r.on_ack(True, "") == []
    assert r.state == DONE and r.result == REMOVED


def test_phase_one_refused_skips_without_messages():
    r = started()
    assert r.on_ack(False, "flow is leased") == []
    assert r.result == SKIPPED


def test_a_shard_saying_no_aborts():
    r = prepared()
    assert r.on_vote(0, True, "") == []
    assert r.on_vote(1, False, "2 queued") == [Abort(42, FLOW, 3, 7)]
    assert r.on_vote(1, True, "") == []  # late vote ignored
    assert r.on_ack(True, "") == []
    assert r.result == ABORTED and "2 queued" in r.reason


def test_a_shard_not_answering_in_time_aborts():
    r = prepared(now=100.0)
    r.on_vote(0, True, "")
    assert r.on_tick(101.9) == []
    assert r.on_tick(102.0) == [Abort(42, FLOW, 3, 7)]
    assert r.on_tick(103.0) == []  # no second abort
    r.on_ack(True, "")
    assert r.result == ABORTED and "[1]" in r.reason


def test_revival_before_prepare_finishes_without_abort():
    # A request for the entity made the coordinator revive it: Prepare is refused.
    r = started()
    r.on_ack(True, "")
    assert r.on_prepare_sent(False, (), 0.0, "revived or removed") == []
    assert r.result == ABORTED


def test_revival_after_votes_makes_commit_fail():
    r = prepared()
    r.on_vote(0, True, "")
    r.on_vote(1, True, "")
    assert r.on_ack(False, "revived") == []
    assert r.result == ABORTED and r.reason == "revived"


def test_repeated_and_out_of_state_messages_are_ignored():
    r = prepared()
    assert r.on_prepare_sent(True, (0, 1), 0.0) == []  # repeated
    assert r.on_vote(5, True, "") == []  # not asked
    r.on_vote(0, True, "")
    assert r.on_vote(0, True, "") == []  # repeated yes does not count twice
    assert r.state != DONE
    assert r.on_vote(1, True, "") == [Commit(42, FLOW, 3, 7)]
    assert r.on_vote(1, True, "") == []


def test_no_live_shard_commits_at_once():
    r = started()
    r.on_ack(True, "")
    assert r.on_prepare_sent(True, (), 0.0) == [Commit(42, FLOW, 3, 7)]


def test_band_with_requests_in_flight_is_not_idle():
    w, layout = world()
    add_band(w, layout, 0)
    w[layout.stats_band(1, 0) + L.SB_INFLIGHT] = 1  # dispatched, not released yet
    planner = GcPlanner(flow_timeout=1, band_timeout=1)
    assert planner.plan(w, layout, SHARDS, 0) == []
    assert planner.plan(w, layout, SHARDS, 100 * S) == []
    w[layout.stats_band(1, 0) + L.SB_INFLIGHT] = 0
    assert planner.plan(w, layout, SHARDS, 101 * S) == []  # idle from now
    assert planner.plan(w, layout, SHARDS, 102 * S) == [Candidate(BAND, 0, 1)]
