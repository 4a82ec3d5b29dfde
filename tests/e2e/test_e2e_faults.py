"""Single faults, watched closely: joins, faults on placed pages, the last placement, thread names.

These use ``touch_client.py``, which touches exactly the pages the test names
when the test says so, and check the kernel's side with /proc: a thread
sleeping in ``handle_userfault`` is blocked on a missing page.

Two of them open a timing window on purpose with
:func:`~e2e_support.hook_placement`: just before a run is placed (for the
sweep, as the run is handed to a placing thread), a client thread is made to fault on a page
of that run and the hook waits until the kernel shows it blocked.  The fault
then reaches the service while the page is being placed, the race a busy
service meets all the time, made deterministic.
"""

from __future__ import annotations

import signal

import pytest

from aiopostcopy.core.config import DestinationConfig
from aiopostcopy.loop import PostcopyDestination
from aiopostcopy.tools.pattern import is_zero_page

from e2e_support import (blocked_somewhere, bounded, check_destination, hook_placement,
                         threads_in_userfault, wait_blocking, wait_until)

MiB = 1 << 20


def last_data_page(pages: int, seed: int, zero_every: int = 7) -> int:
    return next(p for p in range(pages - 1, -1, -1) if not is_zero_page(0, p, seed, zero_every))


def assert_client_ok(result: dict) -> None:
    assert result["exit"] == 0 and result.get("ok") and result.get("end_complete"), result
    assert not result.get("bad_pages"), result


@pytest.mark.asyncio
async def test_one_page_many_clients_requested_once(e2e) -> None:
    """Scenario 6: four clients (two delegated, two self-served), three threads each, all fault on
    the same page while the source is held: the page is requested once, sent once on the urgent
    channel, and every one of the twelve waiters resumes."""
    seed, size = 606, 16 * MiB
    pages = size // 4096
    page = last_data_page(pages, seed)  # the sweep reaches it last
    source = await e2e.source({"ram": e2e.image(size, seed=seed)}, window=64 * 1024)
    config = DestinationConfig(request_timeout=None)  # no re-request however long the source is held
    async with PostcopyDestination(e2e.options(source.address, config=config)) as dest:
        source.stop()
        modes = ["delegated", "self-served", "delegated", "self-served"]
        clients = [await e2e.touch_client(mode=mode, name=f"same-page-{i}", seed=seed) for i, mode in enumerate(modes)]
        for client in clients:
            await client.touch([page], repeat=3)
            await wait_until(lambda: len(threads_in_userfault(client.pid)) == 3,
                             f"three threads of client {client.pid} blocked in handle_userfault")
        await wait_until(lambda: blocked_somewhere(dest) >= 6 + 2, "six delegated waiters and two self-served waits")
        held = dest.statistics()
        source.cont()
        touched = [await client.event("touched") for client in clients]
        report = await bounded(dest.wait_complete(), "the migration")
        results = [await client.finish() for client in clients]
        problems = check_destination(dest, seed=seed)
    source_report = await source.report()

    assert held.faults == 6, held.format()
    assert held.requests_sent == 1, "the page was requested more than once while held"
    assert held.faults_joined >= 3, held.format()  # the second delegated client found it requested
    assert report.complete and problems == {}
    for event in touched:
        assert len(event["latency_us"]) == 3, event
    for result in results:
        assert_client_ok(result)
    assert source_report["pages_urgent"] == 1, source_report
    assert report.pages_demand == 1, report.format()
    assert report.client_requests == 2, report.format()  # each self-served pager asked once for its 3 threads
    assert all(r["client"].get("joined", 2) == 2 for r in results if r["client"]["mode"] == "self-served"), results


@pytest.mark.asyncio
async def test_a_delegated_fault_is_placed_through_the_clients_own_userfaultfd(e2e) -> None:
    """A fault of one delegated client, alone on its page: the answer goes in with one UFFDIO_COPY
    through the client's userfaultfd, into its mapping of the shared memory, which wakes the thread
    (``copies_to_client``); the page is then there for everyone, and every page verifies."""
    seed, size = 611, 16 * MiB
    pages = size // 4096
    wanted = [p for p in range(pages) if not is_zero_page(0, p, seed)][::500]
    source = await e2e.source({"ram": e2e.image(size, seed=seed)}, sweep_after_idle=2.0)  # faults first
    async with PostcopyDestination(e2e.options(source.address)) as dest:
        client = await e2e.touch_client(mode="delegated", name="alone", seed=seed)
        for page in wanted:  # one page at a time: each fault alone
            await client.touch([page])
            event = await client.event("touched")
            assert len(event["latency_us"]) == 1, event
        report = await bounded(dest.wait_complete(), "the migration")
        result = await client.finish()
        problems = check_destination(dest, seed=seed)
    await source.report()

    assert report.complete and problems == {}
    assert_client_ok(result)
    assert report.pages_demand == len(wanted), report.format()  # the sweep waited for them
    assert report.copies_to_client == len(wanted), report.format()


@pytest.mark.asyncio
async def test_fault_on_page_placed_meanwhile(e2e) -> None:
    """Scenario 7: a delegated client faults on a page while the background sweep is placing it;
    the fault joins the placement in progress (or, if the service reads it later, finds the page
    in): no request, just the wake."""
    seed, size = 707, 16 * MiB
    pages = size // 4096
    source = await e2e.source({"ram": e2e.image(size, seed=seed)}, window=64 * 1024)
    async with PostcopyDestination(e2e.options(source.address)) as dest:
        source.stop()
        client = await e2e.touch_client(mode="delegated", name="late-toucher", seed=seed)
        start = dest.statistics().pages_placed + 512  # well ahead of the sweep, which walks upwards
        target = next(p for p in range(start, pages) if not is_zero_page(0, p, seed))
        fired = []

        def before(command) -> None:
            if fired or command.block != 0 or not command.first <= target < command.first + command.count:
                return
            fired.append(command)
            client.command_now(f"touch 0 1 {target}")
            wait_blocking(lambda: threads_in_userfault(client.pid), "the client thread blocked on the page")

        hook_placement(dest, before)
        source.cont()
        touched = await client.event("touched")
        report = await bounded(dest.wait_complete(), "the migration")
        result = await client.finish()
        problems = check_destination(dest, seed=seed)
    await source.report()

    assert fired, "the sweep never placed the target page"
    assert report.faults_already_placed + report.faults_joined == 1, report.format()
    assert report.faults == 1, report.format()
    assert report.requests_sent == 0, "a request was sent for a page that was already placed"
    assert len(touched["latency_us"]) == 1
    assert report.complete and problems == {}
    assert_client_ok(result)


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", ["delegated", "self-served"])
async def test_fault_during_last_placement_is_woken(e2e, mode) -> None:
    """A client thread faults on a page of the very last run while the service is placing it.

    The page is placed through the service's mapping (which wakes nobody on the client's
    userfaultfd) and that placement completes the migration.  The client's fault must still be
    answered with a wake; otherwise its thread sleeps forever although every page is in memory."""
    seed, size = 717, 8 * MiB
    source = await e2e.source({"ram": e2e.image(size, seed=seed)}, window=64 * 1024)
    async with PostcopyDestination(e2e.options(source.address)) as dest:
        source.stop()
        client = await e2e.touch_client(mode=mode, name="last-run", seed=seed, timeout=15)
        fired, started = [], [dest.statistics().pages_placed]  # each page is placed once

        def before(command) -> None:
            started.append(command.count)
            if fired or sum(started) != size // 4096:
                return
            fired.append(command)
            client.command_now(f"touch {command.block} 1 {command.first}")
            wait_blocking(lambda: threads_in_userfault(client.pid), "the client thread blocked on the last run")

        hook_placement(dest, before)
        source.cont()
        report = await bounded(dest.wait_complete(), "the migration")
        problems = check_destination(dest, seed=seed)
        result = await client.finish(timeout=30)
    await source.report()

    assert fired, "no placement completed the migration"
    assert report.complete and problems == {}
    assert result.get("touched"), f"the client thread that faulted during the last placement never resumed: {result}"
    assert_client_ok(result)


@pytest.mark.asyncio
async def test_blocked_threads_are_named_in_the_final_report(e2e) -> None:
    """DESIGN 4b: every thread that blocked is reported with pid, tid and its /proc name, also in
    the final report, after the thread itself has exited (the name must be read while it waits,
    not when the report is built)."""
    seed, size = 727, 8 * MiB
    source = await e2e.source({"ram": e2e.image(size, seed=seed)})
    async with PostcopyDestination(e2e.options(source.address)) as dest:
        source.stop()
        client = await e2e.touch_client(mode="delegated", name="named", seed=seed)
        page = last_data_page(size // 4096, seed)
        await client.touch([page])
        await wait_until(lambda: threads_in_userfault(client.pid), "the touching thread blocked")
        await wait_until(lambda: blocked_somewhere(dest) >= 1, "the service holding the fault")
        # (no statistics() call here: a live snapshot happens to cache the name as a side effect)
        source.cont()
        await client.event("touched")  # the touching thread has ended after this
        report = await bounded(dest.wait_complete(), "the migration")
        result = await client.finish()
    await source.report()

    assert_client_ok(result)
    assert [(t.pid, t.name) for t in report.blocked_threads] == [(client.pid, f"t0-{page}-0")], \
        f"final report lost the thread's name: {report.blocked_threads}"
    assert report.blocked_threads[0].blocked_s > 0


@pytest.mark.asyncio
async def test_a_forked_child_cannot_zero_fill_a_missing_page(e2e) -> None:
    """A delegated client forks and the child touches a page that has not arrived.

    The child inherits no userfaultfd registration, so on shared memory its touch would
    allocate a zero page in the block for every process, and the real page could no longer
    be placed.  Client mappings are MADV_DONTFORK: the child dies of SIGSEGV, the page is
    still missing, and it arrives with the right bytes."""
    seed, size = 747, 8 * MiB
    page = last_data_page(size // 4096, seed)  # the sweep reaches it last
    source = await e2e.source({"ram": e2e.image(size, seed=seed)})
    async with PostcopyDestination(e2e.options(source.address)) as dest:
        source.stop()
        client = await e2e.touch_client(mode="delegated", name="forker", seed=seed)
        client.command_now(f"fork-touch 0 {page}")
        forked = await client.event("forked")
        source.cont()
        report = await bounded(dest.wait_complete(), "the migration")
        problems = check_destination(dest, seed=seed)
        result = await client.finish()
    await source.report()

    assert forked["signal"] == signal.SIGSEGV, forked
    assert report.complete and problems == {}, problems
    assert_client_ok(result)
