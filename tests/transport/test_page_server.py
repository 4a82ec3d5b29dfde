"""The C page server of the source's urgent channel, over a real socket pair and real files.

It must write exactly the frames the wire codec makes of each answer (Pages with its zero
stretches, or Zero), log every run it answered, and leave every frame it does not answer,
byte for byte, to the Python decoder.
"""

from __future__ import annotations

import os
import random
import select
import socket
import struct
import threading
import time

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aiopostcopy.errors import ProtocolError
from aiopostcopy.messages import Channel, PageRun, Pages, Ping, Request, Role, Zero
from aiopostcopy.transport.page_server import (MAX_RUN, PAGE_BYTES, Answer, PageServer, Served, ServedBlock, answers_in,
                                               available)
from aiopostcopy.transport.wire import Decoder, encode, migration_allowed

pytestmark = pytest.mark.skipif(not available(), reason="the C page server is not built")

PAGE = 4096


class Rig:
    """A PageServer on one end of a socket pair, over files of pages, some all zero."""

    def __init__(self, tmp_path, pages: list[int], *, zero_every: int = 3, seed: int = 5,
                 page_size: int = PAGE, served: list[bool] | None = None, timestamps: bool = False,
                 account_idle_ms: int = 0, account_max_ms: int = 20, account_max_answers: int = 0,
                 notify: bool = False) -> None:
        self.page_size = page_size
        self.images: list[bytes] = []
        self.fds: list[int] = []
        rng = random.Random(seed)
        for index, count in enumerate(pages):
            image = b"".join(bytes(page_size) if rng.randrange(zero_every) == 0
                             else rng.randbytes(page_size) for _ in range(count))
            path = tmp_path / f"block{index}"
            path.write_bytes(image)
            self.images.append(image)
            self.fds.append(os.open(path, os.O_RDONLY))
        self.peer, ours = socket.socketpair()
        self.ours = ours
        served = served or [True] * len(pages)
        self.server = PageServer(ours.fileno(), [
            ServedBlock(fd=fd, page_size=page_size, pages=count, max_run=MAX_RUN) if ok else None
            for fd, count, ok in zip(self.fds, pages, served)], timestamps=timestamps,
            account_idle_ms=account_idle_ms, account_max_ms=account_max_ms,
            account_max_answers=account_max_answers, notify=notify)
        self.start_reading()

    def close(self) -> None:
        self.ours.close()
        self.reader.join(10)
        self.peer.close()
        for fd in self.fds:
            os.close(fd)

    def expected(self, runs: list[tuple[int, int, int]]) -> bytes:
        """The frames the wire codec makes of the answers to ``runs``."""
        out = []
        for block, first, count in runs:
            size = self.page_size
            pages = [self.images[block][(first + i) * size:(first + i + 1) * size] for i in range(count)]
            zero = [not any(page) for page in pages]
            if all(zero):
                out.append(encode(Zero(block=block, first=first, count=count)))
                continue
            bounds: list[int] = []
            for i, z in enumerate(zero):
                if z != (len(bounds) % 2 == 1):
                    bounds.append(i)
            if len(bounds) % 2:
                bounds.append(count)
            data = b"".join(page for page, z in zip(pages, zero) if not z)
            out.append(encode(Pages(block=block, first=first, count=count, zeros=tuple(bounds), data=data)))
        return b"".join(out)

    def answers(self, runs: list[tuple[int, int, int]]) -> list[Answer]:
        size = self.page_size
        return [Answer(block, first, count,
                       sum(not any(self.images[block][(first + i) * size:(first + i + 1) * size])
                           for i in range(count)),
                       len(runs) if k == 0 else 0)
                for k, (block, first, count) in enumerate(runs)]

    def start_reading(self) -> None:
        """Drain the peer's end in a thread (an answer may be larger than the socket's buffer)."""
        self.received = bytearray()
        self.arrived = threading.Condition()

        def read() -> None:
            while chunk := self.peer.recv(1 << 20):
                with self.arrived:
                    self.received += chunk
                    self.arrived.notify_all()

        self.reader = threading.Thread(target=read, daemon=True)
        self.reader.start()

    def receive(self, nbytes: int) -> bytes:
        """The next ``nbytes`` the server wrote."""
        with self.arrived:
            assert self.arrived.wait_for(lambda: len(self.received) >= nbytes, 10), bytes(self.received)
            got = bytes(self.received[:nbytes])
            del self.received[:nbytes]
        return got

    def nothing_more(self) -> bool:
        """Nothing else was written (given a moment to arrive)."""
        with self.arrived:
            return not self.arrived.wait_for(lambda: len(self.received) > 0, 0.05)


@pytest.fixture
def rig(tmp_path):
    made: list[Rig] = []

    def make(*args, **kwargs) -> Rig:
        made.append(Rig(tmp_path, *args, **kwargs))
        return made[-1]

    yield make
    for r in made:
        r.close()


def request(*runs: tuple[int, int, int]) -> bytes:
    return encode(Request(runs=tuple(PageRun(block=b, first=f, count=c) for b, f, c in runs)))


def framed(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


def raw(fields: object) -> bytes:
    return framed(msgpack.packb(fields))


def test_a_one_page_request_gets_the_pages_frame_of_that_page(rig) -> None:
    r = rig([64], zero_every=1_000_000)
    r.peer.sendall(request((0, 17, 1)))
    assert r.server.serve() is Served.ACCOUNT
    want = r.expected([(0, 17, 1)])
    assert r.receive(len(want)) == want
    assert r.server.take_answers() == [Answer(0, 17, 1, 0, 1)]
    assert r.server.take_answers() == []


def test_a_zero_page_is_answered_with_zero(rig) -> None:
    r = rig([64], zero_every=1)  # every page zero
    r.peer.sendall(request((0, 5, 1)))
    assert r.server.serve() is Served.ACCOUNT
    assert r.receive(len(encode(Zero(block=0, first=5, count=1)))) == encode(Zero(block=0, first=5, count=1))
    assert r.server.take_answers() == [Answer(0, 5, 1, 1, 1)]


@pytest.mark.parametrize("seed", range(12))
def test_requests_of_many_runs_get_the_codecs_frames_in_order(rig, seed: int) -> None:
    """Random Requests of up to 64 runs over three blocks, some pages zero, several Requests
    buffered at once: the stream is byte for byte the codec's, and the log says each run."""
    rng = random.Random(seed)
    sizes = [300, 80, 129]
    r = rig(sizes, zero_every=rng.choice((2, 3, 50)), seed=seed)
    requests = []
    for _ in range(5):
        runs, pages = [], 0
        for _ in range(rng.randint(1, 64)):
            block = rng.randrange(3)
            count = rng.randint(1, MAX_RUN) if rng.random() < 0.1 else rng.randint(1, 3)
            if pages + count > PAGE_BYTES // PAGE:
                break
            pages += count
            runs.append((block, rng.randint(0, sizes[block] - count), count))
        requests.append(runs)
    r.peer.sendall(b"".join(request(*runs) for runs in requests))
    answers: list[Answer] = []
    while len(answers) < sum(len(runs) for runs in requests):
        assert r.server.serve() is Served.ACCOUNT
        answers += r.server.take_answers()
    want = b"".join(r.expected(runs) for runs in requests)
    assert r.receive(len(want)) == want
    assert answers == [a for runs in requests for a in r.answers(runs)]
    assert r.nothing_more()


def test_a_request_for_more_than_its_staging_holds_is_declined(rig) -> None:
    r = rig([1024])
    frame = request(*[(0, i * 64, 64) for i in range(PAGE_BYTES // PAGE // 64 + 1)])
    r.peer.sendall(frame)
    assert r.server.serve() is Served.DECLINED
    assert r.server.take_rest() == frame and r.nothing_more()


def test_the_answer_decodes_to_the_files_pages(rig) -> None:
    """The wire decoder reads the answer back into exactly the pages of the file."""
    r = rig([200], zero_every=2, seed=9)
    runs = [(0, 3, 40), (0, 100, 1), (0, 150, 50)]
    r.peer.sendall(request(*runs))
    assert r.server.serve() is Served.ACCOUNT
    stream = r.receive(len(r.expected(runs)))
    decoder = Decoder(allowed=migration_allowed(Role.DESTINATION, Channel.URGENT))
    decoder.receive_data(stream)
    seen = 0
    while (msg := decoder.next_event()) is not None:
        if type(msg) is Zero:
            for page in range(msg.first, msg.first + msg.count):
                assert r.images[0][page * PAGE:(page + 1) * PAGE] == bytes(PAGE), page
                seen += 1
            continue
        assert type(msg) is Pages
        data = bytes(msg.data)
        zero = set()
        for low, high in zip(msg.zeros[::2], msg.zeros[1::2]):
            zero.update(range(low, high))
        at = 0
        for i in range(msg.count):
            page = r.images[0][(msg.first + i) * PAGE:(msg.first + i + 1) * PAGE]
            if i in zero:
                assert page == bytes(PAGE), msg.first + i
            else:
                assert data[at:at + PAGE] == page, msg.first + i
                at += PAGE
            seen += 1
        assert at == len(data)
    assert seen == sum(count for _, _, count in runs)


def test_a_request_in_pieces_is_answered_once_whole(rig) -> None:
    r = rig([64], zero_every=1_000_000)
    frame = request((0, 1, 2), (0, 9, 1))

    def dribble() -> None:
        for i in range(len(frame)):
            r.peer.send(frame[i:i + 1])

    writer = threading.Thread(target=dribble)
    writer.start()
    assert r.server.serve() is Served.ACCOUNT
    writer.join()
    want = r.expected([(0, 1, 2), (0, 9, 1)])
    assert r.receive(len(want)) == want
    assert r.server.take_answers() == r.answers([(0, 1, 2), (0, 9, 1)])


@pytest.mark.parametrize("frame", [
    encode(Ping(token=3)),                                 # another message
    request((1, 0, 1)),                                    # block not served (huge pages, say)
    request((2, 0, 1)),                                    # no such block
    request((0, 127, 2)),                                  # past the block's end
    request((0, 0, MAX_RUN + 1)),                          # longer than a run answered whole
    request(*[(0, i, 1) for i in range(65)]),              # more runs than answered at once
    raw([2, [[0, 3, 0]]]),                                 # an empty run
    raw([2, [[0, -1, 1]]]),                                # a negative page
    raw([2, [[True, 3, 1]]]),                              # a bool is not an int
    raw([2, [[0, 3, 1, 4]]]),                              # a run of four fields
    raw([2, []]),                                          # no runs
    raw([2, [[0, 3, 1]], 7]),                              # a field too many
    framed(msgpack.packb([2, [[0, 3, 1]]]) + b"\x00"),     # a byte after the message, inside the frame
])
def test_what_it_does_not_answer_is_left_whole_to_python(rig, frame: bytes) -> None:
    r = rig([128, 8], served=[True, False])
    follow = request((0, 2, 1))
    r.peer.sendall(request((0, 1, 1)) + frame + follow)
    assert r.server.serve() is Served.DECLINED  # after answering and logging the first Request
    assert r.server.take_answers() == r.answers([(0, 1, 1)])
    want = r.expected([(0, 1, 1)])
    assert r.receive(len(want)) == want and r.nothing_more()
    rest = r.server.take_rest()
    assert rest.startswith(frame) and follow.startswith(rest[len(frame):])


def test_a_non_canonical_integer_is_still_the_page_it_names(rig) -> None:
    """msgpack allows a wider encoding than needed; the decoder reads it, and so does C."""
    r = rig([64], zero_every=1_000_000)
    body = bytes([0x92, 0x02, 0x91, 0x93, 0xcd, 0x00, 0x00, 0xce, 0x00, 0x00, 0x00, 0x07, 0xcc, 0x01])
    r.peer.sendall(len(body).to_bytes(4, "big") + body)
    assert r.server.serve() is Served.ACCOUNT
    want = r.expected([(0, 7, 1)])
    assert r.receive(len(want)) == want


def test_the_end_of_the_stream_returns_what_was_left(rig) -> None:
    r = rig([64])
    partial = request((0, 1, 1))[:-2]
    r.peer.sendall(partial)
    r.peer.shutdown(socket.SHUT_WR)
    assert r.server.serve() is Served.EOF
    assert r.server.take_rest() == partial


def test_the_end_of_the_stream_after_answers_is_told_by_the_next_call(rig) -> None:
    """With answers logged the server reads on without waiting; the end of the stream it meets
    then is reported once Python has accounted the answers."""
    r = rig([64], zero_every=1_000_000)
    r.peer.sendall(request((0, 3, 1)) + request((0, 9, 2)))
    r.peer.shutdown(socket.SHUT_WR)
    assert r.server.serve() is Served.ACCOUNT
    assert r.server.take_answers() == r.answers([(0, 3, 1)]) + r.answers([(0, 9, 2)])
    assert r.server.serve() is Served.EOF
    assert r.server.take_rest() == b"" and r.server.take_answers() == []
    want = r.expected([(0, 3, 1), (0, 9, 2)])
    assert r.receive(len(want)) == want


def test_a_file_that_shrank_is_declined_and_nothing_is_sent(rig, tmp_path) -> None:
    r = rig([64], zero_every=1_000_000)
    os.truncate(tmp_path / "block0", 10 * PAGE)
    frame = request((0, 8, 4))  # pages 10 and 11 are gone
    r.peer.sendall(frame)
    assert r.server.serve() is Served.DECLINED
    assert r.server.take_rest() == frame
    assert r.server.take_answers() == [] and r.nothing_more()


def test_its_writes_wait_for_the_connections_lock(rig) -> None:
    """A writer holding the lock (a Python frame in pieces) keeps the C answer out until it is done."""
    r = rig([64], zero_every=1_000_000)
    served: list[Served] = []
    frame = request((0, 4, 1))
    with r.server.lock:
        thread = threading.Thread(target=lambda: served.append(r.server.serve()))
        thread.start()
        r.peer.sendall(frame)
        for _ in range(1000):  # until the server has received the Request
            if r.server._server.in_end == len(frame):
                break
            time.sleep(0.01)
        assert r.server._server.in_end == len(frame)
        assert thread.is_alive() and r.nothing_more()  # the answer is read and waits for the lock
        r.ours.sendall(encode(Ping(token=1)))  # this writer's frame goes first
    thread.join(10)
    assert served == [Served.ACCOUNT]
    ping = encode(Ping(token=1))
    want = r.expected([(0, 4, 1)])
    assert r.receive(len(ping) + len(want)) == ping + want


def test_a_block_of_huge_pages_is_declined(rig) -> None:
    """Pages larger than the staging (2 MiB) go the Python way, which sends them in pieces."""
    r = rig([2], page_size=2 << 20, zero_every=1_000_000)
    frame = request((0, 1, 1))
    r.peer.sendall(frame)
    assert r.server.serve() is Served.DECLINED
    assert r.server.take_rest() == frame and r.nothing_more()


def test_a_full_log_returns_to_python_before_answering_more(rig) -> None:
    """Five Requests of 64 runs in one read: four fill the log of 256 answers, Python accounts
    them, then the fifth is answered."""
    r = rig([320], zero_every=4)
    requests = [[(0, k * 64 + i, 1) for i in range(64)] for k in range(5)]
    r.peer.sendall(b"".join(request(*runs) for runs in requests))
    assert r.server.serve() is Served.ACCOUNT
    assert r.server.take_answers() == [a for runs in requests[:4] for a in r.answers(runs)]
    assert r.server.serve() is Served.ACCOUNT
    assert r.server.take_answers() == r.answers(requests[4])
    want = b"".join(r.expected(runs) for runs in requests)
    assert r.receive(len(want)) == want and r.nothing_more()


def test_shutting_the_socket_wakes_a_server_blocked_in_recv(rig) -> None:
    r = rig([8])
    served: list[Served] = []
    thread = threading.Thread(target=lambda: served.append(r.server.serve()))
    thread.start()
    time.sleep(0.05)
    r.ours.shutdown(socket.SHUT_RDWR)
    thread.join(10)
    assert served == [Served.EOF]


# ------------------------------------------------ a burst of Requests, accounted once (account_idle_ms)
# The timing bounds below are generous: they prove the wait happens and is bounded, not how fast.


def test_a_request_arriving_within_the_idle_wait_is_answered_before_returning(rig) -> None:
    """With answers logged and the socket empty, the server waits up to account_idle_ms for the
    next Request: one arriving 100 ms later is answered, and both return to Python together."""
    r = rig([64], account_idle_ms=400, account_max_ms=5000)
    start = time.monotonic()
    r.peer.sendall(request((0, 3, 1)))
    later = threading.Timer(0.1, lambda: r.peer.sendall(request((0, 9, 2))))
    later.start()
    try:
        assert r.server.serve() is Served.ACCOUNT
        elapsed = time.monotonic() - start
    finally:
        later.join(10)
    assert r.server.take_answers() == r.answers([(0, 3, 1)]) + r.answers([(0, 9, 2)])
    assert elapsed >= 0.3  # 0.1 s to the second Request, then up to 0.4 s of quiet
    for runs in ([(0, 3, 1)], [(0, 9, 2)]):
        want = r.expected(runs)
        assert r.receive(len(want)) == want
    assert r.nothing_more()


def test_requests_that_keep_coming_are_accounted_within_account_max_ms(rig) -> None:
    """A Request every 50 ms never leaves the socket quiet for account_idle_ms (1 s), yet the
    answers return to Python account_max_ms (0.2 s) after the first was logged."""
    r = rig([256], account_idle_ms=1000, account_max_ms=200)
    stop = threading.Event()
    sent: list[tuple[int, int, int]] = []

    def keep_asking() -> None:
        for page in range(256):
            sent.append((0, page, 1))
            r.peer.sendall(request((0, page, 1)))
            if stop.wait(0.05):
                return

    asker = threading.Thread(target=keep_asking)
    start = time.monotonic()
    asker.start()
    try:
        assert r.server.serve() is Served.ACCOUNT
        elapsed = time.monotonic() - start
    finally:
        stop.set()
        asker.join(10)
    answers = r.server.take_answers()
    assert elapsed < 0.9
    assert len(answers) >= 2  # several Requests answered before the return
    answered = [(a.block, a.first, a.count) for a in answers]
    assert answered == sent[:len(answers)]  # the first ones, in order, one run each
    assert answers == [a for run in answered for a in r.answers([run])]
    for run in answered:  # each answer's bytes, page by page
        want = r.expected([run])
        assert r.receive(len(want)) == want
    assert r.nothing_more()


def test_shutting_the_socket_wakes_a_server_waiting_to_account(rig) -> None:
    """The source stops the urgent thread with shutdown(SHUT_RDWR): a server waiting in recv for
    more Requests, an answer logged, returns it at once, and the end of the stream next."""
    r = rig([64], zero_every=1_000_000, account_idle_ms=5000, account_max_ms=10_000)
    served: list[Served] = []
    thread = threading.Thread(target=lambda: served.append(r.server.serve()))
    thread.start()
    r.peer.sendall(request((0, 5, 1)))
    want = r.expected([(0, 5, 1)])
    assert r.receive(len(want)) == want  # answered: now it waits for more
    time.sleep(0.1)
    assert thread.is_alive() and not served
    shut = time.monotonic()
    r.ours.shutdown(socket.SHUT_RDWR)
    thread.join(10)
    assert time.monotonic() - shut < 3
    assert served == [Served.ACCOUNT]
    assert r.server.take_answers() == r.answers([(0, 5, 1)])
    assert r.server.serve() is Served.EOF


def test_with_account_max_answers_logged_it_returns_at_once(rig) -> None:
    """Two answers logged of account_max_answers=2: no wait for a third Request (a long batch
    accounted later would hold up the Request that arrives meanwhile); one logged: it waits."""
    r = rig([64], account_idle_ms=5000, account_max_ms=10_000, account_max_answers=2)
    r.peer.sendall(request((0, 1, 1)) + request((0, 7, 3)))
    start = time.monotonic()
    assert r.server.serve() is Served.ACCOUNT
    assert time.monotonic() - start < 3
    assert r.server.take_answers() == r.answers([(0, 1, 1)]) + r.answers([(0, 7, 3)])
    want = r.expected([(0, 1, 1)]) + r.expected([(0, 7, 3)])
    assert r.receive(len(want)) == want and r.nothing_more()

    later = threading.Timer(0.2, lambda: r.peer.sendall(request((0, 20, 1))))
    r.peer.sendall(request((0, 12, 1)))
    start = time.monotonic()
    later.start()
    try:
        assert r.server.serve() is Served.ACCOUNT  # one answer logged: it waited for the second
    finally:
        later.join(10)
    assert time.monotonic() - start >= 0.15
    assert r.server.take_answers() == r.answers([(0, 12, 1)]) + r.answers([(0, 20, 1)])
    want = r.expected([(0, 12, 1)]) + r.expected([(0, 20, 1)])
    assert r.receive(len(want)) == want and r.nothing_more()


def test_a_full_log_returns_at_once_however_long_the_idle_wait(rig) -> None:
    """Four Requests of 64 runs fill the log of 256 answers: no wait for a fifth."""
    r = rig([256], zero_every=4, account_idle_ms=5000, account_max_ms=10_000)
    requests = [[(0, k * 64 + i, 1) for i in range(64)] for k in range(4)]
    r.peer.sendall(b"".join(request(*runs) for runs in requests))
    start = time.monotonic()
    assert r.server.serve() is Served.ACCOUNT
    assert time.monotonic() - start < 3
    assert r.server.take_answers() == [a for runs in requests for a in r.answers(runs)]
    want = b"".join(r.expected(runs) for runs in requests)
    assert r.receive(len(want)) == want and r.nothing_more()


def test_the_idle_wait_leaves_the_socket_as_python_reads_it(rig) -> None:
    """The wait for more Requests is the socket's SO_RCVTIMEO: once the server returns, the
    socket has none again, so a blocking read from Python (the urgent thread's own path) waits
    for its data instead of failing when the wait would have ended."""
    no_timeout = bytes(struct.calcsize("ll"))
    r = rig([64], account_idle_ms=50, account_max_ms=5000)
    r.peer.sendall(request((0, 3, 1)))
    assert r.server.serve() is Served.ACCOUNT  # answered, then waited 50 ms for more
    assert r.ours.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, len(no_timeout)) == no_timeout
    want = r.expected([(0, 3, 1)])
    assert r.receive(len(want)) == want
    later = threading.Timer(0.3, lambda: r.peer.sendall(b"after"))
    later.start()
    try:
        assert r.ours.recv(16) == b"after"  # blocking: 0.3 s, past the 50 ms wait
    finally:
        later.join(10)


def test_a_log_taken_as_bytes_reads_back_as_its_answers(rig) -> None:
    """take_log copies the log out in one piece for another thread; answers_in reads it back as
    take_answers would have, and the log is empty after it."""
    r = rig([64], timestamps=True)
    r.peer.sendall(request((0, 1, 2), (0, 9, 1)) + request((0, 20, 1)) + request((0, 30, 4)))
    assert r.server.serve() is Served.ACCOUNT
    log = r.server.take_log()
    assert r.server.take_log() == b"" and r.server.take_answers() == []
    answers = answers_in(log)
    assert [a[:5] for a in answers] == [a[:5] for a in
                                        r.answers([(0, 1, 2), (0, 9, 1)]) + r.answers([(0, 20, 1)])
                                        + r.answers([(0, 30, 4)])]
    assert all(0 < a.asked_ns <= a.sent_ns for a in answers)
    assert answers_in(b"") == []


# ------------------------------------------------ answers handed over through an eventfd (notify)


def test_with_notify_batches_are_handed_over_while_it_goes_on_serving(rig) -> None:
    """notify: a batch of account_max_answers answers is handed over by a write to the eventfd,
    not a return: ten Requests, each answered before the next is sent, while serve() runs on; the
    log taken meanwhile holds them all, in order, and the end of the stream returns EOF."""
    r = rig([64], account_idle_ms=5000, account_max_ms=60_000, account_max_answers=4, notify=True)
    served: list[Served] = []
    thread = threading.Thread(target=lambda: served.append(r.server.serve()))
    thread.start()
    asked = [(0, page, 1) for page in (3, 9, 10, 17, 20, 33, 34, 40, 41, 63)]
    for run in asked:
        r.peer.sendall(request(run))
        want = r.expected([run])
        assert r.receive(len(want)) == want
    assert select.select([r.server.notify_fd], [], [], 10)[0]  # a batch (of four or more) handed over
    assert thread.is_alive() and not served  # serving still: no return to Python for them
    log = r.server.take_notified_log()
    assert answers_in(log) == [a for run in asked for a in r.answers([run])]
    r.ours.shutdown(socket.SHUT_RDWR)
    thread.join(10)
    assert served == [Served.EOF] and r.server.take_log() == b"" and r.nothing_more()
    r.server.close_notify()
    r.server.close_notify()  # once is enough: the second does nothing


def test_with_notify_a_log_nobody_takes_still_returns_when_full(rig) -> None:
    """notify: answers nobody takes fill the log; the server then returns (a fifth Request of 64
    runs finds no room) rather than answer what it could not log, and goes on once it is taken."""
    r = rig([320], zero_every=4, account_idle_ms=5000, account_max_ms=60_000, account_max_answers=64, notify=True)
    requests = [[(0, k * 64 + i, 1) for i in range(64)] for k in range(5)]
    r.peer.sendall(b"".join(request(*runs) for runs in requests))
    assert r.server.serve() is Served.ACCOUNT  # four answered and logged: no room for the fifth's 64
    assert answers_in(r.server.take_log()) == [a for runs in requests[:4] for a in r.answers(runs)]
    served: list[Served] = []
    thread = threading.Thread(target=lambda: served.append(r.server.serve()))
    thread.start()  # room again: the fifth is answered, its batch handed over, and serving goes on
    want = b"".join(r.expected(runs) for runs in requests)
    assert r.receive(len(want)) == want and r.nothing_more()
    assert select.select([r.server.notify_fd], [], [], 10)[0] and thread.is_alive()
    r.ours.shutdown(socket.SHUT_RDWR)
    thread.join(10)
    assert served == [Served.EOF]  # the end of the stream at once: the fifth's answers were handed over
    assert answers_in(r.server.take_notified_log()) == r.answers(requests[4])
    assert r.server.serve() is Served.EOF
    r.server.close_notify()


def test_with_timestamps_each_answer_says_when_it_was_asked_and_sent(rig) -> None:
    """For the trace: CLOCK_MONOTONIC (time.monotonic_ns) when the Request was read and when its
    answer was written, the same for every run of one Request."""
    r = rig([64], timestamps=True)
    before = time.monotonic_ns()
    r.peer.sendall(request((0, 1, 2), (0, 9, 1)) + request((0, 20, 1)))
    assert r.server.serve() is Served.ACCOUNT
    after = time.monotonic_ns()
    answers = r.server.take_answers()
    assert [a[:5] for a in answers] == [a[:5] for a in r.answers([(0, 1, 2), (0, 9, 1)]) + r.answers([(0, 20, 1)])]
    assert answers[0].asked_ns == answers[1].asked_ns and answers[0].sent_ns == answers[1].sent_ns
    assert before <= answers[0].asked_ns <= answers[0].sent_ns <= answers[2].asked_ns <= answers[2].sent_ns <= after


def test_an_extension_built_from_other_sources_is_not_used() -> None:
    """A stale build (a checkout without a rebuild) is refused, and the source answers on the
    Python path, rather than failing when a destination connects."""
    import types

    from aiopostcopy.transport import page_server

    assert page_server.matches(page_server.lib)  # this build
    assert not page_server.matches(types.SimpleNamespace())  # from before PS_VERSION
    assert not page_server.matches(types.SimpleNamespace(PS_VERSION=page_server.VERSION - 1))
    assert not page_server.matches(None)


# ------------------------------------------------------- differential: C against the decoder

SIZES = (48, 5)  #: pages of the two blocks the differential rig serves

_valid_run = st.integers(0, 1).flatmap(lambda block: st.integers(0, SIZES[block] - 1).flatmap(
    lambda first: st.tuples(st.just(block), st.just(first), st.integers(1, SIZES[block] - first))))
_any_run = st.tuples(st.integers(0, 2), st.integers(0, 60), st.integers(0, 70))
_runs = st.one_of(st.lists(_valid_run, min_size=1, max_size=70),
                  st.lists(st.one_of(_valid_run, _any_run), min_size=0, max_size=70))
_requests = _runs.map(lambda runs: raw([2, [list(r) for r in runs]]))


@st.composite
def _mutated(draw) -> bytes:
    """A Request frame with bytes flipped, inserted or cut (its length prefix kept true or not)."""
    frame = bytearray(draw(_requests))
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(frame)))
        kind = draw(st.sampled_from(("flip", "insert", "cut")))
        if kind == "flip" and at < len(frame):
            frame[at] = draw(st.integers(0, 255))
        elif kind == "insert":
            frame[at:at] = bytes([draw(st.integers(0, 255))])
        elif at < len(frame):
            del frame[at]
    if draw(st.booleans()) and len(frame) >= 4:
        frame[:4] = (len(frame) - 4).to_bytes(4, "big")
    return bytes(frame)


def _decoded_requests(stream: bytes) -> list[list[tuple[int, int, int]]] | None:
    """The Requests ``stream`` holds, whole, as the source's decoder and session accept them;
    None if it holds anything else or leaves bytes over."""
    if not stream:
        return []
    decoder = Decoder(allowed=migration_allowed(Role.SOURCE, Channel.URGENT))
    requests = []
    try:
        decoder.receive_data(stream)
        while (msg := decoder.next_event()) is not None:
            if not isinstance(msg, Request):
                return None
            runs = [(run.block, run.first, run.count) for run in msg.runs]
            if any(block >= len(SIZES) or first + count > SIZES[block] for block, first, count in runs):
                return None  # the session would refuse it: Error(block)
            requests.append(runs)
    except ProtocolError:
        return None
    return None if decoder.buffered else requests


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
          deadline=None)
@given(frame=st.one_of(_requests, _mutated(), st.binary(min_size=4, max_size=40)))
def test_c_answers_only_what_the_decoder_accepts_and_leaves_the_rest_whole(tmp_path_factory, frame: bytes) -> None:
    """Every frame the C page server answers is one the Python decoder decodes as that Request of
    runs in range; every frame it declines comes back byte for byte."""
    r = Rig(tmp_path_factory.mktemp("diff"), list(SIZES), zero_every=4)
    try:
        stream = frame + encode(Ping(token=9))
        r.peer.sendall(stream)
        r.peer.shutdown(socket.SHUT_WR)
        answers: list[Answer] = []
        while r.server.serve() is Served.ACCOUNT:
            answers += r.server.take_answers()
        answers += r.server.take_answers()
        rest = r.server.take_rest()
        assert stream.endswith(rest)  # C consumes whole frames from the front, and alters nothing
        consumed = stream[:len(stream) - len(rest)]
        answered: list[list[tuple[int, int, int]]] = []
        for a in answers:
            if a.runs:
                answered.append([])
            answered[-1].append((a.block, a.first, a.count))
        # what C took is exactly Requests the decoder accepts, run for run, answered as the codec would
        assert _decoded_requests(consumed) == answered
        want = b"".join(r.expected(runs) for runs in answered)
        assert r.receive(len(want)) == want and r.nothing_more()
    finally:
        r.close()
