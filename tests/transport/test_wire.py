"""Round trips, framing, limits, filtering and EOF of the wire codec."""

from __future__ import annotations

import struct

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aiopostcopy.errors import LocalProtocolError, RemoteProtocolError
from aiopostcopy.messages import (
    LIMITS, MESSAGE_TYPES, Ack, BlockInfo, Blocks, Channel, ClientHello, ClientMode, Complete, Error,
    Discard, ErrorCode, Hello, Limits, PageRun, Pages, Ping, Placed, Register, Request, Resume, Role, Zero,
)
from aiopostcopy.transport.wire import (
    CONNECTION_CLOSED, ConnectionClosed, Decoder, encode, encode_pages_header, header_budget,
    migration_allowed,
)
from wire_strategies import MESSAGES, messages


def drain(decoder: Decoder) -> list:
    events = []
    while (event := decoder.next_event()) is not None:
        events.append(event)
        if isinstance(event, ConnectionClosed):
            break
    return events


def feed_chunks(decoder: Decoder, chunks: list[bytes]) -> list:
    events = []
    for chunk in chunks:
        decoder.receive_data(chunk)
        events += drain(decoder)
    return events


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in zip(points, points[1:])]


def frame(header: object) -> bytes:
    body = msgpack.packb(header, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


@pytest.mark.parametrize("cls", list(MESSAGES), ids=lambda c: c.__name__)
@given(data=st.data())
def test_round_trip_every_type(cls: type, data: st.DataObject) -> None:
    msg = data.draw(MESSAGES[cls])
    decoder = Decoder()
    decoder.receive_data(encode(msg))
    assert decoder.next_event() == msg
    assert decoder.next_event() is None


@given(msgs=st.lists(messages, min_size=1, max_size=6), cuts=st.lists(st.integers(0, 1 << 20), max_size=12))
def test_round_trip_split_at_random_points(msgs: list, cuts: list[int]) -> None:
    stream = b"".join(map(encode, msgs))
    assert feed_chunks(Decoder(), split(stream, cuts) + [b""]) == [*msgs, CONNECTION_CLOSED]


@settings(max_examples=30)
@given(msgs=st.lists(messages, min_size=1, max_size=4))
def test_round_trip_one_byte_at_a_time(msgs: list) -> None:
    stream = b"".join(map(encode, msgs))
    chunks = [stream[i:i + 1] for i in range(len(stream))]
    assert feed_chunks(Decoder(), chunks) == msgs


@given(msgs=st.lists(messages, min_size=1, max_size=6), sizes=st.lists(st.integers(1, 5000), min_size=1))
def test_round_trip_through_get_buffer(msgs: list, sizes: list[int]) -> None:
    """The BufferedProtocol pair, mixed with receive_data, as recv_into would use it."""
    stream, decoder, events, at = b"".join(map(encode, msgs)), Decoder(), [], 0
    for i, size in enumerate(sizes * (len(stream) // len(sizes) + 1)):
        if at >= len(stream):
            break
        if i % 3 == 2:
            decoder.receive_data(stream[at:at + size])
            at += size
        else:
            buf = decoder.get_buffer(-1)
            assert len(buf) > 0
            n = min(size, len(buf), len(stream) - at)
            buf[:n] = stream[at:at + n]
            decoder.buffer_updated(n)
            at += n
        events += drain(decoder)
    assert events == msgs


def test_pages_header_plus_payload_is_the_whole_frame() -> None:
    payload = bytes(range(256)) * 16
    msg = Pages(block=2, first=7, count=1, data=payload)
    assert encode_pages_header(2, 7, 1, len(payload)) + payload == encode(msg)
    assert encode(Pages(block=2, first=7, count=1, data=memoryview(payload))) == encode(msg)


GOLDEN = [
    (Request(runs=(PageRun(block=0, first=1000, count=2),)), "00000009 92 02 91 93 00 cd03e8 02"),
    (Zero(block=1, first=5, count=3), "00000005 94 04 01 05 03"),
    (Complete(), "00000002 91 08"),
    (Error(code=ErrorCode.BLOCK, text="bad"), "0000000c 93 0c a5626c6f636b a3626164"),
]


@pytest.mark.parametrize(("msg", "hexdump"), GOLDEN)
def test_golden_bytes(msg: object, hexdump: str) -> None:
    assert encode(msg).hex() == hexdump.replace(" ", "")


def test_pages_golden_header() -> None:
    assert encode_pages_header(0, 16, 2, 8192).hex() == "00000009" "96" "03" "00" "10" "02" "cd2000" "90"
    assert encode_pages_header(0, 16, 3, 8192, (1, 2)).hex() == "0000000b" "96" "03" "00" "10" "03" "cd2000" "920102"


def test_one_huge_page_may_exceed_max_payload() -> None:
    """A 1 GiB page travels whole in one frame of its own (docs/protocol.md section 4.4.1)."""
    header = encode_pages_header(0, 3, 1, LIMITS.max_page_size)
    decoder = Decoder(payload_sink=lambda msg, nbytes: memoryview(bytearray(nbytes)))
    decoder.receive_data(header)
    decoder.receive_data(b"\1" * (1 << 20))
    assert decoder.next_event() is None  # the rest of the page is due


def test_encode_refuses() -> None:
    with pytest.raises(LocalProtocolError):
        encode(Pages(block=0, first=0, count=1))
    with pytest.raises(LocalProtocolError):
        encode(PageRun(block=0, first=0, count=1))  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError):
        encode_pages_header(0, 0, 1, 0)
    with pytest.raises(LocalProtocolError):
        encode_pages_header(0, 0, 2, LIMITS.max_payload + 1)  # more than max_payload: one page alone only
    with pytest.raises(LocalProtocolError):
        encode_pages_header(0, 0, 1, LIMITS.max_page_size + 1)
    with pytest.raises(LocalProtocolError):
        encode_pages_header(0, 0, 1, LIMITS.max_payload + 1, (0, 1))
    with pytest.raises(LocalProtocolError):
        encode_pages_header(-1, 0, 1, 4096)
    with pytest.raises(LocalProtocolError):
        encode(Error(code=ErrorCode.IO, text="x" * 100), limits=Limits(max_header=64))


WORST = {
    Hello: lambda: Hello(version=0xFFFF, session_id="\U0010ffff" * LIMITS.max_name, role=Role.DESTINATION,
                         channel=Channel.BACKGROUND, features=("\U0010ffff" * LIMITS.max_name,) * LIMITS.max_features,
                         blocks=tuple(BlockInfo(name=f"{i:04}" + "\U0010ffff" * (LIMITS.max_name - 4),
                                                length=LIMITS.max_block_length, page_size=4096)
                                      for i in range(LIMITS.max_blocks))),
    Resume: lambda: Resume(session_id="s" * LIMITS.max_name, pending=(PageRun(block=1023, first=1 << 40, count=1 << 32),)
                           * LIMITS.max_runs,
                           received=((LIMITS.max_blocks - 1, tuple(range(1 << 45, (1 << 45) + 2 * LIMITS.max_resume_runs))),)),
    Error: lambda: Error(code=ErrorCode.INTERNAL, text="\U0010ffff" * LIMITS.max_text),
    Register: lambda: Register(mappings=((1 << 63, 1 << 45, 1023, 1 << 45),) * LIMITS.max_blocks),
}


@pytest.mark.parametrize("cls", list(WORST), ids=lambda c: c.__name__)
def test_largest_valid_messages_fit_their_budget(cls: type) -> None:
    msg = WORST[cls]()
    data = encode(msg)
    assert len(data) - 4 <= header_budget(cls) <= LIMITS.max_header
    decoder = Decoder()
    decoder.receive_data(data)
    assert decoder.next_event() == msg


def test_every_budget_is_below_max_header() -> None:
    for cls in MESSAGE_TYPES.values():
        assert header_budget(cls) < LIMITS.max_header, cls


def dead_with(decoder: Decoder, data: bytes) -> RemoteProtocolError:
    decoder.receive_data(data)
    with pytest.raises(RemoteProtocolError) as first:
        drain(decoder)
    for call in (decoder.next_event, lambda: decoder.receive_data(b"x"), lambda: decoder.get_buffer(10)):
        with pytest.raises(RemoteProtocolError) as again:
            call()
        assert again.value is first.value
    return first.value


def test_allowed_filters_types() -> None:
    decoder = Decoder(allowed=frozenset({Request, Ping}))
    decoder.receive_data(encode(Ping(token=1)))
    assert decoder.next_event() == Ping(token=1)
    err = dead_with(decoder, encode(Complete()))
    assert "Complete" in str(err) and err.code == "protocol"


def test_allowed_rejects_non_messages() -> None:
    with pytest.raises(TypeError):
        Decoder(allowed=frozenset({PageRun}))


def test_disallowed_type_is_refused_before_its_header_arrives() -> None:
    decoder = Decoder(allowed=frozenset({Request}))
    big = encode(Hello(version=1, session_id="s", role=Role.SOURCE, channel=Channel.URGENT))
    dead_with(decoder, big[:6])


@pytest.mark.parametrize("header", [
    [99], [0], [2], [2, (0, 1, 1), 1], [8, 1], [3, 0, 0, 1], [12, "nope", "x"], [12, "io", b"bytes"],
    [3, 0, 0, 1, 0], [3, 0, 0, 2, LIMITS.max_payload + 1, []], [3, 0, 0, 1, LIMITS.max_page_size + 1, []],
    [3, 0, 0, 4, LIMITS.max_payload + 1, [0, 1]], [3, 0, 0, 1, -1], [3, 0, 0, 1, True],
    [7, 1.5], [20, 1, 1, "n", "bogus"], [9, {"a": 1}], [10, msgpack.ExtType(1, b"x")],
    [1, 1, "s", "source", "urgent", [], [["ram", 4096, 4095]]], [22, [[1, 2, 3]]], [21, "s", []],
    [6, "s", [[0, [5, 1]]], []], [6, "s", [[0, [0, 1]], [0, [4, 5]]], []], [2, [[0, 0, 1]] * 4097],
])
def test_invalid_headers_are_remote_errors(header: list) -> None:
    dead_with(Decoder(), frame(header))


def test_header_shape_rules() -> None:
    dead_with(Decoder(), b"\x00\x00\x00\x00")  # empty header
    dead_with(Decoder(), struct.pack(">I", LIMITS.max_header + 1))
    dead_with(Decoder(), b"\x00\x00\x00\x03\xdc\x00\x01")  # array16 instead of fixarray
    dead_with(Decoder(), b"\x00\x00\x00\x03\x91\xcc\x08")  # uint8 instead of fixint type
    dead_with(Decoder(), b"\x00\x00\x00\x03\x91\x08\xc0")  # trailing byte
    dead_with(Decoder(), b"\x00\x00\x00\x03\x92\x0a\xcd")  # truncated inside the header
    dead_with(Decoder(), b"\x00\x00\x01\x00\x92\x0a")  # Ping header longer than its budget


def test_limits_apply_per_decoder() -> None:
    small = Limits(max_header=32, max_payload=4096)
    dead_with(Decoder(limits=small), encode(Error(code=ErrorCode.IO, text="x" * 40)))
    dead_with(Decoder(limits=small), encode(Pages(block=0, first=0, count=2, data=bytes(8192))))


def test_clean_eof() -> None:
    decoder = Decoder()
    decoder.receive_data(encode(Complete()) + b"")
    decoder.receive_data(b"")
    assert decoder.next_event() == Complete()
    assert decoder.next_event() is CONNECTION_CLOSED
    assert decoder.next_event() == ConnectionClosed()
    decoder.receive_data(b"")  # EOF twice is fine
    with pytest.raises(LocalProtocolError):
        decoder.receive_data(b"more")


@pytest.mark.parametrize("cut", [1, 3, 4, 5, 8, 12, 20])
def test_eof_inside_a_frame(cut: int) -> None:
    data = encode(Pages(block=0, first=0, count=1, data=b"p" * 16))
    decoder = Decoder()
    decoder.receive_data(data[:cut])
    assert decoder.next_event() is None
    dead_with(decoder, b"")


def test_buffer_updated_checks_its_argument() -> None:
    decoder = Decoder()
    room = len(decoder.get_buffer(-1))
    with pytest.raises(ValueError):
        decoder.buffer_updated(room + 1)


def test_large_frames_grow_then_shrink_the_buffer() -> None:
    msg = Pages(block=0, first=0, count=512, data=bytes(range(256)) * 8192)
    decoder = Decoder()
    assert feed_chunks(decoder, split(encode(msg) * 2, [100, 1 << 20, 3 << 20])) == [msg, msg]
    assert decoder.buffered == 0
    assert len(decoder.get_buffer(-1)) < 1 << 20


def test_migration_allowed_sets() -> None:
    assert Request in migration_allowed(Role.SOURCE, Channel.URGENT)
    assert Request not in migration_allowed(Role.SOURCE, Channel.BACKGROUND)
    assert Pages in migration_allowed(Role.DESTINATION, Channel.BACKGROUND)
    assert all(Discard in migration_allowed(Role.DESTINATION, c) for c in Channel)  # stale copies: both
    assert Ack in migration_allowed(Role.SOURCE, Channel.BACKGROUND)
    assert Ack not in migration_allowed(Role.SOURCE, Channel.URGENT)
    assert all(Hello in migration_allowed(r, c) for r in Role for c in Channel)


def test_control_messages_round_trip() -> None:
    msgs = [ClientHello(version=1, pid=42, name="vhost", mode=ClientMode.DELEGATED),
            Blocks(session_id="s", blocks=(BlockInfo(name="ram", length=8192, page_size=4096),)),
            Register(mappings=((0x7F0000000000, 8192, 0, 0),))]
    assert feed_chunks(Decoder(), [b"".join(map(encode, msgs))]) == msgs


def test_idle_says_the_next_bytes_begin_a_frame() -> None:
    frame = encode(Placed(runs=(PageRun(block=0, first=3, count=1),)))
    decoder = Decoder()
    assert decoder.idle
    decoder.receive_data(frame[:5])
    assert not decoder.idle  # part of a frame
    decoder.receive_data(frame[5:])
    assert not decoder.idle  # a whole frame, not decoded yet
    assert decoder.next_event() == Placed(runs=(PageRun(block=0, first=3, count=1),))
    assert decoder.idle
    decoder.receive_data(b"")
    assert not decoder.idle  # after EOF nothing begins
