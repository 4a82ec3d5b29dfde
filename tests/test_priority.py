"""Thread nice values: per thread, raised without privilege, and the sweep's threads run below the
urgent path."""

from __future__ import annotations

import asyncio
import os
import threading

import pytest

from aiopostcopy import source as source_module
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
    SWEEP_NICENESS on themselves; the loop thread (and the urgent path's) keep theirs."""
    path = tmp_path / "ram"
    path.write_bytes(os.urandom(4096 * PAGE))
    niced: list[tuple[int, int]] = []

    def recording(niceness: int) -> bool:
        ok = set_niceness(niceness)
        niced.append((threading.get_native_id(), thread_niceness()))
        return ok

    monkeypatch.setattr(source_module, "set_niceness", recording)
    loop_nice = thread_niceness()
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
        writer.close()
    finally:
        await asyncio.wait_for(source.close(), 10)
    assert len(niced) == 2, niced
    assert {tid for tid, _ in niced}.isdisjoint({threading.get_native_id()})
    assert niced[0][0] != niced[1][0], "one reader thread, one writer thread"
    assert [nice for _, nice in niced] == [SWEEP_NICENESS, SWEEP_NICENESS]
    assert thread_niceness() == loop_nice
