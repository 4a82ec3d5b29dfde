"""The source's two ways of answering Requests, C (the page server) and Python, over real TCP:
the same frames, page for page the image, and the same accounting in the report and the session."""

from __future__ import annotations

import os

import pytest

from aiopostcopy.messages import Channel, Hello, PageRun, Pages, Ping, Pong, Request, Zero
from aiopostcopy.source import MIN_HOLE_BYTES, PostcopySource, SourceBlock
from aiopostcopy.transport.page_server import available

from e2e_support import bounded
from source_peer import RawChannel

PAGE = 4096
MiB = 1 << 20

pytestmark = pytest.mark.skipif(not available(), reason="the C page server is not built")


def sparse_image(path: str, pages: int, hole: range) -> bytes:
    """Pages named by their number, every fifth all zero, and ``hole`` left a hole of the file."""
    image = bytearray()
    for page in range(pages):
        image += bytes(PAGE) if page % 5 == 0 or page in hole else page.to_bytes(8, "little") * (PAGE // 8)
    with open(path, "wb") as f:
        f.write(image[:hole.start * PAGE])
        f.seek(hole.stop * PAGE)
        f.write(image[hole.stop * PAGE:])
    return bytes(image)


REQUESTS = [
    [(0, 7, 1)],                                   # a fault on a data page
    [(0, 10, 1)],                                  # a fault on a zero page
    [(0, 3, 1), (0, 4, 1), (0, 40, 1)],            # the faults of one read
    [(0, 0, 16)],                                  # a run with zero pages inside
    [(0, 300, 2)],                                 # inside the hole
    [(0, 1000, 100)],                              # longer than one run: split by the session
]


async def answers_of(image: str, answer_in_c: bool) -> tuple[list[tuple[str, int, int, tuple, bytes]], object, object]:
    source = PostcopySource([SourceBlock.from_path("ram", image)], answer_in_c=answer_in_c)
    try:
        address = await source.listen("127.0.0.1", 0)
        urgent, hello = await RawChannel.open(address, Channel.URGENT, f"answers-{answer_in_c}")
        assert isinstance(hello, Hello)
        assert (source._conns[Channel.URGENT].server is not None) is answer_in_c  # the way asked for
        got = []
        for token, runs in enumerate(REQUESTS):
            urgent.send(Request(runs=tuple(PageRun(block=b, first=f, count=c) for b, f, c in runs)))
            urgent.send(Ping(token=token))
            while not isinstance(msg := await urgent.next(), Pong):
                if isinstance(msg, Pages):
                    got.append(("pages", msg.first, msg.count, msg.zeros, bytes(urgent.payloads[-1])))
                else:
                    assert isinstance(msg, Zero), msg
                    got.append(("zero", msg.first, msg.count, (), b""))
            assert msg.token == token
        await urgent.close()
        return got, source.statistics(), source._session.statistics()
    finally:
        await bounded(source.close(), "the source to close")


@pytest.mark.asyncio
async def test_c_and_python_answer_alike_and_account_alike(e2e) -> None:
    pages = 1200
    hole = range(MIN_HOLE_BYTES // PAGE, 2 * MIN_HOLE_BYTES // PAGE)
    path = os.path.join(e2e.workdir, "sparse.img")
    image = sparse_image(path, pages, hole)
    in_c, report_c, session_c = await answers_of(path, True)
    in_python, report_python, session_python = await answers_of(path, False)
    assert in_c == in_python
    assert report_c.pages_hole > 0 and report_c.pages_zero > report_c.pages_hole
    for name in ("pages_urgent", "pages_zero", "bytes_sent", "bytes_read", "pages_hole"):
        assert getattr(report_c, name) == getattr(report_python, name), name
    for name in ("requests", "request_runs", "pages_sent_urgent", "bytes_urgent"):
        assert getattr(session_c, name) == getattr(session_python, name), name
    asked = sum(count for runs in REQUESTS for _, _, count in runs)
    assert session_c.pages_sent_urgent == asked and session_c.requests == len(REQUESTS)
    # every page answered is the image's, page by page
    seen = 0
    for kind, first, count, zeros, payload in in_c:
        zero = {p for low, high in zip(zeros[::2], zeros[1::2]) for p in range(low, high)}
        at = 0
        for i in range(count):
            want = image[(first + i) * PAGE:(first + i + 1) * PAGE]
            if kind == "zero" or i in zero:
                assert want == bytes(PAGE), first + i
            else:
                assert payload[at:at + PAGE] == want, first + i
                at += PAGE
            seen += 1
        assert at == len(payload)
    assert seen == asked
