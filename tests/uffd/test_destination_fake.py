"""The real PostcopyDestination driven in process through the in-memory userfaultfd fake.

The service, its session, its source channels, its placement thread and a
real in-process PostcopySource (over a Unix socket) run as in production; only
the service's own userfaultfd is the fake (tests/uffd/fake.py, which keeps the
same contract as the kernel object).  The fake records every page the service
places, so the test checks each page's bytes against the source image, and
which faulting "threads" were woken, without a kernel in the loop.
"""

from __future__ import annotations

import asyncio
import ctypes
import os

import pytest
import uvloop

from aiopostcopy import DestinationOptions, PostcopyDestination, PostcopySource
from aiopostcopy.source import SourceBlock
from aiopostcopy.uffd import Event, Feature

from .fake import PAGE, FakeMemory, FakeUserfaultfd

PAGES = 96


class _LiveMemory(FakeMemory):
    """Copy sources are real memory: the service's staging buffers."""

    def read_source(self, address: int, length: int) -> bytes:
        return ctypes.string_at(address, length)


class LoopFakeUffd(FakeUserfaultfd):
    """The fake with a real fd (an eventfd) that turns readable while faults are queued."""

    def __init__(self) -> None:
        super().__init__(_LiveMemory(), Feature.THREAD_ID)
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.placed: list[int] = []

    def fileno(self) -> int:
        return self.fd

    def access(self, address: int) -> None:
        super().access(address)
        if self.queue:
            os.eventfd_write(self.fd, 1)

    def read_events(self, max_events: int = 64) -> list[Event]:
        try:
            os.eventfd_read(self.fd)
        except BlockingIOError:
            pass
        return super().read_events(max_events)

    def close(self) -> None:
        if not self.closed:
            os.close(self.fd)
        super().close()


def _image(path: str) -> bytes:
    """A page pattern: index and a fill byte in every page, every fifth page zero."""
    pages = [bytes(PAGE) if i % 5 == 0 else i.to_bytes(4, "little") + bytes([i % 251 + 1]) * (PAGE - 4)
             for i in range(PAGES)]
    data = b"".join(pages)
    with open(path, "wb") as f:
        f.write(data)
    return data


@pytest.fixture(scope="module", autouse=True)
def _uvloop_started_once() -> None:
    """uvloop opens one process-wide pipe with its first loop and keeps it: open it before
    the leak guard takes its first look, so that the guard sees only what the service leaves."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(asyncio.sleep(0))


@pytest.mark.parametrize("loop_factory", [asyncio.new_event_loop, uvloop.new_event_loop], ids=["asyncio", "uvloop"])
def test_destination_places_every_page_through_the_fake(tmp_path, loop_factory) -> None:
    """Run on a loop of its own, closed before the leak guard looks (fds, mappings, threads)."""
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(_migrate_through_the_fake(tmp_path))


async def _migrate_through_the_fake(tmp_path) -> None:
    image = _image(str(tmp_path / "ram.img"))
    source = PostcopySource([SourceBlock.from_path("ram", str(tmp_path / "ram.img"))])
    address = await source.listen_unix(str(tmp_path / "source.sock"))
    fakes: list[LoopFakeUffd] = []

    def open_fake() -> LoopFakeUffd:
        fakes.append(LoopFakeUffd())
        return fakes[-1]

    dest = PostcopyDestination(DestinationOptions(source=address), open_userfaultfd=open_fake)
    try:
        await dest.start()
        (fake,) = fakes
        (block,) = list(dest.blocks)
        ((base, length),) = fake.ranges  # the service registered its one block
        assert length == block.length
        touched = [PAGES - 1, 3, 40, 41]
        for page in touched:  # faults queued as a faulting thread's would be
            fake.access(base + page * PAGE)
        report = await asyncio.wait_for(dest.wait_complete(), 30)
        await asyncio.wait_for(source.wait_complete(), 30)
    finally:
        await dest.close()
        await source.close()
    assert report.complete and report.pages_placed == PAGES
    assert report.faults >= 1 and report.pages_zero == PAGES // 5 + 1
    assert not fake.waiting, f"threads left asleep at {sorted(fake.waiting)}"
    for page in range(PAGES):
        placed = fake.memory.pages.get(base + page * PAGE)
        assert placed == image[page * PAGE:(page + 1) * PAGE], f"page {page} differs"
    assert fake.closed, "the service closes its userfaultfd when the migration completes"
