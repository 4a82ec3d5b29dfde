"""The page contents used by the demo, the tests and the benchmarks.

Theory of operation
-------------------
Like QEMU's migration test, every page of every RAMBlock holds content that
is a pure function of ``(block_index, page, page_size, seed)``, so any process
can check any page after a migration without a copy of the source.  A page is
either a *zero page* (all zeros; about one page in ``zero_every``, chosen by a
hash so that zero pages also come in runs) or a *data page* laid out as::

    [0, 512)          counter area: zeros in the pattern (COUNTER_BYTES)
    [512, 576)        header: eight little-endian u64
                      MAGIC, block, page, seed, page_size, word, ~word, MAGIC2
    [576, page_size)  the 8-byte ``word`` repeated

``word`` mixes block, page and seed (splitmix64), so a page placed at the
wrong offset, in the wrong block or from another run is caught, and the header
says which page it really is.  The counter area gives a stress test 64 slots
of 8 bytes (one per (process, thread)) to count its touches in; verification
can ignore it.

Everything here is pure (no I/O) and builds pages with bytes multiplication
and ``b"".join`` over large chunks: filling or verifying 256 MiB takes a few
tenths of a second.
"""

from __future__ import annotations

import struct
from functools import lru_cache

__all__ = [
    "COUNTER_BYTES",
    "COUNTER_SLOTS",
    "HEADER_BYTES",
    "page_bytes",
    "is_zero_page",
    "expected_pages",
    "fill",
    "check_page",
    "verify_block",
]

COUNTER_BYTES = 512  #: leading bytes of every page that are zero in the pattern
COUNTER_SLOTS = COUNTER_BYTES // 8  #: 8-byte counter slots per page
HEADER_BYTES = 64  #: the header that follows the counter area
_BODY = COUNTER_BYTES + HEADER_BYTES  #: where the repeated word starts
_MASK = (1 << 64) - 1
_MAGIC = int.from_bytes(b"aiopcPG1", "little")
_MAGIC2 = int.from_bytes(b"1GPcpoia", "little")
_HEADER = struct.Struct("<8Q")
_ZERO_SALT = 0x5A3E_D00D_F00D_BEEF
_CHUNK_BYTES = 4 << 20  #: bytes built and compared at once by fill / verify_block


def _mix(value: int) -> int:
    """splitmix64's finaliser: a well-spread 64-bit hash of ``value``."""
    value = (value + 0x9E3779B97F4A7C15) & _MASK
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK
    return value ^ (value >> 31)


def _key(block_index: int, page: int, seed: int) -> int:
    return _mix(_mix(seed & _MASK) ^ (block_index << 48) ^ page)


def _word(block_index: int, page: int, seed: int) -> int:
    return _key(block_index, page, seed) | 1  # never zero: a data page is never all zeros


def _check_size(page_size: int) -> None:
    if page_size % 8 or page_size < _BODY + 8:
        raise ValueError(f"page size {page_size} must be a multiple of 8 and at least {_BODY + 8}")


@lru_cache(maxsize=8)
def _zeros(length: int) -> bytes:
    return bytes(length)


def is_zero_page(block_index: int, page: int, seed: int = 0, zero_every: int = 7) -> bool:
    """Tell whether a page is a zero page in the pattern.

    Args:
        block_index: the RAMBlock's index in the session's block list.
        page: the page number inside the block.
        seed: the pattern seed.
        zero_every: about one page in this many is zero; 0 or less means none,
            1 means every page.

    Returns:
        True if the page is all zeros (the source sends it as a zero marker).
    """
    if zero_every <= 0:
        return False
    if zero_every == 1:
        return True
    return _key(block_index, page, seed ^ _ZERO_SALT) % zero_every == 0


def page_bytes(block_index: int, page: int, page_size: int, *, seed: int = 0, zero_every: int = 0) -> bytes:
    """Build the data content of one page.

    Args:
        block_index: the RAMBlock's index.
        page: the page number inside the block.
        page_size: bytes per page (a multiple of 8, at least 584).
        seed: the pattern seed.
        zero_every: if positive and the page is a zero page, return zeros;
            the default 0 always returns the data layout.

    Returns:
        ``page_size`` bytes.

    Raises:
        ValueError: the page size cannot hold the layout.
    """
    _check_size(page_size)
    if zero_every > 0 and is_zero_page(block_index, page, seed, zero_every):
        return _zeros(page_size)
    word = _word(block_index, page, seed)
    header = _HEADER.pack(_MAGIC, block_index, page, seed & _MASK, page_size, word, word ^ _MASK, _MAGIC2)
    body = word.to_bytes(8, "little") * ((page_size - _BODY) // 8)
    return b"".join((_zeros(COUNTER_BYTES), header, body))


def expected_pages(block_index: int, first: int, count: int, page_size: int, *,
                   seed: int = 0, zero_every: int = 7) -> bytes:
    """Build the content of ``count`` consecutive pages from ``first``.

    Returns:
        ``count * page_size`` bytes, zero pages included.
    """
    return b"".join(
        page_bytes(block_index, page, page_size, seed=seed, zero_every=zero_every)
        for page in range(first, first + count)
    )


def _as_bytes_view(buffer: object) -> memoryview:
    view = memoryview(buffer)  # type: ignore[arg-type]
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


def _pages_in(view: memoryview, page_size: int) -> int:
    if len(view) % page_size:
        raise ValueError(f"buffer of {len(view)} bytes is not a whole number of {page_size}-byte pages")
    return len(view) // page_size


def _chunk_pages(page_size: int) -> int:
    return max(1, _CHUNK_BYTES // page_size)


def fill(buffer: object, block_index: int, page_size: int, seed: int = 0, zero_every: int = 7, *,
         assume_zeroed: bool = False) -> None:
    """Write the pattern into a whole block.

    Args:
        buffer: a writable buffer holding the block (length a multiple of
            ``page_size``), e.g. ``Mapping.buffer()`` or a bytearray.
        block_index: the block's index.
        page_size: bytes per page.
        seed: the pattern seed.
        zero_every: see :func:`is_zero_page`.
        assume_zeroed: the buffer is known to hold zeros (a fresh memfd): zero
            pages are skipped, so they stay unallocated holes.

    Raises:
        ValueError: the buffer is not a whole number of pages.
    """
    _check_size(page_size)
    view = _as_bytes_view(buffer)
    total = _pages_in(view, page_size)
    step = _chunk_pages(page_size)
    for first in range(0, total, step):
        count = min(step, total - first)
        if assume_zeroed:
            _fill_sparse(view, block_index, first, count, page_size, seed, zero_every)
            continue
        data = expected_pages(block_index, first, count, page_size, seed=seed, zero_every=zero_every)
        view[first * page_size:(first + count) * page_size] = data


def _fill_sparse(view: memoryview, block_index: int, first: int, count: int, page_size: int,
                 seed: int, zero_every: int) -> None:
    for page in range(first, first + count):
        if not is_zero_page(block_index, page, seed, zero_every):
            view[page * page_size:(page + 1) * page_size] = page_bytes(block_index, page, page_size, seed=seed)


def _first_difference(actual: memoryview, expected: bytes, start: int) -> int:
    step = 256
    for offset in range(start, len(expected), step):
        if actual[offset:offset + step] != expected[offset:offset + step]:
            for index in range(offset, min(offset + step, len(expected))):
                if actual[index] != expected[index]:
                    return index
    return -1


def _impostor(actual: memoryview, block_index: int, page: int, page_size: int, seed: int) -> str | None:
    """Name the page whose header ``actual`` carries, if it is another pattern page."""
    fields = _HEADER.unpack(actual[COUNTER_BYTES:_BODY])
    if fields[0] != _MAGIC or fields[7] != _MAGIC2:
        return None
    _, other_block, other_page, other_seed, other_size, _, _, _ = fields
    if (other_block, other_page, other_seed, other_size) == (block_index, page, seed & _MASK, page_size):
        return None
    return f"holds block {other_block} page {other_page} (seed {other_seed}, page size {other_size})"


def _region(offset: int, zero: bool) -> str:
    if zero:
        return "zero page"
    if offset < COUNTER_BYTES:
        return "counter area"
    if offset < _BODY:
        return "header"
    return "body"


def check_page(actual: object, block_index: int, page: int, page_size: int, seed: int = 0,
               zero_every: int = 7, ignore_counters: bool = False) -> str | None:
    """Check one page against the pattern.

    Args:
        actual: the page's bytes (any buffer of ``page_size`` bytes).
        block_index, page, page_size, seed, zero_every: which pattern page it should be.
        ignore_counters: skip the counter area (first ``COUNTER_BYTES``).

    Returns:
        None when the page is good, else a short description: the page is all
        zeros (zero-filled), holds another page, or the first differing byte.
    """
    view = _as_bytes_view(actual)
    if len(view) != page_size:
        return f"page {page}: {len(view)} bytes, expected {page_size}"
    zero = is_zero_page(block_index, page, seed, zero_every)
    expected = _zeros(page_size) if zero else page_bytes(block_index, page, page_size, seed=seed)
    start = COUNTER_BYTES if ignore_counters else 0
    if view[start:] == expected[start:]:
        return None
    if not zero:
        if view[start:] == _zeros(page_size)[start:]:
            return f"page {page}: all zeros, expected data (zero-filled?)"
        other = _impostor(view, block_index, page, page_size, seed)
        if other:
            return f"page {page}: {other}"
    offset = _first_difference(view, expected, start)
    return (f"page {page}: byte {offset} ({_region(offset, zero)}) is 0x{view[offset]:02x}, "
            f"expected 0x{expected[offset]:02x}")


def _masked(view: memoryview, count: int, page_size: int) -> bytes | bytearray:
    """Copy ``count`` pages from ``view`` with their counter areas zeroed."""
    copy = bytearray(view)
    blank = _zeros(COUNTER_BYTES)
    for offset in range(0, count * page_size, page_size):
        copy[offset:offset + COUNTER_BYTES] = blank
    return copy


def verify_block(buffer: object, block_index: int, page_size: int, seed: int = 0, zero_every: int = 7, *,
                 counters_ok: bool = False) -> list[int]:
    """Check every page of a block; compares 4 MiB at a time, drills down on mismatch.

    Args:
        buffer: the block's memory (length a multiple of ``page_size``).
        block_index, page_size, seed, zero_every: the pattern.
        counters_ok: ignore the counter area of every page.

    Returns:
        The page numbers that differ from the pattern, ascending.

    Raises:
        ValueError: the buffer is not a whole number of pages.
    """
    _check_size(page_size)
    view = _as_bytes_view(buffer)
    total = _pages_in(view, page_size)
    step = _chunk_pages(page_size)
    bad: list[int] = []
    for first in range(0, total, step):
        count = min(step, total - first)
        chunk = view[first * page_size:(first + count) * page_size]
        actual = _masked(chunk, count, page_size) if counters_ok else chunk.tobytes()
        if actual == expected_pages(block_index, first, count, page_size, seed=seed, zero_every=zero_every):
            continue
        for page in range(first, first + count):
            offset = (page - first) * page_size
            if check_page(chunk[offset:offset + page_size], block_index, page, page_size, seed,
                          zero_every, ignore_counters=counters_ok):
                bad.append(page)
    return bad
