"""Requests in flight and their time-outs.

Theory of operation
-------------------
Every run sent in a Request is remembered with the time it was sent, oldest
first, in a deque of plain ``(sent, block, first, stop)`` tuples (no message
object per request: a quiet fault's request is remembered by one append).  Nothing is removed when pages arrive: an entry is dropped
lazily when it reaches the head and none of its pages is REQUESTED any more
(one ``bytes.find`` over at most ``max_run_pages`` bytes).  So the head is
always the oldest run still waiting, and the next time-out is its send time
plus ``timeout``.  An overdue run is re-requested for exactly its pages still
REQUESTED, and goes to the back with the new time.

The deque holds one entry per run requested and not yet answered, so its
size is bounded by the in-flight page budget.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence

from aiopostcopy.core.pages import REQUESTED, PageStates
from aiopostcopy.messages import PageRun

__all__ = ["InFlight"]

_REQUESTED = frozenset({REQUESTED})


class InFlight:
    """Runs requested and not yet answered, oldest first.

    Args:
        timeout: seconds before a run is asked for again, or None for never.
    """

    __slots__ = ("timeout", "_runs")

    def __init__(self, timeout: float | None) -> None:
        self.timeout = timeout
        self._runs: deque[tuple[float, int, int, int]] = deque()

    def __len__(self) -> int:
        return len(self._runs)

    def sent(self, runs: Iterable[PageRun], now: float) -> None:
        """Remember runs sent at ``now``."""
        self._runs.extend((now, run.block, run.first, run.first + run.count) for run in runs)

    def sent_page(self, block: int, page: int, now: float) -> None:
        """Remember one page sent alone at ``now`` (a quiet fault's request)."""
        self._runs.append((now, block, page, page + 1))

    def restart(self, runs: Iterable[PageRun], now: float) -> None:
        """Forget everything; ``runs`` were (re)sent at ``now`` (after a resume)."""
        self._runs.clear()
        self.sent(runs, now)

    def due(self, states: Sequence[PageStates]) -> float | None:
        """When the oldest run still waiting times out, or None."""
        if self.timeout is None:
            return None
        runs = self._runs
        while runs and states[runs[0][1]].find(REQUESTED, runs[0][2], runs[0][3]) is None:
            runs.popleft()
        return runs[0][0] + self.timeout if runs else None

    def overdue(self, states: Sequence[PageStates], now: float) -> list[PageRun]:
        """Take the runs overdue at ``now``, cut to their pages still REQUESTED.

        The caller sends them again and passes them back with :meth:`sent`.
        """
        if self.timeout is None:
            return []
        again: list[PageRun] = []
        while self._runs and self._runs[0][0] + self.timeout <= now:
            _, block, first, stop = self._runs.popleft()
            again.extend(PageRun(block=block, first=start, count=end - start)
                         for start, end in states[block].runs(first, stop - first, _REQUESTED))
        return again
