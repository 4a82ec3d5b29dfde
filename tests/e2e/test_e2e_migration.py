"""Whole migrations on loopback: clients fault while the sweep runs; every page is checked.

Each test holds the source back (SIGSTOP, or a held relay for an in-process
source) until its clients are blocked on missing pages, so faults really
happen during the migration, then lets it run to the end and checks:

* the destination's report (complete, every page placed, faults seen);
* every page of the destination's blocks against the pattern, through the
  destination's own mapping (``pattern.verify_block``);
* every client's own verification (its JSON and its exit status);
* the source's account: each page sent once, plus what the destination
  counted as duplicates, plus what was still in flight when the destination
  placed its last page and closed (bounded by the background window and the
  pages it may have had requested).
"""

from __future__ import annotations

import asyncio
import json
import socket

import pytest

from aiopostcopy.core.config import DestinationConfig, SourceConfig
from aiopostcopy.loop import PostcopyDestination
from aiopostcopy.tools.pattern import COUNTER_BYTES, COUNTER_SLOTS, is_zero_page
from aiopostcopy.messages import Channel
from aiopostcopy.source import BACKGROUND_SNDBUF, PostcopySource, SourceBlock

from e2e_support import (PausableProxy, blocked_somewhere, bounded, check_destination, mode_of, running_clients,
                         wait_until)

MiB = 1 << 20


def assert_worker_ok(result: dict) -> None:
    assert result["exit"] == 0, f"worker failed: {result}"
    assert result.get("ok") and result.get("end_complete"), result
    assert result.get("bad_page_count") == 0, result.get("bad_pages")


def assert_complete(report, pages: int) -> None:
    assert report.complete, report.format()
    assert report.final and report.aborted is None
    assert report.pages_total == pages and report.pages_placed == pages, report.format()
    assert report.resumes == 0, "a connection was lost and resumed in a migration with no fault injected"


def assert_each_page_sent_once(source, report) -> None:
    """The source sent every page once, plus the destination's duplicates, plus at most what
    could still be in flight when the destination completed and closed without reading more:
    one background window of data, the pages it may have had requested, and zero markers."""
    get = source.get if isinstance(source, dict) else lambda key: getattr(source, key)
    sent = get("pages_urgent") + get("pages_background") + get("pages_zero")
    unread = sent - (report.pages_total + report.pages_duplicate)
    window_pages = SourceConfig().background_window_bytes // 4096
    bound = window_pages + DestinationConfig().max_in_flight_pages + report.pages_zero
    assert 0 <= unread <= bound, (source, report.format())


@pytest.mark.asyncio
async def test_one_delegated_client_two_threads(e2e) -> None:
    """Scenario 1: in-process source, one delegated client with two threads touching random pages."""
    seed, size = 101, 32 * MiB
    pages = size // 4096
    source = PostcopySource([SourceBlock.from_path("ram", e2e.image(size, seed=seed))])
    proxy = PausableProxy(await source.listen("127.0.0.1", 0))
    try:
        async with PostcopyDestination(e2e.options(await proxy.start())) as dest:
            proxy.hold()
            background = source._conns[Channel.BACKGROUND].sock
            assert background.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) <= 2 * BACKGROUND_SNDBUF
            worker = await e2e.worker(mode="delegated", threads=2, touches=300, seed=seed, name="one-client")
            await wait_until(lambda: blocked_somewhere(dest) >= 2, "both worker threads blocked on a missing page")
            proxy.release()
            report = await bounded(dest.wait_complete(), "the migration")
            result = await worker.result()
            problems = check_destination(dest, seed=seed)
        source_report = await bounded(source.wait_complete(), "the source's Complete")
    finally:
        await proxy.close()
        await source.close()

    assert_complete(report, pages)
    assert problems == {}
    assert_worker_ok(result)
    assert report.faults >= 2 and report.pages_demand >= 1, report.format()
    assert report.bad_faults == 0
    assert source_report.complete
    assert_each_page_sent_once(source_report, report)
    assert {t.pid for t in report.blocked_threads} == {worker.pid}, report.blocked_threads
    assert result["latencies"]["count"] > 0


@pytest.mark.asyncio(loop_factories=["asyncio", "uvloop"])
async def test_four_mixed_clients(e2e, request) -> None:
    """Scenario 2: four clients, delegated and self-served alternating, on both event loops
    (the destination on the test's loop, the source process on the same kind)."""
    loop_name = request.node.callspec.id
    seed, size = 202, 64 * MiB
    pages = size // 4096
    source = await e2e.source({"ram": e2e.image(size, seed=seed)}, loop=loop_name)
    async with PostcopyDestination(e2e.options(source.address)) as dest:
        source.stop()
        workers = [await e2e.worker(mode=mode_of(i), threads=2, touches=200, seed=seed, name=f"mixed-{i}")
                   for i in range(4)]
        await wait_until(lambda: running_clients(dest) == 4, "four clients accepted")
        await wait_until(lambda: blocked_somewhere(dest) >= 4, "the clients blocked on missing pages")
        source.cont()
        report = await bounded(dest.wait_complete(), "the migration")
        results = [await w.result() for w in workers]
        problems = check_destination(dest, seed=seed)
    source_report = await source.report()

    assert_complete(report, pages)
    assert problems == {}
    for result in results:
        assert_worker_ok(result)
    assert [r["mode"] for r in results] == ["delegated", "self-served"] * 2
    assert report.faults > 0, "no delegated fault reached the service"
    assert report.client_requests > 0, "no self-served request reached the service"
    assert report.pages_demand > 0
    assert source_report["exit"] == 0 and source_report["complete"], source_report
    assert_each_page_sent_once(source_report, report)
    assert {c["mode"] for c in report.clients} == {"delegated", "self-served"}
    assert all(c["error"] is None for c in report.clients), report.clients


@pytest.mark.asyncio
async def test_sixteen_client_processes(e2e) -> None:
    """Scenario 3: sixteen client processes (one or two threads, a few touches each), mixed modes,
    all blocked at once before the source may answer."""
    seed, size = 303, 16 * MiB
    pages = size // 4096
    source = await e2e.source({"ram": e2e.image(size, seed=seed)})
    async with PostcopyDestination(e2e.options(source.address)) as dest:
        source.stop()
        workers = [await e2e.worker(mode=mode_of(i), threads=1 + i % 2, touches=8, seed=seed, name=f"many-{i}")
                   for i in range(16)]
        await wait_until(lambda: running_clients(dest) == 16, "sixteen clients accepted")
        await wait_until(lambda: blocked_somewhere(dest) >= 16, "the clients blocked on missing pages")
        source.cont()
        report = await bounded(dest.wait_complete(), "the migration")
        results = await asyncio.gather(*(w.result() for w in workers))
        problems = check_destination(dest, seed=seed)
    source_report = await source.report()

    assert_complete(report, pages)
    assert problems == {}
    for result in results:
        assert_worker_ok(result)
    assert len(report.clients) == 16
    assert len({c["pid"] for c in report.clients}) == 16
    assert report.faults > 0 and report.client_requests > 0
    assert_each_page_sent_once(source_report, report)


@pytest.mark.asyncio
async def test_counter_stress(e2e) -> None:
    """Scenario 5 (the kernel selftests' stress run): several processes, several threads each,
    incrementing their own counter slot in random pages while the pages migrate."""
    seed, size = 505, 8 * MiB
    pages = size // 4096
    procs, threads, touches = 4, 4, 800
    source = await e2e.source({"ram": e2e.image(size, seed=seed)}, window=256 * 1024)
    async with PostcopyDestination(e2e.options(source.address)) as dest:
        source.stop()
        workers = [await e2e.worker(mode=mode_of(i), threads=threads, touches=touches, seed=seed, counters=True,
                                    slot_base=8 + i * threads, name=f"stress-{i}") for i in range(procs)]
        await wait_until(lambda: running_clients(dest) == procs, "the stress clients accepted")
        await wait_until(lambda: blocked_somewhere(dest) >= procs, "the stress threads blocked")
        source.cont()
        report = await bounded(dest.wait_complete(), "the migration")
        results = await asyncio.gather(*(w.result() for w in workers))
        problems = check_destination(dest, seed=seed, counters_ok=True)
        view = dest.memory("ram")
        words = view.cast("Q")
        try:
            stride = 4096 // 8
            per_slot = [sum(words[slot::stride]) for slot in range(COUNTER_SLOTS)]
        finally:
            words.release()
            view.release()

    assert_complete(report, pages)
    assert problems == {}, "a data page differs outside its counter area"
    for result in results:
        assert result["exit"] == 0, json.dumps(result) + "\n" + report.format() + "\n" + repr(report.clients)
        assert result["counter_mismatches"] == 0, result["counter_examples"]
    used = range(8, 8 + procs * threads)
    assert [per_slot[s] for s in used] == [touches] * len(used), "a counter increment was lost or doubled"
    assert all(per_slot[s] == 0 for s in range(COUNTER_SLOTS) if s not in used), per_slot
    assert 8 * max(used) < COUNTER_BYTES


@pytest.mark.asyncio
async def test_zero_pages_arrive_as_markers(e2e) -> None:
    """Scenario 8: about one page in seven is zero; the source sends markers, never 4 KiB of zeros,
    and the destination's zero pages read as zeros."""
    seed, size, zero_every = 808, 16 * MiB, 7
    pages = size // 4096
    zero_pages = [p for p in range(pages) if is_zero_page(0, p, seed, zero_every)]
    assert len(zero_pages) > pages // 20
    source = PostcopySource([SourceBlock.from_path("ram", e2e.image(size, seed=seed, zero_every=zero_every))],
                            config=SourceConfig(background_window_bytes=1 * MiB))
    proxy = PausableProxy(await source.listen("127.0.0.1", 0))
    try:
        async with PostcopyDestination(e2e.options(await proxy.start())) as dest:
            proxy.hold()
            # sequential touches from page 0: zero pages among the first ones fault too
            worker = await e2e.worker(mode="self-served", threads=2, touches=200, workload="sequential", seed=seed,
                                      zero_every=zero_every, name="zero-reader")
            await wait_until(lambda: blocked_somewhere(dest) >= 1, "the worker blocked")
            proxy.release()
            report = await bounded(dest.wait_complete(), "the migration")
            result = await worker.result()
            problems = check_destination(dest, seed=seed, zero_every=zero_every)
            view = dest.memory("ram")
            try:
                nonzero = [p for p in zero_pages if any(view[p * 4096:(p + 1) * 4096])]
            finally:
                view.release()
        source_report = await bounded(source.wait_complete(), "the source's Complete")
    finally:
        await proxy.close()
        await source.close()

    assert_complete(report, pages)
    assert problems == {}
    assert_worker_ok(result)
    assert nonzero == []
    assert report.pages_zero == len(zero_pages), report.format()
    # every zero page went as a marker (a request crossing the sweep may send one twice, as may data)
    data_sent = source_report.pages_urgent + source_report.pages_background
    assert source_report.pages_zero >= len(zero_pages) and data_sent >= pages - len(zero_pages)
    assert_each_page_sent_once(source_report, report)
    assert source_report.bytes_sent == data_sent * 4096, "zero pages were sent as data"
    assert report.bytes_received < (data_sent * 4096) * 1.05
