"""PageStates: the transition table, incremental counts, scans, and memory cost."""

from __future__ import annotations

import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aiopostcopy.core.pages import (MISSING, PLACED, PLACING, REQUESTED, TRANSITIONS, PageStates)
from aiopostcopy.errors import InternalError

STATES = (MISSING, REQUESTED, PLACED, PLACING)


def test_fresh_block_is_all_missing() -> None:
    states = PageStates(10)
    assert states.count(MISSING) == 10
    assert states.next_missing() == 0
    assert states.missing_runs(0, 10) == [(0, 10)]
    assert not states.complete


def test_normal_life_of_a_page() -> None:
    states = PageStates(8)
    assert states.mark(2, 3, REQUESTED) == [3, 0, 0, 0]
    assert states.mark(2, 2, PLACING) == [0, 2, 0, 0]
    assert states.mark(0, 2, PLACING) == [2, 0, 0, 0]  # unrequested data (sweep)
    assert states.mark(0, 4, PLACED) == [0, 0, 0, 4]
    assert [states[page] for page in range(6)] == [PLACED] * 4 + [REQUESTED, MISSING]
    assert states.count(PLACED) == 4 and states.count(REQUESTED) == 1 and states.count(MISSING) == 3


@pytest.mark.parametrize("before, after", [
    (PLACED, PLACING), (PLACED, REQUESTED), (REQUESTED, MISSING), (REQUESTED, PLACED),
    (MISSING, PLACED), (PLACING, REQUESTED), (PLACED, PLACED),
])
def test_forbidden_transitions_raise(before: int, after: int) -> None:
    states = PageStates(4)
    path = {MISSING: [], REQUESTED: [REQUESTED], PLACING: [PLACING], PLACED: [PLACING, PLACED]}
    for state in path[before]:
        states.mark(1, 1, state)
    with pytest.raises(InternalError, match="cannot become"):
        states.mark(1, 1, after)
    if after in TRANSITIONS and MISSING in TRANSITIONS[after]:
        with pytest.raises(InternalError):  # one bad page refuses the whole run
            states.mark(0, 2, after)
        assert states[0] == MISSING
    assert states[1] == before, "a refused mark changes nothing"


@pytest.mark.parametrize("before", [MISSING, PLACING, PLACED])
def test_place_requested_moves_only_a_requested_page(before: int) -> None:
    states = PageStates(4)
    states.mark(1, 1, REQUESTED)
    assert states.place_requested(1)  # REQUESTED -> PLACED, as through PLACING
    assert states[1] == PLACED and states.count(PLACED) == 1 and states.count(REQUESTED) == 0
    path = {MISSING: [], PLACING: [PLACING], PLACED: [PLACING, PLACED]}
    for state in path[before]:
        states.mark(2, 1, state)
    counts = [states.count(state) for state in STATES]
    assert not states.place_requested(2)
    assert not states.place_requested(4) and not states.place_requested(-1)  # out of range
    assert states[2] == before and [states.count(state) for state in STATES] == counts, "nothing changed"


def test_out_of_range_mark_raises() -> None:
    with pytest.raises(InternalError):
        PageStates(4).mark(3, 2, REQUESTED)


def test_runs_and_find() -> None:
    states = PageStates(12)
    states.mark(2, 2, REQUESTED)
    states.mark(6, 3, PLACING)
    states.mark(7, 1, PLACED)
    assert states.missing_runs(0, 12) == [(0, 2), (4, 6), (9, 12)]
    assert states.runs(0, 12, frozenset({PLACING, PLACED})) == [(6, 9)]
    assert states.runs(3, 5, frozenset({MISSING, REQUESTED})) == [(3, 6)]
    assert states.find(PLACED) == 7
    assert states.find(PLACED, 8) is None
    assert states.next_missing(2) == 4
    assert states.all_in(6, 1, PLACING) and not states.all_in(6, 2, PLACING)


def test_placed_set_for_resume() -> None:
    states = PageStates(10)
    states.mark(1, 3, PLACING)
    states.mark(1, 2, PLACED)
    assert list(states.placed_set()) == [(1, 3)]
    assert list(states.placed_set(including_placing=True)) == [(1, 4)]


def test_bookkeeping_is_under_one_percent_of_the_memory() -> None:
    gib = 1 << 30
    states = PageStates(gib // 4096)
    for start in range(0, states.pages, 997):  # fragment it: cost must not grow
        states.mark(start, 1, REQUESTED)
    size = sys.getsizeof(states) + states.memory_bytes()
    assert size < gib // 100
    assert size < gib // 4000, f"{size} bytes: should be about one byte per page"
    huge = PageStates(gib // (2 << 20))
    assert sys.getsizeof(huge) + huge.memory_bytes() < gib // 100


transitions = st.lists(st.tuples(st.integers(0, 30), st.integers(1, 8), st.sampled_from(STATES)),
                       max_size=60)


@settings(max_examples=200)
@given(transitions)
def test_counts_and_states_match_a_model(moves: list[tuple[int, int, int]]) -> None:
    states, model = PageStates(32), [MISSING] * 32
    for first, count, target in moves:
        count = min(count, 32 - first)
        before = model[first:first + count]
        allowed = all(state in TRANSITIONS[target] for state in before)
        if not allowed:
            with pytest.raises(InternalError):
                states.mark(first, count, target)
            continue
        result = states.mark(first, count, target)
        assert list(result) == [before.count(state) for state in STATES]
        model[first:first + count] = [target] * count
    for state in STATES:
        assert states.count(state) == model.count(state)
        runs = states.runs(0, 32, frozenset({state}))
        assert [page for run in runs for page in range(*run)] == \
            [page for page, value in enumerate(model) if value == state]
    assert [states[page] for page in range(32)] == model


@settings(max_examples=100)
@given(st.lists(st.sampled_from(STATES), min_size=1, max_size=60), st.integers(1, 9))
def test_runs_are_merged_across_scan_windows(values: list[int], window: int) -> None:
    import aiopostcopy.core.pages as pages_module

    states = PageStates(len(values))
    states._states[:] = bytes(values)  # a raw picture; counts are not the point here
    saved, pages_module._SCAN_PAGES = pages_module._SCAN_PAGES, window
    try:
        for state in STATES:
            runs = states.runs(0, len(values), frozenset({state}))
            assert [p for run in runs for p in range(*run)] == [p for p, v in enumerate(values) if v == state]
            assert all(a[1] < b[0] for a, b in zip(runs, runs[1:])), "maximal runs"
    finally:
        pages_module._SCAN_PAGES = saved
