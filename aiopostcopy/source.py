"""The source: owns the authoritative memory and serves it to one destination.

Theory of operation
-------------------
A :class:`PostcopySource` listens on TCP (or a Unix path).  A destination
opens two connections, each starting with a Hello that names its channel:

* ``urgent``: page requests arrive here and are answered here, at once, from
  inside the receive callback, so no background data can be queued ahead of
  them by this process;
* ``background``: a sender task streams every page not yet sent, restarting
  near the most recent request (locality), as far as the background window
  (bytes sent but not yet acknowledged by the destination) and the socket's
  write buffer allow.  The window bounds how much background data can sit in
  front of an urgent page in the link.

The decisions (what to send next, the window, resume bookkeeping) live in the
I/O-free :class:`~aiopostcopy.core.source_session.SourceSession`; this module
reads page bytes, splits runs into zero and non-zero pieces (a zero page goes
as a Zero marker, never as 4 KiB of zeros) and writes frames.

One destination session is served at a time.  A destination that reconnects
with the same session id takes over its channels again (it then sends Resume);
a different session while one is live is refused with ``Error(busy)``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import mmap
import os
from collections.abc import Mapping as MappingABC
from functools import partial

from aiopostcopy import trace
from aiopostcopy.core.rangeset import bounds_total
from aiopostcopy.core.source_session import SourceConfig, SourceSession
from aiopostcopy.errors import BusyError, PostcopyError, RemoteProtocolError
from aiopostcopy.messages import (
    LIMITS,
    Ack,
    BlockInfo,
    Channel,
    Complete,
    Error,
    ErrorCode,
    Hello,
    Message,
    PageRun,
    Ping,
    Pong,
    Request,
    Resume,
    Zero,
)
from aiopostcopy.transport.stream import FrameProtocol
from aiopostcopy.transport.wire import encode, encode_pages_header

__all__ = ["SourceBlock", "PostcopySource", "SourceReport"]

_FROM_DESTINATION = frozenset({Hello, Request, Resume, Ack, Complete, Ping, Pong, Error})


@dataclasses.dataclass(slots=True)
class SourceBlock:
    """One RAMBlock the source serves, mapped read-only from a file or fd."""

    name: str
    memory: mmap.mmap
    page_size: int = 4096

    @classmethod
    def from_path(cls, name: str, path: str, *, page_size: int = 4096) -> "SourceBlock":
        """Map ``path`` (a snapshot file, a /dev/shm file, a hugetlbfs file)."""
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return cls.from_fd(name, fd, page_size=page_size)
        finally:
            os.close(fd)

    @classmethod
    def from_fd(cls, name: str, fd: int, *, page_size: int = 4096) -> "SourceBlock":
        """Map an open fd (a memfd from an orchestrator); the fd may be closed after."""
        size = os.fstat(fd).st_size
        if size == 0 or size % page_size:
            raise ValueError(f"block {name!r}: size {size} is not a positive multiple of {page_size}")
        return cls(name=name, memory=mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ), page_size=page_size)

    def info(self) -> BlockInfo:
        return BlockInfo(name=self.name, length=len(self.memory), page_size=self.page_size)


@dataclasses.dataclass(frozen=True, slots=True)
class SourceReport:
    """What the source did for one destination session."""

    session_id: str | None
    complete: bool
    pages_urgent: int
    pages_background: int
    pages_zero: int
    bytes_sent: int
    connections: int


#: Default SO_SNDBUF of the background connection (see PostcopySource).
BACKGROUND_SNDBUF = 128 << 10


class PostcopySource:
    """Serve RAMBlocks to a destination.

    Args:
        blocks: the blocks, in the order the destination will index them.
        config: window and run sizes for the source session.
        background_sndbuf: SO_SNDBUF of the background connection (TCP), or
            None for the kernel's autotuning.  It bounds how much of the sweep
            can sit in this host's network stack, and so in a shared device
            queue ahead of an urgent reply: with autotuning (and Linux's
            4 MiB per-socket queue limit) a reply waited behind megabytes.
            The kernel doubles the value; 128 KiB kept the sweep near the
            link rate on the benchmark's 10 Gbit/s link.
    """

    def __init__(self, blocks: list[SourceBlock], *, config: SourceConfig | None = None,
                 background_sndbuf: int | None = BACKGROUND_SNDBUF) -> None:
        if not blocks:
            raise ValueError("a source needs at least one block")
        self._blocks = blocks
        self._sndbuf = background_sndbuf
        self._config = config or SourceConfig()
        self._session = SourceSession(blocks=[b.info() for b in blocks], config=self._config)
        self._channels: dict[Channel, FrameProtocol] = {}
        self._session_id: str | None = None
        self._server: asyncio.AbstractServer | None = None
        self._done: asyncio.Future[SourceReport] = asyncio.get_running_loop().create_future()
        self._background_wakeup = asyncio.Event()
        self._background_task: asyncio.Task[None] | None = None
        self._counts = {"urgent": 0, "background": 0, "zero": 0, "bytes": 0, "connections": 0}
        self._zero_page = {b.page_size: bytes(b.page_size) for b in blocks}

    @classmethod
    def from_paths(cls, paths: MappingABC[str, str], *, config: SourceConfig | None = None) -> "PostcopySource":
        """Build a source from ``{block name: file path}``."""
        return cls([SourceBlock.from_path(name, path) for name, path in paths.items()], config=config)

    # -- lifecycle -----------------------------------------------------------

    async def listen(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        """Start listening on TCP; returns the bound (host, port)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._new_protocol, host, port)
        self._start_background()
        return self._server.sockets[0].getsockname()[:2]

    async def listen_unix(self, path: str) -> str:
        """Start listening on a Unix stream socket path."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(self._new_protocol, path)
        self._start_background()
        return path

    async def wait_complete(self) -> SourceReport:
        """Wait until the destination says every page is placed (Complete)."""
        return await asyncio.shield(self._done)

    async def close(self) -> None:
        """Stop listening, drop the channels and the sender task, unmap the blocks."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for proto in list(self._channels.values()):
            proto.close()
        self._channels.clear()
        if self._background_task is not None:
            self._background_task.cancel()
            await asyncio.gather(self._background_task, return_exceptions=True)
            self._background_task = None
        if not self._done.done():
            self._done.set_result(self._report(complete=False))
        for block in self._blocks:
            try:
                block.memory.close()
            except BufferError:  # a view still sits in a write buffer: freed with it
                pass

    def statistics(self) -> SourceReport:
        return self._report(complete=self._done.done() and self._done.result().complete)

    # -- connections -----------------------------------------------------------

    def _new_protocol(self) -> FrameProtocol:
        holder: list[FrameProtocol] = []
        proto = FrameProtocol(
            lambda msg: self._on_message(holder[0], msg),
            lambda exc: self._on_lost(holder[0], exc),
            allowed=_FROM_DESTINATION,
        )
        holder.append(proto)
        self._counts["connections"] += 1
        return proto

    def _channel_of(self, proto: FrameProtocol) -> Channel | None:
        for channel, known in self._channels.items():
            if known is proto:
                return channel
        return None

    def _on_message(self, proto: FrameProtocol, msg: Message) -> None:
        channel = self._channel_of(proto)
        if channel is None:
            channel = self._adopt_channel(proto, msg)
            if channel is None:
                return
        now = asyncio.get_running_loop().time()
        if type(msg) is Error:
            self._finish(complete=False)
            proto.close()
            return
        if trace.ENABLED and type(msg) is Request:
            for run in msg.runs:
                trace.mark("src-request", run.block, run.first)
        self._session.message_received(channel, msg, now)
        if isinstance(msg, Complete):
            self._finish(complete=True)
        self._pump_urgent()
        self._background_wakeup.set()

    def _adopt_channel(self, proto: FrameProtocol, msg: Message) -> Channel | None:
        if not isinstance(msg, Hello):
            raise RemoteProtocolError("the first message on a connection must be Hello")
        live = self._session_id is not None and any(p.is_open for p in self._channels.values())
        if live and msg.session_id != self._session_id:
            proto.close(_busy(f"source is serving session {self._session_id!r}"))
            return None
        self._session_id = msg.session_id
        old = self._channels.get(msg.channel)
        if old is not None and old is not proto:
            old.abort()
        self._channels[msg.channel] = proto
        if msg.channel is Channel.BACKGROUND and self._sndbuf is not None:
            proto.set_send_buffer(self._sndbuf)
        return msg.channel

    def _on_lost(self, proto: FrameProtocol, exc: BaseException | None) -> None:
        channel = self._channel_of(proto)
        if channel is not None and self._channels.get(channel) is proto:
            del self._channels[channel]
            self._session.connection_lost(channel, asyncio.get_running_loop().time())
        if exc is not None and not isinstance(exc, (PostcopyError, OSError)):
            self._fail(exc)

    # -- sending -------------------------------------------------------------

    def _send_messages(self) -> None:
        for channel, msg in self._session.messages_to_send():
            proto = self._channels.get(channel)
            if proto is not None and proto.is_open:
                proto.send(msg)

    def _pump_urgent(self) -> None:
        self._send_messages()
        proto = self._channels.get(Channel.URGENT)
        while proto is not None and proto.is_open:
            run = self._session.next_urgent()
            if run is None:
                break
            self._send_run(Channel.URGENT, proto, run)
            if trace.ENABLED:
                trace.mark("src-reply", run.block, run.first)
        self._send_messages()

    def _start_background(self) -> None:
        if self._background_task is None:
            self._background_task = asyncio.get_running_loop().create_task(self._background_sender())
            self._background_task.add_done_callback(self._on_background_done)

    async def _background_sender(self) -> None:
        while True:
            await self._background_wakeup.wait()
            self._background_wakeup.clear()
            await self._send_background_burst()

    async def _send_background_burst(self) -> None:
        while True:
            proto = self._channels.get(Channel.BACKGROUND)
            if proto is None or not proto.is_open:
                return
            await proto.wait_writable()
            if not proto.is_open:
                return
            run = self._session.next_background()
            if run is None:
                self._send_messages()
                return
            self._send_run(Channel.BACKGROUND, proto, run)
            await asyncio.sleep(0)  # let urgent requests in between chunks

    def _on_background_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self._fail(task.exception())

    def _send_run(self, channel: Channel, proto: FrameProtocol, run: PageRun) -> None:
        """Send one run as one frame: Zero if every page is zero, else Pages whose
        ``zeros`` names the zero pages and whose payload gathers the others (one writev)."""
        block = self._blocks[run.block]
        size = block.page_size
        zeros = _zero_bounds(block.memory, self._zero_page[size], run, size)
        zero = bounds_total(zeros)
        nbytes = (run.count - zero) * size
        if not nbytes:
            frames: list[bytes | memoryview] = [encode(Zero(block=run.block, first=run.first, count=run.count))]
        else:
            memory, base = memoryview(block.memory), run.first * size
            frames = [encode_pages_header(run.block, run.first, run.count, nbytes, zeros)]
            at = 0
            for i in range(0, len(zeros) + 2, 2):
                low, high = (zeros[i], zeros[i + 1]) if i < len(zeros) else (run.count, run.count)
                if low > at:
                    frames.append(memory[base + at * size : base + low * size])
                at = high
        proto.send_frames(frames)
        self._counts["zero"] += zero
        self._counts["urgent" if channel is Channel.URGENT else "background"] += run.count - zero
        self._counts["bytes"] += nbytes
        self._session.sent(channel, run, nbytes)

    # -- ending --------------------------------------------------------------

    def _finish(self, *, complete: bool) -> None:
        if not self._done.done():
            self._done.set_result(self._report(complete=complete))

    def _fail(self, exc: BaseException) -> None:
        if not self._done.done():
            self._done.set_exception(exc)

    def _report(self, *, complete: bool) -> SourceReport:
        c = self._counts
        return SourceReport(
            session_id=self._session_id,
            complete=complete,
            pages_urgent=c["urgent"],
            pages_background=c["background"],
            pages_zero=c["zero"],
            bytes_sent=c["bytes"],
            connections=c["connections"],
        )


def _busy(text: str) -> RemoteProtocolError:
    return RemoteProtocolError(text, code=ErrorCode.BUSY.value)


def _zero_bounds(memory: mmap.mmap, zero: bytes, run: PageRun, size: int) -> tuple[int, ...]:
    """The all-zero stretches of ``run`` as flattened bounds relative to ``run.first`` (Pages.zeros).

    Three strided slices (a C copy each) read the first, middle and last byte
    of every page; only pages whose three bytes are all zero are compared
    with a zero page in full.  Most data pages are ruled out without a
    Python step of their own.
    """
    start = run.first * size
    end = start + run.count * size
    probe = 0
    for offset in (0, size // 2, size - 1):
        probe |= int.from_bytes(memory[start + offset:end:size], "little")
    flags = probe.to_bytes(run.count, "little")  # byte i is 0: page i may be zero
    bounds: list[int] = []
    last = -2
    index = flags.find(0)
    while index >= 0:
        at = start + index * size
        if memory.find(zero, at, at + size) == at:
            if index != last + 1:
                if bounds:
                    bounds.append(last + 1)
                bounds.append(index)
            last = index
        index = flags.find(0, index + 1)
    if bounds:
        bounds.append(last + 1)
    return tuple(bounds)
