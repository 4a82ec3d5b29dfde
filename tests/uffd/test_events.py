"""Non-cooperative events (fork, mremap, madvise, munmap) and the EAGAIN contract.

Each event blocks the thread that caused it until the event is read, so the
cause always runs in another thread (through cffi, GIL released) or process.
"""

from __future__ import annotations

import errno
import os
import random
import socket
import sys
import threading
import time

import pytest

from aiopostcopy.errors import PageExistsError, UffdRetry
from aiopostcopy.uffd import (
    Feature,
    ForkEvent,
    Mapping,
    PageFault,
    RemapEvent,
    RemoveEvent,
    UnmapEvent,
    Userfaultfd,
)
from aiopostcopy.uffd.binding import check_os, ffi, lib

from .helpers import PAGE, TIMEOUT, Resources, read_events, require_features, require_root, wait_readable

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


def _child_env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": REPO + (os.pathsep + path if path else "")}


def test_madvise_dontneed_raises_remove(res: Resources) -> None:
    require_features(Feature.EVENT_REMOVE)
    mapping = res.anon(4)
    uffd = res.uffd(Feature.EVENT_REMOVE)
    uffd.register(mapping.address, mapping.length)
    uffd.copy(mapping.address, res.source(b"\x11" * 4 * PAGE), 4 * PAGE)
    worker = res.call_in_thread(mapping.madvise_dontneed, PAGE, 2 * PAGE)
    [event] = read_events(uffd, 1)
    assert event == RemoveEvent(mapping.address + PAGE, mapping.address + 3 * PAGE)
    worker.join(TIMEOUT)
    toucher = res.touch(mapping, PAGE)  # the page is missing again
    [fault] = read_events(uffd, 1)
    assert isinstance(fault, PageFault) and fault.address == mapping.address + PAGE
    uffd.zeropage(fault.address, PAGE)
    assert toucher.finish() == 0


def test_read_flat_leaves_the_messages_flattened_and_events_read_decodes_any_of_them(res: Resources) -> None:
    require_features(Feature.EVENT_REMOVE)
    mapping = res.map(res.memfd(2))
    uffd = res.uffd(Feature.EVENT_REMOVE | Feature.THREAD_ID)
    uffd.register(mapping.address, mapping.length)
    assert uffd.read_flat(8) == 0  # nothing queued
    toucher = res.touch(mapping, PAGE)
    assert wait_readable(uffd.fileno())
    worker = res.call_in_thread(mapping.madvise_remove, 0, PAGE)  # its event queues behind the fault
    time.sleep(0.2)
    count = uffd.read_flat(8)
    events = uffd.events_read(0, count)
    if count == 1:  # the remove was not queued yet: the next read brings it
        assert wait_readable(uffd.fileno()) and uffd.read_flat(8) == 1
        events += uffd.events_read(0, 1)
    else:
        assert count == 2 and uffd.events_read(1, 2) == events[1:]
    fault, remove = events
    assert isinstance(fault, PageFault) and fault.address == mapping.address + PAGE
    assert fault.thread_id == toucher.tid
    assert remove == RemoveEvent(mapping.address, mapping.address + PAGE)
    worker.join(TIMEOUT)
    uffd.copy(mapping.address + PAGE, res.source(b"\x22" * PAGE), PAGE)
    assert toucher.finish() == 0x22


def test_madvise_remove_on_shmem_raises_remove(res: Resources) -> None:
    require_features(Feature.EVENT_REMOVE)
    mapping = res.map(res.memfd(2))
    uffd = res.uffd(Feature.EVENT_REMOVE)
    uffd.register(mapping.address, mapping.length)
    worker = res.call_in_thread(mapping.madvise_remove, 0, 2 * PAGE)
    [event] = read_events(uffd, 1)
    assert event == RemoveEvent(mapping.address, mapping.address + 2 * PAGE)
    worker.join(TIMEOUT)


def test_eagain_while_remove_is_unread_then_retry_completes(res: Resources) -> None:
    """Deterministic: while a REMOVE event is queued every copy fails EAGAIN."""
    require_features(Feature.EVENT_REMOVE)
    mapping = res.anon(8)
    uffd = res.uffd(Feature.EVENT_REMOVE)
    uffd.register(mapping.address, mapping.length)
    data = bytes(range(256)) * (8 * PAGE // 256)
    src = res.source(data)
    worker = res.call_in_thread(mapping.madvise_dontneed, 0, PAGE)
    assert wait_readable(uffd.fd)
    with pytest.raises(UffdRetry) as info:
        uffd.copy(mapping.address, src, 8 * PAGE)
    assert info.value.errno == errno.EAGAIN and info.value.done == 0
    assert read_events(uffd, 1) == [RemoveEvent(mapping.address, mapping.address + PAGE)]
    worker.join(TIMEOUT)
    done = info.value.done
    assert uffd.copy(mapping.address + done, src + done, 8 * PAGE - done) == 8 * PAGE - done
    assert bytes(mapping.buffer()) == data


def _place_all(uffd: Userfaultfd, dst: int, src: int, length: int, stats: dict[str, int]) -> None:
    """The service's contract: drain events, retry the rest, skip present pages."""
    pos = 0
    for _ in range(100_000):
        if pos >= length:
            return
        uffd.read_events()
        try:
            pos += uffd.copy(dst + pos, src + pos, length - pos)
        except UffdRetry as exc:
            assert exc.done % PAGE == 0 and 0 <= exc.done < length - pos
            pos += exc.done
            stats["retry"] += 1
            stats["partial"] += exc.done > 0
        except PageExistsError:
            pos += PAGE
            stats["exists"] += 1
    raise AssertionError("placing never completed")


def test_copy_contract_under_concurrent_dontneed(res: Resources) -> None:
    """Stress: copies race madvise(DONTNEED); every outcome keeps the contract."""
    require_features(Feature.EVENT_REMOVE)
    pages = 64
    mapping = res.anon(pages)
    uffd = res.uffd(Feature.EVENT_REMOVE)
    uffd.register(mapping.address, mapping.length)
    data = random.Random(1).randbytes(pages * PAGE)
    src = res.source(data)
    stop = threading.Event()

    def discard() -> None:
        rng = random.Random(2)
        while not stop.is_set():
            mapping.madvise_dontneed(rng.randrange(pages) * PAGE, PAGE)

    discarder = res.call_in_thread(discard)
    stats = {"retry": 0, "partial": 0, "exists": 0}
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        _place_all(uffd, mapping.address, src, pages * PAGE, stats)
    stop.set()
    deadline = time.monotonic() + TIMEOUT
    while discarder.is_alive() and time.monotonic() < deadline:
        uffd.read_events()  # the discarder may be waiting on its last event
        discarder.join(0.001)
    assert not discarder.is_alive()
    uffd.read_events()
    _place_all(uffd, mapping.address, src, pages * PAGE, stats)
    assert bytes(mapping.buffer()) == data
    assert stats["retry"] + stats["exists"] > 0
    print(f"contract outcomes: {stats}")


def _raw_map(pages: int) -> int:
    out = ffi.new("uint64_t *")
    flags = lib.MAP_PRIVATE | lib.MAP_ANONYMOUS
    check_os(lib.apc_mmap(0, pages * PAGE, lib.PROT_READ | lib.PROT_WRITE, flags, -1, 0, out), "mmap")
    return int(out[0])


def test_mremap_raises_remap_and_the_range_stays_registered(res: Resources) -> None:
    require_features(Feature.EVENT_REMAP)
    old, new = _raw_map(4), _raw_map(4)
    uffd = res.uffd(Feature.EVENT_REMAP)
    uffd.register(old, 4 * PAGE)
    out = ffi.new("uint64_t *")
    flags = lib.MREMAP_MAYMOVE | lib.MREMAP_FIXED
    worker = res.call_in_thread(lib.apc_mremap, old, 4 * PAGE, 4 * PAGE, flags, new, out)
    events = read_events(uffd, 1)
    worker.join(TIMEOUT)
    if out[0] != new:  # mremap failed: both ranges are still ours to unmap
        res.own_mapping(Mapping(old, 4 * PAGE))
    moved = res.own_mapping(Mapping(new, 4 * PAGE))
    assert events == [RemapEvent(old, new, 4 * PAGE)] and out[0] == new
    toucher = res.touch(moved, 3 * PAGE)
    [fault] = read_events(uffd, 1)
    assert isinstance(fault, PageFault) and fault.address == new + 3 * PAGE
    uffd.copy(fault.address, res.source(b"\x33" * PAGE), PAGE)
    assert toucher.finish() == 0x33


def test_munmap_raises_unmap(res: Resources) -> None:
    require_features(Feature.EVENT_UNMAP)
    base = _raw_map(4)
    rest = res.own_mapping(Mapping(base, 2 * PAGE))
    uffd = res.uffd(Feature.EVENT_UNMAP)
    uffd.register(base, 4 * PAGE)
    worker = res.call_in_thread(lib.apc_munmap, base + 2 * PAGE, 2 * PAGE)
    [event] = read_events(uffd, 1)
    assert event == UnmapEvent(base + 2 * PAGE, base + 4 * PAGE)
    worker.join(TIMEOUT)
    assert rest.address == base


@pytest.mark.root
def test_fork_delivers_a_new_fd_that_resolves_the_childs_fault(res: Resources) -> None:
    require_root()  # EVENT_FORK needs CAP_SYS_PTRACE
    require_features(Feature.EVENT_FORK)
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.settimeout(TIMEOUT)
        script = os.path.join(HERE, "_fork_child.py")
        proc = res.popen([sys.executable, script, str(theirs.fileno())], pass_fds=[theirs.fileno()], env=_child_env())
        theirs.close()
        msg, fds, _flags, _addr = socket.recv_fds(ours, 64, 1)
        parent = res.own_uffd(Userfaultfd.adopt(fds[0], features=Feature.EVENT_FORK))
        base = int(msg)
        ours.sendall(b"go")
        [fork] = read_events(parent, 1)
        assert isinstance(fork, ForkEvent) and fork.fd >= 0
        child = res.own_uffd(Userfaultfd.adopt(fork.fd, features=parent.features))
        [fault] = read_events(child, 1)
        assert isinstance(fault, PageFault) and fault.address == base + PAGE
        assert child.copy(fault.address, res.source(b"\x5a" * PAGE), PAGE) == PAGE
        assert proc.wait(TIMEOUT) == 0
