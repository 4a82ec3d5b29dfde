"""A hand-driven destination for the source's end-to-end tests: raw frames over real sockets.

:class:`RawChannel` opens one connection to a source, says Hello, and reads
frames with the project's decoder (Pages payloads land in a bytearray it
keeps).  :class:`SourceWithLog` starts ``python -m aiopostcopy source`` with
its stderr piped, so a test can wait for the line the source logs.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiopostcopy.messages import PROTOCOL_VERSION, Channel, Hello, Message, Pages, Role
from aiopostcopy.transport.wire import ConnectionClosed, Decoder, encode

import e2e_support as sup


class RawChannel:
    """One connection to the source, driven frame by frame."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.payloads: list[bytes] = []
        self._decoder = Decoder(payload_sink=self._sink)

    def _sink(self, header: Pages, nbytes: int) -> memoryview:
        self.payloads.append(bytearray(nbytes))
        return memoryview(self.payloads[-1])

    @classmethod
    async def open(cls, address: tuple[str, int], channel: Channel, session_id: str) -> tuple["RawChannel", Message]:
        """Connect, say Hello; returns the channel and the source's first answer."""
        reader, writer = await asyncio.open_connection(*address)
        peer = cls(reader, writer)
        peer.send(Hello(version=PROTOCOL_VERSION, session_id=session_id, role=Role.DESTINATION, channel=channel))
        return peer, await peer.next()

    def send(self, msg: Message) -> None:
        self.writer.write(encode(msg))

    async def next(self, timeout: float = sup.TIMEOUT) -> Message | ConnectionClosed:
        """The next frame (ConnectionClosed at EOF)."""
        async def read() -> Message | ConnectionClosed:
            while True:
                event = self._decoder.next_event()
                if event is not None:
                    return event
                self._decoder.receive_data(await self.reader.read(1 << 16))
        return await sup.bounded(read(), "a frame from the source", timeout)

    async def next_of(self, cls: type, timeout: float = sup.TIMEOUT) -> Any:
        """Skip frames until one of type ``cls`` (or the end of the stream) comes."""
        while True:
            msg = await self.next(timeout)
            if isinstance(msg, (cls, ConnectionClosed)):
                return msg

    async def close(self) -> None:
        self.writer.close()
        await asyncio.gather(self.writer.wait_closed(), return_exceptions=True)


class SourceWithLog(sup.SourceProcess):
    """A source process whose stderr lines are collected in :attr:`lines`."""

    lines: list[str]

    @classmethod
    async def start(cls, procs: sup.Processes, blocks: dict[str, str], *extra: str, **options: Any) -> "SourceWithLog":
        proc = await asyncio.create_subprocess_exec(*sup.source_argv(blocks, **options), *extra,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                                                    stdin=asyncio.subprocess.DEVNULL)
        procs.add(proc)
        source = cls(proc, await sup.read_listening(proc, proc.stderr))
        source.lines = []
        source._stderr = asyncio.get_running_loop().create_task(source._collect())
        return source

    async def _collect(self) -> None:
        while line := await self.proc.stderr.readline():
            self.lines.append(line.decode(errors="replace").rstrip())

    async def wait_logged(self, text: str, what: str) -> str:
        """Wait for a stderr line holding ``text``; returns it."""
        await sup.wait_until(lambda: any(text in line for line in self.lines), what)
        return next(line for line in self.lines if text in line)

    async def report(self, timeout: float = sup.TIMEOUT) -> dict[str, Any]:
        out = await asyncio.wait_for(self.proc.stdout.read(), timeout)
        await asyncio.wait_for(self.proc.wait(), timeout)
        await self._stderr
        result = sup.parse_json_output(out)
        result["exit"] = self.proc.returncode
        return result
