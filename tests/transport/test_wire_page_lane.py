"""The one-page lane: a Pages of one page and no zeros lands in the page sink's memory and is
returned as ``(block, page)``, with no message built; anything else takes the general way."""

from __future__ import annotations

import pytest

from aiopostcopy.errors import RemoteProtocolError
from aiopostcopy.messages import Complete, Pages, Ping
from aiopostcopy.transport.wire import Decoder, encode, encode_pages_header


def payload(n: int, seed: int) -> bytes:
    return bytes((i * 13 + seed) & 0xFF for i in range(n))


class Sinks:
    """Both sinks, each call recorded; the page sink declines pages of block 9."""

    def __init__(self) -> None:
        self.pages: list[tuple[int, int, int]] = []
        self.general: list[tuple[int, int, int, int]] = []
        self.page_memory = bytearray(4096)
        self.general_memory: list[bytearray] = []

    def page_sink(self, block: int, page: int, nbytes: int) -> memoryview | None:
        self.pages.append((block, page, nbytes))
        return None if block == 9 else memoryview(self.page_memory)[:nbytes]

    def payload_sink(self, msg: Pages, nbytes: int) -> memoryview:
        self.general.append((msg.block, msg.first, msg.count, nbytes))
        self.general_memory.append(bytearray(nbytes))
        return memoryview(self.general_memory[-1])


def decoder_for(sinks: Sinks) -> Decoder:
    return Decoder(payload_sink=sinks.payload_sink, page_sink=sinks.page_sink)


def test_one_page_lands_in_the_page_sink_in_order_with_messages() -> None:
    sinks, data = Sinks(), payload(4096, 1)
    decoder = decoder_for(sinks)
    decoder.receive_data(encode(Ping(token=1)) + encode(Pages(block=2, first=77, count=1, data=data))
                         + encode(Complete()))
    assert decoder.next_event() == Ping(token=1)
    assert decoder.next_event() == (2, 77)
    assert bytes(sinks.page_memory) == data  # read before the next event may reuse the memory
    assert decoder.next_event() == Complete()
    assert decoder.next_event() is None
    assert sinks.pages == [(2, 77, 4096)] and sinks.general == []


@pytest.mark.parametrize("step", [1, 5, 4095, 4100])
def test_a_page_in_pieces_is_returned_once_whole(step: int) -> None:
    sinks, data = Sinks(), payload(4096, step)
    decoder = decoder_for(sinks)
    stream, events = encode(Pages(block=0, first=3, count=1, data=data)), []
    for at in range(0, len(stream), step):
        decoder.receive_data(stream[at:at + step])
        while (event := decoder.next_event()) is not None:
            events.append(event)
            assert bytes(sinks.page_memory) == data
    assert events == [(0, 3)]
    assert decoder.buffered == 0


def test_runs_zeros_and_declined_pages_take_the_general_way() -> None:
    sinks = Sinks()
    decoder = decoder_for(sinks)
    two, one = payload(8192, 2), payload(4096, 3)
    decoder.receive_data(encode(Pages(block=1, first=0, count=2, data=two))
                         + encode(Pages(block=1, first=4, count=2, data=one, zeros=(0, 1)))
                         + encode(Pages(block=9, first=5, count=1, data=one)))
    events = []
    while (event := decoder.next_event()) is not None:
        events.append(event)
    assert events == [Pages(block=1, first=0, count=2), Pages(block=1, first=4, count=2, zeros=(0, 1)),
                      Pages(block=9, first=5, count=1)]
    assert sinks.pages == [(9, 5, 4096)]  # asked, declined
    assert sinks.general == [(1, 0, 2, 8192), (1, 4, 2, 4096), (9, 5, 1, 4096)]
    assert [bytes(b) for b in sinks.general_memory] == [two, one, one]


def test_a_refused_page_kills_the_decoder_with_the_sinks_reason() -> None:
    def refuse(block: int, page: int, nbytes: int) -> memoryview:
        raise RemoteProtocolError(f"page {page} is outside block {block}", code="block")

    decoder = Decoder(page_sink=refuse)
    decoder.receive_data(encode(Pages(block=0, first=1 << 40, count=1, data=payload(4096, 4))))
    with pytest.raises(RemoteProtocolError, match="pages refused: page 1099511627776 is outside block 0") as info:
        decoder.next_event()
    assert info.value.code == "block"
    with pytest.raises(RemoteProtocolError):
        decoder.next_event()


def test_a_bad_one_page_header_is_refused_as_before() -> None:
    sinks = Sinks()
    decoder = decoder_for(sinks)
    header = b"\x96\x03\xff\x01\x01\xcd\x10\x00\x90"  # block -1
    decoder.receive_data(len(header).to_bytes(4, "big") + header + payload(4096, 5))
    with pytest.raises(RemoteProtocolError, match="invalid Pages"):
        decoder.next_event()
    assert sinks.pages == []


def test_unread_shows_whole_frames_from_a_frame_start_and_skip_drops_them() -> None:
    first = encode_pages_header(0, 3, 1, 4096) + b"\x01" * 4096
    second = encode(Ping(token=7))
    decoder = Decoder()
    assert decoder.unread() is None  # nothing buffered
    view = decoder.get_buffer(len(first) + len(second))
    view[:len(first) + len(second)] = first + second
    decoder.buffer_updated(len(first) + len(second))
    buffer, start, end = decoder.unread()
    assert bytes(buffer[start:end]) == first + second
    decoder.skip(len(first))  # taken by a reader outside the decoder
    assert decoder.next_event() == Ping(token=7)
    assert decoder.next_event() is None and decoder.unread() is None
    with pytest.raises(ValueError):
        decoder.skip(1)


def test_unread_is_none_while_a_payload_is_due() -> None:
    frame = encode_pages_header(0, 3, 2, 8192) + b"\x02" * 8192
    decoder = Decoder(payload_sink=lambda header, nbytes: memoryview(bytearray(nbytes)))
    decoder.receive_data(frame[:100])
    assert decoder.next_event() is None  # the header is read, its payload is due
    assert decoder.unread() is None
    with pytest.raises(ValueError):
        decoder.skip(0)
    decoder.receive_data(frame[100:])
    assert type(decoder.next_event()) is Pages
