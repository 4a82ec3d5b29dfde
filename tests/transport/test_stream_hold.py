"""FrameProtocol.hold / release over a real socket: a held connection delivers nothing, loses nothing."""

from __future__ import annotations

import asyncio
import socket

import pytest

from aiopostcopy.messages import Ping
from aiopostcopy.transport.stream import FrameProtocol
from aiopostcopy.transport.wire import encode


@pytest.mark.asyncio(loop_factories=["asyncio", "uvloop"])
async def test_held_connection_delivers_nothing_until_released() -> None:
    loop = asyncio.get_running_loop()
    received: list[int] = []
    lost: list[object] = []
    first = asyncio.Event()
    proto_box: list[FrameProtocol] = []

    def on_message(msg: Ping) -> None:
        received.append(msg.token)
        if msg.token == 0:
            proto_box[0].hold()  # as the destination does when its staging buffers are all out
            first.set()

    ours, theirs = socket.socketpair()
    with theirs:
        transport, proto = await loop.connect_accepted_socket(
            lambda: FrameProtocol(on_message, lost.append), ours)
        proto_box.append(proto)
        theirs.sendall(b"".join(encode(Ping(token=i)) for i in range(100)))  # one write: all buffered at once
        await asyncio.wait_for(first.wait(), 5)
        await asyncio.sleep(0.05)
        assert received == [0], "messages were delivered while the connection was held"
        theirs.sendall(encode(Ping(token=100)))
        await asyncio.sleep(0.05)
        assert received == [0]
        proto.release()
        for _ in range(100):
            if len(received) == 101:
                break
            await asyncio.sleep(0.01)
        assert received == list(range(101)), "a message was lost or reordered across hold/release"
        proto.hold()
        proto.hold()  # idempotent
        proto.release()
        proto.release()
        theirs.sendall(encode(Ping(token=101)))
        for _ in range(100):
            if len(received) == 102:
                break
            await asyncio.sleep(0.01)
        assert received[-1] == 101
    transport.close()
    await asyncio.sleep(0)
    assert all(exc is None for exc in lost)
