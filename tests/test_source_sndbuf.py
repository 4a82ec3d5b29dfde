"""The source's background send buffer follows demand: small while pages are being requested (an
urgent reply queues behind little of the sweep), larger once none was for DEMAND_QUIET seconds."""

from __future__ import annotations

import socket
import time
from types import SimpleNamespace

import pytest

from aiopostcopy.messages import Channel
from aiopostcopy.source import DEMAND_QUIET, PostcopySource, SourceBlock

PAGE = 4096


@pytest.fixture
def tcp_pair():
    with socket.create_server(("127.0.0.1", 0)) as listener:
        ours = socket.create_connection(listener.getsockname())
        theirs, _ = listener.accept()
    with ours, theirs:
        yield ours


@pytest.fixture
def block(tmp_path):
    path = tmp_path / "ram"
    path.write_bytes(b"\1" * 4 * PAGE)
    block = SourceBlock.from_path("ram", str(path))
    yield block
    block.close()


def _sndbuf(sock: socket.socket) -> int:
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)


@pytest.mark.asyncio
async def test_small_while_pages_are_requested_larger_once_quiet(block, tcp_pair) -> None:
    source = PostcopySource([block], background_sndbuf=64 << 10, background_sndbuf_quiet=512 << 10)
    conn = SimpleNamespace(sock=tcp_pair, channel=Channel.BACKGROUND, session=None)
    urgent = SimpleNamespace(channel=Channel.URGENT, session=None)

    source._demand_at = time.monotonic()  # as when the background connection is adopted
    now = source._size_send_buffer(conn, 64 << 10)
    assert now == 64 << 10, "a fresh sweep starts as if pages were being requested"

    source._demand_at = time.monotonic() - DEMAND_QUIET - 0.01
    now = source._size_send_buffer(conn, now)
    assert now == 512 << 10
    assert _sndbuf(tcp_pair) == 2 * (512 << 10)  # the kernel doubles what is set

    source._count_sent(urgent, read=PAGE, hole=0, zero=0, data=1, nbytes=PAGE)  # a Request answered
    now = source._size_send_buffer(conn, now)
    assert now == 64 << 10
    assert _sndbuf(tcp_pair) == 2 * (64 << 10)

    source._count_sent(conn, read=PAGE, hole=0, zero=0, data=1, nbytes=PAGE)  # the sweep's own sends
    source._demand_at -= DEMAND_QUIET + 0.01
    assert source._size_send_buffer(conn, now) == 512 << 10, "background sends are not demand"
    await source.close()


@pytest.mark.asyncio
async def test_without_a_quiet_size_the_buffer_stays_as_set(block, tcp_pair) -> None:
    source = PostcopySource([block], background_sndbuf=64 << 10, background_sndbuf_quiet=None)
    assert source._sndbuf_quiet is None  # the sweep then never resizes (see PostcopySource._sweep)
    autotuned = PostcopySource([block], background_sndbuf=None, background_sndbuf_quiet=1 << 20)
    assert autotuned._sndbuf_quiet is None, "autotuning throughout: no size is ever set"
    await source.close()
    await autotuned.close()
