"""The fuzz invariant: any input decodes to messages or raises RemoteProtocolError, nothing else.

Checked fed whole and one byte at a time, with and without a payload sink,
for arbitrary bytes, for mutated valid streams and for hostile headers that
pass the two-byte prefix check and reach msgpack.
"""

from __future__ import annotations

import gc
import itertools
import struct
import tracemalloc
from collections.abc import Iterable

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aiopostcopy.errors import RemoteProtocolError
from aiopostcopy.messages import MESSAGE_TYPES, Pages
from aiopostcopy.transport.wire import ConnectionClosed, Decoder, encode
from wire_strategies import messages

ARITY = {code: 1 + len(cls.__dataclass_fields__) - 1 for code, cls in MESSAGE_TYPES.items()}


def sink(msg: object, nbytes: int) -> memoryview:
    return memoryview(bytearray(nbytes))


def page_sink(block: int, page: int, nbytes: int) -> memoryview | None:
    return None if page % 3 == 2 else memoryview(bytearray(nbytes))  # some declined: the general way


def run_decoder(chunks: Iterable[bytes], *, with_sink: bool, lane: bool = False) -> list:
    """Feed chunks then EOF; return events (a page of the one-page lane as the Pages it stands
    for); let only RemoteProtocolError escape."""
    decoder = Decoder(payload_sink=sink if with_sink else None, page_sink=page_sink if lane else None)
    events: list = []
    for chunk in itertools.chain(chunks, [b""]):
        decoder.receive_data(chunk)
        while (event := decoder.next_event()) is not None:
            if lane and type(event) is tuple:
                event = Pages(block=event[0], first=event[1], count=1)
            assert type(event) in MESSAGE_TYPES.values() or isinstance(event, ConnectionClosed)
            events.append(event)
            if isinstance(event, ConnectionClosed):
                return events
    raise AssertionError("EOF was fed but no ConnectionClosed or error came out")


def outcome(data: bytes, *, whole: bool, with_sink: bool, lane: bool = False) -> object:
    chunks = [data] if whole else (data[i:i + 1] for i in range(len(data)))
    try:
        return run_decoder(chunks, with_sink=with_sink, lane=lane)
    except RemoteProtocolError as exc:
        assert exc.code in {"protocol", "block", "version", "session", "mapping"}
        return exc.code
    finally:  # a dead decoder is a cycle (it keeps its error, whose traceback holds it): big ones one at a time
        if len(data) > 4096:
            gc.collect()


def holds_invariant(data: bytes) -> None:
    """Only messages or RemoteProtocolError, and the one-page lane changes nothing: the same
    events (its pages as the Pages they stand for) or the same refusal as the payload sink alone."""
    for whole in (True, False):
        outcome(data, whole=whole, with_sink=False)
        assert outcome(data, whole=whole, with_sink=True, lane=True) == outcome(data, whole=whole, with_sink=True)


FUZZ = settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)


@FUZZ
@given(st.binary(max_size=300))
def test_arbitrary_bytes(data: bytes) -> None:
    holds_invariant(data)


@FUZZ
@given(st.integers(0, 0xFF), st.integers(0, 0xFF), st.binary(max_size=200))
def test_arbitrary_bytes_behind_a_plausible_prefix(first: int, code: int, rest: bytes) -> None:
    header = bytes([first | 0x90 if first & 1 else first, code % 32]) + rest
    holds_invariant(struct.pack(">I", len(header)) + header)


@st.composite
def mutated_streams(draw: st.DrawFn) -> bytes:
    data = bytearray(b"".join(map(encode, draw(st.lists(messages, min_size=1, max_size=3)))))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data) - 1))
        action = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "length"]))
        if action == "flip":
            data[at] ^= draw(st.integers(1, 0xFF))
        elif action == "truncate":
            del data[at:]
        elif action == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif action == "delete":
            del data[at:at + draw(st.integers(1, 8))]
        else:
            data[at:at + 4] = struct.pack(">I", draw(st.sampled_from([0, 1, 2, 0xFFFFFFFF, 1 << 22, (1 << 22) + 1]))
                                          | draw(st.integers(0, 0xFFFF)))
        if not data:
            break
    return bytes(data)


@FUZZ
@given(mutated_streams())
def test_mutated_valid_streams(data: bytes) -> None:
    holds_invariant(data)


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1) | st.floats() | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=30,
)


@FUZZ
@given(st.sampled_from(sorted(MESSAGE_TYPES)), st.data())
def test_wrong_field_types(code: int, data: st.DataObject) -> None:
    fields = data.draw(st.lists(msgpack_values, min_size=ARITY[code] - 1, max_size=ARITY[code] - 1))
    body = msgpack.packb([code, *fields], use_bin_type=True)
    holds_invariant(struct.pack(">I", len(body)) + body)


def hostile(code: int, tail: bytes) -> bytes:
    """A header with the right two-byte prefix for ``code`` and hostile bytes after it."""
    header = bytes([0x90 + ARITY[code], code]) + tail
    return struct.pack(">I", len(header)) + header


HUGE_CLAIMS = [
    b"\xdd\xff\xff\xff\xff",  # array32 of 4G items, none present
    b"\xdf\xff\xff\xff\xff",  # map32
    b"\xdb\xff\xff\xff\xff",  # str32 of 4 GiB
    b"\xc6\xff\xff\xff\xff",  # bin32
    b"\xc9\xff\xff\xff\xff\x01",  # ext32
    b"\xdc\xff\xff" + b"\xc0" * 100,  # array16 of 65535 nils, 100 present
    b"\x91" * 5000,  # nesting deeper than msgpack's stack
    b"\xda\x40\x00" + b"a" * 0x4000,  # str16 of 16 KiB
    b"\xdc\xff\xff" + b"\x90" * 0xFFFF,  # array of 65535 empty arrays
    b"\xd6\xff\x00\x00\x00\x00",  # timestamp ext
    b"\xc1",  # never-used byte
    b"\xa2\xff\xfe",  # invalid UTF-8
    b"\xcf" + b"\xff" * 8,  # uint64 max
]


@pytest.mark.parametrize("code", [2, 6, 1, 22, 12, 3])
@pytest.mark.parametrize("tail", HUGE_CLAIMS, ids=lambda t: t[:6].hex())
def test_huge_claims_inside_the_header(code: int, tail: bytes) -> None:
    data = hostile(code, tail * 2 if code != 6 else tail)
    tracemalloc.start()
    try:
        holds_invariant(data[:2000])
        holds_invariant(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20


def test_resume_full_of_empty_arrays_is_bounded() -> None:
    """The worst amplification a Resume budget allows stays bounded by the array limit."""
    tail = b"\xa1s\xdd" + struct.pack(">I", (1 << 18) + 1) + b"\x90" * ((1 << 18) + 1) + b"\x90"
    holds_invariant(hostile(6, tail)[:100] + b"")
    with pytest.raises(RemoteProtocolError):
        run_decoder([hostile(6, tail)], with_sink=False)
