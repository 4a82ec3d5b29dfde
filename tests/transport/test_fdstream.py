"""The SCM_RIGHTS control channel: both drivers (asyncio and blocking) over real Unix sockets.

Each test joins the two ends with ``socket.socketpair``; descriptors passed
are real (pipes, checked by writing through them), and every descriptor a
test creates is closed by the end of it.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time

import pytest

from aiopostcopy.errors import ClosedError, RemoteProtocolError
from aiopostcopy.messages import (Accept, BlockInfo, Blocks, ClientHello, ClientMode, ClientRequest, End, Error,
                                  ErrorCode, PageRun, Placed, Register)
from aiopostcopy.transport import page_server
from aiopostcopy.transport.fdstream import MAX_FDS_PER_SENDMSG, BlockingControlChannel, ControlChannel
from aiopostcopy.transport.wire import SHORT_RUNS, ConnectionClosed, encode, encode_client_request, encode_placed

HELLO = ClientHello(version=1, pid=1, name="t", mode=ClientMode.DELEGATED)


def blocks(count: int) -> Blocks:
    return Blocks(session_id="s", blocks=tuple(BlockInfo(name=f"b{i}", length=4096, page_size=4096)
                                               for i in range(count)))


def pipes(count: int) -> list[tuple[int, int]]:
    return [os.pipe() for _ in range(count)]


def close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def assert_same_pipe(received: int, write_end: int) -> None:
    """``received`` is a duplicate of the read end whose write end is ``write_end``."""
    os.write(write_end, b"x")
    assert os.read(received, 1) == b"x"


def claim_and_check(channel: BlockingControlChannel, ends: list[tuple[int, int]]) -> None:
    """Receive until every descriptor of ``ends`` is there, check each is its pipe, close them."""
    while channel.pending_fds < len(ends):  # the last descriptors may ride on later bytes
        channel.receive_nowait()
    got = channel.take_fds(len(ends))
    for fd, (_, write_end) in zip(got, ends):
        assert_same_pipe(fd, write_end)
    close_all(got)


def blocking_pair(**options: object) -> tuple[BlockingControlChannel, BlockingControlChannel]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return (BlockingControlChannel(a, send_timeout=2.0, **options),  # type: ignore[arg-type]
            BlockingControlChannel(b, send_timeout=2.0, **options))  # type: ignore[arg-type]


def soon() -> float:
    return time.monotonic() + 5.0


def test_blocking_channel_carries_messages_and_fds_in_order() -> None:
    left, right = blocking_pair()
    ends = pipes(3)
    try:
        left.send(HELLO)
        left.send(blocks(3), [r for r, _ in ends])
        left.send(End(complete=True))
        assert right.receive(soon()) == HELLO
        assert right.receive(soon()) == blocks(3)
        assert right.pending_fds == 3
        claim_and_check(right, ends)
        assert right.receive(soon()) == End(complete=True)
        left.close()
        assert isinstance(right.receive(soon()), ConnectionClosed)
        assert right.receive_nowait() == []  # after EOF nothing more, no error
    finally:
        left.close()
        right.close()
        close_all([fd for pair in ends for fd in pair])


def test_a_frame_encoded_by_the_caller_goes_in_order_with_the_messages() -> None:
    left, right = blocking_pair()
    request = ClientRequest(runs=(PageRun(block=0, first=5, count=2), PageRun(block=1, first=9, count=1)))
    try:
        left.send(HELLO)
        left.send_frame(encode_client_request([(0, 5), (0, 6), (1, 9)]))
        left.send(End(complete=True))
        assert right.receive(soon()) == HELLO
        assert right.receive(soon()) == request
        assert right.receive(soon()) == End(complete=True)
        right.close()
        with pytest.raises(BrokenPipeError):
            left.send_frame(encode_client_request([(0, 1)]))
    finally:
        left.close()
        right.close()


def test_placed_frames_ahead_of_the_rest_are_taken_as_runs_when_asked() -> None:
    from aiopostcopy.core.control import SERVICE_SENDS

    left, right = blocking_pair(allowed=SERVICE_SENDS)
    first = Placed(runs=(PageRun(block=0, first=5, count=1),))
    second = Placed(runs=(PageRun(block=1, first=9, count=2), PageRun(block=0, first=1, count=1)))
    try:
        left.send_frame(encode_placed(first.runs))
        left.send(second)
        left.send(End(complete=True))
        left.send(first)  # after another message: built as one, in order
        placed: list[tuple[int, int, int]] = []
        assert right.receive_nowait(placed) == [End(complete=True), first]
        assert placed == [(0, 5, 1), (1, 9, 2), (0, 1, 1)]
        left.send(second)
        assert right.receive(soon()) == second  # not asked: built as always
    finally:
        left.close()
        right.close()


def test_placed_is_not_taken_with_descriptors_riding_along() -> None:
    from aiopostcopy.core.control import SERVICE_SENDS

    left, right = blocking_pair(allowed=SERVICE_SENDS)
    ends = pipes(1)
    message = Placed(runs=(PageRun(block=0, first=5, count=1),))
    try:
        left.send(message, [ends[0][0]])
        placed: list[tuple[int, int, int]] = []
        events: list[object] = []
        deadline = soon()
        while not events and time.monotonic() < deadline:
            events = right.receive_nowait(placed)
        assert events == [message] and placed == []  # the general way, which rules on the descriptor
        claim_and_check(right, ends)
    finally:
        left.close()
        right.close()
        close_all([fd for pair in ends for fd in pair])


def test_more_fds_than_one_sendmsg_carries_arrive_as_one_fifo() -> None:
    count = MAX_FDS_PER_SENDMSG + 20
    left, right = blocking_pair(max_pending_fds=count)
    ends = pipes(count)
    try:
        left.send(blocks(count), [r for r, _ in ends])
        assert right.receive(soon()) == blocks(count)
        claim_and_check(right, ends)
    finally:
        left.close()
        right.close()
        close_all([fd for pair in ends for fd in pair])


def test_fds_nobody_claims_are_closed_with_the_channel() -> None:
    left, right = blocking_pair()
    read_end, write_end = os.pipe()
    try:
        left.send(blocks(1), [read_end])
        assert right.receive(soon()) == blocks(1)
        right.close()  # the duplicate of read_end goes with it: only ours is left
        os.close(read_end)
        with pytest.raises(BrokenPipeError):
            os.write(write_end, b"x")
    finally:
        left.close()
        os.close(write_end)


def test_claiming_more_fds_than_arrived_and_hoarding_are_protocol_errors() -> None:
    left, right = blocking_pair(max_pending_fds=2)
    ends = pipes(3)
    try:
        left.send(HELLO)
        assert right.receive(soon()) == HELLO
        with pytest.raises(RemoteProtocolError, match="needs 1 file descriptors, 0 arrived"):
            right.take_fds(1)
        left.send(blocks(3), [r for r, _ in ends])
        with pytest.raises(RemoteProtocolError, match="more than 2 unclaimed|too many file descriptors"):
            right.receive(soon())
    finally:
        left.close()
        right.close()
        close_all([fd for pair in ends for fd in pair])


def test_forbidden_messages_and_use_after_close() -> None:
    left, right = blocking_pair(allowed=frozenset({ClientHello}))
    try:
        left.send(End(complete=True))
        with pytest.raises(RemoteProtocolError):
            right.receive(soon())
        left.close()
        with pytest.raises(ClosedError, match="control channel is closed"):
            left.send(HELLO)
    finally:
        left.close()
        right.close()


def test_a_peer_that_does_not_read_makes_send_time_out_and_reading_times_out_too() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    channel = BlockingControlChannel(a, send_timeout=0.05)
    big = Error(code=ErrorCode.PROTOCOL, text="x" * 4000)
    try:
        with pytest.raises(TimeoutError):
            for _ in range(10_000):  # far more than the socket buffers hold
                channel.send(big)
        with pytest.raises(TimeoutError):
            channel.receive(time.monotonic() + 0.05)
    finally:
        channel.close()
        b.close()


def test_write_fd_is_the_socket_while_nothing_waits_and_minus_one_behind_a_timed_out_frame() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    channel = BlockingControlChannel(a, send_timeout=0.05)
    big = Error(code=ErrorCode.PROTOCOL, text="x" * 4000)
    try:
        assert channel.write_fd() == a.fileno()
        with pytest.raises(TimeoutError):
            for _ in range(10_000):  # far more than the socket buffers hold: a frame stays queued
                channel.send_frame(encode(big))
        assert channel.write_fd() == -1  # a frame written now would overtake it
    finally:
        channel.close()
        b.close()
    with pytest.raises(ClosedError):
        channel.write_fd()


def test_a_peer_gone_makes_send_fail_with_an_os_error() -> None:
    left, right = blocking_pair()
    right.close()
    try:
        with pytest.raises(BrokenPipeError):
            left.send(HELLO)
    finally:
        left.close()


@pytest.mark.asyncio(loop_factories=["asyncio", "uvloop"])
async def test_asyncio_and_blocking_drivers_speak_to_each_other() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    received: list = []
    lost: asyncio.Future = asyncio.get_running_loop().create_future()
    service = ControlChannel(a, received.append, lambda exc: lost.done() or lost.set_result(exc),
                             allowed=frozenset({ClientHello, Register}))
    client = BlockingControlChannel(b, send_timeout=2.0)
    read_end, write_end = os.pipe()
    try:
        client.send(HELLO)
        client.send(Register(mappings=((0x1000, 0x1000, 0, 0),)), [read_end])
        while len(received) < 2:
            await asyncio.sleep(0.001)
        assert received == [HELLO, Register(mappings=((0x1000, 0x1000, 0, 0),))]
        (fd,) = service.take_fds(1)
        assert_same_pipe(fd, write_end)
        os.close(fd)
        service.send(Accept())
        assert await asyncio.to_thread(client.receive, soon()) == Accept()
        client.send(End(complete=True))  # not allowed from this peer: an Error, then the close
        assert isinstance(await asyncio.wait_for(lost, 5), RemoteProtocolError)
        assert not service.is_open
        answer = await asyncio.to_thread(client.receive, soon())
        assert isinstance(answer, Error) and answer.code is ErrorCode.PROTOCOL
        assert isinstance(await asyncio.to_thread(client.receive, soon()), ConnectionClosed)
    finally:
        service.close()
        client.close()
        os.close(read_end)
        os.close(write_end)


@pytest.mark.asyncio(loop_factories=["asyncio", "uvloop"])
async def test_asyncio_driver_sends_many_fds_and_large_frames_across_would_block() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    service = ControlChannel(a, lambda msg: None, lambda exc: None)
    client = BlockingControlChannel(b, send_timeout=2.0, max_pending_fds=MAX_FDS_PER_SENDMSG + 5)
    ends = pipes(MAX_FDS_PER_SENDMSG + 5)
    big = Error(code=ErrorCode.IO, text="y" * 4000)
    try:
        for _ in range(200):  # more than the socket buffer: the writer must wait for room
            service.send(big)
        service.send(blocks(len(ends)), [r for r, _ in ends])
        for _ in range(200):
            assert await asyncio.to_thread(client.receive, soon()) == big
        assert await asyncio.to_thread(client.receive, soon()) == blocks(len(ends))
        await asyncio.to_thread(claim_and_check, client, ends)
    finally:
        service.close()
        client.close()
        close_all([fd for pair in ends for fd in pair])


def test_encoded_frames_are_what_travels() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    channel = BlockingControlChannel(a, send_timeout=2.0)
    try:
        channel.send(HELLO)
        assert b.recv(1 << 16) == encode(HELLO)
    finally:
        channel.close()
        b.close()


@pytest.mark.asyncio(loop_factories=["asyncio", "uvloop"])
async def test_send_frame_goes_out_in_order_with_queued_messages_across_would_block() -> None:
    """Frames the caller encoded (send_frame) and messages (send) leave in the order given,
    also when the socket is full and everything waits for room."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    service = ControlChannel(a, lambda msg: None, lambda exc: None)
    client = BlockingControlChannel(b, send_timeout=2.0)
    big = Error(code=ErrorCode.IO, text="y" * 4000)
    sent = []
    try:
        for i in range(300):  # more than the socket buffer holds
            msg = Error(code=ErrorCode.IO, text=f"{i}" + "z" * 3000)
            if i % 2:
                service.send_frame(encode(msg))
            else:
                service.send(msg)
            sent.append(msg)
        service.send(big)
        sent.append(big)
        for msg in sent:
            assert await asyncio.to_thread(client.receive, soon()) == msg
    finally:
        service.close()
        client.close()


@pytest.mark.asyncio(loop_factories=["asyncio", "uvloop"])
async def test_bursts_of_client_requests_arrive_whole_and_in_order_across_reads() -> None:
    """More ClientRequests than one read takes in C, another message among them and a frame cut
    across two sends: each reaches its handler once, in the order sent."""
    from aiopostcopy.messages import Bye

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    events: list = []
    service = ControlChannel(a, events.append, lambda exc: None, allowed=frozenset({ClientRequest, Bye}),
                             on_client_request=events.append)
    requests = [ClientRequest(runs=(PageRun(block=i % 3, first=i, count=1 + i % 2),)) for i in range(100)]
    expected = [((r.runs[0].block, r.runs[0].first, r.runs[0].count),) for r in requests]
    expected.insert(40, Bye())
    data = b"".join(encode(r) for r in requests[:40]) + encode(Bye()) + b"".join(encode(r) for r in requests[40:])
    # where the C page server is built, the socket is read in C (ShortRuns.receive)
    assert (service._client_request_reader is not None) == page_server.available()
    try:
        b.sendall(data[:-3])
        await asyncio.sleep(0.01)
        b.sendall(data[-3:])
        deadline = time.monotonic() + 10
        while len(events) < len(expected) and time.monotonic() < deadline:
            await asyncio.sleep(0.001)
        assert events == expected
    finally:
        service.close()
        b.close()


@pytest.mark.asyncio(loop_factories=["asyncio", "uvloop"])
async def test_a_handler_that_closes_the_channel_stops_the_requests_read_with_it() -> None:
    """The second of five ClientRequests read at once closes the channel: nothing after it is
    handled, the channel ends once, cleanly, and the socket is closed."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    handled: list = []
    lost: asyncio.Future = asyncio.get_running_loop().create_future()

    def on_request(runs: tuple) -> None:
        handled.append(runs)
        if len(handled) == 2:
            service.close()

    service = ControlChannel(a, lambda message: handled.append(message),
                             lambda exc: lost.done() or lost.set_result(exc),
                             allowed=frozenset({ClientRequest}), on_client_request=on_request)
    try:
        b.sendall(b"".join(encode(ClientRequest(runs=(PageRun(block=0, first=i, count=1),))) for i in range(5)))
        assert await asyncio.wait_for(lost, 5) is None
        await asyncio.sleep(0.05)  # a later read would have handled more
        assert handled == [((0, 0, 1),), ((0, 1, 1),)]
        assert not service.is_open and b.recv(16) == b""  # the service's end is closed
    finally:
        service.close()
        b.close()


@pytest.mark.asyncio(loop_factories=["asyncio", "uvloop"])
async def test_short_client_requests_take_the_shortcut_and_the_rest_on_message() -> None:
    """on_client_request gets the runs, (block, first, count), of each ClientRequest of a few runs,
    in order with the other messages, which go to on_message; a bad frame still ends the channel."""
    from aiopostcopy.messages import Bye

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    events: list = []
    lost: asyncio.Future = asyncio.get_running_loop().create_future()
    service = ControlChannel(a, events.append, lambda exc: lost.done() or lost.set_result(exc),
                             allowed=frozenset({ClientRequest, Bye}),
                             on_client_request=events.append)
    two = ClientRequest(runs=(PageRun(block=0, first=1, count=1), PageRun(block=1, first=9, count=2)))
    many = ClientRequest(runs=tuple(PageRun(block=0, first=2 * i, count=1) for i in range(SHORT_RUNS + 1)))
    try:
        b.sendall(encode(ClientRequest(runs=(PageRun(block=2, first=7, count=1),))) + encode(two)
                  + encode(many) + encode(ClientRequest(runs=(PageRun(block=0, first=(1 << 46) - 1, count=1 << 32),)))
                  + encode(Bye()))
        deadline = time.monotonic() + 10  # a channel that ended early fails here, never hangs
        while len(events) < 5 and time.monotonic() < deadline:
            await asyncio.sleep(0.001)
        assert events == [((2, 7, 1),), ((0, 1, 1), (1, 9, 2)), many, ((0, (1 << 46) - 1, 1 << 32),), Bye()]
        b.sendall(encode(End(complete=True)))  # not allowed: the channel ends, as before
        assert isinstance(await asyncio.wait_for(lost, 5), RemoteProtocolError)
    finally:
        service.close()
        b.close()


@pytest.mark.asyncio(loop_factories=["asyncio", "uvloop"])
async def test_the_c_reader_holds_no_export_of_the_channels_memoryview() -> None:
    """The C reader keeps a pointer into the channel's receive buffer between reads.  It must hold
    the bytearray, not the memoryview over it: Python 3.11's garbage collector may clear a
    memoryview others still export from (a channel caught in a cycle, say through an
    exception's traceback), and the process then crashes when the memoryview is freed."""
    if not page_server.available():
        pytest.skip("the C page server is not built: no C reader")
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    requests: list = []
    service = ControlChannel(a, lambda msg: None, lambda exc: None, allowed=frozenset({ClientRequest}),
                             on_client_request=requests.append)
    try:
        b.sendall(encode(ClientRequest(runs=(PageRun(block=0, first=7, count=1),))))
        deadline = time.monotonic() + 10
        while not requests and time.monotonic() < deadline:
            await asyncio.sleep(0.001)
        assert requests == [((0, 7, 1),)]
        reader = service._client_request_reader
        assert reader is not None and reader._view is service._received_bytes, "read by the C reader, into the bytearray"
        view = service._received
    finally:
        service.close()
        b.close()
    view.release()  # a BufferError while anything still exports from it
