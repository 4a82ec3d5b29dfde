"""Framed messages with file descriptors over a Unix stream socket, on asyncio.

The client control protocol needs SCM_RIGHTS, which asyncio transports do not
carry, so this adapter drives a non-blocking Unix socket itself with
``loop.add_reader`` / ``loop.add_writer``.  It shares the framing of the
migration channels (:mod:`aiopostcopy.transport.wire`).

File descriptors arrive as ancillary data; they are kept in arrival order in
a FIFO and the message handler claims them with :meth:`ControlChannel.take_fds`
(a Blocks message takes one per block, a delegated Register takes one).
Descriptors nobody claims are closed when the channel closes, and a peer that
sends more than ``max_pending_fds`` of them is cut off: a client cannot make
the service hoard descriptors.

Close order (trio's rule): mark closed, stop watching the socket, report the
loss once, close the socket, close unclaimed fds.
"""

from __future__ import annotations

import array
import asyncio
import os
import socket
from collections import deque
from collections.abc import Callable, Iterable

from aiopostcopy.errors import ClosedError, RemoteProtocolError
from aiopostcopy.messages import LIMITS, Error, ErrorCode, Message
from aiopostcopy.transport.wire import ConnectionClosed, Decoder, encode

__all__ = ["ControlChannel"]

_RECV_BYTES = 256 * 1024
_FD_SIZE = array.array("i").itemsize
#: Linux's SCM_MAX_FD: descriptors one sendmsg may carry.  A message with more
#: sends them on its first bytes, this many per byte (one sendmsg per byte);
#: the receiver queues them in order, so it sees one FIFO either way.
MAX_FDS_PER_SENDMSG = 253


class ControlChannel:
    """One control connection (service side or asyncio client side).

    Args:
        sock: a connected AF_UNIX SOCK_STREAM socket; the channel owns it.
        on_message: called with each message; claim its fds with take_fds().
        on_lost: called once when the channel ends (None: clean EOF or our close).
        allowed: message types accepted from the peer.
        max_pending_fds: bound on received-but-unclaimed descriptors.
    """

    def __init__(
        self,
        sock: socket.socket,
        on_message: Callable[[Message], None],
        on_lost: Callable[[BaseException | None], None],
        *,
        allowed: frozenset[type] | None = None,
        max_pending_fds: int = LIMITS.max_blocks,
    ) -> None:
        sock.setblocking(False)
        self._sock: socket.socket | None = sock
        self._loop = asyncio.get_running_loop()
        self._on_message = on_message
        self._on_lost: Callable[[BaseException | None], None] | None = on_lost
        self._decoder = Decoder(allowed=allowed)
        self._fds: deque[int] = deque()
        self._max_fds = max_pending_fds
        self._out: deque[tuple[memoryview, list[int]]] = deque()
        self._loop.add_reader(sock.fileno(), self._on_readable)

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

    def send(self, message: Message, fds: Iterable[int] = ()) -> None:
        """Queue a message (with descriptors riding on its first byte).

        Raises:
            ClosedError: the channel is closed.
        """
        if self._sock is None:
            raise ClosedError("control channel is closed")
        self._out.append((memoryview(encode(message)), list(fds)))
        if len(self._out) == 1:
            self._flush()

    def close(self, error: Exception | None = None, *, code: ErrorCode = ErrorCode.PROTOCOL) -> None:
        """Close, first telling the peer ``error`` (best effort) when given."""
        if self._sock is None:
            return
        if error is not None:
            self._try_send_error(code, str(error))
        self._shutdown(None)

    # -- reading -------------------------------------------------------------

    def _on_readable(self) -> None:
        try:
            data = self._receive()
            if data is None:
                return
            self._decoder.receive_data(data)
            self._drain()
        except RemoteProtocolError as exc:
            self._try_send_error(ErrorCode(exc.code) if exc.code in ErrorCode._value2member_map_ else ErrorCode.PROTOCOL, str(exc))
            self._shutdown(exc)
        except OSError as exc:
            self._shutdown(exc)
        except Exception as exc:  # a bug in a handler: end this client visibly
            self._shutdown(exc)

    def _receive(self) -> bytes | None:
        assert self._sock is not None
        space = socket.CMSG_SPACE(self._max_fds * _FD_SIZE)
        try:
            data, ancdata, flags, _ = self._sock.recvmsg(_RECV_BYTES, space, socket.MSG_CMSG_CLOEXEC)
        except (BlockingIOError, InterruptedError):
            return None
        self._collect_fds(ancdata)
        if flags & socket.MSG_CTRUNC:
            raise RemoteProtocolError("too many file descriptors in one message")
        return data

    def _collect_fds(self, ancdata: list[tuple[int, int, bytes]]) -> None:
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[: len(payload) - len(payload) % _FD_SIZE])
                self._fds.extend(fds)
        if len(self._fds) > self._max_fds:
            raise RemoteProtocolError(f"peer sent more than {self._max_fds} unclaimed file descriptors")

    def _drain(self) -> None:
        while self._sock is not None:
            event = self._decoder.next_event()
            if event is None:
                return
            if event is ConnectionClosed or isinstance(event, ConnectionClosed):
                self._shutdown(None)
                return
            self._on_message(event)

    # -- writing -------------------------------------------------------------

    def _flush(self) -> None:
        while self._out and self._sock is not None:
            data, fds = self._out[0]
            chunk, rest = (data, []) if len(fds) <= MAX_FDS_PER_SENDMSG else (data[:1], fds[MAX_FDS_PER_SENDMSG:])
            fds = fds[:MAX_FDS_PER_SENDMSG]
            try:
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
                sent = self._sock.sendmsg([chunk], anc)
            except (BlockingIOError, InterruptedError):
                self._loop.add_writer(self._sock.fileno(), self._on_writable)
                return
            except OSError as exc:
                self._shutdown(exc)
                return
            if sent < len(data):
                self._out[0] = (data[sent:], rest)  # sent >= 1: the descriptors went with it
            else:
                self._out.popleft()
        if self._sock is not None:
            self._loop.remove_writer(self._sock.fileno())

    def _on_writable(self) -> None:
        self._flush()

    def _try_send_error(self, code: ErrorCode, text: str) -> None:
        if self._sock is None:
            return
        try:
            self._sock.send(encode(Error(code=code, text=text[: LIMITS.max_text])))
        except OSError:
            pass

    # -- closing -------------------------------------------------------------

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
            sock.close()
            while self._fds:
                os.close(self._fds.popleft())
