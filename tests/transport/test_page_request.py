"""Decoder.take_page_request, the source's shortcut for a one-page Request, take_client_request,
the service's for a self-served client's ClientRequest of a few runs, and take_placed, that
client's for the Placed answering it: each takes exactly the frames next_event would decode as
such a message, and leaves everything else to next_event."""

from __future__ import annotations

import msgpack
from hypothesis import given, settings
from hypothesis import strategies as st

from aiopostcopy.messages import Bye, Channel, ClientRequest, End, PageRun, Ping, Placed, Request, Role
from aiopostcopy.transport.wire import SHORT_RUNS, Decoder, encode, encode_page_request, encode_placed, migration_allowed

import pytest
from aiopostcopy.errors import RemoteProtocolError
from wire_strategies import NOT_SHORT_CLIENT_REQUESTS, raw


def source_urgent() -> Decoder:
    return Decoder(allowed=migration_allowed(Role.SOURCE, Channel.URGENT))


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 255), st.integers(0, (1 << 46) - 1))
def test_one_page_request_is_taken(block: int, page: int) -> None:
    decoder = source_urgent()
    decoder.receive_data(encode_page_request(block, page) + encode(Ping(token=7)))
    assert decoder.take_page_request() == (block, page)
    assert decoder.take_page_request() is None  # a Ping is next: left alone
    assert decoder.next_event() == Ping(token=7)


@pytest.mark.parametrize("frame", [
    encode(Request(runs=(PageRun(block=0, first=3, count=2),))),  # two pages
    encode(Request(runs=(PageRun(block=0, first=3, count=1), PageRun(block=1, first=0, count=1)))),
    raw([2, [[True, 3, 1]]]),  # a bool is not an int
    raw([2, [[0, -1, 1]]]),
    raw([2, [[0, 1 << 46, 1]]]),
    raw([2, [[0, 3, 1, 4]]]),
    raw([2, [[0, 3, 1]]])[:-1],  # incomplete
])
def test_anything_else_is_left_to_next_event(frame: bytes) -> None:
    decoder = source_urgent()
    decoder.receive_data(frame)
    assert decoder.take_page_request() is None
    assert_next_event_decodes_or_refuses(decoder, Request)


def assert_next_event_decodes_or_refuses(decoder: Decoder, kind: type) -> None:
    """A frame a shortcut left alone: next_event decodes it as ``kind`` (or waits for the rest
    of it), or refuses it as it always did."""
    try:
        event = decoder.next_event()
    except RemoteProtocolError:
        return
    assert event is None or type(event) is kind


def test_trailing_bytes_inside_the_frame_are_not_taken() -> None:
    body = msgpack.packb([2, [[0, 3, 1]]]) + b"\x00"
    decoder = source_urgent()
    decoder.receive_data(len(body).to_bytes(4, "big") + body)
    assert decoder.take_page_request() is None
    with pytest.raises(RemoteProtocolError):
        decoder.next_event()


def test_not_taken_where_a_request_is_not_allowed() -> None:
    decoder = Decoder(allowed=migration_allowed(Role.DESTINATION, Channel.URGENT))
    decoder.receive_data(encode_page_request(0, 1))
    assert decoder.take_page_request() is None
    with pytest.raises(RemoteProtocolError):
        decoder.next_event()


def control_from_client() -> Decoder:
    from aiopostcopy.core.control import CLIENT_SENDS

    return Decoder(allowed=CLIENT_SENDS)


#: 1 to SHORT_RUNS runs anywhere a run may be: what the shortcuts take.
few_runs = st.lists(st.tuples(st.integers(0, 1023), st.integers(0, (1 << 46) - 1), st.integers(1, 1 << 32)),
                    min_size=1, max_size=SHORT_RUNS)


@settings(max_examples=200, deadline=None)
@given(few_runs)
def test_client_request_of_a_few_runs_is_taken(runs: list[tuple[int, int, int]]) -> None:
    decoder = control_from_client()
    message = ClientRequest(runs=tuple(PageRun(block=b, first=f, count=c) for b, f, c in runs))
    decoder.receive_data(encode(message) + encode(Bye()))
    assert decoder.take_page_request() is None  # not a Request
    assert decoder.take_client_request() == tuple(runs)
    assert decoder.take_client_request() is None  # a Bye is next: left alone
    assert decoder.next_event() == Bye()


def test_a_client_request_of_more_runs_is_left_to_next_event() -> None:
    decoder = control_from_client()
    message = ClientRequest(runs=tuple(PageRun(block=0, first=2 * i, count=1) for i in range(SHORT_RUNS + 1)))
    decoder.receive_data(encode(message))
    assert decoder.take_client_request() is None
    assert decoder.next_event() == message


@pytest.mark.parametrize("frame", NOT_SHORT_CLIENT_REQUESTS)
def test_anything_but_a_valid_short_client_request_is_left_to_next_event(frame: bytes) -> None:
    decoder = control_from_client()
    decoder.receive_data(frame)
    assert decoder.take_client_request() is None
    assert_next_event_decodes_or_refuses(decoder, ClientRequest)


def test_a_client_request_is_not_taken_where_it_is_not_allowed() -> None:
    decoder = source_urgent()
    decoder.receive_data(encode(ClientRequest(runs=(PageRun(block=0, first=3, count=1),))))
    assert decoder.take_client_request() is None
    with pytest.raises(RemoteProtocolError):
        decoder.next_event()


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 255), st.integers(0, (1 << 46) - 1), st.integers(1, 1 << 32)),
                min_size=1, max_size=8))
def test_encode_placed_is_what_encode_makes(runs: list[tuple[int, int, int]]) -> None:
    runs_in = tuple(PageRun(block=b, first=f, count=c) for b, f, c in runs)
    assert encode_placed(runs_in) == encode(Placed(runs=runs_in))


def control_from_service() -> Decoder:
    from aiopostcopy.core.control import SERVICE_SENDS

    return Decoder(allowed=SERVICE_SENDS)


@settings(max_examples=200, deadline=None)
@given(few_runs)
def test_placed_of_a_few_runs_is_taken(runs: list[tuple[int, int, int]]) -> None:
    decoder = control_from_service()
    message = Placed(runs=tuple(PageRun(block=b, first=f, count=c) for b, f, c in runs))
    decoder.receive_data(encode(message) + encode(message) + encode(End(complete=True)))
    assert decoder.take_client_request() is None  # not a ClientRequest
    assert decoder.take_placed() == tuple(runs)
    assert decoder.take_placed() == tuple(runs)
    assert decoder.take_placed() is None  # an End is next: left alone
    assert decoder.next_event() == End(complete=True)


@pytest.mark.parametrize("frame", [
    raw([26, [[0, 3, 1], [1024, 0, 1]]]),  # a block out of range
    raw([26, []]),
    raw([26, [[0, 3, 0]]]),
    raw([26, [[0, -1, 1]]]),
    raw([26, [[0, 3, 1]], 0]),
    raw([26, [[0, 3, 1]]])[:-1],  # incomplete
    encode(Placed(runs=tuple(PageRun(block=0, first=2 * i, count=1) for i in range(SHORT_RUNS + 1)))),
])
def test_anything_but_a_valid_short_placed_is_left_to_next_event(frame: bytes) -> None:
    decoder = control_from_service()
    decoder.receive_data(frame)
    assert decoder.take_placed() is None
    assert_next_event_decodes_or_refuses(decoder, Placed)


def test_placed_is_not_taken_where_it_is_not_allowed() -> None:
    decoder = control_from_client()  # a service does not receive Placed
    decoder.receive_data(encode(Placed(runs=(PageRun(block=0, first=3, count=1),))))
    assert decoder.take_placed() is None
    with pytest.raises(RemoteProtocolError):
        decoder.next_event()
