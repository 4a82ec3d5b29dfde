"""PageSet, the source's record of pages sent, checked against a plain set of pages and against
RangeSet, whose place it took."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from aiopostcopy.core.pageset import PageSet
from aiopostcopy.core.rangeset import RangeSet

PAGES = 64

runs = st.tuples(st.integers(-3, PAGES + 3), st.integers(-3, PAGES + 3))
operations = st.lists(st.tuples(st.sampled_from(("add", "subtract")), runs), max_size=40)


def test_a_fault_page_a_run_and_their_removal() -> None:
    pages = PageSet(PAGES)
    pages.add(10, 11)
    pages.add(20, 30)
    assert pages.runs() == [(10, 11), (20, 30)] and pages.total() == 11
    assert 10 in pages and 11 not in pages and -1 not in pages and "10" not in pages
    assert pages.first_gap_from(0, PAGES) == (0, 10)
    assert pages.first_gap_from(10, PAGES) == (11, 20)
    assert pages.first_gap_from(20, 25) is None
    assert pages.covers(20, 30) and not pages.covers(19, 30) and pages.covers(5, 5)
    pages.subtract(25, 40)
    assert pages.runs() == [(10, 11), (20, 25)] and pages.total() == 6
    assert not pages.covers(0, PAGES)
    pages.add(0, PAGES)
    assert pages.covers(0, PAGES) and pages.first_gap_from(0, PAGES) is None and pages.total() == PAGES


@settings(max_examples=300, deadline=None)
@given(operations, st.lists(st.tuples(st.integers(0, PAGES), st.integers(0, PAGES + 2)), max_size=8))
def test_it_answers_as_a_set_of_pages_and_as_the_range_set_does(ops, queries) -> None:
    pages, model, ranges = PageSet(PAGES, [(3, 7)]), set(range(3, 7)), RangeSet([(3, 7)])
    for op, (start, stop) in ops:
        getattr(pages, op)(start, stop)
        low, high = max(start, 0), min(stop, PAGES)
        if op == "add":
            model |= set(range(low, high))
            ranges.add(low, high)
        else:
            model -= set(range(low, high))
            ranges.subtract(low, high)
        assert pages.total() == len(model)
        assert pages.runs() == list(ranges)
    assert [page for page in range(-2, PAGES + 2) if page in pages] == sorted(model)
    assert pages.covers(0, PAGES) == (len(model) == PAGES)
    for value, limit in queries:
        assert pages.first_gap_from(value, limit) == ranges.first_gap_from(value, min(limit, PAGES))
        assert pages.covers(value, limit) == ranges.covers(value, min(limit, PAGES))
    assert PageSet(PAGES, pages.runs()).runs() == pages.runs()


def test_a_run_longer_than_one_fill_is_filled_whole() -> None:
    pages = PageSet((1 << 21) + 5)
    pages.add(3, (1 << 21) + 4)
    assert pages.runs() == [(3, (1 << 21) + 4)] and pages.total() == (1 << 21) + 1
    pages.subtract(0, (1 << 21) + 5)
    assert pages.runs() == [] and pages.total() == 0
