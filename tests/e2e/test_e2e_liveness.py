"""Deadlines that bound: a source that is silent, talks nonsense or is stopped ends ``dest --deadline``.

``--deadline`` counts seconds without progress from the source (pages, zero runs,
discards, Done), whatever the cause; connections on which nothing arrives are
pinged and, after the idle timeout, dropped and reconnected.  Each test runs a
real ``python -m aiopostcopy dest`` against a peer on loopback and checks that
it ends in time, with a non-zero status and one message naming the cause.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from aiopostcopy import messages as m
from aiopostcopy.transport.wire import Decoder, encode

from e2e_support import PYTHON

MiB = 1 << 20


async def _run_dest(e2e, address: tuple[str, int], deadline: float, limit: float = 20.0) -> tuple[int, str, float]:
    argv = [PYTHON, "-m", "aiopostcopy", "dest", "--source", f"{address[0]}:{address[1]}",
            "--block-dir", e2e.block_dir, "--deadline", str(deadline), "--quiet"]
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL)
    e2e.procs.add(proc)
    _, err = await asyncio.wait_for(proc.communicate(), limit)
    return proc.returncode, err.decode(errors="replace"), time.monotonic() - started


class _Peer:
    """A loopback TCP server whose connections are handled by ``talk``; closed by the test."""

    def __init__(self, talk) -> None:
        self.talk, self.connections, self.server = talk, 0, None
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> tuple[str, int]:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[:2]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            await self.talk(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass

    async def close(self) -> None:
        self.server.close()
        for writer in self.writers:
            writer.close()
        await self.server.wait_closed()


async def _silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read()  # accept, read, never answer


async def _hello_then_garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer the destination's Hello correctly, then send a frame that is no frame."""
    decoder = Decoder()
    while True:
        data = await reader.read(65536)
        if not data:
            return
        decoder.receive_data(data)
        msg = decoder.next_event()
        if isinstance(msg, m.Hello):
            break
    block = m.BlockInfo(name="ram", length=1 * MiB, page_size=4096)
    writer.write(encode(m.Hello(version=m.PROTOCOL_VERSION, session_id=msg.session_id, role=m.Role.SOURCE,
                                channel=msg.channel, blocks=(block,))))
    writer.write(b"\x00\x00\x00\x05\x93\xff\xff\xff\xff")
    await writer.drain()
    await reader.read()


async def _dest_against(e2e, talk, limit: float = 20.0) -> tuple[_Peer, int, str, float]:
    """``dest --deadline 3`` against a peer that talks as ``talk`` does; it must end in under
    10 s, with a failure status, the cause named and no traceback."""
    peer = _Peer(talk)
    address = await peer.start()
    try:
        status, err, took = await _run_dest(e2e, address, deadline=3, limit=limit)
    finally:
        await peer.close()
    assert status != 0, err
    assert took < 10, f"dest took {took:.1f} s"
    assert "no progress from the source" in err, err
    assert "Traceback" not in err, err
    return peer, status, err, took


async def _close_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.transport.abort()  # accept, then reset: a source dying as it is reached


@pytest.mark.asyncio
async def test_a_peer_that_closes_every_connection_at_once_ends_dest_with_the_cause(e2e) -> None:
    peer = _Peer(_close_at_once)
    address = await peer.start()
    try:
        status, err, took = await _run_dest(e2e, address, deadline=3)
    finally:
        await peer.close()
    assert status != 0 and took < 10, (status, took, err)
    # the cause, named: the urgent connection's reset, or the background one's when the urgent
    # reset is read only after the background connection opened (a race of the two resets)
    assert "closed the urgent" in err or "closed the background connection at once" in err, err
    assert "Traceback" not in err and "exception was never retrieved" not in err, err


@pytest.mark.asyncio
async def test_a_peer_that_accepts_and_never_speaks_ends_dest_at_its_deadline(e2e) -> None:
    _, _, err, _ = await _dest_against(e2e, _silent)
    assert "no pages arrived" in err, err


@pytest.mark.asyncio
async def test_a_peer_that_says_hello_then_sends_bad_frames_ends_dest_at_its_deadline(e2e) -> None:
    peer, _, err, _ = await _dest_against(e2e, _hello_then_garbage)
    assert peer.connections >= 4, "it reconnected at least once (two channels a time)"
    assert "reconnecting" in err, err  # every loss is said, with its cause


@pytest.mark.asyncio
async def test_a_stopped_source_ends_dest_at_its_deadline(e2e) -> None:
    source = await e2e.source({"ram": e2e.image(16 * MiB, seed=1201)})
    os.kill(source.proc.pid, signal.SIGSTOP)  # the kernel still accepts; nobody answers
    try:
        status, err, took = await _run_dest(e2e, source.address, deadline=3)
    finally:
        os.kill(source.proc.pid, signal.SIGCONT)
        source.proc.kill()
    assert status != 0 and took < 10, (status, took, err)
    assert "no progress from the source" in err, err
    assert os.listdir(e2e.block_dir) == [], "an incomplete destination leaves no block file"


class _ChangingBlocks:
    """Answers the first two connections (urgent, background) with one block list, drops them, and
    answers every later connection with another list; records what the destination sent back."""

    def __init__(self) -> None:
        self.hellos = 0
        self.errors: list[m.Error] = []

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder = Decoder()
        msg = None
        while not isinstance(msg, m.Hello):
            data = await reader.read(65536)
            if not data:
                return
            decoder.receive_data(data)
            msg = decoder.next_event()
        self.hellos += 1
        first = self.hellos <= 2
        block = m.BlockInfo(name="ram", length=(1 if first else 2) * MiB, page_size=4096)
        writer.write(encode(m.Hello(version=m.PROTOCOL_VERSION, session_id=msg.session_id, role=m.Role.SOURCE,
                                    channel=msg.channel, blocks=(block,))))
        await writer.drain()
        if first:
            if self.hellos == 2:
                await asyncio.sleep(0.2)
                writer.transport.abort()  # a broken link: the destination reconnects
            else:
                await reader.read()
            return
        while (data := await reader.read(65536)):
            decoder.receive_data(data)
            while (event := decoder.next_event()) is not None:
                if isinstance(event, m.Error):
                    self.errors.append(event)


@pytest.mark.asyncio
async def test_a_block_list_changed_on_reconnect_ends_the_migration_with_error_session(e2e) -> None:
    """docs/protocol.md 4.2: the destination checks every later block list against the first and
    answers a different one with Error(session); section 6: after `session` it does not reconnect."""
    talk = _ChangingBlocks()
    peer = _Peer(talk)
    address = await peer.start()
    try:
        status, err, took = await _run_dest(e2e, address, deadline=30)
    finally:
        await peer.close()
    assert status != 0 and took < 10, (status, took, err)
    assert "block list differs" in err and "(session)" in err, err
    assert talk.hellos <= 4, f"it kept reconnecting: {talk.hellos} Hellos"
    assert any(e.code is m.ErrorCode.SESSION for e in talk.errors), talk.errors
