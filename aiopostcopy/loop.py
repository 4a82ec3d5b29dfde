"""The destination service: the one place where asyncio, userfaultfd, the core and the wire meet.

Theory of operation
-------------------
:class:`PostcopyDestination` connects to a source on two channels (urgent and
background, opened and reconnected by :mod:`aiopostcopy.transport.channels`),
learns the RAMBlocks from the source's Hello, creates and maps their shared
memory (memfd, or files in a block directory), registers its own userfaultfd
on its mappings and serves clients on a Unix control socket.

Every source of work is a callback on the event loop:

* a userfaultfd is readable (``add_reader``, one per fd: the service's own and
  each delegated client's): read the queued ``uffd_msg`` (up to a short
  read, which means the queue is empty) and feed the faults to the :class:`~aiopostcopy.core.session.DestinationSession`;
* a message arrives on a channel: Pages payloads were received straight into
  page-aligned staging memory.  On the urgent channel the resulting ``Place``
  commands are carried out at once, before the next payload may reuse the
  buffer (one C call per run through the service's own mapping: UFFDIO_COPY
  per data stretch, UFFDIO_ZEROPAGE per stretch of zero pages).  On the
  background channel each payload lands in one of a few buffers and its
  placements go to the placement threads (:mod:`aiopostcopy.destination.background`); the
  channel is held while every buffer is out;
* a placement-thread job ends: its pages are reported placed, waking waiters;
* a control message arrives from a client;
* the session's timer fires.

An operator may watch and steer the migration (:mod:`aiopostcopy.destination.operator`,
docs/control.md): :meth:`PostcopyDestination.status`, :meth:`~PostcopyDestination.events`,
:meth:`~PostcopyDestination.recover`, :meth:`~PostcopyDestination.cancel` and
:meth:`~PostcopyDestination.set_max_bandwidth`, also served on a Unix socket
(``operator_path``).  The bandwidth cap charges every background payload to a
token bucket and holds the background channel while it is in debt, exactly as
a full set of staging buffers does; urgent pages are never charged.

Each of them schedules one *pass* (``call_soon``, at most one pending): the
pass flushes the session (faults of this loop turn coalesced into runs), sends
what the session wants sent, carries out its commands and re-arms the single
timer.  The session decides; this module only carries out.  Its clock is
``time.monotonic()``, not ``loop.time()``: uvloop's loop time has 1 ms
resolution, too coarse for fault latencies of tens of microseconds.

The urgent path (a fault, the case a blocked vCPU pays for) skips the pass at
both ends.  Each fault of a read of a userfaultfd on a missing page, with
nothing queued ahead of it, is accounted by
:meth:`~aiopostcopy.core.session.DestinationSession.fault_request`, and the
read's pages go out in one Request frame
(:func:`~aiopostcopy.transport.wire.encode_page_requests`) written in that same
callback.  A one-page answer on the urgent channel takes the decoder's one-page lane
straight into the urgent staging buffer (no message is built) and is
accounted by :meth:`~aiopostcopy.core.session.DestinationSession.urgent_page`,
placed with one UFFDIO_COPY from staging and its clients' threads woken before
the bookkeeping, with no message dispatch and no commands.  A self-served
client's faults (a ClientRequest of a few runs, taken by the control channel's
shortcut) go the same way: their pages are asked for in the callback that read
the request (:meth:`~aiopostcopy.core.session.DestinationSession.client_fault_request`),
and a read of faults that only joined or found their page placed carries out
its commands without a pass.  Anything unusual
(EEXIST, EAGAIN, a Discard pending, a lost channel) falls back to the general
path, which the session treats identically.

Kernel rules kept here (DESIGN.md section 2): a client's page is placed
through *our* mapping and its thread woken on *its* fd; EEXIST counts as
placed and needs a wake; EAGAIN means drain events and retry the rest; a
client fd is never closed while the migration still owes it pages unless the
client is gone; the loop thread never touches memory that has not arrived.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import ssl
import threading
import uuid
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiopostcopy import trace
from aiopostcopy.destination.clients import ClientRegistry, ServicePort
from aiopostcopy.core.ramblock import BlockTable
from aiopostcopy.core.commands import (
    Abort,
    DiscardPages,
    MigrationComplete,
    NotifyPlaced,
    Place,
    PlaceZero,
    UnknownFault,
    Wake,
)
from aiopostcopy.core.config import DestinationConfig
from aiopostcopy.core.digests import FROM_COPY_FEATURE
from aiopostcopy.core.session import DestinationSession
from aiopostcopy.errors import (ClosedError, MigrationAborted, PageExistsError, RemoteProtocolError, SourceLostError,
                               SourceUnreachableError, UffdError, UffdRetry)
from aiopostcopy.destination.memory import (BlockMemory, Staging, adoptable_session, forget_session,
                                            remember_session)
from aiopostcopy.destination.operator import (
    TERMINAL_EVENTS,
    Monitor,
    OperatorEvent,
    OperatorPort,
    OperatorServer,
    OperatorStatus,
    TokenBucket,
    format_source,
)
from aiopostcopy.destination.fromcopy import CopyComparison
from aiopostcopy.destination.background import BackgroundPlacer
from aiopostcopy.destination.placer import Placement
from aiopostcopy.priority import set_niceness, thread_niceness
from aiopostcopy.messages import (LIMITS, Changed, Channel, Complete, Error, ErrorCode, Hello, Message, Pages,
                                  Request, Zero)
from aiopostcopy.destination.vhost_user import FrontEndPort, VhostUserFrontEnd
from aiopostcopy.destination.report import DestinationReport, build_report, remember_thread_name
from aiopostcopy.transport.channels import SourceChannels
from aiopostcopy.transport import request_lane
from aiopostcopy.transport.request_lane import RequestLane
from aiopostcopy.transport.stream import FrameProtocol
from aiopostcopy.transport.wire import Decoder, encode_page_request, encode_page_requests
from aiopostcopy.uffd import Feature, PageFault, RegisterMode, RemapEvent, UnmapEvent, Userfaultfd
from aiopostcopy.uffd.events import PAGEFAULT_CODE, SLOTS

__all__ = ["DestinationOptions", "PostcopyDestination", "OWN_FD"]

log = logging.getLogger("aiopostcopy.destination")

OWN_FD = "service"  #: session key of the service's own userfaultfd
#: Staging buffers of the background channel: one receiving, the rest queued for or being
#: placed.  A fault on a page in the queue waits for it, so the queue stays short: 16 buffers
#: gave a 10-40 ms p99 under the sweep, 4 kept it near 5 ms at the same throughput
#: (benchmarks/postcopy_bench.py).  Virtual memory: only the bytes received are touched.
_BACKGROUND_BUFFERS = 4
_PROGRESS_INTERVAL = 0.05  #: seconds between progress callbacks
_READ_BATCH = 64  #: uffd_msg read per read(2) from a userfaultfd


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class DestinationOptions:
    """How to reach the source and where to put memory.

    Attributes:
        source: ``(host, port)`` for TCP, or a Unix socket path.
        block_dir: directory for block files (left complete for the workload
            when the migration ends); None keeps blocks in memfds.
        control_path: Unix socket path where clients join; None for no clients.
        session_id: identifies this migration to the source (random if None).
        session: tuning of the fault-handling session.
        reconnect_interval: seconds between attempts after the source is lost.
        source_deadline: seconds without progress from the source (no pages
            arriving, whatever the cause) before the migration is aborted (None:
            wait for an explicit abort).
        source_idle_timeout: seconds without a byte from the source before its
            connections count as broken and are reconnected (it is pinged meanwhile).
        vhost_user: Unix socket paths of vhost-user back-ends to attach as
            postcopy clients (docs/vhost-user.md).
        operator_path: Unix socket path of the operator's control socket
            (docs/control.md); None for none.
        max_bandwidth: cap of the background stream in bytes per second
            (None: no cap); urgent pages are never held back.
        from_copy: the block files in ``block_dir`` hold an earlier copy of the
            memory: only the pages the source says changed migrate (docs/protocol.md,
            section 4.10); no client is admitted before the comparison ends.
        tls: open the channels over TLS with this client context, which must
            require and check the source's certificate
            (``aiopostcopy.transport.tls.TlsConfig.client_context()``); None: plain.
        tls_server_name: the name the source's certificate must carry (default:
            the host part of ``source``).
        nice: the nice value of the loop thread, the one that serves faults, while
            the service runs (None: leave it).  A value below the workload's keeps
            the threads it wakes from preempting it between faults; lowering it
            needs root or CAP_SYS_NICE (without, it stays as it was, and the log
            says so).  :meth:`close` gives the thread its value back.  Threads it
            starts meanwhile inherit the value (an executor's workers keep it);
            the zero-run thread is given the value from before.
        request_lane: write a fault's Request in C before the session's bookkeeping, when the
            urgent channel is a plain connection with nothing queued, and place its answer in
            C through the faulting fd as it arrives (:mod:`aiopostcopy.transport.request_lane`;
            over TLS the answers only); False: the session's Python path does both.
    """

    source: tuple[str, int] | str
    block_dir: str | None = None
    control_path: str | None = None
    session_id: str | None = None
    session: DestinationConfig = dataclasses.field(default_factory=DestinationConfig)
    reconnect_interval: float = 0.1
    source_deadline: float | None = 60.0
    source_idle_timeout: float | None = 5.0
    vhost_user: tuple[str, ...] = ()
    operator_path: str | None = None
    max_bandwidth: int | None = None
    from_copy: bool = False
    tls: ssl.SSLContext | None = None
    tls_server_name: str | None = None
    nice: int | None = None
    request_lane: bool = True


class PostcopyDestination:
    """The fault-thread service on the destination host.

    Use :meth:`start` (or ``async with``), then :meth:`wait_complete`.
    """

    def __init__(self, options: DestinationOptions, *,
                 open_userfaultfd: Callable[[], Userfaultfd] | None = None) -> None:
        """
        Args:
            options: where the source is and where memory goes.
            open_userfaultfd: opens the service's own userfaultfd (default: a real one with
                UFFD_FEATURE_THREAD_ID); tests pass an in-memory fake that keeps its contract.
        """
        self.options = options
        self._open_userfaultfd = open_userfaultfd or (lambda: Userfaultfd.open(Feature.THREAD_ID))
        # a block directory an earlier destination of a migration died in: take over its session
        adoptable = (adoptable_session(options.block_dir)
                     if options.block_dir and not options.session_id and not options.from_copy else None)
        if options.from_copy and options.block_dir is None:
            raise ValueError("from_copy needs a block_dir holding the copy")
        self._adopting = adoptable is not None
        self.session_id = options.session_id or adoptable or uuid.uuid4().hex
        self._loop = asyncio.get_running_loop()
        self._session = DestinationSession(session_id=self.session_id, config=options.session)
        self._comparison: CopyComparison | None = None
        if options.from_copy:
            self._session.features = (FROM_COPY_FEATURE,)
        self._staging = Staging(LIMITS.max_payload)  # the urgent channel's: placed inline
        self._placement: Placement | None = None
        self._lane: RequestLane | None = None  # the request and reply lanes (C), before the bookkeeping
        self._lane_keys: dict[int, object] = {}  # fd number -> key, of the fds the lane asked for
        self._lane_off: set[object] = set()  # keys whose mappings moved or went: their table may be stale
        self._placer: BackgroundPlacer | None = None
        self._receiving: Staging | None = None  # background buffer the current payload lands in
        self._memory: BlockMemory | None = None
        self._base_nice: int | None = None  # the loop thread's nice value before options.nice
        self._nice_thread = 0  # that thread's id
        self._uffd: Userfaultfd | None = None
        self._clients: ClientRegistry | None = None
        self._vhost_user: list[VhostUserFrontEnd] = []  # one per back-end
        self._hello: asyncio.Future[Hello] = self._loop.create_future()
        self._done: asyncio.Future[DestinationReport] = self._loop.create_future()
        self._source = SourceChannels(self._loop, options.source, _ChannelSink(self),
                                      reconnect_interval=options.reconnect_interval, deadline=options.source_deadline,
                                      idle_timeout=options.source_idle_timeout, tls=options.tls,
                                      server_name=options.tls_server_name)
        self._pass_pending = False
        self._drains = 0  #: EAGAIN drains of our userfaultfd while placing (a placement's wake plan is void after one)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when: float | None = None
        self._started_at = time.monotonic()
        self._progress: list[Callable[[Any], None]] = []
        self._next_progress = 0.0
        self._named_threads: set[int] = set()
        self._closed = False
        # the operator's view (docs/control.md)
        self._monitor = Monitor(self._started_at)
        self._bucket = TokenBucket(options.max_bandwidth, self._started_at) if options.max_bandwidth else None
        self._throttle: asyncio.TimerHandle | None = None  #: set while the cap holds the background channel
        self._subscribers: set[asyncio.Queue[OperatorEvent | None]] = set()
        self._observing = False
        self._last_event: OperatorEvent | None = None
        self._error: str | None = None
        self._cancelled = False
        self._operator: OperatorServer | None = None

    # -- public --------------------------------------------------------------

    async def start(self) -> None:
        """Connect to the source, create and register the blocks, open the control socket.

        Raises:
            SourceUnreachableError: no connection to the source could be opened.
            SourceLostError: the source closed the connection before its Hello.
            ConfigurationError: the block directory cannot hold the blocks.
            OSError: a block could not be created (e.g. FileExistsError, naming the path).
            UffdError: userfaultfd could not be opened or registered.
        """
        self._raise_priority()
        try:
            await self._source.connect()
        except OSError as exc:
            if self._hello.done() and not self._hello.cancelled():
                self._hello.exception()  # the urgent channel's loss, told by this error instead
            raise SourceUnreachableError(f"cannot reach source {self.options.source!r}: {exc}") from exc
        await self._hello  # a local error setting up the blocks comes through as itself
        if self._comparison is not None:
            await self._compare_copy(self._comparison)
        if self.options.control_path is not None or self.options.vhost_user:
            assert self._memory is not None
            port = ServicePort(session_id=self.session_id, session=self._session, memory=self._memory,
                               read_faults=self._serve_faults, schedule_pass=self._schedule_pass,
                               fd_retired=self._forget_fd, request_runs=self._request_runs)
            self._clients = ClientRegistry(port, self.options.control_path)
        if self.options.operator_path is not None:
            self._operator = OperatorServer(OperatorPort(
                status=self.status, events=self.events, recover=self.recover, cancel=self.cancel,
                set_max_bandwidth=self.set_max_bandwidth), self.options.operator_path)
            await self._operator.start()
        self._schedule_pass()
        if self.options.vhost_user:
            assert self._clients is not None and self._memory is not None
            port = FrontEndPort(registry=self._clients, memory=self._memory,
                                is_complete=lambda: self._session.complete, abort=self.abort,
                                wait_complete=self.wait_complete)
            for path in self.options.vhost_user:  # the fault loop serves them while they set up
                self._vhost_user.append(front_end := VhostUserFrontEnd(port, path))
                await front_end.start()

    def _raise_priority(self) -> None:
        """Give the loop thread ``options.nice`` (kept for :meth:`close` to restore)."""
        if self.options.nice is None or self._base_nice is not None:
            return
        self._nice_thread = threading.get_native_id()
        self._base_nice = thread_niceness()
        if not set_niceness(self.options.nice):
            log.info("the fault path stays at nice %d: nice %d needs root or CAP_SYS_NICE",
                     self._base_nice, self.options.nice)

    async def __aenter__(self) -> "PostcopyDestination":
        try:
            await self.start()
        except BaseException:  # what start() made (blocks, fds, sockets) must not outlive it
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def wait_complete(self) -> DestinationReport:
        """Wait until every page is placed; returns the final report.

        Raises:
            MigrationAborted: aborted explicitly or by the source deadline.
        """
        return await asyncio.shield(self._done)

    def abort(self, reason: str = "aborted by the caller") -> None:
        """End the migration without completing it (faulting threads stay blocked
        until their process ends: pages are never zero-filled)."""
        if self._done.done():
            return
        self._session.abort(reason, time.monotonic())
        self._send_messages()  # Error(aborted) tells the source it is over
        self._source.close()
        self._fail(MigrationAborted(reason))

    @property
    def uffd_mode(self) -> str:
        """How the service's userfaultfd was opened, and what that means."""
        if self._uffd is None:
            return "not open"
        return f"{self._uffd.mode.value} ({self._uffd.mode.meaning})"

    @property
    def blocks(self) -> BlockTable:
        return self._memory.table if self._memory else BlockTable([])

    def memory(self, name: str) -> memoryview:
        """The service's mapping of block ``name``, for the embedding application's
        threads.  Never touch it from the event-loop thread before completion."""
        assert self._memory is not None
        return self._memory.view(name)

    def block_path(self, name: str) -> str | None:
        assert self._memory is not None
        return self._memory.path(name)

    def statistics(self) -> DestinationReport:
        """A live snapshot of the migration's figures."""
        return self._build_report(final=False)

    def on_progress(self, callback: Callable[[DestinationReport], None]) -> None:
        """Call ``callback`` with a statistics snapshot at most every 50 ms, and once at the end."""
        self._progress.append(callback)

    # -- the operator's verbs (docs/control.md) -----------------------------------

    @property
    def state(self) -> str:
        """``running``, ``source_lost``, ``complete``, ``failed`` or ``cancelled``."""
        if self._done.done():
            if self._cancelled:
                return "cancelled"
            return "failed" if self._error is not None else "complete"
        return "source_lost" if self._monitor.source_down else "running"

    @property
    def max_bandwidth(self) -> int | None:
        """The background stream's cap in bytes per second (None: no cap)."""
        return self._bucket.rate if self._bucket is not None else None

    def status(self) -> OperatorStatus:
        """A live :class:`OperatorStatus`: the statistics plus state, source, rate, estimate and outages."""
        report = self.statistics()
        now = time.monotonic()
        byte_rate, page_rate = self._monitor.rates(now, report.bytes_received, report.pages_placed)
        left = report.pages_total - report.pages_placed
        remaining = 0.0 if left <= 0 else (left / page_rate if page_rate > 0 else None)
        channels = self._source.channels
        return OperatorStatus(
            state=self.state, source=format_source(self._source.source),
            source_connected=len(channels) == 2 and all(p.is_open for p in channels.values()),
            max_bandwidth=self.max_bandwidth, rate_bytes_per_s=byte_rate, remaining_s=remaining,
            outages=self._monitor.outages, outage_s=self._monitor.outage_s(now), error=self._error, report=report)

    def events(self) -> AsyncIterator[OperatorEvent]:
        """Events from now on (subscribed at the call), ending after ``complete`` or ``failed``.

        Client and integrity events are noticed on the progress tick (at most
        50 ms late while the migration runs).  A subscriber more than 4096
        events behind gets an ``overflow`` event and its stream ends.
        """
        queue: asyncio.Queue[OperatorEvent | None] = asyncio.Queue(maxsize=4096)
        if not self._observing:
            self._observing = True
            self.on_progress(self._observe)
        if self._done.done():
            if self._last_event is not None:
                queue.put_nowait(self._last_event)
            queue.put_nowait(None)
        else:
            self._subscribers.add(queue)
        return self._event_stream(queue)

    async def _event_stream(self, queue: asyncio.Queue[OperatorEvent | None]) -> AsyncIterator[OperatorEvent]:
        try:
            while (event := await queue.get()) is not None:
                yield event
        finally:
            self._subscribers.discard(queue)

    def recover(self, source: tuple[str, int] | str) -> None:
        """Point the service at a new source address and reconnect now (QEMU's ``migrate_recover``).

        Channels still open to the old source are dropped, as after a loss; the
        new source gets Resume with what has arrived, and a full ``source_deadline``.

        Raises:
            ClosedError: the migration is over.
        """
        if self._done.done() or self._closed:
            raise ClosedError(f"the migration is over ({self.state}): nothing to recover")
        self._source.redirect(source)

    def cancel(self, reason: str = "cancelled by the operator") -> None:
        """End the migration now (an :meth:`abort` that :attr:`state` reports as ``cancelled``)."""
        if not self._done.done():
            self._cancelled = True
            self.abort(reason)

    def set_max_bandwidth(self, rate: int | None) -> None:
        """Cap the background stream at ``rate`` bytes per second (None or 0: no cap).

        Raises:
            ValueError: a negative rate.
        """
        if rate is not None and rate < 0:
            raise ValueError(f"max_bandwidth cannot be negative, got {rate}")
        self._bucket = TokenBucket(rate, time.monotonic()) if rate else None
        if self._throttle is not None:
            self._throttle.cancel()
            self._unthrottle()

    def _emit(self, kind: str, **fields: object) -> None:
        event = OperatorEvent(kind=kind, time=time.time(), fields=fields)
        terminal = kind in TERMINAL_EVENTS
        if terminal:
            self._last_event = event
        for queue in list(self._subscribers):
            try:
                queue.put_nowait(event)
                if terminal:
                    queue.put_nowait(None)
            except asyncio.QueueFull:
                self._subscribers.discard(queue)
                while not queue.empty():
                    queue.get_nowait()
                queue.put_nowait(OperatorEvent(kind="overflow", time=event.time, fields={}))
                queue.put_nowait(None)
        if terminal:
            self._subscribers.clear()

    def _observe(self, report: DestinationReport) -> None:
        """A progress tick: client and integrity events, and a rate sample."""
        registry = self._clients
        active = [c.key for c in registry if registry.get(c.key) is c] if registry is not None else []
        for kind, fields in self._monitor.observe(report.clients, active, report.integrity_pages):
            self._emit(kind, **fields)
        self._monitor.sample(time.monotonic(), report.bytes_received, report.pages_placed)

    # -- the bandwidth cap -------------------------------------------------------

    def _throttle_if_over(self) -> None:
        """Hold the background channel until the cap's budget is paid back."""
        assert self._bucket is not None
        delay = self._bucket.wait_time(time.monotonic())
        if delay > 0:
            self._source.hold_background()
            self._throttle = self._loop.call_later(delay, self._unthrottle)

    def _unthrottle(self) -> None:
        self._throttle = None
        if self._done.done() or self._closed:
            return
        delay = self._bucket.wait_time(time.monotonic()) if self._bucket is not None else 0.0
        if delay > 0:  # early (uvloop's timers have 1 ms resolution): still held, wait the rest
            self._throttle = self._loop.call_later(delay, self._unthrottle)
        elif self._placer is None or self._placer.has_free():
            self._source.release_background()

    async def close(self) -> None:
        """Release everything in order; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._base_nice is not None:  # back to what it was (raising a nice value needs no privilege)
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, self._nice_thread, self._base_nice)
        if not self._done.done():
            self._fail(MigrationAborted("destination closed before completion"))
            self._done.exception()  # retrieved here: closing early is not an error to log
        if self._throttle is not None:
            self._throttle.cancel()
        if self._operator is not None:
            await self._operator.close()
        await self._source.stop_reconnecting()
        for front_end in self._vhost_user:
            await front_end.close()  # after completion: POSTCOPY_END first
        if self._clients is not None:
            await self._clients.aclose(complete=self._session.complete)  # waits briefly for Byes
        self._source.close()
        if self._placer is not None:
            self._placer.close()  # a placement still running must end before munmap
        complete = self._session.complete
        if complete:
            self._close_own_uffd()
        if self._memory is not None:
            self._memory.close(complete=complete)
            if self.options.block_dir is not None:
                forget_session(self.options.block_dir)  # ended here: nothing is left to adopt
        if not complete:
            # Only after munmap: closing a userfaultfd wakes its waiters, and a
            # thread of this process retrying on a still-mapped, no longer
            # registered range would read a zero page.  Unmapped, it faults loudly.
            self._close_own_uffd()
        if self._timer is not None:
            self._timer.cancel()

    # -- source channels -------------------------------------------------------

    def _channel_opened(self, channel: Channel, proto: FrameProtocol) -> None:
        """A channel to the source is up: hold it while every buffer is out, then say Hello."""
        if channel is Channel.BACKGROUND and (self._throttle is not None or
                                              (self._placer is not None and not self._placer.has_free())):
            proto.hold()  # released when a placement in flight gives its buffer back
        proto.send(self._session.hello(channel))

    def _channels_dropped(self, channels: tuple[Channel, ...]) -> None:
        """The channels to the source were dropped: tell the session (a reconnect replaces both)."""
        if self._done.done():
            return
        if self._placer is not None:  # a payload cut short by the loss never becomes a message
            self._placer.give_back(self._receiving)
        self._receiving = None
        now = time.monotonic()
        for channel in channels:
            self._session.connection_lost(channel, now)
        if self._comparison is not None and Channel.URGENT in channels:
            self._comparison.abandon()  # the pages not yet compared migrate

    def _source_lost(self, error: SourceLostError) -> bool:
        """Reconnect after a loss, unless the handshake never finished or the migration is over."""
        if self._done.done():
            return False
        if not self._hello.done():
            self._hello.set_exception(error)
            return False
        if self._hello.exception() is not None:  # setting up after the Hello failed: nothing to go back to
            return False
        self._monitor.source_lost(time.monotonic())
        self._emit("source_lost", source=format_source(self._source.source), error=str(error))
        return True

    def _copy_changed(self, msg: Changed) -> None:
        if self._comparison is None:
            raise RemoteProtocolError("Changed while no earlier copy is being compared")
        self._comparison.answered(msg)

    def _channels_restored(self) -> None:
        """Both channels are up again after a loss (the session sends Resume on the source's Hello)."""
        outage = self._monitor.source_regained(time.monotonic())
        self._emit("source_regained", source=format_source(self._source.source), outage_s=outage)
        self._schedule_pass()

    def _payload_sink(self, channel: Channel, header: Pages, nbytes: int) -> memoryview:
        """Where a Pages payload lands, once the session has checked its size against the run."""
        self._session.check_payload(header, nbytes)
        if channel is Channel.URGENT:
            return self._staging.view(nbytes)
        if self._bucket is not None:  # the cap: charged here, held after the message if in debt
            self._bucket.charge(nbytes, time.monotonic())
        if self._placer is None:
            return self._staging.view(nbytes)
        self._placer.give_back(self._receiving)  # a payload whose message never came (an error)
        self._receiving = self._placer.take(nbytes)
        return self._receiving.view(nbytes)

    def _page_sink(self, block: int, page: int, nbytes: int) -> memoryview | None:
        """Where the payload of a one-page Pages on the urgent channel lands: the urgent staging
        buffer, once the session has checked the page; None before the placement exists."""
        if self._placement is None:
            return None
        self._session.check_page(block, page, nbytes)
        return self._staging.view(nbytes)

    def _page_landed(self, block: int, page: int) -> None:
        """A one-page answer is in the urgent staging buffer: the urgent path, placed with one
        UFFDIO_COPY and its clients' threads woken at once, with no message handling, no
        commands and no pass; or, when the session wants it, the general path with the Pages
        message it stands for."""
        if trace.ENABLED:
            trace.mark("answer-read", block, page)
        session = self._session
        wanted = session.urgent_page(block, page, target=self._clients is not None)
        if wanted is None:
            return self._on_source_message(Channel.URGENT, Pages(block=block, first=page, count=1))
        if trace.ENABLED:
            trace.mark("reply", block, page)
        if wanted is not False:
            if wanted is True or not self._copy_to_client(block, page, wanted):
                self._place_page(block, page)
            self._run_commands(None)
        if session.pass_due:
            self._schedule_pass()

    def _place_answers(self, decoder: Decoder) -> None:
        """Bytes arrived on the urgent channel: the reply lane places the answers at their front
        (one-page Pages of REQUESTED pages the lanes remember: the fd and address of the fault,
        or the service's own for a Request the session wrote) with one UFFDIO_COPY each, which
        wakes the threads waiting there; then the session accounts them and the decoder skips
        their frames.  It stops at anything else, which the decoder decodes as before."""
        lane = self._lane
        if lane is None or not self._lane_keys:
            return
        unread = decoder.unread()
        if unread is None or not self._session.lane_may_place():
            return
        answer_ns = time.monotonic_ns() if trace.ENABLED else 0
        placed, consumed = lane.place(*unread)
        if not placed:
            return
        placed_ns = time.monotonic_ns() if trace.ENABLED else 0  # each copy woke its fault's threads
        decoder.skip(consumed)
        try:
            now = time.monotonic()
            for block, page, fd, address, zero in placed:
                self._session.placed_through(block, page, self._lane_keys[fd], address, now, zero=zero)
                if trace.ENABLED:
                    trace.mark("answer-read", block, page, answer_ns)
                    trace.mark("reply", block, page, placed_ns)
                    trace.mark("woken", block, page, placed_ns)
            self._source.note_progress(len(placed))
            self._run_commands(None)
        except Exception as exc:  # never swallow: the service fails visibly
            self._fail(exc)
            return
        if self._session.pass_due:
            self._schedule_pass()

    def _on_source_message(self, channel: Channel, msg: Message) -> None:
        now = time.monotonic()
        if type(msg) is Changed:
            return self._copy_changed(msg)
        self._session.message_received(channel, msg, now)
        if self._memory is None and type(msg) is Hello:
            self._set_up_memory(msg)
        if type(msg) is Hello and channel is Channel.URGENT and self._comparison is not None:
            self._comparison.source_compares = FROM_COPY_FEATURE in msg.features
        if channel is Channel.BACKGROUND and self._placer is not None:
            self._hand_over(msg)
        elif trace.ENABLED and type(msg) in (Pages, Zero):
            trace.mark("reply", msg.block, msg.first)
            self._run_commands(self._staging)
            trace.mark("woken", msg.block, msg.first)
        else:
            self._run_commands(self._staging)
        if channel is Channel.BACKGROUND and self._bucket is not None and self._throttle is None:
            self._throttle_if_over()
        if channel is Channel.BACKGROUND or self._session.pass_due:  # an urgent reply seldom leaves work
            self._schedule_pass()

    def _place_page(self, block: int, page: int) -> None:
        """:meth:`_place` of one page from the urgent staging buffer, in one UFFDIO_COPY call; a page
        found present (EEXIST) or a retry (EAGAIN) goes the exact way, through :meth:`_place`.

        When the threads waiting on the page are all on one delegated client's userfaultfd
        (the usual fault), the copy goes through that fd into the client's mapping of the
        shared memory: the one ioctl places the page for everyone and wakes them, as CRIU's
        lazy-pages daemon places pages into the process it restores (:meth:`_copy_to_client`,
        tried first).  Any failure there (the client gone or unmapping, the page present)
        leaves the page to this, the service's own mapping, whose errors the exact path handles."""
        mapped = self._memory.block(block)  # type: ignore[union-attr]  (set with the placement)
        plan = self._session.wake_plan(block, page, 1)
        try:
            self._uffd.copy(mapped.address + page * mapped.page_size, self._staging.address,  # type: ignore[union-attr]
                            mapped.page_size)
        except (PageExistsError, UffdRetry):
            return self._place(Place(block, page, 1, 0), self._staging)
        for key, address, length in plan:
            self._wake_range(key, address, length)
        if trace.ENABLED:
            trace.mark("woken", block, page)
        self._session.placed(block, page, 1, time.monotonic(), prewoken=bool(plan))  # a 1 GiB copy takes a second

    def _copy_to_client(self, block: int, page: int, target: tuple[object, int]) -> bool:
        """Place the urgent page through the userfaultfd of the one delegated client waiting on it,
        ``target`` = ``(key, address)`` (see :meth:`_place_page`); False: the client is gone, or
        the copy failed (nothing placed)."""
        uffd = self._clients.uffd_of(target[0])  # type: ignore[union-attr]  (a target means clients)
        if uffd is None:
            return False
        size = self._session.blocks.page_sizes[block]  # type: ignore[union-attr]  (blocks before any page)
        try:
            uffd.copy(target[1], self._staging.address, size)
        except (UffdError, ClosedError):
            return False
        if trace.ENABLED:
            trace.mark("woken", block, page)
        self._session.copied_to_client(block, page, time.monotonic())  # woken after the copy
        return True

    def _hand_over(self, msg: Message) -> None:
        """Send a background message's placements to the placement thread; the rest runs here."""
        staging, self._receiving = (self._receiving, None) if type(msg) is Pages else (None, None)
        job = []
        for command in self._session.commands():
            if type(command) is Place or type(command) is PlaceZero:
                job.append(command)
            else:
                self._carry_out(command, None)
        assert self._placer is not None
        if not job:
            self._placer.give_back(staging)
        else:
            self._placer.submit(job, staging)
            if not self._placer.has_free():
                self._source.hold_background()
        self._run_commands(None)

    def _background_placed(self, placed: list, rest: list, staging: Staging | None,
                           error: BaseException | None) -> None:
        """A placement-thread job ended (on the loop thread)."""
        assert self._placer is not None
        if self._done.done() or self._closed:
            self._placer.give_back(staging)
            return
        try:
            if error is not None:
                raise error
            now = time.monotonic()
            for command, existed in placed:
                self._session.placed(command.block, command.first, command.count, now, existed_pages=existed)
            for command, page, existed in rest:  # EAGAIN on the thread: finish here, draining our events
                self._place(command, staging, start=page, existed=existed)
            self._run_commands(None)
        except Exception as exc:
            self._fail(exc)
            return
        finally:
            self._placer.give_back(staging)
        if self._placer.has_free() and self._throttle is None:  # a Zero run's job frees no buffer
            self._source.release_background()
        self._schedule_pass()

    def _set_up_memory(self, hello: Hello) -> None:
        """Create, map and register the blocks, synchronously: the payload of the
        next Pages frame must find them (it lands in the staging buffer right away)."""
        try:
            self._memory = BlockMemory.create(hello.blocks, self.options.block_dir, adopt=self._adopting,
                                              from_copy=self.options.from_copy)
            if self.options.from_copy:  # remembered once the copy is compared (a crash before: nothing to adopt)
                self._comparison = CopyComparison(self._memory)
            elif self.options.block_dir is not None:
                remember_session(self.options.block_dir, self.session_id)
            self._open_own_uffd()
            if self.options.request_lane and request_lane.available() and SLOTS == 4:
                self._lane = RequestLane(self._session.state_buffers(), self._session.blocks.page_sizes,
                                         PAGEFAULT_CODE)
                self._lane.set_own_mapping([block.address for block in self._memory])
            self._adopt_present_pages()
            largest = max(block.page_size for block in self._memory)
            if largest > LIMITS.max_payload:  # a 1 GiB page arrives whole in one frame (docs/protocol.md)
                self._staging = Staging.huge(largest)
            # one zeroed page of the largest size, made here once: both placing threads read it
            zero_page = self._staging.zeroed(largest)
            if self._lane is not None:
                self._lane.set_zero_page(zero_page, largest)
            self._placement = Placement(self._uffd, self._memory, zero_page)
            self._placer = BackgroundPlacer(self._loop, self._placement, buffers=_BACKGROUND_BUFFERS,
                                            buffer_size=LIMITS.max_payload, on_done=self._background_placed,
                                            huge_page_size=largest, zero_niceness=self._base_nice)
        except BaseException as exc:
            if not self._hello.done():
                self._hello.set_exception(exc)
            raise
        if not self._hello.done():
            self._hello.set_result(hello)

    def _adopt_present_pages(self) -> None:
        """Pages an earlier destination of this session placed count as placed (crash recovery)."""
        assert self._memory is not None
        if not self._adopting:
            return
        now = time.monotonic()
        for block in self._memory:
            self._session.adopt_present(block.index, self._memory.present_runs(block.index), now)
        log.warning("adopted the partial blocks of session %s in %s: %d pages already here", self.session_id,
                    self.options.block_dir, self._session.statistics().pages_placed)
        self._schedule_pass()

    # -- own userfaultfd --------------------------------------------------------

    async def _compare_copy(self, comparison: CopyComparison) -> None:
        """from_copy: digest the copy, let the source say what changed, punch that, keep the rest."""
        assert self._memory is not None
        digests = await asyncio.to_thread(comparison.prepare)
        exchange = asyncio.ensure_future(comparison.exchange(
            digests, lambda msg: self._source.send(Channel.URGENT, msg), lambda: self._session.is_open(Channel.URGENT)))
        await asyncio.wait([exchange, self._done], return_when=asyncio.FIRST_COMPLETED)
        comparison.abandon()
        await exchange
        if self._done.done():  # the migration ended meanwhile: wait_complete() says how
            return
        runs, result = comparison.finish()
        self._comparison = None
        now = time.monotonic()
        for block, block_runs in enumerate(runs):
            self._session.adopt_present(block, block_runs, now)  # then Resume: the source sweeps the rest
        if self.options.block_dir is not None:
            try:
                remember_session(self.options.block_dir, self.session_id)
            except OSError as exc:  # hugetlbfs takes no write(); its blocks could not be adopted anyway
                log.warning("cannot keep the session id in %s (%s): a restarted destination will not resume "
                            "this migration", self.options.block_dir, exc.strerror)
        if comparison.source_compares is False:
            log.warning("the source cannot compare an earlier copy (no from-copy in its Hello): the copy is "
                        "dropped and every page migrates")
        log.info("from an earlier copy: %d pages held, %d unchanged and kept, %d changed, %d not compared",
                 result.held, result.unchanged, result.changed, result.unanswered)
        self._schedule_pass()

    def _open_own_uffd(self) -> None:
        assert self._memory is not None
        self._uffd = self._open_userfaultfd()
        for block in self._memory:
            ioctls = self._uffd.register(block.address, block.length, RegisterMode.MISSING)
            block.allow_zeropage(ioctls)
        self._session.add_fd(OWN_FD, self._memory.mapping_table(), woken_by_copy=True)
        self._loop.add_reader(self._uffd.fd, self._on_own_uffd_readable)

    def _close_own_uffd(self) -> None:
        uffd, self._uffd = self._uffd, None
        if uffd is None:
            return
        self._loop.remove_reader(uffd.fd)
        self._forget_fd(OWN_FD, uffd.fd)
        if self._memory is not None and self._memory.mapped and self._session.complete:
            for block in self._memory:
                with contextlib.suppress(UffdError):
                    uffd.unregister(block.address, block.length)
        uffd.close()

    def _on_own_uffd_readable(self) -> None:
        assert self._uffd is not None
        self._serve_faults(OWN_FD, self._uffd)

    def _serve_faults(self, key: str, uffd: Userfaultfd) -> None:
        """A userfaultfd is readable: read its faults and send their Request in the same callback.

        The urgent path: the request lane (C) writes the Request of the read's
        missing pages first, when it may; then each fault on a missing page, with
        nothing queued ahead of it, is accounted by the session's ``fault_request``
        (the pages the lane did not write go out in one Request frame, here, with
        no pass; the lane remembers them all for the reply lane).  Any
        other fault (joined, already placed, queued behind others, unknown) and
        any other event goes the general way, and the pass then runs in this
        same callback when the session has work for it (faults queued), so
        nothing read here waits for a loop turn; the commands (wakes of pages
        placed already) are carried out here in any case.  The faults are taken in the
        read's order; an event this package cannot decode raises where it stands, and the
        Request of the pages asked for before it still goes out.
        """
        read_ns = time.monotonic_ns() if trace.ENABLED else 0
        now = time.monotonic()
        count = uffd.read_flat(_READ_BATCH)  # flattened in C: the Request goes out before any Python reads them
        if self._pass_pending or count == _READ_BATCH:  # a backlog: coalesce it all in the pass
            self._take_events(key, uffd.events_read(0, count), now, uffd.fd)
            if count == _READ_BATCH:
                self._read_faults(key, uffd)
            return self._pass()
        session, asked, general, fd = self._session, [], False, uffd.fd
        lane_asked: list[tuple[int, int]] | None = None  # None: the lane wrote no Request
        faulted: list[int] = []  # the faults' addresses, of the pages in ``asked``, when it did not
        if self._lane is not None and count:
            budget = session.lane_budget()
            sock = self._source.urgent_fd() if budget else -1
            table = session.fd_table(key) if sock >= 0 and key not in self._lane_off else None
            slots = uffd.slots_address if table is not None else 0
            if slots:  # the Request leaves now; the session accounts the faults below
                sent, rest = self._lane.send(sock, key, fd, table, slots, count, budget)
                if sent:
                    lane_asked = sent
                    self._lane_keys[fd] = key
                    if trace.ENABLED:
                        for block, page in sent:
                            trace.mark("request", block, page)
                if rest:  # a short send: the transport writes the rest, in order
                    self._source.send_frame(Channel.URGENT, rest)
        messages = uffd.slots_read(count) if count else []  # a page fault needs no object, only its address, thread
        try:
            for i in range(0, count * SLOTS, SLOTS):
                if messages[i] == PAGEFAULT_CODE:
                    address, thread_id = messages[i + 2], messages[i + 3]
                    if thread_id not in self._named_threads:
                        self._remember_thread(key, thread_id)
                    page = session.fault_request(key, address, thread_id, now, new_request=not asked)
                    if page is not None:
                        asked.append(page)
                        if lane_asked is None:
                            faulted.append(address)
                    else:
                        general = True
                else:
                    general = True
                    [event] = uffd.events_read(i // SLOTS, i // SLOTS + 1)
                    self._forget_fd(key, fd, event)  # its mappings change: answer it the exact way
                    if self._clients is not None:
                        self._clients.non_cooperative_event(key, event)
        finally:  # pages made REQUESTED go out even if a later event fails (a client retired midway)
            if asked:
                if trace.ENABLED:  # every page asked for here, by the lane or not
                    for block, page in asked:
                        trace.mark("fault-read", block, page, read_ns)
                if lane_asked is None:  # the session's Request: the reply lane still places the answers
                    self._send_page_requests(asked, now)
                    self._remember_faults(key, fd, asked, faulted)
                elif asked == lane_asked:  # the usual read: the lane asked for every page
                    self._rearm_timer(now)
                else:
                    self._send_page_requests([page for page in asked if page not in lane_asked], now)
        if general and session.pass_due:  # faults queued: the pass requests them now
            self._pass()
        elif general:  # joined, woken at once or unknown: only commands, if any, to carry out
            try:
                self._run_commands(None)
            except Exception as exc:  # never swallow: the service fails visibly
                self._fail(exc)
        if self._progress and now >= self._next_progress:
            self._schedule_pass()

    def _send_page_requests(self, asked: list[tuple[int, int]], now: float) -> None:
        """Send the Request of pages the session made REQUESTED (none left: the lane sent them all)."""
        if trace.ENABLED:
            for block, page in asked:
                trace.mark("request", block, page)
        if asked:
            self._source.send_frame(Channel.URGENT, encode_page_request(*asked[0]) if len(asked) == 1
                                    else encode_page_requests(asked))
        self._rearm_timer(now)

    def _request_runs(self, key: str, runs: tuple[tuple[int, int, int], ...]) -> None:
        """A self-served client's faults (a ClientRequest of a few runs): the urgent path's form
        of its request.  As for a delegated fd's read, the request lane writes the Request of
        the one-page runs of missing pages first, when it may; then the session accounts the
        runs (``client_fault_request``, which makes those pages REQUESTED and asks for any
        page the lane did not, in one frame, with no pass), and the reply lane places their
        answers through the service's own userfaultfd; the other runs are queued in the
        session and the pass sends them (or answers from pages placed already).  A run the
        session then refuses (the client's mistake, and the client is rejected) may have had
        its page asked for: the answer is placed as a page nobody asked for."""
        now = time.monotonic()
        session, lane, uffd = self._session, self._lane, self._uffd
        lane_asked: list[tuple[int, int]] = []
        if lane is not None and uffd is not None:
            budget = session.lane_budget()
            sock = self._source.urgent_fd() if budget else -1
            if sock >= 0:  # the Request leaves now; the session accounts the runs below
                lane_asked, rest = lane.ask_runs(sock, uffd.fd, runs, budget)
                if lane_asked:
                    self._lane_keys[uffd.fd] = OWN_FD
                    if trace.ENABLED:
                        for block, page in lane_asked:
                            trace.mark("request", block, page)
                if rest:  # a short send: the transport writes the rest, in order
                    self._source.send_frame(Channel.URGENT, rest)
        asked = session.client_fault_request(key, runs, now)
        if asked:
            unsent = [page for page in asked if page not in lane_asked] if lane_asked else asked
            if unsent:
                self._send_page_requests(unsent, now)
                if lane is not None and uffd is not None:
                    for block, page in unsent:
                        self._remember_own_page(block, page)
            else:
                self._rearm_timer(now)
        if len(asked) == len(runs):
            return
        try:  # pages placed already: their Placed goes now
            self._run_commands(None)
        except Exception as exc:  # never swallow: the service fails visibly
            return self._fail(exc)
        if session.pass_due:
            self._schedule_pass()

    def _read_faults(self, key: object, uffd: Userfaultfd) -> None:
        """Drain every queued event of ``uffd`` into the session (faults); the caller runs or schedules the pass."""
        now = time.monotonic()
        while True:
            events = uffd.read_events(_READ_BATCH)
            self._take_events(key, events, now, uffd.fd)
            if len(events) < _READ_BATCH:  # a short read emptied the queue
                break

    def _take_events(self, key: object, events: list, now: float, fd: int) -> None:
        for event in events:
            if type(event) is PageFault:
                if event.thread_id not in self._named_threads:
                    self._remember_thread(key, event.thread_id)
                self._session.fault_received(key, event.address, event.thread_id, now)
            else:
                self._forget_fd(key, fd, event)  # its mappings change: answer it the exact way
                if self._clients is not None:
                    self._clients.non_cooperative_event(key, event)

    def _forget_fd(self, key: object, fd: int, event: object = None) -> None:
        """Fd ``key`` (number ``fd``) is retired, or ``event`` (not a page fault) was read from it:
        the reply lane places no answer through it for the faults read so far (they go the exact
        way, through the session).  After an unmap or a remap its mapping table may no longer
        say what is at an address, so the lanes leave that fd alone from then on."""
        if self._lane is None:
            return
        self._lane.forget(key, fd)
        self._lane_keys.pop(fd, None)
        if type(event) is UnmapEvent or type(event) is RemapEvent:
            self._lane_off.add(key)

    def _remember_thread(self, key: object, tid: int) -> None:
        """Read a faulting thread's name from /proc while it still exists."""
        self._named_threads.add(tid)
        client = self._clients.get(key) if self._clients is not None else None
        remember_thread_name(os.getpid() if key == OWN_FD else (client.pid if client else None), tid)

    # -- the pass ----------------------------------------------------------------

    def _schedule_pass(self) -> None:
        if not self._pass_pending and not self._closed:
            self._pass_pending = True
            self._loop.call_soon(self._pass)

    def _pass(self) -> None:
        self._pass_pending = False
        if self._done.done() or self._memory is None:
            return
        try:
            now = time.monotonic()
            self._session.flush(now)
            self._run_commands(None)
            self._send_messages()
            self._rearm_timer(now)
            if self._progress and now >= self._next_progress:
                self._next_progress = now + _PROGRESS_INTERVAL
                self._report_progress(self.statistics())
        except Exception as exc:  # never swallow: the service fails visibly
            self._fail(exc)

    def _report_progress(self, report: DestinationReport) -> None:
        for callback in self._progress:
            callback(report)

    def _send_messages(self) -> None:
        for channel, msg in self._session.messages_to_send():
            if type(msg) is Request:
                if trace.ENABLED:
                    for run in msg.runs:
                        trace.mark("request", run.block, run.first)
                if self._lane is not None and self._uffd is not None:
                    self._remember_own(msg.runs)
            self._source.send(channel, msg)

    def _remember_faults(self, key: object, fd: int, asked: list[tuple[int, int]], faulted: list[int]) -> None:
        """The session wrote the Request of a read's faults (TLS, or the lane had nothing to write):
        the reply lane places their answers all the same, through the faulting fd at the fault's page."""
        if self._lane is None or key in self._lane_off:
            return
        page_sizes = self._session.blocks.page_sizes  # type: ignore[union-attr]  (faults mean blocks)
        for (block, page), address in zip(asked, faulted):
            self._lane.remember(block, page, fd, address - address % page_sizes[block])
        self._lane_keys[fd] = key

    def _remember_own(self, runs: tuple) -> None:
        """The reply lane places the answers of a Request the session wrote (a self-served
        client's pages, queued faults) through the service's own userfaultfd and mapping, whose
        copy wakes the service's own threads; the session then wakes every other waiter."""
        for run in runs:
            if run.count == 1:  # an answer the lane can take is a one-page Pages
                self._remember_own_page(run.block, run.first)

    def _remember_own_page(self, block: int, page: int) -> None:
        """The reply lane places the answer for ``page`` through the service's own userfaultfd,
        at the page's address in the service's mapping."""
        mapped = self._memory.block(block)  # type: ignore[union-attr]  (requests come after the placement)
        fd = self._uffd.fd  # type: ignore[union-attr]
        self._lane.remember(block, page, fd, mapped.address + page * mapped.page_size)  # type: ignore[union-attr]
        self._lane_keys[fd] = OWN_FD

    def _rearm_timer(self, now: float) -> None:
        """Keep one timer armed no later than the session's next deadline (time.monotonic()).

        Lazy: a timer armed no later than ``now + request_timeout`` stays and
        nothing is computed, since every deadline made from now on (a request
        sent now, a Resume) falls at or after that.  It fires, the session
        handles what is due, and the timer is armed for the next deadline.  So
        a fault's request costs no cancel, no new timer and no deadline search.
        """
        timeout = self.options.session.request_timeout
        if self._timer is not None and (timeout is None or self._timer_when <= now + timeout):
            return  # a request sent from now on is due no earlier than now + timeout
        when = self._session.get_timer()
        if when is None or (self._timer is not None and self._timer_when <= when):
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_when = when
        self._timer = self._loop.call_later(max(when - now, 0.0), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = self._timer_when = None
        self._session.handle_timer(time.monotonic())
        self._schedule_pass()

    # -- carrying out commands -----------------------------------------------------

    def _run_commands(self, staging: Staging | None) -> None:
        while True:
            commands = self._session.commands()
            if not commands:
                return
            for command in commands:
                self._carry_out(command, staging)

    def _carry_out(self, command: object, staging: Staging | None) -> None:
        kind = type(command)
        if kind is Place or kind is PlaceZero:
            self._place(command, staging)
        elif kind is Wake:
            self._wake(command)
        elif kind is NotifyPlaced or kind is UnknownFault:
            if self._clients is not None:
                self._clients.carry_out(command)
        elif kind is DiscardPages:
            self._memory.discard(command.block, command.first, command.count)
        elif kind is MigrationComplete:
            self._loop.call_soon(self._complete)
        elif kind is Abort:
            self._fail(MigrationAborted(command.reason))

    def _place(self, command: Place | PlaceZero, staging: Staging | None, *, start: int = 0, existed: int = 0) -> None:
        """Place a run on the loop thread; its clients' threads are woken right after the copy,
        before the session's bookkeeping (which then emits no Wake for them)."""
        assert self._placement is not None
        block, first, count = command.block, command.first, command.count
        plan = self._session.wake_plan(block, first, count) if start == 0 else ()
        drains = self._drains
        existed += self._placement.place(command, staging, self._drain_own_events, start=start)
        prewoken = bool(plan) and not existed and drains == self._drains
        if prewoken:
            for key, address, length in plan:
                self._wake_range(key, address, length)
        self._session.placed(block, first, count, time.monotonic(), existed_pages=existed, prewoken=prewoken)

    def _drain_own_events(self) -> None:
        """EAGAIN while placing: read our userfaultfd's events (faults, mapping changes), then retry."""
        assert self._uffd is not None
        self._drains += 1
        self._read_faults(OWN_FD, self._uffd)

    def _wake(self, command: Wake) -> None:
        self._wake_range(command.key, command.start, command.length)

    def _wake_range(self, key: object, start: int, length: int) -> None:
        if key == OWN_FD:
            assert self._uffd is not None
            self._uffd.wake(start, length)
        elif self._clients is not None:
            self._clients.wake(key, start, length)

    # -- ending ----------------------------------------------------------------

    def _build_report(self, *, final: bool) -> DestinationReport:
        now = time.monotonic()
        clients = self._clients.summaries() if self._clients is not None else ()
        pids = {OWN_FD: os.getpid(), **{c["key"]: c["pid"] for c in clients}}
        received = sum(p.bytes_received for p in self._source.channels.values()) + self._source.bytes_from_closed
        return build_report(self._session.statistics(now), final=final, session_id=self.session_id,
                            duration_s=max(now - self._started_at, 1e-9), bytes_received=received,
                            block_names=[b.name for b in self.blocks], clients=clients, pids=pids)

    def _complete(self) -> None:
        if self._done.done():
            return
        self._source.close(farewell=Complete())
        report = self._build_report(final=True)
        self._report_progress(report)
        if self._clients is not None:
            self._clients.end_all(complete=True)
        self._close_own_uffd()
        self._done.set_result(report)
        self._emit("complete", pages_total=report.pages_total, duration_s=report.duration_s,
                   verified=report.verified, integrity_pages=report.integrity_pages, resumes=report.resumes)

    def _fail(self, exc: BaseException) -> None:
        if self._done.done():
            return
        self._error = str(exc) or type(exc).__name__
        self._done.set_exception(exc)
        self._emit("failed", error=self._error, cancelled=self._cancelled)
        if self._clients is not None:
            self._clients.end_all(complete=False)
        # An explicit abort already told the source (Error(aborted): its work ends).  Any other
        # failure says Error(io): the source lets this session go at once and serves the next one.
        farewell = None if self._session.aborted is not None else Error(
            code=ErrorCode.IO, text=f"the destination failed: {exc}"[:LIMITS.max_text])
        self._source.close(farewell=farewell)


class _ChannelSink:
    """The service's side of its :class:`SourceChannels` (a ``ChannelEvents``): bound methods, no extra call."""

    __slots__ = ("channel_opened", "message_received", "payload_sink", "page_sink", "page_landed", "read_first",
                 "channels_dropped", "source_lost", "channels_restored", "source_failed")

    def __init__(self, service: PostcopyDestination) -> None:
        self.channel_opened = service._channel_opened
        self.message_received = service._on_source_message
        self.payload_sink = service._payload_sink
        self.page_sink = service._page_sink
        self.page_landed = service._page_landed
        self.read_first = service._place_answers
        self.channels_dropped = service._channels_dropped
        self.source_lost = service._source_lost
        self.channels_restored = service._channels_restored
        self.source_failed = service._fail
