"""Faulted pages -> batched page requests, one flush per loop pass.

Theory of operation
-------------------
During a loop pass every fault that finds its page MISSING is :meth:`added
<Coalescer.add>` (a self-served client's run with :meth:`Coalescer.add_run`).
At the end of the pass :meth:`Coalescer.flush` turns everything queued into
page runs:

1. queued intervals are sorted and merged when they overlap or touch; a merged
   interval keeps the arrival number of its oldest part, and runs go out
   oldest first, so a burst of faults in one region cannot starve another;
2. each interval is cut down to the sub-runs that are still MISSING in the
   block's :class:`~aiopostcopy.core.pages.PageStates` (pages requested,
   arriving or placed since they were queued are never asked for again) and
   split to at most ``max_run_pages``;
3. runs are taken while the in-flight budget (``max_in_flight_pages`` minus
   pages REQUESTED and not yet arrived) lasts; the rest stays queued, in
   order, for a later flush;
4. every run taken is marked REQUESTED before it is returned.

The session reports arrivals with :meth:`Coalescer.settle` so the budget
reopens.  Read-ahead (off by default) extends each fault forward by
``readahead_pages`` pages; those pages go only if MISSING, like any other.

The coalescer reads and marks pages through :class:`PageView`: the session's
:class:`~aiopostcopy.core.pages.PageStates`, or a self-served client's
:class:`~aiopostcopy.core.pager.ClientPages`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from aiopostcopy.core.pages import REQUESTED
from aiopostcopy.messages import PageRun

__all__ = ["Coalescer", "PageView"]


class PageView(Protocol):
    """The pages of one block as the coalescer needs them."""

    @property
    def pages(self) -> int:
        """Pages in the block."""

    def missing_runs(self, first: int, count: int) -> list[tuple[int, int]]:
        """The runs of ``[first, first + count)`` nobody asked for yet, in order."""

    def mark(self, first: int, count: int, state: int) -> object:
        """Mark a run (the coalescer marks REQUESTED only)."""


class Coalescer:
    """Batches faulted pages into runs for Request messages.

    Args:
        max_run_pages: longest run in one request.
        max_in_flight_pages: pages requested and not yet arrived, at most.
        readahead_pages: pages after each faulted page to ask for as well.

    Raises:
        ValueError: a bound is not positive (readahead may be 0).
    """

    __slots__ = ("max_run_pages", "max_in_flight_pages", "readahead_pages", "_queue", "_in_flight")

    def __init__(self, max_run_pages: int = 64, max_in_flight_pages: int = 4096,
                 readahead_pages: int = 0) -> None:
        if max_run_pages < 1 or max_in_flight_pages < 1 or readahead_pages < 0:
            raise ValueError("coalescer bounds must be positive (readahead may be 0)")
        self.max_run_pages = max_run_pages
        self.max_in_flight_pages = max_in_flight_pages
        self.readahead_pages = readahead_pages
        self._queue: list[tuple[int, int, int]] = []  # (block, start, stop) in arrival order
        self._in_flight = 0

    @property
    def in_flight(self) -> int:
        """Pages requested by this coalescer that have not arrived."""
        return self._in_flight

    @property
    def queued(self) -> int:
        """Entries waiting for a flush (faults, runs or leftovers)."""
        return len(self._queue)

    def add(self, block: int, page: int) -> None:
        """Queue one faulted page (plus read-ahead) for the next flush."""
        self._queue.append((block, page, page + 1 + self.readahead_pages))

    def take_page(self, block_states: PageView, page: int) -> bool:
        """Request one MISSING faulted page at once, without a flush, if nothing asks first.

        Only when the queue is empty (no earlier fault to coalesce with or to
        overtake), no read-ahead is configured and the budget has room: the page
        becomes REQUESTED and counts in flight, and True is returned (the caller
        sends it).  Otherwise nothing changes and False is returned.
        """
        if self._queue or self.readahead_pages or self._in_flight >= self.max_in_flight_pages:
            return False
        block_states.mark(page, 1, REQUESTED)
        self._in_flight += 1
        return True

    def took(self, pages: int) -> None:
        """Count ``pages`` requested at once by another hand (a client's C lane marked them)."""
        self._in_flight += pages

    def direct_budget(self) -> int:
        """Pages :meth:`take_page` would take now, one after another (0 when it takes none)."""
        if self._queue or self.readahead_pages:
            return 0
        return max(0, self.max_in_flight_pages - self._in_flight)

    def add_run(self, block: int, first: int, count: int) -> None:
        """Queue a run of pages (a self-served client's request) for the next flush."""
        self._queue.append((block, first, first + count))

    def settle(self, pages: int) -> None:
        """Report that ``pages`` REQUESTED pages arrived (their budget is free again)."""
        self._in_flight = max(0, self._in_flight - pages)

    def reset_in_flight(self, pages: int) -> None:
        """Set the in-flight count (after a resume re-counted the REQUESTED pages)."""
        self._in_flight = pages

    def flush(self, states: Sequence[PageView]) -> list[PageRun]:
        """Turn the queue into requests, marking their pages REQUESTED.

        Args:
            states: page states by block index.

        Returns:
            Runs to request, oldest fault first; none longer than
            ``max_run_pages``, together within the in-flight budget.
        """
        if not self._queue:
            return []
        budget = self.max_in_flight_pages - self._in_flight
        if budget <= 0:
            return []
        runs: list[PageRun] = []
        leftover: list[tuple[int, int, int]] = []
        for block, start, stop in _merged(self._queue) if len(self._queue) > 1 else self._queue:
            block_states = states[block]
            for low, high in block_states.missing_runs(start, min(stop, block_states.pages) - start):
                budget = self._take(block_states, block, low, high, budget, runs, leftover)
        self._queue = leftover
        return runs

    def _take(self, block_states: PageView, block: int, low: int, high: int, budget: int,
              runs: list[PageRun], leftover: list[tuple[int, int, int]]) -> int:
        while low < high and budget > 0:
            count = min(high - low, self.max_run_pages, budget)
            block_states.mark(low, count, REQUESTED)
            runs.append(PageRun(block=block, first=low, count=count))
            low += count
            budget -= count
            self._in_flight += count
        if low < high:
            leftover.append((block, low, high))
        return budget


def _merged(queue: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Merge overlapping/touching intervals; order the result by oldest arrival."""
    order = sorted(range(len(queue)), key=queue.__getitem__)
    merged: list[list[int]] = []  # [arrival, block, start, stop]
    for index in order:
        block, start, stop = queue[index]
        last = merged[-1] if merged else None
        if last is not None and last[1] == block and start <= last[3]:
            last[3] = max(last[3], stop)
            last[0] = min(last[0], index)
        else:
            merged.append([index, block, start, stop])
    merged.sort()
    return [(block, start, stop) for _, block, start, stop in merged]
