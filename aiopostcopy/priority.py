"""Thread priorities: who runs first when the CPUs are busy.

Linux keeps a nice value per thread, so one thread of a process can yield to
the others.  Both ends use it for the same rule: the fault path (a blocked
thread waiting for its page) runs first, the background stream takes what is
left.  The destination's placement thread and the source's sweep threads raise
their own nice value (no privilege needed); the destination's loop thread and
the source's urgent thread may lower their own (root or CAP_SYS_NICE).

A nice value alone does not make a woken thread run at once: the scheduler
(EEVDF) lets the thread on the CPU finish its slice first, so a faulting thread
woken by its page, or the thread that answers it, could wait a slice (about a
millisecond) behind a sweep thread at nice 10.  Where the process may undo it
(:func:`may_leave_idle`: root, CAP_SYS_NICE or a high enough RLIMIT_NICE), the
background threads therefore run in the SCHED_IDLE class, which any other
thread that wakes preempts at once, and which the kernel counts as idle when it
picks a CPU for a woken thread.  That class alone could starve the stream on a
host whose CPUs other work keeps busy, and the migration would never end for
memory nobody touches.  :class:`BackgroundThreads` (run by the event loop of
each end) guards against it: it reads each background thread's run-queue wait
(``/proc/self/task/TID/schedstat``) every :data:`GUARD_INTERVAL` seconds, and a
thread that waited for a CPU for most of an interval (:data:`STARVED_SHARE`) is
put back at its nice value for :data:`RESTORED_FOR` seconds, then returned to
SCHED_IDLE.  Without the right to leave SCHED_IDLE, or without schedstat, the
threads keep their nice value alone, as before.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import threading
import time

__all__ = ["GUARD_INTERVAL", "RESTORED_FOR", "STARVED_SHARE", "BackgroundThreads", "may_leave_idle",
           "run_delay_ns", "set_niceness", "thread_niceness"]

log = logging.getLogger("aiopostcopy")

#: seconds between the guard's looks at the background threads
GUARD_INTERVAL = 0.1
#: a background thread that waited for a CPU this share of an interval is starving
STARVED_SHARE = 0.8
#: seconds a starving background thread runs at its nice value before it goes back to SCHED_IDLE
RESTORED_FOR = 1.0

_CAP_SYS_NICE = 23


def set_niceness(niceness: int) -> bool:
    """Set the calling thread's nice value; False: not allowed (a lower value than now needs root
    or CAP_SYS_NICE), nothing changed."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)
    except OSError:
        return False
    return True


def thread_niceness() -> int:
    """The calling thread's nice value."""
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def may_leave_idle(niceness: int, *, cap_eff: int | None = None, rlimit_nice: int | None = None) -> bool:
    """Whether this process may move a thread from SCHED_IDLE back to SCHED_OTHER at ``niceness``:
    with CAP_SYS_NICE, or with an RLIMIT_NICE of at least ``20 - niceness`` (the kernel's rule).
    ``cap_eff`` (the effective capability bits) and ``rlimit_nice`` (its soft limit) default to
    this process's own."""
    if cap_eff is None:
        cap_eff = _effective_capabilities()
    if rlimit_nice is None:
        rlimit_nice = resource.getrlimit(resource.RLIMIT_NICE)[0]
    if cap_eff >> _CAP_SYS_NICE & 1:
        return True
    return rlimit_nice == resource.RLIM_INFINITY or rlimit_nice >= 20 - niceness


def _effective_capabilities() -> int:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


def run_delay_ns(tid: int) -> int | None:
    """Nanoseconds thread ``tid`` of this process has waited on a run queue, in all (schedstat's
    second field); None: no such thread, or the kernel keeps no schedstat."""
    try:
        with open(f"/proc/self/task/{tid}/schedstat", "rb") as stat:
            return int(stat.read().split()[1])
    except (OSError, IndexError, ValueError):
        return None


class BackgroundThreads:
    """The background stream's threads of one end, in SCHED_IDLE under a starvation guard (see the
    module docstring).  Threads come and go from any thread; the guard runs on ``loop``.

    Args:
        loop: the event loop that runs the guard.
        interval: seconds between looks (:data:`GUARD_INTERVAL`).
        starved_share: the share of an interval a thread waited for a CPU that restores its
            nice value (:data:`STARVED_SHARE`).
        restored_for: seconds it keeps its nice value (:data:`RESTORED_FOR`).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, *, interval: float = GUARD_INTERVAL,
                 starved_share: float = STARVED_SHARE, restored_for: float = RESTORED_FOR) -> None:
        self._loop = loop
        self._interval, self._starved_share, self._restored_for = interval, starved_share, restored_for
        self._lock = threading.Lock()
        # tid -> [niceness, run delay at the last look, monotonic time of that look, restored until (0: idle)]
        self._threads: dict[int, list[float]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._armed = False
        self._closed = False
        self.restored = 0  #: times a starving thread was put back at its nice value

    def add(self, tid: int, niceness: int) -> bool:
        """Watch thread ``tid`` (of this process, at nice ``niceness`` already) and put it in
        SCHED_IDLE.  Returns False, with nothing changed, where the process could not undo that
        (:func:`may_leave_idle`), schedstat is missing, or the guard is closed."""
        delay = run_delay_ns(tid)
        if delay is None or not may_leave_idle(niceness):
            return False
        with self._lock:
            if self._closed:
                return False
            try:
                os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
            except OSError as exc:
                log.debug("aiopostcopy: thread %d stays at nice %d: %s", tid, niceness, exc)
                return False
            self._threads[tid] = [niceness, delay, time.monotonic(), 0.0]
            arm = not self._armed
            self._armed = True
        if arm:
            try:
                self._loop.call_soon_threadsafe(self._arm)
            except RuntimeError:  # the loop is closed: nothing will run the guard
                self.discard(tid)
                return False
        return True

    def add_current(self, niceness: int) -> bool:
        """Set the calling thread's nice value, then :meth:`add` it.  Returns what :meth:`add` does
        (the nice value is set in any case, where allowed)."""
        set_niceness(niceness)
        return self.add(threading.get_native_id(), niceness)

    def discard(self, tid: int) -> None:
        """Stop watching ``tid`` (before the thread ends: its id may be reused).  Its class stays."""
        with self._lock:
            self._threads.pop(tid, None)

    def watched(self) -> list[int]:
        """The thread ids watched now."""
        with self._lock:
            return list(self._threads)

    def close(self) -> None:
        """Stop the guard (on the loop's thread).  The threads keep their class."""
        with self._lock:
            self._closed = True
            self._threads.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _arm(self) -> None:
        if self._timer is None and not self._closed:
            self._timer = self._loop.call_later(self._interval, self._look)

    def _look(self) -> None:
        """Restore the nice value of each idle thread that starved since the last look; return those
        whose time is up to SCHED_IDLE."""
        self._timer = None
        now = time.monotonic()
        with self._lock:
            for tid, entry in list(self._threads.items()):
                niceness, before, at, until = entry
                delay = run_delay_ns(tid)
                if delay is None:  # the thread is gone
                    del self._threads[tid]
                    continue
                entry[1], entry[2] = delay, now
                try:
                    if until and now >= until:
                        os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
                        entry[3] = 0.0
                    elif not until and delay - before >= self._starved_share * (now - at) * 1e9:
                        os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
                        entry[3] = now + self._restored_for
                        self.restored += 1
                        log.debug("aiopostcopy: background thread %d starved in SCHED_IDLE: nice %d for %.1f s",
                                  tid, niceness, self._restored_for)
                except OSError as exc:  # gone meanwhile, or no longer allowed: stop watching it
                    log.warning("aiopostcopy: background thread %d: %s; it is no longer watched", tid, exc)
                    del self._threads[tid]
            if not self._threads:
                self._armed = False
                return
        self._timer = self._loop.call_later(self._interval, self._look)
