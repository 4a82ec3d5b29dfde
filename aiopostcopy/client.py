"""Join a destination service from a worker process that shares its memory.

Theory of operation
-------------------
The worker speaks the client control protocol of :mod:`aiopostcopy.core.control`
over the service's Unix socket, through the same SCM_RIGHTS channel the service
uses, driven by poll (:class:`~aiopostcopy.transport.fdstream.BlockingControlChannel`:
wire frames; fds ride on the sendmsg carrying a frame's first byte and wait in
a FIFO; Blocks claims one per block, in block order)::

    -> ClientHello(version, pid, name, mode)
    <- Blocks + one fd per block   map each block shared, open our own userfaultfd
                                   (THREAD_ID), register every mapping MISSING
    -> Register(table) + uffd fd (delegated)  |  Register(()) (self-served)
    <- Accept ... End(complete)    running; every page placed (or aborted)
    -> Bye                         at once, from our thread; the service then closes

*Delegated*: the service reads our uffd, requests pages for us and wakes our
threads; our thread only watches the socket.  *Self-served*: our thread polls
our uffd too, and a :class:`~aiopostcopy.core.pager.Pager` (the core's mapping
table, coalescer and range sets) maps fault addresses to (block, page), wakes
pages known placed at once, lets requested ones wait, turns new ones into
coalesced ClientRequest runs and names the ranges each Placed wakes.  The
usual read's pages go out as one ClientRequest encoded straight from them
while running (``Pager.take_pages``), without building the message.

The GIL: a thread faulting in plain Python (``view[i]``) blocks in the kernel
*holding the GIL*, stopping every Python thread of the process until the page
arrives -- in self-served mode our handler too: a deadlock.  Touch memory that
may be missing from code that releases the GIL (``ctypes.memmove``, cffi,
``Mapping.touch``, large numpy operations), as :mod:`aiopostcopy.tools.workload` does.

Closing: a uffd closed while a thread waits on a missing page makes the kernel
fill it with zeros, in memory every process shares.  After End(complete=True)
:meth:`Client.leave` unregisters, closes the uffd, then unmaps.  Any other exit
(:meth:`Client.abandon`, abort, lost service) first takes the memory away
(munmap), then closes the uffd: a late touch gets SIGSEGV, never a zero page.
If views are still exported the mapping cannot go: the uffd then stays open
for good, so a touch of a missing page blocks instead of reading zeros.

:class:`AsyncClient` runs join/leave in the default executor and awaits End
through a future resolved from the client's thread (the handler never runs on
the event loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import select
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable

from aiopostcopy import trace
from aiopostcopy.core.control import SERVICE_SENDS, ClientControl, Phase
from aiopostcopy.core.pager import Pager
from aiopostcopy.core.ramblock import BlockTable, MappingTable
from aiopostcopy.errors import (BusyError, ClosedError, LocalProtocolError, MappingTableError, MigrationAborted,
                                PostcopyError, RemoteProtocolError, ServiceGoneError, UffdError)
from aiopostcopy.messages import (LIMITS, PROTOCOL_VERSION, Accept, Blocks, Bye, ClientHello, ClientMode,
                                  ClientRequest, End, Error, ErrorCode, Message, PageRun, Placed, Register, Reject)
from aiopostcopy.transport import client_lane
from aiopostcopy.transport.client_lane import ClientLane
from aiopostcopy.transport.fdstream import BlockingControlChannel, Event
from aiopostcopy.transport.wire import CONNECTION_CLOSED, ConnectionClosed, encode_client_request
from aiopostcopy.uffd import Feature, Mapping, PageFault, RegisterMode, SharedMemory, Userfaultfd
from aiopostcopy.uffd.events import PAGEFAULT_CODE

__all__ = ["Client", "AsyncClient", "name_native_thread"]

_ERRORS = {ErrorCode.MAPPING: MappingTableError, ErrorCode.ABORTED: MigrationAborted, ErrorCode.BUSY: BusyError}
_KEPT_OPEN: list[Userfaultfd] = []  #: uffds whose mappings could not be unmapped: never closed


def name_native_thread(name: str) -> None:
    """Name the calling thread in /proc (``comm``, 15 bytes), where the service reads it."""
    with contextlib.suppress(OSError), open(f"/proc/self/task/{threading.get_native_id()}/comm", "w") as comm:
        comm.write(name[:15])


def _service_error(code: ErrorCode, text: str, what: str) -> PostcopyError:
    message = f"{what} ({code.value}): {text}"
    if code in (ErrorCode.PROTOCOL, ErrorCode.VERSION):  # the service says *we* broke the protocol
        return LocalProtocolError(message, code=code.value)
    return _ERRORS.get(code, PostcopyError)(message)


class Client:
    """A worker's membership of a destination service: sync, safe to share between threads.

    Make one with :meth:`join`; as a context manager it abandons on exit (which
    is :meth:`leave` once the migration ended).  ``session_id`` names the
    migration, ``block_info`` lists the blocks in index order.
    """

    def __init__(self, channel: BlockingControlChannel, mode: ClientMode, name: str, *,
                 socket_path: str = "", rejoin: float = 0.0, timeout: float = 30.0) -> None:
        self.mode, self.name, self._channel, self.session_id, self.block_info = mode, name, channel, "", ()
        self._socket_path, self._rejoin, self._timeout = socket_path, rejoin, timeout
        self.rejoins = 0  #: times we joined a restarted service again
        self._control, self._send_lock = ClientControl(), threading.Lock()
        self._shms: list[SharedMemory] = []
        self._mappings: list[Mapping] = []
        self._views: dict[str, memoryview] = {}
        self._uffd: Userfaultfd | None = None
        self._pager: Pager | None = None
        self._lane: ClientLane | None = None  # the pager's per-page steps in C, when built
        self._thread: threading.Thread | None = None
        self._wakefd, self._stopping, self._left = -1, False, False
        self._rejoined: int | None = None  # the old control socket's fd, once replaced
        self._end: End | None = None
        self._bye: str | None = None  #: after End: "sent", or why it could not be
        self._failure: BaseException | None = None
        self._done, self._lock = threading.Event(), threading.Lock()
        self._callbacks: list[Callable[[], None]] = []

    @classmethod
    def join(cls, socket_path: str, *, mode: ClientMode = ClientMode.DELEGATED, name: str | None = None,
             timeout: float = 30.0, rejoin: float = 30.0) -> Client:
        """Connect, map every block, register it with our own userfaultfd, get accepted.

        Args:
            socket_path: the service's Unix control socket.
            mode: DELEGATED (the service serves our uffd) or SELF_SERVED.
            name: how the service reports us; default ``<program>-<pid>``.
            timeout: seconds for the whole handshake, then for any one send.
            rejoin: delegated: seconds to keep trying to join the service again when
                it goes away before End (a destination restarted after a crash
                adopts the migration); our blocked threads stay blocked meanwhile
                and go on when it serves our userfaultfd again.  0: never.

        Returns:
            A running client.

        Raises:
            MappingTableError: the service refused our mapping table.
            LocalProtocolError: the service says we broke the protocol or speak another version.
            RemoteProtocolError: the service sent something malformed or out of turn.
            UffdError: opening or registering our userfaultfd failed (the message says why).
            PostcopyError: the service is unreachable, silent for ``timeout``, or hung up.
        """
        deadline = time.monotonic() + timeout
        program = os.path.basename(sys.argv[0] if sys.argv and sys.argv[0] else "python")
        channel = _connect(socket_path, timeout)
        client = cls(channel, ClientMode(mode), name or f"{program}-{os.getpid()}", socket_path=socket_path,
                     rejoin=rejoin, timeout=timeout)
        try:
            client._handshake(deadline)
        except BaseException as exc:
            client._close(complete=False, bye=False)
            if isinstance(exc, OSError) and not isinstance(exc, PostcopyError):
                raise PostcopyError(f"joining the service at {socket_path} failed: {exc!r}") from exc
            raise
        client._wakefd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        role = "pager" if client._pager is not None else "control"
        client._thread = threading.Thread(target=client._run, name=f"aiopc-{role}", daemon=True)
        client._thread.start()
        return client

    def _handshake(self, deadline: float) -> None:
        self._send(ClientHello(version=PROTOCOL_VERSION, pid=os.getpid(), name=self.name, mode=self.mode))
        blocks = self._expect(deadline, Blocks)
        self.session_id, self.block_info = blocks.session_id, blocks.blocks
        self._shms = [SharedMemory.adopt(fd) for fd in self._channel.take_fds(len(blocks.blocks))]
        for info, shm in zip(self.block_info, self._shms):
            self._mappings.append(shm.map(info.length))
            self._mappings[-1].dont_fork()  # see Mapping.dont_fork: a child must not zero-fill our pages
            self._views[info.name] = self._mappings[-1].buffer()
        self._uffd = Userfaultfd.open(Feature.THREAD_ID, nonblocking=True)
        for mapping in self._mappings:
            self._uffd.register(mapping.address, mapping.length, RegisterMode.MISSING)
        if self.mode is ClientMode.SELF_SERVED:
            blocks = BlockTable.from_infos(self.block_info)
            self._pager = Pager(MappingTable.identity(blocks, [mapping.address for mapping in self._mappings]))
            if client_lane.available():
                self._lane = ClientLane(self._pager.states, self._pager.table, self._uffd.fd, PAGEFAULT_CODE)
            self._send(Register(mappings=()))
        else:
            table = tuple((m.address, m.length, index, 0) for index, m in enumerate(self._mappings))
            self._send(Register(mappings=table), (self._uffd.fd,))
        self._expect(deadline, Accept)  # the control state machine lets nothing else through

    def _rejoin_service(self) -> bool:
        """The service went away before End (delegated): join the one that takes its place.

        Retries the socket for ``rejoin`` seconds.  The new service must serve the same
        session over the same memory (the same files: our mappings stay); we register
        the same table with the same userfaultfd, and it wakes our threads to fault again.

        Returns:
            True when joined again; False if no service came back in time.

        Raises:
            PostcopyError: a service came back with another migration or other memory.
        """
        give_up = time.monotonic() + self._rejoin
        while not self._stopping:
            try:
                channel = _connect(self._socket_path, self._timeout)
            except PostcopyError:
                if time.monotonic() > give_up:
                    return False
                time.sleep(0.01)
                continue
            try:
                return self._join_again(channel)
            except ConnectionError:  # that service went away during the handshake: try the next
                continue
        return False

    def _join_again(self, channel: BlockingControlChannel) -> bool:
        """One handshake with a service that came back; True once accepted."""
        with self._send_lock:
            self._channel.close()
            self._channel, self._control = channel, ClientControl()
        self._send(ClientHello(version=PROTOCOL_VERSION, pid=os.getpid(), name=self.name, mode=self.mode))
        deadline = time.monotonic() + self._timeout
        blocks = self._expect(deadline, Blocks)
        fds = self._channel.take_fds(len(blocks.blocks))
        try:
            same = blocks.session_id == self.session_id and len(fds) == len(self._shms) and all(
                _same_file(fd, shm.fd) for fd, shm in zip(fds, self._shms))
        finally:
            for fd in fds:
                os.close(fd)
        if not same:
            raise PostcopyError("the service that came back serves another migration or other memory")
        table = tuple((m.address, m.length, index, 0) for index, m in enumerate(self._mappings))
        self._send(Register(mappings=table), (self._uffd.fd,))
        self._expect(deadline, Accept)
        self.rejoins += 1
        return True

    def _expect(self, deadline: float, kind: type) -> Message:
        if isinstance(message := self._next_message(deadline), (Reject, Error)):
            raise _service_error(message.code, message.text, f"the service refused us instead of {kind.__name__}")
        return message

    # -- the control channel: the state machine checks each message both ways --------

    def _send(self, message: Message, fds: Iterable[int] = ()) -> None:
        """Check and send one message.  Raises ClosedError, OSError, TimeoutError, ProtocolError."""
        with self._send_lock:  # the state machine and the socket see messages in one order
            self._control.send(message)
            self._channel.send(message, fds)

    def _receive(self) -> list[Event]:
        """What has arrived (never blocks), each message checked; ConnectionClosed last at EOF
        (a connection reset by a service that died counts as its end too).

        While a self-served client runs, the Placed frames at the front are its fault path: their
        pages are marked and woken here, from the runs taken off the wire, with no message built
        (the state machine keeps RUNNING for a Placed then, so there is nothing to step)."""
        placed: list[tuple[int, int, int]] | None = (
            [] if self._pager is not None and self._control.phase is Phase.RUNNING else None)
        read_ns = time.monotonic_ns() if trace.ENABLED else 0
        try:
            events = self._channel.receive_nowait(placed, self._lane_receive if self._lane is not None else None)
        except ConnectionError:
            return [CONNECTION_CLOSED]
        if placed:
            self._on_placed(placed, read_ns)
        for event in events:
            if not isinstance(event, ConnectionClosed):
                self._control.receive(event)
        return events

    def _next_message(self, deadline: float) -> Message:
        """Wait for one message (handshake).  Raises PostcopyError at EOF, TimeoutError."""
        try:
            event = self._channel.receive(deadline)
        except TimeoutError:
            raise TimeoutError("the service did not answer in time") from None
        if isinstance(event, ConnectionClosed):
            raise ServiceGoneError("the service closed the control connection during the handshake")
        self._control.receive(event)
        return event

    # -- the background thread: the control socket, and our uffd when self-served ----

    def _run(self) -> None:
        name_native_thread(threading.current_thread().name)
        poller = select.poll()
        for fd in (self._wakefd, self._channel.fileno()) + ((self._uffd.fd,) if self._pager else ()):
            poller.register(fd, select.POLLIN)
        uffd = self._uffd.fd if self._pager is not None else -1  # registered above for good
        try:
            self._on_events(self._receive())
            while not self._stopping and not self._done.is_set():
                for fd, _ in poller.poll():
                    if fd == uffd:
                        self._serve_faults()
                    elif fd == self._channel.fileno():
                        self._on_events(self._receive())
                if self._rejoined is not None:  # a new control socket to watch
                    poller.unregister(self._rejoined)
                    poller.register(self._channel.fileno(), select.POLLIN)
                    self._rejoined = None
        except BaseException as exc:  # noqa: BLE001 - reported by wait_end()
            if isinstance(exc, RemoteProtocolError):
                with contextlib.suppress(Exception):
                    self._send(Error(code=ErrorCode.PROTOCOL, text=str(exc)[:LIMITS.max_text]))
            self._finish(failure=exc)

    def _on_events(self, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, Placed):  # the state machine admits it in self-served mode only
                self._on_placed([(run.block, run.first, run.count) for run in event.runs], 0)
            elif isinstance(event, End):
                if event.complete and self._pager is not None:
                    while self._uffd.read_events(64):  # queued faults: every page is in, just wake
                        pass
                    self._wake(self._pager.wake_all())  # every page is in: nobody may stay asleep
                self._say_bye()
                return self._finish(end=event)
            elif isinstance(event, (Reject, Error)):
                return self._finish(failure=_service_error(event.code, event.text, "the service dropped us"))
            elif isinstance(event, ConnectionClosed):
                old = self._channel.fileno()
                if self._pager is None and self._rejoin > 0 and self._rejoin_service():
                    self._rejoined = old
                    return None
                return self._finish(failure=PostcopyError(
                    "the service closed the control connection before End; threads waiting for pages stay blocked"))

    def _lane_receive(self, sock: int, buffer: memoryview) -> tuple[int, int, list[int], bool]:
        """The control socket read by the C lane, which takes the Placed frames at the front of what
        arrived (their pages marked and woken, in the same call): see
        :meth:`~aiopostcopy.transport.fdstream.BlockingControlChannel.receive_nowait`."""
        read_ns = time.monotonic_ns() if trace.ENABLED else 0
        got, consumed, settled, fds, truncated, runs = self._lane.receive(sock, buffer)  # type: ignore[union-attr]
        self._pager.lane_settled(settled)  # type: ignore[union-attr]  (a lane means a pager)
        if trace.ENABLED:  # every page of each run (the service merges the runs of several faults)
            for block, first, count in runs:
                for page in range(first, first + count):
                    trace.mark("placed-read", block, page, read_ns)
                    trace.mark("client-woke", block, page)
        return got, consumed, fds, truncated

    def _on_placed(self, runs: list[tuple[int, int, int]], read_ns: int) -> None:
        """The service placed these runs ``(block, first, count)``: wake our threads waiting there
        (``read_ns``: when the read that brought them began, for the trace; 0: now)."""
        if trace.ENABLED:  # every page of each run (the service merges the runs of several faults)
            for block, first, count in runs:
                for page in range(first, first + count):
                    trace.mark("placed-read", block, page, read_ns or None)
        self._wake(self._pager.placed_runs(runs))  # type: ignore[union-attr]  (Placed: self-served only)
        if trace.ENABLED:
            for block, first, count in runs:
                for page in range(first, first + count):
                    trace.mark("client-woke", block, page)

    def _say_bye(self) -> None:
        """Answer End with Bye at once: we need nothing more from the service, which waits
        a short grace for it before it closes (docs/protocol.md section 5.2)."""
        try:
            self._send(Bye())
            self._bye = "sent"
        except (OSError, PostcopyError) as exc:  # the service went away first: End was its last word
            self._bye = f"not sent: {type(exc).__name__}: {exc}"

    def _serve_faults(self) -> None:
        """Our userfaultfd is readable: ask for the pages of its faults, in one ClientRequest per
        read, and wake the threads of pages known placed.  The C lane takes a read's faults while
        the pager queues nothing (the usual case); other events, and any read then, go the
        pager's way."""
        read_ns = time.monotonic_ns() if trace.ENABLED else 0
        pager, lane, uffd = self._pager, self._lane, self._uffd
        if lane is None or not pager.lane_ready():  # type: ignore[union-attr]
            events = uffd.read_events(64)
            return self._serve_events(events, read_ns, full=len(events) == 64)
        while True:
            count = uffd.read_flat(64)
            with self._send_lock:  # the lane writes the ClientRequest: every other writer waits
                sock = self._channel.write_fd() if self._control.phase is Phase.RUNNING else -1
                taken, asked, rest, wakes, thread_ids = lane.faults(uffd.slots_address, count, sock)
                if rest and sock >= 0:  # what the socket did not take goes next
                    self._channel.send_frame(rest)
            pager.lane_took(len(asked), thread_ids)  # type: ignore[union-attr]
            if asked:
                if sock < 0:  # not running: built and checked as any message
                    self._send_pages(asked)
                if trace.ENABLED:
                    for block, page in asked:
                        trace.mark("fault-read", block, page, read_ns)
                        trace.mark("client-sent", block, page)
            self._wake(wakes)
            if taken < count:  # another event, or a fault outside our mappings: the pager's way
                return self._serve_events(uffd.events_read(taken, count), read_ns, full=count == 64)
            if count < 64:  # a short read emptied the queue
                return

    def _serve_events(self, events: list, read_ns: int, *, full: bool) -> None:
        """The pager's way of :meth:`_serve_faults`, from ``events`` read already (``full``: the
        read that brought them was full, so more may be queued; a short read emptied the queue)."""
        pager, wakes = self._pager, []
        while True:
            wakes += [w for e in events if type(e) is PageFault and (w := pager.fault(e.address, e.thread_id))]
            if not full:
                break
            events = self._uffd.read_events(64)
            full = len(events) == 64
        pages = pager.take_pages()
        if pages is not None:  # the usual read: each fault's page asked for alone, in one frame
            self._send_pages(pages)
            if trace.ENABLED:
                for block, page in pages:
                    trace.mark("fault-read", block, page, read_ns)
                    trace.mark("client-sent", block, page)
        for request in pager.requests():
            self._send(request)
        self._wake(wakes)

    def _send_pages(self, pages: list[tuple[int, int]]) -> None:
        """Ask for pages the pager took, in one ClientRequest: encoded straight from the pages while
        running (a ClientRequest keeps the phase: nothing for the state machine to advance),
        else built and checked as any message."""
        with self._send_lock:
            if self._control.phase is Phase.RUNNING:
                self._channel.send_frame(encode_client_request(pages))
                return
        self._send(ClientRequest(runs=tuple(PageRun(block=block, first=page, count=1) for block, page in pages)))

    def _wake(self, ranges: list[tuple[int, int]]) -> None:
        for address, length in ranges:
            self._uffd.wake(address, length)

    def _finish(self, *, end: End | None = None, failure: BaseException | None = None) -> None:
        with self._lock:
            if self._done.is_set():
                return
            self._end, self._failure = end, failure
            self._done.set()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()

    # -- public ------------------------------------------------------------------------

    def add_done_callback(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` once End, a failure or our leaving happened (maybe from the client's thread)."""
        with self._lock:
            if not self._done.is_set():
                return self._callbacks.append(callback)
        callback()

    @property
    def blocks(self) -> dict[str, memoryview]:
        """The mapped blocks by name (touch missing pages only without the GIL).  ClosedError after leaving."""
        if self._left:
            raise ClosedError("the client has left")
        return dict(self._views)

    @property
    def block_addresses(self) -> dict[str, int]:
        """Where each block is mapped in this process, by name."""
        return {info.name: m.address for info, m in zip(self.block_info, self._mappings)}

    def wait_end(self, timeout: float | None = None) -> bool:
        """Wait for End.

        Returns:
            True once End(complete=True) arrived; False if ``timeout`` passed first.

        Raises:
            MigrationAborted: the migration ended before every page arrived.
            PostcopyError: the service hung up, reported an error or dropped us (a subclass names
                the cause: MappingTableError, LocalProtocolError, ...); ClosedError if we left first.
        """
        if not self._done.wait(timeout):
            return False
        if self._end is None:
            raise self._failure  # type: ignore[misc]
        if not self._end.complete:
            raise MigrationAborted("the service ended the migration before every page arrived")
        return True

    def statistics(self) -> dict:
        """Counters; self-served: faults handled here by outcome, and per faulting thread id."""
        stats = {"mode": self.mode.value, "blocks": len(self.block_info), "ended": self._done.is_set(),
                 "rejoins": self.rejoins, "failure": None if self._failure is None else str(self._failure),
                 "bye": self._bye}
        if self._pager is not None:
            stats.update(self._pager.statistics(), threads=dict(self._pager.threads))
            for name, count in (self._lane.totals() if self._lane is not None else {}).items():
                stats[name] += count
        return stats

    def leave(self) -> None:
        """After End (our thread said Bye when it came): stop the thread, unregister, close the uffd,
        unmap, close the fds.

        Views from :attr:`blocks` are released; drop slices of them first.

        Raises:
            BusyError: the migration is still running (wait_end() first, or abandon()).
        """
        if not self._left and not self._done.is_set():
            raise BusyError("the migration is still running: wait_end() first, or abandon() to give up")
        self.abandon()

    def abandon(self) -> None:
        """Leave now, pages missing or not: the memory is unmapped before the uffd is closed."""
        if not self._left:
            self._close(complete=self._end is not None and self._end.complete)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.abandon()

    def _close(self, *, complete: bool, bye: bool = True) -> None:
        self._left = self._stopping = True
        if bye and self._control.phase is not Phase.CLOSED:
            with contextlib.suppress(OSError, PostcopyError):
                self._send(Bye())
        if self._thread is not None:
            os.eventfd_write(self._wakefd, 1)
            if self._thread is not threading.current_thread():
                self._thread.join()
            os.close(self._wakefd)
        try:
            self._release_memory(complete)
        finally:
            self._channel.close()
            self._finish(failure=ClosedError("the client left before End"))

    def _release_memory(self, complete: bool) -> None:
        uffd, self._uffd, busy = self._uffd, None, False
        self._views.clear()
        if complete and uffd is not None:  # every page is in: unregistering cannot zero-fill anything
            for mapping in self._mappings:
                with contextlib.suppress(UffdError):
                    uffd.unregister(mapping.address, mapping.length)
            uffd.close()
            uffd = None
        for mapping in self._mappings:
            try:
                mapping.close()  # munmap also drops the range's registration
            except BufferError:  # views still exported: the mapping stays
                busy = True
        if uffd is not None and busy:
            _KEPT_OPEN.append(uffd)  # a missing page there must keep blocking, never read zeros
        elif uffd is not None:
            uffd.close()
        for shm in self._shms:
            shm.close()
        self._mappings, self._shms = [], []


def _connect(socket_path: str, timeout: float) -> BlockingControlChannel:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout)
        sock.connect(socket_path)
    except OSError as exc:
        sock.close()
        raise PostcopyError(f"cannot reach the service at {socket_path}: {exc}") from exc
    return BlockingControlChannel(sock, send_timeout=timeout, allowed=SERVICE_SENDS)


def _same_file(fd: int, other: int) -> bool:
    a, b = os.fstat(fd), os.fstat(other)
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


class AsyncClient:
    """:class:`Client` for asyncio: the same attributes; join, wait_end, leave and abandon are awaitable."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self._done: asyncio.Future | None = None

    @classmethod
    async def join(cls, socket_path: str, **options: object) -> AsyncClient:
        """:meth:`Client.join` in the default executor (same arguments and errors)."""
        future = asyncio.get_running_loop().run_in_executor(None, functools.partial(Client.join, socket_path,
                                                                                    **options))
        try:
            return cls(await asyncio.shield(future))
        except asyncio.CancelledError:  # the join goes on in its thread: give it up once it is done
            future.add_done_callback(lambda f: f.cancelled() or f.exception() or f.result().abandon())
            raise

    def __getattr__(self, name: str) -> object:
        return getattr(self.client, name)

    async def wait_end(self, timeout: float | None = None) -> bool:
        """Await End without parking a thread; result and errors as :meth:`Client.wait_end`."""
        if self._done is None or self._done.get_loop() is not asyncio.get_running_loop():
            loop, self._done = asyncio.get_running_loop(), asyncio.get_running_loop().create_future()
            done = self._done
            self.client.add_done_callback(lambda: loop.call_soon_threadsafe(lambda: done.done() or done.set_result(0)))
        try:
            await asyncio.wait_for(asyncio.shield(self._done), timeout)
        except asyncio.TimeoutError:
            return False
        return self.client.wait_end(0)

    async def leave(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.client.leave)

    async def abandon(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.client.abandon)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.abandon()
