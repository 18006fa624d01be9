"""SlotTable: invariants under random assign/evict sequences, snapshots, and loud failures."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from ef_jax.cache import SlotSnapshot, SlotTable

L, E, S = 3, 10, 4

ops = st.lists(st.tuples(st.sampled_from(["assign", "assign_free", "evict", "replace"]), st.integers(0, L - 1),
                         st.integers(0, E - 1), st.integers(0, S - 1), st.integers(0, E - 1)), max_size=60)


@settings(max_examples=150, deadline=None)
@given(ops)
def test_random_sequences_keep_invariants(seq):
    table = SlotTable(L, E, S)
    model = [dict() for _ in range(L)]  # per layer: expert → slot, the obvious reference
    for op, layer, expert, slot, other in seq:
        before = table.snapshot()
        try:
            if op == "assign":
                table.assign(layer, expert, slot)
                model[layer][expert] = slot
            elif op == "assign_free":
                got = table.assign_free(layer, expert)
                assert got == min(set(range(S)) - set(model[layer].values()))
                model[layer][expert] = got
            elif op == "evict":
                assert table.evict(layer, expert) == model[layer].pop(expert)
            else:
                got = table.replace(layer, expert, other)
                assert got == model[layer].pop(expert)
                model[layer][other] = got
        except ValueError:
            after = table.snapshot()  # a refused operation leaves the table untouched
            assert all(np.array_equal(a, b) for a, b in zip(before, after))
        table.verify()
        for l in range(L):
            assert table.num_resident(l) == len(model[l]) <= S
            assert table.resident(l).tolist() == sorted(model[l])
            for e, s in model[l].items():
                assert table.slot(l, e) == s and table.expert_of_slot[l, s] == e


def test_snapshot_is_a_copy_and_round_trips():
    table = SlotTable(2, 6, 3)
    table.assign(0, 5, 2)
    table.assign_free(1, 4)
    snap = table.snapshot()
    assert isinstance(snap, SlotSnapshot)
    assert snap.slot_of_expert.dtype == np.int32 and snap.slot_of_expert.shape == (2, 6)
    assert snap.expert_of_slot.tolist() == [[-1, -1, 5], [4, -1, -1]]
    table.evict(0, 5)
    assert snap.expert_of_slot[0, 2] == 5  # not aliased to the live table
    again = SlotTable.from_snapshot(snap)
    assert again.slot(0, 5) == 2 and again.free_slot(0) == 0 and again.free_slot(1) == 1


def test_corruption_is_reported_with_a_dump():
    table = SlotTable(2, 6, 3)
    table.assign(1, 3, 0)
    table._eos[1][2] = 3  # slot 2 claims expert 3, which lives in slot 0
    with pytest.raises(RuntimeError, match=r"(?s)layer 1: slots \[2\] hold experts.*layer 1: slots \[3, -1, 3\]"):
        table.verify()
    bad = SlotSnapshot(np.array([[0, 0, -1]], np.int32), np.array([[0, -1]], np.int32))
    with pytest.raises(RuntimeError, match="two experts share a slot"):
        SlotTable.from_snapshot(bad)


def test_bad_arguments_name_the_fix():
    with pytest.raises(ValueError, match="slots_per_layer=9 exceeds num_experts=8"):
        SlotTable(2, 8, 9)
    table = SlotTable(1, 4, 1)
    table.assign_free(0, 1)
    with pytest.raises(ValueError, match="no free slot"):
        table.assign_free(0, 2)
    with pytest.raises(ValueError, match="holds expert 1; evict it"):
        table.assign(0, 2, 0)
    with pytest.raises(ValueError, match="expert=7 out of range"):
        table.evict(0, 7)
    with pytest.raises(ValueError, match="not resident"):
        table.evict(0, 3)
    assert table.free_slot(0) == -1
    table.clear()
    assert table.free_slot(0) == 0 and table.num_resident(0) == 0
