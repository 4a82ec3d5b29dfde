"""Shared test machinery for the real-kernel userfaultfd tests.

Everything a test creates goes through :class:`Resources`, which releases it
in the only safe order: kill child processes we started, close userfaultfds
(this releases any thread still blocked on a fault), join toucher threads,
unmap mappings, close shared memory, restore huge page pools.  A thread is
never left touching memory that is about to be unmapped.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from aiopostcopy.errors import UffdError
from aiopostcopy.uffd import (
    Event,
    Feature,
    HugePageReservation,
    Mapping,
    SharedMemory,
    Userfaultfd,
    buffer_address,
    default_page_size,
    supported_features,
)

PAGE = default_page_size()
TIMEOUT = 10.0


def kernel_features() -> Feature:
    """The kernel's userfaultfd features, or none when no userfaultfd opens."""
    try:
        return supported_features()
    except UffdError:
        return Feature(0)


def require_root() -> None:
    """Skip unless running as root."""
    if os.geteuid() != 0:
        pytest.skip("needs root (CAP_SYS_PTRACE, the huge page pool, setuid)")


def require_features(*features: Feature) -> None:
    """Skip unless the kernel offers every feature."""
    missing = [str(f.name) for f in features if not kernel_features() & f]
    if missing:
        pytest.skip(f"kernel lacks userfaultfd features: {', '.join(missing)}")


def wait_readable(fd: int, timeout: float = TIMEOUT) -> bool:
    """True once ``fd`` is readable, False after ``timeout`` seconds."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(timeout * 1000))


def read_events(uffd: Userfaultfd, count: int, timeout: float = TIMEOUT) -> list[Event]:
    """Read until ``count`` events arrived (or fail after ``timeout``)."""
    events: list[Event] = []
    deadline = time.monotonic() + timeout
    while len(events) < count:
        left = deadline - time.monotonic()
        assert left > 0 and wait_readable(uffd.fileno(), left), f"only {events} after {timeout}s"
        events.extend(uffd.read_events())
    return events


class Toucher(threading.Thread):
    """A thread that touches a range of a mapping from C (GIL released)."""

    def __init__(self, mapping: Mapping, offset: int, length: int = PAGE, *, write: bool = False, value: int = 0):
        super().__init__(daemon=True, name=f"toucher@{offset:#x}")
        self.mapping, self.offset, self.length = mapping, offset, length
        self.write, self.value = write, value
        self.tid = 0
        self.result: int | None = None
        self.error: BaseException | None = None
        self._ready = threading.Event()

    def run(self) -> None:
        self.tid = threading.get_native_id()
        self._ready.set()
        try:
            self.result = self.mapping.touch(self.offset, self.length, write=self.write, value=self.value)
        except BaseException as exc:  # handed to the test by finish()
            self.error = exc

    def begin(self) -> Toucher:
        self.start()
        self._ready.wait(TIMEOUT)
        return self

    def finish(self, timeout: float = TIMEOUT) -> int | None:
        """Wait for the touch to complete; re-raise its error."""
        self.join(timeout)
        assert not self.is_alive(), f"{self.name} still blocked after {timeout}s"
        if self.error is not None:
            raise self.error
        return self.result


def call_in_thread(fn: Callable[..., Any], *args: Any) -> threading.Thread:
    """Run a blocking call (e.g. madvise waiting for its event to be read) in a thread."""
    thread = threading.Thread(target=fn, args=args, daemon=True, name=getattr(fn, "__name__", "call"))
    thread.start()
    return thread


class Resources:
    """Everything one test created, released in a safe order by :meth:`close_all`."""

    def __init__(self) -> None:
        self.processes: list[subprocess.Popen[bytes]] = []
        self.uffds: list[Userfaultfd] = []
        self.threads: list[threading.Thread] = []
        self.mappings: list[Mapping] = []
        self.shms: list[SharedMemory] = []
        self.reservations: list[HugePageReservation] = []
        self.fds: list[int] = []
        self.keep: list[Any] = []

    def uffd(self, features: Feature = Feature(0), **kwargs: Any) -> Userfaultfd:
        return self.own_uffd(Userfaultfd.open(features, **kwargs))

    def own_uffd(self, uffd: Userfaultfd) -> Userfaultfd:
        self.uffds.append(uffd)
        return uffd

    def memfd(self, pages: int = 4, *, name: str = "test", **kwargs: Any) -> SharedMemory:
        size = pages * kwargs.get("huge_page_size", PAGE) if kwargs.get("hugetlb") else pages * PAGE
        shm = SharedMemory.memfd(name, size, **kwargs)
        self.shms.append(shm)
        return shm

    def own_shm(self, shm: SharedMemory) -> SharedMemory:
        self.shms.append(shm)
        return shm

    def map(self, shm: SharedMemory, **kwargs: Any) -> Mapping:
        return self.own_mapping(shm.map(**kwargs))

    def anon(self, pages: int = 4) -> Mapping:
        return self.own_mapping(Mapping.anonymous(pages * PAGE))

    def own_mapping(self, mapping: Mapping) -> Mapping:
        self.mappings.append(mapping)
        return mapping

    def source(self, data: bytes) -> int:
        """Address of a buffer holding ``data``, kept alive until the test ends."""
        buf = bytearray(data)
        self.keep.append(buf)
        return buffer_address(buf)

    def touch(self, mapping: Mapping, offset: int, length: int = PAGE, **kwargs: Any) -> Toucher:
        toucher = Toucher(mapping, offset, length, **kwargs)
        self.threads.append(toucher)
        return toucher.begin()

    def call_in_thread(self, fn: Callable[..., Any], *args: Any) -> threading.Thread:
        thread = call_in_thread(fn, *args)
        self.threads.append(thread)
        return thread

    def reserve_huge_pages(self, pages: int) -> HugePageReservation:
        reservation = HugePageReservation(pages).__enter__()
        self.reservations.append(reservation)
        return reservation

    def popen(self, args: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(args, **kwargs)
        self.processes.append(proc)
        return proc

    def close_all(self) -> None:
        """Release everything (idempotent): processes, uffds, threads, mappings, shm, fds, pools."""
        for proc in self.processes:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(TIMEOUT)
        for uffd in self.uffds:
            uffd.close()
        for thread in self.threads:
            thread.join(TIMEOUT)
        stuck = [t.name for t in self.threads if t.is_alive()]
        for mapping in self.mappings if not stuck else ():
            mapping.close()
        for shm in self.shms:
            shm.close()
            shm.unlink()
        for fd in self.fds:
            os.close(fd)
        for reservation in reversed(self.reservations):
            reservation.__exit__(None, None, None)
        self.__init__()  # type: ignore[misc]
        assert not stuck, f"threads still blocked after cleanup (mappings left mapped): {stuck}"
