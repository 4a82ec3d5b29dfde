"""The workload's touches, in C: :func:`touch_pages`.

A workload thread stands for a guest's vCPU, and a vCPU runs no interpreter
between two reads of memory.  Touched from Python, each page cost the thread
several microseconds of interpreter time and the process's GIL on either side
of its wait, on the same vCPUs as the service being measured (and, for a
self-served client, against the pager thread that serves its faults).
:func:`touch_pages` runs a batch of touches in one C call with the GIL
released (``_touch_source.c``): per page the same first-touch check
(:class:`SeenPages`, then ``mincore``), the same timed one-byte read and the
same fault/hit split as the Python loop of :mod:`aiopostcopy.tools.workload`.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["BATCH", "SeenPages", "VERSION", "available", "touch_pages"]

#: The C side's TOUCH_VERSION this module is written for.
VERSION = 1
#: Touches per C call: the arrays stay small, the calls few.
BATCH = 4096

try:
    from aiopostcopy.tools._touch import ffi, lib
except ImportError:  # not built: the workload touches from Python
    ffi = lib = None
if lib is not None and getattr(lib, "TOUCH_VERSION", None) != VERSION:  # built from other sources: not used
    ffi = lib = None


def available() -> bool:
    """The C loop was built from the sources of this version."""
    return lib is not None


class SeenPages:
    """One byte per page of a process's blocks, set by the first touch of the page by any of
    its threads (the first touch of a page is the one that may fault)."""

    __slots__ = ("bytes", "total")

    def __init__(self, total: int) -> None:
        self.total = total
        self.bytes = ffi.new("uint8_t[]", max(total, 1))

    def __contains__(self, flat: object) -> bool:
        return isinstance(flat, int) and 0 <= flat < self.total and bool(self.bytes[flat])


def touch_pages(pages: Sequence[int], flats: Sequence[int], offset: int, seen: SeenPages) -> tuple[list[int], int]:
    """Touch byte ``offset`` of each page at address ``pages[i]`` (``flats[i]``: its index in
    ``seen``), in order, in one C call without the GIL.

    Returns:
        ``(latencies, hits)``: the nanoseconds of each fault (a first touch of a page not in
        memory, by mincore), in order, and the number of first touches of pages in memory.

    Raises:
        ValueError: ``pages`` and ``flats`` differ in length, or an index is outside ``seen``.
    """
    count = len(pages)
    if len(flats) != count:
        raise ValueError(f"{count} pages but {len(flats)} indexes")
    if count and not 0 <= min(flats) <= max(flats) < seen.total:
        raise ValueError(f"a page index is outside the {seen.total} pages")
    latencies = ffi.new("int64_t[]", count or 1)
    hits = ffi.new("uint64_t *")
    faults = lib.touch_pages(ffi.new("uint64_t[]", list(pages)), ffi.new("uint64_t[]", list(flats)), count, offset,
                             seen.bytes, latencies, hits)
    return ffi.unpack(latencies, faults), hits[0]
