"""Placing arrived pages through the service's own mapping, by the kernel's rules: :class:`Placement`.

Theory of operation
-------------------
A ``Place`` command names a run, the stretches of it that are zero pages and
where its other pages sit in a staging buffer; ``PlaceZero`` names a run of
zero pages.  :class:`Placement` carries one out: each data stretch with one
UFFDIO_COPY, each zero stretch with UFFDIO_ZEROPAGE (hugetlbfs has none: a
zeroed huge page is copied instead).  Kernel rules (DESIGN.md section 2):

* EEXIST: the page is there already.  Only the service places pages, so
  someone else filled it (a client that touched memory it had not
  registered): the right bytes are written over it through the service's
  mapping, it is counted (an integrity page: the session wakes its waiters,
  since no copy woke them, and the report says the migration is not
  verified), and the rest of the run goes on.
* EAGAIN after some pages: the kernel stopped part-way (an existing page
  further on gives this, not EEXIST); the rest is tried again at once.
* EAGAIN with no progress: the mapping is changing.  The caller's ``drain``
  reads our userfaultfd's pending events (on the loop thread), then the rest
  is retried.  Only these count against the retry bound; a run of a thousand
  scattered existing pages is not a failure.

The 2 MiB-aligned stretches of a zero run on shmem (``ALLOCATE_ALIGN``) are
put into the block's file with fallocate instead: the kernel only allocates the pages (a
touch zeroes one when it first maps it), about twice as fast as UFFDIO_ZEROPAGE,
which maps each page into the service as it goes.  A sparse snapshot's holes
are almost all such runs.  fallocate keeps pages already there instead of
failing, so those are found first (SEEK_DATA, which shows only pages someone
wrote or touched) and treated as EEXIST would be; and fallocate wakes nobody,
so the range is woken on the service's userfaultfd after it.  Only aligned
stretches: on a tmpfs mounted ``huge=`` (or with shmem THP enabled), fallocate
allocates whole huge folios, and one reaching past the run would make pages
present that have not arrived (the next UFFDIO_COPY there is EEXIST).

One try is one C call (``Userfaultfd.place_run``) for the rest of the run,
every stretch included, so the GIL is released once per run.

Urgent pages are placed inline on the loop thread, through :class:`Placement`:
that is the shortest path from a reply to a woken thread.  The background
sweep is placed on threads, by
:class:`~aiopostcopy.destination.background.BackgroundPlacer`, with the same
:class:`Placement`.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

from aiopostcopy.core.commands import Place, PlaceZero
from aiopostcopy.destination.memory import BlockMemory, MappedBlock, Staging
from aiopostcopy.errors import PageExistsError, UffdError, UffdRetry
from aiopostcopy.uffd import Userfaultfd

__all__ = ["Interrupted", "Placement"]

#: EAGAIN retries of one run before giving up (each one drains events first).
MAX_EAGAIN = 1000


def _pmd_size() -> int:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 2 << 20


#: fallocate fills the stretches of a shmem zero run that are whole, aligned multiples of this
#: (the largest folio shmem allocates, a PMD: 2 MiB on x86-64); the ends go by UFFDIO_ZEROPAGE.
ALLOCATE_ALIGN = _pmd_size()


class Interrupted(Exception):
    """EAGAIN on the placement thread: the loop thread must drain events and go on from ``page``."""

    def __init__(self, page: int, existed: int) -> None:
        super().__init__(page, existed)
        self.page, self.existed = page, existed


class Placement:
    """Carries out Place / PlaceZero commands with one userfaultfd over the service's blocks.

    Args:
        uffd: the service's own userfaultfd (registered on every block).
        memory: the blocks, mapped by the service.
        zero_page: address of zero bytes at least as long as the largest page
            (what hugetlbfs zero pages are copied from; it has no ZEROPAGE).
    """

    def __init__(self, uffd: Userfaultfd, memory: BlockMemory, zero_page: int) -> None:
        self._uffd, self._memory, self._zero_page = uffd, memory, zero_page

    def place(self, command: Place | PlaceZero, staging: Staging | None, drain: Callable[[], None] | None,
              *, start: int = 0) -> int:
        """Place one command's pages from page ``start`` of it; returns how many were there already.

        Each try is one C call for the whole rest of the run (data stretches
        copied, zero stretches zero-filled), so the GIL is released once per
        run, not once per stretch.

        Args:
            staging: where a Place's payload is (None for PlaceZero).
            drain: reads our events after EAGAIN; None raises Interrupted instead.

        Raises:
            Interrupted: EAGAIN and no ``drain``.
            UffdError: EAGAIN past MAX_EAGAIN retries, or another errno.
        """
        run = self.run_of(command, staging)
        if run is not None:
            dst, src, size, count, zeros, zero_src = run
            return self._copy(dst, src, size, count, zeros, zero_src, start, drain, 0)
        # a zero run on shmem: copy the head, allocate the aligned middle, copy the tail
        block = self._memory.block(command.block)
        size = block.page_size
        dst, zeros = block.address + command.first * size, (0, command.count)
        low, high = _allocatable(command.first, command.count, size)
        if start >= high:
            return self._copy(dst, 0, size, command.count, zeros, 0, start, drain, 0)
        existed = self._copy(dst, 0, size, low, (0, low), 0, start, drain, 0) if start < low else 0
        existed += self._allocate(block, command.first + max(start, low), high - max(start, low))
        return self._copy(dst, 0, size, command.count, zeros, 0, high, drain, existed)

    @property
    def uffd_fd(self) -> int:
        """The service's userfaultfd, for the placing thread."""
        return self._uffd.fileno()

    def run_of(self, command: Place | PlaceZero, staging: Staging | None) -> tuple | None:
        """The arguments of one ``place_run`` that places all of ``command`` (``dst, src, page_size,
        count, zeros, zero_src``), or None when it needs more than that call (a zero run with
        stretches fallocate fills): then only :meth:`place` carries it out."""
        block = self._memory.block(command.block)
        size = block.page_size
        zero_src = 0 if block.zeropage_ok else self._zero_page
        if type(command) is PlaceZero:
            if block.zeropage_ok:
                low, high = _allocatable(command.first, command.count, size)
                if low < high:
                    return None
            return block.address + command.first * size, 0, size, command.count, (0, command.count), zero_src
        assert staging is not None, "Place without its staging buffer"
        return (block.address + command.first * size, staging.address + command.payload_offset * size, size,
                command.count, command.zeros, zero_src)

    def _copy(self, dst: int, src: int, size: int, count: int, zeros: tuple[int, ...], zero_src: int, page: int,
              drain: Callable[[], None] | None, existed: int) -> int:
        """Place pages ``[page, count)`` of a run with the ioctls (see :meth:`place`); returns
        ``existed`` plus the pages found there already."""
        retries = 0
        while page < count:
            try:
                self._uffd.place_run(dst, src, size, count, zeros, zero_src=zero_src, start=page)
                break
            except PageExistsError as exc:  # someone else filled it: write the right bytes, go on after it
                _overwrite(dst + exc.page * size, src, size, zeros, exc.page)
                existed += 1
                page = exc.page + 1
            except UffdRetry as exc:
                if exc.page > page:  # progress, then a stop (often an existing page): go on at once
                    page = exc.page
                    continue
                if drain is None:
                    raise Interrupted(exc.page, existed) from exc
                retries += 1
                if retries > MAX_EAGAIN:
                    raise UffdError(11, f"placing {count} pages at {dst:#x} kept failing with EAGAIN") from exc
                drain()
        return existed

    def _allocate(self, block: MappedBlock, first: int, count: int) -> int:
        """Zero pages ``[first, first + count)`` of a shmem block with fallocate (see the module
        docstring); returns how many were there already.

        Pages already in the file (SEEK_DATA) were filled by someone else, as
        EEXIST would say: they are zeroed through the mapping and counted.  A page
        touched between that look and the fallocate is kept as touched, like a
        touch just after a copy.  Then the service's own waiters are woken (the
        ioctls wake them; fallocate does not).
        """
        size = block.page_size
        offset, length = first * size, count * size
        existed = 0
        for low, high in block.shm.data_runs(offset, length) or ():
            low, high = low // size * size, -(-high // size) * size
            ctypes.memset(block.address + low, 0, high - low)
            existed += (high - low) // size
        block.shm.allocate(offset, length)
        self._uffd.wake(block.address + offset, length)
        return existed


def _allocatable(first: int, count: int, page_size: int) -> tuple[int, int]:
    """The part of a zero run (pages relative to ``first``) that fallocate may fill: whole
    ALLOCATE_ALIGN stretches, so that no folio it allocates reaches a page outside the run."""
    per = ALLOCATE_ALIGN // page_size
    low, high = -(-first // per) * per, (first + count) // per * per
    return (low - first, high - first) if high > low else (0, 0)


def _overwrite(address: int, src: int, size: int, zeros: tuple[int, ...], page: int) -> None:
    """Write page ``page`` of a run over a page that was already there (EEXIST).

    Only the service places pages, so a page present before its placement was
    filled by someone else (a client that touched memory it had not registered
    reads, and so fills, zeros).  The page is present, so writing it through the
    service's mapping cannot fault; the session counts it as an integrity page.
    """
    zero_before = 0
    for low, high in zip(zeros[::2], zeros[1::2]):
        if low <= page < high:
            ctypes.memset(address, 0, size)
            return
        if high <= page:
            zero_before += high - low
    ctypes.memmove(address, src + (page - zero_before) * size, size)
