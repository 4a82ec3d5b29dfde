"""RangeSet: unit tests and a property test against a plain Python set."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aiopostcopy.core.rangeset import RangeSet, bounds_total, chunks, clip_bounds, merge_runs
from aiopostcopy.errors import LocalProtocolError
from aiopostcopy.messages import MAX_RUN_PAGES, PageRun


def test_add_merges_overlapping_and_adjacent() -> None:
    rs = RangeSet()
    rs.add(10, 20)
    rs.add(30, 40)
    rs.add(20, 30)
    assert list(rs) == [(10, 40)]
    assert len(rs) == 1
    assert rs.total() == 30


def test_add_empty_is_ignored() -> None:
    rs = RangeSet([(5, 5), (7, 3)])
    assert not rs
    assert rs.bounds() == ()


def test_subtract_splits_and_trims() -> None:
    rs = RangeSet([(0, 100)])
    rs.subtract(10, 20)
    rs.subtract(90, 200)
    rs.subtract(0, 1)
    assert list(rs) == [(1, 10), (20, 90)]
    rs.subtract(1, 90)
    assert not rs


def test_contains_uses_half_open_bounds() -> None:
    rs = RangeSet([(3, 5)])
    assert 3 in rs and 4 in rs
    assert 2 not in rs and 5 not in rs


def test_bounds_round_trip() -> None:
    rs = RangeSet([(1, 3), (7, 9)])
    assert rs.bounds() == (1, 3, 7, 9)
    assert RangeSet.from_bounds(rs.bounds()) == rs


@pytest.mark.parametrize("bounds", [(1,), (3, 3), (1, 4, 4, 6), (5, 2)])
def test_from_bounds_rejects_bad_bounds(bounds: tuple[int, ...]) -> None:
    with pytest.raises(ValueError):
        RangeSet.from_bounds(bounds)


def test_first_gap_from() -> None:
    rs = RangeSet([(0, 4), (6, 8)])
    assert rs.first_gap_from(0, 10) == (4, 6)
    assert rs.first_gap_from(5, 10) == (5, 6)
    assert rs.first_gap_from(6, 10) == (8, 10)
    assert rs.first_gap_from(6, 8) is None
    assert RangeSet([(0, 10)]).first_gap_from(0, 10) is None


def test_intersection_gaps_covers() -> None:
    rs = RangeSet([(2, 4), (6, 9)])
    assert rs.intersection(3, 7) == [(3, 4), (6, 7)]
    assert rs.gaps(0, 10) == [(0, 2), (4, 6), (9, 10)]
    assert rs.covers(6, 9) and not rs.covers(5, 9)
    assert rs.covers(4, 4)


ops = st.lists(st.tuples(st.booleans(), st.integers(0, 60), st.integers(0, 60)), max_size=40)


@settings(max_examples=300)
@given(ops, st.integers(0, 60), st.integers(0, 60))
def test_matches_a_set_model(operations: list[tuple[bool, int, int]], probe: int, limit: int) -> None:
    rs, model = RangeSet(), set()
    for adding, start, stop in operations:
        if adding:
            rs.add(start, stop)
            model |= set(range(start, stop))
        else:
            rs.subtract(start, stop)
            model -= set(range(start, stop))
    assert {x for run in rs for x in range(*run)} == model
    assert rs.total() == len(model)
    assert all(low < high for low, high in rs)
    flat = rs.bounds()
    assert all(a < b for a, b in zip(flat, flat[1:])), "sorted and merged"
    assert (probe in rs) == (probe in model)
    gap = rs.first_gap_from(probe, limit)
    missing = [x for x in range(probe, limit) if x not in model]
    if not missing:
        assert gap is None
    else:
        start = missing[0]
        stop = start
        while stop < limit and stop not in model:
            stop += 1
        assert gap == (start, stop)
    assert [x for run in rs.gaps(0, 61) for x in range(*run)] == [x for x in range(61) if x not in model]


@pytest.mark.parametrize(("bounds", "start", "stop", "expected"), [
    ((), 0, 10, (0, ())),
    ((1, 3, 6, 7), 0, 10, (0, (1, 3, 6, 7))),
    ((1, 3, 6, 7), 2, 10, (1, (0, 1, 4, 5))),  # cut through the first stretch
    ((1, 3, 6, 7), 3, 6, (2, ())),  # between the stretches
    ((1, 3, 6, 7), 7, 9, (3, ())),  # after both
    ((1, 3, 6, 7), 0, 2, (0, (1, 2))),  # stops inside the first
])
def test_clip_bounds(bounds: tuple, start: int, stop: int, expected: tuple) -> None:
    assert clip_bounds(bounds, start, stop) == expected


@given(st.lists(st.integers(0, 60), unique=True).map(sorted), st.integers(0, 64), st.integers(1, 64))
def test_clip_bounds_agrees_with_a_set(points: list[int], start: int, length: int) -> None:
    stop = start + length
    bounds = tuple(points[: len(points) // 2 * 2])
    members = {p for low, high in zip(bounds[::2], bounds[1::2]) for p in range(low, high)}
    before, inside = clip_bounds(bounds, start, stop)
    assert before == len({p for p in members if p < start})
    got = {start + p for low, high in zip(inside[::2], inside[1::2]) for p in range(low, high)}
    assert got == {p for p in members if start <= p < stop}


def test_bounds_total_counts_the_values_covered() -> None:
    assert bounds_total(()) == 0
    assert bounds_total((1, 3, 6, 7)) == 3
    assert bounds_total([0, 4096]) == 4096


@given(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 40), st.integers(1, 8)), max_size=30))
def test_merge_runs_covers_the_same_pages_with_sorted_runs_that_never_touch(runs: list) -> None:
    page_runs = [PageRun(block=b, first=f, count=c) for b, f, c in runs]
    merged = merge_runs(page_runs)
    pages = {(r.block, p) for r in page_runs for p in range(r.first, r.stop)}
    assert {(r.block, p) for r in merged for p in range(r.first, r.stop)} == pages
    for before, after in zip(merged, merged[1:]):
        assert (before.block, before.stop) < (after.block, after.first)
    for run in merged:  # built unchecked, yet each is a run the checked constructor accepts
        assert type(run) is PageRun and run == PageRun(block=run.block, first=run.first, count=run.count)


def test_runs_merged_past_the_largest_run_are_refused_as_before() -> None:
    halves = [PageRun(block=0, first=0, count=MAX_RUN_PAGES), PageRun(block=0, first=MAX_RUN_PAGES, count=1)]
    with pytest.raises(LocalProtocolError, match="count"):
        merge_runs(halves)


def test_chunks_cut_in_order_with_at_most_size_items() -> None:
    assert list(chunks([1, 2, 3, 4, 5], 2)) == [(1, 2), (3, 4), (5,)]
    assert list(chunks([], 3)) == []
