"""Unit tests of aiopostcopy.tools.pattern: the page contents every end-to-end test checks."""

from __future__ import annotations

import mmap
import random

import pytest

from aiopostcopy.tools import pattern
from aiopostcopy.tools.pattern import COUNTER_BYTES, check_page, expected_pages, fill, is_zero_page, page_bytes, verify_block

PAGE = 4096
HUGE = 2 << 20


@pytest.mark.parametrize("page_size", [PAGE, HUGE])
def test_page_bytes_is_deterministic_and_sized(page_size: int) -> None:
    first = page_bytes(2, 17, page_size, seed=9)
    assert first == page_bytes(2, 17, page_size, seed=9)
    assert len(first) == page_size


def test_pages_differ_by_block_page_and_seed() -> None:
    base = page_bytes(1, 5, PAGE, seed=3)
    assert base != page_bytes(2, 5, PAGE, seed=3)
    assert base != page_bytes(1, 6, PAGE, seed=3)
    assert base != page_bytes(1, 5, PAGE, seed=4)
    assert page_bytes(1, 5, HUGE, seed=3)[:PAGE] != base  # the header records the page size


def test_counter_area_is_zero_and_data_pages_are_not() -> None:
    for page in range(200):
        data = page_bytes(0, page, PAGE, seed=1)
        assert data[:COUNTER_BYTES] == bytes(COUNTER_BYTES)
        assert data[COUNTER_BYTES:].count(0) < PAGE // 2
        assert any(data[COUNTER_BYTES:])


def test_zero_pages_are_all_zero_and_about_one_in_zero_every() -> None:
    zeros = [page for page in range(7000) if is_zero_page(3, page, 11, 7)]
    assert 700 < len(zeros) < 1300
    for page in zeros[:50]:
        assert page_bytes(3, page, PAGE, seed=11, zero_every=7) == bytes(PAGE)
        assert check_page(bytes(PAGE), 3, page, PAGE, 11, 7) is None
    assert any(b - a == 1 for a, b in zip(zeros, zeros[1:])), "zero pages should also come in runs"


def test_zero_every_bounds() -> None:
    assert not any(is_zero_page(0, page, 0, 0) for page in range(100))
    assert all(is_zero_page(0, page, 0, 1) for page in range(100))


def test_is_zero_page_depends_on_seed_and_block() -> None:
    pages = range(500)
    assert [is_zero_page(0, p, 1) for p in pages] != [is_zero_page(0, p, 2) for p in pages]
    assert [is_zero_page(0, p, 1) for p in pages] != [is_zero_page(1, p, 1) for p in pages]


def test_expected_pages_concatenates_pages() -> None:
    data = expected_pages(4, 10, 8, PAGE, seed=5, zero_every=3)
    for index in range(8):
        page = data[index * PAGE:(index + 1) * PAGE]
        assert page == page_bytes(4, 10 + index, PAGE, seed=5, zero_every=3)


def test_fill_then_verify_is_clean() -> None:
    buffer = bytearray(300 * PAGE)
    fill(memoryview(buffer), 1, PAGE, seed=7, zero_every=5)
    assert verify_block(buffer, 1, PAGE, 7, 5) == []
    for page in (0, 123, 299):
        assert buffer[page * PAGE:(page + 1) * PAGE] == page_bytes(1, page, PAGE, seed=7, zero_every=5)


def test_fill_assume_zeroed_leaves_zero_pages_alone() -> None:
    dense, sparse = bytearray(64 * PAGE), bytearray(64 * PAGE)
    fill(dense, 0, PAGE, seed=1, zero_every=4)
    fill(sparse, 0, PAGE, seed=1, zero_every=4, assume_zeroed=True)
    assert dense == sparse


def test_fill_rejects_partial_pages() -> None:
    with pytest.raises(ValueError):
        fill(bytearray(PAGE + 8), 0, PAGE)
    with pytest.raises(ValueError):
        page_bytes(0, 0, 100)


def test_check_page_finds_a_single_flipped_byte_anywhere() -> None:
    rng = random.Random(1234)
    for _ in range(300):
        page = rng.randrange(1000)
        good = bytearray(page_bytes(2, page, PAGE, seed=8, zero_every=6))
        offset = rng.randrange(PAGE)
        good[offset] ^= 1 << rng.randrange(8)
        problem = check_page(good, 2, page, PAGE, 8, 6)
        assert problem is not None
        assert f"byte {offset}" in problem or "holds" in problem


def test_check_page_can_ignore_the_counter_area() -> None:
    page = next(p for p in range(100) if not is_zero_page(0, p, 0))
    data = bytearray(page_bytes(0, page, PAGE))
    data[8:16] = (41).to_bytes(8, "little")
    assert check_page(data, 0, page, PAGE, 0) is not None
    assert check_page(data, 0, page, PAGE, 0, ignore_counters=True) is None
    data[COUNTER_BYTES] ^= 0xFF
    assert check_page(data, 0, page, PAGE, 0, ignore_counters=True) is not None


def test_check_page_names_zero_fill_and_misplaced_pages() -> None:
    page = next(p for p in range(100) if not is_zero_page(0, p, 0))
    assert "all zeros" in check_page(bytes(PAGE), 0, page, PAGE, 0)
    other = page_bytes(0, page + 1, PAGE)
    assert f"holds block 0 page {page + 1}" in check_page(other, 0, page, PAGE, 0)
    assert "bytes, expected" in check_page(bytes(10), 0, page, PAGE, 0)


@pytest.mark.parametrize("counters_ok", [False, True])
def test_verify_block_reports_each_bad_page(counters_ok: bool) -> None:
    buffer = bytearray(2000 * PAGE)  # spans several 4 MiB comparison chunks
    fill(buffer, 5, PAGE, seed=3)
    bad = [0, 999, 1024, 1025, 1999]
    for page in bad:
        buffer[page * PAGE + COUNTER_BYTES + 70] ^= 0x40
    buffer[7 * PAGE + 16] = 1  # a counter increment
    expected = sorted(bad) if counters_ok else sorted(bad + [7])
    assert verify_block(buffer, 5, PAGE, 3, counters_ok=counters_ok) == expected


def test_verify_block_huge_pages() -> None:
    buffer = bytearray(5 * HUGE)
    fill(buffer, 0, HUGE, seed=2, zero_every=2)
    assert verify_block(buffer, 0, HUGE, 2, 2) == []
    buffer[3 * HUGE + HUGE - 1] ^= 1
    assert verify_block(buffer, 0, HUGE, 2, 2) == [3]


def test_verify_block_on_shared_memory_view() -> None:
    """The real use: a memoryview of a mapping, 64 MiB, checked in one call (speed sanity only)."""
    size = 64 << 20
    with mmap.mmap(-1, size) as memory:
        view = memoryview(memory)
        try:
            fill(view, 9, PAGE, seed=99)
            assert verify_block(view, 9, PAGE, 99) == []
            view[12345] = view[12345] ^ 0xFF
            assert verify_block(view, 9, PAGE, 99) == [12345 // PAGE]
        finally:
            view.release()


def test_counter_slots_constant() -> None:
    assert pattern.COUNTER_SLOTS == 64
