"""A 2 MiB hugetlbfs page placed with one UFFDIO_COPY (pool reserved, then restored)."""

from __future__ import annotations

import os

import pytest

from aiopostcopy.uffd import Feature, HugePageReservation, Ioctl, PageFault, default_huge_page_size

from .helpers import Resources, read_events, require_features, require_root

pytestmark = pytest.mark.root

HUGE = 2 << 20


def _require_2mib() -> None:
    require_root()
    require_features(Feature.MISSING_HUGETLBFS)
    if not os.path.isdir(f"/sys/kernel/mm/hugepages/hugepages-{HUGE // 1024}kB"):
        pytest.skip("no 2 MiB huge page support in this kernel")


def _nr_hugepages() -> int:
    with open(f"/sys/kernel/mm/hugepages/hugepages-{HUGE // 1024}kB/nr_hugepages", encoding="ascii") as f:
        return int(f.read())


def test_reservation_raises_and_restores_the_pool() -> None:
    _require_2mib()
    before = _nr_hugepages()
    with HugePageReservation(2, page_size=HUGE) as reservation:
        assert reservation.old == before
        assert _nr_hugepages() >= 2
    assert _nr_hugepages() == before


def test_overlapping_reservations_left_in_any_order_restore_the_pool() -> None:
    """Each gives back what it added: the first one left does not take the second's pages
    away, and the last one left does not write back a size that counted the first's."""
    _require_2mib()
    before = _nr_hugepages()
    first = HugePageReservation(1, page_size=HUGE).__enter__()
    try:
        with open(f"/sys/kernel/mm/hugepages/hugepages-{HUGE // 1024}kB/free_hugepages", encoding="ascii") as f:
            free = int(f.read())
        second = HugePageReservation(free + 1, page_size=HUGE).__enter__()  # needs one page more
        try:
            assert _nr_hugepages() == before + (first.target - first.old) + 1
        finally:
            first.__exit__(None, None, None)  # the first one leaves first
            assert _nr_hugepages() == before + 1, "the second's page is still there"
            second.__exit__(None, None, None)
    finally:
        first.__exit__(None, None, None)  # a second exit changes nothing
    assert _nr_hugepages() == before


def test_place_a_2mib_page(res: Resources) -> None:
    _require_2mib()
    before = _nr_hugepages()
    res.reserve_huge_pages(1)
    shm = res.memfd(1, name="huge", hugetlb=True, huge_page_size=HUGE)
    assert shm.hugetlb and shm.page_size == HUGE and shm.size == HUGE
    mapping = res.map(shm)
    uffd = res.uffd(Feature.MISSING_HUGETLBFS | Feature.THREAD_ID)
    ioctls = uffd.register(mapping.address, mapping.length)
    assert Ioctl.COPY in ioctls and Ioctl.ZEROPAGE not in ioctls
    toucher = res.touch(mapping, HUGE - 1, 1)
    [fault] = read_events(uffd, 1)
    assert isinstance(fault, PageFault) and fault.thread_id == toucher.tid
    assert fault.page_start(HUGE) == mapping.address
    data = bytes(range(256)) * (HUGE // 256)
    assert uffd.copy(fault.page_start(HUGE), res.source(data), HUGE) == HUGE
    assert toucher.finish() == 0xFF
    assert bytes(mapping.buffer()) == data
    res.close_all()
    assert _nr_hugepages() == before


def test_default_huge_page_size() -> None:
    assert default_huge_page_size() in (None, HUGE, 1 << 30, 4 << 20, 16 << 20, 512 << 20)
