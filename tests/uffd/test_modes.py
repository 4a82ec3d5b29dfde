"""WP and MINOR registration modes: writeprotect, copy(wp=True), continue_, poison, move."""

from __future__ import annotations

import errno

import pytest

from aiopostcopy.errors import UffdError
from aiopostcopy.uffd import Feature, Ioctl, Mapping, PageFault, RegisterMode, Userfaultfd
from aiopostcopy.uffd.binding import lib

from .helpers import PAGE, Resources, read_events, require_features


def _wp_fault_roundtrip(uffd: Userfaultfd, res: Resources, mapping: Mapping) -> None:
    uffd.writeprotect(mapping.address, PAGE, wp=True)
    toucher = res.touch(mapping, 0, write=True, value=0x77)
    [fault] = read_events(uffd, 1)
    assert isinstance(fault, PageFault) and fault.wp and fault.write and not fault.minor
    assert fault.thread_id == toucher.tid
    toucher.join(0.1)
    assert toucher.is_alive()
    uffd.writeprotect(mapping.address, PAGE, wp=False)  # wakes the writer
    toucher.finish()
    assert mapping.buffer()[0] == 0x77 and mapping.buffer()[1] == 0x10


def test_writeprotect_on_anonymous_memory(res: Resources) -> None:
    require_features(Feature.PAGEFAULT_FLAG_WP)
    mapping = res.anon(2)
    uffd = res.uffd(Feature.PAGEFAULT_FLAG_WP | Feature.THREAD_ID)
    ioctls = uffd.register(mapping.address, mapping.length, RegisterMode.MISSING | RegisterMode.WP)
    assert Ioctl.WRITEPROTECT in ioctls
    uffd.copy(mapping.address, res.source(b"\x10" * PAGE), PAGE)
    _wp_fault_roundtrip(uffd, res, mapping)


def test_writeprotect_on_shmem(res: Resources) -> None:
    require_features(Feature.PAGEFAULT_FLAG_WP, Feature.WP_HUGETLBFS_SHMEM)
    mapping = res.map(res.memfd(2))
    uffd = res.uffd(Feature.PAGEFAULT_FLAG_WP | Feature.WP_HUGETLBFS_SHMEM | Feature.THREAD_ID)
    try:
        uffd.register(mapping.address, mapping.length, RegisterMode.MISSING | RegisterMode.WP)
    except UffdError as exc:
        pytest.skip(f"shmem WP registration refused here ({exc}); covered on anonymous memory")
    uffd.copy(mapping.address, res.source(b"\x10" * PAGE), PAGE)
    _wp_fault_roundtrip(uffd, res, mapping)


def test_copy_with_wp_maps_the_page_protected(res: Resources) -> None:
    require_features(Feature.PAGEFAULT_FLAG_WP)
    mapping = res.anon(1)
    uffd = res.uffd(Feature.PAGEFAULT_FLAG_WP)
    uffd.register(mapping.address, mapping.length, RegisterMode.MISSING | RegisterMode.WP)
    uffd.copy(mapping.address, res.source(b"\x10" * PAGE), PAGE, wp=True)
    toucher = res.touch(mapping, 0, write=True, value=0x77)
    [fault] = read_events(uffd, 1)
    assert isinstance(fault, PageFault) and fault.wp
    uffd.writeprotect(mapping.address, PAGE, wp=False, dontwake=True)
    toucher.join(0.1)
    assert toucher.is_alive()
    uffd.wake(mapping.address, PAGE)
    toucher.finish()
    assert mapping.buffer()[0] == 0x77


def test_continue_maps_a_page_already_in_the_cache(res: Resources) -> None:
    """MINOR mode: fill the page through a second, unregistered mapping, then CONTINUE."""
    require_features(Feature.MINOR_SHMEM)
    shm = res.memfd(2)
    registered, filler = res.map(shm), res.map(shm)
    uffd = res.uffd(Feature.MINOR_SHMEM | Feature.THREAD_ID)
    ioctls = uffd.register(registered.address, registered.length, RegisterMode.MINOR)
    assert Ioctl.CONTINUE in ioctls
    filler.buffer()[PAGE : 2 * PAGE] = b"\x6c" * PAGE
    toucher = res.touch(registered, PAGE)
    [fault] = read_events(uffd, 1)
    assert isinstance(fault, PageFault) and fault.minor and not fault.wp
    assert fault.address == registered.address + PAGE and fault.thread_id == toucher.tid
    assert uffd.continue_(fault.address, PAGE) == PAGE
    assert toucher.finish() == 0x6C


def test_continue_on_a_page_missing_from_the_cache_fails(res: Resources) -> None:
    require_features(Feature.MINOR_SHMEM)
    mapping = res.map(res.memfd(1))
    uffd = res.uffd(Feature.MINOR_SHMEM)
    uffd.register(mapping.address, mapping.length, RegisterMode.MINOR)
    with pytest.raises(UffdError) as info:
        uffd.continue_(mapping.address, PAGE)
    assert info.value.errno == errno.EFAULT


@pytest.mark.skipif(not lib.HAS_POISON, reason="built against headers without UFFDIO_POISON")
def test_poison_marks_missing_pages(res: Resources) -> None:  # pragma: no cover - needs >= 6.6 headers
    mapping = res.anon(2)
    uffd = res.uffd()
    uffd.register(mapping.address, mapping.length)
    assert uffd.poison(mapping.address, PAGE) == PAGE


@pytest.mark.skipif(not lib.HAS_MOVE, reason="built against headers without UFFDIO_MOVE")
def test_move_places_a_page_without_copying(res: Resources) -> None:  # pragma: no cover - needs >= 6.8 headers
    dst, src = res.anon(1), res.anon(1)
    src.buffer()[:] = b"\x4d" * PAGE
    uffd = res.uffd(Feature.MOVE)  # type: ignore[attr-defined]
    uffd.register(dst.address, PAGE)
    assert uffd.move(dst.address, src.address, PAGE) == PAGE
    assert dst.buffer()[0] == 0x4D
