"""The source's zero-page scan (exactly the all-zero pages of a run, as Pages.zeros bounds) and the
packing of a run's data pages into one payload."""

from __future__ import annotations

import mmap
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aiopostcopy.source import _data_stretches, _zero_bounds

PAGE = 4096


def bounds_of(zero_pages: list[bool]) -> tuple[int, ...]:
    out, inside = [], False
    for i, z in enumerate(zero_pages):
        if z != inside:
            out.append(i)
            inside = z
    if inside:
        out.append(len(zero_pages))
    return tuple(out)


@settings(max_examples=60, deadline=None)
@given(kinds=st.lists(st.sampled_from(["zero", "data", "probe-bytes-zero", "one-byte"]), min_size=1, max_size=40),
       first=st.integers(0, 3), seed=st.integers(0, 1 << 30))
def test_zero_bounds_finds_exactly_the_zero_pages(kinds: list[str], first: int, seed: int) -> None:
    rng = random.Random(seed)
    with mmap.mmap(-1, (first + len(kinds)) * PAGE) as memory:
        for i, kind in enumerate(kinds):
            at = (first + i) * PAGE
            if kind == "data":
                memory[at:at + PAGE] = rng.randbytes(PAGE)
            elif kind == "probe-bytes-zero":  # the sampled bytes are zero, another one is not
                memory[at + rng.choice([1, PAGE // 2 + 1, PAGE - 2])] = 1 + rng.randrange(255)
            elif kind == "one-byte":
                memory[at + rng.randrange(PAGE)] = 1 + rng.randrange(255)
        got = _zero_bounds(memory, bytes(PAGE), first * PAGE, len(kinds), PAGE)
    assert got == bounds_of([k == "zero" for k in kinds])


@pytest.mark.parametrize("size", [4096, 2 << 20])
def test_zero_bounds_of_huge_pages(size: int) -> None:
    with mmap.mmap(-1, 3 * size) as memory:
        memory[size + size - 1] = 7  # only the last byte of the middle page
        assert _zero_bounds(memory, bytes(size), 0, 3, size) == (0, 1, 2, 3)
        assert _zero_bounds(memory, bytes(size), size, 1, size) == ()


@settings(max_examples=60, deadline=None)
@given(zero_pages=st.lists(st.booleans(), min_size=1, max_size=40))
def test_the_data_stretches_are_exactly_the_data_pages_in_order(zero_pages: list[bool]) -> None:
    pages = [bytes(PAGE) if zero else bytes([1 + i % 255]) * PAGE for i, zero in enumerate(zero_pages)]
    buffer = bytearray(b"".join(pages))
    zeros = _zero_bounds(buffer, bytes(PAGE), 0, len(pages), PAGE)
    stretches = _data_stretches(memoryview(buffer), zeros, len(pages), PAGE)
    data = b"".join(p for p, zero in zip(pages, zero_pages) if not zero)
    assert b"".join(bytes(s) for s in stretches) == data
