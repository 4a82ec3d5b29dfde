"""Placing the background sweep on threads: :class:`BackgroundPlacer`.

Theory of operation
-------------------
Urgent pages are placed inline on the loop thread: that is the shortest path
from a reply to a woken thread.  The background sweep goes to
:class:`BackgroundPlacer`, fed from a small pool of staging buffers; every run
is carried out with the kernel's rules of
:class:`~aiopostcopy.destination.placer.Placement`.  A buffer's runs go to a
placing thread written in C (:class:`aiopostcopy.uffd.placing.PlacingThread`):
it runs at a raised nice value so that the fault path goes first (and in
SCHED_IDLE under the starvation guard of
:class:`aiopostcopy.priority.BackgroundThreads` where the process may bring it
back), and takes no GIL at all.  A Python thread there held the GIL between its ioctls, the
scheduler left it off the CPU while it held it, and the loop thread waited:
measured with ``perf sched`` under the sweep, about 300 waits for the GIL in
1.5 s, up to 3.7 ms each, all for that thread; with the C thread, one in a
whole sweep run (benchmarks/README.md).  A run the C thread stops in (a page
present, an EAGAIN, an error) is finished by a Python worker thread, which
knows what each errno means.  Zero runs, which need no buffer, have a thread
of their own (a sparse image's holes are then filled while its data is being
copied).  The session already allows placement to finish later (pages stay
PLACING, so an urgent copy of the same page is skipped and its waiters wait
for the background copy).  The worker never drains events: on EAGAIN it hands
the unfinished commands back, with the page to go on from, and the loop thread
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
import logging
from collections.abc import Callable, Sequence

from aiopostcopy.core.commands import Place, PlaceZero
from aiopostcopy.destination.memory import Staging
from aiopostcopy.destination.placer import Interrupted, Placement
from aiopostcopy.errors import InternalError
from aiopostcopy.priority import BackgroundThreads, set_niceness
from aiopostcopy.uffd import placing

__all__ = ["BackgroundPlacer", "PlacementDone"]

log = logging.getLogger("aiopostcopy.destination")

#: The placement thread's nice value, absolute (see _lower_priority): above the loop thread's.
PLACER_NICENESS = 10
#: Job slots of the C placing thread: the runs of every staging buffer out at once, with room to spare.
_THREAD_JOBS = 1024

#: (commands placed, each with how many of its pages existed already; commands left undone,
#: each with the page to go on from and the pages found existing so far; the staging buffer;
#: the error that stopped the worker, or None)
PlacementDone = Callable[[list[tuple[Place | PlaceZero, int]], list[tuple[Place | PlaceZero, int, int]],
                          Staging | None, BaseException | None], None]


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
        # the C thread runs in SCHED_IDLE where the guard may bring it back (aiopostcopy.priority)
        self._background = BackgroundThreads(loop)
        if self._thread is not None:
            loop.add_reader(self._thread.fileno(), self._on_thread_placed)
            tid = self._thread.native_id
            if tid:
                self._background.add(tid, PLACER_NICENESS)

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
        self._background.close()
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
