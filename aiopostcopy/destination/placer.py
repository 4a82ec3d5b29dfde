"""Placing arrived pages through the service's own mapping, inline or on a placement thread.

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

Urgent pages are placed inline on the loop thread: that is the shortest path
from a reply to a woken thread.  The background sweep goes to
:class:`BackgroundPlacer`, fed from a small pool of staging buffers.  A
buffer's runs go to a placing thread written in C
(:class:`aiopostcopy.uffd.placing.PlacingThread`): it runs at a raised nice
value so that the fault path goes first, and takes no GIL at all.  A Python
thread there held the GIL between its ioctls, the scheduler left it off the CPU
while it held it, and the loop thread waited: measured with ``perf sched``
under the sweep, about 300 waits for the GIL in 1.5 s, up to 3.7 ms each, all
for that thread; with the C thread, one in a whole sweep run
(benchmarks/README.md).  A run the C thread stops in (a page present, an
EAGAIN, an error) is finished by a Python worker thread, which knows what each
errno means.  Zero runs, which need no buffer, have a thread of their own (a
sparse image's holes are then filled while its data is being copied).
The session already allows placement to finish later (pages stay PLACING, so
an urgent copy of the same page is skipped and its waiters wait for the
background copy).  The worker never drains events: on EAGAIN it hands the
unfinished commands back, with the page to go on from, and the loop thread
finishes them inline.

Flow control: a Pages payload needs a free buffer before its header is
decoded, so the loop holds the background channel's messages while every
buffer is out (:meth:`BackgroundPlacer.has_free`) and releases them when a
placement finishes.

Pages larger than a buffer (1 GiB: docs/protocol.md, "Huge pages") arrive
whole, one per frame, into one extra buffer of that size; while it is out
(received into, then placed with one UFFDIO_COPY on the thread) nothing else
is taken, so at most one such page is between the wire and its placement.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import logging
from collections.abc import Callable, Sequence

from aiopostcopy.core.commands import Place, PlaceZero
from aiopostcopy.destination.memory import BlockMemory, MappedBlock, Staging
from aiopostcopy.errors import InternalError, PageExistsError, UffdError, UffdRetry
from aiopostcopy.priority import set_niceness
from aiopostcopy.uffd import Userfaultfd, placing

__all__ = ["BackgroundPlacer", "Placement", "PlacementDone"]

log = logging.getLogger("aiopostcopy.destination")

#: EAGAIN retries of one run before giving up (each one drains events first).
MAX_EAGAIN = 1000
#: The placement thread's nice value, absolute (see _lower_priority): above the loop thread's.
PLACER_NICENESS = 10
#: Job slots of the C placing thread: the runs of every staging buffer out at once, with room to spare.
_THREAD_JOBS = 1024


def _pmd_size() -> int:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 2 << 20


#: fallocate fills the stretches of a shmem zero run that are whole, aligned multiples of this
#: (the largest folio shmem allocates, a PMD: 2 MiB on x86-64); the ends go by UFFDIO_ZEROPAGE.
ALLOCATE_ALIGN = _pmd_size()

#: (commands placed, each with how many of its pages existed already; commands left undone,
#: each with the page to go on from and the pages found existing so far; the staging buffer;
#: the error that stopped the worker, or None)
PlacementDone = Callable[[list[tuple[Place | PlaceZero, int]], list[tuple[Place | PlaceZero, int, int]],
                          Staging | None, BaseException | None], None]


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


class BackgroundPlacer:
    """The placing threads and the staging buffers they place from: the C thread for a buffer's
    runs, a Python one for the runs it stops in (and all of them where the binding has no C
    thread), and one for zero runs alone.

    Args:
        loop: the service's event loop (completions are delivered on it).
        placement: carries the commands out.
        buffers: staging buffers in the pool (one is received into while the
            others are placed).
        buffer_size: bytes each (the largest payload a frame of several pages may carry).
        on_done: called on the loop thread when a submitted job finishes.
        huge_page_size: the largest page size of the blocks; a page larger than
            ``buffer_size`` gets a buffer of its own (see the module docstring).
        zero_niceness: the nice value of the zero-run thread (None: the one it
            inherits from the loop thread, which may run at a raised priority).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, placement: Placement, *, buffers: int, buffer_size: int,
                 on_done: PlacementDone, huge_page_size: int = 0, zero_niceness: int | None = None) -> None:
        self._loop, self._placement, self._on_done = loop, placement, on_done
        self._free = [Staging(buffer_size) for _ in range(buffers)]
        self._buffer_size = buffer_size
        self._huge = Staging.huge(huge_page_size) if huge_page_size > buffer_size else None
        self._huge_out = False
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="aiopostcopy-placer",
                                                               initializer=_lower_priority)
        # not niced: its work is the kernel's (page allocation), and a niced one fell behind the
        # data (a sparse snapshot's migration took 1.1x longer)
        self._zero_executor = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="aiopostcopy-zero", initializer=None if zero_niceness is None else set_niceness,
            initargs=() if zero_niceness is None else (zero_niceness,))
        self._closed = False
        # a staging buffer's runs are placed by the C thread (no GIL between its ioctls); a run it
        # stops in (EEXIST, EAGAIN, an error) is finished on the Python thread, which decides
        self._thread = _start_placing_thread(placement.uffd_fd) if placing.available() else None
        self._jobs: dict[int, tuple[_Batch, int]] = {}  # tag -> (its batch, its index in the batch)
        self._next_tag = 0
        if self._thread is not None:
            loop.add_reader(self._thread.fileno(), self._on_thread_placed)

    def has_free(self) -> bool:
        return bool(self._free) and not self._huge_out

    def take(self, nbytes: int = 0) -> Staging:
        """A free staging buffer for ``nbytes`` (the caller holds input while none is free)."""
        if nbytes > self._buffer_size:
            if self._huge is None or self._huge_out or nbytes > self._huge.size:
                raise InternalError(f"no staging buffer for a {nbytes}-byte page")
            self._huge_out = True
            return self._huge
        if not self._free or self._huge_out:  # a bug, not a connection problem: fail the migration visibly
            raise InternalError("no free staging buffer: the background channel was not held")
        return self._free.pop()

    def give_back(self, staging: Staging | None) -> None:
        if staging is None:
            return
        if staging is self._huge:
            self._huge_out = False
        else:
            self._free.append(staging)

    def submit(self, commands: Sequence[Place | PlaceZero], staging: Staging | None) -> None:
        """Place ``commands``: a staging buffer's runs on the C placing thread when it can carry them
        all out, the rest on the Python thread (zero runs alone: on the zero thread); ``on_done``
        follows on the loop thread."""
        if staging is not None and self._thread is not None and self._thread.room >= len(commands):
            runs = [self._placement.run_of(command, staging) for command in commands]
            if None not in runs:
                self._to_thread(_Batch(list(commands), staging), runs)
                return
        executor = self._zero_executor if staging is None else self._executor
        future = executor.submit(self._work, list(commands), staging)
        future.add_done_callback(lambda f: self._deliver(f, staging))

    def close(self) -> None:
        """Wait for the running placement (it must end before the blocks are unmapped)."""
        self._closed = True
        if self._thread is not None:
            self._loop.remove_reader(self._thread.fileno())
            self._thread.close()
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._zero_executor.shutdown(wait=True, cancel_futures=True)

    def _to_thread(self, batch: _Batch, runs: list) -> None:
        assert self._thread is not None
        last = len(runs) - 1
        for index, (dst, src, size, count, zeros, zero_src) in enumerate(runs):
            tag = self._next_tag
            self._next_tag += 1
            self._jobs[tag] = (batch, index)
            self._thread.add(tag, dst, src, size, count, zeros, zero_src=zero_src, notify=index == last)
        self._thread.submit()

    def _on_thread_placed(self) -> None:
        """The C thread finished a batch's last job (on the loop thread): report the batches done;
        one with runs it stopped in goes to the Python thread, which finishes them from there."""
        if self._closed:
            return
        assert self._thread is not None  # its eventfd is the only reader that calls this
        for tag, error, page in self._thread.finished():
            batch, index = self._jobs.pop(tag)
            command = batch.commands[index]
            if error:
                batch.stopped.append(command)
                batch.starts.append(page)
            else:
                batch.placed.append((command, 0))
            if len(batch.placed) + len(batch.stopped) < len(batch.commands):
                continue
            if batch.stopped:
                future = self._executor.submit(self._work, batch.stopped, batch.staging, batch.starts, batch.placed)
                future.add_done_callback(lambda f, staging=batch.staging: self._deliver(f, staging))
            else:
                self._on_done(batch.placed, [], batch.staging, None)

    def _work(self, commands: list[Place | PlaceZero], staging: Staging | None, starts: Sequence[int] = (),
              placed: list[tuple[Place | PlaceZero, int]] | None = None):
        """Place ``commands`` (each from its page in ``starts``, or from its first), after those in
        ``placed`` already; returns ``(placed, rest, error)`` for ``on_done``."""
        placed = [] if placed is None else placed
        starts = starts or [0] * len(commands)
        for index, (command, start) in enumerate(zip(commands, starts)):
            try:
                placed.append((command, self._placement.place(command, staging, None, start=start)))
            except Interrupted as exc:
                later = zip(commands[index + 1:], starts[index + 1:])
                rest = [(command, exc.page, exc.existed)] + [(c, s, 0) for c, s in later]
                return placed, rest, None
            except BaseException as exc:  # reported on the loop thread, never lost
                return placed, [], exc
        return placed, [], None

    def _deliver(self, future: concurrent.futures.Future, staging: Staging | None) -> None:
        if future.cancelled() or self._closed:
            return
        placed, rest, error = future.result()
        try:
            self._loop.call_soon_threadsafe(self._on_done, placed, rest, staging, error)
        except RuntimeError:  # the loop is closed: nothing is waiting for this any more
            pass


def _start_placing_thread(uffd_fd: int) -> placing.PlacingThread | None:
    """The C placing thread, or None (the Python thread places everything) when it cannot start."""
    try:
        return placing.PlacingThread(uffd_fd, _THREAD_JOBS, PLACER_NICENESS)
    except OSError as exc:
        log.warning("the C placing thread did not start (%s): background pages are placed from Python", exc)
        return None


class _Batch:
    """The runs of one staging buffer on the C placing thread, and what became of them."""

    __slots__ = ("commands", "staging", "placed", "stopped", "starts")

    def __init__(self, commands: list[Place | PlaceZero], staging: Staging) -> None:
        self.commands, self.staging = commands, staging
        self.placed: list[tuple[Place | PlaceZero, int]] = []
        self.stopped: list[Place | PlaceZero] = []  # runs the thread stopped in, each from its page in starts
        self.starts: list[int] = []


def _lower_priority() -> None:
    """Run the placement thread at a lower priority than the rest of the process.

    On a machine whose CPUs the sweep keeps busy, the thread placing background
    pages competes with the loop thread (faults, urgent replies) and with the
    faulting threads themselves.  Linux keeps a nice value per thread, so the
    scheduler lets the fault path run first; the sweep uses what is left.
    Raising one's own nice value needs no privilege; failing to is harmless.
    """
    set_niceness(PLACER_NICENESS)
