"""Events read from a userfaultfd, as frozen slotted dataclasses.

``apc_read_msgs`` (C) reads up to N ``struct uffd_msg`` in one read() and
flattens each into ``APC_MSG_SLOTS`` (4) uint64 slots: the event code then its
three arguments.  :func:`decode_events` turns those slots into objects with one
memoryview slice and one ``tolist()``, so no struct field is touched from
Python.  Layout per event (slot 0 is the event code):

==========  ==============  ==========  ==========
event       slot 1          slot 2      slot 3
==========  ==============  ==========  ==========
PAGEFAULT   flags           address     thread id
FORK        new uffd fd     0           0
REMAP       from            to          length
REMOVE      start           end         0
UNMAP       start           end         0
==========  ==============  ==========  ==========

A page fault's address is page-aligned (to the base page, also on hugetlbfs)
unless UFFD_FEATURE_EXACT_ADDRESS was negotiated; its thread id is 0 unless
UFFD_FEATURE_THREAD_ID was.
"""

from __future__ import annotations

import dataclasses
import errno

from aiopostcopy.errors import UffdError
from aiopostcopy.uffd.binding import ffi, lib

__all__ = ["PAGEFAULT_CODE", "SLOTS", "PageFault", "ForkEvent", "RemapEvent", "RemoveEvent", "UnmapEvent", "Event", "MessageBuffer", "decode_events"]

_FLAG_WRITE = lib.UFFD_PAGEFAULT_FLAG_WRITE
_FLAG_WP = lib.UFFD_PAGEFAULT_FLAG_WP
_FLAG_MINOR = lib.UFFD_PAGEFAULT_FLAG_MINOR
SLOTS = lib.APC_MSG_SLOTS


@dataclasses.dataclass(frozen=True, slots=True)
class PageFault:
    """A thread touched a registered page (UFFD_EVENT_PAGEFAULT).

    Attributes:
        address: the faulting address (page-aligned unless EXACT_ADDRESS).
        flags: raw UFFD_PAGEFAULT_FLAG_* bits.
        thread_id: the faulting thread's TID (0 unless THREAD_ID was negotiated).
    """

    address: int
    flags: int
    thread_id: int

    @property
    def write(self) -> bool:
        """True for a write access."""
        return bool(self.flags & _FLAG_WRITE)

    @property
    def wp(self) -> bool:
        """True when the fault comes from write protection (WP mode)."""
        return bool(self.flags & _FLAG_WP)

    @property
    def minor(self) -> bool:
        """True for a minor fault (MINOR mode: page in the cache, not mapped here)."""
        return bool(self.flags & _FLAG_MINOR)

    def page_start(self, page_size: int) -> int:
        """The start of the ``page_size`` page holding :attr:`address`."""
        return self.address & ~(page_size - 1)


@dataclasses.dataclass(frozen=True, slots=True)
class ForkEvent:
    """A registered process forked (UFFD_EVENT_FORK).

    Attributes:
        fd: a new userfaultfd for the child, installed in *this* process on
            read; the caller owns it (wrap it with ``Userfaultfd.adopt``).
    """

    fd: int


@dataclasses.dataclass(frozen=True, slots=True)
class RemapEvent:
    """A registered range moved with mremap (UFFD_EVENT_REMAP)."""

    old: int
    new: int
    length: int


@dataclasses.dataclass(frozen=True, slots=True)
class RemoveEvent:
    """Pages were dropped by madvise(DONTNEED/REMOVE) (UFFD_EVENT_REMOVE); [start, end)."""

    start: int
    end: int


@dataclasses.dataclass(frozen=True, slots=True)
class UnmapEvent:
    """A registered range was unmapped (UFFD_EVENT_UNMAP); [start, end)."""

    start: int
    end: int


Event = PageFault | ForkEvent | RemapEvent | RemoveEvent | UnmapEvent

_PAGEFAULT = lib.UFFD_EVENT_PAGEFAULT
#: The first slot of a flattened page fault (UFFD_EVENT_PAGEFAULT).
PAGEFAULT_CODE = _PAGEFAULT
_new = object.__new__
# The generated __init__ of a frozen dataclass sets fields through
# object.__setattr__ (~430 ns for three); the slot descriptors directly cost
# ~290 ns. Faults are the hot path, so decode builds PageFault this way.
_set_address = PageFault.address.__set__  # type: ignore[attr-defined]
_set_flags = PageFault.flags.__set__  # type: ignore[attr-defined]
_set_thread_id = PageFault.thread_id.__set__  # type: ignore[attr-defined]


def _page_fault(flags: int, address: int, thread_id: int) -> PageFault:
    fault = _new(PageFault)
    _set_address(fault, address)
    _set_flags(fault, flags)
    _set_thread_id(fault, thread_id)
    return fault


def _other_event(code: int, a: int, b: int, c: int) -> Event:
    if code == lib.UFFD_EVENT_FORK:
        return ForkEvent(a)
    if code == lib.UFFD_EVENT_REMAP:
        return RemapEvent(a, b, c)
    if code == lib.UFFD_EVENT_REMOVE:
        return RemoveEvent(a, b)
    if code == lib.UFFD_EVENT_UNMAP:
        return UnmapEvent(a, b)
    raise UffdError(errno.EBADMSG, f"read(userfaultfd): unknown event code {code:#x}")


def decode_events(slots: memoryview, count: int) -> list[Event]:
    """Decode ``count`` flattened messages.

    Args:
        slots: a ``"Q"``-format memoryview over the slot buffer.
        count: messages the read returned.

    Returns:
        One event object per message, in kernel order.

    Raises:
        UffdError: an event code this package does not know (EBADMSG).
    """
    values = slots[: count * SLOTS].tolist()
    events: list[Event] = []
    append = events.append
    for i in range(0, count * SLOTS, SLOTS):
        code = values[i]
        if code == _PAGEFAULT:
            append(_page_fault(values[i + 1], values[i + 2], values[i + 3]))
        else:
            append(_other_event(code, values[i + 1], values[i + 2], values[i + 3]))
    return events


class MessageBuffer:
    """The reusable buffers of one reader: raw ``uffd_msg`` array and flattened slots.

    Attributes:
        capacity: messages one read can take.
        msgs: ``struct uffd_msg[capacity]`` for read().
        slots: ``uint64_t[capacity * SLOTS]`` filled by apc_read_msgs.
        view: a ``"Q"`` memoryview over ``slots`` for :func:`decode_events`.
        address: where ``slots`` is, for C readers of the flattened messages.
    """

    __slots__ = ("capacity", "msgs", "slots", "view", "address")

    def __init__(self, capacity: int) -> None:
        self.grow(capacity)

    def grow(self, capacity: int) -> None:
        """Reallocate for ``capacity`` messages."""
        self.msgs = ffi.new("struct uffd_msg[]", capacity)
        self.slots = ffi.new("uint64_t[]", capacity * SLOTS)
        self.view = memoryview(ffi.buffer(self.slots)).cast("Q")
        self.address = int(ffi.cast("uintptr_t", self.slots))
        self.capacity = capacity
