"""The reply lane (C) on the real kernel: an answer for a page whose fault the request lane sent (a
one-page Pages, or a one-page Zero once the lane has a zero page) is placed with one UFFDIO_COPY
through the faulting fd, which wakes the thread; anything else is left, unconsumed, to the decoder."""

from __future__ import annotations

import socket

import msgpack
import pytest

from aiopostcopy.core.pages import PLACED, PLACING, REQUESTED, PageStates
from aiopostcopy.core.ramblock import BlockTable, MappingTable, RAMBlock
from aiopostcopy.messages import Pages, Zero
from aiopostcopy.transport import request_lane
from aiopostcopy.transport.request_lane import RequestLane
from aiopostcopy.transport.wire import Decoder, encode, encode_pages_header
from aiopostcopy.uffd import Feature
from aiopostcopy.uffd.events import PAGEFAULT_CODE

from .helpers import PAGE, Resources, read_events

pytestmark = pytest.mark.skipif(not request_lane.available(), reason="the C side is not built")

PAGES = 8


def page_bytes(page: int) -> bytes:
    return bytes([page + 1]) * PAGE


def answer(page: int, data: bytes | None = None) -> bytes:
    return encode_pages_header(0, page, 1, PAGE) + (data or page_bytes(page))


class Setup:
    """One block mapped and registered, a lane over its states, and a socket pair for Requests."""

    def __init__(self, res: Resources) -> None:
        self.res = res
        self.mapping = res.map(res.memfd(PAGES))
        self.uffd = res.uffd(Feature.THREAD_ID)
        self.uffd.register(self.mapping.address, self.mapping.length)
        blocks = BlockTable([RAMBlock(name="ram", length=PAGES * PAGE, page_size=PAGE)])
        self.states = PageStates(PAGES, PAGE)
        self.lane = RequestLane([self.states.buffer], blocks.page_sizes, PAGEFAULT_CODE)
        self.table = MappingTable.identity(blocks, [self.mapping.address])
        self.ours, self.peer = socket.socketpair()
        res.fds.extend((self.ours.detach(), self.peer.detach()))
        self.sock = res.fds[-2]

    def fault(self, *pages: int):
        """Threads fault on ``pages``; their faults are read and sent by the lane, the pages marked
        REQUESTED as the session would."""
        touchers = [self.res.touch(self.mapping, page * PAGE) for page in pages]
        events = read_events(self.uffd, len(pages))
        asked, rest = self.lane.send(self.sock, "client", self.uffd.fileno(), self.table, self.uffd.slots_address,
                                     len(events), 64)
        assert sorted(asked) == sorted((0, page) for page in pages) and rest == b""
        for page in pages:
            self.states.mark(page, 1, REQUESTED)
        return touchers

    def place(self, data: bytes, start: int = 0):
        return self.lane.place(bytearray(data), start, len(data))


@pytest.fixture
def lane(res: Resources) -> Setup:
    return Setup(res)


def test_an_answer_is_placed_through_the_faulting_fd_and_wakes_the_thread(lane) -> None:
    [toucher] = lane.fault(3)
    frame = answer(3)
    placed, consumed = lane.place(b"skip" + frame + encode(Zero(block=0, first=5, count=1)), start=4)
    assert placed == [(0, 3, lane.uffd.fileno(), lane.mapping.address + 3 * PAGE, 0)]
    assert consumed == len(frame)  # the Zero after it is left to the decoder
    assert toucher.finish() == 4
    assert bytes(lane.mapping.buffer()[3 * PAGE:4 * PAGE]) == page_bytes(3)
    assert lane.states[3] == REQUESTED  # the session marks it, not the lane


def test_several_answers_in_one_read_are_placed_in_one_call(lane) -> None:
    touchers = lane.fault(1, 6, 2)
    data = answer(6) + answer(2) + answer(1)
    placed, consumed = lane.place(data)
    assert [entry[1] for entry in placed] == [6, 2, 1] and consumed == len(data)
    assert sorted(t.finish() for t in touchers) == [2, 3, 7]


def test_a_page_not_requested_or_not_remembered_is_left_to_the_decoder(lane) -> None:
    [toucher] = lane.fault(4)
    lane.states.mark(5, 1, PLACING)  # arriving from the sweep
    assert lane.place(answer(5) + answer(4)) == ([], 0)  # stops at the first frame it does not take
    lane.states.mark(0, 1, REQUESTED)  # requested by the Python path: no fault remembered
    assert lane.place(answer(0)) == ([], 0)
    lane.lane.forget("client", lane.uffd.fileno())  # its mappings changed
    assert lane.place(answer(4)) == ([], 0)
    assert toucher.is_alive()
    lane.uffd.copy(lane.mapping.address + 4 * PAGE, lane.res.source(page_bytes(4)), PAGE)
    assert toucher.finish() == 5


def test_frames_of_other_forms_are_left_to_the_decoder(lane) -> None:
    [toucher] = lane.fault(2)
    header = msgpack.packb([3, 0, 2, 1, PAGE, []])
    long_form = b"\x96\x03\x00\xcd\x00\x02\x01\xcd\x10\x00\x90"  # page 2 as a uint16: valid, not the source's
    assert msgpack.unpackb(long_form) == [3, 0, 2, 1, PAGE, []]
    candidates = [
        len(long_form).to_bytes(4, "big") + long_form + page_bytes(2),
        encode_pages_header(0, 2, 2, PAGE, zeros=(1, 2)) + page_bytes(2),  # a run with a zero page
        encode_pages_header(0, 1, 2, 2 * PAGE) + page_bytes(1) + page_bytes(2),  # two pages
        answer(2)[:-1],  # the payload not all here yet
        len(header).to_bytes(4, "big") + header[:-1] + b"\x91",  # not the empty zeros array
        encode(Zero(block=0, first=2, count=1)),  # no zero page given to this lane
        encode_pages_header(0, 2, 1, PAGE // 2) + page_bytes(2)[:PAGE // 2],  # not a whole page
    ]
    for data in candidates:
        assert lane.place(data) == ([], 0), data[:24].hex()
    decoder = Decoder()
    decoder.receive_data(candidates[0])
    assert type(decoder.next_event()) is Pages  # the decoder takes the long form
    assert toucher.is_alive()
    assert lane.place(answer(2))[1] == len(answer(2))
    assert toucher.finish() == 3


def test_a_page_already_there_is_not_placed_again(lane) -> None:
    [toucher] = lane.fault(7)
    lane.uffd.copy(lane.mapping.address + 7 * PAGE, lane.res.source(page_bytes(7)), PAGE)  # someone else
    assert toucher.finish() == 8
    assert lane.place(answer(7, data=b"\xee" * PAGE)) == ([], 0)  # EEXIST: the decoder's way counts it
    assert bytes(lane.mapping.buffer()[7 * PAGE:8 * PAGE]) == page_bytes(7)


def test_a_placed_page_is_answered_once(lane) -> None:
    [toucher] = lane.fault(1)
    assert len(lane.place(answer(1))[0]) == 1
    assert toucher.finish() == 2
    lane.states.mark(1, 1, PLACING)
    lane.states.mark(1, 1, PLACED)
    assert lane.place(answer(1)) == ([], 0)  # a duplicate answer goes to the decoder


def test_a_page_asked_for_elsewhere_is_placed_where_it_is_remembered(lane) -> None:
    toucher = lane.res.touch(lane.mapping, 6 * PAGE)  # its fault is read by someone else
    read_events(lane.uffd, 1)
    lane.states.mark(6, 1, REQUESTED)
    assert lane.place(answer(6)) == ([], 0)  # nothing remembered for it yet
    lane.lane.remember(0, 6, lane.uffd.fileno(), lane.mapping.address + 6 * PAGE)
    lane.lane.remember(0, PAGES, lane.uffd.fileno(), lane.mapping.address)  # out of range: ignored
    assert lane.lane.remembered(lane.uffd.fileno()) == 1
    placed, consumed = lane.place(answer(6))
    assert placed == [(0, 6, lane.uffd.fileno(), lane.mapping.address + 6 * PAGE, 0)] and consumed == len(answer(6))
    assert toucher.finish() == 7


def test_a_zero_answer_is_placed_from_the_zero_page(lane) -> None:
    """A Zero of one page is copied from the lane's zero page through the faulting fd, among data
    answers; a Zero of more pages, or in another integer form, is left to the decoder."""
    with pytest.raises(ValueError):
        lane.lane.set_zero_page(lane.res.source(bytes(PAGE // 2)), PAGE // 2)
    lane.lane.set_zero_page(lane.res.source(bytes(PAGE)), PAGE)
    touchers = lane.fault(2, 3, 5)
    long_zero = b"\x94\x04\x00\xcd\x00\x05\x01"  # page 5 as a uint16: valid, not the source's
    assert msgpack.unpackb(long_zero) == [4, 0, 5, 1]
    for data in (encode(Zero(block=0, first=2, count=2)), len(long_zero).to_bytes(4, "big") + long_zero):
        assert lane.place(data) == ([], 0), data.hex()
    data = encode(Zero(block=0, first=2, count=1)) + answer(3) + encode(Zero(block=0, first=5, count=1))
    placed, consumed = lane.place(data)
    base, fd = lane.mapping.address, lane.uffd.fileno()
    assert placed == [(0, 2, fd, base + 2 * PAGE, 1), (0, 3, fd, base + 3 * PAGE, 0), (0, 5, fd, base + 5 * PAGE, 1)]
    assert consumed == len(data)
    assert sorted(t.finish() for t in touchers) == [0, 0, 4]  # a zero page reads 0 at its first byte
    memory = lane.mapping.buffer()
    assert bytes(memory[2 * PAGE:3 * PAGE]) == bytes(memory[5 * PAGE:6 * PAGE]) == bytes(PAGE)
    assert bytes(memory[3 * PAGE:4 * PAGE]) == page_bytes(3)


def test_a_page_a_self_served_client_asks_for_is_placed_at_our_address(lane) -> None:
    """ask_runs() writes the Request of a self-served client's faults (read elsewhere: by the
    client) and the reply lane places each answer through the service's own fd, at the page's
    address in the service's mapping."""
    toucher = lane.res.touch(lane.mapping, 4 * PAGE)  # the fault the client read
    read_events(lane.uffd, 1)
    lane.lane.set_own_mapping([lane.mapping.address])
    assert lane.lane.ask_runs(lane.sock, lane.uffd.fileno(), [(0, 4, 1)], 64) == ([(0, 4)], b"")
    lane.states.mark(4, 1, REQUESTED)  # the session accounts it after the lane wrote its Request
    placed, consumed = lane.place(answer(4))
    assert placed == [(0, 4, lane.uffd.fileno(), lane.mapping.address + 4 * PAGE, 0)]
    assert toucher.finish() == 5
