"""Page digests for starting from an earlier copy (feature ``from-copy``).

Theory of operation
-------------------
A destination that already holds an earlier copy of the memory sends the
digest of each page it holds (:class:`~aiopostcopy.messages.Digests`); the
source digests its own pages the same way and answers which differ
(:class:`~aiopostcopy.messages.Changed`).  The digest is BLAKE2b with an
8-byte output, no key, salt or personalisation, over the page's bytes, read
as a big-endian unsigned 64-bit integer (docs/protocol.md, section 4.10).
64 bits make a false "unchanged" a 2**-64 chance per page.

Both sides hash from a buffer they already read; hashlib releases the GIL
for buffers this size, so a thread hashing does not hold up the loop.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

__all__ = ["FROM_COPY_FEATURE", "changed_bounds", "page_digest", "page_digests", "zero_digest"]

#: Hello feature: the destination starts from an earlier copy / the source can compare digests.
FROM_COPY_FEATURE = "from-copy"


def page_digest(page: bytes | memoryview | bytearray) -> int:
    """The digest of one page."""
    return int.from_bytes(hashlib.blake2b(page, digest_size=8).digest(), "big")


def page_digests(memory: memoryview, page_size: int, count: int) -> list[int]:
    """The digests of the first ``count`` pages of ``memory``."""
    return [page_digest(memory[i * page_size:(i + 1) * page_size]) for i in range(count)]


_ZERO_DIGESTS: dict[int, int] = {}


def zero_digest(page_size: int) -> int:
    """The digest of an all-zero page of ``page_size`` bytes (a sparse file's hole)."""
    digest = _ZERO_DIGESTS.get(page_size)
    if digest is None:
        digest = _ZERO_DIGESTS[page_size] = page_digest(bytes(page_size))
    return digest


def changed_bounds(theirs: Iterable[int], ours: Iterable[int]) -> tuple[int, ...]:
    """Where two digest lists differ, as flattened bounds ``(start0, stop0, ...)`` (strictly increasing)."""
    bounds: list[int] = []
    inside = False
    index = -1
    for index, (a, b) in enumerate(zip(theirs, ours)):
        if (a != b) != inside:
            bounds.append(index)
            inside = not inside
    if inside:
        bounds.append(index + 1)
    return tuple(bounds)
