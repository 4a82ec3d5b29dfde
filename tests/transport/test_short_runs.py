"""page_server.ShortRuns, the C reader of a ClientRequest (or Request) of a few runs: it takes what
the decoder's own shortcut, Decoder.take_client_request, takes, the same runs to the same byte,
and leaves the rest to the decoder."""

from __future__ import annotations

import errno
import os
import socket

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aiopostcopy.core.control import CLIENT_SENDS
from aiopostcopy.messages import LIMITS, Bye, ClientRequest, PageRun, Request
from aiopostcopy.transport import page_server
from aiopostcopy.transport.wire import SHORT_RUNS, Decoder, encode
from wire_strategies import NOT_SHORT_CLIENT_REQUESTS, raw

pytestmark = pytest.mark.skipif(not page_server.available(), reason="the C page server is not built")

RUNS = st.lists(st.tuples(st.integers(0, LIMITS.max_blocks - 1), st.integers(0, (1 << 46) - 1),
                          st.integers(1, 1 << 32)), min_size=1, max_size=SHORT_RUNS)


def both(data: bytes, code: int = ClientRequest.TYPE) -> tuple[object, object]:
    """What the C reader and the decoder's shortcut take from the front of ``data``: ``(runs, end)``."""
    reader = page_server.ShortRuns(SHORT_RUNS, LIMITS.max_blocks)
    taken_c = reader.take(bytearray(b"xy" + data), 2, 2 + len(data), code)  # not at the buffer's start
    decoder = Decoder(allowed=CLIENT_SENDS)  # what the service's control channel accepts
    decoder.receive_data(data)
    runs = decoder.take_client_request()
    unread = decoder.unread()
    return taken_c, (runs, unread[1] if unread is not None else len(data)) if runs is not None else None


@settings(max_examples=300, deadline=None)
@given(RUNS)
def test_a_short_client_request_is_taken_as_the_decoder_takes_it(runs: list[tuple[int, int, int]]) -> None:
    frame = encode(ClientRequest(runs=tuple(PageRun(block=b, first=f, count=c) for b, f, c in runs)))
    taken_c, taken_py = both(frame + encode(Bye()))
    assert taken_c == taken_py == (tuple(runs), len(frame))


def test_a_request_is_taken_only_when_asked_for_by_its_type() -> None:
    frame = encode(Request(runs=(PageRun(block=1, first=7, count=1), PageRun(block=0, first=2, count=3))))
    reader = page_server.ShortRuns(SHORT_RUNS, LIMITS.max_blocks)
    assert reader.take(bytearray(frame), 0, len(frame), Request.TYPE) == (((1, 7, 1), (0, 2, 3)), len(frame))
    assert reader.take(bytearray(frame), 0, len(frame), ClientRequest.TYPE) is None


@pytest.mark.parametrize("frame", NOT_SHORT_CLIENT_REQUESTS + [
    raw([25, [[0, 1 << 46, 1]]]),
    raw([25, [[0, 3.0, 1]]]),
    (8).to_bytes(4, "big") + msgpack.packb([25, [[0, 3, 1]]]) + b"\x00",  # a byte past the runs inside the frame
    raw([25, [[0, 2 * i, 1] for i in range(SHORT_RUNS + 1)]]),  # more runs than the shortcut takes
    # every integer in its widest form: valid msgpack, but longer than the shortcut's bound
    (31).to_bytes(4, "big") + bytes([0x92, 25, 0x91, 0x93]) + b"".join(b"\xcf" + v.to_bytes(8, "big") for v in (0, 3, 1)),
    encode(Bye()),
    b"",
])
def test_anything_else_is_left_to_the_decoder(frame: bytes) -> None:
    taken_c, _ = both(frame)
    assert taken_c is None


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=40) | st.tuples(RUNS, st.binary(max_size=3)).map(
    lambda drawn: raw([25, [list(run) for run in drawn[0]]]) + drawn[1]))
def test_whatever_the_c_reader_takes_the_decoder_takes_the_same(data: bytes) -> None:
    taken_c, taken_py = both(data)
    if taken_c is not None:
        assert taken_c == taken_py


# -- receive: one recvmsg of a real control socket, then the frames at its front ------------------

FRAMES = st.lists(st.one_of(RUNS.map(lambda runs: ClientRequest(runs=tuple(PageRun(block=b, first=f, count=c)
                                                                              for b, f, c in runs))),
                            st.just(Bye())), min_size=1, max_size=3 * page_server.RECEIVE_FRAMES)


def _pair() -> tuple[socket.socket, socket.socket]:
    service, client = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    service.setblocking(False)
    return service, client


def _receive(reader: page_server.ShortRuns, sock: socket.socket, buffer: bytearray):
    return reader.receive(sock.fileno(), buffer, ClientRequest.TYPE)


@settings(max_examples=200, deadline=None)
@given(FRAMES)
def test_receive_takes_the_short_requests_at_the_front_and_leaves_the_rest_whole(messages: list) -> None:
    """What one read takes, then what the decoder decodes of the rest, is every message in order."""
    service, client = _pair()
    try:
        data = b"".join(encode(message) for message in messages)
        client.sendall(data)
        reader = page_server.ShortRuns(SHORT_RUNS, LIMITS.max_blocks)
        buffer = bytearray(len(data) + 16)
        got, consumed, fds, truncated, frames = _receive(reader, service, buffer)
        assert (got, fds, truncated) == (len(data), [], False)
        assert len(frames) <= page_server.RECEIVE_FRAMES
        leading = 0
        for message in messages:  # the frames taken are the leading short ClientRequests, whole
            if type(message) is not ClientRequest or leading == page_server.RECEIVE_FRAMES:
                break
            leading += 1
        assert frames == [tuple((run.block, run.first, run.count) for run in message.runs)
                          for message in messages[:leading]]
        assert consumed == sum(len(encode(message)) for message in messages[:leading])
        decoder = Decoder(allowed=CLIENT_SENDS)
        if consumed < got:  # (no bytes at all would say the peer closed)
            decoder.receive_data(bytes(buffer[consumed:got]))
        rest = [decoder.next_event() for _ in range(len(messages) - leading + 1)]
        assert rest == messages[leading:] + [None]
        assert _receive(reader, service, buffer)[0] == -errno.EAGAIN  # nothing more there
    finally:
        service.close()
        client.close()


def test_receive_leaves_bytes_that_came_with_descriptors_to_the_decoder() -> None:
    service, client = _pair()
    r, w = os.pipe()
    try:
        frame = encode(ClientRequest(runs=(PageRun(block=0, first=5, count=1),)))
        socket.send_fds(client, [frame], [r, w])
        reader = page_server.ShortRuns(SHORT_RUNS, LIMITS.max_blocks)
        buffer = bytearray(4096)
        got, consumed, fds, truncated, frames = _receive(reader, service, buffer)
        assert (got, consumed, truncated, frames) == (len(frame), 0, False, [])
        assert len(fds) == 2 and all(os.fstat(fd).st_ino == os.fstat(mine).st_ino for fd, mine in zip(fds, (r, w)))
        for fd in fds:
            os.close(fd)
    finally:
        os.close(r)
        os.close(w)
        service.close()
        client.close()


def test_receive_says_when_the_peer_closed_and_keeps_a_partial_frame_for_the_decoder() -> None:
    service, client = _pair()
    try:
        frame = encode(ClientRequest(runs=(PageRun(block=3, first=9, count=2),)))
        client.sendall(frame + frame[:5])  # one whole frame and the start of the next
        reader = page_server.ShortRuns(SHORT_RUNS, LIMITS.max_blocks)
        buffer = bytearray(4096)
        got, consumed, _, _, frames = _receive(reader, service, buffer)
        assert (got, consumed, frames) == (len(frame) + 5, len(frame), [((3, 9, 2),)])
        client.close()
        assert _receive(reader, service, buffer)[:2] == (0, 0)  # EOF
    finally:
        service.close()
        client.close()
