"""Framed messages with file descriptors over a Unix stream socket: one channel, two drivers.

The client control protocol needs SCM_RIGHTS, which asyncio transports do not
carry, so this module drives a non-blocking Unix socket itself.  It shares the
framing of the migration channels (:mod:`aiopostcopy.transport.wire`).

Theory of operation
-------------------
:class:`_FdSocket` is the one implementation of framing and fd passing; it
never waits.  Reading is one ``recvmsg`` that feeds the decoder and queues
the descriptors that rode along; writing pushes queued frames until the
socket would block.  Two drivers decide *when* to call it:

* :class:`ControlChannel` (the service, or an asyncio client) watches the
  socket with ``loop.add_reader`` / ``loop.add_writer`` and hands each
  message to a callback;
* :class:`BlockingControlChannel` (a worker's :mod:`aiopostcopy.client`)
  waits with ``poll`` under a deadline and returns events to its caller,
  whose own thread may also poll the socket among other fds.

File descriptors arrive as ancillary data; they are kept in arrival order in
a FIFO and the message handler claims them with ``take_fds`` (a Blocks
message takes one per block, a delegated Register takes one).  Descriptors
nobody claims are closed when the channel closes, and a peer that sends more
than ``max_pending_fds`` of them is cut off: a peer cannot make us hoard
descriptors.  A frame's descriptors ride on the sendmsg that carries its
first byte, at most :data:`MAX_FDS_PER_SENDMSG` per sendmsg (more go one
byte at a time); the receiver sees one FIFO either way.

Close order (trio's rule): mark closed, stop watching the socket, report the
loss once, close the socket, close unclaimed fds.
"""

from __future__ import annotations

import array
import asyncio
import errno
import os
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Union

from aiopostcopy.errors import ClosedError, RemoteProtocolError
from aiopostcopy.messages import LIMITS, ClientRequest, Error, ErrorCode, Message
from aiopostcopy.transport import page_server
from aiopostcopy.transport.wire import SHORT_RUNS, ConnectionClosed, Decoder, encode

__all__ = ["ControlChannel", "BlockingControlChannel", "MAX_FDS_PER_SENDMSG", "error_for"]

_RECV_BYTES = 256 * 1024
_FD_SIZE = array.array("i").itemsize
#: ``receive_front(fd, buffer) -> (got, consumed, fds, truncated)``: see :meth:`BlockingControlChannel.receive_nowait`.
FrontReceiver = Callable[[int, memoryview], tuple[int, int, list[int], bool]]
# plain ints: the socket module's flags are IntFlag members, whose operators run Python code per message
_MSG_CTRUNC, _MSG_CMSG_CLOEXEC, _MSG_NOSIGNAL = int(socket.MSG_CTRUNC), int(socket.MSG_CMSG_CLOEXEC), int(socket.MSG_NOSIGNAL)
#: Linux's SCM_MAX_FD: descriptors one sendmsg may carry.  A message with more
#: sends them on its first bytes, this many per byte (one sendmsg per byte);
#: the receiver queues them in order, so it sees one FIFO either way.
MAX_FDS_PER_SENDMSG = 253

Event = Union[Message, ConnectionClosed]  #: what a receive yields


class _FdSocket:
    """Framing and fd passing over one non-blocking AF_UNIX stream socket; never waits.

    Args:
        sock: a connected AF_UNIX SOCK_STREAM socket; the channel owns it.
        allowed: message types accepted from the peer.
        max_pending_fds: bound on received-but-unclaimed descriptors.
    """

    def __init__(self, sock: socket.socket, *, allowed: frozenset[type] | None,
                 max_pending_fds: int) -> None:
        sock.setblocking(False)
        self._sock: socket.socket | None = sock
        self._decoder = Decoder(allowed=allowed)
        self._fds: deque[int] = deque()
        self._max_fds = max_pending_fds
        self._ancillary = socket.CMSG_SPACE(max_pending_fds * _FD_SIZE)
        # reused: no allocation per read.  A C reader that keeps a pointer into it holds the
        # bytearray, not the memoryview: the garbage collector of Python 3.11 may clear a
        # memoryview that others still export from, and then crash when it is freed.
        self._received_bytes = bytearray(_RECV_BYTES)
        self._received = memoryview(self._received_bytes)
        self._out: deque[tuple[memoryview, list[int]]] = deque()

    @property
    def is_open(self) -> bool:
        return self._sock is not None

    def peer_pid(self) -> int | None:
        """The peer's pid from SO_PEERCRED, or None when unknown."""
        if self._sock is None:
            return None
        creds = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        pid = int.from_bytes(creds[:4], "little")
        return pid or None

    @property
    def pending_fds(self) -> int:
        """Descriptors received and not yet claimed."""
        return len(self._fds)

    def take_fds(self, count: int) -> list[int]:
        """Claim the next ``count`` received descriptors (the caller owns them).

        Raises:
            RemoteProtocolError: fewer than ``count`` arrived with the message.
        """
        if count > len(self._fds):
            raise RemoteProtocolError(f"message needs {count} file descriptors, {len(self._fds)} arrived")
        return [self._fds.popleft() for _ in range(count)]

    def _check_open(self) -> socket.socket:
        if self._sock is None:
            raise ClosedError("control channel is closed")
        return self._sock

    # -- reading -------------------------------------------------------------

    def _read(self) -> bool:
        """One recvmsg into the decoder.  Returns False when nothing was there (would block).

        Raises:
            RemoteProtocolError: too many descriptors, or a malformed frame.
            OSError: the socket failed.
        """
        sock = self._check_open()
        try:  # into a buffer kept for it: a fresh 256 KiB bytes per read cost 12 us (mmap and munmap)
            nbytes, ancdata, flags, _ = sock.recvmsg_into((self._received,), self._ancillary, _MSG_CMSG_CLOEXEC)
        except (BlockingIOError, InterruptedError):
            return False
        self._collect_fds(ancdata)
        if flags & _MSG_CTRUNC:
            raise RemoteProtocolError("too many file descriptors in one message")
        self._decoder.receive_data(self._received[:nbytes])  # empty at EOF: the decoder yields ConnectionClosed
        return True

    def _read_front(self, receive_front: FrontReceiver) -> bool:
        """:meth:`_read` by ``receive_front`` (see :meth:`BlockingControlChannel.receive_nowait`),
        the decoder holding nothing.  Returns False when nothing was there, or when it took
        everything it read.

        Raises:
            As :meth:`_read`.
        """
        got, consumed, fds, truncated = receive_front(self._check_open().fileno(), self._received)
        if not self._received_in_c(got, fds, truncated):
            return False
        if got and consumed == got:  # whole Placed frames, all taken
            return False
        self._decoder.receive_data(self._received[consumed:got])  # empty at EOF: the decoder yields ConnectionClosed
        return True

    def _received_in_c(self, got: int, fds: list[int], truncated: bool) -> bool:
        """After a ``recvmsg`` made in C: the descriptors kept; False when nothing was there.

        Raises:
            OSError: the call failed (``got`` is ``-errno``).
            RemoteProtocolError: the kernel had more descriptors than fitted.
        """
        if got < 0:
            if got in (-errno.EAGAIN, -errno.EINTR):
                return False
            raise OSError(-got, os.strerror(-got))
        self._add_fds(fds)
        if truncated:
            raise RemoteProtocolError("too many file descriptors in one message")
        return True

    def _collect_fds(self, ancdata: list[tuple[int, int, bytes]]) -> None:
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[: len(payload) - len(payload) % _FD_SIZE])
                self._add_fds(fds)

    def _add_fds(self, fds: Iterable[int]) -> None:
        self._fds.extend(fds)
        if len(self._fds) > self._max_fds:
            raise RemoteProtocolError(f"peer sent more than {self._max_fds} unclaimed file descriptors")

    # -- writing -------------------------------------------------------------

    def _queue(self, message: Message, fds: Iterable[int]) -> None:
        self._check_open()
        self._out.append((memoryview(encode(message)), list(fds)))

    def _push(self) -> bool:
        """Send queued frames until done (True) or the socket would block (False).

        Raises:
            OSError: the socket failed (EPIPE when the peer is gone).
        """
        sock = self._check_open()
        while self._out:
            data, fds = self._out[0]
            chunk, rest = (data, []) if len(fds) <= MAX_FDS_PER_SENDMSG else (data[:1], fds[MAX_FDS_PER_SENDMSG:])
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds[:MAX_FDS_PER_SENDMSG]))] if fds else []
            try:
                sent = sock.sendmsg([chunk], anc, _MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                return False
            if sent < len(data):
                self._out[0] = (data[sent:], rest)  # sent >= 1: the descriptors went with it
            else:
                self._out.popleft()
        return True

    def _try_send_last(self, message: Message) -> None:
        """Best effort: one last frame straight onto the socket (we are about to close)."""
        if self._sock is None:
            return
        try:
            self._sock.send(encode(message), socket.MSG_NOSIGNAL)
        except OSError:
            pass

    def _close_socket(self, sock: socket.socket) -> None:
        sock.close()
        while self._fds:
            os.close(self._fds.popleft())


def _error_code(exc: RemoteProtocolError) -> ErrorCode:
    return ErrorCode(exc.code) if exc.code in ErrorCode._value2member_map_ else ErrorCode.PROTOCOL


def error_for(exc: RemoteProtocolError) -> Message:
    """The default answer to a frame the decoder refused: ``Error(code, text)``."""
    return Error(code=_error_code(exc), text=str(exc)[: LIMITS.max_text])


class ControlChannel(_FdSocket):
    """One control connection driven by asyncio (service side or an asyncio client).

    Args:
        sock: a connected AF_UNIX SOCK_STREAM socket; the channel owns it.
        on_message: called with each message; claim its fds with take_fds().
        on_lost: called once when the channel ends (None: clean EOF or our close).
        allowed: message types accepted from the peer.
        max_pending_fds: bound on received-but-unclaimed descriptors.
        refusal: the last frame to send when the decoder refuses a frame
            (the service answers a malformed mapping table with Reject);
            default :func:`error_for`, ``Error(code, text)``.
        on_client_request: the fault path's shortcut (the service): called with
            the runs, ``((block, first, count), ...)``, of each ClientRequest of a
            few runs (a self-served client's faults), taken without building the message: in
            C where it is built (:class:`~aiopostcopy.transport.page_server.ShortRuns`), which
            reads the socket itself while the decoder holds nothing, else by
            :meth:`~aiopostcopy.transport.wire.Decoder.take_client_request`; every other frame
            goes to ``on_message``.
    """

    def __init__(
        self,
        sock: socket.socket,
        on_message: Callable[[Message], None],
        on_lost: Callable[[BaseException | None], None],
        *,
        allowed: frozenset[type] | None = None,
        max_pending_fds: int = LIMITS.max_blocks,
        refusal: Callable[[RemoteProtocolError], Message] = error_for,
        on_client_request: Callable[[tuple[tuple[int, int, int], ...]], None] | None = None,
    ) -> None:
        super().__init__(sock, allowed=allowed, max_pending_fds=max_pending_fds)
        self._loop = asyncio.get_running_loop()
        self._refusal = refusal
        self._on_client_request = on_client_request
        #: the shortcut's frames read in C, when it is built (else by the decoder, in Python)
        self._client_request_reader = (page_server.ShortRuns(SHORT_RUNS, LIMITS.max_blocks)
                                       if on_client_request is not None and page_server.available()
                                       and self._decoder.allows(ClientRequest.TYPE) else None)
        self._on_message = on_message
        self._on_lost: Callable[[BaseException | None], None] | None = on_lost
        self._writing = False  # the loop watches the socket for writing (frames wait)
        self._loop.add_reader(sock.fileno(), self._on_readable)

    def send(self, message: Message, fds: Iterable[int] = ()) -> None:
        """Queue a message (with descriptors riding on its first byte).

        Raises:
            ClosedError: the channel is closed.
        """
        self._queue(message, fds)
        if len(self._out) == 1:
            self._flush()

    def send_frame(self, frame: bytes) -> None:
        """Send one encoded frame that carries no descriptors (a frame the caller encoded
        itself, e.g. a Placed on the fault path): straight onto the socket when nothing
        waits ahead of it, else queued behind what does.

        Raises:
            ClosedError: the channel is closed.
        """
        sock = self._check_open()
        if self._out:
            self._out.append((memoryview(frame), []))
            return
        try:
            sent = sock.send(frame, _MSG_NOSIGNAL)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._shutdown(exc)
            return
        if sent < len(frame):
            self._out.append((memoryview(frame)[sent:], []))
            self._flush()

    def close(self, error: Exception | None = None, *, code: ErrorCode = ErrorCode.PROTOCOL) -> None:
        """Close, first telling the peer ``error`` (best effort) when given."""
        if self._sock is None:
            return
        if error is not None:
            self._try_send_last(Error(code=code, text=str(error)[: LIMITS.max_text]))
        self._shutdown(None)

    def _on_readable(self) -> None:
        try:
            reader = self._client_request_reader
            if self._read_requests(reader) if reader is not None and self._decoder.idle else self._read():
                self._drain()
        except RemoteProtocolError as exc:
            self._try_send_last(self._refusal(exc))
            self._shutdown(exc)
        except Exception as exc:  # OSError, or a bug in a handler: end this channel visibly
            self._shutdown(exc)

    def _drain(self) -> None:
        decoder, on_client_request = self._decoder, self._on_client_request
        while self._sock is not None:
            if on_client_request is not None:
                runs = self._take_client_request()
                if runs is not None:
                    on_client_request(runs)
                    continue
            event = decoder.next_event()
            if event is None:
                return
            if isinstance(event, ConnectionClosed):
                self._shutdown(None)
                return
            self._on_message(event)

    def _read_requests(self, reader: page_server.ShortRuns) -> bool:
        """:meth:`_read` in C (:meth:`~aiopostcopy.transport.page_server.ShortRuns.receive`), the
        decoder holding nothing: the ClientRequests of a few runs at the front of the bytes read go
        to ``on_client_request`` from there, the rest to the decoder.  Returns whether the decoder
        got bytes (False: nothing was there, the frames taken were all of it, or a handler
        closed the channel).

        Raises:
            As :meth:`_read`.
        """
        got, consumed, fds, truncated, frames = reader.receive(self._check_open().fileno(), self._received_bytes,
                                                               ClientRequest.TYPE)
        if not self._received_in_c(got, fds, truncated):
            return False
        on_client_request = self._on_client_request
        assert on_client_request is not None  # the reader exists only with it
        for runs in frames:
            if self._sock is None:  # a handler closed the channel: the rest is dropped with it
                return False
            on_client_request(runs)
        if (got and consumed == got) or self._sock is None:
            return False
        self._decoder.receive_data(self._received[consumed:got])  # empty at EOF: the decoder yields ConnectionClosed
        return True

    def _take_client_request(self) -> tuple[tuple[int, int, int], ...] | None:
        """The ``on_client_request`` shortcut's next frame: a ClientRequest of a few runs, taken
        from the decoder (None: the next frame is anything else, or not whole)."""
        decoder, reader = self._decoder, self._client_request_reader
        if reader is None:
            return decoder.take_client_request()
        unread = decoder.unread()
        if unread is None:  # nothing buffered at a frame's start
            return None
        taken = reader.take(*unread, ClientRequest.TYPE)
        if taken is None:  # another message, or a form the C reader leaves alone
            return decoder.take_client_request()
        runs, length = taken
        decoder.skip(length)
        return runs

    def _flush(self) -> None:
        if self._sock is None:
            return
        try:
            done = self._push()
        except OSError as exc:
            self._shutdown(exc)
            return
        if done:
            if self._writing:  # watched only while frames wait: a remove per frame costs an epoll_ctl
                self._writing = False
                self._loop.remove_writer(self._sock.fileno())
        elif not self._writing:
            self._writing = True
            self._loop.add_writer(self._sock.fileno(), self._flush)

    def _shutdown(self, exc: BaseException | None) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        self._loop.remove_reader(sock.fileno())
        self._loop.remove_writer(sock.fileno())
        callback, self._on_lost = self._on_lost, None
        try:
            if callback is not None:
                callback(exc)
        finally:
            self._close_socket(sock)


class BlockingControlChannel(_FdSocket):
    """One control connection driven by a thread: ``poll`` with deadlines, no event loop.

    Sending is thread-safe (frames never interleave).  Receiving belongs to
    one thread at a time: :meth:`receive_nowait` after the socket polled
    readable, or :meth:`receive` to wait for one event.

    Args:
        sock: a connected AF_UNIX SOCK_STREAM socket; the channel owns it.
        send_timeout: seconds one :meth:`send` may wait for room in the socket.
        allowed: message types accepted from the peer.
        max_pending_fds: bound on received-but-unclaimed descriptors.
    """

    def __init__(self, sock: socket.socket, *, send_timeout: float,
                 allowed: frozenset[type] | None = None,
                 max_pending_fds: int = LIMITS.max_blocks) -> None:
        super().__init__(sock, allowed=allowed, max_pending_fds=max_pending_fds)
        self.send_timeout = send_timeout
        self._events: deque[Event] = deque()
        self._eof = False
        self._send_lock = threading.Lock()

    def fileno(self) -> int:
        """The socket's descriptor, to poll among others (readable: call receive_nowait).

        Raises:
            ClosedError: the channel is closed.
        """
        return self._check_open().fileno()

    def send(self, message: Message, fds: Iterable[int] = ()) -> None:
        """Send one frame (``fds`` on its first byte), waiting up to ``send_timeout`` for room.

        Raises:
            ClosedError: the channel is closed.
            TimeoutError: the peer did not read for ``send_timeout`` seconds.
            OSError: the socket failed (BrokenPipeError when the peer is gone).
        """
        with self._send_lock:
            self._queue(message, fds)
            self._push_all()

    def send_frame(self, frame: bytes) -> None:
        """:meth:`send` of a frame the caller encoded itself, with no descriptors (a
        self-served client's ClientRequest on its fault path).

        Raises:
            As :meth:`send`.
        """
        with self._send_lock:
            sock = self._check_open()
            if not self._out:  # the usual case: straight onto the socket, no queue
                try:
                    sent = sock.send(frame, _MSG_NOSIGNAL)
                except (BlockingIOError, InterruptedError):
                    sent = 0
                if sent == len(frame):
                    return
                frame = memoryview(frame)[sent:]
            self._out.append((memoryview(frame), []))
            self._push_all()

    def write_fd(self) -> int:
        """The socket's descriptor, for one frame written straight onto it by a caller that holds
        every other writer of this channel off (a self-served client's C lane); -1 while frames
        wait ahead of it.  What the socket does not take goes next through :meth:`send_frame`.

        Raises:
            ClosedError: the channel is closed.
        """
        with self._send_lock:
            sock = self._check_open()
            return -1 if self._out else sock.fileno()

    def _push_all(self) -> None:
        """Send what is queued, waiting up to ``send_timeout`` for room (send lock held)."""
        deadline = time.monotonic() + self.send_timeout
        try:
            while not self._push():
                self._wait(select.POLLOUT, deadline)
        except OSError as exc:
            if not isinstance(exc, TimeoutError):  # a broken socket: nothing queued can go
                self._out.clear()
            raise

    def receive_nowait(self, placed: list[tuple[int, int, int]] | None = None,
                       receive_front: FrontReceiver | None = None) -> list[Event]:
        """What has arrived, without waiting: messages in order, then ConnectionClosed after EOF.

        Args:
            placed: when given, the Placed frames that arrived ahead of every other message
                (with no descriptors riding along) are taken as their runs ``(block, first,
                count)``, appended here, and built into no message: a self-served client's
                fault path (the caller checked that Placed may come now).
            receive_front: with ``placed``, reads the socket instead while the decoder holds
                nothing, so the bytes begin a frame (a client's C lane, which takes the Placed
                frames it understands at their front, their pages marked and woken):
                ``receive_front(fd, buffer)`` makes one ``recvmsg`` into ``buffer`` and returns
                ``(got, consumed, fds, truncated)``: the bytes received (0 at EOF, ``-errno``
                when it failed), the bytes it took, the descriptors that came along and
                whether the kernel had more.  The rest go on as above.

        Raises:
            RemoteProtocolError: too many descriptors, or a malformed or forbidden frame.
            OSError: the socket failed.
        """
        self._read_once(placed, receive_front)
        events, self._events = list(self._events), deque()
        return events

    def receive(self, deadline: float) -> Event:
        """Wait for the next event (a message, or ConnectionClosed at EOF) until ``deadline``.

        Args:
            deadline: a ``time.monotonic()`` value.

        Raises:
            TimeoutError: nothing arrived by ``deadline``.
            RemoteProtocolError, OSError: as :meth:`receive_nowait`.
        """
        while not self._events:
            self._wait(select.POLLIN, deadline)
            self._read_once()
        return self._events.popleft()

    def close(self) -> None:
        """Close the socket and every unclaimed descriptor (idempotent)."""
        sock, self._sock = self._sock, None
        if sock is not None:
            self._close_socket(sock)

    def _read_once(self, placed: list[tuple[int, int, int]] | None = None,
                   receive_front: FrontReceiver | None = None) -> None:
        if self._eof:
            return
        if (receive_front is not None and placed is not None and not self._events and not self.pending_fds
                and self._decoder.idle):
            if not self._read_front(receive_front):
                return
        elif not self._read():
            return
        if placed is not None and not self._events and not self.pending_fds:
            while (runs := self._decoder.take_placed()) is not None:
                placed.extend(runs)
        while not self._eof and (event := self._decoder.next_event()) is not None:
            self._eof = isinstance(event, ConnectionClosed)
            self._events.append(event)

    def _wait(self, events: int, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the peer did not answer in time")
        poller = select.poll()
        poller.register(self._check_open(), events)
        poller.poll(max(1, int(remaining * 1000)))
