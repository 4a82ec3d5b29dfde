"""A placing thread in C: :class:`PlacingThread` runs ``place_run`` jobs without the GIL.

A placing thread written in Python takes the GIL between its ioctls.  Run at a
raised nice value (so that the fault path goes first), the scheduler leaves it
off the CPU while it holds the GIL, and the thread reading faults waits for it:
a priority inversion.  This thread is C from end to end: it takes jobs from a
ring of slots shared with Python, places each run with one call of the same C
helper :meth:`Userfaultfd.place_run` uses, publishes the result in the job's
slot and, for a job submitted with ``notify``, writes an eventfd the event
loop watches (:meth:`fileno`).  Python takes the results with
:meth:`finished`.

It is mechanism only: a job that stops (EEXIST, EAGAIN, any errno) reports the
errno and the first page it did not place; what that means is the caller's
business.  The memory a job names (destination, payload, zero-stretch bounds)
must stay valid until its result has been taken.
"""

from __future__ import annotations

import os
import time
from typing import Any, NamedTuple

from aiopostcopy.uffd.binding import ffi, lib

__all__ = ["Placed", "PlacingThread", "available"]


def available() -> bool:
    """The binding was built with the placing thread (a build older than this module has none)."""
    return hasattr(lib, "apc_placer_start")


class Placed(NamedTuple):
    """The result of one job: its ``tag``, 0 or the errno that stopped it, the first page not placed."""

    tag: int
    error: int
    page: int


class PlacingThread:
    """A C thread placing runs of pages with one userfaultfd.

    Args:
        uffd_fd: the userfaultfd the runs are placed with (kept open by the caller while this runs).
        capacity: job slots; :attr:`room` says how many are free.
        niceness: the thread's nice value (absolute), or None to keep the caller's.
    """

    def __init__(self, uffd_fd: int, capacity: int, niceness: int | None = None) -> None:
        self._eventfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._capacity = capacity
        self._jobs = ffi.new("struct apc_job[]", capacity)
        self._placer = ffi.new("struct apc_placer *")
        # what each slot's job points at (its zero-stretch bounds), kept alive until taken back
        self._keep: list[Any] = [None] * capacity
        self._tags = [0] * capacity
        self._submitted = self._taken = 0
        self._pending = 0  # slots written since the last hand-over
        rc = lib.apc_placer_start(self._placer, uffd_fd, self._jobs, capacity, self._eventfd,
                                  lib.APC_NICE_INHERIT if niceness is None else niceness)
        if rc:
            os.close(self._eventfd)
            raise OSError(rc, f"starting the placing thread: {os.strerror(rc)}")
        self._running = True

    @property
    def room(self) -> int:
        """Free job slots."""
        return self._capacity - (self._submitted + self._pending - self._taken)

    @property
    def native_id(self) -> int:
        """The thread's id (as ``threading.get_native_id()`` gives a thread its own), once it runs:
        this waits up to a second for it to start (at its nice value); 0 if it did not, after
        :meth:`close`, or where the build has no accessor."""
        if not hasattr(lib, "apc_placer_tid") or not self._running:
            return 0
        deadline = time.monotonic() + 1.0
        while not (tid := lib.apc_placer_tid(self._placer)) and self._running and time.monotonic() < deadline:
            time.sleep(0.0005)
        return tid

    def fileno(self) -> int:
        """The eventfd written after each job submitted with ``notify`` (readable: call :meth:`finished`)."""
        return self._eventfd

    def add(self, tag: int, dst: int, src: int, page_size: int, count: int, zeros: tuple[int, ...] = (), *,
            zero_src: int = 0, start: int = 0, notify: bool = False) -> None:
        """Write one job (the arguments of :meth:`Userfaultfd.place_run`) into a free slot; it runs
        after :meth:`submit`.

        Raises:
            OverflowError: no free slot (check :attr:`room`).
        """
        if not self._running:
            raise ValueError("the placing thread is stopped")
        if self.room <= 0:
            raise OverflowError("no free job slot in the placing thread")
        slot = (self._submitted + self._pending) % self._capacity
        job = self._jobs[slot]
        job.dst, job.src, job.page_size, job.count = dst, src, page_size, count
        job.zero_src, job.start, job.notify = zero_src, start, notify
        if zeros:
            bounds = self._keep[slot] = ffi.new("uint64_t[]", zeros)
            job.zeros, job.nzeros = bounds, len(zeros)
        else:
            job.zeros, job.nzeros = ffi.NULL, 0
        self._tags[slot] = tag
        self._pending += 1

    def submit(self) -> None:
        """Hand the jobs added since the last call to the thread."""
        if self._pending:
            count, self._pending = self._pending, 0
            self._submitted += count
            lib.apc_placer_submit(self._placer, count)

    def finished(self) -> list[Placed]:
        """The results of the jobs finished since the last call, in submission order."""
        try:
            os.eventfd_read(self._eventfd)
        except BlockingIOError:
            pass
        placed = lib.apc_placer_placed(self._placer) if self._running else self._taken
        results = []
        for index in range(self._taken, placed):
            slot = index % self._capacity
            job = self._jobs[slot]
            results.append(Placed(self._tags[slot], job.error, job.page))
            self._keep[slot] = None
        self._taken = placed
        return results

    def close(self) -> None:
        """Stop the thread after the job it is running (the rest are not placed) and wait for it."""
        if self._running:
            self._running = False
            lib.apc_placer_stop(self._placer)
            os.close(self._eventfd)

    def __del__(self) -> None:  # the thread uses this object's memory: it must not outlive it
        if getattr(self, "_running", False):
            self.close()
