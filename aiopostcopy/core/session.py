"""The destination's brain: faults, messages and the timer in; commands and messages out.

Theory of operation
-------------------
:class:`DestinationSession` is I/O-free (h11/aioquic style).  The loop feeds it
faults, source messages, placement results and the time; after each pass it
calls ``flush``, carries out ``commands()`` in order (see
:mod:`aiopostcopy.core.commands`), sends ``messages_to_send()`` and re-arms
one timer from ``get_timer()``.

Page life (table in :mod:`aiopostcopy.core.pages`): a fault records its
waiter *first*, then looks at the page: PLACED -> wake now; REQUESTED or
PLACING -> it joins; MISSING -> the coalescer, whose flush makes a Request.
Data for pages still needed becomes Place/PlaceZero (PLACING); pages placed
or arriving are skipped.  ``placed()`` makes them PLACED and wakes each
waiter once, merged per fd.  The last page placed: MigrationComplete, and
Complete to the source.

Reliability: losing a channel forgets nothing.  REQUESTED pages stay
REQUESTED; after a reconnection one Resume goes first on the urgent channel
(pages placed or arriving, the REQUESTED runs as ``pending``) and request
timers restart.  Only ``abort()`` or the deadline end a migration early.

Discards: the source sends each Discard on both channels, as a stale copy
may be in flight on either.  A discarded page is dropped and requested again
at once, so whichever Discard comes last, the copy that stays was sent after
both.  A Discard of a page being placed waits for the placement.

Errors: anything the source sends out of range, out of order or in the
wrong direction raises RemoteProtocolError *before* any state changes (the
loop closes that channel and reconnects); loop misuse raises
LocalProtocolError or InternalError.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence

from aiopostcopy import messages as m
from aiopostcopy.core.coalesce import Coalescer
from aiopostcopy.core.commands import (Abort, Command, DiscardPages, MigrationComplete,  # noqa: F401
                                       NotifyPlaced, Place, PlaceZero, UnknownFault, Wake)
# (the command classes are importable from here too; their home is core.commands)
from aiopostcopy.core.config import DestinationConfig
from aiopostcopy.core.inflight import InFlight
from aiopostcopy.core.link import Link, ack_threshold, check_hello
from aiopostcopy.core.pages import MISSING, PLACED, PLACING, REQUESTED, PageStates
from aiopostcopy.core.ramblock import BlockTable, MappingTable
from aiopostcopy.core.rangeset import RangeSet, bounds_total, chunks, clip_bounds
from aiopostcopy.core.resume import requested_runs, resume_for
from aiopostcopy.core.stats import Counters, DestinationStatistics
from aiopostcopy.core.waiters import Waiter
from aiopostcopy.core.wakeups import Wakeups, merge_notifications
from aiopostcopy.errors import InternalError, LocalProtocolError, RemoteProtocolError

__all__ = ["DestinationConfig", "DestinationSession"]

URGENT, BACKGROUND = m.Channel.URGENT, m.Channel.BACKGROUND
_NEEDED = frozenset({MISSING, REQUESTED})
_ONLY = {state: frozenset({state}) for state in (MISSING, REQUESTED, PLACED, PLACING)}


def _data_pages(msg: m.Pages) -> int:
    """Pages of the run the payload carries (the others are named in ``zeros``)."""
    return msg.count - bounds_total(msg.zeros) if msg.zeros else msg.count


class DestinationSession:
    """The fault-thread brain of the destination (see the module docstring).

    Args:
        session_id: identifies the migration on both channels.
        config: tuning; defaults to ``DestinationConfig()``.
    """

    def __init__(self, *, session_id: str, config: DestinationConfig | None = None) -> None:
        self.session_id = session_id
        self.config = config if config is not None else DestinationConfig()
        self.blocks: BlockTable | None = None
        self._states: list[PageStates] = []
        self._wakeups: Wakeups | None = None
        self._deferred: list[RangeSet] = []  # discards of pages being placed
        self._link = Link(self.config.ack_bytes)
        self._coalescer = Coalescer(self.config.max_run_pages, self.config.max_in_flight_pages,
                                    self.config.readahead_pages)
        self._in_flight = InFlight(self.config.request_timeout)
        self._commands: list[Command] = []
        self._placed = self._total = 0
        self._complete, self._aborted = False, None
        self._count = Counters()
        self.features: tuple[str, ...] = ()  #: named in our Hellos (e.g. from-copy)
        self._handlers = {m.Pages: self._on_data, m.Zero: self._on_data, m.Discard: self._on_discard,
                          **dict.fromkeys((m.Done, m.Error, m.Ping, m.Pong), self._on_control)}

    # ------------------------------------------------------------ outputs and state

    def hello(self, channel: m.Channel) -> m.Hello:
        """Our Hello for a (re)connecting channel."""
        return m.Hello(version=m.PROTOCOL_VERSION, session_id=self.session_id,
                       role=m.Role.DESTINATION, channel=channel, features=self.features)

    def commands(self) -> list[Command]:
        """Commands to carry out, in order (drains).  A self-served client's NotifyPlaced are
        merged into the first of them: one Placed message (or as few as its run limit allows)
        for the pages placed since the last call, not one per page."""
        result, self._commands = self._commands, []
        return merge_notifications(result) if len(result) > 1 else result

    def messages_to_send(self) -> list[tuple[m.Channel, m.Message]]:
        """Messages to send, each with its channel, in order (drains)."""
        return self._link.drain()

    complete = property(lambda self: self._complete, doc="Every page of every block is placed.")
    aborted = property(lambda self: self._aborted, doc="The abort reason, or None.")

    def is_open(self, channel: m.Channel) -> bool:
        """The source's Hello arrived on ``channel`` and the channel was not lost since."""
        return channel in self._link.open

    # ------------------------------------------------------------ source messages

    def message_received(self, channel: m.Channel, msg: m.Message, now: float) -> None:
        """Handle one message from the source (ignored once aborted).

        Raises:
            RemoteProtocolError: out of range, out of order, wrong direction, or
                an Error from the source; the session's state is unchanged.
        """
        if self._aborted is not None:
            return
        if type(msg) is m.Hello:
            return self._on_hello(channel, msg, now)
        if type(msg) is m.Error:  # before the Hello too: a refusal (busy, session, version) says why
            return self._on_control(channel, msg, now)
        if channel not in self._link.open:
            raise RemoteProtocolError(f"{type(msg).__name__} on the {channel.value} channel "
                                      "before the source's Hello")
        handler = self._handlers.get(type(msg))
        if handler is None:
            raise RemoteProtocolError(f"unexpected {type(msg).__name__} from the source")
        handler(channel, msg, now)

    def _on_hello(self, channel: m.Channel, msg: m.Hello, now: float) -> None:
        link = self._link
        blocks = check_hello(channel, msg, self.session_id, known=self.blocks)
        if self.blocks is None:
            self._define_blocks(blocks)
        if channel in link.open:  # a new connection the loop did not report the old one of
            link.closed(channel)
        link.opened(channel)
        link.ack_bytes = ack_threshold(msg, self.config.ack_bytes)
        if self._complete and channel is URGENT:
            link.send(URGENT, m.Complete())
        elif link.lost and URGENT in link.open:
            self._send_resume(now)

    def _define_blocks(self, blocks: BlockTable) -> None:
        self.blocks = blocks
        self._states = [PageStates(block.pages, block.page_size) for block in blocks]
        self._wakeups = Wakeups(blocks, self._count)
        self._deferred = [RangeSet() for _ in blocks]
        self._total = blocks.total_pages
        self._count.faults_by_block = [0] * len(blocks)
        self._count.huge_sizes = [block.page_size if block.page_size > 4096 else 0 for block in blocks]

    def _check_run(self, block: int, first: int, count: int) -> PageStates:
        self.blocks.check_run(block, first, count)  # type: ignore[union-attr]  (after Hello)
        return self._states[block]

    def check_payload(self, msg: m.Pages, nbytes: int) -> None:
        """A Pages header arrived whose ``nbytes`` payload is about to be received.

        Raises:
            RemoteProtocolError: the run is outside the blocks, or ``nbytes`` is
                not the run's data pages times the page size.
        """
        if self.blocks is None:
            raise RemoteProtocolError("pages before the source's Hello")
        states = self._check_run(msg.block, msg.first, msg.count)
        if nbytes != _data_pages(msg) * states.page_size:
            raise RemoteProtocolError(f"pages: {nbytes} bytes of payload for {_data_pages(msg)} data pages "
                                      f"of {states.page_size} bytes", code=m.ErrorCode.BLOCK.value)

    def check_page(self, block: int, page: int, nbytes: int) -> None:
        """:meth:`check_payload` for a Pages of one page and no zeros (the one-page lane).

        Raises:
            RemoteProtocolError: as :meth:`check_payload`.
        """
        states = self._states
        if not (0 <= block < len(states) and 0 <= page < states[block].pages and nbytes == states[block].page_size):
            self.check_payload(m.Pages(block=block, first=page, count=1), nbytes)  # raises, saying why

    def _on_data(self, channel: m.Channel, msg: m.Pages | m.Zero, now: float) -> None:
        """Pages or Zero arrived: place the pages still needed, skip the rest."""
        block, first, count = msg.block, msg.first, msg.count
        states = self._check_run(block, first, count)
        zero, zeros = type(msg) is m.Zero, ()
        if not zero:
            zeros = msg.zeros
            if msg.data is not None:
                self.check_payload(msg, len(msg.data))
            if channel is BACKGROUND:
                self._link.background_bytes(_data_pages(msg) * states.page_size)
        for start, stop in states.runs(first, count, _NEEDED):
            n = stop - start
            before = states.mark(start, n, PLACING)
            self._coalescer.settle(before[REQUESTED])
            count -= n
            if zero:
                self._count.pages_zero += n
                self._commands.append(PlaceZero(block, start, n))
                continue
            skipped, inside = clip_bounds(zeros, start - first, stop - first) if zeros else (0, ())
            zero_pages = bounds_total(inside) if inside else 0
            demand = min(before[REQUESTED], n - zero_pages) if channel is URGENT else 0
            self._count.pages_zero += zero_pages
            self._count.pages_demand += demand
            self._count.pages_background += n - zero_pages - demand
            self._commands.append(Place(block, start, n, start - first - skipped, inside))
        self._count.pages_duplicate += count

    def urgent_page(self, block: int, page: int, *, target: bool = False) -> bool | tuple[Hashable, int] | None:
        """One data page (``Pages`` of count 1, no zeros) arrived on the urgent channel, its
        payload checked by :meth:`check_page`: the urgent path's form of :meth:`message_received`.

        Returns:
            True: the page is needed; it is PLACING and counted, and the caller
            places it, then calls :meth:`placed` (with :meth:`wake_plan` first).
            ``(key, address)``, with ``target``: as True, and :meth:`copy_target`
            found the one delegated fd all its waiters are on.
            False: not needed (placed or arriving already), counted as a duplicate.
            None: nothing done; the caller hands the message to :meth:`message_received`
            (the session is aborted, the channel is not open, or a Discard waits on the block).
        """
        if self._aborted is not None or self._deferred[block] or URGENT not in self._link.open:
            return None
        states = self._states[block]
        state = states[page]
        if state == REQUESTED:
            states.mark(page, 1, PLACING)
            self._coalescer.settle(1)
            self._count.pages_demand += 1
        elif state == MISSING:
            states.mark(page, 1, PLACING)
            self._count.pages_background += 1
        else:
            self._count.pages_duplicate += 1
            return False
        return (target and self._wakeups.copy_target(block, page)) or True  # type: ignore[union-attr]

    def _on_discard(self, channel: m.Channel, msg: m.Discard, now: float) -> None:
        states = self._check_run(msg.block, msg.first, msg.count)
        if self._complete:
            raise RemoteProtocolError("discard after the migration completed")
        for start, stop in states.runs(msg.first, msg.count, _ONLY[PLACING]):
            self._deferred[msg.block].add(start, stop)
        self._discard(msg.block, states.runs(msg.first, msg.count, _ONLY[PLACED]))

    def _discard(self, block: int, runs: Iterable[tuple[int, int]]) -> None:
        for start, stop in runs:
            self._states[block].mark(start, stop - start, MISSING)
            self._placed -= stop - start
            self._count.pages_discarded += stop - start
            self._commands.append(DiscardPages(block, start, stop - start))
            self._coalescer.add_run(block, start, stop - start)  # see "Discards" above

    def _on_control(self, channel: m.Channel, msg: m.Message, now: float) -> None:
        """Ping -> Pong; Done is recorded (completion is every page placed); Pong is ignored."""
        if type(msg) is m.Ping:
            self._link.send(channel, m.Pong(token=msg.token))
        elif type(msg) is m.Done:
            self._count.done_channels.add(channel)
        elif type(msg) is m.Error and msg.code is m.ErrorCode.ABORTED:
            self.abort(f"the source aborted: {msg.text}", now)
        elif type(msg) is m.Error:
            raise RemoteProtocolError(f"the source sent error {msg.code.value}: {msg.text}",
                                      code=msg.code.value)

    # ------------------------------------------------------------ fds, clients and faults

    def _registry(self) -> Wakeups:
        if self._wakeups is None:
            raise LocalProtocolError("no blocks yet: wait for the source's Hello")
        return self._wakeups

    def add_fd(self, key: Hashable, table: MappingTable, *, woken_by_copy: bool = False) -> None:
        """Serve userfaultfd ``key`` (any hashable), whose faults ``table`` translates.

        ``woken_by_copy``: UFFDIO_COPY places through this fd's mapping (the
        service's own), so placements wake its threads by themselves.

        Raises:
            LocalProtocolError: no blocks yet, key in use, or a table over other blocks.
        """
        self._registry().add_fd(key, table, woken_by_copy)

    def add_self_served(self, key: Hashable) -> None:
        """Serve a self-served client (asks by run, answered by NotifyPlaced).

        Raises:
            LocalProtocolError: no blocks yet or key in use.
        """
        self._registry().add_fd(key, None, False)

    def retire(self, key: Hashable, now: float) -> None:
        """Forget an fd or client going away (stop reading its faults first): its
        waiters are dropped, never woken; unknown keys are ignored."""
        if self._wakeups is not None:
            self._wakeups.retire(key, now)

    def fault_received(self, key: Hashable, address: int, thread_id: int, now: float) -> None:
        """Handle one fault read from delegated fd ``key``.

        Raises:
            LocalProtocolError: ``key`` is not a registered delegated fd.
        """
        found = self._registry().fault(key, address, thread_id, now)
        if found is None:
            return self._commands.append(UnknownFault(key, address, thread_id))
        self._route_fault(*found, now)

    def _route_fault(self, waiter: Waiter, joined: bool, now: float) -> None:
        """A recorded fault, by its page's state: woken now, joined to a request, or queued."""
        state = self._states[waiter.block][waiter.page]
        if state == PLACED:
            self._count.faults_already_placed += 1
            self._commands.extend(self._wakeups.release(waiter.block, waiter.page, 1, now,  # type: ignore[union-attr]
                                                        force=True))
        elif state != MISSING:
            self._count.faults_joined += 1
        elif not joined:
            self._coalescer.add(waiter.block, waiter.page)

    def fault_request(self, key: Hashable, address: int, thread_id: int, now: float, *,
                      new_request: bool = True) -> tuple[int, int] | None:
        """:meth:`fault_received` answered at once, for each fault of a read: the usual case.

        When the page is MISSING, nobody waits for it yet, nothing is queued
        (no fault to coalesce with, no message to keep ahead) and the urgent
        channel is open with room in the in-flight budget, the page becomes
        REQUESTED and ``(block, page)`` is returned: the caller sends it on the
        urgent channel now, with no pass, in one Request with the other pages
        this method returned for the same read: ``new_request=False`` says the
        page joins an earlier page's Request (it is not counted as another one).
        Otherwise the fault goes the way of :meth:`fault_received` and None is
        returned (the caller runs the pass).

        Raises:
            LocalProtocolError: ``key`` is not a registered delegated fd.
        """
        if self._aborted is not None or not self._link.urgent_ready():
            self.fault_received(key, address, thread_id, now)
            return None
        found = self._registry().fault(key, address, thread_id, now)
        if found is None:
            self._commands.append(UnknownFault(key, address, thread_id))
            return None
        waiter, joined = found
        block, page = waiter.block, waiter.page
        states = self._states[block]
        if states[page] == MISSING and not joined and self._coalescer.take_page(states, page):
            self._count.pages_requested += 1
            self._count.requests_sent += new_request
            self._in_flight.sent_page(block, page, now)
            return block, page
        self._route_fault(waiter, joined, now)
        return None

    def lane_budget(self) -> int:
        """How many MISSING faulted pages :meth:`fault_request` would request at once now, one
        after another (0: none; it would queue them, or the session is aborted, or the urgent
        channel is closed or has messages queued).  A request lane may write their Request
        before the faults are handed to :meth:`fault_request`, which then accounts them."""
        if self._aborted is not None or not self._link.urgent_ready():
            return 0
        return self._coalescer.direct_budget()

    def lane_may_place(self) -> bool:
        """An answer on the urgent channel may be placed before it is handed over (the reply
        lane), then accounted with :meth:`placed_through`: :meth:`urgent_page` would take it
        (not aborted, the urgent channel open, no Discard waiting on a placing page)."""
        return self._aborted is None and URGENT in self._link.open and not any(self._deferred)

    def placed_through(self, block: int, page: int, key: Hashable, address: int, now: float, *,
                       zero: bool = False) -> None:
        """A REQUESTED page arrived on the urgent channel and is in memory already: the reply
        lane placed it with UFFDIO_COPY through fd ``key`` at ``address`` (where a thread of that
        fd faulted), which woke that fd's threads waiting there; every other waiter is woken
        by the Wakes this leaves in :meth:`commands`.  Only while :meth:`lane_may_place` holds.

        The same as :meth:`urgent_page` followed by :meth:`placed` (the page counted as demand,
        or as a zero page when ``zero``: the answer was a Zero, its in-flight budget freed,
        PLACING then PLACED), in the fewest steps: it runs once per fault, on the fault's path.

        Raises:
            InternalError: the page was not REQUESTED, or the lane may not place now.
        """
        if self._aborted is not None or self._deferred[block] or not self._states[block].place_requested(page):
            raise InternalError(f"page {page} of block {block} was placed by the reply lane "
                                "while the session could not take it")
        self._coalescer.settle(1)
        count = self._count
        if zero:
            count.pages_zero += 1
        else:
            count.pages_demand += 1
        wakeups: Wakeups = self._wakeups  # type: ignore[assignment]  (a REQUESTED page means blocks)
        commands = wakeups.release_through(block, page, key, address, now)
        if commands:
            self._commands.extend(commands)
        if not wakeups.woken_by_copy(key):
            count.copies_to_client += 1
        self._placed += 1
        if not self._complete and self._placed == self._total:
            self._complete = True
            self._commands.append(MigrationComplete())
            if URGENT in self._link.open:
                self._link.send(URGENT, m.Complete())

    def fd_table(self, key: Hashable) -> MappingTable | None:
        """The mapping table of delegated fd ``key`` (None: unknown, or a self-served client)."""
        return self._registry().table_of(key)

    def state_buffers(self) -> list[bytearray]:
        """Each block's page state bytes (:attr:`PageStates.buffer`; empty before the blocks)."""
        return [states.buffer for states in self._states]

    def client_request(self, key: Hashable, runs: Iterable[m.PageRun], now: float) -> None:
        """A self-served client needs these runs; NotifyPlaced answers as they land.

        Raises:
            LocalProtocolError: ``key`` is not a self-served client.
            RemoteProtocolError: a run is out of range (the client's fault).
        """
        runs = [run for run in runs if self._check_run(run.block, run.first, run.count)]
        self._commands.extend(self._registry().wait_runs(key, runs, self._states, now))
        for run in runs:
            self._coalescer.add_run(run.block, run.first, run.count)  # it skips pages not MISSING

    def client_fault_request(self, key: Hashable, runs: Sequence[tuple[int, int, int]],
                             now: float) -> list[tuple[int, int]]:
        """:meth:`client_request` of a self-served client's faults (a ClientRequest of a few
        runs, ``(block, first, count)``), answered at once where it can be, as
        :meth:`fault_request` answers a delegated fault.

        Each run that is one MISSING page, with nothing queued, the urgent channel open and
        room in the in-flight budget, becomes REQUESTED, and its ``(block, page)`` is in the
        returned list: the caller sends their Request on the urgent channel now, with no
        pass, in one frame (counted as one Request).  Every other run goes the way of
        :meth:`client_request`: the caller carries out :meth:`commands` (a NotifyPlaced for
        pages placed already) and runs the pass when :attr:`pass_due` (it sends what was
        queued).

        Raises:
            LocalProtocolError: ``key`` is not a self-served client.
            RemoteProtocolError: a run is out of range (the client's fault).
            Either way nothing is recorded: every run is checked first.
        """
        registry = self._registry()
        registry.check_self_served(key)
        checked = [self._check_run(block, first, count) for block, first, count in runs]
        asked: list[tuple[int, int]] = []
        direct = self._aborted is None and self._link.urgent_ready()
        for (block, first, count), states in zip(runs, checked):
            state = states[first]
            if count == 1 and state != PLACED:  # the usual fault: one page to wait for
                registry.wait_page(key, block, first, now)
                if state != MISSING:  # requested or placing: it waits with the others
                    continue
                if direct and self._coalescer.take_page(states, first):
                    counters = self._count
                    counters.pages_requested += 1
                    counters.requests_sent += not asked
                    self._in_flight.sent_page(block, first, now)
                    asked.append((block, first))
                else:
                    self._coalescer.add_run(block, first, 1)
                continue
            commands = registry.wait_run(key, block, first, count, self._states, now)
            if commands:
                self._commands.extend(commands)
            if count != 1:
                self._coalescer.add_run(block, first, count)  # it skips pages not MISSING
        return asked

    # ------------------------------------------------------------ adoption

    def adopt_present(self, block: int, runs: Iterable[tuple[int, int]], now: float) -> None:
        """Pages ``[start, stop)`` of ``block`` are already in memory: an earlier destination of
        this session placed them before it died.  They count as placed, and the source is
        told what is here with a Resume, as after a reconnection (now if the urgent channel
        is open, else when the source's Hello arrives on it).

        Raises:
            InternalError: a page of a run is not MISSING.
        """
        states = self._check_run(block, 0, 1)
        for start, stop in runs:
            states.mark(start, stop - start, PLACING)  # the way every page comes in
            states.mark(start, stop - start, PLACED)
            self._placed += stop - start
            self._count.pages_adopted += stop - start
        self._link.lost = True
        if URGENT in self._link.open:
            self._send_resume(now)
        if not self._complete and self._placed == self._total:
            self._complete = True
            self._commands.append(MigrationComplete())
            if URGENT in self._link.open:
                self._link.send(URGENT, m.Complete())

    # ------------------------------------------------------------ integrity

    def unplaced_runs(self, block: int, first: int, count: int) -> list[tuple[int, int]]:
        """Sub-runs of ``[first, first + count)`` the service has not placed and is not placing."""
        return self._check_run(block, first, count).runs(first, count, _NEEDED)

    def filled_elsewhere(self, pages: int) -> None:
        """``pages`` were found filled by someone else before the service placed them
        (the loop makes them right); the migration can no longer count as verified."""
        self._count.integrity_pages += pages

    # ------------------------------------------------------------ placement

    def copy_target(self, block: int, page: int) -> tuple[Hashable, int] | None:
        """For a page :meth:`urgent_page` said is needed: ``(key, address)`` of the one delegated
        fd all its waiters are on.  Placing the page with UFFDIO_COPY through that fd, at that
        address in its process, puts it in the shared memory and wakes them in one call; then
        call :meth:`placed` with ``prewoken=True``.  None: place through the service's own
        mapping and wake :meth:`wake_plan`'s ranges (several fds wait, or none, or a Discard
        waits on the block)."""
        if self._deferred[block]:
            return None
        return self._registry().copy_target(block, page)

    def copied_to_client(self, block: int, page: int, now: float) -> None:
        """The page went in through :meth:`copy_target`'s fd (which woke its waiters): :meth:`placed`."""
        self._count.copies_to_client += 1
        self.placed(block, page, 1, now, prewoken=True)

    def wake_plan(self, block: int, first: int, count: int) -> tuple[tuple[Hashable, int, int], ...]:
        """``(key, start, length)`` ranges to wake right after the run's copy (clients' fds:
        the copy wakes only the service's own).  Wake them, then call :meth:`placed` with
        ``prewoken=True``: a thread resumes before the bookkeeping, not after it."""
        if self._deferred[block]:  # discards of placing pages: the exact path wakes only what stays
            return ()
        return self._registry().plan(block, first, count)

    def placed(self, block: int, first: int, count: int, now: float, *, existed_pages: int = 0,
               prewoken: bool = False) -> None:
        """The loop carried out (part of) a Place/PlaceZero: the run is in memory.

        ``existed_pages``: pages the kernel found present (EEXIST): someone else
        filled them (the loop wrote the right bytes over them); they count as
        integrity pages, and fds woken by the copy get explicit Wakes too.
        ``prewoken``: the loop woke :meth:`wake_plan`'s ranges right after a copy
        that placed every page (no EEXIST, no events read in between): no Wake follows.

        Raises:
            InternalError: a page of the run was not PLACING.
        """
        self._states[block].mark(first, count, PLACED)
        self._placed += count
        self._count.integrity_pages += existed_pages
        wakeups: Wakeups = self._wakeups  # type: ignore[assignment]  (set with the blocks)
        if not self._deferred[block]:
            self._commands.extend(wakeups.release(block, first, count, now, force=existed_pages > 0,
                                                  prewoken=prewoken))
        else:  # discarded while placing: drop those now and wake nobody for them
            kept = self._deferred[block].gaps(first, first + count)
            self._discard(block, self._deferred[block].intersection(first, first + count))
            self._deferred[block].subtract(first, first + count)
            for start, stop in kept:
                self._commands.extend(wakeups.release(block, start, stop - start, now,
                                                      force=existed_pages > 0))
        if not self._complete and self._placed == self._total:
            self._complete = True
            self._commands.append(MigrationComplete())
            if URGENT in self._link.open:
                self._link.send(URGENT, m.Complete())

    def placement_failed(self, block: int, first: int, count: int, now: float) -> None:
        """The loop could not place a run: its pages are missing again and re-requested.

        Raises:
            InternalError: a page of the run was not being placed.
        """
        if not self._states[block].all_in(first, count, PLACING):
            raise InternalError(f"placement_failed({block}, {first}, {count}): not all PLACING")
        self._states[block].mark(first, count, MISSING)
        self._deferred[block].subtract(first, first + count)
        self._coalescer.add_run(block, first, count)

    # ------------------------------------------------------------ pass, timer, reconnection

    @property
    def pass_due(self) -> bool:
        """:meth:`flush` or :meth:`messages_to_send` has work: faults or runs queued,
        messages queued, or an Ack due.  (Commands are taken as they come.)"""
        return bool(self._coalescer.queued) or self._link.pending

    def flush(self, now: float) -> None:
        """End of a loop pass: queued faults become Requests; Ack background bytes."""
        if URGENT in self._link.open and self._aborted is None and self._coalescer.queued:
            runs = self._coalescer.flush(self._states)
            if runs:
                self._count.pages_requested += sum(run.count for run in runs)
                self._send_requests(runs, now)
        self._link.ack_if_due()

    def _send_requests(self, runs: list[m.PageRun], now: float) -> None:
        if len(runs) <= m.LIMITS.max_runs:  # the usual case: one Request
            if runs:
                self._link.send(URGENT, m.Request(runs=tuple(runs)))
                self._count.requests_sent += 1
        else:
            for chunk in chunks(runs, m.LIMITS.max_runs):
                self._link.send(URGENT, m.Request(runs=chunk))
                self._count.requests_sent += 1
        self._in_flight.sent(runs, now)

    def connection_lost(self, channel: m.Channel, now: float) -> None:
        """A channel broke: drop its unsent messages; a Resume follows its return."""
        self._link.closed(channel)

    def resume_message(self, now: float) -> m.Resume:
        """The Resume to send first on the urgent channel after a reconnection.

        Counts as sent: request timers restart, and pending runs beyond what a
        Resume holds are queued as Requests after it.  If the loop has not
        called this by the time the source's Hello returns after a loss, the
        session queues a Resume itself (so there is exactly one per reconnection).
        """
        resume, rest = self._resume(now)
        self._send_requests(rest, now)
        return resume

    def _send_resume(self, now: float) -> None:
        resume, rest = self._resume(now)
        self._link.send(URGENT, resume)
        self._send_requests(rest, now)

    def _resume(self, now: float) -> tuple[m.Resume, list[m.PageRun]]:
        pending = requested_runs(self._states)
        resume, rest = resume_for(self.session_id, self._states, pending)
        self._link.lost = False
        self._count.resumes += 1
        self._count.pages_re_requested += sum(run.count for run in pending)
        self._coalescer.reset_in_flight(sum(run.count for run in pending))
        self._in_flight.restart(resume.pending, now)
        return resume, rest

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` next has work (a ``now`` value), or None."""
        if self._complete or self._aborted is not None:
            return None
        due = self._in_flight.due(self._states) if URGENT in self._link.open else None
        return min((t for t in (due, self.config.deadline) if t is not None), default=None)

    def handle_timer(self, now: float) -> None:
        """Re-request runs whose answer is overdue; abort once the deadline passed."""
        deadline = self.config.deadline
        if deadline is not None and now >= deadline and not self._complete:
            return self.abort(f"deadline passed with {self._total - self._placed} pages missing", now)
        if URGENT in self._link.open and self._aborted is None:
            again = self._in_flight.overdue(self._states, now)
            self._count.pages_re_requested += sum(run.count for run in again)
            self._send_requests(again, now)

    def abort(self, reason: str, now: float) -> None:
        """End the migration without every page: emit Abort, tell the source.

        Blocked threads stay blocked (never zero-filled); no-op once complete or aborted.
        """
        if self._complete or self._aborted is not None:
            return
        self._aborted = reason
        self._commands.append(Abort(reason))
        self._link.send_open(m.Error(code=m.ErrorCode.ABORTED, text=reason[:m.LIMITS.max_text]))

    def statistics(self, now: float | None = None) -> DestinationStatistics:
        """A frozen snapshot; with ``now``, threads still blocked count their time so far."""
        wakeups = self._wakeups
        blocked = list(wakeups.waiting()) if wakeups is not None and now is not None else []
        return self._count.snapshot(
            still_blocked=blocked, now=now, pages_total=self._total, pages_placed=self._placed,
            waiting=len(wakeups) if wakeups is not None else 0,
            complete=self._complete, aborted=self._aborted)
