"""A set of one block's pages kept as one byte per page: :class:`PageSet`.

The source records which pages it sent (the sweep skips them, a Resume
replaces the record, a Discard cuts it).  Faults arrive at random, so the
pages answered on the urgent channel are scattered: kept as a sorted list of
run bounds (:class:`~aiopostcopy.core.rangeset.RangeSet`), every fault's page
became a new run and its insertion moved the bounds after it, a cost per
fault that grew with the faults before it (tens of thousands of runs late in
a migration under faults).  Here adding or removing a run touches its own
bytes only, and the sweep's search for the next page not sent is
``bytearray.find``, in C.  The cost is 0.025% of a 4 KiB-page block's size,
as the destination's page states (:class:`~aiopostcopy.core.pages.PageStates`).
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["PageSet"]

_IN, _OUT = 1, 0
_CHUNK = 1 << 20  # pages filled per slice assignment: no temporary larger than this
_FILL = {_IN: memoryview(b"\x01" * _CHUNK), _OUT: memoryview(bytes(_CHUNK))}


class PageSet:
    """Pages ``[0, pages)`` of one block, each in the set or not.

    Args:
        pages: the block's pages.
        runs: ``(start, stop)`` runs in the set to begin with.
    """

    __slots__ = ("pages", "_bytes", "_members")

    def __init__(self, pages: int, runs: Iterable[tuple[int, int]] = ()) -> None:
        self.pages = pages
        self._bytes = bytearray(pages)
        self._members = 0
        for start, stop in runs:
            self.add(start, stop)

    def add(self, start: int, stop: int) -> None:
        """Put ``[start, stop)`` in the set (clipped to the block; an empty run is ignored)."""
        self._mark(start, stop, _IN)

    def subtract(self, start: int, stop: int) -> None:
        """Take ``[start, stop)`` out of the set (clipped to the block; an empty run is ignored)."""
        self._mark(start, stop, _OUT)

    def _mark(self, start: int, stop: int, value: int) -> None:
        start, stop = max(start, 0), min(stop, self.pages)
        if start >= stop:
            return
        data = self._bytes
        if stop - start == 1:  # a fault's page
            if data[start] != value:
                data[start] = value
                self._members += 1 if value else -1
            return
        changed = data.count(1 - value, start, stop)
        fill = _FILL[value]
        for at in range(start, stop, _CHUNK):
            end = min(stop, at + _CHUNK)
            data[at:end] = fill[:end - at]
        self._members += changed if value else -changed

    def __contains__(self, page: object) -> bool:
        return type(page) is int and 0 <= page < self.pages and self._bytes[page] == _IN

    def total(self) -> int:
        """Pages in the set."""
        return self._members

    def covers(self, start: int, stop: int) -> bool:
        """Every page of ``[start, stop)`` is in the set (vacuously for an empty run)."""
        start, stop = max(start, 0), min(stop, self.pages)
        if start >= stop:
            return True
        if start == 0 and stop == self.pages:
            return self._members == self.pages
        return self._bytes.find(_OUT, start, stop) < 0

    def first_gap_from(self, value: int, limit: int) -> tuple[int, int] | None:
        """The first run of pages not in the set at or after ``value``, clipped to ``limit``
        (at most the block's end): ``(start, stop)``, or None when ``[value, limit)`` is all in.
        """
        limit = min(limit, self.pages)
        start = self._bytes.find(_OUT, max(value, 0), limit)
        if start < 0:
            return None
        stop = self._bytes.find(_IN, start, limit)
        return start, limit if stop < 0 else stop

    def runs(self) -> list[tuple[int, int]]:
        """The set as ``(start, stop)`` runs, in order."""
        result: list[tuple[int, int]] = []
        data, pages = self._bytes, self.pages
        start = data.find(_IN)
        while start >= 0:
            stop = data.find(_OUT, start)
            stop = pages if stop < 0 else stop
            result.append((start, stop))
            start = data.find(_IN, stop) if stop < pages else -1
        return result
