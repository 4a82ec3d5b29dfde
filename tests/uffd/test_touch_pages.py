"""The workload's touching loop in C (aiopostcopy.tools.touch), on real shared memory and a real
userfaultfd: first touches split into faults and hits as the Python loop splits them."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from aiopostcopy.messages import BlockInfo
from aiopostcopy.tools import touch, workload
from aiopostcopy.uffd import Feature, PageFault

from .helpers import PAGE, Resources, read_events

pytestmark = pytest.mark.skipif(not touch.available(), reason="the C touching loop is not built")


def test_first_touches_split_into_faults_and_hits(res: Resources) -> None:
    mapping = res.map(res.memfd(8))
    mapping.buffer()[0:4 * PAGE] = b"\x01" * (4 * PAGE)  # pages 0-3 in memory, 4-7 not
    seen = touch.SeenPages(8)
    pages = [mapping.address + page * PAGE for page in (0, 1, 4, 5, 0, 4)]
    latencies, hits = touch.touch_pages(pages, [0, 1, 4, 5, 0, 4], 7, seen)
    assert hits == 2  # pages 0 and 1; the second touches of 0 and 4 are neither
    assert len(latencies) == 2 and all(ns > 0 for ns in latencies)  # pages 4 and 5
    assert [page in seen for page in range(8)] == [True, True, False, False, True, True, False, False]
    again, hits = touch.touch_pages(pages[:2], [0, 1], 7, seen)
    assert (again, hits) == ([], 0)  # touched before by this process: not first touches


def test_a_fault_blocks_the_batch_until_the_page_is_placed(res: Resources) -> None:
    mapping = res.map(res.memfd(4))
    uffd = res.uffd(Feature.THREAD_ID)
    uffd.register(mapping.address, mapping.length)
    seen, result = touch.SeenPages(4), {}

    def run() -> None:
        result["tid"] = threading.get_native_id()
        result["touched"] = touch.touch_pages([mapping.address + 2 * PAGE], [2], 100, seen)

    thread = res.call_in_thread(run)
    [fault] = read_events(uffd, 1)
    assert fault == PageFault(mapping.address + 2 * PAGE, fault.flags, result["tid"])
    assert thread.is_alive()  # stopped in the kernel, the GIL released: this test runs
    uffd.copy(fault.address, res.source(bytes([0x5A]) * PAGE), PAGE)
    thread.join(10)
    latencies, hits = result["touched"]
    assert hits == 0 and len(latencies) == 1 and latencies[0] > 0
    uffd.unregister(mapping.address, mapping.length)  # so that reading the missing pages below fills zeros
    contents = mapping.buffer()
    for page in range(4):  # only the placed page is there
        want = bytes([0x5A]) * PAGE if page == 2 else b"\x00" * PAGE
        assert bytes(contents[page * PAGE:(page + 1) * PAGE]) == want, page


def test_bad_arguments_are_refused_before_any_touch() -> None:
    seen = touch.SeenPages(2)
    with pytest.raises(ValueError, match="2 pages but 1"):
        touch.touch_pages([1, 2], [0], 0, seen)
    with pytest.raises(ValueError, match="outside the 2 pages"):
        touch.touch_pages([1], [2], 0, seen)


@pytest.mark.parametrize("kind", ["random", "sequential"])
def test_the_c_loop_touches_what_the_python_loop_touches(res: Resources, kind: str) -> None:
    """The same seed makes the same pages in the same order: the same split, thread by thread."""
    args = SimpleNamespace(slot_base=0, seed=3, counters=False, touches=10, workload=kind, threads=2)
    results = {}
    for in_c in (False, True):
        blocks = [res.map(res.memfd(16)), res.map(res.memfd(8))]  # fresh memory for each loop
        for mapping in blocks:  # every other page in memory
            for page in range(0, mapping.length // PAGE, 2):
                mapping.buffer()[page * PAGE] = 1
        client = SimpleNamespace(block_info=[BlockInfo(name=f"b{i}", length=m.length, page_size=PAGE)
                                             for i, m in enumerate(blocks)],
                                 block_addresses={f"b{i}": m.address for i, m in enumerate(blocks)})
        toucher = workload.Toucher(client, in_c=in_c)  # type: ignore[arg-type]
        assert (toucher.seen_pages is not None) == in_c
        seen: set = set()
        outs = [{"latencies": [], "tally": {}, "seen": seen, "hits": 0} for _ in range(2)]
        for index, out in enumerate(outs):  # each on a thread of its own: the loop names its thread
            res.call_in_thread(workload._touch_loop, toucher, args, index, out).join(10)
        touched = ({toucher.locate(flat) for flat in range(toucher.total) if flat in toucher.seen_pages}
                   if in_c else seen)
        results[in_c] = [(len(out["latencies"]), out["hits"]) for out in outs], touched
    assert results[True] == results[False]
    assert all(faults and hits for faults, hits in results[True][0])  # both kinds of first touch happened
