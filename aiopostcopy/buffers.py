"""Copy buffers: private anonymous memory the kernel copies pages into and out of.

A run of pages crosses such a buffer on both sides of a migration: the source
reads a run of its image into one (``pread``) and sends it from there, the
destination receives a frame's payload into one and places it from there
(UFFDIO_COPY).  Backed by ordinary 4 KiB pages, every kernel copy into a
buffer of 256 KiB and up costs 3-4x what it costs into a buffer backed by a
transparent huge page: measured on the VMs of benchmarks/README.md ("Copy
buffers backed by huge pages"), ``pread`` of a 256 MiB shmem file 1 MiB at a
time took 165-195 ms of CPU into a 4 KiB-backed buffer and 47 ms into a
huge-page-backed one.  So :func:`copy_buffer` asks for transparent huge pages
(``MADV_HUGEPAGE``, honoured in THP's ``always`` and ``madvise`` modes) and
sizes the mapping in whole 2 MiB steps, which Linux 6.7 and later place on a
2 MiB boundary.  Where huge pages are off or unavailable, or an older kernel
puts the mapping across a boundary, the buffer is ordinary memory and works
the same, at the old speed.

It needs nothing but :mod:`mmap`: the source imports it too, and runs
without the project's C extensions.
"""

from __future__ import annotations

import contextlib
import mmap

__all__ = ["copy_buffer", "HUGE_STEP"]

#: The transparent huge page size of x86-64 and arm64 (4 KiB granule): buffers are mapped in
#: multiples of it.
HUGE_STEP = 2 << 20


def copy_buffer(size: int) -> mmap.mmap:
    """Private anonymous memory of at least ``size`` bytes (rounded up to :data:`HUGE_STEP` when
    ``size`` is 256 KiB or more), transparent huge pages asked for."""
    if size <= 0:
        raise ValueError(f"a copy buffer of {size} bytes")
    if size >= 256 << 10:
        size = -(-size // HUGE_STEP) * HUGE_STEP
    memory = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if size >= HUGE_STEP:
        with contextlib.suppress(AttributeError, OSError):  # no THP here: ordinary pages, same results
            memory.madvise(mmap.MADV_HUGEPAGE)
    return memory
