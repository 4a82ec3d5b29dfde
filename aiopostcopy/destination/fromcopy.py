"""Starting from an earlier copy: which pages of it can stay (feature ``from-copy``).

Theory of operation
-------------------
A destination started with ``from_copy`` finds block files in its block
directory that hold an earlier copy of the memory (a completed earlier
migration's ``NAME``, or a ``NAME.partial``).  Before any client may map
them, :class:`CopyComparison`:

1. lists the pages the copy holds: SEEK_DATA on tmpfs (holes are simply
   missing); hugetlbfs cannot tell, so its file is first filled up
   (fallocate: a hole becomes a zero page, which is what reading it gave)
   and every page counts as held;
2. reads them with ``preadv`` from the file (never through the registered
   mapping, which would fault on a hole) and digests each page
   (:mod:`aiopostcopy.core.digests`), off the event loop: :meth:`prepare`;
3. the service sends those Digests on the urgent channel; the source answers
   each with Changed, in order (:meth:`answered`);
4. :meth:`finish` punches the changed pages out of the file (fallocate
   PUNCH_HOLE: shmem and hugetlbfs alike), and also every page whose answer
   did not come (the urgent channel broke: safe, they just migrate), and
   returns the unchanged pages: the service declares them present (the
   session's adoption, then Resume), so the source sends neither them nor,
   in the sweep, anything but the rest.

Until :meth:`finish` the copy's pages are unverified: the service admits no
client and does not remember the session in the block directory (a crash
then leaves partial files that are refused, never adopted as migrated).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections import deque
from collections.abc import Callable

from aiopostcopy import messages as m
from aiopostcopy.core.digests import page_digests
from aiopostcopy.core.rangeset import RangeSet
from aiopostcopy.destination.memory import BlockMemory
from aiopostcopy.errors import RemoteProtocolError

__all__ = ["CopyComparison", "CopyResult"]


@dataclasses.dataclass(frozen=True, slots=True)
class CopyResult:
    """What the comparison found, in pages."""

    held: int  #: pages the copy held
    unchanged: int  #: kept: present from the start
    changed: int  #: punched: the source said they differ
    unanswered: int  #: punched: no answer came (the urgent channel broke)


class CopyComparison:
    """One destination's comparison of its copy with the source (see the module docstring)."""

    def __init__(self, memory: BlockMemory) -> None:
        self._memory = memory
        blocks = list(memory)
        self._held = [RangeSet() for _ in blocks]
        self._unchanged = [RangeSet() for _ in blocks]
        self._changed = [RangeSet() for _ in blocks]
        self._outstanding: deque[m.PageRun] = deque()
        self._over: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        #: the source's Hello on the urgent channel named from-copy (set by the service)
        self.source_compares: bool | None = None

    @property
    def done(self) -> bool:
        """Every Digests sent has its answer."""
        return not self._outstanding

    def prepare(self) -> list[m.Digests]:
        """List and digest the pages the copy holds (blocking I/O and hashing: run it in a thread).

        Raises:
            OSError: a block file could not be read or filled.
        """
        messages: list[m.Digests] = []
        for block in self._memory:
            size = block.page_size
            runs = block.shm.held_runs()  # fallocated zero pages nobody touched are punched (missing)
            if runs is None:  # hugetlbfs: fill the holes, then every page is held
                os.posix_fallocate(block.shm.fd, 0, block.length)
                runs = [(0, block.length)]
            for start, stop in runs:
                self._held[block.index].add(start // size, -(-stop // size))
            buffer = bytearray(min(m.LIMITS.max_digests * size, block.length))
            for first, stop in self._held[block.index]:
                for chunk in range(first, stop, m.LIMITS.max_digests):
                    count = min(m.LIMITS.max_digests, stop - chunk)
                    view = memoryview(buffer)[: count * size]
                    _read(block.shm.fd, view, chunk * size)
                    messages.append(m.Digests(block=block.index, first=chunk,
                                              digests=tuple(page_digests(view, size, count))))
        return messages

    async def exchange(self, digests: list[m.Digests], send: Callable[[m.Message], None],
                       urgent_open: Callable[[], bool], *, poll: float = 0.005) -> None:
        """Send the Digests on the urgent channel once it is open (if the source can compare)
        and wait for every answer, or for :meth:`abandon`."""
        while not urgent_open() or self.source_compares is None:
            if self._over.done():
                return
            await asyncio.sleep(poll)
        if not self.source_compares or not digests:
            return
        for msg in digests:
            self._outstanding.append(msg.run)
            send(msg)
        await self._over

    def abandon(self) -> None:
        """Stop waiting (the urgent channel broke, or the migration ended): unanswered pages go."""
        if not self._over.done():
            self._over.set_result(None)

    def answered(self, msg: m.Changed) -> None:
        """The source's answer to the oldest outstanding Digests.

        Raises:
            RemoteProtocolError: no Digests is outstanding, or it named another run.
        """
        if not self._outstanding or self._outstanding[0] != msg.run:
            raise RemoteProtocolError(f"Changed for {msg.run} does not answer the oldest outstanding Digests "
                                      f"({self._outstanding[0] if self._outstanding else 'none'})")
        run = self._outstanding.popleft()
        if not self._outstanding and not self._over.done():
            self._over.set_result(None)
        self._unchanged[run.block].add(run.first, run.stop)
        bounds = msg.changed
        for low, high in zip(bounds[::2], bounds[1::2]):
            self._unchanged[run.block].subtract(run.first + low, run.first + high)
            self._changed[run.block].add(run.first + low, run.first + high)

    def finish(self) -> tuple[list[list[tuple[int, int]]], CopyResult]:
        """Punch every held page that is not known unchanged; return the unchanged runs by block.

        Raises:
            OSError: a hole could not be punched.
        """
        held = unchanged = changed = 0
        for block in self._memory:
            size, index = block.page_size, block.index
            for first, stop in self._held[index]:
                for low, high in RangeSet(self._unchanged[index].intersection(first, stop)).gaps(first, stop):
                    block.shm.punch_hole(low * size, (high - low) * size)
            held += self._held[index].total()
            unchanged += self._unchanged[index].total()
            changed += self._changed[index].total()
        self._outstanding.clear()
        result = CopyResult(held=held, unchanged=unchanged, changed=changed,
                            unanswered=held - unchanged - changed)
        return [list(runs) for runs in self._unchanged], result


def _read(fd: int, view: memoryview, offset: int) -> None:
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            raise OSError(f"the copy ends at byte {offset + got}")
        got += n
