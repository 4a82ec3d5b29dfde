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
* per block, one byte per page (:class:`ClientPages`), as the service keeps
  its page states: *queued* in this pass, *requested* and not yet placed,
  known *placed*, or none of these; every step of a fault is O(1), however
  many pages came before (a byte per 4 KiB page is 0.025% of the memory);
* the service's :class:`~aiopostcopy.core.coalesce.Coalescer`, which turns
  the faults queued during a pass into merged, oldest-first runs and marks
  them requested (:class:`ClientPages` gives it the page-state view it needs).
  The usual read, a few faults on pages nobody asked for yet, skips the
  merging: :meth:`Pager.take_pages` hands its pages over as they are, for one
  ClientRequest the client encodes itself.

The client does those usual steps in C when it can
(:mod:`aiopostcopy.transport.client_lane`): while nothing is queued here
(:meth:`Pager.lane_ready`), the lane steps the same state bytes
(:attr:`Pager.states`) for a read's faults and for the Placed frames it takes,
counts what it did, and tells the pager what its in-flight count and
per-thread tally need (:meth:`Pager.lane_took`, :meth:`Pager.lane_settled`).

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
from aiopostcopy.core.pages import REQUESTED, mask_runs
from aiopostcopy.core.ramblock import MappingTable
from aiopostcopy.core.rangeset import chunks
from aiopostcopy.errors import InternalError, MappingTableError

__all__ = ["ASKED", "KNOWN_PLACED", "NONE", "QUEUED", "ClientPages", "Pager"]

#: A client asks for what it faulted on: no budget of its own (the service has one).
_UNBOUNDED = 1 << 46
_STATS = ("faults", "woken_at_once", "joined", "requested_pages", "requests", "placed_pages", "wakes")

#: A page as a self-served client knows it (one byte of :attr:`ClientPages.states`).
NONE, QUEUED, ASKED, KNOWN_PLACED = 0, 1, 2, 3
_MISSING_MASK = bytes(1 if value in (NONE, QUEUED) else 0 for value in range(256))  # neither asked nor placed
_FILL = {state: bytes([state]) for state in (ASKED, KNOWN_PLACED)}


class ClientPages:
    """One block as a self-served client knows it: one byte per page (:data:`NONE`,
    :data:`QUEUED` in this pass, :data:`ASKED` for and not yet placed, :data:`KNOWN_PLACED`).

    The :class:`~aiopostcopy.core.coalesce.PageView` the coalescer needs
    (``pages``, ``missing_runs``, ``mark``), where *missing* means neither
    asked for nor known placed.

    Args:
        pages: pages in the block.
    """

    __slots__ = ("pages", "states")

    def __init__(self, pages: int) -> None:
        self.pages = pages
        self.states = bytearray(pages)

    def missing_runs(self, first: int, count: int) -> list[tuple[int, int]]:
        """The runs of ``[first, first + count)`` neither asked for nor placed, in order."""
        return mask_runs(self.states[first:first + count].translate(_MISSING_MASK), first)

    def mark(self, first: int, count: int, state: int) -> None:
        """The coalescer requests ``count`` pages from ``first``.

        Raises:
            InternalError: a state other than REQUESTED (a client places nothing).
        """
        if state != REQUESTED:
            raise InternalError(f"a self-served client only marks pages requested, not {state}")
        self.states[first:first + count] = _FILL[ASKED] * count


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
        self._blocks = [ClientPages(block.pages) for block in table.blocks]
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
        states = self._blocks[block].states
        state = states[page]
        if state == KNOWN_PLACED:  # forgotten: a later fault on it (the page dropped since) asks again
            states[page] = NONE
            count["woken_at_once"] += 1
            count["wakes"] += 1
            size = self.table.blocks[block].page_size
            return address - address % size, size
        if state:  # queued or asked for: the Placed that answers wakes it too
            count["joined"] += 1
        else:
            states[page] = QUEUED
            self._queued.append((block, page))
        return None

    @property
    def states(self) -> list[bytearray]:
        """Each block's state byte per page, for a C lane that steps them (never resized)."""
        return [block.states for block in self._blocks]

    def lane_ready(self) -> bool:
        """Every fault read now would be asked for at once (nothing is queued here): a C lane may
        take the faults of a read (:meth:`fault` and :meth:`take_pages` in one step)."""
        return not self._queued and not self._coalescer.queued

    def lane_took(self, asked: int, thread_ids: Iterable[int]) -> None:
        """A C lane took faults of these threads and made ``asked`` pages ASKED (it counts the rest)."""
        if asked:
            self._coalescer.took(asked)
        threads = self.threads
        for thread_id in thread_ids:
            threads[thread_id] = threads.get(thread_id, 0) + 1

    def lane_settled(self, pages: int) -> None:
        """A C lane marked placed runs in which ``pages`` were ASKED (it counts the rest)."""
        if pages:
            self._coalescer.settle(pages)

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
            if blocks[block].states[page] != QUEUED:  # placed since it was queued
                return None
        self._queued = []
        for block, page in queued:
            self._coalescer.take_page(blocks[block], page)
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
        for block, page in queued:  # every queued page was taken, unless placed meanwhile
            states = self._blocks[block].states
            if states[page] == QUEUED:
                states[page] = NONE
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
            states = self._blocks[index].states
            if count == 1:  # the usual answer: the page of one fault
                if states[first] == ASKED:
                    self._coalescer.settle(1)
                states[first] = KNOWN_PLACED
            else:
                stop = first + count
                self._coalescer.settle(states.count(ASKED, first, stop))
                states[first:stop] = _FILL[KNOWN_PLACED] * count
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
