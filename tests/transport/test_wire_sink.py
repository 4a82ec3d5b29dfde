"""The zero-copy payload path: Pages payloads land in the caller's staging memory."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

import pytest
import uvloop
from hypothesis import given
from hypothesis import strategies as st

from aiopostcopy.errors import LocalProtocolError, RemoteProtocolError
from aiopostcopy.messages import Complete, Pages, Ping, Zero
from aiopostcopy.transport.wire import Decoder, encode, encode_pages_header


class Staging:
    """A fake staging area: one bytearray per Pages header, recorded in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int, int, int]] = []
        self.buffers: list[bytearray] = []

    def __call__(self, msg: Pages, nbytes: int) -> memoryview:
        self.calls.append((msg.block, msg.first, msg.count, nbytes))
        self.buffers.append(bytearray(nbytes))
        return memoryview(self.buffers[-1])


def payload(n: int, seed: int = 0) -> bytes:
    return bytes((i * 31 + seed) & 0xFF for i in range(n))


def collect(decoder: Decoder) -> list:
    events = []
    while (event := decoder.next_event()) is not None:
        events.append(event)
    return events


def test_header_and_payload_in_one_chunk() -> None:
    staging, data = Staging(), payload(8192)
    decoder = Decoder(payload_sink=staging)
    decoder.receive_data(encode(Pages(block=1, first=4, count=2, data=data)) + encode(Complete()))
    assert collect(decoder) == [Pages(block=1, first=4, count=2), Complete()]
    assert staging.calls == [(1, 4, 2, 8192)]
    assert bytes(staging.buffers[0]) == data


def test_many_tiny_chunks() -> None:
    staging, data = Staging(), payload(4096, 7)
    decoder = Decoder(payload_sink=staging)
    stream = encode(Pages(block=0, first=9, count=1, data=data)) * 2
    events = []
    for i in range(0, len(stream), 3):
        decoder.receive_data(stream[i:i + 3])
        events += collect(decoder)
    assert events == [Pages(block=0, first=9, count=1)] * 2
    assert [bytes(b) for b in staging.buffers] == [data, data]


def test_get_buffer_hands_out_the_sink_itself() -> None:
    staging, data = Staging(), payload(4096, 3)
    decoder = Decoder(payload_sink=staging)
    decoder.receive_data(encode_pages_header(0, 0, 1, 4096) + data[:100])
    assert decoder.next_event() is None
    view = decoder.get_buffer(-1)
    assert len(view) == 4096 - 100
    view[:50] = data[100:150]
    assert staging.buffers[0][100:150] == data[100:150]  # written in place, no copy
    decoder.buffer_updated(50)
    assert decoder.next_event() is None
    tail = decoder.get_buffer(1 << 20)
    assert len(tail) == 4096 - 150
    tail[:] = data[150:]
    decoder.buffer_updated(len(tail))
    assert decoder.next_event() == Pages(block=0, first=0, count=1)
    assert bytes(staging.buffers[0]) == data
    assert len(decoder.get_buffer(-1)) >= 4096  # back to the internal buffer


@given(sizes=st.lists(st.integers(1, 10000), min_size=1, max_size=50),
       counts=st.lists(st.integers(1, 4), min_size=1, max_size=6))
def test_mixed_stream_through_get_buffer(sizes: list[int], counts: list[int]) -> None:
    staging = Staging()
    msgs = []
    for i, count in enumerate(counts):
        msgs += [Pages(block=0, first=i, count=count, data=payload(count * 4096, i)), Zero(block=0, first=i, count=1)]
    stream, decoder, events, at = b"".join(map(encode, msgs)), Decoder(payload_sink=staging), [], 0
    i = 0
    while at < len(stream):
        size = sizes[i % len(sizes)]
        i += 1
        if i % 4 == 0:
            decoder.receive_data(stream[at:at + size])
            at += size
        else:
            buf = decoder.get_buffer(-1)
            n = min(size, len(buf), len(stream) - at)
            buf[:n] = stream[at:at + n]
            decoder.buffer_updated(n)
            at += n
        events += collect(decoder)
    expected = [Pages(block=m.block, first=m.first, count=m.count) if type(m) is Pages else m for m in msgs]
    assert events == expected
    assert [bytes(b) for b in staging.buffers] == [m.data for m in msgs if type(m) is Pages]


def test_sink_may_refuse_the_run() -> None:
    def refuse(msg: Pages, nbytes: int) -> memoryview:
        raise RemoteProtocolError("block 5 out of range", code="block")

    decoder = Decoder(payload_sink=refuse)
    decoder.receive_data(encode(Pages(block=5, first=0, count=1, data=b"x" * 4096)))
    with pytest.raises(RemoteProtocolError) as info:
        decoder.next_event()
    assert info.value.code == "block"
    with pytest.raises(RemoteProtocolError):
        decoder.next_event()


def test_sink_local_error_becomes_remote() -> None:
    def mismatch(msg: Pages, nbytes: int) -> memoryview:
        raise LocalProtocolError(f"{nbytes} != {msg.count} * 4096", code="block")

    decoder = Decoder(payload_sink=mismatch)
    decoder.receive_data(encode(Pages(block=0, first=0, count=2, data=b"x" * 4096)))
    with pytest.raises(RemoteProtocolError) as info:
        decoder.next_event()
    assert info.value.code == "block" and isinstance(info.value.__cause__, LocalProtocolError)


@pytest.mark.parametrize("bad", [b"x" * 4096, memoryview(b"x" * 4096), memoryview(bytearray(10))])
def test_sink_must_return_a_writable_view_of_the_right_size(bad: object) -> None:
    decoder = Decoder(payload_sink=lambda *args: bad)
    decoder.receive_data(encode(Pages(block=0, first=0, count=1, data=b"x" * 4096)))
    with pytest.raises(ValueError):
        decoder.next_event()


def test_eof_inside_a_sink_payload() -> None:
    decoder = Decoder(payload_sink=Staging())
    decoder.receive_data(encode(Pages(block=0, first=0, count=1, data=b"x" * 4096))[:1000])
    assert decoder.next_event() is None
    decoder.receive_data(b"")
    with pytest.raises(RemoteProtocolError):
        decoder.next_event()


def test_sink_view_of_wider_items_is_cast_to_bytes() -> None:
    store = bytearray(4096)
    decoder = Decoder(payload_sink=lambda *args: memoryview(store).cast("Q"))
    decoder.receive_data(encode(Pages(block=0, first=0, count=1, data=payload(4096))))
    assert decoder.next_event() == Pages(block=0, first=0, count=1)
    assert bytes(store) == payload(4096)


class _Receiver(asyncio.BufferedProtocol):
    def __init__(self, decoder: Decoder, done: asyncio.Future) -> None:
        self.decoder, self.done, self.events = decoder, done, []

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.decoder.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self.decoder.buffer_updated(nbytes)
        while (event := self.decoder.next_event()) is not None:
            self.events.append(event)

    def eof_received(self) -> None:
        self.decoder.receive_data(b"")
        self.events.append(self.decoder.next_event())
        self.done.set_result(None)


@pytest.mark.parametrize("loop_factory", [asyncio.new_event_loop, uvloop.new_event_loop],
                         ids=["asyncio", "uvloop"])
def test_real_socket_with_buffered_protocol(loop_factory: Callable[[], asyncio.AbstractEventLoop]) -> None:
    """recv_into writes Pages payloads straight into staging memory over a real socket."""
    swallowed: list[dict] = []

    async def main() -> tuple[list, Staging, list[bytes]]:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda loop, context: swallowed.append(context))
        ours, theirs = socket.socketpair()
        staging, done = Staging(), loop.create_future()
        transport, proto = await loop.connect_accepted_socket(
            lambda: _Receiver(Decoder(payload_sink=staging), done), ours)
        datas = [payload(4096 * (1 + i % 16), i) for i in range(200)]
        theirs.setblocking(False)
        with theirs:
            for i, data in enumerate(datas):
                await loop.sock_sendall(theirs, encode_pages_header(0, i, len(data) // 4096, len(data)))
                await loop.sock_sendall(theirs, data)
                if i % 50 == 0:
                    await loop.sock_sendall(theirs, encode(Ping(token=i)))
            theirs.shutdown(socket.SHUT_WR)
            await asyncio.wait_for(done, 10)
        transport.close()
        return proto.events, staging, datas

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        events, staging, datas = runner.run(main())
    assert not swallowed
    assert [bytes(b) for b in staging.buffers] == datas
    assert sum(type(e) is Pages for e in events) == 200 and all(e.data is None for e in events if type(e) is Pages)
    assert [e.token for e in events if type(e) is Ping] == [0, 50, 100, 150]


@pytest.mark.parametrize("zeros", [None, 0, False, [1, 2, 3]])
def test_a_pages_header_with_malformed_zeros_is_refused_before_the_sink(zeros: object) -> None:
    import msgpack

    header = msgpack.packb([3, 0, 0, 4, 4096, zeros])
    staging = Staging()
    decoder = Decoder(payload_sink=staging)
    decoder.receive_data(len(header).to_bytes(4, "big") + header + bytes(4096))
    with pytest.raises(RemoteProtocolError):
        decoder.next_event()
    assert staging.calls == []
