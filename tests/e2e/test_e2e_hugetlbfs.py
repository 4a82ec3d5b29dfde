"""hugetlbfs block directories (2 MiB and 1 GiB pages) end to end.

Each test mounts a hugetlbfs of its own in a fresh temporary directory
(``mount -t hugetlbfs -o pagesize=...``), grows the kernel's pool of that page
size for the test (:class:`~aiopostcopy.uffd.HugePageReservation`) and puts
everything back afterwards: block files removed, the mount unmounted, the pool
size restored (checked).  The destination runs in the test process with the
mount as its block directory; workers (delegated and self-served clients)
map the same files; every page is verified through the service's mapping and
by the workers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Iterator

import pytest

from aiopostcopy.destination.memory import BlockMemory
from aiopostcopy.errors import ConfigurationError
from aiopostcopy.loop import PostcopyDestination
from aiopostcopy.messages import BlockInfo
from aiopostcopy.tools.pattern import is_zero_page
from aiopostcopy.tools.preflight import prepare_block_dir
from aiopostcopy.uffd import HugePageReservation
from aiopostcopy.uffd.hugepages import available_huge_pages, private_hugetlbfs

from e2e_support import bounded, check_destination, running_clients, threads_in_userfault, wait_until

MiB, GiB = 1 << 20, 1 << 30
_POOL = "/sys/kernel/mm/hugepages/hugepages-{kib}kB/nr_hugepages"


def _pool(page_size: int) -> int:
    with open(_POOL.format(kib=page_size // 1024), encoding="ascii") as f:
        return int(f.read())


@contextlib.contextmanager
def hugetlbfs(page_size: int) -> Iterator[str]:
    """A private hugetlbfs mount of ``page_size`` pages; emptied and unmounted on exit."""
    with contextlib.ExitStack() as stack:
        try:
            path = stack.enter_context(private_hugetlbfs(page_size))
        except OSError as exc:
            pytest.skip(str(exc))
        yield path


@contextlib.contextmanager
def reserved(pages: int, page_size: int) -> Iterator[None]:
    """``pages`` free huge pages for the test; skipped with the reason if the kernel has no room."""
    if os.geteuid() != 0:
        pytest.skip("reserving huge pages needs root")
    before = _pool(page_size)
    try:
        with HugePageReservation(pages, page_size=page_size):
            yield
    except OSError as exc:
        if _pool(page_size) == before and "could not reserve" in str(exc):
            pytest.skip(f"cannot reserve {pages} huge pages of {page_size} bytes: {exc}")
        raise
    assert _pool(page_size) == before, "the huge page pool was not restored"


@pytest.mark.root
@pytest.mark.asyncio
async def test_hugetlbfs_block_dir_with_2m_pages(e2e) -> None:
    """Blocks created on a hugetlbfs mount; a delegated and a self-served client map the files."""
    seed, size = 1313, 32 * MiB
    pages = size // (2 * MiB)
    image = e2e.image(size, seed=seed, page_size=2 * MiB)
    with reserved(pages, 2 * MiB), hugetlbfs(2 * MiB) as mount:  # exactly: zero pages must need no spare page
        source = await e2e.source({"ram": image}, page_size=2 * MiB)
        options = dataclasses.replace(e2e.options(source.address), block_dir=mount)
        async with PostcopyDestination(options) as dest:
            source.stop()
            assert dest.block_path("ram") == os.path.join(mount, "ram.partial")
            workers = await e2e.blocked_workers(dest, 2, name="hugetlbfs", threads=2, touches=10, seed=seed)
            source.cont()
            report = await bounded(dest.wait_complete(), "the migration")
            results = [await w.result() for w in workers]
            problems = check_destination(dest, seed=seed)
        assert os.listdir(mount) == ["ram"], "the complete block stays in the block dir under its final name"
    assert report.complete and report.pages_total == pages, report.format()
    assert problems == {}
    for result in results:
        assert result["exit"] == 0 and result["ok"] and result["bad_page_count"] == 0, json.dumps(result)
        assert result["blocks"] == [{"name": "ram", "length": size, "page_size": 2 * MiB}]
    assert report.faults > 0 and report.client_requests > 0
    waits = report.huge_page_waits[str(2 * MiB)]
    assert waits["page_size"] == 2 * MiB and waits["count"] == len(waits["waits_ms"]) > 0


def test_hugetlbfs_block_dir_refuses_what_it_cannot_hold() -> None:
    """Blocks of another page size, or more pages than the pool has free: one clear error each."""
    with reserved(2, 2 * MiB), hugetlbfs(2 * MiB) as mount:
        checked = prepare_block_dir(mount)
        assert (checked.fs_type, checked.huge_page_size) == ("hugetlbfs", 2 * MiB)
        assert checked.huge_pages_free >= 2
        with pytest.raises(ConfigurationError, match=r"hugetlbfs mount of 2 MiB pages, but block 'ram' has 4 KiB"):
            BlockMemory.create([BlockInfo(name="ram", length=4 * MiB, page_size=4096)], mount)
        free = available_huge_pages(2 * MiB)
        too_many = BlockInfo(name="ram", length=(free + 1) * 2 * MiB, page_size=2 * MiB)
        with pytest.raises(ConfigurationError, match=rf"need {free + 1} huge pages, only {free} are free; "
                                                     r"grow the pool, e.g. echo \d+ > /sys/kernel/mm/hugepages"):
            BlockMemory.create([too_many], mount)
        assert os.listdir(mount) == []


def test_preflight_refuses_a_hugetlbfs_mount_without_free_pages() -> None:
    with hugetlbfs(GiB) as mount:
        if available_huge_pages(GiB) != 0:
            pytest.skip("1 GiB huge pages are free on this machine: the empty-pool case cannot be made here")
        with pytest.raises(ConfigurationError, match=r"hugetlbfs mount of 1024 MiB pages, but no huge page of "
                                                     r"that size is free; grow the pool"):
            prepare_block_dir(mount)


@pytest.mark.root
@pytest.mark.asyncio
async def test_one_gigabyte_pages(e2e) -> None:
    """A block of two 1 GiB pages, the second all zero: a client thread faults in one (urgent, whole
    page in one frame), the other comes with the sweep; the whole block is compared with the source's
    image.  The pool holds exactly the two pages the block reserves: placing the zero page needs no spare."""
    seed, size = 1402, 2 * GiB  # page 0 holds data, page 1 is a zero page
    assert not is_zero_page(0, 0, seed) and is_zero_page(0, 1, seed)
    image = e2e.image(size, seed=seed, page_size=GiB)
    with reserved(2, GiB), hugetlbfs(GiB) as mount:
        source = await e2e.source({"ram": image}, page_size=GiB)
        options = dataclasses.replace(e2e.options(source.address), block_dir=mount)
        async with PostcopyDestination(options) as dest:
            source.stop()
            worker = await e2e.worker(mode="delegated", threads=1, touches=1, seed=seed, name="gigabyte")
            await wait_until(lambda: running_clients(dest) == 1, "the client accepted")
            await wait_until(lambda: threads_in_userfault(worker.pid), "the client's thread blocked")
            source.cont()
            report = await bounded(dest.wait_complete(), "the migration", timeout=120)
            result = await worker.result()
            with open(image, "rb") as f:
                view = dest.memory("ram")
                for page in range(size // GiB):
                    assert view[page * GiB:(page + 1) * GiB] == f.read(GiB), f"1 GiB page {page} differs"
            problems = check_destination(dest, seed=seed)
    assert report.complete and report.pages_total == 2 and report.pages_zero == 1, report.format()
    assert problems == {}
    assert result["exit"] == 0 and result["ok"] and result["bad_page_count"] == 0, json.dumps(result)
    # the faulted page came on the urgent channel, or with the sweep if that one won the race
    assert report.faults >= 1 and report.pages_demand + report.pages_background == 1, report.format()
    waits = report.huge_page_waits[str(GiB)]
    assert waits["count"] >= 1 and len(waits["waits_ms"]) == waits["count"]
    print(report.format())
