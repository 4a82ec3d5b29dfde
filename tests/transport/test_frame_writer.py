"""FrameWriter over a real socket pair: order, bounded queue, release, errors, flush and close."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from aiopostcopy.transport.frame_writer import FrameWriter


def _sendall(sock: socket.socket):
    def send(buffers) -> None:
        sock.sendall(b"".join(bytes(b) for b in buffers))
    return send


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "the writer's peer saw the end of the stream early"
        data += chunk
    return bytes(data)


def test_frames_arrive_whole_and_in_order_and_each_is_released_once() -> None:
    a, b = socket.socketpair()
    released: list[int] = []
    with a, b:
        writer = FrameWriter(_sendall(a), depth=2)
        frames = [bytes([i]) * (1000 + 37 * i) for i in range(200)]
        reader_data: list[bytes] = []
        reader = threading.Thread(target=lambda: reader_data.append(_read_exactly(b, sum(map(len, frames)))))
        reader.start()
        for i, frame in enumerate(frames):
            writer.put([frame[:10], memoryview(frame)[10:]], release=lambda i=i: released.append(i))
        writer.close()
        reader.join(10)
        assert reader_data == [b"".join(frames)]
        assert released == list(range(200))


def test_put_blocks_while_depth_items_wait() -> None:
    gate = threading.Event()
    written: list[bytes] = []

    def send(buffers) -> None:
        gate.wait(10)  # the connection is slow: nothing is written until the gate opens
        written.append(b"".join(buffers))

    writer = FrameWriter(send, depth=2)
    writer.put([b"0"])  # taken by the thread, blocked in send
    deadline = time.monotonic() + 5
    while not writer._busy and time.monotonic() < deadline:  # the thread holds the first item
        time.sleep(0.001)
    writer.put([b"1"])
    writer.put([b"2"])  # two wait behind the one being written: the queue is full
    third = threading.Thread(target=writer.put, args=([b"3"],))
    third.start()
    third.join(0.2)
    assert third.is_alive(), "put did not wait for room"
    gate.set()
    third.join(5)
    assert not third.is_alive()
    writer.close()
    assert written == [b"0", b"1", b"2", b"3"]


def test_flush_returns_once_everything_queued_is_written() -> None:
    a, b = socket.socketpair()
    with a, b:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        writer = FrameWriter(_sendall(a), depth=1)
        payload = b"x" * (1 << 20)  # far more than the socket holds: written while the peer reads
        got: list[bytes] = []
        reader = threading.Thread(target=lambda: got.append(_read_exactly(b, 2 * len(payload))))
        reader.start()
        writer.put([payload])
        writer.put([payload])
        writer.flush()
        a.sendall(b"after")  # the caller writes itself once flush returned: after every queued byte
        reader.join(10)
        assert got == [payload * 2]
        assert _read_exactly(b, 5) == b"after"
        writer.close()


def test_a_send_error_drops_what_is_queued_and_reaches_the_thread_that_queues() -> None:
    a, b = socket.socketpair()
    released: list[int] = []
    gate = threading.Event()
    send = _sendall(a)

    def slow_send(buffers) -> None:
        gate.wait(10)
        send(buffers)

    writer = FrameWriter(slow_send, depth=3)
    b.close()  # the peer is gone
    writer.put([b"x" * 65536], release=lambda: released.append(0))
    writer.put([b"y" * 65536], release=lambda: released.append(1))
    writer.put([b"z"], release=lambda: released.append(2))
    gate.set()
    with pytest.raises(OSError):
        writer.flush()
    assert isinstance(writer.error, OSError)
    assert sorted(released) == [0, 1, 2], "every queued item is released, written or not"
    with pytest.raises(OSError):  # a later put is refused with the same error, its item released
        writer.put([b"w"], release=lambda: released.append(3))
    assert sorted(released) == [0, 1, 2, 3]
    with pytest.raises(OSError):
        writer.close()
    a.close()


def test_wait_turn_is_called_before_each_item() -> None:
    turn = threading.Event()
    calls: list[str] = []

    def wait_turn() -> None:
        calls.append("turn")
        turn.wait(10)

    writer = FrameWriter(lambda buffers: calls.append(bytes(buffers[0]).decode()), wait_turn=wait_turn)
    writer.put([b"a"])
    time.sleep(0.05)
    assert calls == ["turn"], "an item was written before its turn"
    turn.set()
    writer.put([b"b"])
    writer.close()
    assert calls == ["turn", "a", "turn", "b"]


def test_close_writes_what_is_queued_then_refuses() -> None:
    written: list[bytes] = []
    writer = FrameWriter(lambda buffers: written.append(b"".join(buffers)), depth=4)
    for i in range(4):
        writer.put([str(i).encode()])
    writer.close()
    assert written == [b"0", b"1", b"2", b"3"]
    writer.close()  # again: nothing
    with pytest.raises(RuntimeError):
        writer.put([b"late"])


def test_depth_must_be_positive() -> None:
    with pytest.raises(ValueError):
        FrameWriter(lambda buffers: None, depth=0)


def test_on_start_runs_first_on_the_writer_thread() -> None:
    a, b = socket.socketpair()
    started: list[int] = []
    sent_from: list[int] = []
    with a, b:
        def send(buffers) -> None:
            sent_from.append(threading.get_native_id())
            a.sendall(b"".join(bytes(x) for x in buffers))
        writer = FrameWriter(send, on_start=lambda: started.append(threading.get_native_id()))
        writer.put([b"x"])
        writer.close()
        assert _read_exactly(b, 1) == b"x"
    assert len(started) == 1 and started == sent_from
    assert started[0] != threading.get_native_id()
