"""The userfaultfd contract every implementation must keep, real or fake.

``check_userfaultfd_contract(make)`` drives an implementation through open /
register / fault / copy / read_events / close on a 4-page region and asserts
what callers (the service loop) rely on.  ``make()`` returns a fresh
:class:`Harness`: the object under test plus the means to cause faults on
its region and observe what a faulting thread would see.  Run it against the
real :class:`aiopostcopy.uffd.Userfaultfd` (tests/uffd/test_conformance.py)
and against any fake used in pure-logic tests, so the fake cannot drift.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable
from typing import Any, Protocol

from aiopostcopy.errors import ClosedError, PageExistsError, RangeGoneError, UffdRetry
from aiopostcopy.uffd import Ioctl, PageFault, RegisterMode

PAGES = 4


class Harness(Protocol):
    """What the contract check needs around one implementation."""

    uffd: Any  # the Userfaultfd-like object, opened with no features, nothing registered
    start: int  # page-aligned address of a PAGES-page region, not registered yet
    page_size: int

    def source(self, data: bytes) -> int:
        """Address of a buffer holding ``data`` (kept alive by the harness)."""

    def touch(self, index: int) -> None:
        """Start a read of page ``index`` that waits while the page is missing."""

    def finish(self, index: int, timeout: float) -> bytes:
        """Wait for the read of page ``index`` to complete; return the page's bytes."""

    def readable(self, timeout: float) -> bool:
        """True once the uffd has events queued."""

    def close(self) -> None:
        """Release the region and helpers (the check closes the uffd itself)."""


def _read_all(h: Harness, count: int, timeout: float = 5.0) -> list[Any]:
    events: list[Any] = []
    deadline = time.monotonic() + timeout
    while len(events) < count:
        assert h.readable(max(0.0, deadline - time.monotonic())), f"expected {count} events, got {events}"
        events.extend(h.uffd.read_events())
    return events


def _check_fault_and_copy(h: Harness) -> None:
    ps, start = h.page_size, h.start
    h.touch(1)
    [fault] = _read_all(h, 1)
    assert isinstance(fault, PageFault) and fault.page_start(ps) == start + ps
    data = bytes([0xC3]) * ps
    assert h.uffd.copy(start + ps, h.source(data), ps) == ps
    assert h.finish(1, 5.0) == data


def _check_existing_pages(h: Harness) -> None:
    ps, start = h.page_size, h.start
    with_existing = h.source(bytes([0x11]) * (3 * ps))
    try:
        h.uffd.copy(start + ps, with_existing, ps)
        raise AssertionError("copy onto a present page must raise PageExistsError")
    except PageExistsError as exc:
        assert exc.errno == errno.EEXIST and isinstance(exc, OSError)
    try:
        h.uffd.copy(start, with_existing, 3 * ps)  # page 0 missing, page 1 present
        raise AssertionError("a run reaching a present page must stop there")
    except UffdRetry as exc:
        assert exc.errno == errno.EAGAIN and exc.done == ps
    assert h.uffd.read_events() == []


def _check_zeropage(h: Harness) -> None:
    ps, start = h.page_size, h.start
    assert h.uffd.zeropage(start + 3 * ps, ps) == ps
    h.touch(3)
    assert h.finish(3, 5.0) == bytes(ps)


def _check_unregister(h: Harness) -> None:
    ps, start = h.page_size, h.start
    h.uffd.unregister(start, PAGES * ps)
    try:
        h.uffd.copy(start + 2 * ps, h.source(bytes(ps)), ps)
        raise AssertionError("copy outside a registered range must raise RangeGoneError")
    except RangeGoneError as exc:
        assert exc.errno == errno.ENOENT


def _check_place_run(h: Harness) -> None:
    """Pages 0, 1 and 3 are present, page 2 missing.  A run over pages 1..2 whose page 1 is zero
    stops at once (page 1 exists) and says so; from its page 1 on it places page 2 from the
    first packed page (the zero page has no bytes in the packed buffer)."""
    ps, start = h.page_size, h.start
    packed = h.source(bytes([0x2B]) * ps)
    try:
        h.uffd.place_run(start + ps, packed, ps, 2, (0, 1))
        raise AssertionError("place_run onto a present page must raise PageExistsError")
    except PageExistsError as exc:
        assert exc.page == 0
    h.uffd.place_run(start + ps, packed, ps, 2, (0, 1), start=1)
    h.touch(2)
    assert h.finish(2, 5.0) == bytes([0x2B]) * ps


def _check_closed(h: Harness) -> None:
    uffd, start, ps = h.uffd, h.start, h.page_size
    uffd.close()
    uffd.close()
    assert uffd.closed
    calls: list[Callable[[], object]] = [
        uffd.fileno,
        uffd.read_events,
        lambda: uffd.register(start, ps),
        lambda: uffd.copy(start, h.source(bytes(ps)), ps),
        lambda: uffd.wake(start, ps),
    ]
    for call in calls:
        try:
            call()
            raise AssertionError(f"{call} worked after close()")
        except ClosedError:
            pass


def check_userfaultfd_contract(make: Callable[[], Harness]) -> None:
    """Assert the userfaultfd contract on a fresh harness from ``make``.

    Checks, in order: an empty queue reads as ``[]``; register returns the
    range ioctls; a touch of a missing page yields one PageFault for it and a
    copy resolves it; copying onto a present page raises PageExistsError, a
    run that reaches one stops there with UffdRetry(done); place_run places
    a run with a zero stretch from a given page and reports where it stopped
    (``page``); zeropage places zeros; after unregister a copy raises RangeGoneError; close is idempotent
    and every later call raises ClosedError.

    Raises:
        AssertionError: the implementation broke the contract.
    """
    h = make()
    try:
        assert h.uffd.read_events() == []
        ioctls = h.uffd.register(h.start, PAGES * h.page_size, RegisterMode.MISSING)
        assert Ioctl.COPY in ioctls and Ioctl.WAKE in ioctls and Ioctl.ZEROPAGE in ioctls
        _check_fault_and_copy(h)
        _check_existing_pages(h)
        _check_zeropage(h)
        _check_place_run(h)
        _check_unregister(h)
        _check_closed(h)
    finally:
        h.uffd.close()
        h.close()
