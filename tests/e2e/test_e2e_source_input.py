"""A source whose image shrinks under it: a clear message and Error(io), never a SIGBUS; the source
lives on and serves a complete migration once the image is whole again (real source process)."""

from __future__ import annotations

import os

import pytest

from aiopostcopy.loop import PostcopyDestination
from aiopostcopy.messages import Ack, Channel, Error, ErrorCode, PageRun, Pages, Request

from e2e_support import bounded, check_destination, make_image
from source_peer import RawChannel, SourceWithLog

MiB = 1 << 20
PAGE = 4096


@pytest.mark.asyncio
async def test_an_image_truncated_mid_migration_is_an_io_error_not_a_signal(e2e) -> None:
    seed, size = 1601, 8 * MiB
    image = e2e.image(size, seed=seed)
    source = await SourceWithLog.start(e2e.procs, {"ram": image}, "--lease", "1", window=256 * 1024)
    urgent, _ = await RawChannel.open(source.address, Channel.URGENT, "shrinking")
    background, _ = await RawChannel.open(source.address, Channel.BACKGROUND, "shrinking")
    first = await background.next_of(Pages)  # the sweep has begun: we are mid-migration
    assert isinstance(first, Pages)
    background.send(Ack(nbytes=len(background.payloads[-1])))

    os.truncate(image, size // 2)
    urgent.send(Request(runs=(PageRun(block=0, first=size // PAGE - 1, count=1),)))
    error = await urgent.next_of(Error)
    assert isinstance(error, Error) and error.code is ErrorCode.IO, error
    assert "shrank" in error.text and "'ram'" in error.text, error.text
    logged = await source.wait_logged("shrank", "the source's message about the shrunk image")
    assert image in logged, logged
    assert source.proc.returncode is None, "the source died"
    await urgent.close()
    await background.close()

    make_image(image, size, seed=seed)  # the image is whole again
    await source.wait_logged("released session", "the source to release the probe's session")
    async with PostcopyDestination(e2e.options(source.address, clients=False)) as dest:
        report = await bounded(dest.wait_complete(), "the migration after the image was restored")
        problems = check_destination(dest, seed=seed)
    assert report.complete and problems == {}, problems
    result = await source.report()
    assert result["exit"] == 0 and result["complete"], result
