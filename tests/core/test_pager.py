"""Pager: a self-served client's bookkeeping, checked against a plain per-page model."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aiopostcopy import messages as m
from aiopostcopy.core.pager import ClientPages, Pager
from aiopostcopy.core.pages import PLACED
from aiopostcopy.core.ramblock import BlockTable, MappingTable
from aiopostcopy.errors import InternalError, MappingTableError, RemoteProtocolError

PAGE, HUGE = 4096, 2 << 20
BLOCKS = BlockTable.from_infos((m.BlockInfo(name="ram0", length=64 * PAGE, page_size=PAGE),
                                m.BlockInfo(name="huge", length=4 * HUGE, page_size=HUGE)))
BASES = (0x7F00_0000_0000, 0x7E00_0000_0000)  # block 1 below block 0: translate must bisect


def pager(**options: int) -> Pager:
    return Pager(MappingTable.identity(BLOCKS, BASES), **options)


def address(block: int, page: int, offset: int = 0) -> int:
    return BASES[block] + page * BLOCKS[block].page_size + offset


def runs_of(requests: list[m.ClientRequest]) -> list[tuple[int, int, int]]:
    return [(run.block, run.first, run.count) for request in requests for run in request.runs]


def test_faults_become_one_coalesced_request_and_placed_wakes_them() -> None:
    p = pager()
    for page in (5, 3, 4, 9):
        assert p.fault(address(0, page, 17), thread_id=1) is None
    assert p.fault(address(1, 2, 5), thread_id=2) is None
    assert runs_of(p.requests()) == [(0, 3, 3), (0, 9, 1), (1, 2, 1)]
    assert p.requests() == []  # nothing new since
    wake = p.placed([m.PageRun(block=0, first=3, count=3), m.PageRun(block=1, first=2, count=1)])
    assert wake == [(address(0, 3), 3 * PAGE), (address(1, 2), HUGE)]
    stats = p.statistics()
    assert stats["faults"] == 5 and stats["requested_pages"] == 5 and stats["requests"] == 1
    assert stats["placed_pages"] == 4 and stats["wakes"] == 2 and p.threads == {1: 4, 2: 1}


def test_a_page_asked_for_is_asked_for_once_and_later_faults_join() -> None:
    p = pager()
    p.fault(address(0, 7), 1)
    p.fault(address(0, 7, 100), 2)  # same pass: queued already
    assert runs_of(p.requests()) == [(0, 7, 1)]
    p.fault(address(0, 7), 3)  # next pass: requested already
    assert p.requests() == []
    assert p.statistics()["joined"] == 2


def test_a_fault_on_a_page_known_placed_is_woken_at_once_then_asked_again() -> None:
    p = pager()
    p.placed([m.PageRun(block=0, first=0, count=8)])
    assert p.fault(address(0, 6, 123), 1) == (address(0, 6), PAGE)
    assert p.statistics()["woken_at_once"] == 1
    assert p.fault(address(0, 6), 1) is None  # dropped since (a discard): ask again
    assert runs_of(p.requests()) == [(0, 6, 1)]


def test_the_faults_of_one_read_are_taken_as_pages_in_the_order_faulted() -> None:
    p = pager()
    for page in (9, 3, 4):
        p.fault(address(0, page), thread_id=page)
    p.fault(address(1, 1), thread_id=1)
    assert p.take_pages() == [(0, 9), (0, 3), (0, 4), (1, 1)]
    assert p.take_pages() is None and p.requests() == []  # nothing queued since
    p.fault(address(0, 3, 9), thread_id=2)  # requested already: it joins
    assert p.take_pages() is None and p.requests() == []
    stats = p.statistics()
    assert stats["requested_pages"] == 4 and stats["requests"] == 1 and stats["joined"] == 1
    assert p.placed([m.PageRun(block=0, first=3, count=2)]) == [(address(0, 3), 2 * PAGE)]


def test_pages_it_cannot_take_alone_are_left_to_requests() -> None:
    p = pager()
    p.fault(address(0, 5), 1)
    p.fault(address(0, 6), 1)
    p.placed([m.PageRun(block=0, first=6, count=1)])  # placed after the fault was queued
    assert p.take_pages() is None  # nothing changed: requests() decides
    assert runs_of(p.requests()) == [(0, 5, 1)]
    pages = m.LIMITS.max_runs + 1  # more pages than one ClientRequest has runs
    big = BlockTable.from_infos((m.BlockInfo(name="big", length=2 * pages * PAGE, page_size=PAGE),))
    many = Pager(MappingTable.identity(big, (BASES[0],)))
    for page in range(pages):
        many.fault(BASES[0] + 2 * page * PAGE, 1)
    assert many.take_pages() is None and many.statistics()["requests"] == 0
    assert len(runs_of(many.requests())) == pages  # in two ClientRequests


def test_long_runs_are_split_and_many_runs_fill_several_requests() -> None:
    p = pager(max_run_pages=4)
    for page in range(10):
        p.fault(address(0, page), 1)
    assert runs_of(p.requests()) == [(0, 0, 4), (0, 4, 4), (0, 8, 2)]
    big = Pager(MappingTable.identity(BlockTable.from_infos(
        (m.BlockInfo(name="big", length=(2 * m.LIMITS.max_runs + 10) * PAGE, page_size=PAGE),)), [0x10_0000_0000]))
    for page in range(0, 2 * m.LIMITS.max_runs + 10, 2):
        big.fault(0x10_0000_0000 + page * PAGE, 1)
    requests = big.requests()
    assert [len(request.runs) for request in requests] == [m.LIMITS.max_runs, 5]


def test_bad_addresses_and_bad_runs_are_refused() -> None:
    p = pager()
    with pytest.raises(MappingTableError, match="outside every registered mapping"):
        p.fault(BASES[0] - 1, 1)
    with pytest.raises(MappingTableError):
        p.fault(address(0, 64), 1)
    with pytest.raises(RemoteProtocolError):
        p.placed([m.PageRun(block=0, first=60, count=5)])
    with pytest.raises(RemoteProtocolError):
        p.placed([m.PageRun(block=2, first=0, count=1)])
    with pytest.raises(InternalError):
        ClientPages(4).mark(0, 1, PLACED)


def test_wake_all_names_every_mapping() -> None:
    assert sorted(pager().wake_all()) == sorted((base, BLOCKS[i].length) for i, base in enumerate(BASES))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(
    st.tuples(st.just("fault"), st.integers(0, 63)),
    st.tuples(st.just("flush"), st.just(0)),
    st.tuples(st.just("take"), st.just(0)),
    st.tuples(st.just("placed"), st.integers(0, 63))), max_size=80))
def test_agrees_with_a_per_page_model(steps: list[tuple[str, int]]) -> None:
    """Never asks twice for a page in flight; wakes at once exactly the pages known placed."""
    p, queued, requested, placed = pager(), set(), set(), set()
    for kind, page in steps:
        if kind == "fault":
            woke = p.fault(address(0, page), 1)
            assert (woke is not None) == (page in placed)
            if page in placed:
                placed.discard(page)
            elif page not in requested:
                queued.add(page)
        elif kind in ("flush", "take"):
            taken = p.take_pages() if kind == "take" else None
            asked = ({page for _, page in taken} if taken is not None else
                     {page for _, first, count in runs_of(p.requests()) for page in range(first, first + count)})
            assert asked == queued and not asked & requested
            requested |= queued
            queued.clear()
        elif page in requested:  # the service answers only what was asked
            wake = p.placed([m.PageRun(block=0, first=page, count=1)])
            assert wake == [(address(0, page), PAGE)]
            requested.discard(page)
            placed.add(page)
