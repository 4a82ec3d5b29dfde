"""Hypothesis strategies that build every wire message with every field varied."""

from __future__ import annotations

import msgpack
from hypothesis import strategies as st

from aiopostcopy.messages import (
    LIMITS, Ack, Accept, BlockInfo, Blocks, Bye, Channel, ClientHello, ClientMode, ClientRequest,
    Complete, Discard, Done, End, Error, ErrorCode, Hello, PageRun, Pages, Ping, Placed, Pong,
    Register, Reject, Request, Resume, Role, Zero,
)

#: unicode without lone surrogates (UTF-8 cannot carry them; messages refuse them)
def names(max_size: int = LIMITS.max_name, min_size: int = 1) -> st.SearchStrategy[str]:
    return st.text(st.characters(exclude_categories=("Cs",)), min_size=min_size, max_size=max_size)


def ints(low: int, high: int) -> st.SearchStrategy[int]:
    """Integers in [low, high] that hit both ends and every msgpack width."""
    return st.one_of(st.sampled_from([low, high]), st.integers(low, high))


blocks_idx = ints(0, LIMITS.max_blocks - 1)
firsts = ints(0, (1 << 46) - 1)
counts = ints(1, 1 << 32)
page_runs = st.builds(PageRun, block=blocks_idx, first=firsts, count=counts)
run_tuples = st.lists(page_runs, min_size=1, max_size=20).map(tuple)


@st.composite
def block_infos(draw: st.DrawFn) -> BlockInfo:
    page_size = draw(st.sampled_from([4096, 2 << 20]))
    pages = draw(ints(1, LIMITS.max_block_length // page_size))
    return BlockInfo(name=draw(names(40)), length=pages * page_size, page_size=page_size)


block_lists = st.lists(block_infos(), max_size=6, unique_by=lambda b: b.name).map(tuple)


@st.composite
def bounds(draw: st.DrawFn) -> tuple[int, ...]:
    points = draw(st.lists(ints(0, 1 << 46), max_size=16, unique=True))
    points = sorted(points)[: len(points) // 2 * 2]
    return tuple(points)


@st.composite
def pages(draw: st.DrawFn) -> Pages:
    """A Pages message, sometimes with zero pages inside the run (at least one data page left)."""
    count = draw(counts)
    zeros: tuple[int, ...] = ()
    if count > 1 and draw(st.booleans()):
        points = sorted(draw(st.lists(ints(0, min(count, 1 << 20)), max_size=8, unique=True)))
        zeros = tuple(points[: len(points) // 2 * 2])
        if zeros and sum(zeros[1::2]) - sum(zeros[::2]) >= count:
            zeros = zeros[:-2]
    return Pages(block=draw(blocks_idx), first=draw(firsts), count=count,
                 data=draw(st.binary(min_size=1, max_size=9000)), zeros=zeros)


received = st.lists(st.tuples(blocks_idx, bounds()), max_size=5, unique_by=lambda t: t[0]).map(tuple)
texts = names(200, min_size=0)
tokens = ints(0, (1 << 63) - 1)
mappings = st.tuples(ints(1, (1 << 64) - 1), ints(1, LIMITS.max_block_length), blocks_idx,
                     ints(0, LIMITS.max_block_length))

MESSAGES = {
    Hello: st.builds(Hello, version=ints(1, 0xFFFF), session_id=names(), role=st.sampled_from(Role),
                     channel=st.sampled_from(Channel), features=st.lists(names(30), max_size=5).map(tuple),
                     blocks=block_lists),
    Request: st.builds(Request, runs=run_tuples),
    Pages: pages(),
    Zero: st.builds(Zero, block=blocks_idx, first=firsts, count=counts),
    Discard: st.builds(Discard, block=blocks_idx, first=firsts, count=counts),
    Resume: st.builds(Resume, session_id=names(), received=received,
                      pending=st.lists(page_runs, max_size=5).map(tuple)),
    Done: st.builds(Done, pages=ints(0, 1 << 46)),
    Complete: st.builds(Complete),
    Ack: st.builds(Ack, nbytes=ints(1, 1 << 46)),
    Ping: st.builds(Ping, token=tokens),
    Pong: st.builds(Pong, token=tokens),
    Error: st.builds(Error, code=st.sampled_from(ErrorCode), text=texts),
    ClientHello: st.builds(ClientHello, version=ints(1, 0xFFFF), pid=ints(1, (1 << 31) - 1), name=names(),
                           mode=st.sampled_from(ClientMode)),
    Blocks: st.builds(Blocks, session_id=names(), blocks=block_lists.filter(bool)),
    Register: st.builds(Register, mappings=st.lists(mappings, max_size=5).map(tuple)),
    Accept: st.builds(Accept),
    Reject: st.builds(Reject, code=st.sampled_from(ErrorCode), text=texts),
    ClientRequest: st.builds(ClientRequest, runs=run_tuples),
    Placed: st.builds(Placed, runs=run_tuples),
    End: st.builds(End, complete=st.booleans()),
    Bye: st.builds(Bye),
}

messages = st.one_of(*MESSAGES.values())


def raw(header: object) -> bytes:
    """A frame of ``header`` packed as msgpack packs it, whatever it holds (valid or not)."""
    body = msgpack.packb(header)
    return len(body).to_bytes(4, "big") + body


#: Frames that look like a ClientRequest of a few runs but are not a valid one: the decoder's
#: shortcut (and the service's C reader) must leave each to next_event.
NOT_SHORT_CLIENT_REQUESTS = [
    raw([25, [[True, 3, 1]]]),
    raw([25, [[0, 3, 1], [0, 4]]]),  # a short second run
    raw([25, [[0, 3, 1], {1: 0, 2: 0, 3: 0}]]),  # a map where a run belongs
    raw([25, [[0, 3, 1], "abc"]]),
    raw([25, [[0, 3, 1], [1024, 0, 1]]]),  # a block out of range
    raw([25, []]),  # no runs
    raw([25, [[0, 3, 0]]]),  # no pages
    raw([25, [[0, 3, (1 << 32) + 1]]]),
    raw([25, [[0, -1, 1]]]),
    raw([25, [[0, 3, 1, 4]]]),
    raw([25, [[0, 3, 1]]])[:-1],  # incomplete
    raw([25, [[0, 3, 1]], 0]),  # a field too many
]
