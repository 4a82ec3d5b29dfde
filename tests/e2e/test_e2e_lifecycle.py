"""Starting and ending: late clients, closing early, releasing what was opened."""

from __future__ import annotations

import asyncio
import os
import threading

import pytest

from aiopostcopy.errors import MigrationAborted
from aiopostcopy.loop import PostcopyDestination
from aiopostcopy.source import PostcopySource, SourceBlock

from e2e_support import PausableProxy, blocked_somewhere, bounded, check_destination, wait_until

MiB = 1 << 20


@pytest.mark.asyncio
async def test_client_joining_after_completion(e2e) -> None:
    """A client that joins once every page is placed is accepted, told End at once, and finds
    every page right (no fault, nothing to wait for)."""
    seed, size = 1300, 8 * MiB
    source = await e2e.source({"ram": e2e.image(size, seed=seed)})
    async with PostcopyDestination(e2e.options(source.address)) as dest:
        report = await bounded(dest.wait_complete(), "the migration")
        worker = await e2e.worker(mode="delegated", threads=2, touches=100, seed=seed, name="latecomer")
        late = await e2e.worker(mode="self-served", threads=2, touches=100, seed=seed, name="latecomer-2")
        results = [await worker.result(), await late.result()]
        problems = check_destination(dest, seed=seed)
        after = dest.statistics()
    await source.report()

    assert report.complete and problems == {}
    for result in results:
        assert result["exit"] == 0 and result["ok"] and result["bad_page_count"] == 0, result
    assert after.faults == 0 and after.client_requests == 0


@pytest.mark.asyncio
@pytest.mark.skipif(os.geteuid() != 0, reason="a lower nice value needs root or CAP_SYS_NICE")
async def test_the_fault_path_runs_at_the_nice_value_asked_and_gives_it_back(e2e) -> None:
    """options.nice: the loop thread (this one) serves the faults at that nice value while the
    migration runs, every page right; closing gives the thread back the value it had."""
    seed, size, tid = 1310, 8 * MiB, threading.get_native_id()
    before = os.getpriority(os.PRIO_PROCESS, tid)
    source = await e2e.source({"ram": e2e.image(size, seed=seed)})
    async with PostcopyDestination(e2e.options(source.address, nice=before - 3)) as dest:
        during = os.getpriority(os.PRIO_PROCESS, tid)
        worker = await e2e.worker(mode="delegated", threads=2, touches=300, seed=seed, name="niced")
        report = await bounded(dest.wait_complete(), "the migration")
        result = await worker.result()
        problems = check_destination(dest, seed=seed)
    after = os.getpriority(os.PRIO_PROCESS, tid)
    await source.report()

    assert (during, after) == (before - 3, before)
    assert report.complete and problems == {}
    assert result["exit"] == 0 and result["ok"] and result["bad_page_count"] == 0, result


async def _close_early(e2e, seed: int, *, wait: bool) -> None:
    source = PostcopySource([SourceBlock.from_path("ram", e2e.image(16 * MiB, seed=seed, name=f"ram{seed}"))])
    proxy = PausableProxy(await source.listen("127.0.0.1", 0))
    try:
        dest = PostcopyDestination(e2e.options(await proxy.start(), clients=False, block_dir=False))
        await dest.start()
        proxy.hold()
        assert not dest.statistics().complete
        await dest.close()
        if wait:
            with pytest.raises(MigrationAborted):
                await dest.wait_complete()
        del dest
    finally:
        await proxy.close()
        await source.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("wait", [True, False], ids=["awaited", "not-awaited"])
async def test_closing_before_completion_is_quiet(e2e, wait) -> None:
    """Closing a destination whose migration has not completed ends it (wait_complete raises
    MigrationAborted) without the event loop reporting an unhandled error, whether or not anyone
    awaits wait_complete (the harness fails the test if the loop's exception handler runs)."""
    await _close_early(e2e, 1301, wait=wait)


@pytest.mark.asyncio
async def test_source_close_releases_its_blocks(e2e) -> None:
    """PostcopySource.close() says it unmaps the blocks: after it, the image is neither mapped nor
    open in this process (checked while the source object is still alive)."""
    seed, size = 1302, 4 * MiB
    image = e2e.image(size, seed=seed)
    source = PostcopySource([SourceBlock.from_path("ram", image)])
    await source.listen("127.0.0.1", 0)
    await source.close()

    with open("/proc/self/maps") as maps:
        mapped = [line.strip() for line in maps if image in line]
    fds = [fd for fd in os.listdir("/proc/self/fd") if _target(fd) == image]
    assert mapped == [] and fds == [], f"after close() the image is still mapped {mapped} / open on fds {fds}"
    del source


def _target(fd: str) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


async def _abort_with_blocked_client(e2e, seed: int) -> tuple[dict, object]:
    """Hold the source, block a delegated worker, abort, close; returns (worker result, source)."""
    source = await e2e.source({"ram": e2e.image(16 * MiB, seed=seed)})
    async with PostcopyDestination(e2e.options(source.address)) as dest:
        source.stop()
        worker = await e2e.worker(mode="delegated", threads=2, touches=100, seed=seed, name="aborted", timeout=5)
        await wait_until(lambda: blocked_somewhere(dest) >= 1, "the worker blocked")
        dest.abort("test abort")
        with pytest.raises(MigrationAborted):
            await dest.wait_complete()
        result = await worker.result()
        source.cont()
    return result, source


@pytest.mark.asyncio
async def test_abort_never_feeds_zeros_and_releases_client_fds(e2e) -> None:
    """An explicit abort with a delegated client blocked: the client is told End(complete=False)
    and its threads stay blocked, never given a zero page (the worker gives up and exits 2); once that
    process has gone and the destination is closed, none of its userfaultfds is left open here."""
    result, _ = await _abort_with_blocked_client(e2e, 1303)

    assert result["exit"] == 2 and not result["ok"] and result["end_complete"] is False, result
    assert result["client"]["ended"], "the client was not told the migration ended"
    left = [fd for fd in os.listdir("/proc/self/fd") if _target(fd) == "anon_inode:[userfaultfd]"]
    assert left == [], f"userfaultfds of a client that is gone are still open after close(): fds {left}"


@pytest.mark.asyncio
async def test_abort_ends_the_source(e2e) -> None:
    """An explicit abort is not a broken link: the source is told (Error aborted) and its process
    ends with a non-zero status instead of waiting for a reconnection forever."""
    _, source = await _abort_with_blocked_client(e2e, 1304)
    try:
        status = await asyncio.wait_for(source.proc.wait(), 10)
    except asyncio.TimeoutError:
        status = None
    assert status not in (None, 0), "the source still waits for the aborted destination 10 s later"


@pytest.mark.asyncio
async def test_more_blocks_than_one_sendmsg_can_carry_fds_for(e2e) -> None:
    """260 RAMBlocks: the Blocks message hands a client 260 descriptors, more than Linux's
    SCM_MAX_FD (253) per sendmsg, so they travel on several sendmsg calls; the client maps
    every block, its thread faults on the last one, and every page of every block verifies."""
    seed, count = 909, 260
    blocks = [SourceBlock.from_path(f"b{i}", e2e.image(2 * 4096, seed=seed, name=f"b{i}", block_index=i))
              for i in range(count)]
    source = PostcopySource(blocks)
    proxy = PausableProxy(await source.listen("127.0.0.1", 0))
    try:
        async with PostcopyDestination(e2e.options(await proxy.start())) as dest:
            proxy.hold()
            client = await e2e.touch_client(mode="delegated", name="many-blocks", seed=seed)
            assert len(client.info["blocks"]) == count
            await client.touch([1], block=count - 1)
            await wait_until(lambda: blocked_somewhere(dest) >= 1, "the client thread blocked on the last block")
            proxy.release()
            report = await bounded(dest.wait_complete(), "the migration")
            await client.event("touched")
            problems = check_destination(dest, seed=seed)
            result = await client.finish()
        await bounded(source.wait_complete(), "the source's Complete")
    finally:
        await proxy.close()
        await source.close()
    assert report.complete and problems == {}, problems
    assert result.get("ok") and result.get("end_complete") and not result.get("bad_pages"), result
