"""Page runs: a set of integers kept as sorted, merged, half-open ranges, and run arithmetic.

Theory of operation
-------------------
The set is one flat Python list of bounds ``[start0, stop0, start1, stop1, ...]``
that is strictly increasing.  An even index holds a start, an odd index a
stop, so ``x`` is in the set exactly when the number of bounds ``<= x`` is
odd: membership is one :func:`bisect.bisect_right`.  Adding or subtracting a
range finds the two affected positions by bisection and replaces the bounds
between them with at most two new ones, so adjacent and overlapping ranges
merge by construction and no empty range is ever stored.

Memory is two integers per run, never anything per member: the set of pages
received from a 1 TiB block costs as little as its run count.

Invariants: ``_bounds`` strictly increasing, even length.

The same flattened bounds travel in messages (``Resume.received``,
``Pages.zeros``), which check only their shape; the arithmetic on them lives
here: :func:`bounds_total` (how many pages they cover) and :func:`clip_bounds`
(cut them to a sub-run).  :func:`merge_runs` and :func:`chunks` shape lists of
:class:`~aiopostcopy.messages.PageRun` for messages with a run limit.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator
from typing import TypeVar

from aiopostcopy.messages import MAX_RUN_PAGES, PageRun

__all__ = ["RangeSet", "bounds_total", "clip_bounds", "merge_runs", "chunks"]

T = TypeVar("T")


def bounds_total(bounds: tuple[int, ...] | list[int]) -> int:
    """How many values flattened half-open bounds ``(start0, stop0, start1, stop1, ...)`` cover."""
    return sum(bounds[1::2]) - sum(bounds[::2])


class RangeSet:
    """Sorted, merged half-open integer ranges.

    Args:
        ranges: optional ``(start, stop)`` pairs to add.
    """

    __slots__ = ("_bounds",)

    def __init__(self, ranges: Iterable[tuple[int, int]] = ()) -> None:
        self._bounds: list[int] = []
        for start, stop in ranges:
            self.add(start, stop)

    @classmethod
    def from_bounds(cls, bounds: Iterable[int]) -> RangeSet:
        """Build from flattened bounds ``(start0, stop0, start1, stop1, ...)``.

        Raises:
            ValueError: the bounds are not strictly increasing or of odd length.
        """
        flat = list(bounds)
        if len(flat) % 2:
            raise ValueError("range set bounds must have even length")
        for low, high in zip(flat, flat[1:]):
            if low >= high:
                raise ValueError(f"range set bounds must increase strictly: {low} >= {high}")
        result = cls()
        result._bounds = flat
        return result

    def add(self, start: int, stop: int) -> None:
        """Add ``[start, stop)``; an empty range is ignored."""
        if start >= stop:
            return
        bounds = self._bounds
        low = bisect_left(bounds, start)
        high = bisect_right(bounds, stop)
        bounds[low:high] = ([start] if low % 2 == 0 else []) + ([stop] if high % 2 == 0 else [])

    def subtract(self, start: int, stop: int) -> None:
        """Remove ``[start, stop)``; an empty range is ignored."""
        if start >= stop:
            return
        bounds = self._bounds
        low = bisect_left(bounds, start)
        high = bisect_right(bounds, stop)
        bounds[low:high] = ([start] if low % 2 else []) + ([stop] if high % 2 else [])

    def __contains__(self, value: object) -> bool:
        return bisect_right(self._bounds, value) % 2 == 1  # type: ignore[call-overload]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        bounds = self._bounds
        return zip(bounds[::2], bounds[1::2])

    def __len__(self) -> int:
        """Number of runs (not members: see :meth:`total`)."""
        return len(self._bounds) // 2

    def __bool__(self) -> bool:
        return bool(self._bounds)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RangeSet):
            return NotImplemented
        return self._bounds == other._bounds

    def __repr__(self) -> str:
        return f"RangeSet({list(self)!r})"

    def copy(self) -> RangeSet:
        return RangeSet.from_bounds(self._bounds)

    def total(self) -> int:
        """Number of members (sum of run lengths)."""
        return bounds_total(self._bounds)

    def bounds(self) -> tuple[int, ...]:
        """Flattened bounds ``(start0, stop0, ...)``, as :class:`~aiopostcopy.messages.Resume` wants."""
        return tuple(self._bounds)

    def covers(self, start: int, stop: int) -> bool:
        """True when every integer of ``[start, stop)`` is a member (vacuously for empty)."""
        if start >= stop:
            return True
        index = bisect_right(self._bounds, start)
        return index % 2 == 1 and self._bounds[index] >= stop

    def intersection(self, start: int, stop: int) -> list[tuple[int, int]]:
        """The members within ``[start, stop)`` as runs, in order."""
        bounds = self._bounds
        index = bisect_right(bounds, start)
        result = []
        if index % 2 == 1:
            result.append((start, min(stop, bounds[index])))
            index += 1
        while index < len(bounds) and bounds[index] < stop:
            result.append((bounds[index], min(stop, bounds[index + 1])))
            index += 2
        return result

    def gaps(self, start: int, stop: int) -> list[tuple[int, int]]:
        """The non-members within ``[start, stop)`` as runs, in order."""
        result = []
        position = start
        for low, high in self.intersection(start, stop):
            if low > position:
                result.append((position, low))
            position = high
        if position < stop:
            result.append((position, stop))
        return result

    def first_gap_from(self, value: int, limit: int) -> tuple[int, int] | None:
        """The first run of non-members at or after ``value``, clipped to ``limit``.

        Args:
            value: where to start looking.
            limit: exclusive upper end of the universe.

        Returns:
            ``(start, stop)`` with ``value <= start < stop <= limit``, or None
            when every integer of ``[value, limit)`` is a member.
        """
        bounds = self._bounds
        index = bisect_right(bounds, value)
        if index % 2 == 1:  # inside a run: the gap starts at its stop
            value = bounds[index]
            index += 1
        if value >= limit:
            return None
        stop = bounds[index] if index < len(bounds) else limit
        return value, min(stop, limit)


def clip_bounds(bounds: tuple[int, ...], start: int, stop: int) -> tuple[int, tuple[int, ...]]:
    """Cut flattened bounds ``(a0, b0, a1, b1, ...)`` (sorted, disjoint) to ``[start, stop)``.

    Returns:
        How many values of the bounds lie before ``start``, and the parts that
        lie inside ``[start, stop)``, flattened and relative to ``start``.
    """
    if bounds and start <= bounds[0] and bounds[-1] <= stop:  # all inside (a frame needed whole)
        return 0, tuple(bounds) if not start else tuple(bound - start for bound in bounds)
    before, inside = 0, []
    for i in range(0, len(bounds), 2):
        low, high = bounds[i], bounds[i + 1]
        if high <= start:
            before += high - low
            continue
        if low >= stop:
            break
        if low < start:
            before += start - low
        inside += (max(low, start) - start, min(high, stop) - start)
    return before, tuple(inside)



def merge_runs(runs: Iterable[PageRun]) -> tuple[PageRun, ...]:
    """Sort runs and merge those that overlap or touch."""
    if type(runs) is list and len(runs) == 1:  # one run: nothing to merge
        return (runs[0],)
    merged: list[list[int]] = []
    for run in sorted(runs, key=lambda run: (run.block, run.first)):
        last = merged[-1] if merged else None
        if last is not None and last[0] == run.block and run.first <= last[2]:
            last[2] = max(last[2], run.stop)
        else:
            merged.append([run.block, run.first, run.stop])
    # each merged run spans runs that are valid, so its block and first page are (its runs are
    # a Placed's, built on the fault path): built unchecked, unless it grew past what a run may count
    return tuple(PageRun.unchecked(block, first, stop - first) if stop - first <= MAX_RUN_PAGES
                 else PageRun(block=block, first=first, count=stop - first) for block, first, stop in merged)


def chunks(items: list[T], size: int) -> Iterator[tuple[T, ...]]:
    """Consecutive tuples of at most ``size`` items (e.g. runs per message)."""
    for start in range(0, len(items), size):
        yield tuple(items[start:start + size])
