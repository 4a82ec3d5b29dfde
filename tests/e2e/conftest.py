"""Fixtures of the end-to-end tests (real kernel, processes, shared memory, TCP).

* every test here is skipped, with the reason, when no userfaultfd opens;
* ``e2e`` gives a test a private directory under /dev/shm (images, block
  files, the control socket; removed afterwards), starts sources, workers and
  helper clients, and at teardown SIGKILLs whichever of *its own* processes
  still run (a stopped source is continued first);
* ``_no_fd_leaks`` fails a test after which the test process holds more file
  descriptors than before (a destination or a source must release everything
  it opened, client userfaultfds included, once it is closed).
"""

from __future__ import annotations

import asyncio
import faulthandler
import gc
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from typing import Any, NamedTuple

import pytest
import pytest_asyncio

from aiopostcopy.core.config import DestinationConfig
from aiopostcopy.errors import UffdError
from aiopostcopy.loop import DestinationOptions
from aiopostcopy.uffd import supported_features

import e2e_support as sup


HANG_SECONDS = 240  #: a test still running after this is stuck: dump every thread's stack and exit


@pytest.fixture(autouse=True)
def _hang_guard() -> Iterator[None]:
    """A hung end-to-end test must not hang the suite: faulthandler dumps the stacks and exits."""
    faulthandler.dump_traceback_later(HANG_SECONDS, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(autouse=True)
def _userfaultfd_available() -> None:
    try:
        supported_features()
    except UffdError as exc:
        pytest.skip(f"no userfaultfd can be opened here: {exc}")


def _fds() -> dict[int, str]:
    found = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            found[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass
    return found


@pytest.fixture(scope="session")
def _uvloop_warmed() -> None:
    """uvloop opens a process-wide pipe the first time it starts a child: open it before counting."""
    try:
        import uvloop
    except ImportError:
        return

    async def spawn() -> None:
        proc = await asyncio.create_subprocess_exec("true")
        await proc.wait()

    uvloop.run(spawn())


@pytest.fixture(autouse=True)
def _no_fd_leaks(_uvloop_warmed: None, request: pytest.FixtureRequest) -> Iterator[None]:
    before = _fds()
    yield
    gc.collect()  # objects in reference cycles (a source's mmap, a transport) release their fds here
    leaked = {fd: target for fd, target in _fds().items() if before.get(fd) != target}
    if leaked and request.node.get_closest_marker("fd_leak_expected") is None:
        pytest.fail(f"file descriptors left open by the test process: {leaked}", pytrace=False)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "fd_leak_expected(reason): the test documents a known descriptor leak")


class E2E:
    """One test's workspace: a /dev/shm directory and the processes it started."""

    def __init__(self, workdir: str, procs: sup.Processes) -> None:
        self.workdir = workdir
        self.procs = procs
        self.socket = os.path.join(workdir, "clients.sock")
        self.block_dir = os.path.join(workdir, "dest")
        os.mkdir(self.block_dir)

    def image(self, size: int, *, seed: int, zero_every: int = 7, page_size: int = 4096, name: str = "ram",
              block_index: int = 0) -> str:
        return sup.make_image(os.path.join(self.workdir, f"{name}.img"), size, seed=seed, zero_every=zero_every,
                              page_size=page_size, block_index=block_index)

    def options(self, source: tuple[str, int] | str, *, block_dir: bool = True, clients: bool = True,
                config: DestinationConfig | None = None, **kw: Any) -> DestinationOptions:
        kw.setdefault("source_deadline", 30.0)
        # tests hold sources with SIGSTOP while clients join: no idle reconnection in that time
        kw.setdefault("source_idle_timeout", 30.0)
        return DestinationOptions(source=source, block_dir=self.block_dir if block_dir else None,
                                  control_path=self.socket if clients else None,
                                  session=config or DestinationConfig(), **kw)

    async def source(self, blocks: dict[str, str], **kw: Any) -> sup.SourceProcess:
        return await sup.start_source(self.procs, blocks, **kw)

    async def worker(self, **kw: Any) -> sup.Worker:
        return await sup.start_worker(self.procs, self.socket, **kw)

    async def blocked_workers(self, dest: Any, count: int, *, name: str, **kw: Any) -> list[sup.Worker]:
        return await sup.start_blocked_workers(self.procs, self.socket, dest, count, name=name, **kw)

    async def touch_client(self, **kw: Any) -> sup.TouchClient:
        return await sup.start_touch_client(self.procs, self.socket, **kw)

    async def rogue(self, mode: str) -> dict[str, Any]:
        return await sup.run_rogue(self.procs, "--socket", self.socket, mode)

    async def rogue_beside_bystander(self, mode: str, *, seed: int, size: int = 16 << 20,
                                     bystander: str = "delegated") -> "RogueRun":
        """The migration of a ``size`` image with a bystander client (of mode ``bystander``) blocked
        in faults (the source stopped) while a rogue client in ``mode`` tries to join; then the
        source runs on and the migration completes.  What every rogue-client test checks is in
        the result."""
        from aiopostcopy.loop import PostcopyDestination

        source = await self.source({"ram": self.image(size, seed=seed)})
        async with PostcopyDestination(self.options(source.address)) as dest:
            source.stop()
            worker = await self.worker(mode=bystander, threads=2, touches=200, seed=seed, name="bystander")
            await sup.wait_until(lambda: sup.threads_in_userfault(worker.pid), "the bystander blocked")
            rogue = await self.rogue(mode)
            source.cont()
            report = await sup.bounded(dest.wait_complete(), "the migration")
            result = await worker.result()
            problems = sup.check_destination(dest, seed=seed)
        await source.report()
        return RogueRun(rogue, report, result, problems)


class RogueRun(NamedTuple):
    """What :meth:`E2E.rogue_beside_bystander` saw: the rogue's own account, the destination's
    report, the bystander's result and the destination's page check (empty: every page right)."""

    rogue: dict[str, Any]
    report: Any
    bystander: Any
    problems: dict[str, list[str]]


@pytest_asyncio.fixture
async def e2e() -> AsyncIterator[E2E]:
    workdir = tempfile.mkdtemp(prefix="apc-e2e-", dir="/dev/shm")
    procs = sup.Processes()
    try:
        yield E2E(workdir, procs)
    finally:
        await procs.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)
