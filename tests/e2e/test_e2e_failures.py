"""Things going wrong during a migration: a client killed mid-fault, a broken link, bad input.

The rule under test (DESIGN section 4): nothing a client or a peer does, and
no broken connection, may fail the migration, stall the other clients or
leave a page zero-filled.  Every test ends with the page-by-page check of the
destination's memory and of the surviving clients' own checks.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal

import pytest

from aiopostcopy.core.config import DestinationConfig
from aiopostcopy.loop import PostcopyDestination
from aiopostcopy.messages import PROTOCOL_VERSION, Channel, Hello, Role
from aiopostcopy.source import PostcopySource, SourceBlock
from aiopostcopy.transport.wire import ConnectionClosed, Decoder, encode

from e2e_support import (PausableProxy, blocked_somewhere, bounded, check_destination, mode_of, running_clients,
                         threads_in_userfault, wait_until)

MiB = 1 << 20


def assert_worker_ok(result: dict) -> None:
    assert result["exit"] == 0 and result.get("ok") and result.get("end_complete"), json.dumps(result)
    assert result.get("bad_page_count") == 0, result.get("bad_pages")


def client_entry(report, pid: int) -> dict:
    matches = [c for c in report.clients if c["pid"] == pid]
    assert len(matches) == 1, (pid, report.clients)
    return matches[0]


# ----------------------------------------------------------------------------- scenario 9


@pytest.mark.asyncio
async def test_client_killed_mid_fault(e2e) -> None:
    """Scenario 9: two of four clients (one delegated, one self-served) are SIGKILLed while their
    threads are blocked on missing pages; the service retires them, the other two finish and verify,
    the migration completes."""
    seed, size = 909, 32 * MiB
    source = await e2e.source({"ram": e2e.image(size, seed=seed)})
    async with PostcopyDestination(e2e.options(source.address)) as dest:
        source.stop()
        workers = await e2e.blocked_workers(dest, 4, name="victim", threads=2, touches=300, seed=seed)
        victims, survivors = workers[:2], workers[2:]
        keys = {c.key: c.pid for c in dest._clients}
        for victim in victims:
            os.kill(victim.pid, signal.SIGKILL)
        victim_keys = [k for k, pid in keys.items() if pid in {v.pid for v in victims}]
        await wait_until(lambda: all(dest._clients.get(k) is None for k in victim_keys), "the killed clients retired")
        retired_view = dest.statistics()
        source.cont()
        report = await bounded(dest.wait_complete(), "the migration")
        survivor_results = [await w.result() for w in survivors]
        victim_results = [await v.result() for v in victims]
        problems = check_destination(dest, seed=seed)
    await source.report()

    assert report.complete and problems == {}
    for result in survivor_results:
        assert_worker_ok(result)
    assert [r["exit"] for r in victim_results] == [-signal.SIGKILL] * 2
    assert running_clients(dest) == 0
    for victim in victims:
        entry = client_entry(retired_view, victim.pid)
        assert entry["error"], f"the report does not say that client {entry['key']} (pid {victim.pid}) " \
                               f"vanished mid-migration: {entry}"


# ----------------------------------------------------------------------------- scenario 10


@pytest.mark.asyncio
async def test_source_killed_and_restarted(e2e) -> None:
    """Scenario 10: the source process is killed mid-stream (both channels reset) and a new one is
    started on the same port with the same image; the destination reconnects, sends Resume with
    what it holds, and the migration completes with every page right."""
    seed, size = 1010, 64 * MiB
    pages = size // 4096
    image = e2e.image(size, seed=seed)
    first = await e2e.source({"ram": image}, window=256 * 1024)
    host, port = first.address
    async with PostcopyDestination(e2e.options(first.address, reconnect_interval=0.05)) as dest:
        first.stop()
        workers = [await e2e.worker(mode=mode_of(i), threads=2, touches=400, seed=seed, name=f"cut-{i}")
                   for i in range(2)]
        await wait_until(lambda: running_clients(dest) == 2 and blocked_somewhere(dest) >= 2, "clients blocked")
        first.cont()
        await wait_until(lambda: dest.statistics().pages_placed >= pages // 4, "a quarter of the pages", interval=0.001)
        first.kill()
        await first.proc.wait()
        at_cut = dest.statistics()
        await asyncio.sleep(0.3)  # the destination keeps trying while nothing listens
        second = await e2e.source({"ram": image}, listen=f"{host}:{port}")
        report = await bounded(dest.wait_complete(), "the migration after the restart")
        results = [await w.result() for w in workers]
        problems = check_destination(dest, seed=seed)
    second_report = await second.report()

    assert not at_cut.complete, "the migration finished before the cut: nothing was tested"
    assert report.complete and problems == {}
    assert report.resumes >= 1, report.format()
    for result in results:
        assert_worker_ok(result)
    assert second_report["exit"] == 0 and second_report["complete"], second_report
    sent_again = second_report["pages_urgent"] + second_report["pages_background"] + second_report["pages_zero"]
    # The new source MAY sweep before the Resume lands (docs/protocol.md 4.7), from the block's
    # start, where the pages the destination holds are: those go twice until it does, more on a
    # busy machine (157-512 pages seen, once 1,035). A Resume the source ignored would resend
    # all 4,000 or so held at the cut; the bound lets through at most half of them.
    allowance = max(64 * 16, at_cut.pages_placed // 2)
    assert sent_again <= pages - at_cut.pages_placed + allowance, \
        f"the new source sent {sent_again} pages; {pages - at_cut.pages_placed} were missing at the cut"


@pytest.mark.asyncio
async def test_link_reset_with_requests_in_flight(e2e) -> None:
    """Scenario 10, the other way: the link (a relay) is reset while requests are out and their
    answers in flight; the in-process source takes the same session back, the Resume carries the
    pending requests, and the blocked threads get their pages."""
    seed, size = 1011, 32 * MiB
    source = PostcopySource([SourceBlock.from_path("ram", e2e.image(size, seed=seed))])
    proxy = PausableProxy(await source.listen("127.0.0.1", 0))
    try:
        options = e2e.options(await proxy.start(), reconnect_interval=0.05,
                              config=DestinationConfig(request_timeout=None))
        async with PostcopyDestination(options) as dest:
            proxy.hold()
            workers = [await e2e.worker(mode=mode_of(i), threads=2, touches=300, seed=seed, name=f"reset-{i}")
                       for i in range(2)]
            await wait_until(lambda: running_clients(dest) == 2 and blocked_somewhere(dest) >= 3, "clients blocked")
            await wait_until(lambda: dest.statistics().requests_sent >= 1, "requests sent")
            await asyncio.sleep(0.05)  # the requests reach the source; its answers wait in the relay
            proxy.cut()
            proxy.release()
            report = await bounded(dest.wait_complete(), "the migration after the reset")
            results = [await w.result() for w in workers]
            problems = check_destination(dest, seed=seed)
        source_report = await bounded(source.wait_complete(), "the source's Complete")
    finally:
        await proxy.close()
        await source.close()

    assert proxy.connections >= 4, "the destination did not reconnect"
    assert report.complete and problems == {}
    assert report.resumes >= 1, report.format()
    for result in results:
        assert_worker_ok(result)
    assert source_report.complete


# ----------------------------------------------------------------------------- scenario 11


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", ["garbage", "bad-frame"])
async def test_garbage_on_the_control_socket(e2e, mode) -> None:
    """Scenario 11: a client that sends garbage gets an Error and is retired; a blocked client
    beside it is not disturbed and finishes."""
    rogue, report, result, problems = await e2e.rogue_beside_bystander(mode, seed=1111)

    assert rogue["exit"] == 0, rogue
    assert rogue["eof"], f"the service did not close the rogue's connection: {rogue}"
    errors = [m for m in rogue["received"] if m.get("type") in ("Error", "Reject")]
    assert errors and errors[0]["code"] == "protocol", rogue
    assert report.complete and problems == {}
    assert_worker_ok(result)
    entry = client_entry(report, rogue["pid"])
    assert entry["error"], entry


@pytest.mark.asyncio
async def test_a_client_request_past_its_block_rejects_the_client_and_loses_nothing(e2e) -> None:
    """A self-served client asks, in one ClientRequest, for a page of the block and for the page
    just past its end: the client is told Error(block) and dropped, the page it named first (whose
    Request may already have left: the lane writes it before the session checks the rest) is
    placed all the same, and the bystander and the migration finish with every page right."""
    rogue, report, result, problems = await e2e.rogue_beside_bystander("request-past-block", seed=1115,
                                                                       bystander="self-served")
    assert rogue["exit"] == 0 and [m["type"] for m in rogue["reply"]] == ["Accept"], rogue
    assert [m["type"] for m in rogue["received"]] == ["Error"], rogue
    assert rogue["received"][0]["code"] == "block" and "out of range" in rogue["received"][0]["text"], rogue
    assert rogue["eof"]
    assert report.complete and report.verified and problems == {}, problems
    assert_worker_ok(result)


@pytest.mark.asyncio
@pytest.mark.parametrize("mode, names", [
    ("table-past-block", "entry 0"),
    ("table-overlap", "entry 1"),
    ("table-bad-block", "entry 0"),
])
async def test_lying_mapping_table_is_rejected(e2e, mode, names) -> None:
    """Scenario 11: a mapping table that runs past its block, overlaps itself or names a block that
    does not exist gets Reject(mapping) naming the entry; the other client is unaffected."""
    rogue, report, result, problems = await e2e.rogue_beside_bystander(mode, seed=1112, bystander="self-served")
    assert rogue["exit"] == 0, rogue
    rejects = [m for m in rogue["received"] if m.get("type") == "Reject"]
    assert rejects, f"no Reject: {rogue}"
    assert rejects[0]["code"] == "mapping" and names in rejects[0]["text"], rejects
    assert rogue["eof"]
    assert report.complete and problems == {}
    assert_worker_ok(result)


@pytest.mark.asyncio
async def test_fault_outside_the_mapping_table(e2e) -> None:
    """Scenario 11: a delegated client faults at an address its table does not cover: the service
    reports a mapping error and retires it (its thread stays blocked, never fed zeros), the page
    still arrives intact for everyone else."""
    rogue, report, result, problems = await e2e.rogue_beside_bystander("fault-outside", seed=1113)

    assert [m["type"] for m in rogue["reply"]] == ["Accept"], rogue
    errors = [m for m in rogue["received"] if m.get("type") == "Error"]
    assert errors and errors[0]["code"] == "mapping" and "outside" in errors[0]["text"], rogue
    assert rogue["toucher_blocked"], "the rogue's thread got a page it should never have been given"
    assert report.bad_faults == 1, report.format()
    assert report.complete and problems == {}
    assert_worker_ok(result)


def _decode_all(data: bytes) -> list:
    decoder = Decoder()
    out: list = []
    try:
        decoder.receive_data(data)
        decoder.receive_data(b"")
        while (event := decoder.next_event()) is not None and not isinstance(event, ConnectionClosed):
            out.append(event)
    except Exception as exc:  # noqa: BLE001 - part of the verdict
        out.append(exc)
    return out


async def _talk(address: tuple[str, int], payload: bytes) -> list:
    reader, writer = await asyncio.open_connection(*address)
    try:
        writer.write(payload)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 20)
    finally:
        writer.close()
        await asyncio.gather(writer.wait_closed(), return_exceptions=True)
    return _decode_all(data)


@pytest.mark.asyncio
async def test_garbage_peers_at_the_source(e2e) -> None:
    """Scenario 11: while a migration runs, one peer sends the source garbage and another opens a
    second session: each gets an Error and is closed; the migration is not disturbed."""
    seed, size = 1114, 32 * MiB
    source = await e2e.source({"ram": e2e.image(size, seed=seed)}, window=128 * 1024)
    async with PostcopyDestination(e2e.options(source.address)) as dest:
        source.stop()
        worker = await e2e.worker(mode="delegated", threads=2, touches=200, seed=seed, name="bystander")
        await wait_until(lambda: threads_in_userfault(worker.pid), "the bystander blocked")
        intruder = Hello(version=PROTOCOL_VERSION, session_id="someone-else", role=Role.DESTINATION,
                         channel=Channel.URGENT)
        talks = asyncio.gather(_talk(source.address, b"\x00\x00\x00\x05\x95\x01garbage" * 4),
                               _talk(source.address, encode(intruder)))
        await asyncio.sleep(0.05)  # both connected and written while the source is held
        source.cont()
        garbage_reply, intruder_reply = await bounded(talks, "the source's answers to the bad peers")
        report = await bounded(dest.wait_complete(), "the migration")
        result = await worker.result()
        problems = check_destination(dest, seed=seed)
    source_report = await source.report()

    codes = [getattr(getattr(m, "code", None), "value", None) for m in garbage_reply]
    assert "protocol" in codes, f"garbage got no protocol Error: {garbage_reply}"
    codes = [getattr(getattr(m, "code", None), "value", None) for m in intruder_reply]
    assert "busy" in codes, f"a second session got no busy Error: {intruder_reply}"
    assert report.complete and problems == {}
    assert_worker_ok(result)
    assert source_report["exit"] == 0 and source_report["complete"], source_report


@pytest.mark.asyncio
async def test_pages_filled_before_registration_are_dropped_and_the_client_refused(e2e) -> None:
    """A delegated client passes a table whose block it never registered on its userfaultfd and
    reads three missing pages first (the kernel fills them with zeros in the shared file).  The
    service registers the ranges itself, finds the three pages it never placed, drops them
    again and refuses the client; the pages migrate like any other, every page is right, and
    the report says the migration is complete but not verified."""
    rogue, report, result, problems = await e2e.rogue_beside_bystander("unregistered", seed=1114)

    assert rogue["exit"] == 0 and rogue["read"] == [0, 0, 0], rogue
    rejects = [m for m in rogue["received"] if m.get("type") == "Reject"]
    assert rejects and rejects[0]["code"] == "mapping", rogue
    assert "3 pages" in rejects[0]["text"] and "before the mapping was registered" in rejects[0]["text"], rejects
    assert report.complete and problems == {}, problems
    assert report.integrity_pages == 3 and not report.verified, report.format()
    assert "NOT VERIFIED" in report.format()
    assert_worker_ok(result)


@pytest.mark.asyncio
async def test_a_page_filled_by_an_unregistered_reader_is_rewritten(e2e) -> None:
    """A self-served client that never registers reads three missing pages (zeros in the shared
    file).  Each placement of those pages meets EEXIST: the service writes the source's bytes
    over them, counts them, and reports the migration complete but not verified."""
    seed, size = 1115, 16 * MiB
    source = await e2e.source({"ram": e2e.image(size, seed=seed)})
    async with PostcopyDestination(e2e.options(source.address)) as dest:
        source.stop()
        rogue_run = asyncio.ensure_future(e2e.rogue("self-served-touch"))
        await wait_until(lambda: any(c["name"] == "rogue" for c in dest.statistics().clients), "the rogue joined")
        source.cont()
        report = await bounded(dest.wait_complete(), "the migration")
        problems = check_destination(dest, seed=seed)
    rogue = await bounded(rogue_run, "the rogue")
    await source.report()

    assert rogue["exit"] == 0 and rogue["read"] == [0, 0, 0], rogue
    assert [m["type"] for m in rogue["reply"]] == ["Accept"], rogue
    assert report.complete and problems == {}, problems
    assert report.integrity_pages == 3 and not report.verified, report.format()
