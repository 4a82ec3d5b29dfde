"""Coalescer: merging, skipping pages not missing, run and in-flight bounds, order, read-ahead."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from aiopostcopy.core.coalesce import Coalescer
from aiopostcopy.core.pages import MISSING, PLACED, PLACING, REQUESTED, PageStates
from aiopostcopy.messages import PageRun


def run(block: int, first: int, count: int) -> PageRun:
    return PageRun(block=block, first=first, count=count)


def test_adjacent_faults_become_one_run_marked_requested() -> None:
    states = [PageStates(100)]
    coalescer = Coalescer()
    for page in (7, 5, 6, 6, 20):
        coalescer.add(0, page)
    assert coalescer.flush(states) == [run(0, 5, 3), run(0, 20, 1)]
    assert states[0].count(REQUESTED) == 4
    assert coalescer.in_flight == 4
    assert coalescer.flush(states) == []


def test_pages_not_missing_are_never_requested() -> None:
    states = [PageStates(10)]
    states[0].mark(2, 1, REQUESTED)
    states[0].mark(3, 1, PLACING)
    states[0].mark(4, 1, PLACING)
    states[0].mark(4, 1, PLACED)
    coalescer = Coalescer()
    coalescer.add_run(0, 0, 10)
    assert coalescer.flush(states) == [run(0, 0, 2), run(0, 5, 5)]


def test_runs_are_split_to_max_run_pages() -> None:
    coalescer = Coalescer(max_run_pages=4)
    coalescer.add_run(0, 0, 10)
    assert coalescer.flush([PageStates(10)]) == [run(0, 0, 4), run(0, 4, 4), run(0, 8, 2)]


def test_in_flight_budget_keeps_the_rest_queued() -> None:
    states = [PageStates(100)]
    coalescer = Coalescer(max_in_flight_pages=5)
    coalescer.add_run(0, 0, 3)
    coalescer.add_run(0, 50, 4)
    assert coalescer.flush(states) == [run(0, 0, 3), run(0, 50, 2)]
    assert coalescer.flush(states) == []
    states[0].mark(0, 3, PLACING)
    coalescer.settle(3)
    assert coalescer.flush(states) == [run(0, 52, 2)]
    assert coalescer.queued == 0


def test_oldest_fault_goes_first_when_budget_is_short() -> None:
    coalescer = Coalescer(max_in_flight_pages=1)
    coalescer.add(1, 9)
    coalescer.add(0, 3)
    assert coalescer.flush([PageStates(10), PageStates(10)]) == [run(1, 9, 1)]


def test_readahead_extends_forward_within_the_block() -> None:
    states = [PageStates(10)]
    coalescer = Coalescer(readahead_pages=3)
    coalescer.add(0, 8)
    coalescer.add(0, 1)
    assert coalescer.flush(states) == [run(0, 8, 2), run(0, 1, 4)]


def test_leftover_pages_placed_meanwhile_are_dropped() -> None:
    states = [PageStates(10)]
    coalescer = Coalescer(max_in_flight_pages=2)
    coalescer.add_run(0, 0, 6)
    assert coalescer.flush(states) == [run(0, 0, 2)]
    states[0].mark(2, 3, PLACING)
    coalescer.settle(2)
    assert coalescer.flush(states) == [run(0, 5, 1)]


@settings(max_examples=200)
@given(st.lists(st.tuples(st.integers(0, 1), st.integers(0, 39)), max_size=60),
       st.integers(1, 8), st.integers(1, 30), st.lists(st.integers(0, 39), max_size=10))
def test_flush_never_requests_twice_and_loses_nothing(faults: list[tuple[int, int]], max_run: int,
                                                      budget: int, arrived: list[int]) -> None:
    states = [PageStates(40), PageStates(40)]
    for page in arrived:
        if states[0][page] == MISSING:
            states[0].mark(page, 1, PLACING)
    coalescer = Coalescer(max_run_pages=max_run, max_in_flight_pages=budget)
    for block, page in faults:
        coalescer.add(block, page)
    requested: set[tuple[int, int]] = set()
    for _ in range(200):
        runs = coalescer.flush(states)
        assert sum(r.count for r in runs) <= budget
        for r in runs:
            assert 1 <= r.count <= max_run
            pages = {(r.block, p) for p in range(r.first, r.stop)}
            assert not pages & requested, "requested twice"
            requested |= pages
        for r in runs:  # the answers arrive
            states[r.block].mark(r.first, r.count, PLACING)
            coalescer.settle(r.count)
        if not coalescer.queued:
            break
    wanted = {(block, page) for block, page in faults if (block, page) not in
              {(0, p) for p in arrived}}
    assert wanted <= requested
    assert requested <= {(block, page) for block, page in faults}
