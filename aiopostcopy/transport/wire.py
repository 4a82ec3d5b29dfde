"""The I/O-free wire codec: messages to framed msgpack bytes and back.

Theory of operation
-------------------
A frame is a 4-byte big-endian length ``N``, then ``N`` bytes of msgpack: one
array ``[TYPE, field...]`` (fields in dataclass order, enums as their values;
docs/protocol.md has every byte).  A Pages header ``[3, block, first, count,
nbytes, zeros]`` is followed by ``nbytes`` raw bytes: page data never passes through
msgpack and no per-page object exists.

:func:`encode` makes frames.  :class:`Decoder` is h11-style: bytes go in by
``receive_data`` or by the ``get_buffer``/``buffer_updated`` pair of
``asyncio.BufferedProtocol``; ``next_event`` returns a message, the
CONNECTION_CLOSED event, or None ("feed me more").  No I/O, no blocking.

Hostile input.  A header must open with the fixarray byte of its type's arity
and a positive-fixint type code.  Those two bytes are checked first, so an
unknown or unwanted type, a wrong arity, or a header over its type's *budget*
(the widest valid encoding, see :func:`header_budget`) is refused unparsed.
The Unpacker then runs with ``use_list=False``, ``raw=False``,
``strict_map_key=True``, no maps, bins or exts, and ``max_str_len`` /
``max_array_len`` no larger than a valid message needs.  Parsed objects can
still outweigh their bytes (``[[]]``: 2 bytes, a 64-byte tuple), so transient
memory stays under ~30x the budget: ~70 MB for a maximal Resume, ~35 MB for a
maximal Hello, little for the rest.  Every failure -- msgpack errors, shapes,
validation -- is a :class:`RemoteProtocolError` with ``code``; the decoder is
then dead and re-raises that error on every call.

Zero copy.  With a ``payload_sink``, each Pages header makes the decoder ask
the caller for a writable memoryview of exactly ``nbytes`` (page-aligned
staging memory).  Payload already buffered is copied in once; then
``get_buffer`` returns the sink's unfilled tail, so ``recv_into`` writes
straight into staging memory, and the event is ``Pages(..., data=None)``.
Without a sink, ``data`` is ``bytes``.  The input buffer is read at an offset
and compacted only when its tail runs short.

File descriptors are not the codec's business: a Blocks frame carries
``len(blocks)`` fds and a delegated Register one, as SCM_RIGHTS on the
sendmsg() of the frame's first byte (:mod:`aiopostcopy.core.control`).
"""

from __future__ import annotations

import dataclasses
import functools
import struct
from typing import Any, Callable, Final

import msgpack

from aiopostcopy.errors import ProtocolError, RemoteProtocolError, LocalProtocolError
from aiopostcopy.messages import (
    LIMITS, MESSAGE_TYPES, Ack, Accept, BlockInfo, Blocks, Bye, Channel, ClientHello, ClientMode,
    Changed, ClientRequest, Complete, Digests, Discard, Done, End, Error, ErrorCode, Hello, Limits, Message, PageRun,
    Pages, Ping, Placed, Pong, Register, Reject, Request, Resume, Role, Zero,
)

__all__ = [
    "ConnectionClosed", "CONNECTION_CLOSED", "Decoder", "PageLanded", "PageSink", "PayloadSink", "PREFIX_SIZE",
    "SHORT_RUNS", "encode", "encode_client_request",
    "encode_page_request", "encode_page_requests", "encode_pages_header", "encode_placed", "header_budget", "migration_allowed",
]

PREFIX_SIZE: Final = 4
_PREFIX = struct.Struct(">I")
_CHUNK = 64 << 10  #: free space get_buffer() offers outside a payload
_SHRINK_ABOVE = 1 << 20  #: an empty buffer larger than this is given back
SHORT_RUNS: Final = 8  #: the most runs of a Request or ClientRequest the decoder's shortcuts take
_RUN_MAX_SIZE = 22  #: the longest msgpack run [block, first, count]: 1 + 3 + 9 + 9 bytes
_ONE_PAGE_HEADER = 32  #: the longest header of one page: [3, block, page, 1, nbytes, []] with 9-byte integers
#: Shared: validated messages hold only exact int/str/bool/tuple/list, so pack() runs no
#: Python code and cannot release the GIL or re-enter midway.
_PACKER = msgpack.Packer(use_bin_type=True)

PayloadSink = Callable[[Pages, int], memoryview]
PageSink = Callable[[int, int, int], "memoryview | None"]
#: The decoder's event for a page taken by the one-page lane: ``(block, page)``, its payload in the page sink's memory.
PageLanded = tuple[int, int]


@dataclasses.dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """Event: the peer closed the stream cleanly, at a frame boundary."""


CONNECTION_CLOSED: Final = ConnectionClosed()

# ------------------------------------------------------------------ encoding


def _runs_out(runs: tuple[PageRun, ...]) -> list[tuple[int, int, int]]:
    return [(r.block, r.first, r.count) for r in runs]


def _blocks_out(blocks: tuple[BlockInfo, ...]) -> list[tuple[str, int, int]]:
    return [(b.name, b.length, b.page_size) for b in blocks]


_FIELDS_OUT: dict[type, Callable[[Any], tuple]] = {
    Hello: lambda m: (m.version, m.session_id, m.role.value, m.channel.value, m.features,
                      _blocks_out(m.blocks)),
    Request: lambda m: (_runs_out(m.runs),),
    Zero: lambda m: (m.block, m.first, m.count),
    Discard: lambda m: (m.block, m.first, m.count),
    Resume: lambda m: (m.session_id, m.received, _runs_out(m.pending)),
    Done: lambda m: (m.pages,),
    Complete: lambda m: (),
    Ack: lambda m: (m.nbytes,),
    Ping: lambda m: (m.token,),
    Pong: lambda m: (m.token,),
    Error: lambda m: (m.code.value, m.text),
    ClientHello: lambda m: (m.version, m.pid, m.name, m.mode.value),
    Blocks: lambda m: (m.session_id, _blocks_out(m.blocks)),
    Register: lambda m: (m.mappings,),
    Accept: lambda m: (),
    Reject: lambda m: (m.code.value, m.text),
    ClientRequest: lambda m: (_runs_out(m.runs),),
    Placed: lambda m: (_runs_out(m.runs),),
    End: lambda m: (m.complete,),
    Bye: lambda m: (),
    Digests: lambda m: (m.block, m.first, m.digests),
    Changed: lambda m: (m.block, m.first, m.count, m.changed),
}


def _frame(fields: tuple, limits: Limits) -> bytes:
    header = _PACKER.pack(fields)
    if len(header) > limits.max_header:
        raise LocalProtocolError(f"header of {len(header)} bytes exceeds {limits.max_header}")
    return _PREFIX.pack(len(header)) + header


def encode(msg: Message, *, limits: Limits = LIMITS) -> bytes:
    """Encode one message as a complete frame.

    Args:
        msg: any message; a Pages message must carry ``data``.
        limits: bounds the header size (the peer's limits, normally LIMITS).

    Returns:
        Length prefix, msgpack header and, for Pages, the payload.

    Raises:
        LocalProtocolError: not a message, Pages without data, or too large.
    """
    if type(msg) is Pages:
        if msg.data is None:
            raise LocalProtocolError("Pages without data: use encode_pages_header()")
        size = msg.data.nbytes if type(msg.data) is memoryview else len(msg.data)
        header = encode_pages_header(msg.block, msg.first, msg.count, size, msg.zeros, limits=limits)
        return b"".join((header, msg.data))
    fields = _FIELDS_OUT.get(type(msg))
    if fields is None:
        raise LocalProtocolError(f"not a message: {type(msg).__name__}")
    return _frame((msg.TYPE, *fields(msg)), limits)


def encode_page_request(block: int, page: int) -> bytes:
    """The frame of ``Request([[block, page, 1]])``, byte for byte what :func:`encode` makes,
    without building the message (a quiet fault's request; the caller checked the page)."""
    header = _PACKER.pack((Request.TYPE, ((block, page, 1),)))
    return _PREFIX.pack(len(header)) + header


def encode_page_requests(pages: list[tuple[int, int]]) -> bytes:
    """The frame of one Request for ``pages`` (``(block, page)`` pairs, in the order faulted),
    each page following its predecessor in the same block joined to its run: what :func:`encode`
    makes of that Request, without building the message (the faults of one read)."""
    return _page_runs_frame(Request.TYPE, pages)


def encode_client_request(pages: list[tuple[int, int]]) -> bytes:
    """:func:`encode_page_requests` for a self-served client: the frame of one ClientRequest
    (the faults of one read of its userfaultfd; the caller checked the pages)."""
    return _page_runs_frame(ClientRequest.TYPE, pages)


def _page_runs_frame(code: int, pages: list[tuple[int, int]]) -> bytes:
    runs: list[list[int]] = []
    last = None
    for block, page in pages:
        if last is not None and last[0] == block and last[1] + last[2] == page:
            last[2] += 1
        else:
            last = [block, page, 1]
            runs.append(last)
    if not runs or len(runs) > LIMITS.max_runs:
        raise LocalProtocolError(f"1 to {LIMITS.max_runs} runs, not {len(runs)}")
    header = _PACKER.pack((code, runs))
    return _PREFIX.pack(len(header)) + header


def encode_placed(runs: tuple[PageRun, ...]) -> bytes:
    """The frame of ``Placed(runs)``, byte for byte what :func:`encode` makes, without building
    the message (a self-served client's answer; the runs are a valid Placed's: 1 to
    ``LIMITS.max_runs`` of them)."""
    if len(runs) == 1:  # one run, the usual answer: its header is far below any limit
        run = runs[0]
        header = _PACKER.pack((Placed.TYPE, ((run.block, run.first, run.count),)))
        return _PREFIX.pack(len(header)) + header
    return _frame((Placed.TYPE, _runs_out(runs)), LIMITS)


def encode_pages_header(block: int, first: int, count: int, nbytes: int, zeros: tuple[int, ...] = (), *,
                        limits: Limits = LIMITS) -> bytes:
    """Encode the frame of a Pages run without its payload.

    The caller writes exactly ``nbytes`` of page data right after it (for
    example with ``transport.writelines((header, view))``), avoiding a copy.

    Args:
        block, first, count: the page run.
        nbytes: payload size that follows, 1..limits.max_payload.
        zeros: the run's all-zero pages, as :attr:`Pages.zeros` (not in the payload).
        limits: bounds nbytes.

    Returns:
        Length prefix and msgpack header ``[3, block, first, count, nbytes, zeros]``.

    Raises:
        LocalProtocolError: a field is out of range.
    """
    Pages(block=block, first=first, count=count, zeros=zeros)  # validates the run
    if not limits.payload_ok(nbytes, count, zeros):
        raise LocalProtocolError(f"pages nbytes must be in [1, {limits.max_payload}] (or one page of up to "
                                 f"{limits.max_page_size}), got {nbytes!r}")
    return _frame((Pages.TYPE, block, first, count, nbytes, zeros), limits)


# ------------------------------------------------------------------ decoding


def _runs_in(items: tuple) -> tuple[PageRun, ...]:
    if len(items) > LIMITS.max_runs:  # before building thousands of objects to refuse
        raise LocalProtocolError(f"more than {LIMITS.max_runs} runs")
    return tuple([PageRun(block=b, first=f, count=c) for b, f, c in items])


def _blocks_in(items: tuple) -> tuple[BlockInfo, ...]:
    if len(items) > LIMITS.max_blocks:
        raise LocalProtocolError(f"more than {LIMITS.max_blocks} blocks")
    return tuple([BlockInfo(name=n, length=size, page_size=p) for n, size, p in items])


_BUILD: dict[int, Callable[[tuple], Message]] = {
    Hello.TYPE: lambda f: Hello(version=f[1], session_id=f[2], role=Role(f[3]), channel=Channel(f[4]),
                                features=f[5], blocks=_blocks_in(f[6])),
    Request.TYPE: lambda f: Request(runs=_runs_in(f[1])),
    Pages.TYPE: lambda f: Pages(block=f[1], first=f[2], count=f[3], zeros=f[5]),
    Zero.TYPE: lambda f: Zero(block=f[1], first=f[2], count=f[3]),
    Discard.TYPE: lambda f: Discard(block=f[1], first=f[2], count=f[3]),
    Resume.TYPE: lambda f: Resume(session_id=f[1], received=f[2], pending=_runs_in(f[3])),
    Done.TYPE: lambda f: Done(pages=f[1]),
    Complete.TYPE: lambda f: Complete(),
    Ack.TYPE: lambda f: Ack(nbytes=f[1]),
    Ping.TYPE: lambda f: Ping(token=f[1]),
    Pong.TYPE: lambda f: Pong(token=f[1]),
    Error.TYPE: lambda f: Error(code=ErrorCode(f[1]), text=f[2]),
    ClientHello.TYPE: lambda f: ClientHello(version=f[1], pid=f[2], name=f[3], mode=ClientMode(f[4])),
    Blocks.TYPE: lambda f: Blocks(session_id=f[1], blocks=_blocks_in(f[2])),
    Register.TYPE: lambda f: Register(mappings=f[1]),
    Accept.TYPE: lambda f: Accept(),
    Reject.TYPE: lambda f: Reject(code=ErrorCode(f[1]), text=f[2]),
    ClientRequest.TYPE: lambda f: ClientRequest(runs=_runs_in(f[1])),
    Placed.TYPE: lambda f: Placed(runs=_runs_in(f[1])),
    End.TYPE: lambda f: End(complete=f[1]),
    Bye.TYPE: lambda f: Bye(),
    Digests.TYPE: lambda f: Digests(block=f[1], first=f[2], digests=f[3]),
    Changed.TYPE: lambda f: Changed(block=f[1], first=f[2], count=f[3], changed=f[4]),
}

#: first header byte of each type: a fixarray of 1 + number of fields
_FIRST_BYTE: dict[int, int] = {
    code: 0x90 + 1 + len(dataclasses.fields(cls)) for code, cls in MESSAGE_TYPES.items()
}


def header_budget(cls: type, limits: Limits = LIMITS) -> int:
    """Largest valid header of a message type, in bytes.

    Counts every integer as 9 bytes and every string as 5 + 4 bytes per
    character (the widest msgpack encodings), so any conforming encoder fits.

    Args:
        cls: a message class.
        limits: the counts and lengths allowed.

    Returns:
        The budget, never above ``limits.max_header``.
    """
    i, a = 9, 5  # widest integer, widest array header

    def s(chars: int) -> int:  # widest string of that many characters
        return 5 + 4 * chars

    name, enum = s(limits.max_name), s(16)
    block, runs = 1 + name + 2 * i, a + limits.max_runs * (1 + 3 * i)
    body = {
        Hello: 2 * i + name + 2 * enum + 2 * a + limits.max_features * name + limits.max_blocks * block,
        Request: runs, Pages: 4 * i + a + 2 * limits.max_zero_runs * i, Zero: 3 * i, Discard: 3 * i,
        Resume: name + a + limits.max_blocks * (1 + i + a) + 2 * limits.max_resume_runs * i + runs,
        Done: i, Complete: 0, Ack: i, Ping: i, Pong: i, Error: enum + s(limits.max_text),
        ClientHello: 2 * i + name + enum, Blocks: name + a + limits.max_blocks * block,
        Register: a + limits.max_blocks * (1 + 4 * i), Accept: 0, Reject: enum + s(limits.max_text),
        ClientRequest: runs, Placed: runs, End: 1, Bye: 0,
        Digests: 2 * i + a + limits.max_digests * i, Changed: 3 * i + a + (limits.max_digests + 1) * i,
    }[cls]
    return min(limits.max_header, 2 + body)


@functools.lru_cache(maxsize=8)
def _budgets(limits: Limits) -> dict[int, int]:
    return {code: header_budget(cls, limits) for code, cls in MESSAGE_TYPES.items()}


_BOTH: Final = frozenset({Hello, Ping, Pong, Error})
_MIGRATION_ALLOWED: Final = {
    (Role.SOURCE, Channel.URGENT): _BOTH | {Request, Resume, Complete, Digests},
    (Role.SOURCE, Channel.BACKGROUND): _BOTH | {Ack},
    (Role.DESTINATION, Channel.URGENT): _BOTH | {Pages, Zero, Discard, Changed},
    (Role.DESTINATION, Channel.BACKGROUND): _BOTH | {Pages, Zero, Discard, Done},
}


def migration_allowed(receiver: Role, channel: Channel) -> frozenset[type]:
    """Message types a migration peer may receive on a channel.

    Args:
        receiver: the receiving side's role.
        channel: the connection.

    Returns:
        The set to pass as ``Decoder(allowed=...)``.
    """
    return _MIGRATION_ALLOWED[(Role(receiver), Channel(channel))]


def _remote(exc: BaseException, what: str) -> RemoteProtocolError:
    code = exc.code if isinstance(exc, ProtocolError) else ErrorCode.PROTOCOL.value
    err = RemoteProtocolError(f"{what}: {exc}", code=code)
    err.__cause__ = exc
    return err


class Decoder:
    """Incremental, I/O-free frame decoder for one connection (one direction).

    Args:
        limits: bounds on headers, payloads and the msgpack objects inside.
        allowed: message classes this side may receive; None allows all.
        payload_sink: ``sink(header, nbytes) -> memoryview`` of exactly
            ``nbytes`` writable bytes that receives a Pages payload
            (``header`` is the Pages message, ``data`` None).  It may raise a
            ProtocolError to refuse the run (bad block, size).
        page_sink: the one-page lane (a demand page's answer): for a Pages
            header of one page and no zeros, ``page_sink(block, page, nbytes)``
            returns a writable memoryview of exactly ``nbytes`` bytes for its
            payload, or None to take the general way (``payload_sink`` and a
            Pages message); it may raise a ProtocolError as ``payload_sink``
            does.  A page taken by it is returned as the event ``(block,
            page)``, a :data:`PageLanded`, once its payload is in that memory:
            no message is built.

    Raises:
        TypeError: ``allowed`` holds something that is not a message class.
    """

    def __init__(self, *, limits: Limits = LIMITS, allowed: frozenset[type] | None = None,
                 payload_sink: PayloadSink | None = None, page_sink: PageSink | None = None) -> None:
        classes = MESSAGE_TYPES.values() if allowed is None else allowed
        if not set(classes) <= set(MESSAGE_TYPES.values()):
            raise TypeError(f"allowed holds non-message types: {set(classes) - set(MESSAGE_TYPES.values())}")
        budgets = _budgets(limits)
        self._budget = {cls.TYPE: budgets[cls.TYPE] for cls in classes}
        self._max_header, self._max_payload = limits.max_header, limits.max_payload
        self._limits = limits
        self._unpacker = msgpack.Unpacker(
            use_list=False, raw=False, strict_map_key=True, max_buffer_size=limits.max_header,
            read_size=min(_CHUNK, limits.max_header),  # initial buffer; it grows on demand
            max_str_len=4 * max(limits.max_text, limits.max_name), max_bin_len=0, max_map_len=0,
            max_ext_len=0, max_array_len=max(2 * limits.max_resume_runs, limits.max_runs,
                                             limits.max_blocks, limits.max_features))
        self._parsed = 0  # header bytes fed to the unpacker, to detect trailing bytes
        self._make_sink = payload_sink
        self._page_sink = page_sink if Pages.TYPE in self._budget else None
        self._one_page_payload = max(limits.max_payload, limits.max_page_size)  # LIMITS.payload_ok of one page
        self._buf = bytearray(_CHUNK)
        self._view = memoryview(self._buf)
        self._start = self._end = 0  # unread bytes are _buf[_start:_end]
        self._pending: Pages | PageLanded | None = None  # a Pages header whose payload is due
        self._sink: memoryview | None = None
        self._filled = self._need = 0  # payload bytes in the sink / expected
        self._eof = False
        self._error: BaseException | None = None

    # ---------------------------------------------------------------- input

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed received bytes; ``b""`` means the peer closed (EOF).

        Raises:
            LocalProtocolError: data after EOF.
            RemoteProtocolError: the decoder already failed (the same error).
        """
        self._check_alive()
        view = memoryview(data).cast("B")
        if not view:
            self._eof = True
            return
        if self._eof:
            raise LocalProtocolError("receive_data() after EOF")
        if self._sink_open():
            take = min(len(view), self._need - self._filled)
            self._sink[self._filled:self._filled + take] = view[:take]
            self._filled += take
            view = view[take:]
        if view:
            self._make_room(len(view))
            self._buf[self._end:self._end + len(view)] = view
            self._end += len(view)

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Where the next ``recv_into`` should write (BufferedProtocol).

        Args:
            sizehint: wanted size; <= 0 means "any".

        Returns:
            The unfilled tail of the payload sink while a sink payload is
            due, otherwise free space in the internal buffer (never empty).
        """
        if self._error is not None:
            self._check_alive()
        sink = self._sink
        if sink is not None and self._filled < self._need:
            return sink[self._filled:self._need]
        want = _CHUNK if sizehint <= _CHUNK else min(sizehint, _SHRINK_ABOVE)
        if len(self._buf) - self._end < want or len(self._buf) > _SHRINK_ABOVE:  # else _make_room does nothing
            self._make_room(want)
        return self._view[self._end:]

    def buffer_updated(self, nbytes: int) -> None:
        """Account for ``nbytes`` written into the last :meth:`get_buffer` view.

        Raises:
            ValueError: more than that view could hold.
        """
        if self._error is not None:
            self._check_alive()
        sinking = self._sink is not None and self._filled < self._need
        room = self._need - self._filled if sinking else len(self._buf) - self._end
        if not 0 <= nbytes <= room:
            raise ValueError(f"buffer_updated({nbytes}) but only {room} bytes were offered")
        if sinking:
            self._filled += nbytes
        else:
            self._end += nbytes

    def unread(self) -> tuple[bytearray, int, int] | None:
        """``(buffer, start, end)``: the received bytes not yet decoded, ``buffer[start:end]``,
        beginning at a frame's start; None while a payload is due (or none is buffered).
        A reader of whole frames outside the decoder (the reply lane) then drops them with :meth:`skip`."""
        if self._pending is not None or self._error is not None or self._start == self._end:
            return None
        return self._buf, self._start, self._end

    def skip(self, nbytes: int) -> None:
        """Drop the first ``nbytes`` of :meth:`unread`: whole frames read elsewhere.

        Raises:
            ValueError: more than is buffered, or while a payload is due.
        """
        if self._error is not None:
            self._check_alive()
        if self._pending is not None or not 0 <= nbytes <= self._end - self._start:
            raise ValueError(f"skip({nbytes}) of {self._end - self._start} unread bytes")
        self._start += nbytes

    @property
    def idle(self) -> bool:
        """Nothing received is left undecoded (no part of a frame, no payload due): the next
        bytes received begin a frame."""
        return self._start == self._end and self._pending is None and self._error is None and not self._eof

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as events (for a high-water mark)."""
        return self._end - self._start + (self._filled if self._pending is not None else 0)

    # --------------------------------------------------------------- output

    def next_event(self) -> Message | PageLanded | ConnectionClosed | None:
        """Decode the next message.

        Returns:
            A message; a :data:`PageLanded` for a page the ``page_sink``
            took; CONNECTION_CLOSED after a clean EOF; None if more data is
            needed.

        Raises:
            RemoteProtocolError: malformed, unwanted or truncated input; the
                decoder is dead afterwards and re-raises it on every call.
        """
        if self._error is not None:
            self._check_alive()
        try:
            if self._pending is not None:
                return self._payload_event()
            if self._page_sink is not None:
                landed = self._page_frame()
                if landed is not False:
                    return landed  # type: ignore[return-value]
            return self._frame_event()
        except Exception as exc:
            self._error = exc
            raise

    def take_page_request(self) -> tuple[int, int] | None:
        """The urgent path's shortcut: if the next frame is a Request for exactly one page, consume
        it and return ``(block, page)`` without building messages; otherwise consume nothing and
        return None (:meth:`next_event` then decodes it, and rejects it if it is bad).

        Only a frame that is valid as :meth:`next_event` would decode it is taken (types,
        limits, no trailing bytes); the page's range in the blocks is the caller's to check.
        """
        taken = self._short_runs(Request.TYPE)
        if taken is None or len(taken[0]) != 1 or taken[0][0][2] != 1:
            return None
        self._start = taken[1]
        return taken[0][0][0], taken[0][0][1]

    def allows(self, code: int) -> bool:
        """Messages of type ``code`` are accepted from the peer (the types the decoder was made with)."""
        return code in self._budget

    def take_client_request(self) -> tuple[tuple[int, int, int], ...] | None:
        """:meth:`take_page_request` for a self-served client's fault: if the next frame is a
        ClientRequest of at most :data:`SHORT_RUNS` runs (the faults of one read of the client's
        userfaultfd), consume it and return its runs as ``(block, first, count)`` without building
        messages; otherwise consume nothing and return None.  The same rules: only a frame
        :meth:`next_event` would decode as such a ClientRequest is taken."""
        return self._take_runs(ClientRequest.TYPE)

    def take_placed(self) -> tuple[tuple[int, int, int], ...] | None:
        """:meth:`take_client_request` for the other direction: if the next frame is a Placed of at
        most :data:`SHORT_RUNS` runs (the service's answer to a self-served client's fault),
        consume it and return its runs as ``(block, first, count)`` without building messages;
        otherwise consume nothing and return None."""
        return self._take_runs(Placed.TYPE)

    def _take_runs(self, code: int) -> tuple[tuple[int, int, int], ...] | None:
        taken = self._short_runs(code)
        if taken is None:
            return None
        self._start = taken[1]
        return taken[0]

    def _short_runs(self, code: int) -> tuple[tuple[tuple[int, int, int], ...], int] | None:
        """``(runs, end)`` when the next frame is a whole, valid ``[code, [[block, first, count],
        ...]]`` of 1 to :data:`SHORT_RUNS` runs (a Request or a ClientRequest) ending at ``end``;
        else None."""
        start, avail = self._start, self._end - self._start
        if avail < PREFIX_SIZE + 7 or self._pending is not None or self._error is not None:
            return None
        buf = self._buf
        count = buf[start + 6] - 0x90  # the runs' fixarray
        if buf[start + 4] != 0x92 or buf[start + 5] != code or not 1 <= count <= SHORT_RUNS or buf[start + 7] != 0x93:
            return None  # not [code, [[...], ...]]: another message, or many runs
        size = _PREFIX.unpack_from(buf, start)[0]
        if avail < PREFIX_SIZE + size or size > 3 + _RUN_MAX_SIZE * count or code not in self._budget:
            return None
        try:
            _, items = msgpack.unpackb(self._view[start + PREFIX_SIZE:start + PREFIX_SIZE + size])
        except Exception:  # malformed: next_event says why
            return None
        runs = []
        for item in items:
            if type(item) is not list or len(item) != 3:
                return None
            block, first, pages = item
            if (type(block) is not int or type(first) is not int or type(pages) is not int
                    or not 0 <= block < LIMITS.max_blocks or not 0 <= first < 1 << 46 or not 1 <= pages <= 1 << 32):
                return None
            runs.append((block, first, pages))
        return tuple(runs), start + PREFIX_SIZE + size

    def _check_alive(self) -> None:
        if self._error is not None:
            raise self._error.with_traceback(None)

    def _sink_open(self) -> bool:
        return self._sink is not None and self._filled < self._need

    def _frame_event(self) -> Message | ConnectionClosed | None:
        start, avail = self._start, self._end - self._start
        if avail >= PREFIX_SIZE:
            size = _PREFIX.unpack_from(self._buf, start)[0]
            if not 2 <= size <= self._max_header:
                raise RemoteProtocolError(f"header length {size} out of range")
            if avail >= PREFIX_SIZE + 2:
                code = self._check_prefix(start + PREFIX_SIZE, size)
                if avail >= PREFIX_SIZE + size:
                    return self._decode_frame(code, start + PREFIX_SIZE, size)
        if not self._eof:
            return None
        if avail:
            raise RemoteProtocolError(f"connection closed inside a frame ({avail} bytes)")
        return CONNECTION_CLOSED

    def _check_prefix(self, at: int, size: int) -> int:
        first, code = self._buf[at], self._buf[at + 1]
        budget = self._budget.get(code)
        if budget is None:
            known = MESSAGE_TYPES.get(code)
            what = "unknown message type" if known is None else f"unexpected {known.__name__}"
            raise RemoteProtocolError(f"{what} (type {code})")
        if first != _FIRST_BYTE[code]:
            raise RemoteProtocolError(f"type {code}: header must be a {_FIRST_BYTE[code] - 0x90}-array")
        if size > budget:
            raise RemoteProtocolError(f"type {code}: header of {size} bytes exceeds {budget}")
        return code

    def _decode_frame(self, code: int, at: int, size: int) -> Message | None:
        self._start = at + size
        try:
            self._unpacker.feed(self._view[at:at + size])
            fields = self._unpacker.unpack()
        except Exception as exc:
            raise _remote(exc, "malformed msgpack header") from exc
        self._parsed += size
        if self._unpacker.tell() != self._parsed:
            raise RemoteProtocolError("trailing bytes after the msgpack header")
        if code == Pages.TYPE:
            return self._pages_header(fields)
        return self._build(code, fields)

    def _build(self, code: int, fields: tuple) -> Message:
        try:
            return _BUILD[code](fields)
        except Exception as exc:
            raise _remote(exc, f"invalid {MESSAGE_TYPES[code].__name__}") from exc

    def _pages_header(self, fields: tuple) -> Message | None:
        nbytes = fields[4]
        if not self._limits.payload_ok(nbytes, fields[3], fields[5]):
            raise RemoteProtocolError(f"pages nbytes must be in [1, {self._max_payload}] (or one page of up to "
                                      f"{self._limits.max_page_size}), got {nbytes!r:.40}")
        self._pending = self._build(Pages.TYPE, fields)
        self._need, self._filled = nbytes, 0
        if self._make_sink is not None:
            self._sink = self._open_sink(self._pending, nbytes)
            take = min(nbytes, self._end - self._start)
            self._sink[:take] = self._view[self._start:self._start + take]
            self._start += take
            self._filled = take
        return self._payload_event()

    def _page_frame(self) -> PageLanded | None | bool:
        """The one-page lane: a whole header ``[3, block, page, 1, nbytes, []]`` at the frame's
        start, valid as :meth:`next_event` would decode it, whose page the page sink takes.

        Returns:
            False: not taken, nothing consumed (another frame, a header not all here, a field
            a valid Pages does not have, or the sink declined): the general way decodes it.
            Otherwise :meth:`_payload_event`'s answer: the page, or None until its payload is in.
        """
        start, buf = self._start, self._buf
        if self._end - start < PREFIX_SIZE + 7 or buf[start + 4] != 0x96 or buf[start + 5] != 3:
            return False
        size, at = _PREFIX.unpack_from(buf, start)[0], start + PREFIX_SIZE
        if size > _ONE_PAGE_HEADER or self._end - at < size or buf[at + size - 1] != 0x90:
            return False
        try:
            _, block, page, count, nbytes, zeros = msgpack.unpackb(self._view[at:at + size], use_list=False)
        except Exception:  # malformed or trailing bytes: the general way says why
            return False
        if not (type(block) is int and type(page) is int and type(count) is int and type(nbytes) is int
                and count == 1 and zeros == () and 0 <= block < LIMITS.max_blocks and 0 <= page < 1 << 46
                and 1 <= nbytes <= self._one_page_payload):
            return False
        try:
            sink = self._page_sink(block, page, nbytes)  # type: ignore[misc]
        except ProtocolError as exc:
            raise _remote(exc, "pages refused") from exc
        if sink is None:
            return False
        at += size
        take = min(nbytes, self._end - at)
        sink[:take] = self._view[at:at + take]
        self._start = at + take
        self._pending, self._sink, self._need, self._filled = (block, page), sink, nbytes, take
        return self._payload_event()

    def _open_sink(self, msg: Pages, nbytes: int) -> memoryview:
        assert self._make_sink is not None
        try:
            sink = self._make_sink(msg, nbytes)
        except ProtocolError as exc:
            raise _remote(exc, "pages refused") from exc
        if type(sink) is not memoryview or sink.readonly or sink.nbytes != nbytes:
            raise ValueError(f"payload_sink must return a writable memoryview of {nbytes} bytes")
        return sink.cast("B") if sink.format != "B" else sink

    def _payload_event(self) -> Message | None:
        msg = self._pending
        assert msg is not None
        if self._sink is not None:
            if self._filled < self._need:
                return self._payload_short(self._filled)
            self._pending = self._sink = None
            return msg
        start = self._start
        if self._end - start < self._need:
            return self._payload_short(self._end - start)
        self._start = start + self._need
        self._pending = None
        data = bytes(self._view[start:self._start])
        return Pages(block=msg.block, first=msg.first, count=msg.count, data=data, zeros=msg.zeros)

    def _payload_short(self, have: int) -> None:
        if self._eof:
            raise RemoteProtocolError(f"connection closed inside a payload ({have} of {self._need} bytes)")
        if self._sink is None:
            self._make_room(self._need - have)
        return None

    def _make_room(self, n: int) -> None:
        """Ensure ``n`` free bytes after ``_end``; compact or regrow if short."""
        cap, unread = len(self._buf), self._end - self._start
        if not unread and cap > _SHRINK_ABOVE and n <= _CHUNK and self._pending is None:
            self._buf = bytearray(_CHUNK)
            self._view = memoryview(self._buf)
        elif cap - self._end >= n:
            return
        elif unread + n > cap:
            grown = bytearray(max(unread + n, 2 * cap))
            grown[:unread] = self._view[self._start:self._end]
            self._buf, self._view = grown, memoryview(grown)
        elif unread:
            self._buf[:unread] = self._view[self._start:self._end].tobytes()  # may overlap
        self._start, self._end = 0, unread
