"""One userfaultfd, owned: open or adopt it, register ranges, resolve faults, read events.

:class:`Userfaultfd` is a thin owner of one fd.  Every operation is one cffi
call into a helper that fills the kernel struct and makes the ioctl (the GIL
is released meanwhile); Python only picks a mode word and, on failure, builds
the typed exception.  The error contract of the placing calls (copy,
zeropage, continue_, poison, move) follows the kernel:

* success returns ``length`` and wakes the waiters unless ``dontwake``;
* :class:`PageExistsError` (EEXIST): the *first* page is already present;
  nothing was placed and **nobody was woken**: count it placed, ``wake()``;
* :class:`UffdRetry` (EAGAIN) with ``.done``: the call stopped after ``done``
  bytes (these were placed and woken).  Either the mapping is changing (a
  non-cooperative event is queued: read the events, then retry the rest) or a
  page *in the middle* of the run already existed (the retry of the rest then
  raises PageExistsError for that page);
* :class:`RangeGoneError` (ENOENT): range unmapped, moved or not registered;
* :class:`TargetGoneError` (ESRCH): the process owning the fd is gone.

Ownership (after trio): ``close()`` marks the object closed first and closes
the fd; every later call raises :class:`ClosedError`.  The object is never
closed behind the caller's back: if it is garbage-collected open, the fd is
left open and a ResourceWarning says so, because closing a registered
userfaultfd while threads wait makes the kernel fill zero pages.

Thread safety: the ioctls may be called from several threads at once (the
C side keeps a failed call's ``done`` in a thread-local slot, like errno).
``read_events`` reuses one buffer, so call it from one thread at a time per
object.
"""

from __future__ import annotations

import errno
import os
import warnings

from aiopostcopy.errors import ClosedError, UffdError
from aiopostcopy.uffd.binding import ffi, lib, uffd_error
from aiopostcopy.uffd.events import (
    Event,
    ForkEvent,
    MessageBuffer,
    SLOTS,
    PageFault,
    RemapEvent,
    RemoveEvent,
    UnmapEvent,
    decode_events,
)
from aiopostcopy.uffd.flags import Feature, Ioctl, OpenMode, RegisterMode, ioctl_named
from aiopostcopy.uffd.opening import (
    is_userfaultfd,
    negotiate,
    open_fd,
    require_features,
    supported_features,
    supported_ioctls,
)

__all__ = ["Userfaultfd", "OpenMode", "Feature", "Ioctl", "RegisterMode", "supported_features"]
__all__ += ["Event", "PageFault", "ForkEvent", "RemapEvent", "RemoveEvent", "UnmapEvent"]

_COPY_DONTWAKE = lib.UFFDIO_COPY_MODE_DONTWAKE
_COPY_WP = lib.UFFDIO_COPY_MODE_WP
_ZERO_DONTWAKE = lib.UFFDIO_ZEROPAGE_MODE_DONTWAKE
_CONT_DONTWAKE = lib.UFFDIO_CONTINUE_MODE_DONTWAKE
_WP_WP = lib.UFFDIO_WRITEPROTECT_MODE_WP
_WP_DONTWAKE = lib.UFFDIO_WRITEPROTECT_MODE_DONTWAKE
_EAGAIN = errno.EAGAIN
_EINTR = errno.EINTR
_NULL = ffi.NULL
_copy = lib.apc_copy
_zeropage = lib.apc_zeropage
_wake = lib.apc_wake
_last_done = lib.apc_last_done
_read_msgs = lib.apc_read_msgs
_place_run = lib.apc_place_run


class Userfaultfd:
    """An owned userfaultfd. Make one with :meth:`open` or :meth:`adopt`."""

    __slots__ = ("_fd", "_mode", "_features", "_ioctls", "_buffer")

    def __init__(self, fd: int, mode: OpenMode | None, features: Feature, ioctls: Ioctl) -> None:
        self._fd = fd
        self._mode = mode
        self._features = features
        self._ioctls = ioctls
        self._buffer = MessageBuffer(64)

    # -- making one ---------------------------------------------------------------

    @classmethod
    def open(
        cls, features: Feature = Feature(0), *, nonblocking: bool = True, mode: OpenMode | None = None
    ) -> Userfaultfd:
        """Open a userfaultfd and negotiate ``features``.

        Args:
            features: features to enable (checked against :func:`supported_features`).
            nonblocking: open with O_NONBLOCK (needed for use with an event loop).
            mode: one way to open; by default DEVICE, then SYSCALL, then USER_MODE_ONLY.

        Returns:
            The new object; :attr:`mode` says which way worked.

        Raises:
            UffdUnavailableError: no way to open one works; the message names the fix.
            UffdUnsupportedError: a requested feature is missing (each is named).
            UffdError: UFFDIO_API failed.
        """
        features = Feature(features)
        require_features(features)
        flags = lib.O_CLOEXEC | (lib.O_NONBLOCK if nonblocking else 0)
        fd, used = open_fd(tuple(OpenMode) if mode is None else (mode,), flags)
        try:
            ioctls = negotiate(fd, features)
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, used, features, ioctls)

    @classmethod
    def adopt(cls, fd: int, *, features: Feature = Feature(0), nonblocking: bool = True) -> Userfaultfd:
        """Take ownership of a userfaultfd that already went through UFFDIO_API.

        For fds received over SCM_RIGHTS or from a :class:`ForkEvent`. No
        handshake is made (it may happen only once per fd).

        Args:
            fd: the fd; closed by :meth:`close` from now on.
            features: what the other side negotiated (for the caller's reference).
            nonblocking: set O_NONBLOCK on the open file (shared with the other process).

        Returns:
            The new object; its :attr:`mode` is None (unknown).

        Raises:
            ValueError: ``fd`` is not a userfaultfd (it stays the caller's).
        """
        if not is_userfaultfd(fd):
            raise ValueError(f"fd {fd} is not a userfaultfd")
        if nonblocking:
            os.set_blocking(fd, False)
        try:
            ioctls = supported_ioctls()
        except UffdError:
            ioctls = Ioctl(0)
        return cls(fd, None, Feature(features), ioctls)

    # -- state --------------------------------------------------------------------

    @property
    def fd(self) -> int:
        """The fd number (raises ClosedError once closed)."""
        if self._fd < 0:
            raise ClosedError("userfaultfd is closed")
        return self._fd

    def fileno(self) -> int:
        """The fd number, for selectors and ``loop.add_reader``."""
        return self.fd

    @property
    def mode(self) -> OpenMode | None:
        """How it was opened; None for an adopted fd."""
        return self._mode

    @property
    def features(self) -> Feature:
        """The features negotiated (as requested)."""
        return self._features

    @property
    def ioctls(self) -> Ioctl:
        """The fd-level ioctls the kernel reported at UFFDIO_API."""
        return self._ioctls

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._fd < 0

    def close(self) -> None:
        """Close the fd (idempotent). Threads still waiting on a registered range
        get zero-filled pages from the kernel: resolve or unregister first."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> Userfaultfd:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            warnings.warn(
                f"unclosed Userfaultfd fd={self._fd}: left open on purpose (closing a registered "
                "userfaultfd zero-fills the pages threads wait on)",
                ResourceWarning,
                stacklevel=2,
            )

    def __repr__(self) -> str:
        state = "closed" if self._fd < 0 else f"fd={self._fd}"
        mode = self._mode.name if self._mode is not None else "adopted"
        return f"<Userfaultfd {state} {mode} features={self._features!r}>"

    # -- errors -------------------------------------------------------------------

    def _error(self, rc: int, what: str, done: int = 0) -> Exception:
        if self._fd < 0:
            return ClosedError(f"{what}: userfaultfd is closed")
        return uffd_error(rc, what, done=done)

    # -- ranges -------------------------------------------------------------------

    def register(self, start: int, length: int, mode: RegisterMode = RegisterMode.MISSING) -> Ioctl:
        """Register ``[start, start+length)`` (UFFDIO_REGISTER).

        Args:
            start: page-aligned address in this process.
            length: bytes, a multiple of the range's page size.
            mode: MISSING, WP and/or MINOR.

        Returns:
            The ioctls allowed on the range (e.g. no ZEROPAGE on hugetlbfs).

        Raises:
            UffdError: e.g. EINVAL (unaligned, mode not supported for this memory),
                EBUSY (registered by another userfaultfd).
            ClosedError: after close().
        """
        out = ffi.new("uint64_t *")
        rc = lib.apc_register(self._fd, start, length, int(mode), out)
        if rc:
            raise self._error(rc, f"UFFDIO_REGISTER [{start:#x}, +{length:#x}) {RegisterMode(mode)!r}")
        return Ioctl(out[0])

    def unregister(self, start: int, length: int) -> None:
        """Unregister a range (UFFDIO_UNREGISTER); the kernel wakes its waiters.

        Raises:
            UffdError: EINVAL for an unaligned or unknown range.
            ClosedError: after close().
        """
        rc = lib.apc_unregister(self._fd, start, length)
        if rc:
            raise self._error(rc, f"UFFDIO_UNREGISTER [{start:#x}, +{length:#x})")

    def wake(self, start: int, length: int) -> None:
        """Wake the threads waiting on a range (UFFDIO_WAKE).

        Raises:
            UffdError: e.g. EINVAL for an unaligned range.
            ClosedError: after close().
        """
        rc = _wake(self._fd, start, length)
        if rc:
            raise self._error(rc, f"UFFDIO_WAKE [{start:#x}, +{length:#x})")

    # -- placing pages ------------------------------------------------------------

    def copy(self, dst: int, src: int, length: int, *, dontwake: bool = False, wp: bool = False) -> int:
        """Place ``length`` bytes from ``src`` (this process) at ``dst`` (UFFDIO_COPY).

        Args:
            dst: page-aligned address in the registered range (in the fd's process).
            src: address of the bytes in this process.
            length: bytes, a multiple of the page size.
            dontwake: do not wake the waiters (call :meth:`wake` later).
            wp: map the pages write-protected (WP-registered ranges).

        Returns:
            ``length`` (everything was placed).

        Raises:
            PageExistsError: the first page exists; nothing placed or woken.
            UffdRetry: stopped after ``.done`` bytes (EAGAIN); see the module doc.
            RangeGoneError: ENOENT. TargetGoneError: ESRCH. UffdError: other errno.
            ClosedError: after close().
        """
        mode = (_COPY_DONTWAKE if dontwake else 0) | (_COPY_WP if wp else 0)
        rc = _copy(self._fd, dst, src, length, mode, _NULL)
        if rc:
            raise self._error(rc, f"UFFDIO_COPY dst={dst:#x} len={length:#x}", _last_done())
        return length

    def zeropage(self, start: int, length: int, *, dontwake: bool = False) -> int:
        """Map zero pages at a range (UFFDIO_ZEROPAGE); not on hugetlbfs.

        Returns:
            ``length``.

        Raises:
            Same contract as :meth:`copy`.
        """
        rc = _zeropage(self._fd, start, length, _ZERO_DONTWAKE if dontwake else 0, _NULL)
        if rc:
            raise self._error(rc, f"UFFDIO_ZEROPAGE start={start:#x} len={length:#x}", _last_done())
        return length

    def place_run(self, dst: int, src: int, page_size: int, count: int, zeros: tuple[int, ...] = (), *,
                  zero_src: int = 0, start: int = 0) -> None:
        """Place a run of ``count`` pages at ``dst`` with zero stretches inside, in one call.

        Pages named by ``zeros`` (flattened half-open bounds relative to the
        run, sorted and disjoint) are zero pages: UFFDIO_ZEROPAGE, or copies of
        the zeroed page at ``zero_src`` when it is given (hugetlbfs).  The other
        pages come, in order, from the packed buffer at ``src``: one UFFDIO_COPY
        per stretch.  Placing starts at page ``start`` of the run.  Waiters are
        woken as by :meth:`copy`.

        Raises:
            The :meth:`copy` contract (PageExistsError, UffdRetry, ...), with one
            more attribute on the exception: ``page``, the first page of the run
            not placed (a partial ioctl's pages counted), where a retry resumes.
            UffdError(EINVAL): ``zeros`` is not sorted bounds within the run.
        """
        bounds = ffi.new("uint64_t[]", zeros) if zeros else _NULL
        out = ffi.new("uint64_t *")
        rc = _place_run(self._fd, dst, src, page_size, count, bounds, len(zeros), zero_src, start, out)
        if rc:
            exc = self._error(rc, f"placing {count} pages at {dst:#x} from page {start}",
                              (out[0] - start) * page_size)
            exc.page = out[0]
            raise exc

    def continue_(self, start: int, length: int, *, dontwake: bool = False) -> int:
        """Map pages already in the page cache (UFFDIO_CONTINUE, MINOR mode).

        Returns:
            ``length``.

        Raises:
            The :meth:`copy` contract; UffdError(EFAULT) when a page is not in the page cache.
        """
        rc = lib.apc_continue(self._fd, start, length, _CONT_DONTWAKE if dontwake else 0, _NULL)
        if rc:
            raise self._error(rc, f"UFFDIO_CONTINUE start={start:#x} len={length:#x}", _last_done())
        return length

    def writeprotect(self, start: int, length: int, *, wp: bool, dontwake: bool = False) -> None:
        """Set or clear write protection on a WP-registered range (UFFDIO_WRITEPROTECT).

        Args:
            wp: True to protect, False to unprotect (which wakes waiters unless dontwake).

        Raises:
            UffdRetry: EAGAIN while the mapping changes. UffdError: other errno.
            ClosedError: after close().
        """
        mode = (_WP_WP if wp else 0) | (_WP_DONTWAKE if dontwake else 0)
        rc = lib.apc_writeprotect(self._fd, start, length, mode)
        if rc:
            raise self._error(rc, f"UFFDIO_WRITEPROTECT start={start:#x} len={length:#x} wp={wp}")

    def poison(self, start: int, length: int) -> int:
        """Mark missing pages poisoned (UFFDIO_POISON): touching them raises SIGBUS.

        Returns:
            ``length``.

        Raises:
            UffdUnsupportedError: the build's headers or the kernel lack UFFDIO_POISON.
            Otherwise the :meth:`copy` contract.
        """
        ioctl_named("POISON")
        rc = lib.apc_poison(self._fd, start, length, 0, _NULL)
        if rc:
            raise self._error(rc, f"UFFDIO_POISON start={start:#x} len={length:#x}", _last_done())
        return length

    def move(self, dst: int, src: int, length: int, *, mode: int = 0) -> int:
        """Move pages from ``src`` to ``dst`` without copying (UFFDIO_MOVE, anonymous memory).

        Args:
            mode: raw UFFDIO_MOVE_MODE_* bits.

        Returns:
            ``length``.

        Raises:
            UffdUnsupportedError: the build's headers or the kernel lack UFFDIO_MOVE.
            Otherwise the :meth:`copy` contract.
        """
        ioctl_named("MOVE")
        rc = lib.apc_move(self._fd, dst, src, length, mode, _NULL)
        if rc:
            raise self._error(rc, f"UFFDIO_MOVE dst={dst:#x} src={src:#x} len={length:#x}", _last_done())
        return length

    # -- events -------------------------------------------------------------------

    @property
    def slots_address(self) -> int:
        """Address of the messages of the last :meth:`read_events`, flattened as
        :data:`~aiopostcopy.uffd.events.SLOTS` uint64 each (code first, then for a page fault its
        flags, address and thread id): for C readers, valid until the next read.  A stand-in
        without such a buffer says 0."""
        return self._buffer.address

    def read_flat(self, max_events: int = 64) -> int:
        """:meth:`read_events` without the event objects, for a C reader: how many messages one
        read() took (0 when nothing is queued), flattened at :attr:`slots_address`;
        :meth:`events_read` makes objects of any of them.

        Raises:
            As :meth:`read_events`.
        """
        buf = self._buffer
        if not 0 < max_events <= buf.capacity:
            if max_events < 1:
                raise ValueError("max_events must be at least 1")
            buf.grow(max_events)
        while True:
            n = _read_msgs(self._fd, buf.msgs, max_events, buf.slots)
            if n >= 0:
                return n
            if n == -_EAGAIN:
                return 0
            if n != -_EINTR:
                raise self._error(-n, "read(userfaultfd)")

    def slots_read(self, count: int) -> list[int]:
        """The first ``count`` messages of the last :meth:`read_flat` as their flattened slots, one
        list of ints (:data:`~aiopostcopy.uffd.events.SLOTS` per message; a page fault's code,
        flags, address and thread id): for a reader that needs a page fault's address and
        thread but no object (:meth:`events_read` makes the objects)."""
        return self._buffer.view[:count * SLOTS].tolist()

    def events_read(self, first: int, count: int) -> list[Event]:
        """Messages ``first`` to ``count`` of the last :meth:`read_flat`, as :meth:`read_events` returns them."""
        return decode_events(self._buffer.view[first * SLOTS:], count - first)

    def read_events(self, max_events: int = 64) -> list[Event]:
        """Read up to ``max_events`` queued events with one read().

        Reading a non-cooperative event (fork, remap, remove, unmap) is what lets
        the process that caused it continue.

        Args:
            max_events: at most this many (the buffer grows to fit).

        Returns:
            The events, oldest first; ``[]`` when nothing is queued (EAGAIN).

        Raises:
            ValueError: max_events < 1.
            UffdError: the read failed. ClosedError: after close().
        """
        count = self.read_flat(max_events)
        return decode_events(self._buffer.view, count) if count else []

