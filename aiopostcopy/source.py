"""The source: owns the authoritative memory and serves it to one destination at a time.

Theory of operation
-------------------
A :class:`PostcopySource` listens on TCP (or a Unix path).  A destination
opens two connections, each starting with a Hello that names its channel.
The event loop accepts them and reads that Hello (:class:`_Greeter`); from
then on each channel has a thread of its own, so that page data never waits
for the loop, and the loop never waits for page data (only, briefly, for the
session's lock, which it takes to account what the threads sent):

* ``urgent``: a thread reads the destination's requests with blocking
  ``recv`` and answers each at once from that thread.  On plain TCP it hands
  the connection to the C page server
  (:class:`~aiopostcopy.transport.page_server.PageServer`), which reads and
  answers Requests with the GIL free (``pread`` of the runs, a zero scan, one
  ``sendmsg`` for the Request's frames, under the connection's lock).  It
  hands what it sent over to the loop thread through an eventfd and goes on
  answering; the loop thread accounts it in the session
  (:meth:`_on_answers_logged`), so this thread needs the GIL only for a frame
  the page server does not answer, which it returns with and the Python
  decoder takes (:meth:`_serve_in_c`), or when the loop thread has fallen a
  whole log behind (it then accounts the log itself).  The Python path (over TLS, or with
  ``answer_in_c=False``) does the same per run: ``os.preadv`` into the
  thread's buffer, one ``sendmsg`` of header and payload, both without the
  GIL.  Either way an urgent reply waits for no background work.
* ``background``: a sender thread streams every page not yet sent, restarting
  near the most recent request (locality), as far as the background window
  allows.  It reads each run and finds its zero pages in one C call
  (:func:`~aiopostcopy.transport.page_server.read_run`, the GIL free; Python's
  ``preadv`` and scan where a run has holes or the extension is not built),
  and queues the frame for a writer thread
  (:class:`~aiopostcopy.transport.frame_writer.FrameWriter`), which sends it
  while the next run is read.  Both threads run at nice ``SWEEP_NICENESS``,
  and in SCHED_IDLE under a starvation guard where the process may bring them
  back (:mod:`aiopostcopy.priority`): where the CPUs are busy, the urgent thread
  answers a Request before the next background run is read.  The
  destination's Acks and Pings on that connection are read by the loop (a
  FrameProtocol).

Each thread writes through its own duplicate of the connection's socket
(:class:`_Conn`); other threads write urgent frames under the connection's
lock and queue background frames in its outbox, which only the sender thread
takes (into its writer's queue, in order with its runs), so frames never
interleave.  The decisions (what to send next, the
window, resume bookkeeping) live in the I/O-free
:class:`~aiopostcopy.core.source_session.SourceSession`, used under one lock.

TLS (``tls=``, docs/protocol.md "Transport"): the loop does the handshake in
the greeter (:class:`_TlsGreeter`, an :class:`ssl.SSLObject` over memory BIOs,
:class:`~aiopostcopy.transport.tls.ServerTls`); the connection then goes to its
thread as a :class:`_TlsConn`, whose writers encrypt under the send lock and
whose urgent reader decrypts what it receives, and the background reader
decrypts in the loop.  The threads and their order of writes stay as they are;
without TLS nothing of this runs (the plain :class:`_Conn` sends with
``sendmsg`` and reads with ``recv_into`` as before).  A failed handshake, or a
peer on the wrong side of TLS, is logged in one line naming the peer and the
reason; that connection is closed and the source goes on serving.

``max_bandwidth`` caps the sweep: a token bucket in the sender thread charged
with each run's payload; the thread waits before its next run while the
bucket is in debt.  Urgent replies are never charged or held.

Blocks are read with ``preadv`` from their files, never touched through a
mapping: a file that shrinks under the source is a short read, reported as
:class:`BlockReadError` (logged, and an ``Error(io)`` to the destination on
that connection), never a SIGBUS.  Zero pages go as Zero markers or as the
``zeros`` of a Pages run, never as 4 KiB of zeros.

Sparse files (a memory snapshot with holes): each block's holes are found
once, with SEEK_DATA/SEEK_HOLE, when the source starts (:meth:`SourceBlock.holes`),
and cached: a snapshot does not change while it is served.  The sweep sends a
hole as Zero runs without reading it, and reads the data between holes in runs
of ``background_run_pages``; a requested run is read only where it is not a
hole.  If the file changes anyway, data written into a hole after the map was
taken reaches the destination as zeros (as any write during the migration may
or may not reach it); a file that shrinks is still an ``Error(io)``: a hole run
checks the file's size before it is sent as zeros.

From an earlier copy (feature ``from-copy``, docs/protocol.md section 4.10):
the urgent thread answers each Digests of the destination's copy with
Changed, digesting its own pages of the run (read like any run, holes not at
all) in :meth:`PostcopySource._send_changed`; the sweep waits for the Resume
that follows, so only the pages that changed travel.

Huge pages: a page larger than a frame's usual payload (1 GiB) goes whole in
one Pages frame (docs/protocol.md, "Huge pages"), read and written in pieces of
``max_payload`` bytes so that the wire starts at once and runs at line rate.
While an urgent one is on its way, the sweep waits between its own frames
and pieces (the faulting thread waits for every byte of the page), so the
faulted page has the link alone.

Sessions: one destination session is served at a time.  A destination that
reconnects with the same session id takes over its channels again (it then
sends Resume); another session while one is held is refused with
``Error(busy)``.  The session is released (logged, and the next destination
is served) when the destination sends an Error other than ``aborted`` on
either channel, or when no channel of it has been open for the lease
(``lease`` seconds).  ``Complete`` ends the source's work
(:meth:`PostcopySource.wait_complete`); so does ``Error(aborted)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import functools
import logging
import mmap
import os
import socket
import ssl
import sys
import threading
import time
from collections import deque
from collections.abc import Mapping as MappingABC

import msgpack

from aiopostcopy import trace
from aiopostcopy.core.digests import changed_bounds, page_digests, zero_digest
from aiopostcopy.core.rangeset import RangeSet, bounds_total
from aiopostcopy.core.source_session import SourceConfig, SourceSession
from aiopostcopy.errors import PostcopyError, RemoteProtocolError
from aiopostcopy.messages import (
    LIMITS,
    BlockInfo,
    Changed,
    Channel,
    Digests,
    Error,
    ErrorCode,
    Hello,
    Message,
    PageRun,
    Request,
    Role,
    Zero,
)
from aiopostcopy.destination.operator import TokenBucket
from aiopostcopy.priority import BackgroundThreads, set_niceness
from aiopostcopy.buffers import copy_buffer
from aiopostcopy.transport.page_server import Answer, PageServer, PageServerLock, Served, ServedBlock, answers_in
from aiopostcopy.transport.page_server import available as page_server_available
from aiopostcopy.transport.page_server import read_run
from aiopostcopy.transport.frame_writer import FrameWriter
from aiopostcopy.transport.stream import set_nodelay
from aiopostcopy.transport.tls import ServerTls, check_context, describe_tls_error, looks_like_tls
from aiopostcopy.transport.wire import (
    CONNECTION_CLOSED,
    Decoder,
    encode,
    header_budget,
    migration_allowed,
)

__all__ = ["BlockReadError", "SourceBlock", "PostcopySource", "SourceReport", "DEFAULT_LEASE"]

log = logging.getLogger("aiopostcopy.source")

URGENT, BACKGROUND = Channel.URGENT, Channel.BACKGROUND
_SWEEP_WATCH = 0.01  #: seconds between looks of a demand-first source at its demand
_SWEEP_HOLD_MAX = 30.0  #: a demand-first source sweeps after this long in any case
#: Default seconds a session is held with no channel open before it is released.
DEFAULT_LEASE = 5.0
#: Frames the sweep may queue for the background writer behind the one being sent (each up to a
#: run, 1 MiB): the next runs are read while one is written.
_SWEEP_QUEUE = 2
#: Nice value of the sweep's reader and writer threads: on CPUs the destination, its clients or
#: the urgent thread keep busy, a Request is answered before the next background run is read.
SWEEP_NICENESS = 10
#: Default SO_SNDBUF of the background connection while pages are being requested, and once none
#: was for DEMAND_QUIET seconds (see PostcopySource).
BACKGROUND_SNDBUF = 64 << 10
BACKGROUND_SNDBUF_QUIET = 1 << 20
DEMAND_QUIET = 0.05
_SEND_TIMEOUT = 60.0  #: a peer that takes no data for this long is gone
#: The C page server, its answers logged and the socket empty, waits about this many ms (a timer
#: tick at least) for the next Request before handing them over to the loop thread (an eventfd):
#: a burst of faults sends Requests microseconds apart, and the burst is handed over once instead
#: of once per Request.  Bounded: the session learns what was sent within about _ACCOUNT_MAX_MS
#: of the first answer, however the Requests keep coming, and with _ACCOUNT_MAX_ANSWERS logged the
#: batch goes at once.  The loop thread accounts it (PostcopySource._on_answers_logged) while the
#: urgent thread goes on answering.  (When the urgent thread accounted the log itself, the
#: Request arriving then waited for all of it: a quiet fault every 150 us and 20 ms batches raised
#: the quiet fault's p99 from 0.33 to 0.58 ms.)
_ACCOUNT_IDLE_MS, _ACCOUNT_MAX_MS, _ACCOUNT_MAX_ANSWERS = 1, 20, 16
_HELLO_BUDGET = header_budget(Hello)
_JOIN_TIMEOUT = 5.0
_REFUSAL_REPEAT = 2.0  #: seconds in which the same refusal of the same host is logged once
_PACK = msgpack.Packer(use_bin_type=True).pack  # one per process is safe: pack() of ints never releases the GIL
_ZEROS = memoryview(bytes(LIMITS.max_payload))  #: copied over the hole pages of a run that is read in part


#: Shorter holes of a block file are read with the data around them (see SourceBlock.holes).
MIN_HOLE_BYTES = 1 << 20


class BlockReadError(PostcopyError, OSError):
    """A block's backing file could not be read: it shrank under the source, or an I/O error."""


@dataclasses.dataclass(slots=True)
class SourceBlock:
    """One RAMBlock the source serves, read with ``preadv`` from a file descriptor it owns."""

    name: str
    fd: int
    length: int
    page_size: int = 4096
    path: str | None = None
    _holes: RangeSet | None = dataclasses.field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def from_path(cls, name: str, path: str, *, page_size: int = 4096) -> "SourceBlock":
        """Open ``path`` (a snapshot file, a /dev/shm file, a hugetlbfs file)."""
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            with contextlib.suppress(OSError):  # the sweep reads it in order: let the kernel read ahead
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            return cls._checked(name, fd, page_size, path)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def from_fd(cls, name: str, fd: int, *, page_size: int = 4096) -> "SourceBlock":
        """Serve an open fd (a memfd from an orchestrator); the block keeps a duplicate."""
        dup = os.dup(fd)
        try:
            return cls._checked(name, dup, page_size, None)
        except BaseException:
            os.close(dup)
            raise

    @classmethod
    def _checked(cls, name: str, fd: int, page_size: int, path: str | None) -> "SourceBlock":
        size = os.fstat(fd).st_size
        if size == 0 or size % page_size:
            raise ValueError(f"block {name!r}: size {size} is not a positive multiple of {page_size}")
        return cls(name=name, fd=fd, length=size, page_size=page_size, path=path)

    def info(self) -> BlockInfo:
        return BlockInfo(name=self.name, length=self.length, page_size=self.page_size)

    def holes(self) -> RangeSet:
        """The pages the file holds no data in (SEEK_DATA/SEEK_HOLE), as page runs.

        Found on the first call and cached: the file must not change while it
        is served (see the module docstring).  A page partly data counts as data;
        a filesystem that cannot tell reports no holes.  Only holes of at least
        :data:`MIN_HOLE_BYTES` count: a short hole (a tmpfs file's zero page
        among data) is read with its run, whose zero scan sends it as ``zeros``,
        rather than cutting the sweep into short frames.
        """
        if self._holes is None:
            runs = _hole_pages(self.fd, self.length, self.page_size)
            shortest = max(1, MIN_HOLE_BYTES // self.page_size)
            self._holes = RangeSet([(start, stop) for start, stop in runs if stop - start >= shortest])
        return self._holes

    def hole_bounds(self, first: int, count: int) -> tuple[int, ...]:
        """The hole pages among ``count`` pages from ``first``, as bounds relative to ``first``."""
        return tuple(bound - first for run in self.holes().intersection(first, first + count) for bound in run)

    def check_size(self) -> None:
        """The file still holds every page served (checked before a hole is sent as zeros).

        Raises:
            BlockReadError: it shrank.
        """
        try:
            size = os.fstat(self.fd).st_size
        except OSError as exc:
            raise BlockReadError(exc.errno, f"{self._where()}: fstat failed: {exc.strerror}") from exc
        if size < self.length:
            raise BlockReadError(self._shrunk(size))

    def read_data(self, view: memoryview, first: int, holes: tuple[int, ...]) -> int:
        """Fill ``view`` with the pages from page ``first`` on, reading only the pages
        outside ``holes`` (bounds relative to ``first``) and zeroing the others.

        Returns:
            The bytes read from the file.

        Raises:
            BlockReadError: as :meth:`read_into`.
        """
        if not holes:
            self.read_into(view, first)
            return len(view)
        size, page, done = self.page_size, 0, 0
        count = len(view) // size
        for i in range(0, len(holes) + 2, 2):
            low, high = (holes[i], holes[i + 1]) if i < len(holes) else (count, count)
            if low > page:
                self.read_into(view[page * size:low * size], first + page)
                done += (low - page) * size
            if high > low:
                view[low * size:high * size] = _ZEROS[:(high - low) * size]
            page = high
        if holes:
            self.check_size()
        return done

    def read_into(self, view: memoryview, first: int) -> None:
        """Fill ``view`` with the pages from page ``first`` on.

        Raises:
            BlockReadError: the file ends before them (it shrank) or the read failed.
        """
        self.read_at(view, first * self.page_size)

    def read_at(self, view: memoryview, offset: int) -> None:
        """Fill ``view`` from byte ``offset`` on (see :meth:`read_into`)."""
        got, want = 0, len(view)
        while got < want:
            try:
                n = os.preadv(self.fd, [view[got:]], offset + got)
            except OSError as exc:
                raise BlockReadError(exc.errno, f"{self._where()}: reading at byte {offset + got} failed: "
                                                f"{exc.strerror}") from exc
            if n == 0:
                raise BlockReadError(self._shrunk(offset + got))
            got += n

    def _where(self) -> str:
        return f"block {self.name!r}" + (f" ({self.path})" if self.path else "")

    def _shrunk(self, offset: int) -> str:
        try:
            now = f"{os.fstat(self.fd).st_size} bytes"
        except OSError:
            now = "unknown"
        return (f"{self._where()}: page {offset // self.page_size} is past the end of the file, which shrank "
                f"to {now} of the {self.length} served")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _hole_pages(fd: int, length: int, page_size: int) -> list[tuple[int, int]]:
    """Page runs of the first ``length`` bytes of ``fd`` that hold no data (SEEK_DATA)."""
    pages, holes, page = length // page_size, [], 0
    while page < pages:
        try:
            data = os.lseek(fd, page * page_size, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data from here to the end
                holes.append((page, pages))
                break
            return []  # the filesystem cannot tell: no holes
        start = data // page_size
        if start > page:
            holes.append((page, min(start, pages)))
        if start >= pages:
            break
        try:
            end = os.lseek(fd, data, os.SEEK_HOLE)
        except OSError:
            return []
        page = -(-end // page_size)
    return holes


@dataclasses.dataclass(frozen=True, slots=True)
class SourceReport:
    """What the source did for one destination session.

    ``bytes_read`` is what was read from the block files, ``pages_hole`` the
    pages sent as zeros from a file's holes without reading them.  From an
    earlier copy: ``pages_compared`` pages of the destination's copy were
    compared by digest, ``pages_changed`` of them differed (and were sent).
    """

    session_id: str | None
    complete: bool
    pages_urgent: int
    pages_background: int
    pages_zero: int
    bytes_sent: int
    connections: int
    sessions_released: int = 0
    bytes_read: int = 0
    pages_hole: int = 0
    pages_compared: int = 0
    pages_changed: int = 0


class _RunBuffer:
    """A thread's staging memory for the run it sends: grown on demand, reused.  The sweep's
    come from a pool: one is out from the read of its run until the writer has sent it.  A run's
    memory is a copy buffer (huge-page-backed where it can be: the read into it costs a third)."""

    def __init__(self, pool: deque[_RunBuffer] | None = None) -> None:
        self.buffer: bytearray | mmap.mmap = bytearray()
        self._piece = bytearray()  # a huge page's pieces (compared with zeros: a bytearray)
        self._pool = pool

    def release(self) -> None:
        """Back to the pool it came from (the writer thread calls this once the run is sent)."""
        if self._pool is not None:
            self._pool.append(self)

    def take(self, nbytes: int) -> bytearray | mmap.mmap:
        if nbytes > len(self.buffer):
            self.buffer = copy_buffer(nbytes)
        return self.buffer

    def piece(self, nbytes: int) -> bytearray:
        """A buffer of exactly ``nbytes`` (a huge page's pieces are read into it)."""
        if len(self._piece) != nbytes:
            self._piece = bytearray(nbytes)
        return self._piece


class _Conn:
    """One channel's connection after its Hello: a duplicate of the socket for the threads.

    The owning thread (urgent reader, background sender) closes the duplicate
    when it ends, under :attr:`lock`; anyone may :meth:`send` under that lock
    until then.  :meth:`shut` (any thread) wakes the owner.
    """

    def __init__(self, channel: Channel, transport: asyncio.Transport, session: SourceSession,
                 served: list[ServedBlock | None] | None = None) -> None:
        self.channel = channel
        self.transport = transport
        self.session = session
        self.sock = socket.socket(fileno=os.dup(transport.get_extra_info("socket").fileno()))
        # urgent: blocking (the loop no longer reads it); background: the loop reads it, so it stays
        # non-blocking and sends wait in poll()
        self.sock.settimeout(None if channel is Channel.URGENT else _SEND_TIMEOUT)
        self.recv_into = self.sock.recv_into  #: the urgent thread reads requests with this
        self.tls: ServerTls | None = None  #: set by _TlsConn
        #: urgent, plain TCP: answers Requests in C; its mutex is the lock every writer takes; it
        #: hands its answers to the loop thread through an eventfd (PostcopySource._on_answers_logged)
        self.server = (PageServer(self.sock.fileno(), served, timestamps=trace.ENABLED,
                                  account_idle_ms=_ACCOUNT_IDLE_MS, account_max_ms=_ACCOUNT_MAX_MS,
                                  account_max_answers=_ACCOUNT_MAX_ANSWERS, notify=True)
                       if served is not None else None)
        #: the session's sent_record when the running PageServer.serve began (see _serve_in_c)
        self.serve_record = session.sent_record
        self.lock: threading.Lock | PageServerLock = self.server.lock if self.server else threading.Lock()
        self.outbox: deque[bytes] = deque()  # background frames, written by the sender thread
        self.wake = threading.Event()
        self.closed = False  # the socket is closed (or, urgent, reading is over)
        self.ending = False  # shut() was called: the owning thread ends
        self.farewell = False  # background: end once the outbox (its last frame an Error) is written
        self.thread: threading.Thread | None = None

    def send(self, buffers: list[bytes | memoryview | bytearray]) -> None:
        """Write whole frames (one sendmsg when the socket takes them)."""
        with self.lock:
            if self.closed:
                raise ConnectionAbortedError("connection closed")
            self.write_locked(buffers)

    def write_locked(self, buffers: list[bytes | memoryview | bytearray]) -> None:
        """Write bytes of a frame; the caller holds :attr:`lock` (a frame in pieces stays whole)."""
        _sendmsg_all(self.sock, buffers)

    def try_send(self, frame: bytes) -> None:
        self.send_or_drop([frame])

    def send_or_drop(self, buffers: list[bytes | memoryview | bytearray]) -> None:
        """Send, or drop the frames if the peer is gone: a reader goes on reading what the peer
        sent before it closed (an Error(aborted) behind requests it no longer wants answered)."""
        try:
            self.send(buffers)
        except OSError:
            pass

    def shut(self) -> None:
        """Wake the owning thread: its recv sees EOF, its send fails."""
        self.ending = True
        self.wake.set()
        with self.lock:
            if not self.closed:
                try:
                    self.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def release(self) -> None:
        """The owning thread is done with the socket."""
        with self.lock:
            self.closed = True
            self.sock.close()


class _TlsConn(_Conn):
    """A channel's connection over TLS: the same threads, each encrypting what it sends and
    decrypting what it reads on the raw socket, through the connection's :class:`ServerTls`."""

    def __init__(self, channel: Channel, transport: asyncio.Transport, session: SourceSession,
                 tls: ServerTls) -> None:
        super().__init__(channel, transport, session)
        self.tls = tls
        self.recv_into = self._recv_into  # type: ignore[method-assign]

    def write_locked(self, buffers: list[bytes | memoryview | bytearray]) -> None:
        _sendmsg_all(self.sock, [self.tls.encrypt(buffers)])

    def _recv_into(self, view: memoryview) -> int:
        """Plaintext into ``view`` (blocking): 0 at the end of the stream."""
        while (n := self.tls.read_into(view)) is None:
            data = self.sock.recv(65536)
            if not data:
                return 0
            self.tls.feed(data)
        return n


def _sendmsg_all(sock: socket.socket, buffers: list[bytes | memoryview | bytearray]) -> None:
    while True:
        sent = sock.sendmsg(buffers)
        while buffers and sent >= len(buffers[0]):
            sent -= len(buffers[0])
            buffers = buffers[1:]
        if not buffers:
            return
        if sent:
            buffers = [memoryview(buffers[0])[sent:], *buffers[1:]]


class _Greeter(asyncio.Protocol):
    """Reads a new connection's first frame, the destination's Hello, then hands the connection on."""

    def __init__(self, source: "PostcopySource") -> None:
        self._source = source
        self._data = bytearray()
        self._transport: asyncio.Transport | None = None
        self._tls: ServerTls | None = None  #: set by _TlsGreeter

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        set_nodelay(transport)

    def data_received(self, data: bytes) -> None:
        if not self._plain(data):
            return
        self._data += data
        if len(self._data) < 4:
            return
        size = int.from_bytes(self._data[:4], "big")
        if len(self._data) < 4 + size and size <= _HELLO_BUDGET:
            return
        decoder = Decoder(allowed=frozenset({Hello}))
        try:
            decoder.receive_data(self._data[:4 + size])
            hello = decoder.next_event()
            if type(hello) is not Hello:
                raise RemoteProtocolError("the first message on a connection must be Hello")
        except RemoteProtocolError as exc:
            return _refuse(self._transport, exc, self._tls)
        self._transport.pause_reading()
        self._handed_over(hello, bytes(self._data[4 + size:]))

    def _handed_over(self, hello: Hello, rest: bytes) -> None:
        self._source._greeted(self._transport, hello, rest)

    def eof_received(self) -> bool:
        return False

    def _plain(self, data: bytes) -> bool:
        """The first bytes from a plain destination; False (and refused) if they open a TLS handshake."""
        if self._data or not looks_like_tls(data):
            return True
        self._source._refused(self._transport, "it opened a TLS handshake, but this source does not use TLS "
                                               "(start it with --tls-cert, --tls-key and --tls-ca)")
        _refuse(self._transport, RemoteProtocolError("this source does not use TLS"))  # the peer: not TLS
        return False


class _TlsGreeter(_Greeter):
    """The TLS handshake with the destination, then its Hello (decrypted), as :class:`_Greeter`.

    A peer that does not open with a TLS handshake is answered with a plain
    Error frame (a destination without TLS can read it); a failed handshake
    sends the TLS alert.  Either way the source logs one line naming the peer
    and the cause, closes that connection and goes on serving.
    """

    def __init__(self, source: "PostcopySource", context: ssl.SSLContext) -> None:
        super().__init__(source)
        self._tls = ServerTls(context)
        self._started = False

    def data_received(self, data: bytes) -> None:
        if self._transport.is_closing():
            return
        if not self._started:
            self._started = True
            if not looks_like_tls(data):
                return self._not_tls()
        if not self._tls.handshake_done:
            try:
                reply = self._tls.handshake(data)
            except ssl.SSLError as exc:
                return self._failed(exc)
            if reply:
                self._transport.write(reply)
            if not self._tls.handshake_done:
                return
            data = b""
        try:
            plain = self._tls.decrypt(data)
        except ssl.SSLError as exc:
            return self._failed(exc)
        if plain:
            super().data_received(plain)

    def _plain(self, data: bytes) -> bool:
        return True  # plaintext, after the handshake

    def _handed_over(self, hello: Hello, rest: bytes) -> None:
        if self._transport.get_write_buffer_size():  # never with the source's contexts: see TlsConfig
            self._source._refused(self._transport, "TLS data still queued after the handshake")
            return self._transport.close()
        self._source._greeted(self._transport, hello, rest, self._tls)

    def _not_tls(self) -> None:
        self._source._refused(self._transport, "it did not open a TLS handshake (a destination without --tls-cert?)")
        self._transport.write(encode(Error(code=ErrorCode.PROTOCOL, text="this source requires TLS with a client "
                                           "certificate (--tls-cert, --tls-key, --tls-ca)")))
        self._transport.close()

    def _failed(self, exc: ssl.SSLError) -> None:
        self._source._refused(self._transport, f"TLS handshake failed: {describe_tls_error(exc)}")
        alert = self._tls.pending()
        if alert:
            self._transport.write(alert)
        self._transport.close()


def _peer(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"[{peer[0]}]:{peer[1]}" if ":" in str(peer[0]) else f"{peer[0]}:{peer[1]}"
    return f"a peer on {transport.get_extra_info('sockname') or 'a Unix socket'}"


class _BackgroundReader(asyncio.Protocol):
    """The loop's side of a background connection: the destination's Acks, Pings and Errors.

    It never writes: a refusal (a malformed or misplaced frame) goes to the
    sender thread's outbox as the connection's last frame, so it cannot land
    inside a Pages frame the thread is writing.
    """

    def __init__(self, source: "PostcopySource", conn: _Conn) -> None:
        self._source = source
        self._conn = conn
        self._decoder = Decoder(allowed=migration_allowed(Role.SOURCE, BACKGROUND))
        self._over = False

    def data_received(self, data: bytes) -> None:
        if self._over:
            return
        try:
            self._decoder.receive_data(data)
            while not self._over and (msg := self._decoder.next_event()) is not None:
                if msg is CONNECTION_CLOSED:
                    return self._end(None)
                self._source._on_background(self._conn, msg)
        except RemoteProtocolError as exc:
            self._conn.outbox.append(encode(_error_of(exc)))
            self._conn.farewell = True
            self._conn.wake.set()
            self._end(exc)

    def eof_received(self) -> bool:
        self.data_received(b"")
        return True  # the sender thread may still be writing its last frames

    def connection_lost(self, exc: BaseException | None) -> None:
        self._end(exc)

    def _end(self, exc: BaseException | None) -> None:
        if not self._over:
            self._over = True
            self._source._lost(self._conn, exc, drop=not self._conn.farewell)


class _TlsReader(asyncio.Protocol):
    """The loop's side of a TLS background connection: decrypts, then hands on to a :class:`_BackgroundReader`."""

    def __init__(self, tls: ServerTls, reader: _BackgroundReader) -> None:
        self._tls = tls
        self._reader = reader

    def data_received(self, data: bytes) -> None:
        try:
            plain = self._tls.decrypt(data)
        except ssl.SSLZeroReturnError:  # the destination closed TLS: an end of stream
            self._reader.eof_received()
            return
        except ssl.SSLError as exc:
            return self._reader.connection_lost(exc)
        if plain:
            self._reader.data_received(plain)

    def eof_received(self) -> bool:
        return self._reader.eof_received()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._reader.connection_lost(exc)


def _refuse(transport: asyncio.Transport, exc: RemoteProtocolError, tls: ServerTls | None = None) -> None:
    frame = encode(_error_of(exc))
    transport.write(tls.encrypt([frame]) if tls is not None else frame)
    transport.close()


def _error_of(exc: BaseException) -> Error:
    code = getattr(exc, "code", ErrorCode.PROTOCOL.value)
    code = ErrorCode(code) if code in ErrorCode._value2member_map_ else ErrorCode.PROTOCOL
    return Error(code=code, text=str(exc)[: LIMITS.max_text])


class PostcopySource:
    """Serve RAMBlocks to a destination.

    Args:
        blocks: the blocks, in the order the destination will index them.
        config: window and run sizes for the source session.
        background_sndbuf: SO_SNDBUF of the background connection (TCP) while
            pages are being requested, or None for the kernel's autotuning
            throughout.  It bounds how much of the sweep can sit in this
            host's network stack, and so in a shared device queue ahead of an
            urgent reply: with autotuning (and Linux's 4 MiB per-socket queue
            limit) a reply waited behind megabytes.  The kernel doubles the
            value: 64 KiB keeps about 110 us of a 10 Gbit/s link queued.
        background_sndbuf_quiet: SO_SNDBUF once no page was requested for
            ``DEMAND_QUIET`` seconds (50 ms): nobody waits, and a larger buffer
            lets the sweep fill the link through the sender's scheduling
            delays.  The next Request sets ``background_sndbuf`` again (what
            is queued by then still goes first: about 1.7 ms of a 10 Gbit/s
            link at the 1 MiB default).  None: ``background_sndbuf`` always.
            A session starts as if pages were being requested.
        lease: seconds a session is held with none of its channels open
            (waiting for the destination to reconnect and Resume) before it
            is released and another destination may start.
        sweep_after_idle: demand first: hold the background stream until pages
            were requested and then none for this many seconds (or 30 s went
            by), e.g. to measure the demand path alone.  None: sweep at once.
        tls: serve both channels over TLS with this server context, which must
            require the destination's certificate (``TlsConfig.server_context()``
            builds one); a peer that fails the handshake is logged and refused,
            and the source goes on serving.  None: plain TCP.
        max_bandwidth: cap of the background stream in bytes per second (data
            pages' payload; None: no cap).  Replies to requests are never held back.
        answer_in_c: on plain TCP, answer Requests with the C page server
            (:mod:`aiopostcopy.transport.page_server`) where it can, with the
            GIL free; False, or TLS: always the Python path.
        urgent_nice: the nice value of each urgent channel's thread, the one
            that answers Requests (None: as inherited).  On CPUs the sweep,
            the destination and its clients keep busy, a Request then waits
            less for that thread to run.  A value below the process's needs
            root or CAP_SYS_NICE; without it the thread keeps its priority.

    Raises:
        ValueError: no blocks, a bound out of range, or a TLS context that
            does not require the peer's certificate.
    """

    def __init__(self, blocks: list[SourceBlock], *, config: SourceConfig | None = None,
                 background_sndbuf: int | None = BACKGROUND_SNDBUF,
                 background_sndbuf_quiet: int | None = BACKGROUND_SNDBUF_QUIET, lease: float = DEFAULT_LEASE,
                 sweep_after_idle: float | None = None, tls: ssl.SSLContext | None = None,
                 max_bandwidth: int | None = None, answer_in_c: bool = True,
                 urgent_nice: int | None = None) -> None:
        if not blocks:
            raise ValueError("a source needs at least one block")
        if lease <= 0:
            raise ValueError(f"the lease must be positive, got {lease}")
        if max_bandwidth is not None and max_bandwidth <= 0:
            raise ValueError(f"max_bandwidth must be positive or None, got {max_bandwidth}")
        if urgent_nice is not None and not -20 <= urgent_nice <= 19:
            raise ValueError(f"urgent_nice must be a nice value, -20..19, or None, got {urgent_nice}")
        if tls is not None:
            check_context(tls, server=True)
        self._tls = tls
        self._max_bandwidth = max_bandwidth
        self._answer_in_c = answer_in_c
        self._last_refusal: tuple[tuple[str, str] | None, float] = (None, 0.0)
        self._blocks = blocks
        self._sndbuf = background_sndbuf
        self._sndbuf_quiet = background_sndbuf_quiet if background_sndbuf is not None else None
        self._demand_at = time.monotonic()  #: when a page was last requested (a session starts there)
        self._lease = lease
        self._config = config or SourceConfig()
        self._loop = asyncio.get_running_loop()
        #: the sweep's threads, in SCHED_IDLE under a starvation guard where allowed (aiopostcopy.priority)
        self._background = BackgroundThreads(self._loop)
        self._lock = threading.Lock()  # the session and the counters
        self._urgent_nice = urgent_nice
        self._urgent_nice_refused = False  # said once: the urgent thread keeps its priority
        #: what the C page server sent and the session has not yet learnt: (connection, its log,
        #: the session's sent_record when it was read), oldest first (see _take_answers)
        self._unaccounted: deque[tuple[_Conn, bytes, int]] = deque()
        self._take_lock = threading.Lock()  # a page server's log taken and queued in one step
        self._session = self._new_session()
        self._conns: dict[Channel, _Conn] = {}
        self._threads: list[threading.Thread] = []
        self._lease_timer: asyncio.TimerHandle | None = None
        self._server: asyncio.AbstractServer | None = None
        self._done: asyncio.Future[SourceReport] = self._loop.create_future()
        self._counts = dict.fromkeys(("urgent", "background", "zero", "bytes", "connections", "read", "hole",
                                     "compared", "changed"), 0)
        self._released = 0
        self._zero_page = {b.page_size: bytes(b.page_size) for b in blocks}
        self._sweep_open = threading.Event()  # cleared by hold_sweep(): only requested pages go
        self._sweep_open.set()
        self._no_urgent_huge = threading.Event()  # cleared while an urgent huge page is sent: the sweep waits
        self._no_urgent_huge.set()
        if sweep_after_idle is not None:
            self.hold_sweep()
            self._loop.call_later(_SWEEP_WATCH, self._release_when_idle, sweep_after_idle,
                                  time.monotonic(), (0, time.monotonic()))

    @classmethod
    def from_paths(cls, paths: MappingABC[str, str], *, config: SourceConfig | None = None) -> "PostcopySource":
        """Build a source from ``{block name: file path}``."""
        return cls([SourceBlock.from_path(name, path) for name, path in paths.items()], config=config)

    def _new_session(self) -> SourceSession:
        return SourceSession(blocks=[b.info() for b in self._blocks], config=self._config,
                             holes=[list(b.holes()) for b in self._blocks])

    # -- lifecycle -----------------------------------------------------------

    async def listen(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        """Start listening on TCP; returns the bound (host, port)."""
        self._server = await self._loop.create_server(self._new_greeter, host, port)
        return self._server.sockets[0].getsockname()[:2]

    async def listen_unix(self, path: str) -> str:
        """Start listening on a Unix stream socket path."""
        self._server = await self._loop.create_unix_server(self._new_greeter, path)
        return path

    async def wait_complete(self) -> SourceReport:
        """Wait until the destination says every page is placed (Complete), or aborts."""
        return await asyncio.shield(self._done)

    async def close(self) -> None:
        """Stop listening, drop the channels and their threads, close the blocks."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        self._cancel_lease()
        for conn in list(self._conns.values()):
            self._drop(conn)
        self._conns.clear()
        threads, self._threads = self._threads, []
        self._background.close()  # the loop waits for the threads: they leave SCHED_IDLE first
        for thread in threads:
            thread.join(_JOIN_TIMEOUT)
        if not self._done.done():
            self._done.set_result(self._report(complete=False))
        if not any(t.is_alive() for t in threads):  # a thread still reading keeps its block's fd
            for block in self._blocks:
                block.close()

    def hold_sweep(self) -> None:
        """Send requested pages only, no background stream, until :meth:`release_sweep`
        (to measure the demand path alone, or to give a link to something else for a while)."""
        self._sweep_open.clear()

    def release_sweep(self) -> None:
        """Let the background stream go on."""
        self._sweep_open.set()
        for conn in list(self._conns.values()):
            conn.wake.set()

    def _release_when_idle(self, idle: float, began: float, last: tuple[int, float]) -> None:
        served, now = self._counts["urgent"] + self._counts["zero"], time.monotonic()
        if served != last[0]:
            last = (served, now)
        if (served and now - last[1] > idle) or now - began > _SWEEP_HOLD_MAX:
            log.info("sweep released at %.6f after %.2f s, %d pages served on demand", now, now - began, served)
            print(f"aiopostcopy source: sweep released at {now:.6f} after {now - began:.2f} s, "
                  f"{served} pages served on demand", file=sys.stderr, flush=True)
            self.release_sweep()
        else:
            self._loop.call_later(_SWEEP_WATCH, self._release_when_idle, idle, began, last)

    def statistics(self) -> SourceReport:
        return self._report(complete=self._done.done() and not self._done.exception()
                            and self._done.result().complete)

    # -- connections -----------------------------------------------------------

    def _new_greeter(self) -> _Greeter:
        self._counts["connections"] += 1
        return _Greeter(self) if self._tls is None else _TlsGreeter(self, self._tls)

    def _refused(self, transport: asyncio.BaseTransport, why: str) -> None:
        """Log a refused connection, once for a destination's pair (its second channel says the same)."""
        peer = _peer(transport)
        key, now = (peer.rpartition(":")[0], why), time.monotonic()
        repeated = self._last_refusal[0] == key and now - self._last_refusal[1] < _REFUSAL_REPEAT
        self._last_refusal = (key, now)
        log.log(logging.DEBUG if repeated else logging.WARNING, "aiopostcopy source: refused %s: %s", peer, why)

    def _greeted(self, transport: asyncio.Transport, hello: Hello, rest: bytes, tls: ServerTls | None = None) -> None:
        """A connection said Hello: adopt it as its channel, or refuse it."""
        channel = hello.channel
        try:
            # One locked step: the session queues its Hello answer for this channel, and the
            # channel's connection is registered.  Another thread draining the session in
            # between would find no connection for the answer and drop it.
            with self._lock:
                self._session.message_received(channel, hello, time.monotonic())
                old = self._conns.pop(channel, None)
                conn = self._conns[channel] = (_Conn(channel, transport, self._session, self._served(channel))
                                               if tls is None else _TlsConn(channel, transport, self._session, tls))
        except RemoteProtocolError as exc:
            return _refuse(transport, exc, tls)
        if old is not None:
            self._drop(old)
        self._cancel_lease()
        if channel is URGENT:
            if conn.server is not None and conn.server.notify_fd is not None:
                self._loop.add_reader(conn.server.notify_fd, self._on_answers_logged, conn)
            self._start(conn, self._serve_urgent, rest)
        else:
            self._adopt_background(conn, rest)

    def _served(self, channel: Channel) -> list[ServedBlock | None] | None:
        """What the C page server of a new plain urgent connection reads (lock held), or None:
        not urgent, not wanted, or not built."""
        if channel is not URGENT or not self._answer_in_c or not page_server_available():
            return None
        session = self._session
        return [ServedBlock(fd=b.fd, page_size=b.page_size, pages=b.length // b.page_size,
                            max_run=session.urgent_run_limit(i)) if b.page_size <= LIMITS.max_payload else None
                for i, b in enumerate(self._blocks)]

    def _start(self, conn: _Conn, target: object, *args: object) -> None:
        with self._lock:
            frames = self._drain_locked(conn.session)
        for frame in frames:
            conn.try_send(frame)
        conn.thread = threading.Thread(target=target, args=(conn, *args), daemon=True,
                                       name=f"aiopostcopy-source-{conn.channel.value}")
        self._threads = [t for t in self._threads if t.is_alive()] + [conn.thread]
        conn.thread.start()

    def _adopt_background(self, conn: _Conn, rest: bytes) -> None:
        if self._sndbuf is not None and conn.sock.family in (socket.AF_INET, socket.AF_INET6):
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self._sndbuf)
        self._demand_at = time.monotonic()  # the sweep starts as if pages were being requested
        proto = _BackgroundReader(self, conn)
        tls = conn.tls
        conn.transport.set_protocol(proto if tls is None else _TlsReader(tls, proto))
        self._start(conn, self._sweep)
        if rest:
            proto.data_received(rest)
        if tls is not None:  # records already fed during the greeting
            _TlsReader(tls, proto).data_received(b"")
        conn.transport.resume_reading()

    def _drain_locked(self, session: SourceSession) -> list[bytes]:
        """Drain the session's messages (lock held): background ones to the sender's outbox;
        returns the urgent frames for the caller to send."""
        urgent: list[bytes] = []
        for channel, msg in session.messages_to_send():
            conn = self._conns.get(channel)
            if conn is None or conn.session is not session:
                continue
            if channel is URGENT:
                urgent.append(encode(msg))
            else:
                conn.outbox.append(encode(msg))
                conn.wake.set()
        return urgent

    def _lost(self, conn: _Conn, exc: BaseException | None, *, drop: bool = True) -> None:
        """A channel ended (loop thread): tell the session, maybe start the lease.

        ``drop=False`` leaves the connection to its thread, which writes its last frame
        (a refusal) and then ends; the thread reports the loss again, with drop.
        """
        if self._conns.get(conn.channel) is conn:
            del self._conns[conn.channel]
            with self._lock:
                conn.session.connection_lost(conn.channel, time.monotonic())
            if drop:
                self._drop(conn)
            if not self._conns:
                self._start_lease()
        elif drop and conn.thread is not None and not conn.ending:
            self._drop(conn)
        if exc is not None and not isinstance(exc, (PostcopyError, OSError)):
            self._fail(exc)

    def _drop(self, conn: _Conn) -> None:
        conn.shut()
        conn.transport.abort()

    # -- the session's end -----------------------------------------------------

    def _start_lease(self) -> None:
        session = self._session
        if session.session_id is None or session.complete or session.aborted or self._done.done():
            return
        self._cancel_lease()
        self._lease_timer = self._loop.call_later(self._lease, self._lease_over, session)

    def _cancel_lease(self) -> None:
        if self._lease_timer is not None:
            self._lease_timer.cancel()
            self._lease_timer = None

    def _lease_over(self, session: SourceSession) -> None:
        self._lease_timer = None
        if session is self._session and not self._conns:
            self._release(f"no channel from its destination for {self._lease:g} s")

    def _release(self, why: str) -> None:
        """Forget the session (its destination is gone) and serve the next destination."""
        if self._done.done():
            return
        log.warning("aiopostcopy source: released session %r: %s", self._session.session_id, why)
        self._cancel_lease()
        conns, self._conns = list(self._conns.values()), {}
        for conn in conns:
            self._drop(conn)
        with self._lock:
            self._session = self._new_session()
            self._counts.update(urgent=0, background=0, zero=0, bytes=0, read=0, hole=0, compared=0, changed=0)
        self._released += 1

    def _destination_error(self, session: SourceSession, msg: Error) -> None:
        """The destination sent Error (loop thread): aborted ends the source, anything else the session."""
        if session is not self._session:
            return
        if msg.code is ErrorCode.ABORTED:
            with self._lock:
                session.abort()
            log.warning("aiopostcopy source: session %r aborted by its destination: %s", session.session_id, msg.text)
            self._finish(complete=False)
        else:
            self._release(f"the destination sent Error({msg.code.value}): {msg.text}")

    def _completed(self, session: SourceSession) -> None:
        if session is self._session and session.complete:
            self._finish(complete=True)

    def _finish(self, *, complete: bool) -> None:
        if not self._done.done():
            self._done.set_result(self._report(complete=complete))

    def _fail(self, exc: BaseException) -> None:
        if not self._done.done():
            self._done.set_exception(exc)

    def _report(self, *, complete: bool) -> SourceReport:
        for conn in list(self._conns.values()):  # answers logged and not yet handed over count too
            if conn.server is not None:
                self._take_answers(conn, conn.serve_record)
        self._settle_answers()
        c = self._counts
        return SourceReport(session_id=self._session.session_id, complete=complete, pages_urgent=c["urgent"],
                            pages_background=c["background"], pages_zero=c["zero"], bytes_sent=c["bytes"],
                            connections=c["connections"], sessions_released=self._released,
                            bytes_read=c["read"], pages_hole=c["hole"], pages_compared=c["compared"],
                            pages_changed=c["changed"])

    # -- the urgent channel's thread -------------------------------------------

    def _serve_urgent(self, conn: _Conn, rest: bytes) -> None:
        """Read the urgent channel and answer every request from this thread."""
        decoder = Decoder(allowed=migration_allowed(Role.SOURCE, URGENT))
        staging = _RunBuffer()
        error: BaseException | None = None
        server = conn.server
        try:
            if self._urgent_nice is not None and not set_niceness(self._urgent_nice) and not self._urgent_nice_refused:
                self._urgent_nice_refused = True
                log.info("aiopostcopy source: the urgent thread keeps its priority: nice %d needs root or "
                         "CAP_SYS_NICE", self._urgent_nice)
            if rest:
                decoder.receive_data(rest)
            while not conn.closed:
                if server is not None and not decoder.buffered and conn.session.may_answer_urgent():
                    # at a frame's start, on a live session with nothing to go first: C answers
                    if not self._serve_in_c(conn, server, decoder):
                        server = None  # the stream ended: the decoder has its last bytes and the EOF
                    continue
                self._catch_up(conn)  # what C sent, before anything answered here
                asked = decoder.take_page_request()
                if asked is not None:
                    self._urgent_page(conn, *asked, staging)
                    continue
                msg = decoder.next_event()
                if msg is None:
                    view = decoder.get_buffer()
                    n = conn.recv_into(view)
                    decoder.receive_data(b"") if n == 0 else decoder.buffer_updated(n)
                elif msg is CONNECTION_CLOSED:
                    break
                else:
                    self._on_urgent(conn, msg, staging)
        except BaseException as exc:  # reported to the loop, which fails the source on a bug
            error = self._thread_error(conn, exc)
        finally:
            try:
                self._catch_up(conn)  # before the loop hears of the loss
            finally:
                conn.release()
                try:
                    self._loop.call_soon_threadsafe(self._urgent_ended, conn)
                    self._loop.call_soon_threadsafe(self._lost, conn, error)
                except RuntimeError:  # the loop is closed: nothing watches the eventfd any more
                    if conn.server is not None:
                        conn.server.close_notify()

    def _serve_in_c(self, conn: _Conn, server: PageServer, decoder: Decoder) -> bool:
        """Let the C page server answer Requests until it needs Python, and hand what it
        declined (or the end of the stream) to the decoder; what it sent goes to the loop
        thread, which accounts it (:meth:`_on_answers_logged`), even if ``recv`` failed.  False
        at the end of the stream."""
        # read before the pages are (see SourceSession.answered), and set for the loop thread,
        # which takes the answers of this call as they are handed over
        conn.serve_record = conn.session.sent_record
        served = server.serve()
        if served is Served.ACCOUNT:  # a full log: the loop thread is far behind, this one catches up
            self._catch_up(conn)
        else:
            decoder.receive_data(server.take_rest())
            if served is Served.EOF:
                decoder.receive_data(b"")
                return False
        return True

    def _on_answers_logged(self, conn: _Conn) -> None:
        """The C page server handed a batch of answers over (its eventfd is readable; loop
        thread): account them.  The record is read before the log is taken: answers of a later
        :meth:`PageServer.serve` call (another record) can then only be accounted with an older
        record, which records them as not sent (sent again), never the reverse."""
        try:
            conn.server.acknowledge()
            self._take_answers(conn, conn.serve_record)
            self._settle_answers()
        except Exception as exc:  # a bug: the source fails visibly, never a line in the loop's log
            self._fail(exc)

    def _take_answers(self, conn: _Conn, record: int) -> None:
        """Queue what the C page server of ``conn`` logged (any thread): the taking and the
        queueing are one step under ``_take_lock``, so the logs are queued, and accounted, in
        the order they were logged (the sweep starts again near the last answer accounted)."""
        with self._take_lock:
            log = conn.server.take_log()
            if log:
                self._unaccounted.append((conn, log, record))

    def _urgent_ended(self, conn: _Conn) -> None:
        """The urgent thread ended (loop thread): stop watching its page server's eventfd and
        close it; the thread took what its last :meth:`PageServer.serve` logged."""
        server = conn.server
        if server is not None and server.notify_fd is not None:
            self._loop.remove_reader(server.notify_fd)
            server.close_notify()

    def _catch_up(self, conn: _Conn) -> None:
        """Account what the C page server of ``conn`` sent and the loop thread has not yet
        taken (urgent thread: before it answers in Python, and when it ends), so that the
        session learns the answers in the order they went out.  Otherwise the loop thread
        accounts them, and the urgent thread goes on answering: a Request arriving meanwhile
        waits neither for the session's lock, which the sweep's threads take too, nor for the
        accounting (16 answers took 80-100 us of Python on a 2-vCPU VM: benchmarks/README.md)."""
        if conn.server is not None:
            self._take_answers(conn, conn.serve_record)
        self._settle_answers()

    def _settle_answers(self) -> None:
        """Account every log :meth:`_take_answers` queued, oldest first (any thread; never
        with the lock held)."""
        if not self._unaccounted:
            return
        with self._lock:
            while self._unaccounted:
                conn, log, record = self._unaccounted.popleft()
                self._account_answers_locked(conn, answers_in(log), record)

    def _account_answers_locked(self, conn: _Conn, answers: list[Answer], record: int) -> None:
        """The session and the counters learn what the C page server sent, as :meth:`_send_run`
        and the session's Request handling would have told them (lock held)."""
        session, blocks = conn.session, self._blocks
        read = hole = zero_pages = data_pages = nbytes = 0
        for block, first, count, zero, runs, asked_ns, sent_ns in answers:
            if trace.ENABLED and sent_ns:  # the times C took, as the Python path marks them
                trace.mark("src-request", block, first, asked_ns)
                trace.mark("src-reply", block, first, sent_ns)
            size = blocks[block].page_size
            session.answered(block, first, count, runs, record, (count - zero) * size)
            data_pages += count - zero
            nbytes += (count - zero) * size
            zero_pages += zero
            holes = bounds_total(blocks[block].hole_bounds(first, count)) if zero else 0
            hole += holes
            read += (count - holes) * size
        self._count_sent(conn, read=read, hole=hole, zero=zero_pages, data=data_pages, nbytes=nbytes)

    def _count_sent(self, conn: _Conn, *, read: int, hole: int, zero: int, data: int, nbytes: int) -> None:
        """Add pages sent on ``conn`` to the report's counters (lock held): bytes read from the
        file, hole pages (not read), zero pages (holes among them), data pages and payload bytes.
        A connection of an earlier session counts nowhere."""
        if conn.session is self._session:
            counts = self._counts
            counts["read"] += read
            counts["hole"] += hole
            counts["zero"] += zero
            counts["urgent" if conn.channel is URGENT else "background"] += data
            counts["bytes"] += nbytes
        if conn.channel is URGENT:
            self._demand_at = time.monotonic()

    def _on_urgent(self, conn: _Conn, msg: Message, staging: _RunBuffer) -> None:
        if type(msg) is Error:
            self._loop.call_soon_threadsafe(self._destination_error, conn.session, msg)
            conn.closed = True  # read no more: the destination closes after an Error
            return
        runs: list[PageRun] = []
        comparisons: list[Digests] = []
        with self._lock:
            conn.session.message_received(URGENT, msg, time.monotonic())
            frames = self._drain_locked(conn.session)
            while (run := conn.session.next_urgent()) is not None:
                runs.append(run)
            while (digests := conn.session.next_comparison()) is not None:
                comparisons.append(digests)
        if frames:
            conn.send_or_drop(frames)
        for digests in comparisons:
            self._send_changed(conn, digests, staging)
        if trace.ENABLED and type(msg) is Request:
            for run in msg.runs:
                trace.mark("src-request", run.block, run.first)
        for run in runs:
            self._send_run(conn, run, staging)
            if trace.ENABLED:
                trace.mark("src-reply", run.block, run.first)
        if type(msg) is not Request:
            self._loop.call_soon_threadsafe(self._after_urgent, conn.session)

    def _urgent_page(self, conn: _Conn, block: int, page: int, staging: _RunBuffer) -> None:
        """A Request for one page (a fault), taken from the decoder as ``(block, page)``: answered
        at once when the session has nothing before it, else handled as the Request it is."""
        with self._lock:
            alone = conn.session.urgent_page(block, page)
        run = PageRun(block=block, first=page, count=1)
        if not alone:
            return self._on_urgent(conn, Request(runs=(run,)), staging)
        if trace.ENABLED:
            trace.mark("src-request", block, page)
        self._send_run(conn, run, staging)
        if trace.ENABLED:
            trace.mark("src-reply", block, page)

    def _after_urgent(self, session: SourceSession) -> None:
        """A Resume, Complete or Ping went through the session: wake the sweep, maybe finish."""
        self._completed(session)
        conn = self._conns.get(BACKGROUND)
        if conn is not None:
            conn.wake.set()

    def _thread_error(self, conn: _Conn, exc: BaseException) -> BaseException | None:
        """What a channel thread's exception means: tell the peer, log, return what to report."""
        log.debug("aiopostcopy source: the %s channel's thread ends", conn.channel.value, exc_info=exc)
        if isinstance(exc, RemoteProtocolError):
            conn.try_send(encode(_error_of(exc)))
            return exc
        if isinstance(exc, BlockReadError):
            log.error("aiopostcopy source: %s", exc)
            conn.try_send(encode(Error(code=ErrorCode.IO, text=str(exc)[: LIMITS.max_text])))
            return exc
        if isinstance(exc, OSError):
            return None if conn.closed else exc
        return exc

    # -- the background channel ------------------------------------------------

    def _on_background(self, conn: _Conn, msg: Message) -> None:
        """A message on the background channel (loop thread): Ack, Ping, Pong or Error."""
        if type(msg) is Error:
            return self._destination_error(conn.session, msg)
        with self._lock:
            conn.session.message_received(BACKGROUND, msg, time.monotonic())
            frames = self._drain_locked(conn.session)
        urgent = self._conns.get(URGENT)
        for frame in frames:
            if urgent is not None:
                urgent.try_send(frame)
        conn.wake.set()

    def _sweep(self, conn: _Conn) -> None:
        """The background sender thread: stream the sweep while the window allows.  It reads each
        run and queues its frame; a writer thread sends it meanwhile, in order with every other
        frame this thread queues (:class:`~aiopostcopy.transport.frame_writer.FrameWriter`)."""
        pool: deque[_RunBuffer] = deque()  # free staging buffers: at most _SWEEP_QUEUE + 2 exist
        background = self._background
        leave = lambda: background.discard(threading.get_native_id())  # noqa: E731  (each thread, as it ends)
        bucket = TokenBucket(self._max_bandwidth, time.monotonic()) if self._max_bandwidth else None
        sndbuf = self._sndbuf if conn.sock.family in (socket.AF_INET, socket.AF_INET6) else None
        error: BaseException | None = None
        writer: FrameWriter | None = None
        try:
            # the writer first: a thread started from one in SCHED_IDLE would start there too
            writer = FrameWriter(conn.send, depth=_SWEEP_QUEUE, wait_turn=self._no_urgent_huge.wait,
                                 name="aiopostcopy-source-background-writer",
                                 on_start=lambda: background.add_current(SWEEP_NICENESS), on_end=leave)
            background.add_current(SWEEP_NICENESS)
            while not conn.ending and not conn.closed:
                conn.wake.clear()
                sweeping = self._sweep_open.is_set()
                hold = bucket.wait_time(time.monotonic()) if bucket is not None else 0.0
                with self._lock:
                    run = conn.session.next_background() if sweeping and not hold else None
                    frames = self._drain_locked(conn.session)
                self._send_urgent_frames(frames)
                while conn.outbox:
                    writer.put([conn.outbox.popleft()])
                if conn.farewell:
                    break
                if run is None:
                    conn.wake.wait(hold or (None if sweeping else 0.05))
                    continue
                self._no_urgent_huge.wait()  # a faulted huge page has the link alone
                if sndbuf is not None and self._sndbuf_quiet is not None:
                    sndbuf = self._size_send_buffer(conn, sndbuf)
                staging = pool.popleft() if pool else _RunBuffer(pool)
                nbytes = self._send_run(conn, run, staging, writer)
                if bucket is not None:
                    bucket.charge(nbytes, time.monotonic())
            writer.close()  # what is queued (a farewell's Error last) goes out before the socket closes
        except BaseException as exc:
            if writer is not None:
                with contextlib.suppress(BaseException):  # the frames queued go first; its error is exc
                    writer.close()
            error = self._thread_error(conn, exc)
        finally:
            leave()
            conn.release()
            self._loop.call_soon_threadsafe(self._lost, conn, error)

    def _size_send_buffer(self, conn: _Conn, now: int) -> int:
        """The background connection's SO_SNDBUF for the next run: small while pages are being
        requested, larger once none was for DEMAND_QUIET seconds.  Returns the value set."""
        quiet = time.monotonic() - self._demand_at >= DEMAND_QUIET
        want = self._sndbuf_quiet if quiet else self._sndbuf
        if want is not None and want != now:
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, want)
            return want
        return now

    def _send_urgent_frames(self, frames: list[bytes]) -> None:
        urgent = self._conns.get(URGENT)
        if frames and urgent is not None:
            for frame in frames:
                urgent.try_send(frame)

    # -- from an earlier copy ------------------------------------------------------

    def _send_changed(self, conn: _Conn, msg: Digests, staging: _RunBuffer) -> None:
        """Answer a destination's Digests with Changed: digest our own pages of its run (holes
        without reading them) and name those whose digest differs."""
        block = self._blocks[msg.block]
        size, count = block.page_size, len(msg.digests)
        holes = block.hole_bounds(msg.first, count)
        if holes == (0, count):
            block.check_size()
            ours, read = [zero_digest(size)] * count, 0
        else:
            view = memoryview(staging.take(count * size))[: count * size]
            read = block.read_data(view, msg.first, holes)
            ours = page_digests(view, size, count)
        changed = changed_bounds(msg.digests, ours)
        with self._lock:
            if conn.session is self._session:
                c = self._counts
                c["read"] += read
                c["compared"] += count
                c["changed"] += bounds_total(changed)
        conn.send_or_drop([encode(Changed(block=msg.block, first=msg.first, count=count, changed=changed))])

    # -- sending a run -----------------------------------------------------------

    def _send_run(self, conn: _Conn, run: PageRun, staging: _RunBuffer, writer: FrameWriter | None = None) -> int:
        """Read ``run`` and send it as one frame: Zero if every page is zero, else Pages whose
        ``zeros`` names the zero pages and whose payload holds the others, packed together.
        With a ``writer`` (the sweep) the frame is queued there, and ``staging`` released once it
        is sent.  Returns the payload's bytes (what a bandwidth cap charges)."""
        block = self._blocks[run.block]
        size = block.page_size
        if size > LIMITS.max_payload:
            if writer is None:
                return self._send_huge_page(conn, run, staging)
            writer.flush()  # its pieces go out from here, after every frame queued before them
            nbytes = self._send_huge_page(conn, run, staging)
            staging.release()
            return nbytes
        holes = block.hole_bounds(run.first, run.count)
        if holes == (0, run.count):  # a hole of a sparse file: zeros, nothing to read
            block.check_size()
            view, zeros, read = memoryview(b""), holes, 0
        else:
            buffer = staging.take(run.count * size)
            view = memoryview(buffer)[: run.count * size]
            found = None if holes else read_run(block.fd, size, run.first, run.count, buffer)
            if found is not None:  # read and scanned in C, the GIL free
                read, zeros = len(view), found
            else:
                read = block.read_data(view, run.first, holes)
                zeros = _zero_bounds(buffer, self._zero_page[size], 0, run.count, size)
        zero = bounds_total(zeros)
        nbytes = (run.count - zero) * size
        with self._lock:  # before sending: the destination's Ack for these bytes may come back at once
            self._count_sent(conn, read=read, hole=bounds_total(holes), zero=zero, data=run.count - zero,
                             nbytes=nbytes)
            conn.session.sent(conn.channel, run, nbytes)
        if conn.channel is URGENT:
            send = conn.send_or_drop
        else:
            send = conn.send if writer is None else functools.partial(writer.put, release=staging.release)
        if not nbytes:
            send([encode(Zero(block=run.block, first=run.first, count=run.count))])
        else:  # the data pages go out as the stretches between zero pages: one sendmsg, no packing copy
            send([_pages_header(run.block, run.first, run.count, nbytes, zeros),
                  *_data_stretches(view, zeros, run.count, size)])
        return nbytes

    def _send_huge_page(self, conn: _Conn, run: PageRun, staging: _RunBuffer) -> int:
        """Send one page larger than ``max_payload`` (a run of one): Zero if it is all zero, else one
        Pages frame written piece by piece as each piece is read (the link busy from the first one)."""
        block, urgent = self._blocks[run.block], conn.channel is URGENT
        piece, base = staging.piece(LIMITS.max_payload), run.first * block.page_size
        if urgent:
            self._no_urgent_huge.clear()
        try:
            offset = _first_data(block, piece, base)
            nbytes = 0 if offset >= block.page_size else block.page_size
            with self._lock:
                if conn.session is self._session:
                    self._counts["zero" if not nbytes else "urgent" if urgent else "background"] += 1
                    self._counts["bytes"] += nbytes
                conn.session.sent(conn.channel, run, nbytes)
            if not nbytes:
                frame = [encode(Zero(block=run.block, first=run.first, count=1))]
                conn.send_or_drop(frame) if urgent else conn.send(frame)
                return 0
            pieces = _huge_frame(block, run, piece, offset)
            if urgent:  # other threads write urgent frames too: this one goes whole, under the lock
                with conn.lock:
                    for buffers in pieces:
                        if conn.closed:
                            return nbytes
                        conn.write_locked(buffers)
                return nbytes
            for buffers in pieces:
                self._no_urgent_huge.wait()
                conn.send(buffers)
            return nbytes
        except BlockReadError:
            raise
        except OSError:
            if not urgent:  # as send_or_drop: a reader goes on reading what the peer sent before it closed
                raise
            return 0
        finally:
            if urgent:
                self._no_urgent_huge.set()


def _first_data(block: SourceBlock, piece: bytearray, base: int) -> int:
    """Read the page at byte ``base`` piece by piece until a piece holds data (left in ``piece``);
    returns its offset in the page, or the page size if the page is all zero.  Holes of a
    sparse file (SEEK_DATA) are skipped unread: a snapshot's empty gigabyte costs no read."""
    zero, size = _ZEROS[:len(piece)], block.page_size
    try:
        offset = min(size, (os.lseek(block.fd, base, os.SEEK_DATA) - base) // len(piece) * len(piece))
    except OSError as exc:  # ENXIO: nothing but holes from here on; others: no SEEK_DATA here
        offset = size if exc.errno == errno.ENXIO else 0
    while offset < size:
        block.read_at(memoryview(piece), base + offset)
        if piece != zero:
            break
        offset += len(piece)
    return offset


def _huge_frame(block: SourceBlock, run: PageRun, piece: bytearray, offset: int):
    """The buffers of a huge page's Pages frame, by pieces: the header, the zero pieces before
    ``offset`` and the piece read there (in ``piece``), then each next piece as it is read."""
    size, view = block.page_size, memoryview(piece)
    zero = _ZEROS[:len(piece)]
    yield [_pages_header(run.block, run.first, 1, size, ()), *([zero] * (offset // len(piece))), view]
    for at in range(offset + len(piece), size, len(piece)):
        block.read_at(view, run.first * size + at)
        yield [view]


def _pages_header(block: int, first: int, count: int, nbytes: int, zeros: tuple[int, ...]) -> bytes:
    """The frame of a Pages run without its payload, as wire.encode_pages_header writes it, for a
    run the session handed out (so in range): without building a message object to validate it."""
    header = _PACK((3, block, first, count, nbytes, zeros))
    return len(header).to_bytes(4, "big") + header


def _data_stretches(view: memoryview, zeros: tuple[int, ...], count: int, size: int) -> list[memoryview]:
    """The data pages of a run (those outside ``zeros``), in order, as views of ``view``."""
    if not zeros:
        return [view]
    stretches, page = [], 0
    for i in range(0, len(zeros) + 2, 2):
        low, high = (zeros[i], zeros[i + 1]) if i < len(zeros) else (count, count)
        if low > page:
            stretches.append(view[page * size:low * size])
        page = high
    return stretches


def _zero_bounds(memory: bytearray | bytes | mmap.mmap, zero: bytes, start: int, count: int, size: int) -> tuple[int, ...]:
    """The all-zero pages among ``count`` pages at byte ``start`` of ``memory``, as flattened
    bounds relative to the first of them (Pages.zeros).

    Three strided slices (a C copy each) read the first, middle and last byte
    of every page; only pages whose three bytes are all zero are compared
    with a zero page in full (a slice compared: a copy and a memcmp; ``find``
    would first index the page-long needle, 20 times slower).  Most data pages are ruled out
    without a Python step of their own.
    """
    if count == 1:  # the urgent case: one page, most often data
        if memory[start] | memory[start + size // 2] | memory[start + size - 1]:
            return ()
        return (0, 1) if memory[start:start + size] == zero else ()
    end = start + count * size
    probe = 0
    for offset in (0, size // 2, size - 1):
        probe |= int.from_bytes(memory[start + offset:end:size], "little")
    flags = probe.to_bytes(count, "little")  # byte i is 0: page i may be zero
    bounds: list[int] = []
    last = -2
    index = flags.find(0)
    while index >= 0:
        at = start + index * size
        if memory[at:at + size] == zero:
            if index != last + 1:
                if bounds:
                    bounds.append(last + 1)
                bounds.append(index)
            last = index
        index = flags.find(0, index + 1)
    if bounds:
        bounds.append(last + 1)
    return tuple(bounds)
