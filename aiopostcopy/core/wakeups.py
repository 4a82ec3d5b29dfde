"""Who waits for pages, and how they are woken: the fds and self-served clients a destination serves.

Theory of operation
-------------------
:class:`Wakeups` owns the registry of fault sources of one session:

* *delegated* fds (the service's own userfaultfd and every client fd handed
  over), each with its :class:`~aiopostcopy.core.ramblock.MappingTable`; a
  fault becomes a :class:`~aiopostcopy.core.waiters.Waiter` holding the page's
  address in that fd's space;
* *self-served* clients, which ask by page run and are told by
  :class:`~aiopostcopy.core.commands.NotifyPlaced`.

:meth:`Wakeups.release` turns a placed run into commands: the run's waiters
are taken (each exactly once), merged into one Wake range list per fd, and
the self-served pieces into one NotifyPlaced per client.  Waking the fd that
UFFDIO_COPY placed through is left to the copy, unless the copy found pages
already there (``force``): the kernel wakes nobody on EEXIST.

Retiring an fd drops its waiters without waking them: the fd is going away
and the loop closes it only after this.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Iterable, Sequence

from aiopostcopy import messages as m
from aiopostcopy.core.commands import Command, NotifyPlaced, Wake
from aiopostcopy.core.pages import MISSING, PLACED, PLACING, REQUESTED, PageStates
from aiopostcopy.core.ramblock import BlockTable, MappingTable
from aiopostcopy.core.rangeset import chunks, merge_runs
from aiopostcopy.core.stats import Counters
from aiopostcopy.core.waiters import RunPiece, RunWaiters, Waiter, Waiters
from aiopostcopy.errors import LocalProtocolError

__all__ = ["Wakeups", "merge_notifications", "notify_commands"]

_NOT_PLACED = frozenset({MISSING, REQUESTED, PLACING})
_PLACED = frozenset({PLACED})
#: ``Waiter(...)`` without the generated ``__new__`` (half its cost, once per fault)
_new_waiter = tuple.__new__


@dataclasses.dataclass(slots=True)
class _Fd:
    table: MappingTable | None  # None: a self-served client
    woken_by_copy: bool = False


class Wakeups:
    """Registered fds/clients, who of them waits for which page, and the commands that wake them.

    Args:
        blocks: the session's blocks.
        counters: where fault, wake and blocked-time figures go.
    """

    __slots__ = ("blocks", "_page_sizes", "_fds", "_waiters", "_runs", "_count")

    def __init__(self, blocks: BlockTable, counters: Counters) -> None:
        self.blocks = blocks
        self._page_sizes = blocks.page_sizes
        self._fds: dict[Hashable, _Fd] = {}
        self._waiters = Waiters(blocks.page_sizes)
        self._runs = RunWaiters(len(blocks))
        self._count = counters

    def __len__(self) -> int:
        """Waiters (blocked faults) held."""
        return len(self._waiters)

    def waiting(self) -> Iterable[Waiter]:
        """Every blocked fault."""
        return self._waiters.all()

    def add_fd(self, key: Hashable, table: MappingTable | None, woken_by_copy: bool) -> None:
        """Register a delegated fd (``table`` set) or a self-served client (None).

        Raises:
            LocalProtocolError: the key is in use, or the table was built over other blocks.
        """
        if key in self._fds:
            raise LocalProtocolError(f"fd key {key!r} is already registered")
        if table is not None and table.blocks != self.blocks:
            raise LocalProtocolError("mapping table built over other blocks than the session's")
        self._fds[key] = _Fd(table, woken_by_copy)

    def table_of(self, key: Hashable) -> MappingTable | None:
        """The mapping table of delegated fd ``key``; None for a self-served client or an unknown key."""
        fd = self._fds.get(key)
        return None if fd is None else fd.table

    def retire(self, key: Hashable, now: float) -> bool:
        """Forget ``key``; its waiters are dropped unwoken. Returns False if unknown."""
        if self._fds.pop(key, None) is None:
            return False
        for waiter in self._waiters.drop_fd(key):
            self._count.blocked(waiter, now)
            self._count.waiters_dropped += 1
        self._runs.drop_key(key)
        return True

    def fault(self, key: Hashable, address: int, thread_id: int, now: float) -> tuple[Waiter, bool] | None:
        """Translate, count and record a fault (the waiter is recorded before anything else).

        Returns:
            ``(waiter, joined)`` (joined: the page already had a waiter), or
            None when no mapping covers the address.

        Raises:
            LocalProtocolError: ``key`` is not a registered delegated fd.
        """
        fd = self._fds.get(key)
        if fd is None or fd.table is None:
            raise LocalProtocolError(f"fault on unknown fd key {key!r}")
        where = fd.table.translate(address)
        if where is None:
            self._count.bad_faults += 1
            return None
        block, page = where
        self._count.fault(block, key)
        address -= address % self._page_sizes[block]
        waiter = _new_waiter(Waiter, (key, block, page, address, thread_id, now))
        return waiter, self._waiters.add(waiter)

    def check_self_served(self, key: Hashable) -> None:
        """Raises LocalProtocolError unless ``key`` is a self-served client."""
        fd = self._fds.get(key)
        if fd is None or fd.table is not None:
            raise LocalProtocolError(f"client request from unknown self-served key {key!r}")

    def wait_runs(self, key: Hashable, runs: Sequence[m.PageRun], states: Sequence[PageStates],
                  now: float) -> list[Command]:
        """Self-served ``key`` needs ``runs``: record waits for the pages not placed.

        Returns:
            NotifyPlaced commands for the parts of ``runs`` already placed.

        Raises:
            LocalProtocolError: ``key`` is not a self-served client (nothing recorded).
        """
        self.check_self_served(key)
        self._count.client_requests += len(runs)
        ready = []
        for run in runs:
            block_states = states[run.block]
            for start, stop in block_states.runs(run.first, run.count, _NOT_PLACED):
                self._runs.add(RunPiece(key, run.block, start, stop, now))
            ready.extend(m.PageRun(block=run.block, first=start, count=stop - start)
                         for start, stop in block_states.runs(run.first, run.count, _PLACED))
        return notify_commands(key, ready) if ready else []

    def wait_run(self, key: Hashable, block: int, first: int, count: int, states: Sequence[PageStates],
                 now: float) -> list[Command]:
        """:meth:`wait_runs` of one run (a self-served client's fault), without building messages
        for the usual one: a page not placed yet.

        Raises:
            LocalProtocolError: ``key`` is not a self-served client (nothing recorded).
        """
        if count != 1 or states[block][first] == PLACED:
            return self.wait_runs(key, (m.PageRun(block=block, first=first, count=count),), states, now)
        self.check_self_served(key)
        self.wait_page(key, block, first, now)
        return []

    def wait_page(self, key: Hashable, block: int, page: int, now: float) -> None:
        """:meth:`wait_run` of one page not placed, by a key known to be a self-served client's."""
        self._count.client_requests += 1
        self._runs.add(RunPiece(key, block, page, page + 1, now))

    def plan(self, block: int, first: int, count: int) -> tuple[tuple[Hashable, int, int], ...]:
        """The wakes a placement of the run will need, ``(key, start, length)``, waiters left in place.

        Only fds the copy does not wake (clients' fds: the copy goes through the
        service's mapping).  The loop wakes these right after its copy and
        before any bookkeeping, then reports the run with ``prewoken``.
        """
        waiting = self._waiters.peek(block, first, count)
        if not waiting:
            return ()
        fds = self._fds
        wanted = [w for w in waiting if not fds[w.key].woken_by_copy]
        if len(wanted) == 1:
            waiter = wanted[0]
            return ((waiter.key, waiter.address, self.blocks[waiter.block].page_size),)
        return tuple((key, start, length) for key, pieces in self._waiters.wake_ranges(wanted).items()
                     for start, length in pieces)

    def copy_target(self, block: int, page: int) -> tuple[Hashable, int] | None:
        """``(key, address)`` when every waiter on the page is on one delegated fd, at one address:
        a UFFDIO_COPY through that fd places the page (shared memory) and wakes them all in one
        call.  None otherwise (no waiter, several fds, or the service's own among them)."""
        waiting = self._waiters.peek(block, page, 1)
        if not waiting:
            return None
        key, address = waiting[0].key, waiting[0].address
        if self._fds[key].woken_by_copy:
            return None
        for waiter in waiting:
            if waiter.key != key or waiter.address != address:
                return None
        return key, address

    def release(self, block: int, first: int, count: int, now: float, *,
                force: bool = False, prewoken: bool = False) -> list[Command]:
        """The run is placed: wake its waiters once each, notify self-served clients.

        Args:
            force: wake fds woken by the copy too (the copy found pages present,
                or the page was placed before the fault was read).
            prewoken: the loop already woke what :meth:`plan` gave for this run,
                and the copy woke the rest: the waiters are accounted, no Wake follows.

        Returns:
            Wake commands merged per fd, then NotifyPlaced per client.
        """
        taken = self._waiters.take(block, first, count)
        if prewoken:
            for waiter in taken:
                self._count.woken_waiter(waiter, now)
            commands: list[Command] = []
        else:
            commands = self._wake(taken, now, force)
        if len(self._runs):
            commands.extend(self._notify(self._runs.take(block, first, count), now))
        return commands

    def release_through(self, block: int, page: int, key: Hashable, address: int, now: float) -> list[Command]:
        """One page is placed by a UFFDIO_COPY through fd ``key`` at ``address`` (its address in
        that fd's space), which woke that fd's threads waiting there: they are accounted as woken,
        every other waiter gets a Wake (an fd woken by copies too: the copy went through another).

        Returns:
            As :meth:`release`.
        """
        taken = self._waiters.take(block, page, 1)
        woken = self._count.woken_waiter
        if not taken:  # a self-served client's fault: nobody blocked on a delegated fd
            commands: list[Command] = []
        elif len(taken) == 1 and taken[0].key == key and taken[0].address == address:  # the usual fault
            woken(taken[0], now)
            commands = []
        else:
            others = []
            for waiter in taken:
                if waiter.key == key and waiter.address == address:
                    woken(waiter, now)
                else:
                    others.append(waiter)
            commands = self._wake(others, now, True)
        if len(self._runs):
            commands.extend(self._notify(self._runs.take(block, page, 1), now))
        return commands

    def woken_by_copy(self, key: Hashable) -> bool:
        """Fd ``key`` is the service's own (a copy through its mapping wakes its threads)."""
        fd = self._fds.get(key)
        return fd is not None and fd.woken_by_copy

    def _wake(self, taken: list[Waiter], now: float, force: bool) -> list[Command]:
        if not taken:
            return []
        if len(taken) == 1:  # one blocked thread: the usual fault
            waiter = taken[0]
            self._count.woken_waiter(waiter, now)
            if not force and self._fds[waiter.key].woken_by_copy:
                return []
            self._count.wakes += 1
            return [Wake(waiter.key, waiter.address, self.blocks[waiter.block].page_size)]
        for waiter in taken:
            self._count.woken_waiter(waiter, now)
        fds = self._fds
        wanted = taken if force else [w for w in taken if not fds[w.key].woken_by_copy]
        if not wanted:
            return []
        commands: list[Command] = []
        for key, pieces in self._waiters.wake_ranges(wanted).items():
            commands.extend(Wake(key, start, length) for start, length in pieces)
        self._count.wakes += len(commands)
        return commands

    def _notify(self, pieces: list[RunPiece], now: float) -> list[Command]:
        if len(pieces) == 1:  # one client's fault: one run, nothing to merge
            piece = pieces[0]
            self._count.run_woken(piece, now)
            return [NotifyPlaced(piece.key, (m.PageRun.unchecked(piece.block, piece.start, piece.stop - piece.start),))]
        per_key: dict[Hashable, list[m.PageRun]] = {}
        for piece in pieces:
            self._count.run_woken(piece, now)
            per_key.setdefault(piece.key, []).append(
                m.PageRun.unchecked(piece.block, piece.start, piece.stop - piece.start))
        return [command for key, runs in per_key.items() for command in notify_commands(key, runs)]


def notify_commands(key: Hashable, runs: Iterable[m.PageRun]) -> list[Command]:
    """NotifyPlaced commands for ``runs``, merged, each within a Placed message's run limit."""
    merged = list(merge_runs(runs))
    return [NotifyPlaced(key, chunk) for chunk in chunks(merged, m.LIMITS.max_runs)]


def merge_notifications(commands: list[Command]) -> list[Command]:
    """``commands`` with every client's NotifyPlaced merged into the first of them (its runs
    merged, in as few commands as a Placed message's run limit allows); the rest as they were."""
    runs_of: dict[Hashable, list[m.PageRun]] = {}
    notifications = 0
    for command in commands:
        if type(command) is NotifyPlaced:
            notifications += 1
            runs_of.setdefault(command.key, []).extend(command.runs)
    if notifications == len(runs_of):  # at most one per client: nothing to merge
        return commands
    merged: list[Command] = []
    for command in commands:
        if type(command) is not NotifyPlaced:
            merged.append(command)
        elif command.key in runs_of:  # the client's first: all of its runs go here
            merged.extend(notify_commands(command.key, runs_of.pop(command.key)))
    return merged
