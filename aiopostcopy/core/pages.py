"""Per-page state of one RAMBlock on the destination: one byte per page.

Theory of operation
-------------------
A block's pages live in one ``bytearray`` (one byte per page: 0.025% of a
4 KiB-page block, 0.00005% of a 2 MiB-page block).  Runs of a state are found
with ``bytes.find`` over a translated mask, so every scan runs in C and no
Python object ever exists per page.  Counts per state are kept incrementally
by :meth:`PageStates.mark`, which also enforces the transition table below.

States::

    MISSING   0  not here, nobody asked
    REQUESTED 1  asked for on the urgent channel, answer not arrived
    PLACED    2  in memory: never resolved again, wakes only
    PLACING   3  data arrived, a Place/PlaceZero command is out; the loop has
                 not yet reported it done.  Exists so that two copies of a
                 page arriving close together (urgent answer + background
                 sweep) are placed once, and so no thread is woken early.

Transitions (the only ones :meth:`PageStates.mark` allows; rule and reason)::

    from       to         when
    MISSING    REQUESTED  a Request naming the page is queued
    MISSING    PLACING    data arrived that nobody asked for (sweep, or a
                          neighbour's request)
    REQUESTED  PLACING    the answer arrived
    PLACING    PLACED     the loop reports the placement (UFFDIO_COPY/ZEROPAGE)
    PLACING    MISSING    the loop reports the placement failed
    PLACED     MISSING    the source discarded the page (Discard)

Decided non-transitions:

* REQUESTED -> MISSING never happens.  A reconnect keeps REQUESTED pages and
  the Resume lists them as ``pending`` (the source re-serves them first); a
  request timeout re-sends the Request and the page stays REQUESTED; a
  Discard leaves them REQUESTED: the answer still due was either sent after
  the discard, or is followed by the Discard the source sends on its channel
  too (see :mod:`aiopostcopy.core.session`, "Discards").
* PLACED -> PLACING never happens: a placed page is never placed twice.
"""

from __future__ import annotations

from collections.abc import Sequence

from aiopostcopy.core.rangeset import RangeSet
from aiopostcopy.errors import InternalError

__all__ = ["MISSING", "REQUESTED", "PLACED", "PLACING", "STATE_NAMES", "TRANSITIONS", "PageStates", "mask_runs"]

MISSING = 0
REQUESTED = 1
PLACED = 2
PLACING = 3
STATE_NAMES = ("missing", "requested", "placed", "placing")
_STATES = range(4)

#: Rule 1, as data: target state -> the states a page may leave for it.
TRANSITIONS: dict[int, frozenset[int]] = {
    MISSING: frozenset({PLACING, PLACED}),
    REQUESTED: frozenset({MISSING}),
    PLACING: frozenset({MISSING, REQUESTED}),
    PLACED: frozenset({PLACING}),
}

#: ``mark``'s answer for one page that was in state ``i`` (the hottest case: a fault's page)
_ONE_IN = tuple(tuple(int(state == head) for state in _STATES) for head in _STATES)

_FILL_PAGES = 1 << 16
_SCAN_PAGES = 1 << 22  #: pages per scan window: 4 MiB of scratch at most
_FILL_VIEWS = tuple(memoryview(bytes([state]) * _FILL_PAGES) for state in _STATES)
_MASKS: dict[frozenset[int], bytes] = {}


def mask_runs(mask: bytes | bytearray, base: int) -> list[tuple[int, int]]:
    """Runs of 1 bytes in ``mask``, as ``(start, stop)`` offset by ``base`` (all scanning in C)."""
    result = []
    position = mask.find(1)
    while position >= 0:
        end = mask.find(0, position)
        if end < 0:
            end = len(mask)
        result.append((base + position, base + end))
        position = mask.find(1, end)
    return result


def _mask_table(wanted: frozenset[int]) -> bytes:
    """A ``bytes.translate`` table mapping wanted states to 1, others to 0."""
    table = _MASKS.get(wanted)
    if table is None:
        table = _MASKS[wanted] = bytes(1 if value in wanted else 0 for value in range(256))
    return table


class PageStates:
    """State of every page of one block (see the module's transition table).

    Args:
        pages: number of pages in the block.
        page_size: bytes per page (kept for callers' arithmetic).
    """

    __slots__ = ("_states", "_counts", "pages", "page_size")

    def __init__(self, pages: int, page_size: int = 4096) -> None:
        self.pages = pages
        self.page_size = page_size
        self._states = bytearray(pages)
        self._counts = [pages, 0, 0, 0]

    def __getitem__(self, page: int) -> int:
        """State of one page."""
        return self._states[page]

    @property
    def buffer(self) -> bytearray:
        """The state bytes themselves, one per page (never resized), for readers in C."""
        return self._states

    def count(self, state: int) -> int:
        """Number of pages in ``state`` (kept incrementally, O(1))."""
        return self._counts[state]

    @property
    def complete(self) -> bool:
        """Every page is placed."""
        return self._counts[PLACED] == self.pages

    def memory_bytes(self) -> int:
        """Bytes of bookkeeping held (the state array)."""
        return self._states.__sizeof__()

    def mark(self, first: int, count: int, state: int) -> Sequence[int]:
        """Move pages ``[first, first + count)`` to ``state``.

        Args:
            first: first page.
            count: number of pages (> 0).
            state: the target state.

        Returns:
            How many of the pages were in each state before, indexed by state.

        Raises:
            InternalError: the run is out of range, or a page is in a state
                that may not move to ``state`` (a bug in the caller).
        """
        stop = first + count
        if not 0 <= first < stop <= self.pages:
            raise InternalError(f"page run [{first}, {stop}) outside block of {self.pages} pages")
        if count == 1:  # the hottest path: one faulted page, requested, placing, placed
            states = self._states
            head = states[first]
            if head not in TRANSITIONS[state]:
                self._check(first, stop, _ONE_IN[head], state)
            states[first] = state
            counts = self._counts
            counts[head] -= 1
            counts[state] += 1
            return _ONE_IN[head]
        # Hot path (every arrival of a run): one C count for a run in one state.
        segment = self._states[first:stop]
        before = [0, 0, 0, 0]
        head = segment[0]
        if segment.count(head) == count:
            before[head] = count
            if head not in TRANSITIONS[state]:
                self._check(first, stop, before, state)
        else:
            before[:3] = segment.count(0), segment.count(1), segment.count(2)
            before[3] = count - before[0] - before[1] - before[2]
            self._check(first, stop, before, state)
        if count <= _FILL_PAGES:
            self._states[first:stop] = _FILL_VIEWS[state][:count]
        else:
            self._states[first:stop] = bytes([state]) * count
        counts = self._counts
        for source in (head,) if before[head] == count else _STATES:
            counts[source] -= before[source]
        counts[state] += count
        return before

    def place_requested(self, page: int) -> bool:
        """Move one REQUESTED page to PLACED, through PLACING, in one step: its answer arrived and
        was placed at once (the reply lane's placement, once per fault).

        Returns:
            False, with nothing changed, when the page is not REQUESTED (or out of range).
        """
        if not 0 <= page < self.pages or self._states[page] != REQUESTED:
            return False
        self._states[page] = PLACED
        counts = self._counts
        counts[REQUESTED] -= 1
        counts[PLACED] += 1
        return True

    @staticmethod
    def _check(first: int, stop: int, before: Sequence[int], state: int) -> None:
        allowed = TRANSITIONS[state]
        for source in _STATES:
            if before[source] and source not in allowed:
                raise InternalError(f"pages [{first}, {stop}): {before[source]} are "
                                    f"{STATE_NAMES[source]}, cannot become {STATE_NAMES[state]}")

    def runs(self, first: int, count: int, wanted: frozenset[int]) -> list[tuple[int, int]]:
        """Maximal sub-runs of ``[first, first + count)`` whose pages are in ``wanted``.

        Args:
            first: first page.
            count: number of pages.
            wanted: the states to look for.

        Returns:
            ``(start, stop)`` half-open page runs, in order.
        """
        stop = min(first + count, self.pages)
        if stop - first == 1:  # a single fault: no mask needed
            return [(first, stop)] if self._states[first] in wanted else []
        result: list[tuple[int, int]] = []
        table = _mask_table(wanted)
        for low in range(first, stop, _SCAN_PAGES):  # bounded scratch memory on huge blocks
            high = min(low + _SCAN_PAGES, stop)
            for start, end in mask_runs(self._states[low:high].translate(table), low):
                if result and result[-1][1] == start:
                    start = result.pop()[0]
                result.append((start, end))
        return result

    def missing_runs(self, first: int, count: int) -> list[tuple[int, int]]:
        """Sub-runs of ``[first, first + count)`` that are MISSING."""
        return self.runs(first, count, _ONLY_MISSING)

    def find(self, state: int, start: int = 0, stop: int | None = None) -> int | None:
        """The first page in ``state`` within ``[start, stop)``, or None."""
        index = self._states.find(state, start, self.pages if stop is None else stop)
        return None if index < 0 else index

    def next_missing(self, from_page: int = 0) -> int | None:
        """The first MISSING page at or after ``from_page``, or None."""
        return self.find(MISSING, from_page)

    def all_in(self, first: int, count: int, state: int) -> bool:
        """True when every page of the run is in ``state``."""
        return self._states.count(state, first, first + count) == count

    def placed_set(self, *, including_placing: bool = False) -> RangeSet:
        """The PLACED pages as a :class:`RangeSet` (for a Resume).

        Args:
            including_placing: also count pages whose placement is under way
                (their data has arrived; the source need not send them again).
        """
        wanted = _PLACED_OR_PLACING if including_placing else _ONLY_PLACED
        return RangeSet.from_bounds(bound for run in self.runs(0, self.pages, wanted) for bound in run)


_ONLY_MISSING = frozenset({MISSING})
_ONLY_PLACED = frozenset({PLACED})
_PLACED_OR_PLACING = frozenset({PLACED, PLACING})
