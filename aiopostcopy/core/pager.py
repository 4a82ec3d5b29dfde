"""A self-served client's page bookkeeping: faults in; page runs to ask for and ranges to wake out.

Theory of operation
-------------------
A self-served client (see :mod:`aiopostcopy.client`) reads its own
userfaultfd, asks the service for ``(block, page)`` runs and wakes its own
threads when told the pages are placed.  :class:`Pager` is the I/O-free half
of that, built from the pieces the service's session uses:

* :meth:`MappingTable.translate <aiopostcopy.core.ramblock.MappingTable.translate>`
  turns a fault address into ``(block, page)``, and
  :meth:`MappingTable.ranges <aiopostcopy.core.ramblock.MappingTable.ranges>`
  turns a placed run back into address ranges to wake;
* per block, three :class:`~aiopostcopy.core.rangeset.RangeSet`: pages
  *queued* in this pass, pages *requested* and not yet placed, and pages
  known *placed*; memory is per run, never per page;
* the service's :class:`~aiopostcopy.core.coalesce.Coalescer`, which turns
  the faults queued during a pass into merged, oldest-first runs and marks
  them requested (:class:`BlockRuns` gives it the page-state view it needs).
  The usual read, a few faults on pages nobody asked for yet, skips the
  merging: :meth:`Pager.take_pages` hands its pages over as they are, for one
  ClientRequest the client encodes itself.

A fault on a page known placed is woken at once (the fault raced the
Placed message) and the page is forgotten, so a later fault on it (the page
was dropped since) asks again.  A fault on a page already queued or
requested joins it: the Placed that answers wakes every thread on it.
Faults are counted per thread id (a bounded set: the client's threads).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from aiopostcopy import messages as m
from aiopostcopy.core.coalesce import Coalescer
from aiopostcopy.core.pages import REQUESTED
from aiopostcopy.core.ramblock import MappingTable
from aiopostcopy.core.rangeset import RangeSet, chunks
from aiopostcopy.errors import InternalError, MappingTableError

__all__ = ["BlockRuns", "Pager"]

#: A client asks for what it faulted on: no budget of its own (the service has one).
_UNBOUNDED = 1 << 46
_STATS = ("faults", "woken_at_once", "joined", "requested_pages", "requests", "placed_pages", "wakes")


class BlockRuns:
    """One block as a self-served client knows it: requested and placed pages, as runs.

    The :class:`~aiopostcopy.core.coalesce.PageView` the coalescer needs
    (``pages``, ``missing_runs``, ``mark``), where *missing* means
    neither requested nor known placed.

    Args:
        pages: pages in the block.
    """

    __slots__ = ("pages", "queued", "requested", "placed")

    def __init__(self, pages: int) -> None:
        self.pages = pages
        self.queued = RangeSet()
        self.requested = RangeSet()
        self.placed = RangeSet()

    def missing_runs(self, first: int, count: int) -> list[tuple[int, int]]:
        """The runs of ``[first, first + count)`` neither requested nor placed, in order."""
        return [gap for low, high in self.requested.gaps(first, first + count)
                for gap in self.placed.gaps(low, high)]

    def mark(self, first: int, count: int, state: int) -> None:
        """The coalescer requests ``count`` pages from ``first``.

        Raises:
            InternalError: a state other than REQUESTED (a client places nothing).
        """
        if state != REQUESTED:
            raise InternalError(f"a self-served client only marks pages requested, not {state}")
        self.requested.add(first, first + count)


class Pager:
    """Self-served bookkeeping of one client (see the module docstring).

    Args:
        table: where this process maps the blocks (each block mapped whole, once).
        max_run_pages: longest run in one ClientRequest.
    """

    __slots__ = ("table", "threads", "_blocks", "_coalescer", "_queued", "_count")

    def __init__(self, table: MappingTable, *, max_run_pages: int = 1 << 16) -> None:
        self.table = table
        self.threads: dict[int, int] = {}  #: faults per faulting thread id
        self._blocks = [BlockRuns(block.pages) for block in table.blocks]
        self._coalescer = Coalescer(max_run_pages, _UNBOUNDED)
        self._queued: list[tuple[int, int]] = []  # (block, page) queued since the last requests(), in order
        self._count = dict.fromkeys(_STATS, 0)

    def fault(self, address: int, thread_id: int) -> tuple[int, int] | None:
        """Account one fault.

        Returns:
            The ``(address, length)`` to wake now (the page is known placed),
            or None: the page is queued or requested, and a Placed will wake it.

        Raises:
            MappingTableError: the address is outside every mapping of ours.
        """
        count = self._count
        count["faults"] += 1
        self.threads[thread_id] = self.threads.get(thread_id, 0) + 1
        where = self.table.translate(address)
        if where is None:
            raise MappingTableError(f"fault at {address:#x} is outside every registered mapping")
        block, page = where
        runs = self._blocks[block]
        if page in runs.placed:
            runs.placed.subtract(page, page + 1)
            count["woken_at_once"] += 1
            count["wakes"] += 1
            size = self.table.blocks[block].page_size
            return address - address % size, size
        if page in runs.requested or page in runs.queued:
            count["joined"] += 1
        else:
            runs.queued.add(page, page + 1)
            self._queued.append((block, page))
        return None

    def take_pages(self) -> list[tuple[int, int]] | None:
        """The usual read's pages, each asked for alone: when every page queued since the last
        call can be requested at once (nothing left queued in the coalescer, at most
        ``LIMITS.max_runs`` of them), they become requested and are returned as ``(block, page)``
        in the order faulted, for one ClientRequest the caller encodes itself
        (:func:`~aiopostcopy.transport.wire.encode_client_request` joins neighbours into runs);
        the same bookkeeping as :meth:`requests`.  None, with nothing changed: :meth:`requests`
        takes them."""
        queued = self._queued
        if not queued or len(queued) > m.LIMITS.max_runs or self._coalescer.direct_budget() < len(queued):
            return None
        blocks = self._blocks
        for block, page in queued:
            runs = blocks[block]
            if page in runs.requested or page in runs.placed:  # placed or asked since it was queued
                return None
        self._queued = []
        for block, page in queued:
            runs = blocks[block]
            runs.queued = RangeSet()
            self._coalescer.take_page(runs, page)
        self._count["requested_pages"] += len(queued)
        self._count["requests"] += 1
        return queued

    def requests(self) -> list[m.ClientRequest]:
        """The pages queued since the last call, as ClientRequest messages (from now on requested),
        merged by the coalescer (the usual read's pages, each asked for alone, are
        :meth:`take_pages`'s)."""
        queued, self._queued = self._queued, []
        if not queued:
            return []
        for block, page in queued:
            self._coalescer.add(block, page)
        runs = self._coalescer.flush(self._blocks)
        for block in {block for block, _ in queued}:
            self._blocks[block].queued = RangeSet()
        self._count["requested_pages"] += sum(run.count for run in runs)
        messages = [m.ClientRequest(runs=chunk) for chunk in chunks(runs, m.LIMITS.max_runs)]
        self._count["requests"] += len(messages)
        return messages

    def placed(self, runs: Iterable[m.PageRun]) -> list[tuple[int, int]]:
        """The service placed these runs: mark them, and return our ``(address, length)`` ranges to wake.

        Raises:
            RemoteProtocolError: a run lies outside the blocks.
        """
        return self.placed_runs([(run.block, run.first, run.count) for run in runs])

    def placed_runs(self, runs: Sequence[tuple[int, int, int]]) -> list[tuple[int, int]]:
        """:meth:`placed` of runs as ``(block, first, count)``, as a Placed frame carries them
        (taken from the wire with no message built).

        Raises:
            RemoteProtocolError: a run lies outside the blocks.
        """
        check = self.table.blocks.check_run
        for block, first, count in runs:
            check(block, first, count)
        ranges: list[tuple[int, int]] = []
        placed = 0
        for index, first, count in runs:
            block, stop = self._blocks[index], first + count
            if count == 1:  # the usual answer: the page of one fault
                if first in block.requested:
                    self._coalescer.settle(1)
                    block.requested.subtract(first, stop)
            else:
                self._coalescer.settle(sum(high - low for low, high in block.requested.intersection(first, stop)))
                block.requested.subtract(first, stop)
            block.placed.add(first, stop)
            placed += count
            ranges += self.table.ranges(index, first, count)
        self._count["placed_pages"] += placed
        self._count["wakes"] += len(ranges)
        return ranges

    def wake_all(self) -> list[tuple[int, int]]:
        """Every mapping as ``(address, length)``: all pages are in, nobody may stay asleep."""
        ranges = [(address, length) for address, length, _, _ in self.table.entries]
        self._count["wakes"] += len(ranges)
        return ranges

    def statistics(self) -> dict[str, int]:
        """Faults by outcome, pages requested and placed, ClientRequests sent, wakes issued."""
        return dict(self._count)
