"""Page sizes, hugetlbfs mounts and huge page reservations.

hugetlbfs memory comes only from a pool the administrator sizes
(``/proc/sys/vm/nr_hugepages`` for the default size, the sysfs
``hugepages-<N>kB/nr_hugepages`` files for others); an mmap of a hugetlbfs
object fails with ENOMEM when the pool is short.  :class:`HugePageReservation`
grows the pool for the length of a ``with`` block (root only) and puts the old
value back on exit, and :func:`private_hugetlbfs` mounts a hugetlbfs of one page
size for a ``with`` block, so tests and benchmarks leave the machine as they
found it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator

__all__ = ["default_page_size", "hugetlbfs_mount", "private_mount", "default_huge_page_size", "HugePageReservation",
           "available_huge_pages", "pool_hint", "hugetlbfs_page_size", "private_hugetlbfs"]

_SYSFS = "/sys/kernel/mm/hugepages/hugepages-{kib}kB/{name}"


def default_page_size() -> int:
    """The base page size (``sysconf(_SC_PAGESIZE)``, 4096 on x86-64)."""
    return os.sysconf("SC_PAGESIZE")


def default_huge_page_size() -> int | None:
    """The default huge page size from /proc/meminfo, or None without hugetlb support."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("Hugepagesize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def hugetlbfs_mount() -> str | None:
    """The first hugetlbfs mount point in /proc/mounts, or None.

    Returns:
        A directory where files are backed by huge pages, or None if none is mounted.
    """
    try:
        with open("/proc/mounts", encoding="utf-8") as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 3 and fields[2] == "hugetlbfs":
                    return fields[1].replace("\\040", " ")
    except OSError:
        return None
    return None


def hugetlbfs_page_size(path: str) -> int | None:
    """The huge page size of the hugetlbfs mount ``path`` is on, or None if it is on another filesystem."""
    real, best, fs_type = os.path.realpath(path), "", None
    try:
        with open("/proc/self/mounts", encoding="utf-8") as f:
            for line in f:
                fields = line.split()
                if len(fields) < 3:
                    continue
                mount_point = fields[1].replace("\\040", " ")
                inside = real == mount_point or real.startswith(mount_point.rstrip("/") + "/")
                if inside and len(mount_point) >= len(best):
                    best, fs_type = mount_point, fields[2]
    except OSError:
        return None
    return os.statvfs(path).f_bsize if fs_type == "hugetlbfs" else None


def _pool_path(page_size: int, name: str) -> str:
    if name == "nr_hugepages" and page_size == default_huge_page_size():
        return "/proc/sys/vm/nr_hugepages"
    return _SYSFS.format(kib=page_size // 1024, name=name)


def available_huge_pages(page_size: int) -> int | None:
    """Huge pages of ``page_size`` a new mapping can still reserve (free minus already
    reserved), or None when the kernel has no pool of that size."""
    try:
        return _read_int(_SYSFS.format(kib=page_size // 1024, name="free_hugepages")) - \
            _read_int(_SYSFS.format(kib=page_size // 1024, name="resv_hugepages"))
    except (OSError, ValueError):
        return None


def pool_hint(page_size: int, pages: int) -> str:
    """How an administrator makes ``pages`` more huge pages of ``page_size`` available."""
    path = _SYSFS.format(kib=page_size // 1024, name="nr_hugepages")
    try:
        now = _read_int(path)
    except (OSError, ValueError):
        return f"this kernel has no pool of {page_size}-byte huge pages"
    return f"grow the pool, e.g. echo {now + pages} > {path}"


def _read_int(path: str) -> int:
    with open(path, encoding="ascii") as f:
        return int(f.read().strip())


def _write_int(path: str, value: int) -> None:
    with open(path, "w", encoding="ascii") as f:
        f.write(f"{value}\n")


class HugePageReservation:
    """Make at least ``pages`` free huge pages available inside a ``with`` block.

    On entry the pool (nr_hugepages) is raised by however many free pages are
    missing; on exit it is lowered by as many (pages still in use then become
    surplus pages the kernel frees as soon as they are released).  Lowering by
    what was added, not writing the old size back, keeps the pool right when
    reservations overlap (two processes, or two of one process, left in any
    order): the old size is whatever the others had added by then.

    Args:
        pages: free huge pages needed.
        page_size: huge page size in bytes (default: the system default, 2 MiB).

    Attributes:
        old: the pool size found on entry.
        target: the pool size set on entry.

    Raises (on entry):
        PermissionError: not root.
        OSError: no hugetlb support, or the kernel could not find enough memory
            (ENOMEM; the old value is restored first).
    """

    def __init__(self, pages: int, *, page_size: int | None = None) -> None:
        size = page_size or default_huge_page_size()
        if size is None:
            raise OSError(errno.ENOTSUP, "this kernel has no hugetlb pages")
        self.pages = pages
        self.page_size = size
        self.old: int | None = None
        self.target: int | None = None

    def _counter(self, name: str) -> int:
        return _read_int(_pool_path(self.page_size, name))

    def __enter__(self) -> HugePageReservation:
        if os.geteuid() != 0:
            raise PermissionError(errno.EPERM, "reserving huge pages needs root")
        path = _pool_path(self.page_size, "nr_hugepages")
        self.old = _read_int(path)
        free = self._counter("free_hugepages")
        self.target = self.old + max(0, self.pages - free)
        if self.target != self.old:
            _write_int(path, self.target)
        if self._counter("free_hugepages") < self.pages:
            self._restore()
            raise OSError(errno.ENOMEM, f"could not reserve {self.pages} huge pages of {self.page_size} bytes")
        return self

    def _restore(self) -> None:
        if self.old is not None and self.target is not None and self.target != self.old:
            path = _pool_path(self.page_size, "nr_hugepages")
            _write_int(path, max(0, _read_int(path) - (self.target - self.old)))
            self.target = self.old  # once: a second exit changes nothing

    def __exit__(self, *exc_info: object) -> None:
        self._restore()

    def __repr__(self) -> str:
        return f"<HugePageReservation pages={self.pages} size={self.page_size} old={self.old} target={self.target}>"


@contextlib.contextmanager
def private_hugetlbfs(page_size: int, *, prefix: str = "aiopostcopy-hugetlbfs-") -> Iterator[str]:
    """A hugetlbfs of ``page_size`` pages mounted on a new temporary directory (root only);
    on exit its files are removed, it is unmounted and the directory removed.

    Raises (on entry):
        OSError: not root, no mount(8), no huge pages of that size, or the mount failed
            (the message says which; nothing is left behind).
    """
    if not os.path.exists(_SYSFS.format(kib=page_size // 1024, name="nr_hugepages")):
        raise OSError(errno.ENOTSUP, f"this kernel has no {page_size}-byte huge pages")
    with private_mount("hugetlbfs", f"pagesize={page_size // 1024}K", prefix=prefix) as path:
        yield path


@contextlib.contextmanager
def private_mount(fstype: str, options: str, *, prefix: str) -> Iterator[str]:
    """A ``fstype`` mounted with ``options`` on a new temporary directory (root only; e.g. a
    tmpfs with ``huge=within_size``, whose files get transparent huge pages); on exit its files
    are removed, it is unmounted and the directory removed.

    Raises (on entry):
        OSError: not root, no mount(8), or the mount failed (nothing is left behind).
    """
    if os.geteuid() != 0:
        raise PermissionError(errno.EPERM, f"mounting {fstype} needs root")
    if shutil.which("mount") is None:
        raise OSError(errno.ENOENT, f"mounting {fstype} needs mount(8)")
    path = tempfile.mkdtemp(prefix=prefix)
    done = subprocess.run(["mount", "-t", fstype, "-o", options, "none", path], capture_output=True, text=True)
    if done.returncode:
        os.rmdir(path)
        raise OSError(errno.EIO, f"cannot mount {fstype} ({options}): {done.stderr.strip()}")
    try:
        yield path
    finally:
        for name in os.listdir(path):  # the pages go back (to the pool) even if umount fails
            target = os.path.join(path, name)
            shutil.rmtree(target) if os.path.isdir(target) else os.unlink(target)
        subprocess.run(["umount", path], check=False)
        os.rmdir(path)
