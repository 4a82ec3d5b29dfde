"""A self-served client's lane (C) on the real kernel: it steps the pager's page states exactly as
the pager's Python way does (the same pages asked for, the same ClientRequest bytes, the same
counts), wakes the threads of a Placed's runs, and leaves to the caller every message and frame
it does not take."""

from __future__ import annotations

import array
import os
import socket

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aiopostcopy import messages as m
from aiopostcopy.core.pager import ASKED, KNOWN_PLACED, NONE, Pager
from aiopostcopy.core.ramblock import BlockTable, MappingTable
from aiopostcopy.errors import RemoteProtocolError
from aiopostcopy.messages import Placed, PageRun
from aiopostcopy.transport import client_lane
from aiopostcopy.transport.client_lane import ClientLane
from aiopostcopy.transport.fdstream import BlockingControlChannel
from aiopostcopy.transport.wire import CONNECTION_CLOSED, Decoder, encode, encode_client_request, encode_placed
from aiopostcopy.uffd.events import PAGEFAULT_CODE, SLOTS

from .helpers import PAGE, Resources, read_events

pytestmark = pytest.mark.skipif(not client_lane.available(), reason="the C side is not built")

OTHER_EVENT = PAGEFAULT_CODE + 1  # any code that is not a page fault
SMALL, LARGE = 24, 8  # pages of block 0 and of block 1


class Client:
    """Two blocks mapped and registered as a self-served client maps them, a pager over them, and
    the C lane over the pager's states."""

    def __init__(self, res: Resources) -> None:
        self.mappings = [res.map(res.memfd(SMALL)), res.map(res.memfd(LARGE))]
        self.uffd = res.uffd()
        for mapping in self.mappings:
            self.uffd.register(mapping.address, mapping.length)
        self.blocks = BlockTable.from_infos((m.BlockInfo(name="ram", length=SMALL * PAGE, page_size=PAGE),
                                             m.BlockInfo(name="rom", length=LARGE * PAGE, page_size=PAGE)))
        self.pager = Pager(MappingTable.identity(self.blocks, [mapping.address for mapping in self.mappings]))
        self.lane = ClientLane(self.pager.states, self.pager.table, self.uffd.fileno(), PAGEFAULT_CODE)
        self.python = Pager(self.pager.table)  # the same client's pager alone, for the Python way


    def address(self, block: int, page: int, offset: int = 0) -> int:
        return self.mappings[block].address + page * self.blocks[block].page_size + offset

    def states(self) -> list[bytes]:
        return [bytes(states) for states in self.pager.states]

    def statistics(self) -> dict[str, int]:
        stats = self.pager.statistics()
        for name, count in self.lane.totals().items():
            stats[name] += count
        return stats


def flatten(messages: list[tuple[int, int, int]]) -> array.array:
    """``(code, address, thread id)`` messages flattened as the uffd binding flattens them."""
    slots = array.array("Q")
    for code, address, tid in messages:
        slots.extend((code, 0, address, tid) if code == PAGEFAULT_CODE else (code, address, address + PAGE, 0))
    assert SLOTS == 4
    return slots


def lane_read(client: Client, messages: list[tuple[int, int, int]]):
    slots = flatten(messages)
    taken, asked, frame, wakes, tids = client.lane.faults(slots.buffer_info()[0], len(messages))
    client.pager.lane_took(len(asked), tids)
    return taken, asked, frame, wakes


def python_read(pager: Pager, messages: list[tuple[int, int, int]]):
    """The pager's way of one read of faults (the client's ``_serve_events``)."""
    wakes = [w for code, address, tid in messages if (w := pager.fault(address, tid))]
    pages = pager.take_pages() or []
    assert pager.requests() == []  # nothing queued: every fault asked for at once
    return len(messages), pages, encode_client_request(pages) if pages else b"", wakes


def lane_placed(client: Client, data: bytes) -> int:
    buffer = bytearray(data)
    consumed, settled, runs = client.lane.placed(buffer, 0, len(buffer))
    client.pager.lane_settled(settled)
    return consumed


def test_a_read_of_faults_becomes_one_client_request_and_the_pages_asked(res) -> None:
    c = Client(res)
    taken, asked, frame, wakes = lane_read(c, [(PAGEFAULT_CODE, c.address(0, 5, 17), 7),
                                               (PAGEFAULT_CODE, c.address(0, 6), 8),
                                               (PAGEFAULT_CODE, c.address(0, 5, 99), 9),  # joins page 5
                                               (PAGEFAULT_CODE, c.address(1, 2, 3), 7)])
    assert (taken, asked, wakes) == (4, [(0, 5), (0, 6), (1, 2)], [])
    assert frame == encode_client_request(asked) == encode(m.ClientRequest(runs=(
        PageRun(block=0, first=5, count=2), PageRun(block=1, first=2, count=1))))
    assert c.states()[0][5:7] == bytes([ASKED, ASKED]) and c.states()[1][2] == ASKED
    assert c.pager.threads == {7: 2, 8: 1, 9: 1}
    stats = c.statistics()
    assert (stats["faults"], stats["joined"], stats["requested_pages"], stats["requests"]) == (4, 1, 3, 1)


def test_it_stops_at_another_event_and_at_an_address_outside_the_mappings(res) -> None:
    c = Client(res)
    taken, asked, _, _ = lane_read(c, [(PAGEFAULT_CODE, c.address(0, 1), 1), (OTHER_EVENT, c.address(0, 2), 0),
                                       (PAGEFAULT_CODE, c.address(0, 3), 1)])
    assert (taken, asked) == (1, [(0, 1)])
    outside = PAGE  # below every mapping
    taken, asked, frame, _ = lane_read(c, [(PAGEFAULT_CODE, outside, 1), (PAGEFAULT_CODE, c.address(0, 4), 1)])
    assert (taken, asked, frame) == (0, [], b"")
    assert c.states()[0][2:5] == bytes([NONE, NONE, NONE])  # left to the pager's way
    assert c.statistics()["faults"] == 1


def test_placed_frames_mark_their_pages_and_wake_a_thread_waiting_there(res) -> None:
    c = Client(res)
    toucher = res.touch(c.mappings[0], 3 * PAGE)
    (fault,) = read_events(c.uffd, 1)
    taken, asked, _, _ = lane_read(c, [(PAGEFAULT_CODE, fault.address, fault.thread_id)])
    assert asked == [(0, 3)]
    source = res.source(bytes([0x5A]) * PAGE)
    c.uffd.copy(c.address(0, 3), source, PAGE, dontwake=True)  # the service placed it; nobody woke yet
    data = encode_placed((PageRun(block=0, first=3, count=1),)) + encode_placed((PageRun(block=1, first=0, count=2),))
    assert lane_placed(c, data) == len(data)
    toucher.finish()
    assert bytes(c.mappings[0].buffer()[3 * PAGE:4 * PAGE]) == bytes([0x5A]) * PAGE
    assert c.states()[0][3] == KNOWN_PLACED and c.states()[1][:2] == bytes([KNOWN_PLACED]) * 2
    stats = c.statistics()
    assert (stats["placed_pages"], stats["wakes"]) == (3, 2)
    assert c.pager._coalescer.in_flight == 0  # the one page asked for settled


@pytest.mark.parametrize("frame, refused", [
    (encode(Placed(runs=tuple(PageRun(block=0, first=i, count=1) for i in range(16)))), False),  # > 15 runs
    (encode_placed((PageRun(block=0, first=SMALL - 1, count=2),)), True),  # past the block
    (encode_placed((PageRun(block=2, first=0, count=1),)), True),  # no such block
    (encode(m.End(complete=True)), False),  # another message
    (encode_placed((PageRun(block=0, first=1, count=1),))[:-1], False),  # not all here yet
], ids=["16 runs", "past the block", "no such block", "another message", "partial"])
def test_a_frame_it_does_not_take_is_left_whole_to_the_decoder(res, frame, refused) -> None:
    c = Client(res)
    first = encode_placed((PageRun(block=0, first=0, count=1),))
    assert lane_placed(c, first + frame) == len(first)
    assert c.states()[0][0] == KNOWN_PLACED and set(c.states()[0][1:]) == {NONE}
    if refused:  # the pager's way says why: the client rejects the service
        decoder = Decoder()
        decoder.receive_data(frame)
        with pytest.raises(RemoteProtocolError):
            c.pager.placed_runs(decoder.take_placed())


def test_placed_refuses_bounds_outside_its_buffer(res) -> None:
    c = Client(res)
    for start, end in ((2, 9), (-1, 2), (3, 2)):
        with pytest.raises(ValueError):
            c.lane.placed(bytearray(8), start, end)


def test_a_placed_page_that_faults_again_is_asked_for_again_and_its_thread_woken(res) -> None:
    c = Client(res)
    lane_read(c, [(PAGEFAULT_CODE, c.address(0, 2), 1)])
    lane_placed(c, encode_placed((PageRun(block=0, first=2, count=1),)))
    _, asked, _, wakes = lane_read(c, [(PAGEFAULT_CODE, c.address(0, 2, 9), 1)])
    assert asked == [] and wakes == [(c.address(0, 2), PAGE)]  # known placed: woken at once, forgotten
    _, asked, _, _ = lane_read(c, [(PAGEFAULT_CODE, c.address(0, 2), 1)])
    assert asked == [(0, 2)]  # dropped since, it faults again: asked for again
    assert c.statistics()["woken_at_once"] == 1


operation = st.one_of(
    st.lists(st.tuples(st.integers(0, 1), st.integers(0, SMALL - 1), st.integers(1, 3)), min_size=1, max_size=12)
    .map(lambda faults: ("read", faults)),
    st.lists(st.tuples(st.integers(0, 1), st.integers(0, SMALL - 1), st.integers(1, 3)), min_size=1, max_size=4)
    .map(lambda runs: ("placed", runs)),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(operation, min_size=1, max_size=12))
def test_the_lane_steps_the_pages_as_the_pagers_python_way_does(res, operations) -> None:
    c = Client(res)
    try:
        py = c.python
        for kind, items in operations:
            if kind == "read":
                messages = [(PAGEFAULT_CODE, c.address(block, page % c.blocks[block].pages, 5), tid)
                            for block, page, tid in items]
                assert lane_read(c, messages) == python_read(py, messages)
            else:
                runs = tuple(PageRun(block=block, first=first % c.blocks[block].pages,
                                     count=min(count, c.blocks[block].pages - first % c.blocks[block].pages))
                             for block, first, count in items)
                py.placed(runs)
                data = encode_placed(runs)
                assert lane_placed(c, data) == len(data)
            assert c.states() == [bytes(states) for states in py.states]
            assert c.statistics() == py.statistics()
            assert c.pager.threads == py.threads
            assert c.pager._coalescer.in_flight == py._coalescer.in_flight
    finally:
        res.close_all()


class Channel:
    """A client's control channel over one end of a socket pair; the service's end is ``peer``."""

    def __init__(self, res: Resources) -> None:
        ours, self.peer = socket.socketpair()
        res.fds.append(self.peer.detach())
        self.peer = socket.socket(fileno=os.dup(res.fds[-1]))
        self.channel = BlockingControlChannel(ours, send_timeout=5)

    def close(self) -> None:
        self.channel.close()
        self.peer.close()


def receiver(c: Client):
    def receive(sock: int, buffer: memoryview) -> tuple[int, int, list[int], bool]:
        got, consumed, settled, fds, truncated, _runs = c.lane.receive(sock, buffer)
        c.pager.lane_settled(settled)
        return got, consumed, fds, truncated
    return receive


def test_receive_takes_the_placed_frames_at_the_front_and_leaves_the_rest_to_the_decoder(res) -> None:
    c, ch = Client(res), Channel(res)
    try:
        lane_read(c, [(PAGEFAULT_CODE, c.address(0, 4), 1), (PAGEFAULT_CODE, c.address(1, 1), 1)])
        placed: list[tuple[int, int, int]] = []
        assert ch.channel.receive_nowait(placed, receiver(c)) == [] and placed == []  # nothing there
        ch.peer.sendall(encode_placed((PageRun(block=0, first=4, count=1),)))
        assert ch.channel.receive_nowait(placed, receiver(c)) == [] and placed == []  # taken in C
        assert c.states()[0][4] == KNOWN_PLACED and c.pager._coalescer.in_flight == 1
        end = m.End(complete=False)
        ch.peer.sendall(encode_placed((PageRun(block=1, first=1, count=1),)) + encode(end)
                        + encode_placed((PageRun(block=0, first=9, count=1),)))
        late = Placed(runs=(PageRun(block=0, first=9, count=1),))  # after another message: a message
        assert ch.channel.receive_nowait(placed, receiver(c)) == [end, late]
        assert placed == [] and c.states()[1][1] == KNOWN_PLACED and c.states()[0][9] == NONE
        assert c.pager._coalescer.in_flight == 0
    finally:
        ch.close()


def test_receive_leaves_bytes_that_bring_descriptors_and_a_partial_frame_to_the_channel(res) -> None:
    c, ch = Client(res), Channel(res)
    try:
        frame = encode_placed((PageRun(block=0, first=2, count=1),))
        with open(os.devnull, "rb") as devnull:
            socket.send_fds(ch.peer, [frame], [devnull.fileno()])
        placed: list[tuple[int, int, int]] = []
        message = Placed(runs=(PageRun(block=0, first=2, count=1),))  # a descriptor came along: a message
        assert ch.channel.receive_nowait(placed, receiver(c)) == [message]
        assert placed == [] and c.states()[0][2] == NONE and ch.channel.pending_fds == 1
        os.close(ch.channel.take_fds(1)[0])
        ch.peer.sendall(frame[:5])
        assert ch.channel.receive_nowait(placed, receiver(c)) == [] and placed == []
        ch.peer.sendall(frame[5:])  # the decoder holds a part: the channel reads the rest itself
        assert ch.channel.receive_nowait(placed, receiver(c)) == [] and placed == [(0, 2, 1)]
        assert c.states()[0][2] == NONE  # the runs are the caller's to mark (the pager's way)
        ch.peer.shutdown(socket.SHUT_WR)
        assert ch.channel.receive_nowait(placed, receiver(c)) == [CONNECTION_CLOSED]
    finally:
        ch.close()


def test_the_client_request_is_written_on_the_socket_given_and_what_it_did_not_take_is_returned(res) -> None:
    c = Client(res)
    ours, peer = socket.socketpair()
    try:
        slots = flatten([(PAGEFAULT_CODE, c.address(0, 7), 3), (PAGEFAULT_CODE, c.address(0, 8), 3)])
        taken, asked, rest, _, _ = c.lane.faults(slots.buffer_info()[0], 2, ours.fileno())
        assert (taken, asked, rest) == (2, [(0, 7), (0, 8)], b"")
        assert peer.recv(4096) == encode_client_request([(0, 7), (0, 8)])
        ours.setblocking(False)
        while True:  # fill the socket until it takes nothing more
            try:
                ours.send(b"\0" * 65536)
            except BlockingIOError:
                break
        slots = flatten([(PAGEFAULT_CODE, c.address(1, 2), 3)])
        taken, asked, rest, _, _ = c.lane.faults(slots.buffer_info()[0], 1, ours.fileno())
        assert (taken, asked, rest) == (1, [(1, 2)], encode_client_request([(1, 2)]))  # all of it left
        assert c.states()[1][2] == ASKED
    finally:
        ours.close()
        peer.close()


def test_more_descriptors_than_the_lane_takes_are_refused_and_none_is_left_open(res) -> None:
    c, ch = Client(res), Channel(res)
    try:
        r, w = os.pipe()
        try:
            socket.send_fds(ch.peer, [encode_placed((PageRun(block=0, first=2, count=1),))], [r] * 65)
        finally:
            os.close(r)
            os.close(w)
        with pytest.raises(RemoteProtocolError, match="too many file descriptors"):
            ch.channel.receive_nowait([], receiver(c))
        assert c.states()[0][2] == NONE
    finally:
        ch.close()  # closes the descriptors that came: the leak check after the test finds none
