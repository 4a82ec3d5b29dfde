"""The source's zero-page scan (exactly the all-zero pages of a run, as Pages.zeros bounds), in Python
and in C (the sweep's ``read_run``, on a real file), and the packing of a run's data pages into one
payload."""

from __future__ import annotations

import mmap
import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aiopostcopy.source import _data_stretches, _zero_bounds
from aiopostcopy.transport.page_server import available, read_run

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


def _page(kind: str, rng: random.Random, size: int = PAGE) -> bytes:
    page = bytearray(size)
    if kind == "data":
        page[:] = rng.randbytes(size)
    elif kind == "probe-bytes-zero":  # the words C and Python look at first are zero, another byte is not
        page[rng.choice([8, size // 2 + 8, size - 9, 1, size - 2])] = 1 + rng.randrange(255)
    elif kind == "one-byte":
        page[rng.randrange(size)] = 1 + rng.randrange(255)
    return bytes(page)


@pytest.mark.skipif(not available(), reason="the C page server is not built")
@settings(max_examples=80, deadline=None)
@given(kinds=st.lists(st.sampled_from(["zero", "data", "probe-bytes-zero", "one-byte"]), min_size=1, max_size=64),
       first=st.integers(0, 3), seed=st.integers(0, 1 << 30))
def test_read_run_reads_the_pages_and_finds_what_the_python_scan_finds(tmp_path_factory, kinds: list[str],
                                                                        first: int, seed: int) -> None:
    rng = random.Random(seed)
    image = b"".join(_page(rng.choice(["data", "zero"]), rng) for _ in range(first)) + \
        b"".join(_page(k, rng) for k in kinds)
    path = tmp_path_factory.mktemp("run") / "block"
    path.write_bytes(image)
    fd = os.open(path, os.O_RDONLY)
    try:
        buffer = bytearray(b"\xee" * (len(kinds) + 2) * PAGE)  # bigger than the run, not zeroed
        got = read_run(fd, PAGE, first, len(kinds), buffer)
    finally:
        os.close(fd)
    assert bytes(buffer[:len(kinds) * PAGE]) == image[first * PAGE:]
    assert got == _zero_bounds(image, bytes(PAGE), first * PAGE, len(kinds), PAGE)
    assert got == bounds_of([k == "zero" for k in kinds])


@pytest.mark.skipif(not available(), reason="the C page server is not built")
def test_read_run_of_a_file_that_ends_before_the_run_is_none(tmp_path) -> None:
    path = tmp_path / "block"
    path.write_bytes(b"\1" * 3 * PAGE)
    fd = os.open(path, os.O_RDONLY)
    try:
        buffer = bytearray(4 * PAGE)
        assert read_run(fd, PAGE, 0, 3, buffer) == ()
        assert read_run(fd, PAGE, 1, 3, buffer) is None  # the Python read then says the file shrank
        assert read_run(fd, PAGE, 0, 5, buffer) is None  # the buffer is too small: not read at all
    finally:
        os.close(fd)
    assert read_run(-1, PAGE, 0, 1, bytearray(PAGE)) is None  # a failed read


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
