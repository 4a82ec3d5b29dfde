"""Userfaultfd.place_run: a run with zero stretches placed in one call, on the real kernel."""

from __future__ import annotations

import errno

import pytest

from aiopostcopy.errors import PageExistsError, UffdError
from aiopostcopy.uffd import RegisterMode

from .helpers import PAGE, Resources


def page_bytes(index: int) -> bytes:
    return bytes([index + 1]) * PAGE


def packed(count: int, zeros: tuple[int, ...]) -> tuple[bytes, set[int]]:
    """The payload of a run (its non-zero pages, in order) and the set of its zero pages."""
    zero = {p for low, high in zip(zeros[::2], zeros[1::2]) for p in range(low, high)}
    return b"".join(page_bytes(p) for p in range(count) if p not in zero), zero


def registered(res: Resources, pages: int):
    mapping = res.map(res.memfd(pages))
    uffd = res.uffd()
    uffd.register(mapping.address, mapping.length, RegisterMode.MISSING)
    return uffd, mapping


def assert_run(mapping, count: int, zero: set[int]) -> None:
    view = mapping.buffer()
    for p in range(count):
        expected = bytes(PAGE) if p in zero else page_bytes(p)
        assert view[p * PAGE:(p + 1) * PAGE] == expected, f"page {p}"


def is_missing(uffd, mapping, page: int, res: Resources) -> bool:
    """Probe without faulting: a single-page copy succeeds only where the page was missing."""
    try:
        uffd.copy(mapping.address + page * PAGE, res.source(page_bytes(page)), PAGE)
    except PageExistsError:
        return False
    return True


@pytest.mark.parametrize("zeros", [(), (0, 2), (1, 3, 6, 7), (5, 8), (0, 1, 2, 3, 4, 5, 6, 7)])
def test_data_and_zero_stretches_land_where_they_belong(res: Resources, zeros: tuple[int, ...]) -> None:
    count = 8
    uffd, mapping = registered(res, count)
    payload, zero = packed(count, zeros)
    uffd.place_run(mapping.address, res.source(payload or b"\0"), PAGE, count, zeros)
    assert_run(mapping, count, zero)


def test_zero_pages_by_copy_from_a_zeroed_page(res: Resources) -> None:
    """The hugetlbfs way (no UFFDIO_ZEROPAGE there), exercised on shmem."""
    uffd, mapping = registered(res, 6)
    payload, zero = packed(6, (1, 3))
    uffd.place_run(mapping.address, res.source(payload), PAGE, 6, (1, 3), zero_src=res.source(bytes(PAGE)))
    assert_run(mapping, 6, zero)


def test_start_places_only_the_rest_of_the_run(res: Resources) -> None:
    uffd, mapping = registered(res, 8)
    payload, zero = packed(8, (1, 3, 6, 7))
    uffd.place_run(mapping.address, res.source(payload), PAGE, 8, (1, 3, 6, 7), start=2)
    view = mapping.buffer()
    for p in range(2, 8):  # page 2 is zero, page 3 is the payload's second page, ...
        expected = bytes(PAGE) if p in zero else page_bytes(p)
        assert view[p * PAGE:(p + 1) * PAGE] == expected, f"page {p}"
    assert [is_missing(uffd, mapping, p, res) for p in range(8)] == [True, True] + [False] * 6


def test_an_existing_page_stops_the_run_and_says_where(res: Resources) -> None:
    uffd, mapping = registered(res, 8)
    uffd.copy(mapping.address + 5 * PAGE, res.source(page_bytes(5)), PAGE)
    payload, zero = packed(8, (2, 3))
    source = res.source(payload)
    with pytest.raises((PageExistsError, UffdError)) as info:
        uffd.place_run(mapping.address, source, PAGE, 8, (2, 3))
    page = info.value.page
    # the kernel copies pages 3..4 of the stretch and reports EAGAIN (partial), or EEXIST at 5
    assert page in (5,) and info.value.errno in (errno.EEXIST, errno.EAGAIN)
    if info.value.errno == errno.EAGAIN:
        with pytest.raises(PageExistsError) as again:
            uffd.place_run(mapping.address, source, PAGE, 8, (2, 3), start=page)
        assert again.value.page == 5
    uffd.place_run(mapping.address, source, PAGE, 8, (2, 3), start=6)
    assert_run(mapping, 8, zero)


@pytest.mark.parametrize("zeros", [(3,), (3, 2), (2, 9), (4, 5, 1, 2)])
def test_bounds_that_are_not_sorted_within_the_run_are_refused(res: Resources, zeros: tuple[int, ...]) -> None:
    uffd, mapping = registered(res, 8)
    with pytest.raises(UffdError) as info:
        uffd.place_run(mapping.address, res.source(bytes(8 * PAGE)), PAGE, 8, zeros)
    assert info.value.errno == errno.EINVAL
    assert all(is_missing(uffd, mapping, p, res) for p in range(8)), "a refused run placed something"
