"""Decoder.take_page_request, the source's shortcut for a one-page Request: it takes exactly the
frames next_event would decode as such a Request, and leaves everything else to next_event."""

from __future__ import annotations

import msgpack
from hypothesis import given, settings
from hypothesis import strategies as st

from aiopostcopy.messages import Channel, PageRun, Ping, Request, Role
from aiopostcopy.transport.wire import Decoder, encode, encode_page_request, migration_allowed

import pytest
from aiopostcopy.errors import RemoteProtocolError


def source_urgent() -> Decoder:
    return Decoder(allowed=migration_allowed(Role.SOURCE, Channel.URGENT))


def raw(header: object) -> bytes:
    body = msgpack.packb(header)
    return len(body).to_bytes(4, "big") + body


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
    try:
        event = decoder.next_event()
    except RemoteProtocolError:
        return  # a bad frame is refused by next_event, as before
    assert event is None or type(event) is Request


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
