"""Placement on the real kernel: runs with zero stretches, pages already there, the EAGAIN rules."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import select
import threading

import pytest

from aiopostcopy.core.commands import Place, PlaceZero
from aiopostcopy.destination.memory import Staging
from aiopostcopy.destination import placer
from aiopostcopy import priority
from aiopostcopy.destination.background import PLACER_NICENESS, BackgroundPlacer
from aiopostcopy.destination.placer import Interrupted, Placement
from aiopostcopy.uffd import RegisterMode, SharedMemory, Userfaultfd, placing
from aiopostcopy.uffd.hugepages import private_mount

PAGE = 4096


@dataclasses.dataclass
class Block:
    address: int
    shm: SharedMemory
    page_size: int = PAGE
    zeropage_ok: bool = True


class Memory:
    def __init__(self, block: Block) -> None:
        self._block = block

    def block(self, index: int) -> Block:
        return self._block


@pytest.fixture
def region():
    shm = SharedMemory.memfd("placer-test", 2400 * PAGE)
    mapping = shm.map(2400 * PAGE)
    uffd = Userfaultfd.open()
    uffd.register(mapping.address, mapping.length, RegisterMode.MISSING)
    try:
        yield uffd, mapping, Placement(uffd, Memory(Block(mapping.address, shm)), 0)
    finally:
        uffd.close()
        mapping.close()
        shm.close()


@pytest.mark.parametrize("allocate", [False, True], ids=["zeropage", "fallocate"])
def test_scattered_existing_pages_are_counted_not_fatal(region, monkeypatch, allocate) -> None:
    """Every other page is there already: the kernel stops at each with EAGAIN-after-progress
    (or EEXIST); that is progress, not a changing mapping, on the loop thread and on the
    placement thread (drain None) alike.  A run filled with fallocate finds them with SEEK_DATA."""
    uffd, mapping, placement = region
    monkeypatch.setattr(placer, "ALLOCATE_ALIGN", placer.ALLOCATE_ALIGN if allocate else 1 << 40)
    one = Staging(PAGE)
    for page in range(1, 2400, 2):
        uffd.copy(mapping.address + page * PAGE, one.address, PAGE)
    drained = []
    assert placement.place(PlaceZero(0, 0, 1200), None, lambda: drained.append(1)) == 600
    assert placement.place(PlaceZero(0, 1200, 1200), None, None) == 600  # the placement thread's way
    assert drained == []
    assert bytes(mapping.buffer()[:2400 * PAGE]) == bytes(2400 * PAGE)


def test_place_with_zero_stretches_from_the_packed_payload(region) -> None:
    uffd, mapping, placement = region
    staging = Staging(8 * PAGE)
    view = staging.view(8 * PAGE)
    for i in range(5):
        view[i * PAGE:(i + 1) * PAGE] = bytes([i + 1]) * PAGE
    # a sub-run of 6 pages starting at payload page 1, with pages 1 and 4 zero
    assert placement.place(Place(0, 10, 6, 1, (1, 2, 4, 5)), staging, None) == 0
    expected = [2, 0, 3, 4, 0, 5]
    for i, value in enumerate(expected):
        page = mapping.buffer()[(10 + i) * PAGE:(11 + i) * PAGE]
        assert bytes(page) == bytes([value]) * PAGE, f"page {10 + i}"


def test_interrupted_carries_where_to_go_on() -> None:
    exc = Interrupted(7, 2)
    assert (exc.page, exc.existed) == (7, 2)


def test_a_long_zero_run_is_allocated_and_its_waiter_woken(region) -> None:
    """fallocate puts the run's pages into the file without a fault and wakes a thread waiting
    on one of them; SEEK_DATA shows only the touched page, and held_runs punches the others
    out so that they can be placed again (UFFDIO_COPY over an allocated page is EEXIST)."""
    uffd, mapping, placement = region
    shm = placement._memory.block(0).shm
    waiter = threading.Thread(target=mapping.touch, args=(100 * PAGE, PAGE))
    waiter.start()
    assert select.select([uffd.fileno()], [], [], 10)[0], "the waiter did not fault"
    assert placement.place(PlaceZero(0, 0, 2400), None, None) == 0
    waiter.join(10)
    assert not waiter.is_alive(), "the waiting thread was not woken"
    mapping.touch(0, 2400 * PAGE)  # present: no fault, or this would block for ever
    assert bytes(mapping.buffer()[:2400 * PAGE]) == bytes(2400 * PAGE)
    assert shm.data_runs(0, 2400 * PAGE) == [(0, 2400 * PAGE)]  # every page now touched

    assert placement.place(PlaceZero(0, 0, 2400), None, None) == 2400  # all there already: counted
    shm.punch_hole(0, 2400 * PAGE)
    assert placement.place(PlaceZero(0, 0, 2048), None, None) == 0  # all of it aligned: all allocated
    mapping.touch(7 * PAGE, PAGE)
    assert shm.held_runs() == [(7 * PAGE, 8 * PAGE)]  # the untouched allocated pages: punched
    one = Staging(PAGE)
    one.view(PAGE)[:] = b"\x05" * PAGE
    uffd.copy(mapping.address + 9 * PAGE, one.address, PAGE)  # missing again, so placeable
    assert bytes(mapping.buffer()[9 * PAGE:10 * PAGE]) == b"\x05" * PAGE


def test_allocation_never_reaches_past_the_run_on_a_huge_tmpfs() -> None:
    """On a tmpfs mounted huge=always fallocate allocates 2 MiB folios: only the run's aligned
    middle may be allocated, or pages next to it (not arrived yet) would become present."""
    try:
        mount = private_mount("tmpfs", "huge=always,size=64m", prefix="aiopostcopy-test-thp-")
        path = mount.__enter__()
    except OSError as exc:
        pytest.skip(f"no tmpfs with huge=always here: {exc}")
    try:
        pages = (16 << 20) // PAGE
        shm = SharedMemory.create(os.path.join(path, "ram"), pages * PAGE)
        mapping = shm.map()
        uffd = Userfaultfd.open()
        uffd.register(mapping.address, mapping.length, RegisterMode.MISSING)
        try:
            placement = Placement(uffd, Memory(Block(mapping.address, shm)), 0)
            first, count = 100, 1400  # pages 512..1024 are the aligned middle; 100..512 and 1024..1500 the ends
            assert placement.place(PlaceZero(0, first, count), None, None) == 0
            one = Staging(PAGE)
            one.view(PAGE)[:] = b"\x07" * PAGE
            for page in (0, first - 1, first + count, 2047, 2048, pages - 1):  # still missing: placeable
                uffd.copy(mapping.address + page * PAGE, one.address, PAGE)
            mapping.touch(first * PAGE, count * PAGE)  # every page of the run present: no fault
            assert bytes(mapping.buffer()[first * PAGE:(first + count) * PAGE]) == bytes(count * PAGE)
        finally:
            uffd.close()
            mapping.close()
            shm.close()
    finally:
        mount.__exit__(None, None, None)


@pytest.mark.skipif(not placing.available(), reason="the binding was built without the placing thread")
def test_a_buffers_runs_go_to_the_c_thread_and_a_stopped_run_is_finished_in_python(region) -> None:
    """A staging buffer's runs are placed by the C thread and reported once, on the loop thread;
    a run the thread stops in (a page there already) is finished by the Python thread, which
    writes the right bytes over the page that was there and counts it."""
    uffd, mapping, placement = region
    staging = Staging(16 * PAGE)
    view = staging.view(16 * PAGE)
    for i in range(16):
        view[i * PAGE:(i + 1) * PAGE] = bytes([i + 1]) * PAGE
    one = Staging(PAGE)
    one.view(PAGE)[:] = b"\xee" * PAGE
    uffd.copy(mapping.address + 205 * PAGE, one.address, PAGE)  # someone filled page 205
    commands = [Place(0, 100, 8, 0, (2, 4)), Place(0, 200, 10, 6, ()), PlaceZero(0, 300, 3)]
    loop = asyncio.new_event_loop()
    reports: list[tuple] = []
    done = loop.create_future()

    def on_done(placed, rest, staging_back, error) -> None:
        reports.append((threading.get_ident(), placed, rest, staging_back, error))
        done.set_result(None)

    background = BackgroundPlacer(loop, placement, buffers=1, buffer_size=16 * PAGE, on_done=on_done)
    calls = []
    original = placement.place
    placement.place = lambda command, *args, **kwargs: calls.append(command) or original(command, *args, **kwargs)
    try:
        background.submit(commands, staging)
        loop.run_until_complete(asyncio.wait_for(done, 10))
        loop.run_until_complete(asyncio.sleep(0.05))  # nothing more is reported
    finally:
        background.close()
        loop.close()
    assert len(reports) == 1
    thread, placed, rest, staging_back, error = reports[0]
    assert thread == threading.get_ident() and error is None and rest == [] and staging_back is staging
    assert sorted(placed, key=lambda p: p[0].first) == [(commands[0], 0), (commands[1], 1), (commands[2], 0)]
    assert calls == [commands[1]]  # only the stopped run went through Python
    memory = mapping.buffer()
    packed = iter(range(16))
    for page in range(8):  # pages 2 and 3 of the first run are zero; the others packed from payload page 0
        expected = bytes(PAGE) if page in (2, 3) else bytes([next(packed) + 1]) * PAGE
        assert bytes(memory[(100 + page) * PAGE:(101 + page) * PAGE]) == expected, f"page {100 + page}"
    for page in range(10):  # payload pages 6.. (page 205 overwritten with the right bytes)
        assert bytes(memory[(200 + page) * PAGE:(201 + page) * PAGE]) == bytes([7 + page]) * PAGE, page
    assert bytes(memory[300 * PAGE:303 * PAGE]) == bytes(3 * PAGE)


def test_without_the_c_thread_the_python_thread_places_everything(region, monkeypatch, caplog) -> None:
    """A C placing thread that cannot start (no thread, say) is logged, and the buffer's runs are
    placed by the Python thread instead, every page right."""
    uffd, mapping, placement = region

    def refuse(*args, **kwargs):
        raise OSError(11, "no thread")

    monkeypatch.setattr(placing, "PlacingThread", refuse)
    staging = Staging(4 * PAGE)
    staging.view(4 * PAGE)[:] = b"".join(bytes([i + 1]) * PAGE for i in range(4))
    loop = asyncio.new_event_loop()
    done = loop.create_future()
    background = BackgroundPlacer(loop, placement, buffers=1, buffer_size=4 * PAGE,
                                  on_done=lambda *report: done.set_result(report))
    try:
        background.submit([Place(0, 50, 4, 0, ())], staging)
        placed, rest, _, error = loop.run_until_complete(asyncio.wait_for(done, 10))
    finally:
        background.close()
        loop.close()
    assert "did not start" in caplog.text
    assert error is None and rest == [] and placed == [(Place(0, 50, 4, 0, ()), 0)]
    for i in range(4):
        assert bytes(mapping.buffer()[(50 + i) * PAGE:(51 + i) * PAGE]) == bytes([i + 1]) * PAGE, f"page {50 + i}"


def test_the_c_placing_thread_runs_at_its_nice_value_in_sched_idle_under_the_guard(region) -> None:
    """The C placing thread sets PLACER_NICENESS on itself; where the process may bring it back
    (as root), the placer then puts it in SCHED_IDLE and its guard watches it until close()."""
    _, _, placement = region
    loop = asyncio.new_event_loop()
    background = BackgroundPlacer(loop, placement, buffers=1, buffer_size=4 * PAGE, on_done=lambda *args: None)
    try:
        assert background._thread is not None, "the C placing thread started"
        tid = background._thread.native_id
        assert tid and tid != threading.get_native_id()
        idle = priority.can_idle(tid, PLACER_NICENESS)
        assert os.getpriority(os.PRIO_PROCESS, tid) == PLACER_NICENESS
        assert os.sched_getscheduler(tid) == (os.SCHED_IDLE if idle else os.SCHED_OTHER)
        assert background._background.watched() == ([tid] if idle else [])
    finally:
        background.close()
        loop.close()
    assert background._thread.native_id == 0, "no thread id once the thread is stopped"
    assert os.sched_getscheduler(0) == os.SCHED_OTHER, "the caller's thread keeps its class"
