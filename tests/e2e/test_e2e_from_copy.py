"""Starting from an earlier copy (``dest --from-copy``): only the changed pages cross the wire.

The block directory holds a copy of the source's image in which known pages
differ (changed bytes) and known pages are missing (holes).  Real source and
destination processes; afterwards every page of the block file is checked
against the source's image, and both sides' figures must say that exactly the
changed and the missing pages were sent.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess

import pytest

from aiopostcopy.loop import PostcopyDestination
from aiopostcopy.tools.bench_migration import differing_pages
from aiopostcopy.tools.pattern import is_zero_page
from aiopostcopy.uffd import SharedMemory
from aiopostcopy.uffd.hugepages import private_hugetlbfs

from e2e_support import PYTHON, bounded, parse_json_output, running_clients, wait_until
from source_peer import SourceWithLog

PAGE = 4096
MiB = 1 << 20


def make_copy(image: str, copy: str, page_size: int, *, seed: int, changed: int, holes: int,
              rng: random.Random) -> tuple[set[int], set[int]]:
    """Copy ``image`` to ``copy``, then change ``changed`` pages and punch ``holes`` others;
    returns (changed pages, hole pages).  Some changes turn a zero page into data and a data page
    into zeros; some holes fall on the image's zero pages."""
    pages = os.stat(image).st_size // page_size
    with open(image, "rb") as src, open(copy, "wb") as dst:
        shutil.copyfileobj(src, dst, 16 * MiB)
    picked = rng.sample(range(pages), changed + holes)
    changed_pages, hole_pages = set(picked[:changed]), set(picked[changed:])
    fd = os.open(copy, os.O_RDWR)
    try:
        for i, page in enumerate(sorted(changed_pages)):
            if i % 5 == 0:  # data in the copy, all zero now (or the other way round)
                data = bytes(page_size) if not is_zero_page(0, page, seed) else b"\x01" * page_size
            else:  # one byte off, somewhere in the page
                data = bytearray(os.pread(fd, page_size, page * page_size))
                at = rng.randrange(page_size)
                data[at] ^= 0x5A
            os.pwrite(fd, bytes(data), page * page_size)
    finally:
        os.close(fd)
    with contextlib.closing(SharedMemory.open(copy)) as shm:
        for page in hole_pages:
            shm.punch_hole(page * page_size, page_size)
    return changed_pages, hole_pages


def dest_argv(address: tuple[str, int], block_dir: str, *extra: str) -> list[str]:
    return [PYTHON, "-m", "aiopostcopy", "dest", "--source", f"{address[0]}:{address[1]}", "--block-dir", block_dir,
            "--from-copy", "--json", "-", "-q", "--deadline", "30", *extra]


def assert_only_changes_sent(source: dict, dest: dict, pages: int, changed: set[int], holes: set[int]) -> None:
    moved = len(changed) + len(holes)
    assert source["pages_compared"] == pages - len(holes), source  # the copy's holes need no digest
    assert source["pages_changed"] == len(changed), source
    assert source["pages_urgent"] + source["pages_background"] + source["pages_zero"] == moved, source
    assert dest["pages_total"] == dest["pages_placed"] == pages, dest
    assert dest["pages_from_source"] == moved and dest["pages_adopted"] == pages - moved, dest


@pytest.mark.asyncio
async def test_from_copy_on_shmem_sends_only_the_changed_pages(e2e) -> None:
    seed, size = 3101, 32 * MiB
    pages = size // PAGE
    image = e2e.image(size, seed=seed)
    changed, holes = make_copy(image, os.path.join(e2e.block_dir, "ram"), PAGE, seed=seed, changed=37, holes=50,
                               rng=random.Random(seed))
    source = await SourceWithLog.start(e2e.procs, {"ram": image})
    proc = subprocess.run(dest_argv(source.address, e2e.block_dir), capture_output=True, timeout=120)
    dest = parse_json_output(proc.stdout)
    assert proc.returncode == 0, (dest, proc.stderr.decode()[-2000:])
    result = await source.report()
    assert differing_pages(os.path.join(e2e.block_dir, "ram"), image) == []
    assert result["exit"] == 0 and result["complete"], result
    assert_only_changes_sent(result, dest, pages, changed, holes)


@pytest.mark.asyncio
async def test_from_copy_with_a_client_faulting_into_changed_pages(e2e) -> None:
    """Library equivalent (DestinationOptions.from_copy) with a delegated client that touches pages:
    changed pages are requested and served, unchanged ones are simply there."""
    seed, size = 3102, 16 * MiB
    pages = size // PAGE
    image = e2e.image(size, seed=seed)
    changed, holes = make_copy(image, os.path.join(e2e.block_dir, "ram"), PAGE, seed=seed, changed=200, holes=100,
                               rng=random.Random(seed))
    source = await SourceWithLog.start(e2e.procs, {"ram": image})
    async with PostcopyDestination(e2e.options(source.address, from_copy=True)) as dest:
        source.stop()  # the sweep waits: the client's touches of changed pages are faults
        worker = await e2e.worker(mode="delegated", threads=2, touches=300, seed=seed, name="from-copy")
        await wait_until(lambda: running_clients(dest) == 1, "the client accepted")
        source.cont()
        report = await bounded(dest.wait_complete(), "the migration from the copy")
        worker_result = await worker.result()
    result = await source.report()

    assert worker_result["exit"] == 0 and worker_result.get("bad_page_count") == 0, worker_result
    assert differing_pages(os.path.join(e2e.block_dir, "ram"), image) == []
    sent = result["pages_urgent"] + result["pages_background"] + result["pages_zero"]
    # each changed or missing page once, plus a page requested while the sweep had it on the way
    assert len(changed) + len(holes) <= sent <= len(changed) + len(holes) + report.pages_duplicate, result
    assert report.pages_adopted == pages - len(changed) - len(holes), report.format()
    assert result["pages_changed"] == len(changed), result


HUGE = 2 << 20


@contextlib.contextmanager
def hugetlbfs_mount(pages: int):
    """A private hugetlbfs mount (2 MiB pages) with ``pages`` more huge pages reserved; all undone
    after (the pool lowered by what this added, so an overlapping reservation keeps its own)."""
    knob = "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages"
    if os.geteuid() != 0 or not os.path.exists(knob):
        pytest.skip("needs root and 2 MiB huge pages")
    with open(knob) as f:
        old = int(f.read())
    added = 0
    try:
        with open(knob, "w") as f:
            f.write(str(old + pages))
        with open(knob) as f:
            added = int(f.read()) - old
        if added < pages:
            pytest.skip(f"could not reserve {pages} huge pages")
        with private_hugetlbfs(HUGE, prefix="apc-hugetlbfs-") as mount:
            yield mount
    finally:
        with open(knob) as f:
            now = int(f.read())
        with open(knob, "w") as f:
            f.write(str(max(0, now - added)))


@pytest.mark.asyncio
async def test_from_copy_on_hugetlbfs_sends_only_the_changed_pages(e2e) -> None:
    seed, size = 3103, 64 * MiB
    pages = size // HUGE
    image = e2e.image(size, seed=seed, page_size=HUGE)
    with hugetlbfs_mount(2 * pages + 8) as mount:
        block_dir = os.path.join(mount, "dest")
        os.mkdir(block_dir)
        copy = os.path.join(block_dir, "ram")
        staging = os.path.join(e2e.workdir, "copy.img")
        changed, holes = make_copy(image, staging, HUGE, seed=seed, changed=5, holes=4, rng=random.Random(seed))
        _copy_into_hugetlbfs(staging, copy, size, holes)
        source = await SourceWithLog.start(e2e.procs, {"ram": image}, page_size=HUGE)
        proc = subprocess.run(dest_argv(source.address, block_dir), capture_output=True, timeout=120)
        dest = parse_json_output(proc.stdout)
        try:
            assert proc.returncode == 0, (dest, proc.stderr.decode()[-2000:])
            result = await source.report()
            assert differing_pages(copy, image) == []
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(copy)
    assert result["exit"] == 0 and result["complete"], result
    # hugetlbfs cannot say which pages a file holds: its holes were filled with zeros and compared,
    # so a hole over a data page counts as changed, a hole over a zero page as unchanged
    assert result["pages_compared"] == pages, result
    zero_holes = {page for page in holes if is_zero_page(0, page, seed)}
    moved = len(changed) + len(holes - zero_holes)
    assert result["pages_changed"] == moved, result
    assert result["pages_urgent"] + result["pages_background"] + result["pages_zero"] == moved, result
    assert dest["pages_from_source"] == moved and dest["pages_adopted"] == pages - moved, dest


def _copy_into_hugetlbfs(staging: str, copy: str, size: int, holes: set[int]) -> None:
    """hugetlbfs takes no write(): map the file and copy every page but the holes into it."""
    import mmap

    fd = os.open(copy, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, size)
        with mmap.mmap(fd, size) as dst, open(staging, "rb") as src:
            for page in range(size // HUGE):
                if page not in holes:
                    dst[page * HUGE:(page + 1) * HUGE] = os.pread(src.fileno(), HUGE, page * HUGE)
    finally:
        os.close(fd)
