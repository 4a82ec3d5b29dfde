"""Shared memory the service and its clients map: memfd, /dev/shm and hugetlbfs files.

:class:`SharedMemory` owns one fd of a shared-memory object and knows its size
and page size (``fstatfs``: a hugetlbfs object reports its huge page size,
anything else uses the base page size).  :meth:`SharedMemory.map` gives a
:class:`Mapping`, a ``MAP_SHARED`` mapping made with the C helpers: it knows
its address (what userfaultfd is registered on) and is unmapped by
``close()``.  All calls that may wait on a userfaultfd event (munmap,
madvise) go through cffi, so the GIL is released while they wait.

Filling pages with zeros: :meth:`SharedMemory.allocate` (fallocate, mode 0)
puts pages into the file without touching any mapping.  A shmem page put there
this way is present to userfaultfd (a touch finds it and zeroes it; nothing
faults as missing) but SEEK_DATA still reports it as a hole until someone
touches it, so a file read back with :meth:`SharedMemory.held_runs` has such
pages punched out: they read as zeros either way, and a punched page can be
placed again (UFFDIO_COPY of a page already in the file is EEXIST).

Discarding pages: ``madvise(DONTNEED)`` on a shared mapping only drops this
process's page-table entries (the page stays in the file), so to make pages
missing again use :meth:`SharedMemory.punch_hole` (fallocate PUNCH_HOLE; also
works on hugetlbfs) or :meth:`Mapping.madvise_remove`.

Views from :meth:`Mapping.buffer` point straight at the mapping; ``close()``
releases the views it handed out (best effort: slices of them stay valid
objects, so drop them first), after which touching them raises ValueError
instead of crashing.
"""

from __future__ import annotations

import errno
import os
import weakref
from typing import Any

from aiopostcopy.uffd.binding import check_os, ffi, lib
from aiopostcopy.uffd.hugepages import HugePageReservation, default_page_size, hugetlbfs_mount

__all__ = ["SharedMemory", "Mapping", "HugePageReservation", "hugetlbfs_mount", "default_page_size"]


class Mapping:
    """A mapping of shared (or anonymous) memory, unmapped by :meth:`close`.

    Attributes:
        address: the first byte's address.
        length: bytes mapped.
    """

    __slots__ = ("address", "length", "_views", "__weakref__")

    def __init__(self, address: int, length: int) -> None:
        self.address = address
        self.length = length
        self._views: list[weakref.ref[memoryview]] = []  # writable views are unhashable

    @classmethod
    def map_fd(cls, fd: int, length: int, offset: int = 0, *, writable: bool = True) -> Mapping:
        """mmap ``length`` bytes of ``fd`` at ``offset`` with MAP_SHARED.

        Raises:
            OSError: mmap failed (e.g. ENOMEM when no huge pages are reserved).
        """
        prot = lib.PROT_READ | (lib.PROT_WRITE if writable else 0)
        return cls._mmap(length, prot, lib.MAP_SHARED, fd, offset)

    @classmethod
    def anonymous(cls, length: int, *, shared: bool = False) -> Mapping:
        """Map private (or shared) anonymous memory, e.g. a copy source or WP tests.

        Raises:
            OSError: mmap failed.
        """
        flags = lib.MAP_ANONYMOUS | (lib.MAP_SHARED if shared else lib.MAP_PRIVATE)
        return cls._mmap(length, lib.PROT_READ | lib.PROT_WRITE, flags, -1, 0)

    @classmethod
    def _mmap(cls, length: int, prot: int, flags: int, fd: int, offset: int) -> Mapping:
        if length <= 0:
            raise ValueError("a mapping needs a positive length")
        out = ffi.new("uint64_t *")
        check_os(lib.apc_mmap(0, length, prot, flags, fd, offset, out), "mmap")
        return cls(out[0], length)

    @property
    def closed(self) -> bool:
        """True once unmapped."""
        return self.address == 0

    def _check(self, offset: int, length: int) -> int:
        if self.address == 0:
            raise ValueError("mapping is closed")
        if offset < 0 or length < 0 or offset + length > self.length:
            raise ValueError(f"range [{offset}, +{length}) outside the {self.length}-byte mapping")
        return self.address + offset

    def buffer(self) -> memoryview:
        """A writable memoryview over the whole mapping.

        The caller must not touch pages that are still missing from a thread
        holding the GIL (the touch blocks until the page is placed).

        Raises:
            ValueError: the mapping is closed.
        """
        self._check(0, 0)
        view = memoryview(ffi.buffer(ffi.cast("char *", self.address), self.length))
        self._views = [ref for ref in self._views if ref() is not None]
        self._views.append(weakref.ref(view))
        return view

    def touch(self, offset: int = 0, length: int | None = None, *, write: bool = False, value: int = 0) -> int:
        """Access one byte per base page from C, with the GIL released.

        A fault taken here blocks only the calling thread. Used to fault pages
        in on purpose (tests, benchmarks, prefetching a client's range).

        Args:
            offset: where to start, in bytes.
            length: bytes to cover (default: to the end).
            write: store ``value`` instead of reading.

        Returns:
            The sum of the bytes read (0 for writes).
        """
        length = self.length - offset if length is None else length
        start = self._check(offset, length)
        return lib.apc_touch(start, length, default_page_size(), int(write), value)

    def madvise_dontneed(self, offset: int, length: int) -> None:
        """madvise(MADV_DONTNEED): drop this mapping's page-table entries.

        Raises:
            OSError: the call failed.
        """
        check_os(lib.apc_madvise(self._check(offset, length), length, lib.MADV_DONTNEED), "madvise(DONTNEED)")

    def madvise_remove(self, offset: int, length: int) -> None:
        """madvise(MADV_REMOVE): free the backing pages (shmem), making them missing again.

        Raises:
            OSError: the call failed.
        """
        check_os(lib.apc_madvise(self._check(offset, length), length, lib.MADV_REMOVE), "madvise(REMOVE)")

    def dont_fork(self) -> None:
        """madvise(MADV_DONTFORK) on the whole mapping: a forked child does not inherit it.

        A child of a process whose mapping is registered with userfaultfd
        inherits the mapping but not the registration (without
        UFFD_FEATURE_EVENT_FORK), so its touch of a missing shared page would
        allocate a zero page in the shared object for everyone, and the real
        page could no longer be placed.  Without the mapping the child's touch
        is a SIGSEGV: loud, and nothing lost.  (QEMU marks guest RAM DONTFORK.)

        Raises:
            OSError: the call failed.
        """
        check_os(lib.apc_madvise(self.address, self.length, lib.MADV_DONTFORK), "madvise(DONTFORK)")

    def close(self) -> None:
        """Release handed-out views and munmap (idempotent).

        Raises:
            BufferError: a view is still exported to another object; nothing was unmapped.
            OSError: munmap failed.
        """
        if self.address == 0:
            return
        for ref in self._views:
            view = ref()
            if view is not None:
                view.release()
        self._views = []
        address, self.address = self.address, 0
        check_os(lib.apc_munmap(address, self.length), "munmap")

    def __enter__(self) -> Mapping:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Mapping {self.address:#x} +{self.length:#x}>"


def _fs_info(fd: int) -> tuple[int, int]:
    out = ffi.new("uint64_t[2]")
    check_os(lib.apc_fstatfs(fd, out, out + 1), "fstatfs")
    return out[0], out[1]


def _huge_flags(huge_page_size: int) -> int:
    if huge_page_size <= 0 or huge_page_size & (huge_page_size - 1):
        raise ValueError(f"huge_page_size {huge_page_size} is not a power of two")
    return lib.MFD_HUGETLB | (huge_page_size.bit_length() - 1) << lib.MFD_HUGE_SHIFT


class SharedMemory:
    """An owned fd of a shared-memory object (memfd, /dev/shm file, hugetlbfs file).

    Attributes:
        fd: the fd (owned; closed by :meth:`close`).
        size: bytes.
        page_size: the huge page size on hugetlbfs, else the base page size.
        path: the file's path, or None for a memfd or adopted fd.
        hugetlb: True on hugetlbfs.
    """

    __slots__ = ("fd", "size", "page_size", "path", "hugetlb")

    def __init__(self, fd: int, path: str | None = None) -> None:
        fs_type, block_size = _fs_info(fd)
        self.fd = fd
        self.size = os.fstat(fd).st_size
        self.path = path
        self.hugetlb = fs_type == lib.HUGETLBFS_MAGIC
        self.page_size = block_size if self.hugetlb else default_page_size()

    @classmethod
    def memfd(cls, name: str, size: int, *, hugetlb: bool = False, huge_page_size: int = 2 << 20) -> SharedMemory:
        """Create an anonymous memfd of ``size`` bytes.

        Args:
            name: shown in /proc/PID/maps as ``/memfd:NAME``.
            size: bytes (a multiple of the page size).
            hugetlb: back it with huge pages of ``huge_page_size`` (reserve them first).

        Raises:
            ValueError: size not a multiple of the page size.
            OSError: the kernel refused.
        """
        flags = lib.MFD_CLOEXEC | (_huge_flags(huge_page_size) if hugetlb else 0)
        _check_size(size, huge_page_size if hugetlb else default_page_size())
        return cls._sized(os.memfd_create(name, flags), size, None)

    @classmethod
    def create(cls, path: str, size: int, *, exclusive: bool = True) -> SharedMemory:
        """Create a file (in /dev/shm, a hugetlbfs mount, ...) and size it.

        Args:
            exclusive: fail if the file exists (a stale file already holds pages).

        Raises:
            FileExistsError: exclusive and the file exists.
            OSError: the file could not be created or sized (e.g. EINVAL for a
                size that is not a multiple of a hugetlbfs page); an exclusive
                file is removed again.
        """
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | (os.O_EXCL if exclusive else 0)
        fd = os.open(path, flags, 0o600)
        try:
            return cls._sized(fd, size, path)
        except BaseException:
            if exclusive:  # we created it: do not leave a half-made file behind
                os.unlink(path)
            raise

    @classmethod
    def _sized(cls, fd: int, size: int, path: str | None) -> SharedMemory:
        try:
            os.ftruncate(fd, size)
            return cls(fd, path)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def open(cls, path: str) -> SharedMemory:
        """Open an existing file read-write.

        Raises:
            OSError: e.g. FileNotFoundError.
        """
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            return cls(fd, path)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def adopt(cls, fd: int) -> SharedMemory:
        """Take ownership of an fd (e.g. received over SCM_RIGHTS).

        Raises:
            OSError: ``fd`` is not open.
        """
        return cls(fd, None)

    def map(self, length: int | None = None, offset: int = 0, *, writable: bool = True) -> Mapping:
        """Map the object with MAP_SHARED.

        Args:
            length: bytes (default: from ``offset`` to the end).
            offset: a multiple of :attr:`page_size`.
            writable: PROT_WRITE too.

        Raises:
            ValueError: the object is closed. OSError: mmap failed.
        """
        self._fileno()
        length = self.size - offset if length is None else length
        return Mapping.map_fd(self.fd, length, offset, writable=writable)

    def punch_hole(self, offset: int, length: int) -> None:
        """Free pages (fallocate PUNCH_HOLE|KEEP_SIZE): they become missing in every mapping.

        Raises:
            OSError: the call failed (e.g. EINVAL for unaligned hugetlbfs ranges).
        """
        mode = lib.FALLOC_FL_PUNCH_HOLE | lib.FALLOC_FL_KEEP_SIZE
        check_os(lib.apc_fallocate(self._fileno(), mode, offset, length), "fallocate(PUNCH_HOLE)")

    def allocate(self, offset: int, length: int) -> None:
        """Put zero pages into ``[offset, offset + length)`` of the file (fallocate, mode 0;
        pages already there are kept).  See the module docstring for what it means to
        userfaultfd and SEEK_DATA.

        Raises:
            OSError: the call failed (ENOSPC, ENOMEM: the filesystem or the pool is full).
        """
        check_os(lib.apc_fallocate(self._fileno(), 0, offset, length), "fallocate")

    def held_runs(self) -> list[tuple[int, int]] | None:
        """Byte ranges of the whole file that hold data (:meth:`data_runs`), every other
        page punched out so that it is missing to userfaultfd (see the module docstring).

        Returns:
            The ranges, or None on hugetlbfs (which cannot tell; nothing is punched).

        Raises:
            OSError: lseek or fallocate failed.
        """
        runs = self.data_runs(0, self.size)
        if runs is None:
            return None
        position = 0
        for start, stop in [*runs, (self.size, self.size)]:
            if start > position:
                self.punch_hole(position, start - position)
            position = stop
        return runs

    def data_runs(self, offset: int, length: int) -> list[tuple[int, int]] | None:
        """Byte ranges of ``[offset, offset + length)`` that hold pages (SEEK_DATA / SEEK_HOLE).

        Returns:
            Sorted ``(start, stop)`` ranges, or None where the filesystem cannot
            tell (hugetlbfs reports every byte as data).

        Raises:
            OSError: lseek failed for another reason than "no data after here".
        """
        if self.hugetlb:
            return None
        fd, end, runs = self._fileno(), offset + length, []
        position = offset
        while position < end:
            try:
                start = os.lseek(fd, position, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no data at or after position
                    break
                raise
            if start >= end:
                break
            stop = min(os.lseek(fd, start, os.SEEK_HOLE), end)
            runs.append((start, stop))
            position = stop
        return runs

    def unlink(self) -> None:
        """Remove the file's name (no-op for a memfd or an already unlinked file)."""
        path, self.path = self.path, None
        if path is not None:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def close(self) -> None:
        """Close the fd (idempotent); existing mappings stay valid."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def _fileno(self) -> int:
        if self.fd < 0:
            raise ValueError("shared memory is closed")
        return self.fd

    def __enter__(self) -> SharedMemory:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        where = self.path or "memfd"
        return f"<SharedMemory fd={self.fd} {where} size={self.size} page_size={self.page_size}>"


def _check_size(size: int, page_size: int) -> None:
    if size <= 0 or size % page_size:
        raise ValueError(f"size {size} is not a positive multiple of the page size {page_size}")
