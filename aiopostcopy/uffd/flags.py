"""Flag sets of the userfaultfd ABI, built from the kernel headers.

Every value here comes from the compiled binding (``lib``), which got it from
``<linux/userfaultfd.h>`` at build time: nothing is typed by hand.  Members
that only newer headers define (``MOVE``, ``POISON``, ``WP_UNPOPULATED``,
``WP_ASYNC``) exist only when the headers had them; use :func:`feature_named`
or :func:`ioctl_named` to ask for one by name and get
:class:`~aiopostcopy.errors.UffdUnsupportedError` (not AttributeError) when it
is absent.  The kernel may report bits that the headers did not name (a 6.18
kernel under 6.1 headers does); ``IntFlag`` keeps them, shown as numbers.
"""

from __future__ import annotations

import enum

from aiopostcopy.errors import UffdUnsupportedError
from aiopostcopy.uffd.binding import lib

__all__ = ["OpenMode", "Feature", "Ioctl", "RegisterMode", "feature_named", "ioctl_named", "describe_flags"]

#: Names that exist in newer headers only, and the header release that added them.
OPTIONAL_NAMES = {"MOVE": "6.8", "POISON": "6.6", "WP_UNPOPULATED": "6.4", "WP_ASYNC": "6.7"}


class OpenMode(enum.Enum):
    """How a userfaultfd was opened; ``.meaning`` says what each can do."""

    DEVICE = "/dev/userfaultfd"
    SYSCALL = "userfaultfd(2)"
    USER_MODE_ONLY = "userfaultfd(2) with UFFD_USER_MODE_ONLY"

    @property
    def meaning(self) -> str:
        """One sentence on what faults this mode can handle and what it needs."""
        return _MEANINGS[self]


_MEANINGS = {
    OpenMode.DEVICE: (
        "opened through /dev/userfaultfd (USERFAULTFD_IOC_NEW): handles faults from user space and from "
        "the kernel (e.g. a read() syscall into the range); needs read/write access to the device"
    ),
    OpenMode.SYSCALL: (
        "opened with the userfaultfd(2) system call: handles user-space and kernel faults; needs "
        "CAP_SYS_PTRACE or sysctl vm.unprivileged_userfaultfd=1"
    ),
    OpenMode.USER_MODE_ONLY: (
        "opened with userfaultfd(2) and UFFD_USER_MODE_ONLY: works unprivileged, but handles only faults "
        "raised in user space; a fault raised in kernel context (e.g. a read() syscall writing into the "
        "range) fails with EFAULT instead of waiting"
    ),
}


class Feature(enum.IntFlag):
    """UFFD_FEATURE_* bits, negotiated once per fd with UFFDIO_API."""

    PAGEFAULT_FLAG_WP = lib.UFFD_FEATURE_PAGEFAULT_FLAG_WP
    EVENT_FORK = lib.UFFD_FEATURE_EVENT_FORK
    EVENT_REMAP = lib.UFFD_FEATURE_EVENT_REMAP
    EVENT_REMOVE = lib.UFFD_FEATURE_EVENT_REMOVE
    MISSING_HUGETLBFS = lib.UFFD_FEATURE_MISSING_HUGETLBFS
    MISSING_SHMEM = lib.UFFD_FEATURE_MISSING_SHMEM
    EVENT_UNMAP = lib.UFFD_FEATURE_EVENT_UNMAP
    SIGBUS = lib.UFFD_FEATURE_SIGBUS
    THREAD_ID = lib.UFFD_FEATURE_THREAD_ID
    MINOR_HUGETLBFS = lib.UFFD_FEATURE_MINOR_HUGETLBFS
    MINOR_SHMEM = lib.UFFD_FEATURE_MINOR_SHMEM
    EXACT_ADDRESS = lib.UFFD_FEATURE_EXACT_ADDRESS
    WP_HUGETLBFS_SHMEM = lib.UFFD_FEATURE_WP_HUGETLBFS_SHMEM
    if lib.HAS_WP_UNPOPULATED:
        WP_UNPOPULATED = lib.APC_FEATURE_WP_UNPOPULATED
    if lib.HAS_POISON:
        POISON = lib.APC_FEATURE_POISON
    if lib.HAS_WP_ASYNC:
        WP_ASYNC = lib.APC_FEATURE_WP_ASYNC
    if lib.HAS_MOVE:
        MOVE = lib.APC_FEATURE_MOVE


class Ioctl(enum.IntFlag):
    """Bits ``1 << _UFFDIO_*`` the kernel reports from UFFDIO_API and UFFDIO_REGISTER."""

    REGISTER = 1 << lib._UFFDIO_REGISTER
    UNREGISTER = 1 << lib._UFFDIO_UNREGISTER
    WAKE = 1 << lib._UFFDIO_WAKE
    COPY = 1 << lib._UFFDIO_COPY
    ZEROPAGE = 1 << lib._UFFDIO_ZEROPAGE
    WRITEPROTECT = 1 << lib._UFFDIO_WRITEPROTECT
    CONTINUE = 1 << lib._UFFDIO_CONTINUE
    API = 1 << lib._UFFDIO_API
    if lib.HAS_POISON:
        POISON = lib.APC_IOCTL_POISON
    if lib.HAS_MOVE:
        MOVE = lib.APC_IOCTL_MOVE


class RegisterMode(enum.IntFlag):
    """UFFDIO_REGISTER_MODE_*: which faults a registered range reports."""

    MISSING = lib.UFFDIO_REGISTER_MODE_MISSING
    WP = lib.UFFDIO_REGISTER_MODE_WP
    MINOR = lib.UFFDIO_REGISTER_MODE_MINOR


def _named(cls: type[enum.IntFlag], prefix: str, name: str) -> enum.IntFlag:
    member = cls.__members__.get(name)
    if member is not None:
        return member
    since = OPTIONAL_NAMES.get(name)
    if since is None:
        raise UffdUnsupportedError(f"{prefix}{name} is not a userfaultfd name this package knows")
    raise UffdUnsupportedError(
        f"{prefix}{name} is missing from the kernel headers this package was built with "
        f"(it needs linux-libc-dev >= {since}); rebuild with newer headers to use it"
    )


def feature_named(name: str) -> Feature:
    """Look a feature up by name, e.g. ``"MOVE"``.

    Args:
        name: the UFFD_FEATURE_ suffix.

    Returns:
        The :class:`Feature` member.

    Raises:
        UffdUnsupportedError: the build's headers do not define it (or no such name).
    """
    return Feature(_named(Feature, "UFFD_FEATURE_", name))


def ioctl_named(name: str) -> Ioctl:
    """Look an ioctl bit up by name, e.g. ``"POISON"``.

    Args:
        name: the UFFDIO_ suffix.

    Returns:
        The :class:`Ioctl` member.

    Raises:
        UffdUnsupportedError: the build's headers do not define it (or no such name).
    """
    return Ioctl(_named(Ioctl, "UFFDIO_", name))


def describe_flags(value: enum.IntFlag) -> list[str]:
    """Name every set bit of a flag value, unnamed bits as ``"bit N"``.

    Args:
        value: a :class:`Feature`, :class:`Ioctl` or :class:`RegisterMode` value.

    Returns:
        Names in bit order, e.g. ``["EVENT_FORK", "bit 16"]``.
    """
    cls = type(value)
    names = []
    for bit in range(int(value).bit_length()):
        if int(value) >> bit & 1:
            member = cls._value2member_map_.get(1 << bit)
            names.append(member.name if member is not None and member.name else f"bit {bit}")
    return names
