"""The code does what docs/protocol.md says, where the two once disagreed.

* section 4.2: there is one protocol version and no negotiation: a Hello of
  version 2 gets ``Error(version)`` from a real source, which goes on serving
  the next destination; a ClientHello of version 2 gets ``Reject(version)``
  and no Blocks (section 5.2);
* section 5.2: a mapping table the service cannot accept, even one whose frame
  the decoder refuses (an entry of three integers, a length of 0, no entry
  at all), is answered with ``Reject(mapping)`` naming it, and the service
  closes; the other clients and the migration go on;
* section 5.2: a client answers End with Bye and the service reads it before
  closing; a client that never says Bye does not hold the service up.

Every test ends with the page-by-page check of the destination's memory and
of the bystander clients' own checks.
"""

from __future__ import annotations

import asyncio
import json
import os

import pytest

from aiopostcopy.errors import SourceLostError
from aiopostcopy.loop import PostcopyDestination
from aiopostcopy.messages import PROTOCOL_VERSION, BlockInfo, Channel, Hello, Role
from aiopostcopy.transport.wire import ConnectionClosed, Decoder, encode

from e2e_support import bounded, check_destination, threads_in_userfault, wait_until

MiB = 1 << 20


def assert_worker_ok(result: dict) -> None:
    assert result["exit"] == 0 and result.get("ok") and result.get("end_complete"), json.dumps(result)
    assert result.get("bad_page_count") == 0, result.get("bad_pages")


async def _hello_of_version(address: tuple[str, int], version: int) -> tuple[list, bool]:
    """Send one destination Hello of ``version``; what came back, and whether the source closed."""
    reader, writer = await asyncio.open_connection(*address)
    try:
        writer.write(encode(Hello(version=version, session_id="from-the-future", role=Role.DESTINATION,
                                  channel=Channel.URGENT)))
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 20)  # to EOF
    finally:
        writer.close()
        await asyncio.gather(writer.wait_closed(), return_exceptions=True)
    decoder, got, closed = Decoder(), [], False
    decoder.receive_data(data)
    decoder.receive_data(b"")
    while (event := decoder.next_event()) is not None:
        if isinstance(event, ConnectionClosed):
            closed = True
            break
        got.append(event)
    return got, closed


# ----------------------------------------------------------------------------- versions


@pytest.mark.asyncio
async def test_a_hello_of_version_2_gets_error_version_and_the_source_serves_on(e2e) -> None:
    """Section 4.2: the source answers a version 2 Hello with Error(version) and closes, sends no
    Hello, and is not held by it: the next destination (version 1) completes with every page right."""
    seed, size = 901, 8 * MiB
    source = await e2e.source({"ram": e2e.image(size, seed=seed)})
    got, closed = await bounded(_hello_of_version(source.address, PROTOCOL_VERSION + 1), "the source's answer")
    async with PostcopyDestination(e2e.options(source.address, clients=False)) as dest:
        report = await bounded(dest.wait_complete(), "the migration after the refused Hello")
        problems = check_destination(dest, seed=seed)
    source_report = await source.report()

    assert [type(m).__name__ for m in got] == ["Error"] and got[0].code.value == "version", got
    assert str(PROTOCOL_VERSION + 1) in got[0].text, got
    assert closed, "the source did not close after Error(version)"
    assert report.complete and problems == {}
    assert source_report["exit"] == 0 and source_report["complete"], source_report


@pytest.mark.asyncio
async def test_a_source_hello_of_version_2_ends_the_destination_with_error_version(e2e) -> None:
    """Section 4.2, the other way: a source that answers with a Hello of version 2 gets
    Error(version) and a closed connection, and the destination ends at once (version is final,
    section 6) with an error that says so, instead of reconnecting."""
    heard: list = []

    async def future_source(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder = Decoder()
        hello = None
        while hello is None and (data := await reader.read(65536)):
            decoder.receive_data(data)
            hello = decoder.next_event()
        if hello is None:
            return writer.close()
        block = BlockInfo(name="ram", length=MiB, page_size=4096)
        writer.write(encode(Hello(version=PROTOCOL_VERSION + 1, session_id=hello.session_id, role=Role.SOURCE,
                                  channel=hello.channel, blocks=(block,))))
        await writer.drain()
        decoder.receive_data(await asyncio.wait_for(reader.read(), 20))  # to the destination's close
        decoder.receive_data(b"")
        while (event := decoder.next_event()) is not None and not isinstance(event, ConnectionClosed):
            heard.append(event)
        writer.close()

    server = await asyncio.start_server(future_source, "127.0.0.1", 0)
    address = server.sockets[0].getsockname()[:2]
    try:
        with pytest.raises(SourceLostError) as failure:  # at once: in start(), on the first Hello
            async with PostcopyDestination(e2e.options(address, clients=False, block_dir=False)) as dest:
                await bounded(dest.wait_complete(), "the destination to give up")
        await wait_until(lambda: heard, "the destination's answer to the source")
    finally:
        server.close()
        await server.wait_closed()

    assert "version" in str(failure.value), failure.value
    errors = [m for m in heard if type(m).__name__ == "Error"]
    assert errors and errors[0].code.value == "version", heard


@pytest.mark.asyncio
async def test_a_client_hello_of_version_2_gets_reject_version(e2e) -> None:
    """Section 5.2: a ClientHello of version 2 gets Reject(version), no Blocks and no descriptor,
    and the connection closes; a client beside it is not disturbed."""
    rogue, report, result, problems = await e2e.rogue_beside_bystander("version-2", seed=902)

    assert rogue["exit"] == 0, rogue
    assert [m["type"] for m in rogue["received"]] == ["Reject"], rogue
    assert rogue["received"][0]["code"] == "version" and rogue["fds"] == 0, rogue
    assert rogue["eof"], rogue
    assert report.complete and problems == {}
    assert_worker_ok(result)


# ----------------------------------------------------------------------------- mapping tables


@pytest.mark.asyncio
@pytest.mark.parametrize("mode, names", [
    ("table-short-entry", "entry 0"),
    ("table-zero-length", "entry 0: length"),
    ("table-empty", "at least one mapping"),
])
async def test_a_malformed_mapping_table_gets_reject_mapping(e2e, mode, names) -> None:
    """Section 5.2: a Register whose table the decoder or the state machine refuses as it stands
    gets Reject(mapping) naming the entry (not Error), and the service closes; the bystander
    client and the migration are not disturbed, and every page is right."""
    rogue, report, result, problems = await e2e.rogue_beside_bystander(mode, seed=903)

    assert rogue["exit"] == 0, rogue
    assert [m["type"] for m in rogue["received"]] == ["Reject"], rogue
    reject = rogue["received"][0]
    assert reject["code"] == "mapping" and names in reject["text"], reject
    assert rogue["eof"], rogue
    refused = [c for c in report.clients if c["pid"] == rogue["pid"]]
    assert len(refused) == 1 and refused[0]["error"], report.clients
    assert report.complete and problems == {}
    assert_worker_ok(result)


# ----------------------------------------------------------------------------- the end of a client


def assert_block_file(image: str, final: str) -> None:
    """The destination's block file equals the source image, MiB by MiB (cmp)."""
    with open(image, "rb") as want, open(final, "rb") as got:
        offset = 0
        while chunk := want.read(MiB):
            assert got.read(len(chunk)) == chunk, f"{final} differs from {image} in the MiB at {offset:#x}"
            offset += len(chunk)
        assert not got.read(1), f"{final} is longer than {image}"


@pytest.mark.asyncio
async def test_clients_answer_end_with_bye_and_the_service_reads_it(e2e) -> None:
    """Section 5.2: a delegated and a self-served client answer End with Bye, and the service,
    closed the moment the migration completes, reads both Byes before it closes: neither client
    meets a closed socket, neither is reported with an error, and every page is right."""
    seed, size = 904, 16 * MiB
    image = e2e.image(size, seed=seed)
    source = await e2e.source({"ram": image})
    async with PostcopyDestination(e2e.options(source.address)) as dest:
        source.stop()
        workers = [await e2e.worker(mode=mode, threads=2, touches=200, seed=seed, name=f"ender-{mode}")
                   for mode in ("delegated", "self-served")]
        for worker in workers:
            await wait_until(lambda: threads_in_userfault(worker.pid), f"worker {worker.pid} blocked")
        source.cont()
        report = await bounded(dest.wait_complete(), "the migration")
    # closed at once: the workers get End while the service is closing
    results = [await worker.result() for worker in workers]
    await source.report()

    for result in results:
        assert_worker_ok(result)
        assert result["client"]["bye"] == "sent", result["client"]
    seen = {c.pid: c for c in dest._clients}  # test-only look inside the registry
    assert all(seen[w.pid].said_bye and seen[w.pid].error is None for w in workers), seen
    assert report.complete and all(c["error"] is None for c in report.clients), report.clients
    assert_block_file(image, os.path.join(e2e.block_dir, "ram"))


@pytest.mark.asyncio
async def test_a_client_that_never_says_bye_does_not_hold_the_service(e2e) -> None:
    """Section 5.2: a client that gets End and neither says Bye nor closes is closed by the
    service after its short grace; closing the destination does not wait for it, and a
    well-behaved client beside it ends normally."""
    seed, size = 905, 16 * MiB
    image = e2e.image(size, seed=seed)
    source = await e2e.source({"ram": image})
    dest = PostcopyDestination(e2e.options(source.address))
    await dest.start()
    try:
        source.stop()
        worker = await e2e.worker(mode="delegated", threads=2, touches=200, seed=seed, name="polite")
        await wait_until(lambda: threads_in_userfault(worker.pid), "the polite client blocked")
        silent = asyncio.ensure_future(e2e.rogue("no-bye"))
        await wait_until(lambda: sum(1 for c in dest._clients if c.name == "rogue" and c.uffd) == 1,
                         "the silent client accepted")
        source.cont()
        report = await bounded(dest.wait_complete(), "the migration")
        problems = check_destination(dest, seed=seed)
    finally:
        await bounded(dest.close(), "closing the destination beside a client that never says Bye")
    rogue = await bounded(silent, "the silent client")
    result = await worker.result()
    await source.report()

    assert rogue["exit"] == 0 and [m["type"] for m in rogue["reply"]] == ["Accept"], rogue
    assert rogue["received"] == [{"type": "End", "complete": True}], rogue
    assert rogue["tail"] == [] and rogue["eof"] and rogue["closed_after_s"] is not None, rogue
    polite = next(c for c in dest._clients if c.pid == worker.pid)
    silent_info = next(c for c in dest._clients if c.pid == rogue["pid"])
    assert polite.said_bye and not silent_info.said_bye, (polite, silent_info)
    assert report.complete and problems == {}
    assert_worker_ok(result)
    assert result["client"]["bye"] == "sent", result["client"]
    assert_block_file(image, os.path.join(e2e.block_dir, "ram"))
