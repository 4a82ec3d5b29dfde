"""Scenario 12: a block of 2 MiB pages end to end.

The source serves a regular /dev/shm image with ``--page-size 2097152``; the
destination keeps blocks in memfds (no block directory), which it creates
with MFD_HUGETLB for a 2 MiB block; clients map the same memfds.  The huge
page pool is grown for the test and put back afterwards
(:class:`~aiopostcopy.uffd.HugePageReservation`).
"""

from __future__ import annotations

import json
import os

import pytest

from aiopostcopy.loop import PostcopyDestination
from aiopostcopy.tools.pattern import is_zero_page
from aiopostcopy.uffd import HugePageReservation, default_huge_page_size

from e2e_support import bounded, check_destination

MiB = 1 << 20
HUGE = 2 * MiB


@pytest.mark.root
@pytest.mark.asyncio
async def test_two_megabyte_pages(e2e) -> None:
    if os.geteuid() != 0:
        pytest.skip("reserving huge pages needs root")
    if default_huge_page_size() != HUGE:
        pytest.skip(f"the default huge page size is {default_huge_page_size()}, not 2 MiB")
    seed, size = 1212, 32 * MiB
    pages = size // HUGE
    zero_pages = [p for p in range(pages) if is_zero_page(0, p, seed, 7)]
    image = e2e.image(size, seed=seed, page_size=HUGE)
    pool_before = int(open("/proc/sys/vm/nr_hugepages").read())
    with HugePageReservation(pages + 4, page_size=HUGE):
        source = await e2e.source({"ram": image}, page_size=HUGE)
        async with PostcopyDestination(e2e.options(source.address, block_dir=False)) as dest:
            source.stop()
            assert [(b.name, b.page_size) for b in dest.blocks] == [("ram", HUGE)]
            workers = await e2e.blocked_workers(dest, 2, name="huge", threads=2, touches=10, seed=seed)
            source.cont()
            report = await bounded(dest.wait_complete(), "the migration")
            results = [await w.result() for w in workers]
            problems = check_destination(dest, seed=seed)
        source_report = await source.report()
    assert int(open("/proc/sys/vm/nr_hugepages").read()) == pool_before, "the huge page pool was not restored"

    assert report.complete and report.pages_total == pages, report.format()
    assert problems == {}
    for result in results:
        assert result["exit"] == 0 and result["ok"] and result["bad_page_count"] == 0, json.dumps(result)
        assert result["blocks"] == [{"name": "ram", "length": size, "page_size": HUGE}]
    assert report.faults > 0 and report.client_requests > 0
    assert report.pages_zero == len(zero_pages)
    assert source_report["complete"], source_report
