"""Faults raised by other threads and resolved by copy, zeropage and wake."""

from __future__ import annotations

import errno

import pytest

from aiopostcopy.errors import PageExistsError, UffdRetry
from aiopostcopy.uffd import Feature, PageFault, RegisterMode

from .helpers import PAGE, Resources, read_events, wait_readable


def _pattern(byte: int, pages: int = 1) -> bytes:
    return bytes([byte]) * (PAGE * pages)


def test_thread_fault_resolved_by_copy(res: Resources) -> None:
    shm = res.memfd(4)
    mapping = res.map(shm)
    uffd = res.uffd(Feature.THREAD_ID)
    uffd.register(mapping.address, mapping.length)
    toucher = res.touch(mapping, 2 * PAGE)
    [fault] = read_events(uffd, 1)
    assert fault == PageFault(mapping.address + 2 * PAGE, fault.flags, toucher.tid)
    assert not fault.write and not fault.wp and not fault.minor
    assert toucher.is_alive()
    assert uffd.copy(fault.address, res.source(_pattern(0x42)), PAGE) == PAGE
    assert toucher.finish() == 0x42
    assert bytes(mapping.buffer()[2 * PAGE : 3 * PAGE]) == _pattern(0x42)


def test_thread_id_is_zero_unless_negotiated(res: Resources) -> None:
    mapping = res.map(res.memfd(1))
    uffd = res.uffd()
    uffd.register(mapping.address, mapping.length)
    toucher = res.touch(mapping, 0)
    [fault] = read_events(uffd, 1)
    assert isinstance(fault, PageFault) and fault.thread_id == 0
    uffd.zeropage(fault.address, PAGE)
    toucher.finish()


def test_write_fault_sets_the_write_flag(res: Resources) -> None:
    mapping = res.anon(2)
    uffd = res.uffd(Feature.THREAD_ID)
    uffd.register(mapping.address, mapping.length)
    toucher = res.touch(mapping, PAGE, write=True, value=7)
    [fault] = read_events(uffd, 1)
    assert isinstance(fault, PageFault) and fault.write and fault.thread_id == toucher.tid
    uffd.copy(fault.address, res.source(_pattern(1)), PAGE)
    toucher.finish()
    assert mapping.buffer()[PAGE] == 7 and mapping.buffer()[PAGE + 1] == 1


def test_one_read_drains_many_faults_and_one_copy_wakes_them_all(res: Resources) -> None:
    pages = 8
    mapping = res.map(res.memfd(pages))
    uffd = res.uffd(Feature.THREAD_ID)
    uffd.register(mapping.address, mapping.length)
    touchers = [res.touch(mapping, i * PAGE) for i in range(pages)]
    events = read_events(uffd, pages)
    assert sorted(e.address for e in events if isinstance(e, PageFault)) == [
        mapping.address + i * PAGE for i in range(pages)
    ]
    assert {e.thread_id for e in events if isinstance(e, PageFault)} == {t.tid for t in touchers}
    data = b"".join(_pattern(i + 1) for i in range(pages))
    assert uffd.copy(mapping.address, res.source(data), len(data)) == len(data)
    assert [t.finish() for t in touchers] == [i + 1 for i in range(pages)]


def test_page_exists_race_then_wake(res: Resources) -> None:
    """Two resolvers of one fault: the second copy gets EEXIST and must wake."""
    mapping = res.map(res.memfd(2))
    uffd = res.uffd()
    uffd.register(mapping.address, mapping.length)
    toucher = res.touch(mapping, 0)
    [fault] = read_events(uffd, 1)
    assert isinstance(fault, PageFault)
    uffd.copy(fault.address, res.source(_pattern(9)), PAGE, dontwake=True)
    with pytest.raises(PageExistsError) as info:
        uffd.copy(fault.address, res.source(_pattern(8)), PAGE)
    assert info.value.errno == errno.EEXIST
    toucher.join(0.2)
    assert toucher.is_alive(), "EEXIST must not wake anybody"
    uffd.wake(fault.address, PAGE)
    assert toucher.finish() == 9


def test_existing_page_mid_run_stops_the_copy_there(res: Resources) -> None:
    """A run copies up to the first present page: EAGAIN with done, then EEXIST."""
    mapping = res.anon(4)
    uffd = res.uffd()
    uffd.register(mapping.address, mapping.length)
    src = res.source(b"".join(_pattern(i + 1) for i in range(4)))
    uffd.copy(mapping.address + 2 * PAGE, src + 2 * PAGE, PAGE)
    with pytest.raises(UffdRetry) as info:
        uffd.copy(mapping.address, src, 4 * PAGE)
    assert info.value.errno == errno.EAGAIN and info.value.done == 2 * PAGE
    with pytest.raises(PageExistsError):
        uffd.copy(mapping.address + 2 * PAGE, src + 2 * PAGE, 2 * PAGE)
    uffd.copy(mapping.address + 3 * PAGE, src + 3 * PAGE, PAGE)
    assert [mapping.buffer()[i * PAGE] for i in range(4)] == [1, 2, 3, 4]


def test_zeropage_resolves_a_fault_with_zeros(res: Resources) -> None:
    mapping = res.map(res.memfd(2))
    uffd = res.uffd()
    uffd.register(mapping.address, mapping.length)
    toucher = res.touch(mapping, PAGE)
    [fault] = read_events(uffd, 1)
    assert isinstance(fault, PageFault)
    assert uffd.zeropage(fault.address, PAGE) == PAGE
    assert toucher.finish() == 0
    with pytest.raises(PageExistsError):
        uffd.zeropage(fault.address, PAGE)


def test_zeropage_dontwake_then_wake(res: Resources) -> None:
    mapping = res.anon(1)
    uffd = res.uffd()
    uffd.register(mapping.address, mapping.length)
    toucher = res.touch(mapping, 0)
    read_events(uffd, 1)
    uffd.zeropage(mapping.address, PAGE, dontwake=True)
    toucher.join(0.2)
    assert toucher.is_alive()
    uffd.wake(mapping.address, PAGE)
    assert toucher.finish() == 0


def test_blocking_fd_read_waits_for_a_fault(res: Resources) -> None:
    mapping = res.anon(1)
    uffd = res.uffd(nonblocking=False)
    uffd.register(mapping.address, mapping.length)
    toucher = res.touch(mapping, 0)
    [fault] = uffd.read_events()  # blocks (GIL released) until the fault is queued
    assert isinstance(fault, PageFault)
    uffd.copy(fault.address, res.source(_pattern(3)), PAGE)
    assert toucher.finish() == 3


def test_unregister_releases_waiters(res: Resources) -> None:
    mapping = res.anon(1)
    uffd = res.uffd()
    uffd.register(mapping.address, mapping.length, RegisterMode.MISSING)
    toucher = res.touch(mapping, 0)
    read_events(uffd, 1)
    uffd.unregister(mapping.address, mapping.length)
    assert toucher.finish() == 0
    assert not wait_readable(uffd.fd, 0)
