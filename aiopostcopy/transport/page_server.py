"""The source's urgent channel answered in C: :class:`PageServer`.

A Request is a thread stopped on the destination.  The source's urgent thread
hands its connection to :meth:`PageServer.serve`, which runs without the GIL:
it reads Request frames, reads their pages from the blocks' files and writes the
Pages (or Zero) frames of each Request in one ``sendmsg``, the same bytes the
Python path writes.  It returns to Python

* with **answers** to account (:meth:`take_answers`, or :meth:`take_log` and
  :func:`answers_in` where another thread accounts them), before it would block
  in ``recv`` again: the session learns what was sent between one request and
  the next, off the faulting thread's path.  With ``notify`` it does not
  return for them: it writes to an eventfd (:attr:`PageServer.notify_fd`),
  another thread takes them (:meth:`take_log`, under a mutex of its own) and
  the serving thread goes on answering without ever taking the GIL for it.  Requests already waiting in the
  socket are answered first (it reads without waiting while answers are
  logged), so a burst costs one return to Python and one GIL hand-over.
  Requests of a burst of faults arrive microseconds apart, not all at once:
  with ``account_idle_ms`` the server, finding the socket empty with answers
  logged, waits about that long in ``recv`` (the socket's ``SO_RCVTIMEO``,
  which the kernel rounds up to its timer tick, and which it takes off again
  before it returns) for the next Request before returning,
  yet never keeps answers unaccounted longer than ``account_max_ms`` after the
  first of them was logged, nor waits with ``account_max_answers`` logged (a
  full log, the end of the stream, an error or a ``shutdown`` of the socket
  return at once);
* when a frame is not a Request it answers (**declined**: any other message,
  a run out of range, a block of huge pages, a read that fails): the bytes
  from that frame on (:meth:`take_rest`) go to the Python decoder, which
  decodes, answers or rejects them as before;
* at the end of the stream, or when ``recv`` fails.

Every writer of the connection takes :attr:`PageServer.lock` (the C thread
takes the same mutex), so frames never interleave.  The object owns no
file descriptor but, with ``notify``, its eventfd (:meth:`PageServer.close_notify`):
the connection's socket and the blocks' files stay open while it is used.  Its memory, the mutex with it, lives as long as the object or its
:attr:`~PageServer.lock`, so a writer that still holds the lock after the
connection ended locks valid memory (a glibc mutex needs no destroy).

The same C module serves the destination's side too: its request and reply
lanes (:mod:`~aiopostcopy.transport.request_lane`), a self-served client's lane
(:mod:`~aiopostcopy.transport.client_lane`), and :class:`ShortRuns`, which reads
a self-served client's ClientRequest for the service's control channel: from
bytes the decoder holds, or straight from the socket (:meth:`ShortRuns.receive`,
one ``recvmsg`` and the frames at its front in one call).
"""

from __future__ import annotations

import enum
import os
import struct
import weakref
from dataclasses import dataclass
from typing import NamedTuple

#: The C side's PS_VERSION this module is written for.
VERSION = 12


def matches(built: object) -> bool:
    """``built`` (the extension's ``lib``) was compiled from the sources this module is written for."""
    return built is not None and getattr(built, "PS_VERSION", None) == VERSION


try:
    from aiopostcopy.transport._page_server import ffi, lib
except ImportError:  # not built (an interpreter without the extension): the Python path serves
    ffi = lib = None
if not matches(lib):  # built from other sources (a checkout without a rebuild): not used
    ffi = lib = None

__all__ = ["Answer", "PageServer", "PageServerLock", "Served", "ServedBlock", "ShortRuns", "RECEIVE_FRAMES", "VERSION",
           "available", "matches", "read_run"]

#: Bytes of Requests buffered at once; a larger frame is declined.
RECEIVE_BYTES = 64 << 10
#: Bytes of pages read for one Request; a Request wanting more is declined.
PAGE_BYTES = 1 << 20
#: Pages of one run answered here (the C side's bound on a run's zero stretches).
MAX_RUN = 64
#: Answers logged before Python must account them (room for a Request of the most runs, and more).
LOG_ANSWERS = 256


#: Frames one :meth:`ShortRuns.receive` takes at most (the rest of what it read is the decoder's).
RECEIVE_FRAMES = lib.RQ_RECEIVE_FRAMES if lib is not None else 0


def available() -> bool:
    """The C page server was built, from the sources of this version (a stale build, say after
    a checkout without a rebuild, is not used: the source then answers on the Python path)."""
    return lib is not None


def read_run(fd: int, page_size: int, first: int, count: int, buffer: bytearray) -> tuple[int, ...] | None:
    """Read ``count`` pages from page ``first`` of the file ``fd`` into ``buffer`` and find the
    all-zero ones, in one C call with the GIL free (the sweep's run).

    Returns:
        The zero pages' bounds relative to ``first`` (as ``Pages.zeros``), or None: the extension
        is not built, or the read failed or came short (the caller reads again in Python, which
        says why).
    """
    if lib is None or len(buffer) < count * page_size:
        return None
    zeros = ffi.new("uint32_t[]", count + 1)
    n = lib.ps_read_run(fd, page_size, first, count, ffi.from_buffer(buffer), zeros)
    return None if n < 0 else tuple(ffi.unpack(zeros, n))


class ShortRuns:
    """Reads a frame of a few runs, ``[type, [[block, first, count], ...]]`` (a ClientRequest, a
    Request), at the front of received bytes in one C call (``rq_take_runs``): the decoder's own
    shortcut (:meth:`~aiopostcopy.transport.wire.Decoder.take_client_request`) does the same in
    Python, with msgpack, in about five times the interpreter's instructions of this call.

    It takes only the form the encoders write (each run a fixarray of three unsigned integers),
    whole, within the bounds the decoder's shortcut checks (the frame's size, the runs' ranges);
    anything else it leaves to the decoder.

    Args:
        max_runs: the most runs taken (at most 15, a fixarray's).
        max_blocks: a run's block must be below this.
    """

    __slots__ = ("_runs", "_count", "_max_runs", "_max_blocks", "_reader", "_view", "_buffer")

    def __init__(self, max_runs: int, max_blocks: int) -> None:
        if lib is None:
            raise RuntimeError("the C page server is not built (run make)")
        if not 1 <= max_runs <= 15:
            raise ValueError(f"max_runs {max_runs}: a fixarray holds 1 to 15")
        self._runs = ffi.new("uint64_t[]", 3 * max_runs)
        self._count = ffi.new("uint32_t *")
        self._max_runs, self._max_blocks = max_runs, max_blocks
        self._reader = reader = ffi.new("struct rq_reader *")  # receive()'s
        reader.max_runs, reader.max_blocks = max_runs, max_blocks
        self._view: bytearray | None = None  # the buffer receive() reads into, and its C pointer
        self._buffer = ffi.NULL

    def take(self, buffer: bytearray, start: int, end: int,
             code: int) -> tuple[tuple[tuple[int, int, int], ...], int] | None:
        """``(runs, length)`` when ``buffer[start:end]`` begins with a whole frame of type
        ``code`` in that form (``runs`` as ``(block, first, count)``; ``length``: the frame's
        bytes, prefix included); None otherwise, with nothing read."""
        length = lib.rq_take_runs(ffi.from_buffer("uint8_t[]", buffer) + start, end - start, code, self._max_runs,
                                  self._max_blocks, self._runs, self._count)
        if not length:
            return None
        runs, n = self._runs, self._count[0]
        if n == 1:  # the usual ClientRequest: one fault
            return ((runs[0], runs[1], runs[2]),), length
        values = ffi.unpack(runs, 3 * n)
        return tuple(zip(values[0::3], values[1::3], values[2::3])), length  # type: ignore[return-value]

    def receive(self, sock: int, buffer: bytearray, code: int) -> tuple[int, int, list[int], bool,
                                                                        list[tuple[tuple[int, int, int], ...]]]:
        """One ``recvmsg`` of the control socket ``sock`` into ``buffer`` (the decoder holds
        nothing, so the bytes begin a frame) with :meth:`take` over the frames of type ``code`` at
        their front, at most :data:`RECEIVE_FRAMES`, when no descriptors came along
        (``rq_receive_runs``).

        Returns:
            ``(got, consumed, fds, truncated, frames)``: the bytes received (0: the peer closed;
            ``-errno`` when the call failed, ``-EAGAIN``: nothing there), the bytes of the frames
            taken, the descriptors received (the caller owns them), whether the kernel had
            more than fitted (the extra ones are closed), and each frame's runs, in order.
        """
        reader = self._reader
        if buffer is not self._view:  # the channel's buffer, the same on every call
            self._buffer = ffi.from_buffer("uint8_t[]", buffer, require_writable=True)
            self._view, reader.buf, reader.cap = buffer, self._buffer, len(buffer)
        reader.type = code
        got = lib.rq_receive_runs(reader, sock)
        n, runs = reader.nframes, reader.runs
        if n == 1 and reader.frame_runs[0] == 1:  # the usual read: one fault's ClientRequest
            return got, reader.consumed, [], False, [((runs[0], runs[1], runs[2]),)]
        fds = ffi.unpack(reader.fds, reader.nfds) if reader.nfds else []
        frames: list[tuple[tuple[int, int, int], ...]] = []
        if n:
            counts = ffi.unpack(reader.frame_runs, n)
            values, at = ffi.unpack(runs, 3 * sum(counts)), 0
            for k in counts:
                frame = values[at:at + 3 * k]
                frames.append(tuple(zip(frame[0::3], frame[1::3], frame[2::3])))  # type: ignore[arg-type]
                at += 3 * k
        return got, reader.consumed, fds, bool(reader.truncated), frames


class Served(enum.IntEnum):
    """Why :meth:`PageServer.serve` returned."""

    DECLINED = 1  #: the buffered frame from :meth:`PageServer.take_rest` on is for the Python path
    ACCOUNT = 2  #: answers to account; nothing whole is buffered
    EOF = 3  #: the peer closed its side (a partial frame may remain)


@dataclass(frozen=True)
class ServedBlock:
    """A block as the page server reads it: its file, page size and number of pages."""

    fd: int
    page_size: int
    pages: int
    max_run: int  #: longest run answered whole (the session splits longer ones)


class Answer(NamedTuple):
    """One run answered: ``runs`` is the Request's number of runs on its first run, else 0;
    with timestamps, when its Request was read and when the answer was written
    (``time.monotonic_ns()``'s clock), else 0."""

    block: int
    first: int
    count: int
    zero_pages: int
    runs: int
    asked_ns: int = 0
    sent_ns: int = 0


#: ``struct ps_answer``'s fields in memory, as ``_page_server_source.c`` declares them; checked
#: against the compiler's layout when the module loads (:func:`_answer_layout`).
_ANSWER_FIELDS = (("first", "Q"), ("block", "I"), ("count", "I"), ("zero_pages", "I"), ("runs", "I"),
                  ("asked_ns", "Q"), ("sent_ns", "Q"))


def _answer_layout() -> struct.Struct:
    """``struct ps_answer`` as the compiler laid it out (each field's offset, the size), for
    :func:`answers_in`; a layout other than :data:`_ANSWER_FIELDS` is refused."""
    if ffi is None:
        return struct.Struct("")
    fields, fmt, at = dict(ffi.typeof("struct ps_answer").fields), "=", 0
    for name, kind in _ANSWER_FIELDS:
        offset, size = fields[name].offset, ffi.sizeof(fields[name].type)
        if offset < at or size != struct.calcsize(kind):  # the C source and this module disagree
            raise ImportError(f"struct ps_answer: field {name} of {size} bytes at {offset}, not as expected")
        fmt += "x" * (offset - at) + kind
        at = offset + struct.calcsize(kind)
    fmt += "x" * (ffi.sizeof("struct ps_answer") - at)
    return struct.Struct(fmt)


_ANSWER = _answer_layout()


def answers_in(log: bytes) -> list[Answer]:
    """The answers of a log taken with :meth:`PageServer.take_log`, in the order sent."""
    return [Answer(block, first, count, zero_pages, runs, asked_ns, sent_ns)
            for first, block, count, zero_pages, runs, asked_ns, sent_ns in _ANSWER.iter_unpack(log)]


class PageServerLock:
    """The connection's write lock: the C mutex, as a context manager."""

    __slots__ = ("_server",)

    def __init__(self, server: object) -> None:
        self._server = server

    def __enter__(self) -> None:
        lib.ps_lock(self._server)

    def __exit__(self, *exc: object) -> None:
        lib.ps_unlock(self._server)


class PageServer:
    """Answer Requests on a connected, blocking socket from the blocks' files.

    Args:
        sock: the connection's file descriptor (blocking).
        blocks: per block index, how to read it; ``None`` for a block never
            answered here (its Requests are declined).
        timestamps: record when each Request was read and answered (for
            :mod:`aiopostcopy.trace`).
        account_idle_ms: with answers logged and nothing in the socket, wait
            about this long (in ``recv``, rounded up to the kernel's timer
            tick) for another Request before handing them over, so a burst of
            Requests arriving apart is answered before one hand-over (0: at
            once, no wait).
        account_max_ms: the longest answers stay unaccounted, from the first
            of them logged, however the Requests keep coming (bounds the
            wait of ``account_idle_ms``).
        account_max_answers: with this many answers logged, no wait: Python
            accounts them at once, after the last answer went out and before
            the next fault's Request can be there (0: bounded by the log only).
            A long batch would make the Request arriving while it is accounted
            wait for all of it.
        notify: hand each batch over by a write to :attr:`notify_fd` (an
            eventfd this object owns) instead of returning from :meth:`serve`;
            the thread watching it calls :meth:`take_log`.  :meth:`serve` still
            returns for a full log, a declined frame, the end of the stream and
            an error, and hands what is logged over the same way first.

    Raises:
        RuntimeError: the extension is not built (see :func:`available`).
        OSError: the mutex could not be made.
    """

    def __init__(self, sock: int, blocks: list[ServedBlock | None], *, timestamps: bool = False,
                 account_idle_ms: int = 0, account_max_ms: int = 20, account_max_answers: int = 0,
                 notify: bool = False) -> None:
        if lib is None:
            raise RuntimeError("the C page server is not built")
        assert MAX_RUN <= lib.PS_MAX_RUN_PAGES and LOG_ANSWERS >= 2 * lib.PS_MAX_RUNS
        self._blocks = ffi.new("struct ps_block[]", max(1, len(blocks)))
        for i, block in enumerate(blocks):
            entry = self._blocks[i]
            if block is None or block.page_size % 8 or block.page_size > PAGE_BYTES:
                entry.fd, entry.page_size = -1, 0
                continue
            entry.fd, entry.page_size, entry.pages = block.fd, block.page_size, block.pages
            entry.max_run = max(1, min(block.max_run, MAX_RUN, PAGE_BYTES // block.page_size))
        self._in = ffi.new("uint8_t[]", RECEIVE_BYTES)
        self._pages = ffi.new("uint8_t[]", PAGE_BYTES)
        self._headers = ffi.new("uint8_t[]", 64 << 10)
        self._log = ffi.new("struct ps_answer[]", LOG_ANSWERS)
        s = self._server = ffi.new("struct ps_server *")
        s.sock, s.blocks, s.nblocks = sock, self._blocks, len(blocks)
        s.inbuf, s.in_cap, s.pages, s.pages_cap = self._in, RECEIVE_BYTES, self._pages, PAGE_BYTES
        s.headers, s.headers_cap = self._headers, len(self._headers)
        s.log, s.log_cap = self._log, LOG_ANSWERS
        s.timestamps = int(timestamps)
        s.account_idle_ms, s.account_max_ms = max(0, account_idle_ms), max(0, account_max_ms)
        s.account_max_answers = max(0, account_max_answers)
        if lib.ps_init(s) != 0:
            raise OSError("cannot make the page server's lock")
        self.lock = PageServerLock(s)  # keeps the memory (and so the mutex) alive while any writer holds it
        #: the eventfd a batch of answers is handed over by (None: serve() returns for them)
        self.notify_fd: int | None = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) if notify else None
        s.notify_fd = -1 if self.notify_fd is None else self.notify_fd
        self._closing = (weakref.finalize(self, os.close, self.notify_fd) if self.notify_fd is not None
                         else None)
        if self._closing is not None:  # not at exit: a daemon thread may still be serving then
            self._closing.atexit = False

    def serve(self) -> Served:
        """Answer Requests until Python is needed (see the module docstring); blocks in ``recv``
        only with no batch of answers to hand over (the caller took the log when the last call
        returned), and with a batch waits about ``account_idle_ms`` (a timer tick at least) at a
        time for more, and about ``account_max_ms`` in all.

        Raises:
            OSError: ``recv`` failed.
        """
        status = lib.ps_serve(self._server)
        if status == lib.PS_ERROR:
            code = self._server.error
            raise OSError(code, f"receiving on the urgent channel failed: {os.strerror(code)}")
        return Served(status)

    def take_answers(self) -> list[Answer]:
        """The runs answered since the last call, in the order sent."""
        return answers_in(self.take_log())

    def take_log(self) -> bytes:
        """The runs answered since the last call, as the log's bytes (:func:`answers_in` reads
        them): one copy, so that the thread that serves goes back to serving at once and
        another thread makes the answers.  Any thread, even while :meth:`serve` runs."""
        out = ffi.new("struct ps_answer[]", LOG_ANSWERS)  # a buffer per call: two threads may take at once
        n = lib.ps_take_log(self._server, out, LOG_ANSWERS)
        return ffi.buffer(out, n * _ANSWER.size)[:] if n else b""

    def acknowledge(self) -> None:
        """Read :attr:`notify_fd`'s notifications (it was readable), before :meth:`take_log`."""
        if self.notify_fd is not None and self._closing is not None and self._closing.alive:
            try:
                os.eventfd_read(self.notify_fd)
            except BlockingIOError:  # read already (a log taken since holds its answers)
                pass

    def take_notified_log(self) -> bytes:
        """:meth:`take_log` when :attr:`notify_fd` is readable: the notifications are read too."""
        self.acknowledge()
        return self.take_log()

    def close_notify(self) -> None:
        """Close :attr:`notify_fd` (once :meth:`serve` runs no more, and nothing watches it)."""
        if self._closing is not None:
            self._closing()

    def take_rest(self) -> bytes:
        """The bytes received and not answered (from a declined frame on); the buffer empties."""
        s = self._server
        rest = bytes(ffi.buffer(self._in + s.in_start, s.in_end - s.in_start))
        s.in_start = s.in_end = 0
        return rest
