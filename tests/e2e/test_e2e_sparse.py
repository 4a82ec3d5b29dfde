"""A source serving a sparse memory snapshot: holes go as zero runs without being read.

Real source process (``python -m aiopostcopy source``), real destination,
every page of the result compared with the snapshot.  The source's report
says how many bytes it read from the file (``bytes_read``) and how many pages
it sent from holes (``pages_hole``): the holes must cost no read.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import time

import pytest

from aiopostcopy.loop import PostcopyDestination
from aiopostcopy.messages import Channel, Complete, Error, ErrorCode, PageRun, Pages, Request, Zero
from aiopostcopy.tools.bench_migration import differing_pages
from aiopostcopy.tools.bench_sparse import spread_runs, write_sparse_image
from aiopostcopy.tools.pattern import expected_pages
from aiopostcopy.uffd import SharedMemory

from e2e_support import bounded
from source_peer import RawChannel, SourceWithLog

PAGE = 4096
GiB = 1 << 30


def loopback_wire_seconds(nbytes: int) -> float:
    """Seconds a plain TCP stream takes to carry ``nbytes`` over loopback (the baseline)."""
    server = socket.create_server(("127.0.0.1", 0))
    received = [0]

    def sink() -> None:
        conn, _ = server.accept()
        buffer = bytearray(1 << 20)
        with conn:
            while n := conn.recv_into(buffer):
                received[0] += n

    thread = threading.Thread(target=sink)
    thread.start()
    payload = bytes(1 << 20)
    began = time.monotonic()
    with socket.create_connection(server.getsockname()) as client:
        for _ in range(nbytes // len(payload)):
            client.sendall(payload)
    thread.join()
    server.close()
    return time.monotonic() - began


@pytest.mark.asyncio
async def test_a_one_gib_snapshot_of_90_percent_holes_migrates_without_reading_them(e2e) -> None:
    seed, size = 2101, GiB
    pages = size // PAGE
    snapshot = os.path.join(e2e.workdir, "snap.raw")
    data_bytes = write_sparse_image(snapshot, size, spread_runs(pages, 0.10, 50), seed=seed)
    assert os.stat(snapshot).st_blocks * 512 == data_bytes  # the holes really are holes
    source = await SourceWithLog.start(e2e.procs, {"ram": snapshot})
    began = time.monotonic()
    async with PostcopyDestination(e2e.options(source.address, clients=False)) as dest:
        report = await bounded(dest.wait_complete(), "the migration of the sparse snapshot")
        seconds = time.monotonic() - began
    result = await source.report()
    bad = differing_pages(os.path.join(e2e.block_dir, "ram"), snapshot)

    assert report.complete and report.pages_placed == pages, report.format()
    assert bad == [], f"{len(bad)} pages differ, the first {bad[:10]}"
    assert result["exit"] == 0 and result["complete"], result
    hole_pages = pages - data_bytes // PAGE
    assert result["bytes_read"] == data_bytes, result  # each data page read once, no hole read
    assert result["pages_hole"] == hole_pages, result
    assert result["bytes_sent"] < data_bytes, result  # the pattern's zero pages travel as markers
    wire = loopback_wire_seconds(result["bytes_sent"])
    print(f"sparse snapshot: {size >> 20} MiB image, {data_bytes >> 20} MiB data, {result['bytes_sent'] >> 20} MiB "
          f"sent, migration {seconds:.3f} s, loopback wire time of the data {wire:.3f} s, "
          f"ratio {seconds / wire:.2f}", file=sys.stderr)


@pytest.mark.asyncio
async def test_requests_inside_holes_are_answered_as_zero_without_reading(e2e) -> None:
    seed, size = 2102, 16 << 20
    snapshot = os.path.join(e2e.workdir, "snap.raw")
    # pages 1000..1007 hold data (1005 is a zero page); the holes around them are longer than
    # MIN_HOLE_BYTES, so they count as holes (shorter ones are read with their run)
    write_sparse_image(snapshot, size, [(1000, 8)], seed=seed)
    source = await SourceWithLog.start(e2e.procs, {"ram": snapshot})
    urgent, _ = await RawChannel.open(source.address, Channel.URGENT, "holes")  # no background: no sweep
    urgent.send(Request(runs=(PageRun(block=0, first=10, count=4),)))
    zero = await urgent.next()
    assert zero == Zero(block=0, first=10, count=4), zero
    urgent.send(Request(runs=(PageRun(block=0, first=996, count=16),)))  # hole, data, hole
    pages = await urgent.next()
    assert isinstance(pages, Pages) and (pages.first, pages.count) == (996, 16), pages
    expected = expected_pages(0, 1000, 8, PAGE, seed=seed, zero_every=7)
    zero_in_data = [i for i in range(8) if expected[i * PAGE:(i + 1) * PAGE] == bytes(PAGE)]
    data = b"".join(expected[i * PAGE:(i + 1) * PAGE] for i in range(8) if i not in zero_in_data)
    assert bytes(urgent.payloads[-1]) == data
    urgent.send(Complete())
    result = await source.report()
    await urgent.close()
    assert result["bytes_read"] == 8 * PAGE, result  # only the data pages of the second request
    assert result["pages_hole"] == 4 + 8, result


@pytest.mark.asyncio
async def test_a_snapshot_truncated_under_its_holes_is_still_an_io_error(e2e) -> None:
    size = 8 << 20
    snapshot = os.path.join(e2e.workdir, "snap.raw")
    write_sparse_image(snapshot, size, [(0, 4)], seed=7)
    source = await SourceWithLog.start(e2e.procs, {"ram": snapshot}, "--lease", "1")
    urgent, _ = await RawChannel.open(source.address, Channel.URGENT, "shrinking")
    os.truncate(snapshot, size // 2)  # the cached hole map still says "hole" past the new end
    urgent.send(Request(runs=(PageRun(block=0, first=size // PAGE - 1, count=1),)))
    error = await urgent.next_of(Error)
    assert isinstance(error, Error) and error.code is ErrorCode.IO and "shrank" in error.text, error
    await urgent.close()
    assert source.proc.returncode is None, "the source died"
    source.kill()
    await source.proc.wait()


def test_short_holes_are_read_with_their_run_and_long_ones_are_not(e2e) -> None:
    """A tmpfs image with a one-page hole every seventh page (as a pattern writer leaves its zero
    pages) has no holes for the sweep, which would otherwise cut it into frames of six pages; a
    hole of MIN_HOLE_BYTES or more is one."""
    from aiopostcopy.source import MIN_HOLE_BYTES, SourceBlock

    path = os.path.join(e2e.workdir, "dotted.raw")
    size = 8 << 20
    long_first, long_pages = 1024, MIN_HOLE_BYTES // PAGE
    with open(path, "wb") as f:
        f.truncate(size)
        for page in range(size // PAGE):
            if page % 7 and not long_first <= page < long_first + long_pages:
                os.pwrite(f.fileno(), b"\x01" * PAGE, page * PAGE)
    block = SourceBlock.from_path("ram", path)
    try:
        assert list(block.holes()) == [(long_first, long_first + long_pages)]
    finally:
        block.close()


@pytest.mark.asyncio
async def test_holes_filled_by_allocation_are_migrated_again_from_that_copy(e2e) -> None:
    """The destination fills a snapshot's holes with fallocate: pages that read as holes until
    touched.  Started again from that block file (``from_copy``), the untouched ones are punched
    and come again as Zero runs (UFFDIO_COPY over an allocated page would be EEXIST), the data
    pages are adopted: no data crosses the wire, and every page matches."""
    seed, size = 2104, 64 << 20
    pages = size // PAGE
    snapshot = os.path.join(e2e.workdir, "snap.raw")
    data_bytes = write_sparse_image(snapshot, size, spread_runs(pages, 0.10, 4), seed=seed)
    block = os.path.join(e2e.block_dir, "ram")
    for round_ in ("first", "from the copy"):
        source = await SourceWithLog.start(e2e.procs, {"ram": snapshot})
        async with PostcopyDestination(e2e.options(source.address, clients=False,
                                                   from_copy=round_ != "first")) as dest:
            report = await bounded(dest.wait_complete(), f"the migration {round_}")
        result = await source.report()
        assert report.verified and report.pages_placed == pages, (round_, report.format())  # no EEXIST
        assert differing_pages(block, snapshot) == [], round_
        assert result["exit"] == 0 and result["complete"], (round_, result)
        with contextlib.closing(SharedMemory.open(block)) as shm:
            held = sum(stop - start for start, stop in shm.data_runs(0, size)) // PAGE
        # the holes' aligned middles were allocated, not written: they read as holes (the data and
        # the holes' unaligned ends, placed with UFFDIO_ZEROPAGE, read as data)
        assert data_bytes // PAGE <= held < pages // 2, (round_, held)
        if round_ == "first":
            held_after_first = held
    assert result["pages_compared"] == held_after_first and result["pages_changed"] == 0, result
    assert result["pages_zero"] == pages - held_after_first and result["bytes_sent"] == 0, result
