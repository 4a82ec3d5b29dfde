"""An in-memory fake of Userfaultfd, for pure-logic tests; it passes the same contract.

Memory is a dict of present pages (address -> bytes).  A "touch" of a
registered missing page queues a :class:`PageFault` and records a waiter; a
copy or zeropage places pages, stops at the first present page (EEXIST if it
is the first, else EAGAIN with ``done``), and wakes waiters unless
``dontwake``.  No threads, no kernel: a waiter is simply a pending address.
"""

from __future__ import annotations

import errno

from aiopostcopy.errors import ClosedError, UffdError, uffd_error_from_errno
from aiopostcopy.uffd import Event, Feature, Ioctl, PageFault, RegisterMode
from aiopostcopy.uffd.events import PAGEFAULT_CODE

PAGE = 4096
_RANGE_IOCTLS = Ioctl.WAKE | Ioctl.COPY | Ioctl.ZEROPAGE


class FakeMemory:
    """Present pages and copy sources of one fake address space."""

    def __init__(self) -> None:
        self.pages: dict[int, bytes] = {}
        self.sources: dict[int, bytes] = {}
        self._next_source = 0x7000_0000_0000

    def source(self, data: bytes) -> int:
        address = self._next_source
        self._next_source += (len(data) + PAGE) // PAGE * PAGE
        self.sources[address] = data
        return address

    def read_source(self, address: int, length: int) -> bytes:
        for base, data in self.sources.items():
            if base <= address and address + length <= base + len(data):
                return data[address - base : address - base + length]
        raise AssertionError(f"no source buffer at {address:#x}")


class FakeUserfaultfd:
    """The Userfaultfd API over :class:`FakeMemory`."""

    def __init__(self, memory: FakeMemory, features: Feature = Feature(0)) -> None:
        self.memory = memory
        self.features = features
        self.ranges: list[tuple[int, int]] = []
        self.queue: list[Event] = []
        self.waiting: set[int] = set()
        self.closed = False

    def _live(self, what: str) -> None:
        if self.closed:
            raise ClosedError(f"{what}: userfaultfd is closed")

    def _registered(self, start: int, length: int) -> bool:
        return any(s <= start and start + length <= s + n for s, n in self.ranges)

    def fileno(self) -> int:
        self._live("fileno")
        return -1

    def register(self, start: int, length: int, mode: RegisterMode = RegisterMode.MISSING) -> Ioctl:
        self._live("UFFDIO_REGISTER")
        if start % PAGE or length % PAGE or length <= 0:
            raise uffd_error_from_errno(errno.EINVAL, "UFFDIO_REGISTER")
        self.ranges.append((start, length))
        return _RANGE_IOCTLS

    def unregister(self, start: int, length: int) -> None:
        self._live("UFFDIO_UNREGISTER")
        self.ranges = [(s, n) for s, n in self.ranges if not (start <= s and s + n <= start + length)]
        self.wake(start, length)

    def wake(self, start: int, length: int) -> None:
        self._live("UFFDIO_WAKE")
        self.waiting = {a for a in self.waiting if not start <= a < start + length}

    def _place(self, what: str, dst: int, length: int, fill: bytes | None, src: int, dontwake: bool) -> int:
        self._live(what)
        if not self._registered(dst, length):
            raise uffd_error_from_errno(errno.ENOENT, what)
        for done in range(0, length, PAGE):
            if dst + done in self.memory.pages:
                if done:
                    self._woken(dst, done, dontwake)
                    raise uffd_error_from_errno(errno.EAGAIN, what, done=done)
                raise uffd_error_from_errno(errno.EEXIST, what)
            self.memory.pages[dst + done] = fill if fill is not None else self.memory.read_source(src + done, PAGE)
        self._woken(dst, length, dontwake)
        return length

    def _woken(self, dst: int, length: int, dontwake: bool) -> None:
        if not dontwake:
            self.wake(dst, length)

    def copy(self, dst: int, src: int, length: int, *, dontwake: bool = False, wp: bool = False) -> int:
        return self._place("UFFDIO_COPY", dst, length, None, src, dontwake)

    def zeropage(self, start: int, length: int, *, dontwake: bool = False) -> int:
        return self._place("UFFDIO_ZEROPAGE", start, length, bytes(PAGE), 0, dontwake)

    def place_run(self, dst: int, src: int, page_size: int, count: int, zeros: tuple[int, ...] = (), *,
                  zero_src: int = 0, start: int = 0) -> None:
        zero = {p for low, high in zip(zeros[::2], zeros[1::2]) for p in range(low, high)}
        data = sum(1 for p in range(start) if p not in zero)  # packed pages before ``start``
        for page in range(start, count):
            try:
                if page in zero:
                    self.zeropage(dst + page * page_size, page_size)
                else:
                    self.copy(dst + page * page_size, src + data * page_size, page_size)
                    data += 1
            except UffdError as exc:
                exc.page = page
                raise

    slots_address = 0  #: no flattened messages: the destination's request lane stays off

    def read_events(self, max_events: int = 64) -> list[Event]:
        self._live("read(userfaultfd)")
        events, self.queue = self.queue[:max_events], self.queue[max_events:]
        return events

    def read_flat(self, max_events: int = 64) -> int:
        """As the kernel object's: the events are kept for :meth:`events_read` (no slots here)."""
        self._read = self.read_events(max_events)
        return len(self._read)

    def slots_read(self, count: int) -> list[int]:
        """As the kernel object's, made from the events kept: a page fault flattened as the
        C reader flattens it, any other event only as a code that is not a page fault's."""
        slots: list[int] = []
        for event in self._read[:count]:
            slots += ([PAGEFAULT_CODE, event.flags, event.address, event.thread_id] if type(event) is PageFault
                      else [-1, 0, 0, 0])
        return slots

    def events_read(self, first: int, count: int) -> list[Event]:
        return self._read[first:count]

    def close(self) -> None:
        self.closed = True

    # -- what a faulting thread does, for harnesses -------------------------------

    def access(self, address: int) -> None:
        """A thread touches ``address``: queue a fault if it is registered and missing."""
        page = address - address % PAGE
        if page in self.memory.pages:
            return
        if self._registered(page, PAGE) and not self.closed:
            self.queue.append(PageFault(page, 0, 0))
            self.waiting.add(page)
        else:
            self.memory.pages[page] = bytes(PAGE)


class FakeHarness:
    """Adapter so :func:`check_userfaultfd_contract` can drive the fake."""

    page_size = PAGE

    def __init__(self) -> None:
        self.memory = FakeMemory()
        self.uffd = FakeUserfaultfd(self.memory)
        self.start = 0x1000_0000

    def source(self, data: bytes) -> int:
        return self.memory.source(data)

    def touch(self, index: int) -> None:
        self.uffd.access(self.start + index * PAGE)

    def finish(self, index: int, timeout: float) -> bytes:
        page = self.start + index * PAGE
        assert page not in self.uffd.waiting, f"page {index} still waits (not woken)"
        return self.memory.pages[page]

    def readable(self, timeout: float) -> bool:
        return bool(self.uffd.queue)

    def close(self) -> None:
        self.memory.pages.clear()
