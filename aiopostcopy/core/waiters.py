"""Who waits for which page: faulting threads of delegated fds, and self-served runs.

Theory of operation
-------------------
A :class:`Waiter` is one fault read from one userfaultfd: a blocked thread.
There is one per fault, never one per page of a run, so the memory held is
bounded by the number of blocked threads, not by the memory migrated.

:class:`Waiters` keeps, per block, a list of waiters sorted by page and a
parallel list of their pages.  ``take(block, first, count)`` bisects both
ends of the run and cuts the slice out: the cost is in the waiters found,
never in the pages of the run, so placing a 2 MiB run that nobody waits for
costs two bisections.  Several faults on one page (threads of one process, or
clients sharing the page) are all kept; :meth:`Waiters.wake_ranges` merges
what was taken into one wake range list per fd so that every waiter is woken
exactly once and every fd gets each range once.

:class:`RunWaiters` is the same idea for self-served clients, which ask by
``(block, first, count)`` run: entries are runs sorted by start; taking a
placed run returns the overlapping pieces and keeps the remainders.  A bound
on the longest entry keeps the bisection window tight.  A one-page wait (a
fault, the usual entry) is kept apart, in a dict per block by page: adding
and taking one costs a dict operation, and taking a run looks at no more of
them than the run has pages or the block has one-page waits.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Hashable, Iterable, Sequence
from typing import NamedTuple

__all__ = ["Waiter", "Waiters", "RunWaiters", "RunPiece"]


class Waiter(NamedTuple):
    """One blocked fault.

    Attributes:
        key: the fd's key (whatever the loop uses to name the userfaultfd).
        block: block index.
        page: page within the block.
        address: page-aligned address of that page in the fd's address space.
        thread_id: the faulting thread (0 when the kernel did not say).
        since: ``now`` when the fault was seen.
    """

    key: Hashable
    block: int
    page: int
    address: int
    thread_id: int
    since: float


class Waiters:
    """Faults waiting for pages, per block, sorted by page.

    Args:
        page_sizes: page size of each block, by block index.
    """

    __slots__ = ("_page_sizes", "_pages", "_items", "_count")

    def __init__(self, page_sizes: Sequence[int]) -> None:
        self._page_sizes = tuple(page_sizes)
        self._pages: list[list[int]] = [[] for _ in self._page_sizes]
        self._items: list[list[Waiter]] = [[] for _ in self._page_sizes]
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, waiter: Waiter) -> bool:
        """Record a fault.

        Returns:
            True when the page already had a waiter (the fault joins it).
        """
        pages = self._pages[waiter.block]
        index = bisect_right(pages, waiter.page)
        joined = index > 0 and pages[index - 1] == waiter.page
        pages.insert(index, waiter.page)
        self._items[waiter.block].insert(index, waiter)
        self._count += 1
        return joined

    def has(self, block: int, first: int, count: int) -> bool:
        """True when a page of the run has a waiter."""
        pages = self._pages[block]
        index = bisect_left(pages, first)
        return index < len(pages) and pages[index] < first + count

    def pages(self, block: int, first: int, count: int) -> list[int]:
        """The distinct pages of a run that have waiters, in order."""
        pages = self._pages[block]
        return sorted(set(pages[bisect_left(pages, first):bisect_left(pages, first + count)]))

    def peek(self, block: int, first: int, count: int) -> list[Waiter]:
        """Every waiter on a page of the run, left in place."""
        pages = self._pages[block]
        low = bisect_left(pages, first)
        high = bisect_left(pages, first + count, low)
        return self._items[block][low:high] if low < high else []

    def take(self, block: int, first: int, count: int) -> list[Waiter]:
        """Remove and return every waiter on a page of the run."""
        pages = self._pages[block]
        low = bisect_left(pages, first)
        high = bisect_left(pages, first + count, low)
        if low == high:
            return []
        items = self._items[block]
        taken = items[low:high]
        del pages[low:high]
        del items[low:high]
        self._count -= len(taken)
        return taken

    def drop_fd(self, key: Hashable) -> list[Waiter]:
        """Remove and return every waiter of one fd (the fd is being retired)."""
        dropped = []
        for block, items in enumerate(self._items):
            if any(item.key == key for item in items):
                dropped.extend(item for item in items if item.key == key)
                kept = [item for item in items if item.key != key]
                self._items[block] = kept
                self._pages[block] = [item.page for item in kept]
        self._count -= len(dropped)
        return dropped

    def all(self) -> Iterable[Waiter]:
        """Every waiter (for live statistics)."""
        for items in self._items:
            yield from items

    def wake_ranges(self, waiters: Iterable[Waiter]) -> dict[Hashable, list[tuple[int, int]]]:
        """Merge waiters into wake ranges, per fd.

        Args:
            waiters: waiters taken together (e.g. by one placement).

        Returns:
            ``{key: [(start, length), ...]}``: per fd, sorted, each page once,
            adjacent pages merged into one range.
        """
        per_key: dict[Hashable, set[tuple[int, int]]] = {}
        sizes = self._page_sizes
        for waiter in waiters:
            per_key.setdefault(waiter.key, set()).add((waiter.address, sizes[waiter.block]))
        return {key: _merge(sorted(pieces)) for key, pieces in per_key.items()}


def _merge(pieces: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, length in pieces:
        if merged and merged[-1][0] + merged[-1][1] >= start:
            end = max(merged[-1][0] + merged[-1][1], start + length)
            merged[-1] = (merged[-1][0], end - merged[-1][0])
        else:
            merged.append((start, length))
    return merged


class RunPiece(NamedTuple):
    """A piece of a self-served client's wait: pages ``[start, stop)`` of ``block``."""

    key: Hashable
    block: int
    start: int
    stop: int
    since: float


class RunWaiters:
    """Self-served clients' waits, kept as runs per block sorted by start.

    Args:
        blocks: number of blocks.
    """

    __slots__ = ("_starts", "_entries", "_longest", "_pages", "_count")

    def __init__(self, blocks: int) -> None:
        self._starts: list[list[int]] = [[] for _ in range(blocks)]
        self._entries: list[list[RunPiece]] = [[] for _ in range(blocks)]
        self._longest = [0] * blocks
        self._pages: list[dict[int, list[RunPiece]]] = [{} for _ in range(blocks)]  # one-page waits, by page
        self._count = 0

    def __len__(self) -> int:
        """Number of run entries held."""
        return self._count

    def add(self, piece: RunPiece) -> None:
        """Record that ``piece.key`` waits for pages ``[start, stop)`` of ``block``."""
        if piece.stop - piece.start == 1:
            waiting = self._pages[piece.block].get(piece.start)
            if waiting is None:
                self._pages[piece.block][piece.start] = [piece]
            else:
                waiting.append(piece)
            self._count += 1
            return
        starts = self._starts[piece.block]
        index = bisect_right(starts, piece.start)
        starts.insert(index, piece.start)
        self._entries[piece.block].insert(index, piece)
        self._longest[piece.block] = max(self._longest[piece.block], piece.stop - piece.start)
        self._count += 1

    def _window(self, block: int, first: int, stop: int) -> tuple[int, int]:
        starts = self._starts[block]
        low = bisect_right(starts, first - self._longest[block])
        return low, bisect_left(starts, stop, low)

    def take(self, block: int, first: int, count: int) -> list[RunPiece]:
        """Remove and return the parts of every wait that fall in the run."""
        taken = self._take_pages(block, first, count) if self._pages[block] else []
        if not self._starts[block]:
            return taken
        pieces = self._take_runs(block, first, count)
        return taken + pieces if taken else pieces

    def _take_pages(self, block: int, first: int, count: int) -> list[RunPiece]:
        pages = self._pages[block]
        if count == 1:  # a one-page answer: the usual fault's
            taken = pages.pop(first, None)
            if taken is None:
                return []
        else:
            stop = first + count
            found = ([page for page in pages if first <= page < stop] if len(pages) < count
                     else [page for page in range(first, stop) if page in pages])
            taken = [piece for page in sorted(found) for piece in pages.pop(page)]
        self._count -= len(taken)
        return taken

    def _take_runs(self, block: int, first: int, count: int) -> list[RunPiece]:
        stop = first + count
        low, high = self._window(block, first, stop)
        entries = self._entries[block]
        window = entries[low:high]
        if all(first <= entry.start and entry.stop <= stop for entry in window):  # whole waits answered
            del entries[low:high]
            del self._starts[block][low:high]
            self._count -= len(window)
            return window
        if not any(entry.stop > first for entry in window):
            return []
        kept, taken = [], []
        for entry in window:
            if entry.stop <= first:
                kept.append(entry)
                continue
            taken.append(entry._replace(start=max(entry.start, first), stop=min(entry.stop, stop)))
            if entry.start < first:
                kept.append(entry._replace(stop=first))
            if entry.stop > stop:
                kept.append(entry._replace(start=stop))
        kept.sort(key=lambda entry: entry.start)
        self._entries[block][low:high] = kept
        self._starts[block][low:high] = [entry.start for entry in kept]
        self._count += len(kept) - len(window)
        return taken

    def drop_key(self, key: Hashable) -> int:
        """Forget every wait of one client; returns how many entries went."""
        dropped = 0
        for pages in self._pages:
            for page, waiting in list(pages.items()):
                kept = [piece for piece in waiting if piece.key != key]
                dropped += len(waiting) - len(kept)
                if kept:
                    pages[page] = kept
                else:
                    del pages[page]
        for block, entries in enumerate(self._entries):
            kept = [entry for entry in entries if entry.key != key]
            dropped += len(entries) - len(kept)
            self._entries[block] = kept
            self._starts[block] = [entry.start for entry in kept]
        self._count -= dropped
        return dropped

    def all(self) -> Iterable[RunPiece]:
        """Every wait entry (for live statistics)."""
        for entries in self._entries:
            yield from entries
        for pages in self._pages:
            for waiting in pages.values():
                yield from waiting
