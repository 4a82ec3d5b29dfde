"""The source's two ways of answering Requests, C (the page server) and Python, over real TCP:
the same frames, page for page the image, and the same accounting in the report and the session."""

from __future__ import annotations

import asyncio
import os

import pytest

from aiopostcopy.messages import (PROTOCOL_VERSION, Channel, Complete, Hello, PageRun, Pages, Ping, Pong, Request,
                                  Role, Zero)
from aiopostcopy.source import MIN_HOLE_BYTES, PostcopySource, SourceBlock
from aiopostcopy.transport.page_server import answers_in, available
from aiopostcopy.transport.wire import Decoder, encode

from aiopostcopy.loop import PostcopyDestination
from aiopostcopy.tools.pattern import is_zero_page

from e2e_support import bounded, check_destination
from source_peer import RawChannel, SourceWithLog

PAGE = 4096
MiB = 1 << 20

pytestmark = pytest.mark.skipif(not available(), reason="the C page server is not built")


def sparse_image(path: str, pages: int, hole: range) -> bytes:
    """Pages named by their number, every fifth all zero, and ``hole`` left a hole of the file."""
    image = bytearray()
    for page in range(pages):
        image += bytes(PAGE) if page % 5 == 0 or page in hole else page.to_bytes(8, "little") * (PAGE // 8)
    with open(path, "wb") as f:
        f.write(image[:hole.start * PAGE])
        f.seek(hole.stop * PAGE)
        f.write(image[hole.stop * PAGE:])
    return bytes(image)


REQUESTS = [
    [(0, 7, 1)],                                   # a fault on a data page
    [(0, 10, 1)],                                  # a fault on a zero page
    [(0, 3, 1), (0, 4, 1), (0, 40, 1)],            # the faults of one read
    [(0, 0, 16)],                                  # a run with zero pages inside
    [(0, 300, 2)],                                 # inside the hole
    [(0, 1000, 100)],                              # longer than one run: split by the session
]


class Urgent:
    """The destination's end of an urgent connection, keeping every byte the source wrote."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.raw = bytearray()
        self.payloads: list[bytes] = []
        self.decoder = Decoder(payload_sink=self._sink)

    def _sink(self, header: Pages, nbytes: int) -> memoryview:
        self.payloads.append(bytearray(nbytes))
        return memoryview(self.payloads[-1])

    async def next(self) -> object:
        while (event := self.decoder.next_event()) is None:
            data = await bounded(self.reader.read(1 << 16), "a frame from the source")
            self.raw += data
            self.decoder.receive_data(data)
        return event

    def send(self, msg: object) -> None:
        self.writer.write(encode(msg))


async def answers_of(image: str, answer_in_c: bool, *, complete_first: bool = False):
    """Send REQUESTS (each followed by a Ping) on an urgent connection; returns what came back
    (decoded and raw), the source's report, its session's statistics, and how many runs C answered."""
    source = PostcopySource([SourceBlock.from_path("ram", image)], answer_in_c=answer_in_c)
    in_c = []
    try:
        address = await source.listen("127.0.0.1", 0)
        urgent = Urgent(*await asyncio.open_connection(*address))
        urgent.send(Hello(version=PROTOCOL_VERSION, session_id=f"answers-{answer_in_c}", role=Role.DESTINATION,
                          channel=Channel.URGENT))
        assert isinstance(await urgent.next(), Hello)
        server = source._conns[Channel.URGENT].server
        assert (server is not None) is answer_in_c  # the way asked for
        if server is not None:
            take = server.take_log
            server.take_log = lambda: in_c.extend(answers_in(log := take())) or log  # count what C sent
        if complete_first:
            urgent.send(Complete())
        start, got = len(urgent.raw), []
        for token, runs in enumerate(REQUESTS):
            urgent.send(Request(runs=tuple(PageRun(block=b, first=f, count=c) for b, f, c in runs)))
            urgent.send(Ping(token=token))
            while not isinstance(msg := await urgent.next(), Pong):
                if isinstance(msg, Pages):
                    got.append(("pages", msg.first, msg.count, msg.zeros, bytes(urgent.payloads[-1])))
                else:
                    assert isinstance(msg, Zero), msg
                    got.append(("zero", msg.first, msg.count, (), b""))
            assert msg.token == token
        urgent.writer.close()
        return got, bytes(urgent.raw[start:]), source.statistics(), source._session.statistics(), len(in_c)
    finally:
        await bounded(source.close(), "the source to close")


@pytest.mark.asyncio
async def test_c_and_python_answer_alike_and_account_alike(e2e) -> None:
    pages = 1200
    hole = range(MIN_HOLE_BYTES // PAGE, 2 * MIN_HOLE_BYTES // PAGE)
    path = os.path.join(e2e.workdir, "sparse.img")
    image = sparse_image(path, pages, hole)
    in_c, raw_c, report_c, session_c, answered_c = await answers_of(path, True)
    in_python, raw_python, report_python, session_python, answered_python = await answers_of(path, False)
    assert raw_c == raw_python  # byte for byte, Pongs included
    assert in_c == in_python
    # C answered every Request but the one with a run longer than the session hands out
    assert answered_c == sum(len(runs) for runs in REQUESTS[:-1]) and answered_python == 0
    assert report_c.pages_hole > 0 and report_c.pages_zero > report_c.pages_hole
    for name in ("pages_urgent", "pages_zero", "bytes_sent", "bytes_read", "pages_hole"):
        assert getattr(report_c, name) == getattr(report_python, name), name
    for name in ("requests", "request_runs", "pages_sent_urgent", "bytes_urgent"):
        assert getattr(session_c, name) == getattr(session_python, name), name
    asked = sum(count for runs in REQUESTS for _, _, count in runs)
    assert session_c.pages_sent_urgent == asked and session_c.requests == len(REQUESTS)
    # every page answered is the image's, page by page
    seen = 0
    for kind, first, count, zeros, payload in in_c:
        zero = {p for low, high in zip(zeros[::2], zeros[1::2]) for p in range(low, high)}
        at = 0
        for i in range(count):
            want = image[(first + i) * PAGE:(first + i + 1) * PAGE]
            if kind == "zero" or i in zero:
                assert want == bytes(PAGE), first + i
            else:
                assert payload[at:at + PAGE] == want, first + i
                at += PAGE
            seen += 1
        assert at == len(payload)
    assert seen == asked


@pytest.mark.asyncio
@pytest.mark.parametrize("answer_in_c", [True, False])
async def test_after_complete_requests_go_unanswered_either_way(e2e, answer_in_c: bool) -> None:
    """Complete ends the serving of Requests (docs/protocol.md): only the Pongs come back."""
    path = os.path.join(e2e.workdir, "sparse.img")
    sparse_image(path, 1200, range(0))
    got, raw, report, session, answered = await answers_of(path, answer_in_c, complete_first=True)
    assert got == [] and answered == 0
    assert report.pages_urgent == report.pages_zero == 0 and session.pages_sent_urgent == 0


@pytest.mark.asyncio
@pytest.mark.parametrize("answer", ["c", "python"])
async def test_the_source_command_answers_faults_either_way(e2e, answer: str) -> None:
    """`source --answer c|python`: a migration whose delegated client faults first (the sweep held
    until the faults are done), every page verified, every fault answered on the urgent channel."""
    seed, size = 1713, 8 * MiB
    pages = size // PAGE
    wanted = [p for p in range(pages) if not is_zero_page(0, p, seed)][::97]
    source = await SourceWithLog.start(e2e.procs, {"ram": e2e.image(size, seed=seed)}, "--answer", answer,
                                       sweep_after_idle=2.0)
    async with PostcopyDestination(e2e.options(source.address)) as dest:
        client = await e2e.touch_client(mode="delegated", name=f"answer-{answer}", seed=seed)
        await client.touch(wanted)
        await client.event("touched")
        report = await bounded(dest.wait_complete(), "the migration")
        result = await client.finish()
        problems = check_destination(dest, seed=seed)
    sent = await source.report()
    assert report.complete and problems == {}, problems
    assert result["exit"] == 0 and result.get("ok") and not result.get("bad_pages"), result
    assert report.pages_demand == len(wanted), report.format()
    assert sent["exit"] == 0 and sent["pages_urgent"] == len(wanted), sent


def _ask_while_locked(address: tuple[str, int], lock, pages: list[int], on_hello) -> list[tuple[int, bytes]]:
    """On a blocking connection: Hello (then ``on_hello()``), then, holding ``lock`` (the
    source's session lock) all along, one Request per page, each answer read before the next
    Request goes; returns each answer's (first page, payload) in order (a Zero's payload: zeros)."""
    import socket

    sock = socket.create_connection(address, timeout=10)  # a source that waits for the lock: a timeout
    payloads: list[bytes] = []
    decoder = Decoder(payload_sink=lambda header, nbytes: memoryview(payloads.append(bytearray(nbytes))
                                                                      or payloads[-1]))

    def next_message() -> object:
        while (event := decoder.next_event()) is None:
            decoder.receive_data(sock.recv(1 << 16))
        return event

    try:
        sock.sendall(encode(Hello(version=PROTOCOL_VERSION, session_id="locked", role=Role.DESTINATION,
                                  channel=Channel.URGENT)))
        assert isinstance(next_message(), Hello)
        on_hello()
        got = []
        with lock:
            for page in pages:
                sock.sendall(encode(Request(runs=(PageRun(block=0, first=page, count=1),))))
                msg = next_message()
                assert isinstance(msg, (Pages, Zero)) and msg.first == page, msg
                got.append((page, bytes(payloads[-1]) if isinstance(msg, Pages) else bytes(PAGE)))
        return got
    finally:
        sock.close()


@pytest.mark.asyncio
async def test_requests_are_answered_while_the_session_lock_is_held(e2e) -> None:
    """The C page server's answers are accounted off the urgent thread (on the loop thread):
    with the session's lock held all along (as the sweep's threads hold it), 50 Requests, more
    than one batch (16 answers), are each answered; once the lock is free the report counts
    every page (those still in the page server's log too), and each answer is the image's page."""
    path = os.path.join(e2e.workdir, "locked.img")
    image = sparse_image(path, 400, range(0))
    pages = list(range(3, 400, 8))[:50]
    source = PostcopySource([SourceBlock.from_path("ram", path)], answer_in_c=True)
    try:
        address = await source.listen("127.0.0.1", 0)
        servers = []
        got = await bounded(asyncio.to_thread(_ask_while_locked, address, source._lock, pages,
                                              lambda: servers.append(source._conns[Channel.URGENT].server)),
                            "the answers, the lock held")
        for page, payload in got:
            assert payload == image[page * PAGE:(page + 1) * PAGE], page
        report = source.statistics()
        assert report.pages_urgent + report.pages_zero == len(pages)
        assert report.pages_zero == sum(1 for page in pages if page % 5 == 0)
    finally:
        await bounded(source.close(), "the source to close")
    # the page server's eventfd is closed once its thread ended (the connection closed above)
    [server] = servers
    assert server.notify_fd is not None and not server._closing.alive


@pytest.mark.asyncio
@pytest.mark.parametrize("delta", [3, pytest.param(-3, marks=pytest.mark.skipif(
    os.geteuid() != 0, reason="a lower nice value needs root or CAP_SYS_NICE"))])
async def test_the_urgent_thread_runs_at_the_nice_value_asked(e2e, delta: int) -> None:
    """urgent_nice: the thread answering Requests runs at that nice value, the loop thread keeps
    its own, and the Requests are answered with the image's pages."""
    import threading

    path = os.path.join(e2e.workdir, "niced.img")
    image = sparse_image(path, 64, range(0))
    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    if not -20 <= before + delta <= 19:
        pytest.skip(f"this process runs at nice {before}: {before + delta} is no nice value")
    source = PostcopySource([SourceBlock.from_path("ram", path)], urgent_nice=before + delta)
    try:
        address = await source.listen("127.0.0.1", 0)
        urgent = Urgent(*await asyncio.open_connection(*address))
        urgent.send(Hello(version=PROTOCOL_VERSION, session_id="niced", role=Role.DESTINATION,
                          channel=Channel.URGENT))
        assert isinstance(await urgent.next(), Hello)
        for page in (7, 9, 33):
            urgent.send(Request(runs=(PageRun(block=0, first=page, count=1),)))
            msg = await urgent.next()
            assert isinstance(msg, Pages) and msg.first == page, msg
            assert bytes(urgent.payloads[-1]) == image[page * PAGE:(page + 1) * PAGE]
        thread = source._conns[Channel.URGENT].thread
        assert thread is not None and thread.native_id is not None
        assert os.getpriority(os.PRIO_PROCESS, thread.native_id) == before + delta
        assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before
        urgent.writer.close()
    finally:
        await bounded(source.close(), "the source to close")


def _task_nices(pid: int) -> list[int]:
    """The nice value of each thread of process ``pid`` (/proc/PID/task/*/stat, field 19)."""
    nices = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/stat") as f:
            nices.append(int(f.read().rsplit(")", 1)[1].split()[16]))
    return nices


@pytest.mark.asyncio
async def test_the_source_command_gives_the_urgent_thread_the_nice_value_asked(e2e) -> None:
    """`source --nice 3`: the thread answering the urgent channel, and no other, runs at nice 3
    above the process's; its answers are the image's pages."""
    path = os.path.join(e2e.workdir, "cli-niced.img")
    image = sparse_image(path, 64, range(0))
    base = os.getpriority(os.PRIO_PROCESS, 0)
    if base > 16:
        pytest.skip(f"this process runs at nice {base}: {base + 3} is no nice value")
    source = await SourceWithLog.start(e2e.procs, {"ram": path}, "--nice", str(base + 3))
    urgent, hello = await RawChannel.open(source.address, Channel.URGENT, "cli-niced")
    try:
        assert isinstance(hello, Hello)
        for page in (2, 13):
            urgent.send(Request(runs=(PageRun(block=0, first=page, count=1),)))
            msg = await urgent.next()
            assert isinstance(msg, Pages) and msg.first == page, msg
            assert bytes(urgent.payloads[-1]) == image[page * PAGE:(page + 1) * PAGE]
        nices = _task_nices(source.proc.pid)
        assert nices.count(base + 3) == 1 and nices.count(base) == len(nices) - 1, nices
    finally:
        await urgent.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("nice", [-21, 20, 1 << 40])
async def test_an_urgent_nice_that_is_no_nice_value_is_refused_at_once(e2e, nice: int) -> None:
    """urgent_nice outside -20..19 is a ValueError when the source is made, not a dead thread
    when a destination connects."""
    path = os.path.join(e2e.workdir, "refused.img")
    sparse_image(path, 8, range(0))
    block = SourceBlock.from_path("ram", path)
    try:
        with pytest.raises(ValueError, match="urgent_nice"):
            PostcopySource([block], urgent_nice=nice)
    finally:
        block.close()
