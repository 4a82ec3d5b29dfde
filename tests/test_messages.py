"""Validation of every wire message: good values build, bad values raise LocalProtocolError."""

from __future__ import annotations

import dataclasses

import pytest

from aiopostcopy.errors import LocalProtocolError
from aiopostcopy.messages import (
    LIMITS, MESSAGE_TYPES, Ack, Accept, BlockInfo, Blocks, Bye, Changed, Channel, ClientHello, ClientMode,
    ClientRequest, Complete, Digests, Discard, Done, End, Error, ErrorCode, Hello, PageRun, Pages, Ping,
    Placed, Pong, Register, Reject, Request, Resume, Role, Zero,
)

RUN = PageRun(block=0, first=0, count=1)
RAM = BlockInfo(name="ram", length=1 << 20, page_size=4096)
HUGE = BlockInfo(name="huge", length=4 << 20, page_size=2 << 20)

GOOD = {
    BlockInfo: dict(name="ram", length=4096, page_size=4096),
    PageRun: dict(block=LIMITS.max_blocks - 1, first=(1 << 46) - 1, count=1 << 32),
    Hello: dict(version=1, session_id="s" * LIMITS.max_name, role=Role.SOURCE, channel=Channel.URGENT,
                features=("f",) * LIMITS.max_features, blocks=(RAM, HUGE)),
    Request: dict(runs=(RUN,) * LIMITS.max_runs),
    Pages: dict(block=0, first=0, count=4, data=b"\0" * 4096),
    Zero: dict(block=1, first=2, count=3),
    Discard: dict(block=1, first=2, count=3),
    Resume: dict(session_id="s", received=((0, (0, 4, 6, 8)), (3, ())), pending=(RUN,)),
    Done: dict(pages=0),
    Complete: dict(),
    Ack: dict(nbytes=1),
    Ping: dict(token=(1 << 63) - 1),
    Pong: dict(token=0),
    Error: dict(code=ErrorCode.IO, text=""),
    ClientHello: dict(version=1, pid=1, name="dpdk", mode=ClientMode.DELEGATED),
    Blocks: dict(session_id="s", blocks=(RAM,)),
    Register: dict(mappings=((1 << 30, 4096, 0, 0),)),
    Accept: dict(),
    Reject: dict(code=ErrorCode.MAPPING, text="entry 0: length"),
    ClientRequest: dict(runs=(RUN,)),
    Placed: dict(runs=(RUN,)),
    End: dict(complete=False),
    Bye: dict(),
    Digests: dict(block=0, first=(1 << 46) - LIMITS.max_digests, digests=(0, (1 << 64) - 1) * (LIMITS.max_digests // 2)),
    Changed: dict(block=0, first=7, count=LIMITS.max_digests, changed=(0, 1, 5, LIMITS.max_digests)),
}

#: (class, field, bad value): each must raise LocalProtocolError
BAD = [
    (BlockInfo, "name", ""), (BlockInfo, "name", "n" * (LIMITS.max_name + 1)), (BlockInfo, "name", b"ram"),
    (BlockInfo, "name", "\udc80"), (BlockInfo, "page_size", 8192), (BlockInfo, "page_size", (4096,)),
    (BlockInfo, "page_size", {}), (BlockInfo, "length", 4097), (BlockInfo, "length", 0),
    (BlockInfo, "length", LIMITS.max_block_length + 4096), (BlockInfo, "length", 4096.0),
    (PageRun, "block", -1), (PageRun, "block", LIMITS.max_blocks), (PageRun, "first", 1 << 46),
    (PageRun, "count", 0), (PageRun, "count", (1 << 32) + 1), (PageRun, "block", True), (PageRun, "first", "0"),
    (Hello, "version", 0), (Hello, "version", 0x10000), (Hello, "session_id", ""),
    (Hello, "role", "source"), (Hello, "channel", "urgent"), (Hello, "features", ["f"]),
    (Hello, "features", ("f",) * (LIMITS.max_features + 1)), (Hello, "features", ("",)),
    (Hello, "blocks", (RAM, RAM)), (Hello, "blocks", ((("ram", 4096, 4096)),)), (Hello, "blocks", [RAM]),
    (Request, "runs", ()), (Request, "runs", (RUN,) * (LIMITS.max_runs + 1)), (Request, "runs", ((0, 0, 1),)),
    (Request, "runs", [RUN]),
    (Pages, "count", 0), (Pages, "data", b""), (Pages, "data", "text"), (Pages, "data", [1]),
    (Pages, "data", b"\0" * (LIMITS.max_payload + 1)), (Pages, "data", memoryview(b"")),
    (Pages, "zeros", (1,)), (Pages, "zeros", [1, 2]), (Pages, "zeros", (2, 1)), (Pages, "zeros", (1, 1)),
    (Pages, "zeros", (0, 1, 1, 2)), (Pages, "zeros", (-1, 1)), (Pages, "zeros", (1, 1 << 20)),
    (Pages, "zeros", (0, 1.5)), (Pages, "zeros", (0, True)), (Pages, "zeros", None), (Pages, "zeros", 0),
    (Pages, "zeros", False), (Pages, "zeros", []),
    (Pages, "zeros", tuple(range(2 * LIMITS.max_zero_runs + 2))),
    (Zero, "first", -1), (Discard, "count", 0),
    (Resume, "session_id", ""), (Resume, "received", [(0, (0, 1))]), (Resume, "received", ((0, (0,)),)),
    (Resume, "received", ((0, (1, 1)),)), (Resume, "received", ((0, (2, 1)),)),
    (Resume, "received", ((0, (0, 2, 2, 4)),)), (Resume, "received", ((0, (-1, 2)),)),
    (Resume, "received", ((0, (0, (1 << 46) + 1)),)), (Resume, "received", ((0, (0, 1.5)),)),
    (Resume, "received", ((0, (0, True)),)), (Resume, "received", ((0, (0, 1)), (0, (4, 5)))),
    (Resume, "received", ((LIMITS.max_blocks, (0, 1)),)), (Resume, "received", ((0, (0, 1), 2),)),
    (Resume, "received", ((0, [0, 1]),)), (Resume, "pending", (RUN,) * (LIMITS.max_runs + 1)),
    (Resume, "received", ((0, tuple(range(2 * LIMITS.max_resume_runs + 2))),)),
    (Done, "pages", -1), (Ack, "nbytes", 0), (Ping, "token", 1 << 63), (Pong, "token", -1),
    (Error, "code", "io"), (Error, "text", "t" * (LIMITS.max_text + 1)), (Error, "text", None),
    (ClientHello, "pid", 0), (ClientHello, "pid", 1 << 31), (ClientHello, "name", ""),
    (ClientHello, "mode", "delegated"), (ClientHello, "version", -1),
    (Blocks, "blocks", ()), (Blocks, "blocks", (("ram", 4096, 4096),)), (Blocks, "session_id", 5),
    (Register, "mappings", ((0, 4096, 0, 0),)), (Register, "mappings", ((4096, 0, 0, 0),)),
    (Register, "mappings", ((4096, 4096, -1, 0),)), (Register, "mappings", ((4096, 4096, 0),)),
    (Register, "mappings", ((1 << 64, 4096, 0, 0),)), (Register, "mappings", [(4096, 4096, 0, 0)]),
    (Register, "mappings", ((4096, 4096, 0, 0),) * (LIMITS.max_blocks + 1)),
    (Reject, "code", None), (Reject, "text", "\ud800"),
    (ClientRequest, "runs", ()), (Placed, "runs", ()), (Placed, "runs", (None,)),
    (End, "complete", 1), (End, "complete", None),
    (Digests, "digests", ()), (Digests, "digests", (0,) * (LIMITS.max_digests + 1)), (Digests, "digests", [1]),
    (Digests, "digests", (-1,)), (Digests, "digests", (1 << 64,)), (Digests, "digests", (1.0,)),
    (Digests, "digests", (True,)), (Digests, "first", 1 << 46), (Digests, "block", LIMITS.max_blocks),
    (Changed, "count", 0), (Changed, "count", LIMITS.max_digests + 1), (Changed, "changed", (1,)),
    (Changed, "changed", (2, 1)), (Changed, "changed", (0, 1, 1, 2)), (Changed, "changed", (0, LIMITS.max_digests + 1)),
    (Changed, "changed", [0, 1]), (Changed, "changed", (0, True)), (Changed, "changed", None),
]


@pytest.mark.parametrize("cls", list(GOOD), ids=lambda c: c.__name__)
def test_good_values_build(cls: type) -> None:
    msg = cls(**GOOD[cls])
    assert dataclasses.replace(msg) == msg


@pytest.mark.parametrize(("cls", "field", "value"), BAD, ids=lambda v: repr(v)[:40])
def test_bad_values_raise(cls: type, field: str, value: object) -> None:
    with pytest.raises(LocalProtocolError):
        cls(**{**GOOD[cls], field: value})


def test_every_message_type_is_covered() -> None:
    assert set(MESSAGE_TYPES.values()) <= set(GOOD)
    assert len({cls.TYPE for cls in MESSAGE_TYPES.values()}) == len(MESSAGE_TYPES)


def test_messages_are_frozen_keyword_only() -> None:
    run = PageRun(block=0, first=1, count=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.count = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        PageRun(0, 1, 2)  # type: ignore[misc]


def test_an_unchecked_run_is_the_checked_run() -> None:
    for block, first, count in [(0, 0, 1), (3, 1 << 40, 7), (LIMITS.max_blocks - 1, 5, 1 << 32)]:
        run = PageRun.unchecked(block, first, count)
        assert type(run) is PageRun and run == PageRun(block=block, first=first, count=count)
        assert hash(run) == hash(PageRun(block=block, first=first, count=count)) and run.stop == first + count
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.count = 3  # type: ignore[misc]


def test_resume_accepts_the_largest_run_count() -> None:
    bounds = tuple(range(2 * LIMITS.max_resume_runs))
    assert Resume(session_id="s", received=((0, bounds),)).received[0][1] is bounds


def test_derived_properties() -> None:
    assert RAM.pages == 256
    assert PageRun(block=0, first=4, count=3).stop == 7
    assert Pages(block=1, first=2, count=3).run == PageRun(block=1, first=2, count=3)


def test_pages_with_every_page_zero_is_refused() -> None:
    with pytest.raises(LocalProtocolError, match="send Zero"):
        Pages(block=0, first=0, count=4, zeros=(0, 4))
    assert Pages(block=0, first=0, count=4, zeros=(0, 3)).zeros == (0, 3)
    assert Pages(block=0, first=0, count=4, zeros=(0, 1, 2, 4)).zeros == (0, 1, 2, 4)


def test_pages_data_accepts_buffers() -> None:
    for data in (b"x", bytearray(b"x"), memoryview(bytearray(8)).cast("Q")):
        assert Pages(block=0, first=0, count=1, data=data).data is data
