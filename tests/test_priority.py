"""Thread priorities: nice values set per thread without privilege, the sweep's threads below the
urgent path, and in SCHED_IDLE under a starvation guard where the process may bring them back."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import resource
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from aiopostcopy import priority
from aiopostcopy.messages import PROTOCOL_VERSION, Channel, Hello, Role
from aiopostcopy.priority import set_niceness, thread_niceness
from aiopostcopy.source import SWEEP_NICENESS, PostcopySource, SourceBlock
from aiopostcopy.transport.wire import encode

PAGE = 4096


def test_a_thread_raises_its_own_nice_value_and_no_other() -> None:
    before = thread_niceness()
    seen: list[int] = []

    def raise_own() -> None:
        assert set_niceness(before + 3)
        seen.append(thread_niceness())

    worker = threading.Thread(target=raise_own)
    worker.start()
    worker.join(10)
    assert seen == [before + 3]
    assert thread_niceness() == before, "the caller's thread keeps its value"


def test_lowering_without_privilege_is_refused_and_changes_nothing() -> None:
    """As an unprivileged user (a forked child that drops root, if we are root) a thread may not
    lower its nice value: set_niceness says so and the value stays."""
    pid = os.fork()
    if pid == 0:  # the child: exit status 0 only if every check held
        status = 1
        try:
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            before = thread_niceness()
            status = 0 if (set_niceness(before - 1), thread_niceness()) == (False, before) else 2
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.asyncio
async def test_the_sweep_reads_and_writes_on_threads_below_the_loop(tmp_path, monkeypatch) -> None:
    """A background connection starts the sweep: its reader and its writer thread each set
    SWEEP_NICENESS on themselves, and run in SCHED_IDLE under the source's guard where the process
    may bring them back (as root); the loop thread (and the urgent path's) keep theirs.  Each
    thread leaves the guard as it ends."""
    path = tmp_path / "ram"
    path.write_bytes(os.urandom(4096 * PAGE))
    niced: list[tuple[int, int]] = []

    def recording(niceness: int) -> bool:
        ok = set_niceness(niceness)
        niced.append((threading.get_native_id(), thread_niceness()))
        return ok

    monkeypatch.setattr(priority, "set_niceness", recording)
    loop_nice = thread_niceness()
    idle = priority.can_idle(threading.get_native_id(), SWEEP_NICENESS)
    source = PostcopySource([SourceBlock.from_path("ram", str(path))])
    try:
        host, port = await source.listen("127.0.0.1", 0)
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(encode(Hello(version=PROTOCOL_VERSION, session_id="niceness", role=Role.DESTINATION,
                                  channel=Channel.BACKGROUND)))
        received = 0
        async with asyncio.timeout(10):
            while received < 1 << 20:  # the sweep is running: both of its threads have started
                data = await reader.read(1 << 16)
                assert data, "the source closed the background connection"
                received += len(data)
        tids = [tid for tid, _ in niced]
        classes = [os.sched_getscheduler(tid) for tid in tids]
        watched = sorted(source._background.watched())
        writer.close()
        async with asyncio.timeout(10):  # the peer is gone: both threads end, and leave the guard
            while source._background.watched():
                await asyncio.sleep(0.01)
    finally:
        await asyncio.wait_for(source.close(), 10)
    assert len(niced) == 2, niced
    assert set(tids).isdisjoint({threading.get_native_id()})
    assert tids[0] != tids[1], "one reader thread, one writer thread"
    assert [nice for _, nice in niced] == [SWEEP_NICENESS, SWEEP_NICENESS]
    if idle:  # each in SCHED_IDLE, unless the guard gave a starving one its nice value back
        assert set(classes) <= {os.SCHED_IDLE, os.SCHED_OTHER}
        assert classes.count(os.SCHED_OTHER) <= source._background.restored
    else:
        assert classes == [os.SCHED_OTHER] * 2
    assert watched == (sorted(tids) if idle else [])
    assert thread_niceness() == loop_nice
    assert os.sched_getscheduler(0) == os.SCHED_OTHER


@pytest.mark.parametrize(("cap_eff", "rlimit_nice", "allowed"), [
    (1 << 23, 0, True),  # CAP_SYS_NICE
    (0, 10, True),  # RLIMIT_NICE 10 allows nice 10 (20 - 10)
    (0, 9, False),
    (0, 0, False),  # the usual unprivileged process
    (0, resource.RLIM_INFINITY, True),
    ((1 << 23) - 1, 0, False),  # every capability below CAP_SYS_NICE, not it
])
def test_leaving_sched_idle_needs_cap_sys_nice_or_a_high_enough_rlimit_nice(cap_eff, rlimit_nice, allowed) -> None:
    assert priority.may_leave_idle(SWEEP_NICENESS, cap_eff=cap_eff, rlimit_nice=rlimit_nice) is allowed


def _busy_without_the_gil(stop: threading.Event, tids: list[int]) -> None:
    """Keep a CPU busy (sha256 of a large buffer runs with the GIL released) until ``stop``."""
    tids.append(threading.get_native_id())
    data = os.urandom(1 << 20)
    while not stop.is_set():
        hashlib.sha256(data).digest()


@pytest.mark.asyncio
async def test_a_starving_idle_thread_gets_its_nice_value_back_for_a_while() -> None:
    """A background thread in SCHED_IDLE that another process keeps off its CPU is put back at its
    nice value (SCHED_OTHER) by the guard, and returned to SCHED_IDLE once its time is up."""
    if not priority.can_idle(threading.get_native_id(), SWEEP_NICENESS):
        pytest.skip("needs CAP_SYS_NICE (root) and schedstat")
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs two CPUs: one for the starving thread, one for the loop")
    busy_cpu, own_cpus = cpus[-1], os.sched_getaffinity(0)
    guard = priority.BackgroundThreads(asyncio.get_running_loop(), interval=0.05, restored_for=0.3)
    stop, tids = threading.Event(), []
    worker = threading.Thread(target=_busy_without_the_gil, args=(stop, tids), daemon=True)
    hog = None
    os.sched_setaffinity(0, set(cpus[:-1]))  # the loop (this thread) off the busy CPU
    try:
        worker.start()
        while not tids:
            await asyncio.sleep(0.001)
        tid = tids[0]
        os.sched_setaffinity(tid, {busy_cpu})
        os.setpriority(os.PRIO_PROCESS, tid, SWEEP_NICENESS)
        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        os.sched_setaffinity(hog.pid, {busy_cpu})
        assert guard.add(tid, SWEEP_NICENESS)
        assert os.sched_getscheduler(tid) == os.SCHED_IDLE
        async with asyncio.timeout(10):  # the hog (nice 0) takes the CPU: the guard restores it
            while os.sched_getscheduler(tid) != os.SCHED_OTHER:
                await asyncio.sleep(0.005)
        assert guard.restored >= 1
        assert os.getpriority(os.PRIO_PROCESS, tid) == SWEEP_NICENESS, "back at its nice value, not higher"
        hog.kill()
        hog.wait()
        hog = None
        async with asyncio.timeout(10):  # its time up: SCHED_IDLE again
            while os.sched_getscheduler(tid) != os.SCHED_IDLE:
                await asyncio.sleep(0.005)
        guard.close()
        assert os.sched_getscheduler(tid) == os.SCHED_OTHER, "a closed guard leaves no thread in SCHED_IDLE"
        assert guard.watched() == []
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
        stop.set()
        worker.join(10)
        guard.close()
        os.sched_setaffinity(0, own_cpus)  # (threads started meanwhile keep the narrower set)


class _Kernel:
    """What the guard reads of its threads and sets on them, for the decision tests: each fake
    thread's schedstat and state, and the classes set."""

    def __init__(self, monkeypatch) -> None:
        self.stat: dict[int, tuple[int, int]] = {}
        self.state: dict[int, bool] = {}
        self.classes: dict[int, int] = {}
        self.refuse_other = False
        monkeypatch.setattr(priority, "_schedstat", lambda tid: self.stat.get(tid))
        monkeypatch.setattr(priority, "_runnable", lambda tid: self.state.get(tid, False))
        monkeypatch.setattr(priority, "may_leave_idle", lambda niceness: True)
        monkeypatch.setattr(priority, "_leaves_idle", lambda niceness: True)
        monkeypatch.setattr(priority, "_set_class", self._set)
        monkeypatch.setattr(priority, "_get_class", lambda tid: self.classes.get(tid, os.SCHED_OTHER))

    def _set(self, tid: int, policy: int, param) -> None:
        if tid not in self.stat:
            raise ProcessLookupError(3, "No such process")
        if policy == os.SCHED_OTHER and self.refuse_other:
            raise PermissionError(1, "Operation not permitted")
        self.classes[tid] = policy


@contextlib.contextmanager
def _guarding(kernel: _Kernel, *tids: int) -> Iterator[priority.BackgroundThreads]:
    """A guard on a loop of its own watching ``tids`` (in SCHED_IDLE, last looked at at time 0),
    closed with its loop afterwards."""
    loop = asyncio.new_event_loop()
    guard = priority.BackgroundThreads(loop, interval=0.1, starved_share=0.8, restored_for=1.0)
    try:
        for tid in tids:
            kernel.stat[tid] = (1_000, 0)
            assert guard.add(tid, SWEEP_NICENESS)
            assert kernel.classes[tid] == os.SCHED_IDLE
            guard._threads[tid].at = 0.0
        yield guard
    finally:
        guard.close()
        loop.close()


def _look(guard: priority.BackgroundThreads, now: float) -> None:
    with guard._lock:
        guard._look_locked(now)


def test_the_guard_restores_a_thread_whose_waits_fill_the_interval_and_no_other(monkeypatch) -> None:
    kernel = _Kernel(monkeypatch)
    with _guarding(kernel, 101, 102) as guard:
        kernel.stat[101] = (10_000_000, 85_000_000)  # waited 85 ms of 100: starving
        kernel.stat[102] = (60_000_000, 40_000_000)  # ran 60 ms, waited 40: sharing, not starving
        _look(guard, 0.1)
        assert kernel.classes == {101: os.SCHED_OTHER, 102: os.SCHED_IDLE} and guard.restored == 1
        kernel.stat[101] = (50_000_000, 120_000_000)
        _look(guard, 0.6)  # its second is not up: it keeps its nice value, starving or not
        assert kernel.classes[101] == os.SCHED_OTHER
        _look(guard, 1.2)  # its second is up: SCHED_IDLE again
        assert kernel.classes[101] == os.SCHED_IDLE and guard.restored == 1
    assert kernel.classes == {101: os.SCHED_OTHER, 102: os.SCHED_OTHER}, "closing lets every thread out"


def test_the_guard_sees_a_wait_still_going_on(monkeypatch) -> None:
    """schedstat counts a wait when it ends: a thread runnable at two looks in a row that got no
    CPU time in between is starving now, before any of its wait shows."""
    kernel = _Kernel(monkeypatch)
    with _guarding(kernel, 201) as guard:
        kernel.stat[201], kernel.state[201] = (5_000_000, 0), True
        _look(guard, 0.1)  # runnable once, after running 5 ms: not yet
        assert kernel.classes[201] == os.SCHED_IDLE
        _look(guard, 0.2)  # runnable again, no CPU time since: waiting all along
        assert kernel.classes[201] == os.SCHED_OTHER and guard.restored == 1


def test_a_refused_restore_stops_the_guard_taking_threads(monkeypatch) -> None:
    kernel = _Kernel(monkeypatch)
    with _guarding(kernel, 301) as guard:
        kernel.refuse_other = True
        kernel.stat[301] = (0, 95_000_000)
        _look(guard, 0.1)
        assert guard.watched() == [] and guard.restored == 0
        kernel.stat[302] = (1_000, 0)
        assert not guard.add(302, SWEEP_NICENESS), "no thread is put in SCHED_IDLE any more"
        assert 302 not in kernel.classes


def test_a_thread_that_is_gone_is_dropped_and_a_closed_loop_takes_none(monkeypatch) -> None:
    kernel = _Kernel(monkeypatch)
    with _guarding(kernel, 401) as guard:
        del kernel.stat[401]
        _look(guard, 0.1)
        assert guard.watched() == []
    other = priority.BackgroundThreads(guard._loop)  # closed with the guard
    kernel.stat[402] = (1_000, 0)
    assert not other.add(402, SWEEP_NICENESS)
    assert 402 not in kernel.classes, "nothing is changed for a loop that cannot run the guard"


def test_a_kernel_that_keeps_no_schedstat_gets_no_thread_in_sched_idle(monkeypatch) -> None:
    """Some kernels without schedstats show "0 0 0" for every thread: the guard would be blind."""
    kernel = _Kernel(monkeypatch)
    with _guarding(kernel) as guard:
        kernel.stat[501] = (0, 0)
        assert not guard.add(501, SWEEP_NICENESS)
        assert 501 not in kernel.classes


def test_without_the_right_to_leave_sched_idle_the_threads_keep_their_nice_value_alone() -> None:
    """As an unprivileged user (a forked child that drops root, if we are root) the guard takes no
    thread: add() says so and the thread stays in SCHED_OTHER at its nice value."""
    pid = os.fork()
    if pid == 0:  # the child: exit status 0 only if every check held
        status = 1
        try:
            if os.geteuid() == 0:
                resource.setrlimit(resource.RLIMIT_NICE, (0, 0))
                os.setgid(65534)
                os.setuid(65534)
            assert not priority.may_leave_idle(SWEEP_NICENESS)
            loop = asyncio.new_event_loop()
            guard = priority.BackgroundThreads(loop)
            set_niceness(SWEEP_NICENESS)
            added = guard.add(threading.get_native_id(), SWEEP_NICENESS)
            kept = (os.sched_getscheduler(0), thread_niceness(), guard.watched())
            status = 0 if (added, kept) == (False, (os.SCHED_OTHER, SWEEP_NICENESS, [])) else 2
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
