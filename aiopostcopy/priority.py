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
(:func:`may_leave_idle`: CAP_SYS_NICE or a high enough RLIMIT_NICE), the
background threads therefore run in the SCHED_IDLE class, which any other
thread that wakes preempts at once, and which the kernel counts as idle when it
picks a CPU for a woken thread.  That class alone could starve the stream on a
host whose CPUs other work keeps busy, and the migration would never end for
memory nobody touches.  :class:`BackgroundThreads` (run by the event loop of
each end) guards against it: every :data:`GUARD_INTERVAL` seconds it reads each
background thread's run-queue wait (``/proc/self/task/TID/schedstat``, which
counts a wait when it ends) and its state, and a thread that waited for a CPU
for most of the interval (:data:`STARVED_SHARE`), or was waiting at two looks
in a row without running in between, is put back at its nice value for
:data:`RESTORED_FOR` seconds, then returned to SCHED_IDLE.  Without the right to
leave SCHED_IDLE (tried once per process), or without schedstat, the threads
keep their nice value alone, as before; when the guard closes, the threads it
still watches go back to their nice value.

A Python thread preempted in SCHED_IDLE may hold the GIL or a lock the loop
needs.  While the CPUs have room it runs again at once.  When other work keeps
them all busy, the loop, and with it the guard, waits until the scheduler gives
that thread a turn (SCHED_IDLE still has a small share), which may take hundreds
of milliseconds; only then does the guard bring it back.  The C placing thread
takes no GIL.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import threading
import time

__all__ = ["GUARD_INTERVAL", "RESTORED_FOR", "STARVED_SHARE", "BackgroundThreads", "can_idle", "may_leave_idle",
           "set_niceness", "thread_niceness"]

log = logging.getLogger("aiopostcopy")

#: seconds between the guard's looks at the background threads
GUARD_INTERVAL = 0.1
#: a background thread that waited for a CPU this share of an interval is starving
STARVED_SHARE = 0.8
#: seconds a starving background thread runs at its nice value before it goes back to SCHED_IDLE
RESTORED_FOR = 1.0

_CAP_SYS_NICE = 23

#: the system calls the guard makes (tests put a fake kernel here)
_set_class = os.sched_setscheduler
_get_class = os.sched_getscheduler


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


def _schedstat(tid: int) -> tuple[int, int] | None:
    """``(CPU time, run-queue wait)`` of thread ``tid`` in nanoseconds, or None."""
    try:
        with open(f"/proc/self/task/{tid}/schedstat", "rb") as stat:
            fields = stat.read().split()
        return int(fields[0]), int(fields[1])
    except (OSError, IndexError, ValueError):
        return None


def _runnable(tid: int) -> bool:
    """Thread ``tid`` is running or waiting for a CPU (state R)."""
    try:
        with open(f"/proc/self/task/{tid}/stat", "rb") as stat:
            return stat.read().rpartition(b")")[2].split()[0] == b"R"
    except (OSError, IndexError):
        return False


_probe_lock = threading.Lock()
_probed: dict[int, bool] = {}


def _leaves_idle(niceness: int) -> bool:
    """Whether a thread of this process at ``niceness`` really can leave SCHED_IDLE: tried once per
    process on a thread of its own (a capability the kernel does not count, in a user namespace
    say, shows in CapEff all the same).  The thread waits while its class is set from here, so
    it never runs in SCHED_IDLE itself."""
    with _probe_lock:
        if niceness not in _probed:
            started, done, tids = threading.Event(), threading.Event(), []

            def wait() -> None:
                tids.append(threading.get_native_id())
                started.set()
                done.wait()

            thread = threading.Thread(target=wait, name="aiopostcopy-sched-probe", daemon=True)
            try:
                thread.start()
            except RuntimeError:  # no thread to try it on (at exit, say): not this time
                return False
            started.wait()
            try:
                os.setpriority(os.PRIO_PROCESS, tids[0], niceness)
                os.sched_setscheduler(tids[0], os.SCHED_IDLE, os.sched_param(0))
                os.sched_setscheduler(tids[0], os.SCHED_OTHER, os.sched_param(0))
                _probed[niceness] = True
            except OSError:
                _probed[niceness] = False
            finally:
                done.set()
                thread.join()
        return _probed[niceness]


def can_idle(tid: int, niceness: int) -> bool:
    """Whether :meth:`BackgroundThreads.add` would put thread ``tid`` (at ``niceness``) in
    SCHED_IDLE: its schedstat shows CPU time ("0 0 0" is a kernel that keeps none), and this
    process may bring it back (:func:`may_leave_idle`, then tried once)."""
    return _idle_start(tid, niceness) is not None


def _idle_start(tid: int, niceness: int) -> tuple[int, int] | None:
    """:func:`can_idle`, giving the thread's schedstat (the guard's first reading) when it can."""
    stat = _schedstat(tid)
    if stat is None or not stat[0] or not may_leave_idle(niceness) or not _leaves_idle(niceness):
        return None
    return stat


class _Watched:
    """One background thread under the guard."""

    __slots__ = ("niceness", "cpu", "delay", "at", "runnable", "until")

    def __init__(self, niceness: int, cpu: int, delay: int, at: float) -> None:
        self.niceness, self.cpu, self.delay, self.at = niceness, cpu, delay, at
        self.runnable = False  #: state R at the last look
        self.until = 0.0  #: monotonic time its nice value ends (0: in SCHED_IDLE)


class BackgroundThreads:
    """The background stream's threads of one end, in SCHED_IDLE under a starvation guard (see the
    module docstring).  Threads come and go from any thread; the guard runs on ``loop``.

    A thread counts as starving when, since the last look, it waited for a CPU for
    ``starved_share`` of the time (waits are counted by the kernel as they end), or when it was
    waiting at both looks without running in between (a wait still going on).

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
        self._threads: dict[int, _Watched] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._armed = False
        self._closed = False
        self._refused = False  #: the kernel refused to bring a thread back: no thread is taken any more
        self.restored = 0  #: times a starving thread was put back at its nice value

    def add(self, tid: int, niceness: int) -> bool:
        """Watch thread ``tid`` (of this process, at nice ``niceness`` already) and put it in
        SCHED_IDLE.  Returns False, with the thread left in SCHED_OTHER, where the process could
        not bring it back (:func:`may_leave_idle`, then tried once), schedstat is missing, or the
        guard or its loop is closed."""
        stat = _idle_start(tid, niceness)
        if stat is None:
            return False
        with self._lock:
            if self._closed or self._refused or self._loop.is_closed():
                return False
            self._threads[tid] = _Watched(niceness, stat[0], stat[1], time.monotonic())
            arm = not self._armed
            self._armed = True
            if arm:
                try:
                    self._loop.call_soon_threadsafe(self._arm)
                except RuntimeError:  # the loop closed meanwhile: nothing would run the guard
                    self._armed = False
                    del self._threads[tid]
                    return False
        # SCHED_IDLE last, without the lock: a thread preempted there holds nothing the guard needs
        try:
            _set_class(tid, os.SCHED_IDLE, os.sched_param(0))
        except OSError as exc:
            log.debug("aiopostcopy: thread %d stays at nice %d: %s", tid, niceness, exc)
            self.discard(tid)
            return False
        with self._lock:
            if tid not in self._threads:  # closed or discarded meanwhile: nobody would bring it back
                _leave_idle(tid)
                return False
        return True

    def add_current(self, niceness: int) -> bool:
        """Set the calling thread's nice value, then :meth:`add` it.  Returns what :meth:`add` does
        (the nice value is set in any case, where allowed)."""
        set_niceness(niceness)
        return self.add(threading.get_native_id(), niceness)

    def discard(self, tid: int) -> None:
        """Stop watching ``tid`` (before the thread ends: its id may be reused), and put it back at
        its nice value: unwatched, nothing would bring it out of SCHED_IDLE."""
        with self._lock:
            if self._threads.pop(tid, None) is not None:
                _leave_idle(tid)

    def watched(self) -> list[int]:
        """The thread ids watched now."""
        with self._lock:
            return list(self._threads)

    def close(self) -> None:
        """Stop the guard (on the loop's thread).  The threads still watched go back to
        SCHED_OTHER at their nice value: nothing would bring them back from SCHED_IDLE."""
        with self._lock:
            self._closed = True
            for tid in self._threads:
                _leave_idle(tid)
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
        with self._lock:
            try:
                self._look_locked(time.monotonic())
            except Exception:  # never leave the threads unwatched: log it, look again next time
                log.exception("aiopostcopy: the background threads' guard failed to look at them")
            if not self._threads or self._closed:
                self._armed = False
                return
        self._timer = self._loop.call_later(self._interval, self._look)

    def _look_locked(self, now: float) -> None:
        for tid, entry in list(self._threads.items()):
            stat = _schedstat(tid)
            if stat is None:  # the thread is gone
                del self._threads[tid]
                continue
            runnable = _runnable(tid)
            starving = (stat[1] - entry.delay >= self._starved_share * (now - entry.at) * 1e9
                        or (runnable and entry.runnable and stat[0] == entry.cpu))
            entry.cpu, entry.delay, entry.at, entry.runnable = stat[0], stat[1], now, runnable
            try:
                if entry.until and now >= entry.until:
                    _set_class(tid, os.SCHED_IDLE, os.sched_param(0))
                    entry.until = 0.0
                elif not entry.until and starving:
                    _set_class(tid, os.SCHED_OTHER, os.sched_param(0))
                    entry.until = now + self._restored_for
                    self.restored += 1
                    log.debug("aiopostcopy: background thread %d starved in SCHED_IDLE: nice %d for %.1f s",
                              tid, entry.niceness, self._restored_for)
            except PermissionError as exc:  # the kernel no longer lets it out: take no more threads
                log.warning("aiopostcopy: background thread %d: %s; it stays in SCHED_IDLE, and no "
                            "further thread is put there", tid, exc)
                self._refused = True
                del self._threads[tid]
            except OSError as exc:  # gone meanwhile
                log.debug("aiopostcopy: background thread %d: %s; it is no longer watched", tid, exc)
                del self._threads[tid]


def _leave_idle(tid: int) -> None:
    """Thread ``tid`` back to SCHED_OTHER (its nice value kept), if it is still there."""
    try:
        if _get_class(tid) == os.SCHED_IDLE:
            _set_class(tid, os.SCHED_OTHER, os.sched_param(0))
    except OSError:
        pass
