"""Machinery for the end-to-end tests: images, processes, a pausable link, waiting.

Everything here is real: source images are /dev/shm files holding the
:mod:`aiopostcopy.tools.pattern`, the source runs as ``python -m aiopostcopy source``
(or in-process), clients are ``python -m aiopostcopy.tools.workload`` processes or
the small helper scripts beside this file, and the link is TCP.

Pacing.  On loopback a whole 64 MiB migration takes a few tenths of a second,
less than a client process needs to start and join, so a test that wants
clients to fault *during* the migration holds the source back: a source
process is stopped with SIGSTOP (its connections stay open, nothing arrives,
requests queue in its socket) and continued with SIGCONT once every client is
blocked on missing pages; an in-process source is held behind a
:class:`PausableProxy`.  Nothing here sleeps to make a race likely: every
wait is for a condition, bounded by a timeout that fails the test.

Only processes started here are ever signalled, by PID (see :class:`Processes`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import mmap
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from aiopostcopy.tools.pattern import check_page, fill, verify_block

HERE = os.path.dirname(os.path.abspath(__file__))
PYTHON = sys.executable
TIMEOUT = 60.0  #: seconds any single wait of an end-to-end test may take


# ----------------------------------------------------------------------------- images and checks


def make_image(path: str, size: int, *, seed: int, zero_every: int = 7, page_size: int = 4096,
               block_index: int = 0) -> str:
    """Write a source image holding the pattern of block ``block_index``; zero pages stay holes."""
    with open(path, "w+b") as f:
        f.truncate(size)
        with mmap.mmap(f.fileno(), size) as memory:
            fill(memory, block_index, page_size, seed, zero_every, assume_zeroed=True)
    return path


def check_memory(view: Any, block_index: int, page_size: int, *, seed: int, zero_every: int = 7,
                 counters_ok: bool = False) -> list[str]:
    """Every page of a block against the pattern: descriptions of the bad pages (empty: all good)."""
    bad = verify_block(view, block_index, page_size, seed, zero_every, counters_ok=counters_ok)
    described = []
    for page in bad[:20]:
        chunk = view[page * page_size:(page + 1) * page_size]
        described.append(str(check_page(chunk, block_index, page, page_size, seed, zero_every,
                                        ignore_counters=counters_ok)))
    if len(bad) > 20:
        described.append(f"... and {len(bad) - 20} more bad pages")
    return described


def check_block_file(path: str, *, seed: int, page_size: int = 4096) -> list[str]:
    """Every page of a block file a destination left (block 0 of the pattern), as :func:`check_memory`."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as memory:
        view = memoryview(memory)
        try:
            return check_memory(view, 0, page_size, seed=seed)
        finally:
            view.release()


def check_destination(dest: Any, *, seed: int, zero_every: int = 7, counters_ok: bool = False) -> dict[str, list[str]]:
    """Check every block of a completed destination through its own mapping; {name: problems}."""
    problems = {}
    for index, block in enumerate(dest.blocks):
        view = dest.memory(block.name)
        try:
            bad = check_memory(view, index, block.page_size, seed=seed, zero_every=zero_every,
                               counters_ok=counters_ok)
        finally:
            view.release()
        if bad:
            problems[block.name] = bad
    return problems


# ----------------------------------------------------------------------------- processes


class Processes:
    """Every process a test started; :meth:`cleanup` ends the survivors by PID."""

    def __init__(self) -> None:
        self.started: list[asyncio.subprocess.Process] = []
        self.closers: list[Callable[[], None]] = []

    def add(self, proc: asyncio.subprocess.Process) -> asyncio.subprocess.Process:
        self.started.append(proc)
        return proc

    async def cleanup(self) -> list[int]:
        """SIGCONT (a stopped source) then SIGKILL each live process we started; reap all."""
        killed = []
        for proc in self.started:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGCONT)
                    proc.kill()
                    killed.append(proc.pid)
        for proc in self.started:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(proc.wait(), 10)
        for close in self.closers:
            close()
        return killed


async def spawn(procs: Processes, argv: list[str], *, stdin: bool = False,
                env: dict[str, str] | None = None, stderr: int | None = None) -> asyncio.subprocess.Process:
    """Start ``argv`` with stdout piped (stderr goes to the test's captured stderr unless piped)."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.PIPE if stdin else asyncio.subprocess.DEVNULL,
        env=env, stderr=stderr)
    return procs.add(proc)


def parse_json_output(out: bytes) -> dict[str, Any]:
    """The last JSON object a process printed (a line, or an indented block at the end)."""
    text = out.decode(errors="replace").strip()
    if not text:
        return {"error": "no output"}
    with contextlib.suppress(json.JSONDecodeError):
        return json.loads(text)
    for line in reversed(text.splitlines()):
        with contextlib.suppress(json.JSONDecodeError):
            value = json.loads(line)
            if isinstance(value, dict):
                return value
    start = text.find("\n{")
    if start >= 0:
        with contextlib.suppress(json.JSONDecodeError):
            return json.loads(text[start + 1:])
    return {"error": f"unreadable output: {text[-500:]!r}"}


class SourceProcess:
    """``python -m aiopostcopy source`` running here; SIGSTOP / SIGCONT hold and release it."""

    def __init__(self, proc: asyncio.subprocess.Process, address: tuple[str, int]) -> None:
        self.proc = proc
        self.address = address
        self.pid = proc.pid

    def stop(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)

    def cont(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGCONT)
        self.proc.kill()

    async def report(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        """Wait for the source to exit; its final JSON report plus ``exit``."""
        out = await asyncio.wait_for(self.proc.stdout.read(), timeout)  # stderr: forwarded by start_source
        result = parse_json_output(out)
        result["exit"] = await asyncio.wait_for(self.proc.wait(), timeout)
        return result


def source_argv(blocks: dict[str, str], *, listen: str = "127.0.0.1:0", window: int | None = None,
                page_size: int = 4096, loop: str = "uvloop", sweep_after_idle: float | None = None) -> list[str]:
    argv = [PYTHON, "-m", "aiopostcopy", "--loop", loop, "source", "--listen", listen, "--page-size", str(page_size),
            "--json", "-"]
    for name, path in blocks.items():
        argv += ["--block", f"{name}={path}"]
    if window is not None:
        argv += ["--window", str(window)]
    if sweep_after_idle is not None:  # no sweep until no page was asked for that long
        argv += ["--sweep-after-idle", str(sweep_after_idle)]
    return argv


async def read_listening(proc: asyncio.subprocess.Process, stream: asyncio.StreamReader,
                         timeout: float = 30.0) -> tuple[str, int]:
    """Read the source's ``aiopostcopy source: listening on HOST:PORT`` line from ``stream``
    (stderr with ``--json -``: stdout carries only the report); earlier lines go to our stderr."""
    while True:
        line = (await asyncio.wait_for(stream.readline(), timeout)).decode()
        if "listening on" in line:
            break
        if not line:
            raise AssertionError(f"source did not start (exit {await proc.wait()})")
        sys.stderr.write(line)
    host, _, port = line.rsplit(" ", 1)[1].strip().rpartition(":")
    return host, int(port)


async def _forward(stream: asyncio.StreamReader) -> None:
    while line := await stream.readline():
        sys.stderr.write(line.decode(errors="replace"))


async def start_source(procs: Processes, blocks: dict[str, str], **options: Any) -> SourceProcess:
    proc = await spawn(procs, source_argv(blocks, **options), stderr=asyncio.subprocess.PIPE)
    address = await read_listening(proc, proc.stderr)
    procs.closers.append(asyncio.get_running_loop().create_task(_forward(proc.stderr)).cancel)
    return SourceProcess(proc, address)


class Worker:
    """A ``python -m aiopostcopy.tools.workload`` process."""

    def __init__(self, proc: asyncio.subprocess.Process, args: list[str]) -> None:
        self.proc, self.args, self.pid = proc, args, proc.pid

    async def result(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        """Its JSON report plus ``exit`` (the exit status)."""
        out = await asyncio.wait_for(self.proc.stdout.read(), timeout)  # stderr: forwarded by start_source
        result = parse_json_output(out)
        result["exit"] = await asyncio.wait_for(self.proc.wait(), timeout)
        return result


def workload_argv(socket_path: str, *, mode: str = "delegated", threads: int = 2, touches: int = 100,
                  workload: str = "random", seed: int = 0, zero_every: int = 7, counters: bool = False,
                  slot_base: int = 0, name: str | None = None, timeout: float = 30.0) -> list[str]:
    args = [PYTHON, "-m", "aiopostcopy.tools.workload", "--socket", socket_path, "--mode", mode,
            "--threads", str(threads), "--touches", str(touches), "--workload", workload, "--seed", str(seed),
            "--zero-every", str(zero_every), "--slot-base", str(slot_base), "--timeout", str(timeout),
            "--json", "-"]
    if counters:
        args.append("--counters")
    if name:
        args += ["--name", name]
    return args


async def start_worker(procs: Processes, socket_path: str, **options: Any) -> Worker:
    argv = workload_argv(socket_path, **options)
    return Worker(await spawn(procs, argv), argv)


async def start_blocked_workers(procs: Processes, socket_path: str, dest: Any, count: int, *, name: str,
                                **options: Any) -> list[Worker]:
    """``count`` workers (modes alternating, :func:`mode_of`) named ``name-i``, accepted by ``dest``
    and each with a thread blocked on a missing page (the caller holds the source)."""
    workers = [await start_worker(procs, socket_path, mode=mode_of(i), name=f"{name}-{i}", **options)
               for i in range(count)]
    await wait_until(lambda: running_clients(dest) == count, f"{count} clients accepted")
    for worker in workers:
        await wait_until(lambda: threads_in_userfault(worker.pid), f"worker {worker.pid} blocked on a page")
    return workers


def mode_of(index: int) -> str:
    """Mixed modes: even clients delegated, odd ones self-served."""
    return ("delegated", "self-served")[index % 2]


class TouchClient:
    """``touch_client.py``: joins, touches the pages it is told to, verifies after End.

    Commands go down a plain pipe written with ``os.write`` (a line never blocks), so a test may
    send one from inside a loop callback that holds the loop on purpose.
    """

    def __init__(self, proc: asyncio.subprocess.Process, stdin_fd: int) -> None:
        self.proc, self.pid = proc, proc.pid
        self.stdin_fd = stdin_fd
        self.info: dict[str, Any] = {}

    async def event(self, kind: str, timeout: float = TIMEOUT) -> dict[str, Any]:
        """The next JSON line of this kind (lines of other kinds before it are skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = await asyncio.wait_for(self.proc.stdout.readline(), max(0.1, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise AssertionError(f"touch client {self.pid}: no {kind!r} event within {timeout} s") from None
            if not line:
                raise AssertionError(f"touch client {self.pid} exited (status {await self.proc.wait()}) "
                                     f"before reporting {kind!r}")
            event = json.loads(line)
            if event.get("event") == kind:
                return event

    async def ready(self) -> dict[str, Any]:
        self.info = await self.event("ready")
        return self.info

    def command_now(self, text: str) -> None:
        """Send one command line (never yields to the loop)."""
        os.write(self.stdin_fd, text.encode() + b"\n")

    async def touch(self, pages: Iterable[int], *, block: int = 0, repeat: int = 1) -> dict[str, Any]:
        """Start touching (one thread per page and repeat); returns once the threads are about to touch."""
        self.command_now(f"touch {block} {repeat} " + " ".join(str(p) for p in pages))
        return await self.event("touching")

    def close_stdin(self) -> None:
        if self.stdin_fd >= 0:
            os.close(self.stdin_fd)
            self.stdin_fd = -1

    async def finish(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        """Tell it to wait for End and verify; its result plus ``exit``."""
        with contextlib.suppress(BrokenPipeError):
            self.command_now("end")
        self.close_stdin()
        try:
            out, _ = await asyncio.wait_for(self.proc.communicate(), timeout)
        except asyncio.TimeoutError:
            return {"error": f"no result within {timeout} s", "exit": None}
        result: dict[str, Any] = {"error": "no result"}
        touched = []
        for line in out.decode().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                event = json.loads(line)
                if event.get("event") == "result":
                    result = event
                elif event.get("event") == "touched":
                    touched.append(event)
        result["touched"] = touched
        result["exit"] = self.proc.returncode
        return result


async def start_touch_client(procs: Processes, socket_path: str, *, mode: str = "delegated", name: str = "touch",
                             seed: int = 0, zero_every: int = 7, timeout: float = 30.0) -> TouchClient:
    argv = [PYTHON, os.path.join(HERE, "touch_client.py"), "--socket", socket_path, "--mode", mode, "--name", name,
            "--seed", str(seed), "--zero-every", str(zero_every), "--timeout", str(timeout)]
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    try:
        proc = procs.add(await asyncio.create_subprocess_exec(*argv, stdin=read_fd, stdout=asyncio.subprocess.PIPE))
    except BaseException:
        os.close(write_fd)
        raise
    finally:
        os.close(read_fd)
    client = TouchClient(proc, write_fd)
    procs.closers.append(client.close_stdin)
    await client.ready()
    return client


async def run_rogue(procs: Processes, *args: str, timeout: float = 30.0) -> dict[str, Any]:
    """Run ``rogue_client.py`` to the end; its JSON result plus ``exit``."""
    proc = await spawn(procs, [PYTHON, os.path.join(HERE, "rogue_client.py"), *args])
    out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    result = parse_json_output(out)
    result["exit"] = proc.returncode
    return result


# ----------------------------------------------------------------------------- waiting


async def wait_until(predicate: Callable[[], bool], what: str, timeout: float = TIMEOUT,
                     interval: float = 0.005) -> None:
    """Poll ``predicate`` on the loop until it holds; AssertionError naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(interval)


async def bounded(awaitable: Awaitable[Any], what: str, timeout: float = TIMEOUT) -> Any:
    try:
        return await asyncio.wait_for(awaitable, timeout)
    except asyncio.TimeoutError:
        raise AssertionError(f"timed out after {timeout} s waiting for {what}") from None


def running_clients(dest: Any) -> int:
    """Clients the destination accepted and still serves (test-only look inside the registry)."""
    from aiopostcopy.core.control import Phase

    registry = dest._clients
    if registry is None:
        return 0
    return sum(1 for c in registry if registry.get(c.key) is c and c.control.phase is Phase.RUNNING)


def blocked_somewhere(dest: Any) -> int:
    """Faults and self-served requests the destination holds unanswered (test-only)."""
    wakeups = dest._session._wakeups
    if wakeups is None:
        return 0
    return len(wakeups) + len(wakeups._runs)


# ----------------------------------------------------------------------------- a pausable link


class PausableProxy:
    """A TCP relay between the destination and an in-process source.

    ``hold()`` stops relaying source -> destination (requests still reach the
    source; its answers wait in the relay's sockets), ``release()`` resumes,
    ``cut()`` resets every relayed connection on both sides (the destination
    sees ECONNRESET, as on a broken link) while the relay keeps listening, so
    the destination can reconnect.
    """

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._open = asyncio.Event()
        self._open.set()
        self._pairs: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter, list[asyncio.Task]]] = []
        self._server: asyncio.AbstractServer | None = None
        self.connections = 0
        self.cuts = 0

    async def start(self, host: str = "127.0.0.1") -> tuple[str, int]:
        self._server = await asyncio.start_server(self._accept, host, 0)
        return self._server.sockets[0].getsockname()[:2]

    def hold(self) -> None:
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    async def _accept(self, down_reader: asyncio.StreamReader, down_writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            down_writer.transport.abort()
            return
        tasks: list[asyncio.Task] = []
        self._pairs.append((down_writer, up_writer, tasks))
        tasks.append(asyncio.ensure_future(self._pump(down_reader, up_writer, gated=False)))
        tasks.append(asyncio.ensure_future(self._pump(up_reader, down_writer, gated=True)))

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, gated: bool) -> None:
        try:
            while True:
                data = await reader.read(256 * 1024)
                if not data:
                    break
                if gated:
                    await self._open.wait()
                writer.write(data)
                await writer.drain()
            writer.write_eof()
        except (OSError, RuntimeError):
            writer.transport.abort()

    def cut(self) -> None:
        """Reset every relayed connection now (RST both ways)."""
        self.cuts += 1
        pairs, self._pairs = self._pairs, []
        for down, up, tasks in pairs:
            for task in tasks:
                task.cancel()
            down.transport.abort()
            up.transport.abort()

    async def close(self) -> None:
        self.release()
        pairs = list(self._pairs)
        self.cut()
        for _, _, tasks in pairs:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


# ----------------------------------------------------------------------------- kernel-side views


def threads_in_userfault(pid: int) -> list[int]:
    """Thread ids of ``pid`` sleeping in the kernel's userfaultfd wait (``wchan`` handle_userfault)."""
    found = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/wchan") as f:
                if f.read().strip() == "handle_userfault":
                    found.append(int(tid))
        except OSError:
            pass
    return found


def wait_blocking(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Poll ``predicate`` *without* yielding to the event loop (the caller holds the loop on purpose)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.002)


def hook_placement(dest: Any, before: Callable[[Any], None]) -> None:
    """Call ``before(command)`` once just before each Place / PlaceZero is carried out, wherever it
    runs: on the loop thread (urgent pages, and the background runs it hands to the C placing
    thread, hooked as they are handed over) or on the Python placement thread.
    A test instrument: blocking in ``before`` holds that placement open, which opens a timing
    window deterministically.  ``before`` must not touch the destination's state (it may run
    on the placement thread); it gets the command only."""
    placement = dest._placement
    place, run_of = placement.place, placement.run_of
    seen: set[tuple[int, int]] = set()  # each page is placed once: a run is named by its first page

    def once(command: Any) -> None:
        if (command.block, command.first) not in seen:
            seen.add((command.block, command.first))
            before(command)

    def wrapped_place(command: Any, *rest: Any, **options: Any) -> Any:
        once(command)
        return place(command, *rest, **options)

    def wrapped_run_of(command: Any, *rest: Any) -> Any:
        once(command)
        return run_of(command, *rest)

    placement.place, placement.run_of = wrapped_place, wrapped_run_of
