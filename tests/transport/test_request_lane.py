"""The destination's request lane (C): which faults it asks for, the frame it writes (the
Python encoder's, byte for byte), and what it leaves to the caller, over a real socket pair."""

from __future__ import annotations

import array
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aiopostcopy.core.pages import PLACED, PLACING, REQUESTED, PageStates
from aiopostcopy.core.ramblock import BlockTable, MappingTable, RAMBlock
from aiopostcopy.messages import Request
from aiopostcopy.transport import request_lane
from aiopostcopy.transport.request_lane import RequestLane, encode_requests
from aiopostcopy.transport.wire import Decoder, encode_page_requests
from aiopostcopy.uffd.events import PAGEFAULT_CODE, SLOTS

pytestmark = pytest.mark.skipif(not request_lane.available(), reason="the C side is not built")

PAGE = 4096
HUGE = 2 << 20
OTHER_EVENT = PAGEFAULT_CODE + 1  # any code that is not a page fault


def blocks() -> BlockTable:
    return BlockTable([RAMBlock(name="ram", length=64 * PAGE, page_size=PAGE),
                       RAMBlock(name="big", length=4 * HUGE, page_size=HUGE)])


class Lane:
    """A lane over fresh page states, a client's mapping table and one end of a socket pair."""

    def __init__(self, table: BlockTable | None = None) -> None:
        self.blocks = table or blocks()
        self.states = [PageStates(block.pages, block.page_size) for block in self.blocks]
        self.lane = RequestLane([s.buffer for s in self.states], self.blocks.page_sizes, PAGEFAULT_CODE)
        # ram at 0x10000000 (pages 0-31 only, offset 0) and 0x20000000 (pages 32-63); big at 0x40000000
        self.table = MappingTable.build(self.blocks, [(0x10000000, 32 * PAGE, 0, 0),
                                                      (0x20000000, 32 * PAGE, 0, 32 * PAGE),
                                                      (0x40000000, 4 * HUGE, 1, 0)])
        self.ours, self.peer = socket.socketpair()
        self.ours.setblocking(False)
        self.peer.settimeout(5)

    def close(self) -> None:
        self.ours.close()
        self.peer.close()

    def send(self, messages: list[tuple[int, int]], budget: int = 64, *, table: MappingTable | None = None,
             key: object = "client") -> tuple[list[tuple[int, int]], bytes]:
        """Flatten ``(code, address)`` messages as the uffd binding does, and hand them to the lane."""
        slots = array.array("Q")
        for code, address in messages:
            slots.extend((code, 0, address, 1234) if code == PAGEFAULT_CODE else (code, address, 0, 0))
        assert SLOTS == 4
        address, _ = slots.buffer_info()
        return self.lane.send(self.ours.fileno(), key, -1, table or self.table, address, len(messages), budget)

    def received(self) -> bytes:
        self.ours.setblocking(True)
        self.ours.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := self.peer.recv(65536):
            data += chunk
        return data


@pytest.fixture
def lane():
    made = Lane()
    yield made
    made.close()


def fault(address: int) -> tuple[int, int]:
    return PAGEFAULT_CODE, address


def decode_all(data: bytes) -> list[object]:
    decoder = Decoder()
    decoder.receive_data(data)
    events = []
    while (event := decoder.next_event()) is not None:
        events.append(event)
    return events


def test_the_faults_of_a_read_go_out_as_one_request_in_fault_order(lane) -> None:
    asked, rest = lane.send([fault(0x10000000 + 5 * PAGE + 17), fault(0x10000000 + 6 * PAGE),
                             fault(0x20000000 + 3 * PAGE), fault(0x40000000 + HUGE + 5)])
    assert asked == [(0, 5), (0, 6), (0, 35), (1, 1)] and rest == b""
    data = lane.received()
    assert data == encode_page_requests(asked)
    (request,) = decode_all(data)
    assert type(request) is Request
    assert [(r.block, r.first, r.count) for r in request.runs] == [(0, 5, 2), (0, 35, 1), (1, 1, 1)]


def test_it_asks_only_for_missing_pages_once_each_and_changes_no_state(lane) -> None:
    lane.states[0].mark(1, 1, REQUESTED)
    lane.states[0].mark(2, 1, PLACING)
    lane.states[0].mark(3, 1, PLACING)
    lane.states[0].mark(3, 1, PLACED)
    before = [bytes(s.buffer) for s in lane.states]
    asked, _ = lane.send([fault(0x10000000 + page * PAGE) for page in (1, 2, 3, 4, 4, 9, 4)])
    assert asked == [(0, 4), (0, 9)]
    assert [bytes(s.buffer) for s in lane.states] == before  # the session marks them, not the lane
    assert lane.received() == encode_page_requests(asked)


def test_other_events_and_unmapped_addresses_are_left_alone(lane) -> None:
    messages = [(OTHER_EVENT, 0x10000000), fault(0x10000000 - 1), fault(0x10000000 + 32 * PAGE),
                fault(0x40000000 + 4 * HUGE), fault(0), fault(2**64 - 1), fault(0x10000000 + 7 * PAGE)]
    asked, rest = lane.send(messages)
    assert asked == [(0, 7)] and rest == b""


def test_nothing_to_ask_writes_nothing(lane) -> None:
    assert lane.send([(OTHER_EVENT, 1), fault(0x10000000 - PAGE)]) == ([], b"")
    assert lane.send([fault(0x10000000)], budget=0) == ([], b"")
    assert lane.received() == b""


def test_the_budget_bounds_the_pages_asked(lane) -> None:
    asked, _ = lane.send([fault(0x10000000 + page * PAGE) for page in range(10)], budget=3)
    assert asked == [(0, 0), (0, 1), (0, 2)]
    asked, _ = lane.send([fault(0x20000000 + page * PAGE) for page in range(32)] +
                         [fault(0x10000000 + page * PAGE) for page in range(3, 32)] +
                         [fault(0x40000000 + page * HUGE) for page in range(4)], budget=1000)
    assert len(asked) == 64 and asked[-1] == (1, 2)  # one Request holds at most RQ_MAX_PAGES: (1, 3) waits
    assert lane.received() == encode_page_requests([(0, p) for p in range(3)]) + encode_page_requests(asked)


def test_a_new_table_object_for_the_key_is_used(lane) -> None:
    lane.send([fault(0x10000000)])
    moved = MappingTable.build(lane.blocks, [(0x50000000, 64 * PAGE, 0, 0)])
    assert lane.send([fault(0x10000000 + PAGE)], table=moved) == ([], b"")  # not mapped there any more
    asked, _ = lane.send([fault(0x50000000 + 8 * PAGE)], table=moved)
    assert asked == [(0, 8)]


def test_a_socket_that_takes_nothing_leaves_the_whole_frame_to_the_caller(lane) -> None:
    lane.ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    with pytest.raises(BlockingIOError):
        while True:
            lane.ours.send(b"x" * 4096)
    asked, rest = lane.send([fault(0x10000000 + 11 * PAGE)])
    assert asked == [(0, 11)]
    assert rest == encode_page_requests(asked)


def test_a_closed_peer_leaves_the_frame_to_the_caller(lane) -> None:
    lane.peer.close()
    asked, rest = lane.send([fault(0x10000000 + 12 * PAGE)])  # EPIPE, no SIGPIPE
    assert asked == [(0, 12)] and rest == encode_page_requests(asked)


OWN = 77  # a stand-in for the service's own userfaultfd number: ask_runs() only remembers it


def test_ask_runs_writes_the_request_of_missing_one_page_runs_and_remembers_each_at_our_address(lane) -> None:
    lane.lane.set_own_mapping([0x7000000000, 0x7100000000])
    lane.states[0].mark(7, 1, REQUESTED)
    lane.states[0].mark(8, 1, PLACING)
    lane.states[0].mark(8, 1, PLACED)
    runs = [(0, 9, 1), (0, 10, 1), (1, 2, 1), (0, 3, 1), (0, 9, 1),  # the second 0:9 is the same page
            (0, 7, 1), (0, 8, 1),  # requested and placed: not asked for
            (0, 20, 4),  # a run of several pages: left to the session
            (0, 64, 1), (2, 0, 1)]  # outside the blocks
    asked, rest = lane.lane.ask_runs(lane.ours.fileno(), OWN, runs, 64)
    assert asked == [(0, 9), (0, 10), (1, 2), (0, 3)] and rest == b""
    assert lane.received() == encode_page_requests(asked)
    assert lane.lane.remembered(OWN) == 4
    assert [lane.states[0][page] for page in (9, 10, 3)] == [0, 0, 0]  # it changes no state
    lane.lane.forget("own", OWN)
    assert lane.lane.remembered(OWN) == 0


def test_ask_runs_keeps_to_its_budget_and_writes_nothing_for_nothing(lane) -> None:
    asked, rest = lane.lane.ask_runs(lane.ours.fileno(), OWN, [(0, page, 1) for page in range(10)], 3)
    assert asked == [(0, 0), (0, 1), (0, 2)] and rest == b""
    lane.states[0].mark(1, 1, REQUESTED)  # as the session then makes it
    assert lane.lane.ask_runs(lane.ours.fileno(), OWN, [(0, 1, 1), (0, 5, 2)], 64) == ([], b"")
    assert lane.lane.ask_runs(lane.ours.fileno(), OWN, [(0, 11, 1)], 0) == ([], b"")  # no budget
    assert lane.received() == encode_page_requests([(0, 0), (0, 1), (0, 2)])


def test_ask_runs_leaves_what_the_socket_did_not_take(lane) -> None:
    lane.peer.close()
    asked, rest = lane.lane.ask_runs(lane.ours.fileno(), OWN, [(0, 5, 1)], 64)  # EPIPE, no SIGPIPE
    assert asked == [(0, 5)] and rest == encode_page_requests(asked)


def test_the_encoder_refuses_more_pages_than_one_request_of_the_lane_holds() -> None:
    with pytest.raises(ValueError):
        encode_requests([(0, page) for page in range(65)])


pages_strategy = st.lists(st.tuples(st.integers(0, 2**32 + 5), st.integers(0, 2**64 - 1)), min_size=1, max_size=64)
runs_strategy = st.lists(st.tuples(st.integers(0, 300), st.integers(0, 70000), st.integers(1, 70)),
                         min_size=1, max_size=20)


def test_a_page_after_the_last_possible_page_does_not_join_its_run() -> None:
    pages = [(0, 2**64 - 1), (0, 0)]  # 2**64 - 1 + 1 wraps to 0 in C
    assert encode_requests(pages) == encode_page_requests(pages)


@settings(max_examples=300, deadline=None)
@given(pages_strategy)
def test_the_c_encoder_writes_what_the_python_encoder_writes(pages) -> None:
    assert encode_requests(pages) == encode_page_requests(pages)


@settings(max_examples=200, deadline=None)
@given(runs_strategy)
def test_runs_of_consecutive_pages_are_joined_as_the_python_encoder_joins_them(runs) -> None:
    pages = [(block, first + i) for block, first, count in runs for i in range(count)][:64]
    assert encode_requests(pages) == encode_page_requests(pages)
