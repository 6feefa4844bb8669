"""The coordinator's registry: provisioning, generations and the two-phase removal, no processes."""

from __future__ import annotations

import pytest

from ipc import shm_layout as L
from ipc.messages import Abort, EntityKind
from runtime.config import load
from runtime.registry import ACTIVE, FREE, RETIRING, Registry

FLOW, BAND = EntityKind.FLOW, EntityKind.BAND


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000_000

    def __call__(self) -> int:
        return self.now


def make(bands: str = "hi:20,lo:10", max_flows: int = 16, max_bands: int = 8, shards: int = 2):
    config = load(
        {
            "BANDGATE_SOCKET_DIR": "/tmp/x",
            "BANDGATE_BANDS": bands,
            "BANDGATE_MAX_FLOWS": str(max_flows),
            "BANDGATE_MAX_BANDS": str(max_bands),
            "BANDGATE_SHARDS": "1",
            "BANDGATE_MAX_SHARDS": str(shards),
        }
    )
    layout = L.Layout(shards, max_bands, max_flows)
    words = [0] * layout.total_words
    return Registry(words, layout, config, Clock()), words, layout


def test_static_bands_exist_at_start_and_mirror_into_shared_memory():
    reg, w, layout = make()
    assert sorted(reg.band_by_priority) == [10, 20]
    band = reg.band_by_priority[20]
    assert band.static and band.name == "hi" and band.state == ACTIVE
    base = layout.band(band.slot)
    assert w[base + L.B_PRIORITY] == 20
    assert w[base + L.B_FLAGS] & L.BAND_STATIC
    assert w[base + L.B_STATE] == ACTIVE


def test_jit_provisioning_creates_band_and_flow_once():
    # GIE scenarios 13/14: an unknown priority gets a band; repeated provisioning does not duplicate.
    reg, w, layout = make()
    flow, band, aborts = reg.provision("a", 55)
    assert aborts == []
    assert band.priority == 55 and not band.static and band.flows == 1
    again, band2, _ = reg.provision("a", 55)
    assert again is flow and band2 is band and band.flows == 1
    other, band3, _ = reg.provision("b", 55)
    assert band3 is band and band.flows == 2 and other.slot != flow.slot
    assert w[layout.band(band.slot) + L.B_FLOWS] == 2
    assert w[L.H_FLOW_HWM] == 2


def test_same_id_at_two_priorities_is_two_flows():
    reg, _, _ = make()
    f1, _, _ = reg.provision("a", 20)
    f2, _, _ = reg.provision("a", 10)
    assert f1.slot != f2.slot


def test_full_tables_name_their_limit_and_recover_after_removal():
    reg, _, _ = make(bands="", max_flows=16, max_bands=2)
    flows = [reg.provision(f"f{i}", 0)[0] for i in range(16)]
    with pytest.raises(Exception, match="BANDGATE_MAX_FLOWS"):
        reg.provision("one-too-many", 0)
    f = flows[3]
    assert reg.retire(7, FLOW, f.slot, f.gen) == ""
    assert reg.commit(7, FLOW, f.slot, f.gen) == ""
    new, _, _ = reg.provision("one-too-many", 0)
    assert new.slot == f.slot and new.gen == f.gen + 1


def test_full_band_table_names_its_limit():
    reg, _, _ = make(bands="", max_bands=2)
    reg.provision("x", 0)
    reg.provision("x", 1)
    with pytest.raises(Exception, match="BANDGATE_MAX_BANDS"):
        reg.provision("y", 2)
    assert reg.provision("z", 1)[1].priority == 1  # existing bands unaffected


def test_retire_commit_frees_flow_and_band_flow_count():
    reg, w, layout = make()
    flow, band, _ = reg.provision("a", 99)
    assert reg.retire(1, FLOW, flow.slot, flow.gen) == ""
    assert flow.state == RETIRING and w[layout.flow(flow.slot) + L.F_STATE] == RETIRING
    assert reg.preparable(1, FLOW, flow.slot, flow.gen) == ""
    assert reg.commit(1, FLOW, flow.slot, flow.gen) == ""
    assert w[layout.flow(flow.slot) + L.F_STATE] == FREE
    assert band.flows == 0 and ("a", 99) not in reg.flow_by_key
    assert reg.counters["flows_removed"] == 1
    # now the band can go (GIE scenario 24)
    assert reg.retire(2, BAND, band.slot, band.gen) == ""
    assert reg.commit(2, BAND, band.slot, band.gen) == ""
    assert 99 not in reg.band_by_priority and reg.counters["bands_removed"] == 1


def test_band_with_flows_static_or_desired_is_not_retired():
    reg, _, _ = make()
    _, band, _ = reg.provision("a", 99)
    assert "flows" in reg.retire(1, BAND, band.slot, band.gen)
    hi = reg.band_by_priority[20]
    assert reg.retire(2, BAND, hi.slot, hi.gen) == "static band"
    reg.reconcile([20, 10, 77])
    desired = reg.band_by_priority[77]
    assert reg.retire(3, BAND, desired.slot, desired.gen) == "desired band"


def test_leased_flow_is_not_retired():
    # GIE scenario 10: a lease beats an old idle timestamp.
    reg, w, layout = make()
    flow, _, _ = reg.provision("a", 20)
    w[layout.lease(1, flow.slot) + L.L_COUNT] = 1
    assert reg.retire(1, FLOW, flow.slot, flow.gen) == "flow is leased"
    w[layout.lease(1, flow.slot) + L.L_COUNT] = 0
    assert reg.retire(1, FLOW, flow.slot, flow.gen) == ""


def test_band_with_queued_items_is_not_retired():
    reg, w, layout = make()
    flow, band, _ = reg.provision("a", 99)
    reg.retire(1, FLOW, flow.slot, flow.gen)
    reg.commit(1, FLOW, flow.slot, flow.gen)
    w[layout.stats_band(0, band.slot) + L.SB_LEN] = 1
    assert reg.retire(2, BAND, band.slot, band.gen) == "band has queued or in-flight requests"
    w[layout.stats_band(0, band.slot) + L.SB_LEN] = 0
    w[layout.stats_band(1, band.slot) + L.SB_INFLIGHT] = 1
    assert reg.retire(2, BAND, band.slot, band.gen) == "band has queued or in-flight requests"


def test_provision_revives_a_retiring_flow_and_band_and_returns_aborts():
    reg, _, _ = make()
    flow, band, _ = reg.provision("a", 99)
    reg.retire(5, FLOW, flow.slot, flow.gen)
    again, _, aborts = reg.provision("a", 99)
    assert again is flow and flow.state == ACTIVE
    assert aborts == [Abort(5, FLOW, flow.slot, flow.gen)]
    # the GC's commit for the old transaction is refused: nothing a request uses is freed
    assert reg.commit(5, FLOW, flow.slot, flow.gen) == "revived"
    assert ("a", 99) in reg.flow_by_key and reg.counters["revivals"] == 1
    # band revival, after its flow is gone
    reg.retire(6, FLOW, flow.slot, flow.gen)
    reg.commit(6, FLOW, flow.slot, flow.gen)
    reg.retire(7, BAND, band.slot, band.gen)
    assert reg.preparable(7, BAND, band.slot, band.gen) == ""
    _flow2, band2, aborts = reg.provision("b", 99)
    assert band2 is band and band.state == ACTIVE
    assert aborts == [Abort(7, BAND, band.slot, band.gen)]
    assert reg.preparable(7, BAND, band.slot, band.gen) != ""
    assert reg.commit(7, BAND, band.slot, band.gen) == "revived"
    assert band.flows == 1


def test_messages_are_idempotent_and_generation_checked():
    reg, _, _ = make()
    flow, _, _ = reg.provision("a", 20)
    slot, gen = flow.slot, flow.gen
    assert reg.retire(1, FLOW, slot, gen) == ""
    assert reg.retire(1, FLOW, slot, gen) == ""  # repeated phase 1
    assert reg.retire(2, FLOW, slot, gen) != ""  # another txn
    assert reg.commit(1, FLOW, slot, gen) == ""
    assert reg.counters["flows_removed"] == 1
    # repeated or late messages about the old generation do nothing
    assert reg.commit(1, FLOW, slot, gen) != ""
    assert reg.abort(1, FLOW, slot, gen) is False
    new, _, _ = reg.provision("b", 20)
    assert new.slot == slot and new.gen == gen + 1
    assert reg.retire(1, FLOW, slot, gen) != ""  # stale generation
    assert reg.commit(1, FLOW, slot, gen) != ""
    assert new.state == ACTIVE and reg.counters["flows_removed"] == 1


def test_abort_returns_to_active_once():
    reg, _, _ = make()
    flow, _, _ = reg.provision("a", 20)
    reg.retire(3, FLOW, flow.slot, flow.gen)
    assert reg.abort(3, FLOW, flow.slot, flow.gen) is True
    assert reg.abort(3, FLOW, flow.slot, flow.gen) is False
    assert flow.state == ACTIVE and reg.counters["aborts"] == 1
    assert reg.commit(3, FLOW, flow.slot, flow.gen) == "revived"


def test_abort_all_after_gc_death():
    reg, _, _ = make()
    f1, _, _ = reg.provision("a", 20)
    f2, _, _ = reg.provision("b", 20)
    reg.retire(1, FLOW, f1.slot, f1.gen)
    reg.retire(2, FLOW, f2.slot, f2.gen)
    aborts = reg.abort_all()
    assert {a.txn for a in aborts} == {1, 2}
    assert f1.state == ACTIVE and f2.state == ACTIVE


def test_reconcile_adds_marks_and_keeps_static():
    # GIE scenario 35 (with the fix: static bands untouched, removal by the two phases).
    reg, w, layout = make()
    _, jit, _ = reg.provision("a", 55)
    reg.reconcile([20, 10, 77])
    assert sorted(reg.band_by_priority) == [10, 20, 55, 77]
    assert reg.band_by_priority[77].desired
    assert jit.undesired and not jit.desired
    assert w[layout.band(jit.slot) + L.B_FLAGS] & 4
    reg.reconcile([20, 10, 77])
    assert len(reg.bands) == 4
    reg.reconcile([])
    assert reg.band_by_priority[77].undesired and reg.band_by_priority[20].static
    assert reg.band_state_name(reg.band_by_priority[20]) == "static"
    reg.reconcile([55])
    assert jit.desired and not jit.undesired
