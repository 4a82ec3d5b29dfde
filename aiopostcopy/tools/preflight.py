"""Checks made before a migration starts, so that bad input is refused with one clear line.

Theory of operation
-------------------
Everything here runs before a connection is opened or a page is requested,
and raises :class:`~aiopostcopy.errors.ConfigurationError` with a message
naming the object (path, address, filesystem type) and the cause:

* :func:`prepare_block_dir` (destination): the block directory is created if
  missing (and its creation remembered, so a failed run can remove it again),
  must be writable, and must be on tmpfs or hugetlbfs: userfaultfd's MISSING
  mode only works on anonymous, shmem and hugetlbfs memory, so a block dir on
  a disk filesystem would fail later as ``UFFDIO_REGISTER: Invalid argument``.
  The filesystem is recognised by ``statfs(2)``'s ``f_type`` magic and named
  from /proc/self/mountinfo.  Room for the blocks is checked by the service
  itself once the source has said how large they are (their sizes are not
  known before its Hello).  A hugetlbfs mount holds only pages of its own
  size (``pagesize=`` mount option: 2 MiB or 1 GiB), taken from the kernel's
  pool of that size: a mount whose pool has no free page is refused here,
  with the sysfs file that grows it; the service checks the exact count
  (and that the blocks have the mount's page size) once it knows the blocks.
* :func:`check_source_blocks` (source): names unique, every path an existing,
  readable regular file whose size is a positive multiple of the page size.
* :func:`check_port`: a TCP port is 0-65535 (0: any free port).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import os
import stat
from collections.abc import Sequence

from aiopostcopy.errors import ConfigurationError
from aiopostcopy.uffd.hugepages import available_huge_pages, pool_hint

__all__ = ["BlockDir", "prepare_block_dir", "check_source_blocks", "check_port", "filesystem_type",
           "TMPFS_MAGIC", "HUGETLBFS_MAGIC"]

TMPFS_MAGIC = 0x01021994  #: linux/magic.h
HUGETLBFS_MAGIC = 0x958458F6  #: linux/magic.h
_MEMORY_FILESYSTEMS = {TMPFS_MAGIC: "tmpfs", HUGETLBFS_MAGIC: "hugetlbfs"}


@dataclasses.dataclass(frozen=True, slots=True)
class BlockDir:
    """A block directory that passed the checks.

    Attributes:
        path: the directory.
        fs_type: ``"tmpfs"`` or ``"hugetlbfs"``.
        created: the topmost directory made here (``path`` or one of its parents),
            None if ``path`` existed.
        huge_page_size: the mount's page size on hugetlbfs, else None.
        huge_pages_free: huge pages of that size free in the kernel's pool (hugetlbfs).
    """

    path: str
    fs_type: str
    created: str | None
    huge_page_size: int | None = None
    huge_pages_free: int | None = None

    def remove_if_empty(self) -> None:
        """Remove the directories this run created, as far as it left them empty."""
        _remove_created(self.path, self.created)


def _remove_created(path: str, top: str | None) -> None:
    if top is None:
        return
    current = os.path.abspath(path)
    while True:
        try:
            os.rmdir(current)
        except OSError:
            return  # not empty (complete blocks stay for the workload) or already gone
        if current == top:
            return
        current = os.path.dirname(current)


def prepare_block_dir(path: str) -> BlockDir:
    """Create ``path`` if missing and check it can hold block files.

    Raises:
        ConfigurationError: it cannot be created or written, it is not a
            directory, or it is on a filesystem other than tmpfs or hugetlbfs.
    """
    created = _make_dir(path)
    try:
        if not os.path.isdir(path):
            raise ConfigurationError(f"block dir {path} is not a directory")
        magic = _statfs_magic(path)
        fs_type = _MEMORY_FILESYSTEMS.get(magic)
        if fs_type is None:
            raise ConfigurationError(
                f"block dir {path} is on {filesystem_type(path, magic)}, not tmpfs or hugetlbfs: userfaultfd "
                "cannot serve shared file memory there (use a directory under /dev/shm or a hugetlbfs mount)")
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            raise ConfigurationError(f"block dir {path}: read-only file system ({fs_type})")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ConfigurationError(f"block dir {path}: permission denied (cannot create files in it)")
        huge, free = _huge_pool(path) if fs_type == "hugetlbfs" else (None, None)
    except BaseException:
        _remove_created(path, created)
        raise
    return BlockDir(path, fs_type, created, huge, free)


def _huge_pool(path: str) -> tuple[int, int | None]:
    """A hugetlbfs block dir's page size and free pages; refused when its pool has none free."""
    huge = os.statvfs(path).f_bsize
    free = available_huge_pages(huge)
    if free is not None and free <= 0:
        raise ConfigurationError(
            f"block dir {path}: hugetlbfs mount of {huge >> 20} MiB pages, but no huge page of that size is "
            f"free; {pool_hint(huge, 1).replace('e.g.', 'e.g. (one page per page of the blocks)')}")
    return huge, free


def _make_dir(path: str) -> str | None:
    """Create ``path`` and missing parents; the topmost one created (None: it existed)."""
    top, parent = None, os.path.abspath(path)
    while not os.path.exists(parent):
        top, parent = parent, os.path.dirname(parent)
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as exc:
        _remove_created(path, top)
        raise ConfigurationError(f"block dir {path}: cannot create it: {exc.strerror}") from None
    return top


def filesystem_type(path: str, magic: int | None = None) -> str:
    """The name of the filesystem ``path`` is on (mountinfo's fstype), or its statfs magic in hex."""
    real = os.path.realpath(path)
    best, name = "", None
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            for line in f:
                fields = line.split()
                mount_point = fields[4].replace("\\040", " ")
                fs_type = fields[fields.index("-") + 1]
                inside = real == mount_point or real.startswith(mount_point.rstrip("/") + "/")
                if inside and len(mount_point) >= len(best):
                    best, name = mount_point, fs_type
    except (OSError, ValueError, IndexError):
        name = None
    if name is not None:
        return name
    return f"filesystem type {magic if magic is not None else _statfs_magic(path):#x}"


class _Statfs(ctypes.Structure):
    # struct statfs opens with f_type (a word) on every Linux ABI; the rest is padding to its size
    _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_byte * 256)]


def _statfs_magic(path: str) -> int:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    buf = _Statfs()
    if libc.statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
        err = ctypes.get_errno()
        raise ConfigurationError(f"block dir {path}: statfs failed: {os.strerror(err)}")
    return buf.f_type & 0xFFFFFFFF


def check_source_blocks(blocks: Sequence[tuple[str, str]], page_size: int) -> None:
    """Check the source's ``(name, path)`` pairs before anything is mapped.

    Raises:
        ConfigurationError: a name repeats, or a path is missing, unreadable, not
            a regular file, empty or not a multiple of ``page_size``.
    """
    seen: dict[str, str] = {}
    for name, path in blocks:
        if name in seen:
            raise ConfigurationError(f"block name {name!r} given twice ({seen[name]} and {path})")
        seen[name] = path
        _check_block_file(name, path, page_size)


def _check_block_file(name: str, path: str, page_size: int) -> None:
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ConfigurationError(f"block {name!r}: {path}: {exc.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise ConfigurationError(f"block {name!r}: {path} is a directory, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise ConfigurationError(f"block {name!r}: {path} is not a regular file")
    if not os.access(path, os.R_OK):
        raise ConfigurationError(f"block {name!r}: {path}: permission denied")
    if st.st_size <= 0 or st.st_size % page_size:
        raise ConfigurationError(f"block {name!r}: {path} is {st.st_size} bytes, "
                                 f"not a positive multiple of the {page_size}-byte page")


def check_port(port: int, what: str) -> int:
    """``port`` if it is a TCP port number, else a ConfigurationError naming ``what``."""
    if not 0 <= port <= 65535:
        raise ConfigurationError(f"{what}: port {port} out of range (0-65535)")
    return port
