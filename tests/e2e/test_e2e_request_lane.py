"""The destination's request lane against its Python path, over real TCP: faults of a delegated
client and of the service's own threads are each requested exactly once, answered on the urgent
channel, placed and verified page by page, whichever of the two wrote the Request."""

from __future__ import annotations

import asyncio

import pytest

from aiopostcopy.loop import PostcopyDestination
from aiopostcopy.tools.pattern import is_zero_page
from aiopostcopy.transport import request_lane
from aiopostcopy.uffd.binding import lib

from e2e_support import bounded, check_destination, threads_in_userfault, wait_until

MiB = 1 << 20
PAGE = 4096


def data_pages(pages: int, seed: int) -> list[int]:
    return [p for p in range(pages) if not is_zero_page(0, p, seed)]


@pytest.mark.asyncio
@pytest.mark.parametrize("lane", [True, False], ids=["lane", "python"])
async def test_faults_are_requested_once_and_placed_either_way(e2e, lane) -> None:
    if lane and not request_lane.available():
        pytest.skip("the request lane is not built")
    seed, size = 733, 16 * MiB
    pages = data_pages(size // PAGE, seed)
    alone, own, crowd = pages[10:1000:100], pages[1500:2500:100], pages[3000:3008]
    served = pages[3500:3900:50]  # a self-served client's: asked by the session, placed through our own fd
    source = await e2e.source({"ram": e2e.image(size, seed=seed)}, sweep_after_idle=2.0)  # faults first
    async with PostcopyDestination(e2e.options(source.address, request_lane=lane)) as dest:
        client = await e2e.touch_client(mode="delegated", name="lane", seed=seed)
        for page in alone:  # one fault at a time: each Request a page of its own
            await client.touch([page])
            assert len((await client.event("touched"))["latency_us"]) == 1
        base = dest._memory.block(0).address  # the service's own mapping: faults on its own fd
        for page in own:
            assert await asyncio.to_thread(lib.apc_touch, base + page * PAGE, 1, PAGE, 0, 0) >= 0
        pager = await e2e.touch_client(mode="self-served", name="pager", seed=seed)
        for page in served:
            await pager.touch([page])
            assert len((await pager.event("touched"))["latency_us"]) == 1
        source.stop()  # a crowd: three threads on each of eight pages, read together
        await client.touch(crowd, repeat=3)
        await wait_until(lambda: len(threads_in_userfault(client.pid)) == 3 * len(crowd),
                         "the crowd's threads blocked in handle_userfault")
        source.cont()
        assert len((await client.event("touched"))["latency_us"]) == 3 * len(crowd)
        report = await bounded(dest.wait_complete(), "the migration")
        result = await client.finish()
        served_result = await pager.finish()
        problems = check_destination(dest, seed=seed)
    source_report = await source.report()

    assert report.complete and problems == {}
    for outcome in (result, served_result):
        assert outcome["exit"] == 0 and outcome.get("ok") and not outcome.get("bad_pages"), outcome
    wanted = len(alone) + len(own) + len(crowd) + len(served)
    assert source_report["pages_urgent"] == wanted, source_report  # each faulted page asked for once
    assert report.pages_demand == wanted, report.format()
    assert report.copies_to_client >= len(alone), report.format()


@pytest.mark.asyncio
async def test_zero_answers_are_placed_through_the_faulting_fd(e2e) -> None:
    """A fault on a zero page is answered with a Zero frame: the reply lane places it through
    the fd the fault was read from (the client's, or the service's own), as it places data."""
    if not request_lane.available():
        pytest.skip("the request lane is not built")
    seed, size = 734, 16 * MiB
    zeros = [p for p in range(size // PAGE) if is_zero_page(0, p, seed)]
    alone, own = zeros[10:400:40], zeros[400:600:20]
    source = await e2e.source({"ram": e2e.image(size, seed=seed)}, sweep_after_idle=2.0)  # faults first
    async with PostcopyDestination(e2e.options(source.address)) as dest:
        client = await e2e.touch_client(mode="delegated", name="zeros", seed=seed)
        for page in alone:
            await client.touch([page])
            assert len((await client.event("touched"))["latency_us"]) == 1
        base = dest._memory.block(0).address
        for page in own:
            assert await asyncio.to_thread(lib.apc_touch, base + page * PAGE, 1, PAGE, 0, 0) >= 0
        report = await bounded(dest.wait_complete(), "the migration")
        result = await client.finish()
        problems = check_destination(dest, seed=seed)
    source_report = await source.report()

    assert report.complete and problems == {} and source_report["exit"] == 0
    assert result["exit"] == 0 and result.get("ok") and not result.get("bad_pages"), result
    assert (report.faults, report.requests_sent) == (len(alone) + len(own),) * 2, report.format()  # one each
    assert report.pages_demand == 0, report.format()  # every faulted page was a zero page
    assert report.copies_to_client == len(alone), report.format()  # through the client's fd, by the lane


@pytest.mark.asyncio
async def test_a_dead_clients_fd_is_forgotten_before_it_is_closed(e2e) -> None:
    """A client dies while its page is requested: the lanes forget its fd before the service closes
    it (a later fd may get the same number), the page is still placed for the client that comes
    next, and every page verifies."""
    if not request_lane.available():
        pytest.skip("the request lane is not built")
    seed, size = 741, 16 * MiB
    page = data_pages(size // PAGE, seed)[777]
    source = await e2e.source({"ram": e2e.image(size, seed=seed)}, sweep_after_idle=2.0)
    async with PostcopyDestination(e2e.options(source.address)) as dest:
        source.stop()  # the answer waits
        doomed = await e2e.touch_client(mode="delegated", name="doomed", seed=seed)
        await doomed.touch([page])
        await wait_until(lambda: len(threads_in_userfault(doomed.pid)) == 1, "the doomed thread blocked")
        await wait_until(lambda: bool(dest._lane_keys), "the lane asked for the page")
        (fd,) = dest._lane_keys
        assert dest._lane.remembered(fd) == 1
        doomed.proc.kill()
        await doomed.proc.wait()
        await wait_until(lambda: fd not in dest._lane_keys, "the dead client retired")
        assert dest._lane.remembered(fd) == 0
        heir = await e2e.touch_client(mode="delegated", name="heir", seed=seed)
        await heir.touch([page])
        await wait_until(lambda: len(threads_in_userfault(heir.pid)) == 1, "the heir's thread blocked")
        source.cont()
        assert len((await heir.event("touched"))["latency_us"]) == 1
        report = await bounded(dest.wait_complete(), "the migration")
        result = await heir.finish()
        problems = check_destination(dest, seed=seed)
    await source.report()
    assert report.complete and problems == {}
    assert result["exit"] == 0 and result.get("ok") and not result.get("bad_pages"), result
