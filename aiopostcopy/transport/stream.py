"""asyncio adapter for the migration channels: bytes in, messages out.

One :class:`FrameProtocol` per TCP (or Unix stream) connection.  It is an
:class:`asyncio.BufferedProtocol`: the event loop reads straight into the
buffer the I/O-free :class:`~aiopostcopy.transport.wire.Decoder` offers, which
during a Pages payload is the caller's page-aligned staging memory, so page
data is never copied by Python on the way in.

Each complete message is handed to ``on_message`` synchronously, before the
decoder is asked for the next one.  A receiver that places page data from
staging memory inside ``on_message`` may therefore reuse one staging buffer
per channel.

Errors: a malformed frame becomes :class:`RemoteProtocolError`; the protocol
sends an ``Error`` message, closes the transport and reports the error once
through ``on_lost``.  ``on_lost(None)`` means a clean end of stream.  An
exception raised by ``on_message`` is not swallowed either: the connection
is closed and the exception is passed to ``on_lost``.

Writing: ``send()`` for small messages, ``send_pages()`` writes a Pages header
and a payload memoryview with ``writelines`` (no join).  The transport's flow
control (``pause_writing``/``resume_writing``) is exposed as
:meth:`FrameProtocol.wait_writable` so a background sender can stop queueing
at the high-water mark.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

from aiopostcopy.errors import ClosedError, ProtocolError, RemoteProtocolError
from aiopostcopy.messages import LIMITS, Error, ErrorCode, Limits, Message
from aiopostcopy.transport.wire import ConnectionClosed, Decoder, PageSink, PayloadSink, encode, encode_pages_header

__all__ = ["FrameProtocol", "set_nodelay"]

OnMessage = Callable[[Message], None]
OnLost = Callable[[BaseException | None], None]
OnPage = Callable[[int, int], None]


def set_nodelay(transport: asyncio.BaseTransport) -> None:
    """Turn on TCP_NODELAY when the transport is a TCP socket (no-op otherwise)."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class FrameProtocol(asyncio.BufferedProtocol):
    """One framed connection.

    Args:
        on_message: called with every decoded message, in order.
        on_lost: called once when the connection ends (None for a clean EOF).
        payload_sink: staging memory provider for Pages payloads (see wire.Decoder).
        page_sink: the one-page lane's memory (see wire.Decoder); its pages go to ``on_page``.
        on_page: called as ``on_page(block, page)`` for each page the ``page_sink`` took,
            in order with the messages (required with ``page_sink``).
        allowed: message types accepted from the peer.
        limits: protocol bounds.
        yield_after: after this many bytes received in one loop turn, stop
            reading until the next turn, so other sockets (the urgent channel)
            get their turn; None reads as much as the event loop offers.
        read_first: called with the decoder after each read, before it decodes: a reader of
            whole frames outside the decoder takes what it can (``Decoder.unread`` and
            ``Decoder.skip``); the decoder decodes the rest.
    """

    def __init__(
        self,
        on_message: OnMessage,
        on_lost: OnLost,
        *,
        payload_sink: PayloadSink | None = None,
        page_sink: PageSink | None = None,
        on_page: OnPage | None = None,
        allowed: frozenset[type] | None = None,
        limits: Limits = LIMITS,
        yield_after: int | None = None,
        read_first: Callable[[Decoder], None] | None = None,
    ) -> None:
        self._on_message = on_message
        self._on_lost: OnLost | None = on_lost
        if (page_sink is None) != (on_page is None):
            raise ValueError("page_sink and on_page go together")
        self._on_page = on_page
        self._read_first = read_first
        self._decoder = Decoder(limits=limits, allowed=allowed, payload_sink=payload_sink, page_sink=page_sink)
        self.get_buffer = self._decoder.get_buffer  # type: ignore[method-assign]  (the loop reads into it: no extra call)
        self._transport: asyncio.Transport | None = None
        self._writable = asyncio.Event()
        self._writable.set()
        self._closing = False
        self._fd = -1
        self._loop = asyncio.get_running_loop()
        self.connected = self._loop.create_future()
        self.bytes_received = 0
        self._yield_after = yield_after
        self._turn_bytes = 0
        self._reading_paused = False
        self._held = False

    # -- asyncio callbacks ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's are not asyncio.Transport subclasses
        sock = transport.get_extra_info("socket")
        self._fd = sock.fileno() if sock is not None else -1
        set_nodelay(transport)
        if not self.connected.done():
            self.connected.set_result(None)

    def get_buffer(self, sizehint: int) -> memoryview:  # the decoder's own, bound in __init__
        return self._decoder.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self.bytes_received += nbytes
        decoder = self._decoder
        decoder.buffer_updated(nbytes)
        if self._read_first is None or self._held:
            self._drain()
        else:
            self._read_first(decoder)
            if not decoder.idle:  # else the reader took every frame (the usual answer): nothing to decode
                self._drain()
        if self._yield_after is not None:
            self._turn_bytes += nbytes
            if self._turn_bytes >= self._yield_after and not self._reading_paused:
                self._yield_turn()

    def hold(self) -> None:
        """Deliver no more messages (and read no more) until :meth:`release`.

        A receiver whose resources for the next message are all in use (the
        background channel's staging buffers) holds the connection; TCP then
        pushes back on the peer.
        """
        if self._held:
            return
        self._held = True
        if self._transport is not None and not self._closing and not self._reading_paused:
            self._transport.pause_reading()

    def release(self) -> None:
        """Undo :meth:`hold`: deliver what is buffered, then read again."""
        if not self._held:
            return
        self._held = False
        if self._transport is not None and not self._closing and not self._reading_paused:
            self._transport.resume_reading()
        self._drain()

    def _yield_turn(self) -> None:
        """Stop reading for the rest of this loop turn (fairness to other sockets).

        libuv reads a busy stream up to 32 times per turn; a bulk channel would
        otherwise keep a small urgent reply waiting behind a megabyte of data.
        """
        if self._transport is None or self._closing:
            return
        self._reading_paused = True
        if not self._held:
            self._transport.pause_reading()
        self._loop.call_soon(self._resume_turn)

    def _resume_turn(self) -> None:
        self._reading_paused = False
        self._turn_bytes = 0
        if self._transport is not None and not self._closing and not self._held:
            self._transport.resume_reading()

    def eof_received(self) -> bool:
        self._decoder.receive_data(b"")
        self._drain()
        return False

    def connection_lost(self, exc: BaseException | None) -> None:
        self._transport = None
        self._writable.set()
        if not self.connected.done():
            self.connected.set_exception(exc or ConnectionResetError("connection lost"))
        self._report_lost(exc if exc is not None or self._closing else None)

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # -- public --------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self._transport is not None and not self._closing

    def send(self, message: Message) -> None:
        """Queue one message.

        Raises:
            ClosedError: the connection is closed.
        """
        self._require_open().write(encode(message))

    def send_pages(self, block: int, first: int, count: int, payload: memoryview) -> None:
        """Queue a Pages frame whose payload is written from ``payload`` without joining."""
        header = encode_pages_header(block, first, count, len(payload))
        self._require_open().writelines((header, payload))

    def send_frames(self, buffers: list[bytes | memoryview]) -> None:
        """Queue already-encoded frames (headers, payload views) in one writev."""
        self._require_open().writelines(buffers)

    def idle_fd(self) -> int:
        """The connection's socket when nothing is queued in the transport, so bytes written to
        it directly now keep the stream's order; -1 otherwise (closed, closing, or data waiting).
        Only for a plain connection: under TLS the socket carries records, not frames."""
        transport = self._transport
        if transport is None or self._closing or transport.get_write_buffer_size():
            return -1
        return self._fd

    async def wait_writable(self) -> None:
        """Wait until the transport's write buffer is below its high-water mark."""
        await self._writable.wait()

    def set_send_buffer(self, nbytes: int) -> None:
        """Set SO_SNDBUF of a TCP connection (no-op for other sockets)."""
        sock = self._transport.get_extra_info("socket") if self._transport else None
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, nbytes)

    def write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() if self._transport else 0

    def close(self, error: ProtocolError | None = None) -> None:
        """Close the connection, telling the peer why when ``error`` is given."""
        if self._transport is None or self._closing:
            return
        if error is not None:
            code = ErrorCode(error.code) if error.code in ErrorCode._value2member_map_ else ErrorCode.PROTOCOL
            self._transport.write(encode(Error(code=code, text=str(error)[: LIMITS.max_text])))
        self._closing = True
        self._transport.close()

    def abort(self) -> None:
        """Drop the connection at once (tests use this to cut a link)."""
        if self._transport is not None:
            self._closing = True
            self._transport.abort()

    # -- internals -----------------------------------------------------------

    def _require_open(self) -> asyncio.Transport:
        if self._transport is None or self._closing:
            raise ClosedError("connection is closed")
        return self._transport

    def _drain(self) -> None:
        try:
            while not self._held:
                event = self._decoder.next_event()
                if event is None:
                    return
                if type(event) is tuple:  # a page of the one-page lane
                    self._on_page(*event)  # type: ignore[misc]  (set with the page sink)
                    continue
                if event is ConnectionClosed or isinstance(event, ConnectionClosed):
                    self._closing = True
                    if self._transport is not None:
                        self._transport.close()
                    self._report_lost(None)
                    return
                self._on_message(event)
        except RemoteProtocolError as exc:
            self.close(exc)
            self._report_lost(exc)
        except BaseException as exc:  # a bug or a rule broken by the receiver: fail visibly
            self.abort()
            self._report_lost(exc)
            if not isinstance(exc, Exception):
                raise

    def _report_lost(self, exc: BaseException | None) -> None:
        callback, self._on_lost = self._on_lost, None
        if callback is not None:
            callback(exc)
