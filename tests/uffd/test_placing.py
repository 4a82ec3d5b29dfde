"""PlacingThread: runs placed by a C thread, results taken in order, on the real kernel."""

from __future__ import annotations

import errno
import os
import select

import pytest

from aiopostcopy.uffd import placing
from aiopostcopy.uffd.placing import Placed, PlacingThread

from .helpers import PAGE, Resources
from .test_place_run import assert_run, is_missing, packed, page_bytes, registered

pytestmark = pytest.mark.skipif(not placing.available(), reason="the binding was built without the placing thread")


def wait_for(thread: PlacingThread, jobs: int, timeout: float = 10.0) -> list[Placed]:
    """Results of ``jobs`` jobs, waiting on the eventfd as the event loop does."""
    results: list[Placed] = []
    while len(results) < jobs:
        ready, _, _ = select.select([thread.fileno()], [], [], timeout)
        assert ready, f"no result within {timeout} s ({len(results)} of {jobs})"
        results += thread.finished()
    return results


def test_runs_in_order_with_zero_stretches(res: Resources) -> None:
    count = 8
    uffd, mapping = registered(res, 3 * count)
    runs = [(), (1, 3, 6, 7), (0, 8)]
    thread = PlacingThread(uffd.fileno(), capacity=4, niceness=None)
    try:
        sources = []
        for index, zeros in enumerate(runs):
            payload, _ = packed(count, zeros)
            sources.append(res.source(payload or b"\0"))
            thread.add(100 + index, mapping.address + index * count * PAGE, sources[-1], PAGE, count, zeros,
                       notify=index == len(runs) - 1)
        assert thread.room == 1
        thread.submit()
        results = wait_for(thread, len(runs))
    finally:
        thread.close()
    assert results == [Placed(100, 0, count), Placed(101, 0, count), Placed(102, 0, count)]
    assert thread.room == 4
    view = mapping.buffer()
    for index, zeros in enumerate(runs):
        _, zero = packed(count, zeros)
        for p in range(count):
            at = (index * count + p) * PAGE
            expected = bytes(PAGE) if p in zero else page_bytes(p)
            assert view[at:at + PAGE] == expected, f"run {index} page {p}"


def test_an_existing_page_stops_only_its_run(res: Resources) -> None:
    uffd, mapping = registered(res, 16)
    uffd.copy(mapping.address + 5 * PAGE, res.source(b"\x77" * PAGE), PAGE)
    payload, zero = packed(8, ())
    source = res.source(payload)
    thread = PlacingThread(uffd.fileno(), capacity=2)
    try:
        thread.add(1, mapping.address, source, PAGE, 8)
        thread.add(2, mapping.address + 8 * PAGE, source, PAGE, 8, notify=True)
        thread.submit()
        results = wait_for(thread, 2)
    finally:
        thread.close()
    # a copy that placed some pages and then met one present reports EAGAIN (DESIGN.md section 2)
    assert results == [Placed(1, errno.EAGAIN, 5), Placed(2, 0, 8)]
    view = mapping.buffer()
    for p in range(5):
        assert view[p * PAGE:(p + 1) * PAGE] == page_bytes(p), f"page {p}"
    assert view[5 * PAGE:6 * PAGE] == b"\x77" * PAGE  # the page that was there is left alone
    assert [is_missing(uffd, mapping, p, res) for p in (6, 7)] == [True, True]
    for p in range(8):
        at = (8 + p) * PAGE
        assert view[at:at + PAGE] == page_bytes(p), f"second run page {p}"


def test_room_is_bounded_and_close_stops_the_thread(res: Resources) -> None:
    uffd, mapping = registered(res, 4)
    payload, zero = packed(4, (2, 4))
    source = res.source(payload)
    thread = PlacingThread(uffd.fileno(), capacity=1)
    thread.add(7, mapping.address, source, PAGE, 4, (2, 4), notify=True)
    with pytest.raises(OverflowError):
        thread.add(8, mapping.address, source, PAGE, 4)
    thread.submit()
    assert wait_for(thread, 1) == [Placed(7, 0, 4)]
    assert thread.room == 1
    fd = thread.fileno()
    tid = thread.native_id
    assert str(tid) in os.listdir("/proc/self/task")
    thread.close()
    thread.close()  # twice is harmless
    # the C thread is gone (its own id: other tests' threads may come and go meanwhile)
    assert str(tid) not in os.listdir("/proc/self/task")
    with pytest.raises(OSError):
        os.fstat(fd)  # its eventfd is closed
    with pytest.raises(ValueError):
        thread.add(9, mapping.address, source, PAGE, 4)
    assert_run(mapping, 4, zero)


def test_the_thread_runs_at_the_nice_value_given_under_its_name(res: Resources) -> None:
    uffd, _ = registered(res, 1)
    tasks = set(os.listdir("/proc/self/task"))
    thread = PlacingThread(uffd.fileno(), capacity=1, niceness=13)
    try:
        tid = thread.native_id  # published once the thread has set its nice value
        assert tid and str(tid) not in tasks and str(tid) in os.listdir("/proc/self/task")
        assert os.getpriority(os.PRIO_PROCESS, tid) == 13
        deadline = 50
        niceness = name = None
        while deadline and (niceness, name) != (13, "postcopy-placer"):  # set by the thread as it starts
            niceness = os.getpriority(os.PRIO_PROCESS, tid)
            with open(f"/proc/self/task/{tid}/comm") as f:
                name = f.read().strip()
            deadline -= 1
            select.select([], [], [], 0.01)
        assert (niceness, name) == (13, "postcopy-placer")
    finally:
        thread.close()
