"""The source's sessions end: a destination that dies or fails frees the source for the next one,
and the source refuses what docs/protocol.md says it refuses (real source processes, raw peers)."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from aiopostcopy.loop import PostcopyDestination
from aiopostcopy.messages import Channel, Complete, Error, ErrorCode, Hello, PageRun, Pages, Request, Resume
from aiopostcopy.transport.wire import ConnectionClosed

from e2e_support import PYTHON, bounded, check_destination, read_listening  # noqa: F401
from source_peer import RawChannel, SourceWithLog

MiB = 1 << 20
PAGE = 4096


async def _complete_with_a_new_destination(e2e, source: SourceWithLog, seed: int) -> None:
    async with PostcopyDestination(e2e.options(source.address, clients=False)) as dest:
        report = await bounded(dest.wait_complete(), "the next destination's migration")
        problems = check_destination(dest, seed=seed)
    assert report.complete and problems == {}, problems


@pytest.mark.asyncio
async def test_a_destination_killed_after_its_hello_frees_the_source(e2e) -> None:
    """A dest process SIGKILLed right after its Hello: the source releases the session when the
    lease runs out (and says why), and a new destination completes with every page right."""
    seed, size = 1501, 32 * MiB
    source = await SourceWithLog.start(e2e.procs, {"ram": e2e.image(size, seed=seed)}, "--lease", "1",
                                       "--run-pages", "1", window=PAGE)
    dead_dir = os.path.join(e2e.workdir, "dead")
    os.mkdir(dead_dir)
    dest = await asyncio.create_subprocess_exec(
        PYTHON, "-m", "aiopostcopy", "dest", "--source", "%s:%d" % source.address, "--block-dir", dead_dir,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL)
    e2e.procs.add(dest)
    line = await bounded(dest.stderr.readline(), "the destination's first line")
    assert b"blocks" in line, line  # printed once the source's Hello is in
    dest.send_signal(signal.SIGKILL)
    await dest.wait()

    released = await source.wait_logged("released session", "the source to release the dead session")
    assert "no channel" in released, released
    await _complete_with_a_new_destination(e2e, source, seed)
    report = await source.report()
    assert report["exit"] == 0 and report["complete"] and report["sessions_released"] == 1, report


@pytest.mark.asyncio
async def test_a_destination_error_frees_the_source_at_once(e2e) -> None:
    """A destination that fails sends Error: the source releases the session at once (the lease is
    60 s here), logs why, and the next destination, with another session id, completes."""
    seed, size = 1502, 8 * MiB
    source = await SourceWithLog.start(e2e.procs, {"ram": e2e.image(size, seed=seed)}, "--lease", "60")
    urgent, hello = await RawChannel.open(source.address, Channel.URGENT, "failing")
    assert isinstance(hello, Hello)
    urgent.send(Error(code=ErrorCode.IO, text="block dir is read-only"))
    await urgent.close()

    released = await source.wait_logged("released session", "the source to release the failed session")
    assert "read-only" in released, released
    await _complete_with_a_new_destination(e2e, source, seed)
    report = await source.report()
    assert report["exit"] == 0 and report["complete"], report


@pytest.mark.asyncio
@pytest.mark.parametrize("msg", [Complete(), Request(runs=(PageRun(block=0, first=3, count=1),))],
                         ids=["complete", "request"])
async def test_urgent_messages_on_the_background_channel_are_refused(e2e, msg) -> None:
    """docs/protocol.md 4.1: Complete and Request belong on the urgent channel; on the background
    one they get Error(protocol) and that connection closes; the session goes on (the urgent
    channel still answers requests with the right page) and the source does not finish."""
    seed, size = 1503, 1 * MiB
    image = e2e.image(size, seed=seed)
    source = await SourceWithLog.start(e2e.procs, {"ram": image}, "--lease", "60")
    urgent, _ = await RawChannel.open(source.address, Channel.URGENT, "wrong-channel")
    background, _ = await RawChannel.open(source.address, Channel.BACKGROUND, "wrong-channel")
    background.send(msg)
    error = await background.next_of(Error)
    assert isinstance(error, Error) and error.code is ErrorCode.PROTOCOL, error
    assert isinstance(await background.next_of(ConnectionClosed), ConnectionClosed)

    urgent.send(Request(runs=(PageRun(block=0, first=5, count=1),)))
    reply = await urgent.next_of(Pages)
    with open(image, "rb") as f:
        assert isinstance(reply, Pages) and bytes(urgent.payloads[-1]) == os.pread(f.fileno(), PAGE, 5 * PAGE)
    assert source.proc.returncode is None
    await urgent.close()
    await background.close()


@pytest.mark.asyncio
async def test_a_resume_for_another_block_list_gets_a_session_error(e2e) -> None:
    """A destination that migrated a larger image (the source was restarted with another one)
    resumes with pages this source does not have: Error(session), which ends that migration,
    rather than an error it would reconnect after forever."""
    source = await SourceWithLog.start(e2e.procs, {"ram": e2e.image(1 * MiB, seed=1504)}, "--lease", "60")
    urgent, _ = await RawChannel.open(source.address, Channel.URGENT, "other-image")
    urgent.send(Resume(session_id="other-image", received=((0, (0, 512)),)))
    error = await urgent.next_of(Error)
    assert isinstance(error, Error) and error.code is ErrorCode.SESSION, error
    await urgent.close()
