"""The one door to the compiled C helpers: ``ffi``, a typed ``lib``, and errno checks.

``aiopostcopy.uffd._uffd`` is built by cffi from ``_cdefs.h`` and
``_source.c``; every helper in it returns 0 or an errno value (the open and
read helpers return a count or ``-errno``).  This module turns those numbers
into exceptions in exactly one place:

* :func:`uffd_error` / :func:`check_rc` for userfaultfd ioctls: each errno
  becomes the typed :class:`~aiopostcopy.errors.UffdError` subclass (also an
  :class:`OSError`) from :func:`aiopostcopy.errors.uffd_error_from_errno`;
* :func:`check_os` for plain system calls (mmap, madvise, fallocate...):
  a plain :class:`OSError` subclass chosen by Python from the errno.

``lib`` is typed by the :class:`UffdLib` protocol so the rest of the package
is checked against the same signatures the C compiler saw.
"""

from __future__ import annotations

import errno
import os
from typing import Any, Protocol, cast

from aiopostcopy.errors import UffdError, UffdUnsupportedError, uffd_error_from_errno

try:
    from aiopostcopy.uffd._uffd import ffi, lib as _lib
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(
        "aiopostcopy.uffd._uffd (the compiled userfaultfd binding) is missing: "
        "run `pip install .` in the source tree (needs gcc, linux-libc-dev and python3-dev), "
        "or `python setup.py build_ext --inplace` for a checkout"
    ) from exc

__all__ = ["ffi", "lib", "UffdLib", "check_rc", "check_os", "uffd_error", "buffer_address"]


class UffdLib(Protocol):
    """The compiled helpers and constants (see ``_cdefs.h``)."""

    UFFD_API: int
    UFFD_USER_MODE_ONLY: int
    UFFD_EVENT_PAGEFAULT: int
    UFFD_EVENT_FORK: int
    UFFD_EVENT_REMAP: int
    UFFD_EVENT_REMOVE: int
    UFFD_EVENT_UNMAP: int
    UFFD_PAGEFAULT_FLAG_WRITE: int
    UFFD_PAGEFAULT_FLAG_WP: int
    UFFD_PAGEFAULT_FLAG_MINOR: int
    UFFD_FEATURE_PAGEFAULT_FLAG_WP: int
    UFFD_FEATURE_EVENT_FORK: int
    UFFD_FEATURE_EVENT_REMAP: int
    UFFD_FEATURE_EVENT_REMOVE: int
    UFFD_FEATURE_MISSING_HUGETLBFS: int
    UFFD_FEATURE_MISSING_SHMEM: int
    UFFD_FEATURE_EVENT_UNMAP: int
    UFFD_FEATURE_SIGBUS: int
    UFFD_FEATURE_THREAD_ID: int
    UFFD_FEATURE_MINOR_HUGETLBFS: int
    UFFD_FEATURE_MINOR_SHMEM: int
    UFFD_FEATURE_EXACT_ADDRESS: int
    UFFD_FEATURE_WP_HUGETLBFS_SHMEM: int
    _UFFDIO_REGISTER: int
    _UFFDIO_UNREGISTER: int
    _UFFDIO_WAKE: int
    _UFFDIO_COPY: int
    _UFFDIO_ZEROPAGE: int
    _UFFDIO_WRITEPROTECT: int
    _UFFDIO_CONTINUE: int
    _UFFDIO_API: int
    UFFDIO_REGISTER_MODE_MISSING: int
    UFFDIO_REGISTER_MODE_WP: int
    UFFDIO_REGISTER_MODE_MINOR: int
    UFFDIO_COPY_MODE_DONTWAKE: int
    UFFDIO_COPY_MODE_WP: int
    UFFDIO_ZEROPAGE_MODE_DONTWAKE: int
    UFFDIO_WRITEPROTECT_MODE_WP: int
    UFFDIO_WRITEPROTECT_MODE_DONTWAKE: int
    UFFDIO_CONTINUE_MODE_DONTWAKE: int
    HAS_MOVE: int
    HAS_POISON: int
    HAS_WP_UNPOPULATED: int
    HAS_WP_ASYNC: int
    APC_FEATURE_MOVE: int
    APC_FEATURE_POISON: int
    APC_FEATURE_WP_UNPOPULATED: int
    APC_FEATURE_WP_ASYNC: int
    APC_IOCTL_MOVE: int
    APC_IOCTL_POISON: int
    APC_MSG_SLOTS: int
    O_CLOEXEC: int
    O_NONBLOCK: int
    PROT_NONE: int
    PROT_READ: int
    PROT_WRITE: int
    MAP_SHARED: int
    MAP_PRIVATE: int
    MAP_ANONYMOUS: int
    MAP_FIXED: int
    MREMAP_MAYMOVE: int
    MREMAP_FIXED: int
    MADV_DONTNEED: int
    MADV_REMOVE: int
    MADV_DONTFORK: int
    FALLOC_FL_KEEP_SIZE: int
    FALLOC_FL_PUNCH_HOLE: int
    MFD_CLOEXEC: int
    MFD_HUGETLB: int
    MFD_HUGE_SHIFT: int
    HUGETLBFS_MAGIC: int
    TMPFS_MAGIC: int
    APC_NICE_INHERIT: int

    def apc_open_dev(self, flags: int) -> int: ...
    def apc_open_syscall(self, flags: int) -> int: ...
    def apc_api(self, fd: int, features: int, features_out: Any, ioctls_out: Any) -> int: ...
    def apc_register(self, fd: int, start: int, len: int, mode: int, ioctls_out: Any) -> int: ...
    def apc_unregister(self, fd: int, start: int, len: int) -> int: ...
    def apc_wake(self, fd: int, start: int, len: int) -> int: ...
    def apc_copy(self, fd: int, dst: int, src: int, len: int, mode: int, done: Any) -> int: ...
    def apc_zeropage(self, fd: int, start: int, len: int, mode: int, done: Any) -> int: ...
    def apc_continue(self, fd: int, start: int, len: int, mode: int, done: Any) -> int: ...
    def apc_writeprotect(self, fd: int, start: int, len: int, mode: int) -> int: ...
    def apc_poison(self, fd: int, start: int, len: int, mode: int, done: Any) -> int: ...
    def apc_move(self, fd: int, dst: int, src: int, len: int, mode: int, done: Any) -> int: ...
    def apc_last_done(self) -> int: ...
    def apc_place_run(self, fd: int, dst: int, src: int, page_size: int, count: int, zeros: Any,
                      nzeros: int, zero_src: int, start: int, page_out: Any) -> int: ...
    def apc_read_msgs(self, fd: int, buf: Any, n: int, out: Any) -> int: ...
    def apc_placer_start(self, p: Any, fd: int, jobs: Any, capacity: int, eventfd: int, niceness: int) -> int: ...
    def apc_placer_submit(self, p: Any, count: int) -> None: ...
    def apc_placer_placed(self, p: Any) -> int: ...
    def apc_placer_tid(self, p: Any) -> int: ...
    def apc_placer_stop(self, p: Any) -> int: ...
    def apc_mmap(self, addr: int, len: int, prot: int, flags: int, fd: int, off: int, out: Any) -> int: ...
    def apc_munmap(self, addr: int, len: int) -> int: ...
    def apc_mremap(self, old_addr: int, old_len: int, new_len: int, flags: int, new_addr: int, out: Any) -> int: ...
    def apc_madvise(self, addr: int, len: int, advice: int) -> int: ...
    def apc_fallocate(self, fd: int, mode: int, offset: int, len: int) -> int: ...
    def apc_fstatfs(self, fd: int, fs_type: Any, block_size: Any) -> int: ...
    def apc_touch(self, addr: int, len: int, stride: int, write: int, value: int) -> int: ...


lib: UffdLib = cast(UffdLib, _lib)


def uffd_error(rc: int, what: str, *, done: int = 0) -> UffdError:
    """Build the typed exception for a failed userfaultfd helper.

    Args:
        rc: the errno value a helper returned (positive).
        what: the operation, e.g. ``"UFFDIO_COPY"``; it leads the message.
        done: bytes handled before the failure (kept by UffdRetry only).

    Returns:
        The :class:`UffdError` subclass instance for ``rc``; ENOTTY (the
        kernel has no such ioctl) and ENOSYS (the build lacks it) become
        :class:`UffdUnsupportedError`.
    """
    if rc in (errno.ENOTTY, errno.ENOSYS):
        return UffdUnsupportedError(f"{what}: not supported here ({os.strerror(rc)})")
    return uffd_error_from_errno(rc, what, done=done)


def check_rc(rc: int, what: str, *, done: int = 0) -> None:
    """Raise the typed userfaultfd error for a non-zero helper result.

    Args:
        rc: 0, a positive errno, or a negative errno (open and read helpers).
        what: the operation, for the message.
        done: bytes handled before the failure.

    Raises:
        UffdError: the typed subclass for the errno (PageExistsError, UffdRetry,
            RangeGoneError, TargetGoneError, or UffdError itself).
    """
    if rc:
        raise uffd_error(abs(rc), what, done=done)


def check_os(rc: int, what: str) -> None:
    """Raise :class:`OSError` (subclass chosen by errno) for a failed system call.

    Args:
        rc: 0 or an errno value (sign ignored).
        what: the call, for the message.

    Raises:
        OSError: e.g. FileNotFoundError, PermissionError, or OSError for ENOMEM.
    """
    if rc:
        err = abs(rc)
        raise OSError(err, f"{what}: {os.strerror(err)}")


def buffer_address(obj: Any) -> int:
    """Return the address of a writable or read-only buffer's first byte.

    The address is valid only while ``obj`` is alive and not resized; the
    caller keeps it so (e.g. a bytearray used as a UFFDIO_COPY source).

    Args:
        obj: any object supporting the buffer protocol (bytes, bytearray, mmap, memoryview).

    Returns:
        The address as an int.
    """
    cdata = ffi.from_buffer(obj)
    try:
        return int(ffi.cast("uintptr_t", cdata))
    finally:
        ffi.release(cdata)
