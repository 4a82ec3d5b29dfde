"""Getting a userfaultfd: the three ways to open one, the API handshake, the probe.

Three ways exist and differ in what they allow (see :class:`OpenMode`):
``/dev/userfaultfd`` (needs access to the root-only device), the
``userfaultfd(2)`` system call (needs CAP_SYS_PTRACE or
``vm.unprivileged_userfaultfd=1``), and the system call with
``UFFD_USER_MODE_ONLY`` (unprivileged, user-space faults only).  With no mode
given, :func:`open_fd` tries them in that order and, if none works, raises
:class:`UffdUnavailableError` saying exactly what to change.

UFFDIO_API may be called once per fd, and fails without saying which feature
it refused, so requested features are first checked against a cached probe
(:func:`supported_features`, made once on a throwaway fd): a missing one is
named in :class:`UffdUnsupportedError` before any fd is spent.
"""

from __future__ import annotations

import errno
import functools
import os

from aiopostcopy.errors import UffdUnavailableError, UffdUnsupportedError
from aiopostcopy.uffd.binding import ffi, lib, uffd_error
from aiopostcopy.uffd.flags import Feature, Ioctl, OpenMode, describe_flags

__all__ = ["open_fd", "negotiate", "supported_features", "supported_ioctls", "require_features", "is_userfaultfd"]

_FIX = (
    "to fix, do one of: give this user read/write access to /dev/userfaultfd (e.g. a udev rule "
    "putting it in the user's group); run with CAP_SYS_PTRACE; or set `sysctl -w "
    "vm.unprivileged_userfaultfd=1` (kernel faults) - UFFD_USER_MODE_ONLY needs none of these "
    "but only catches user-space faults"
)


def _attempt(mode: OpenMode, flags: int) -> int:
    if mode is OpenMode.DEVICE:
        return lib.apc_open_dev(flags)
    if mode is OpenMode.SYSCALL:
        return lib.apc_open_syscall(flags)
    return lib.apc_open_syscall(flags | lib.UFFD_USER_MODE_ONLY)


def _unavailable(failures: list[tuple[OpenMode, int]]) -> UffdUnavailableError:
    tried = "; ".join(f"{mode.value}: {os.strerror(err)}" for mode, err in failures)
    last = failures[-1][1]
    if all(err == errno.ENOSYS for _, err in failures):
        hint = "the kernel is built without CONFIG_USERFAULTFD"
    else:
        hint = _FIX
    return UffdUnavailableError(last, f"cannot open a userfaultfd ({tried}); {hint}")


def open_fd(modes: tuple[OpenMode, ...], flags: int) -> tuple[int, OpenMode]:
    """Open a userfaultfd the first way that works, without the API handshake.

    Args:
        modes: ways to try, in order.
        flags: O_CLOEXEC / O_NONBLOCK bits for the new fd.

    Returns:
        ``(fd, mode used)``.

    Raises:
        UffdUnavailableError: every way failed; the message names each errno and the fix.
    """
    failures: list[tuple[OpenMode, int]] = []
    for mode in modes:
        fd = _attempt(mode, flags)
        if fd >= 0:
            return fd, mode
        failures.append((mode, -fd))
    raise _unavailable(failures)


def _api(fd: int, features: int) -> tuple[int, int]:
    out = ffi.new("uint64_t[2]")
    rc = lib.apc_api(fd, features, out, out + 1)
    if rc == errno.EPERM and features & Feature.EVENT_FORK:
        raise UffdUnsupportedError("UFFD_FEATURE_EVENT_FORK needs CAP_SYS_PTRACE (UFFDIO_API: EPERM)")
    if rc:
        raise uffd_error(rc, f"UFFDIO_API features={Feature(features)!r}")
    return out[0], out[1]


def negotiate(fd: int, features: Feature) -> Ioctl:
    """Run UFFDIO_API on a fresh fd (once per fd).

    Args:
        fd: a just-opened userfaultfd.
        features: features to enable.

    Returns:
        The ioctls the kernel offers on this fd.

    Raises:
        UffdUnsupportedError: EVENT_FORK without CAP_SYS_PTRACE.
        UffdError: the kernel refused the handshake.
    """
    _available, ioctls = _api(fd, int(features))
    return Ioctl(ioctls)


@functools.cache
def _probe() -> tuple[Feature, Ioctl]:
    fd, _mode = open_fd(tuple(OpenMode), lib.O_CLOEXEC)
    try:
        features, ioctls = _api(fd, 0)
    finally:
        os.close(fd)
    return Feature(features), Ioctl(ioctls)


def supported_features() -> Feature:
    """Every feature this kernel offers (probed once on a throwaway fd, then cached).

    Returns:
        The kernel's UFFDIO_API feature set; bits the headers do not name are kept.

    Raises:
        UffdUnavailableError: no userfaultfd can be opened here (not cached).
    """
    return _probe()[0]


def supported_ioctls() -> Ioctl:
    """The fd-level ioctls this kernel reports (API, REGISTER, UNREGISTER); cached like
    :func:`supported_features`."""
    return _probe()[1]


def require_features(features: Feature) -> None:
    """Check requested features against the kernel's.

    Args:
        features: what the caller wants to negotiate.

    Raises:
        UffdUnsupportedError: listing each missing feature by name.
        UffdUnavailableError: the probe could not open a userfaultfd.
    """
    missing = Feature(int(features) & ~int(supported_features()))
    if missing:
        names = ", ".join(describe_flags(missing))
        raise UffdUnsupportedError(f"this kernel does not support userfaultfd features: {names}")


def is_userfaultfd(fd: int) -> bool:
    """True if ``fd`` is open and refers to a userfaultfd (checked via /proc/self/fd)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[userfaultfd]"
    except OSError:
        return False
