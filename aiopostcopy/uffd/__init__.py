"""The thin C boundary: userfaultfd and shared memory, as fds, addresses and lengths.

This package knows no blocks, pages of a migration, loops or wire formats.
It offers:

* :class:`Userfaultfd`: open (or adopt) a userfaultfd, register ranges, place
  pages (copy, zeropage, continue_, poison, move), wake, write-protect, and read
  events (:class:`PageFault`, :class:`ForkEvent`, :class:`RemapEvent`,
  :class:`RemoveEvent`, :class:`UnmapEvent`) in batches;
* :class:`SharedMemory` and :class:`Mapping`: memfd, /dev/shm and hugetlbfs
  objects and their MAP_SHARED mappings;
* :class:`HugePageReservation`: grow the huge page pool for a ``with`` block;
* :class:`~aiopostcopy.uffd.placing.PlacingThread`: runs of pages placed by a
  C thread that takes no GIL.

Everything kernel-defined comes from the headers through cffi (see
``_cdefs.h``); errors are the typed exceptions of :mod:`aiopostcopy.errors`.
"""

from aiopostcopy.uffd.binding import buffer_address
from aiopostcopy.uffd.events import Event, ForkEvent, PageFault, RemapEvent, RemoveEvent, UnmapEvent
from aiopostcopy.uffd.flags import Feature, Ioctl, OpenMode, RegisterMode, feature_named, ioctl_named
from aiopostcopy.uffd.hugepages import default_huge_page_size
from aiopostcopy.uffd.opening import supported_features
from aiopostcopy.uffd.shm import HugePageReservation, Mapping, SharedMemory, default_page_size, hugetlbfs_mount
from aiopostcopy.uffd.userfaultfd import Userfaultfd

__all__ = [
    "Userfaultfd",
    "OpenMode",
    "Feature",
    "Ioctl",
    "RegisterMode",
    "supported_features",
    "feature_named",
    "ioctl_named",
    "Event",
    "PageFault",
    "ForkEvent",
    "RemapEvent",
    "RemoveEvent",
    "UnmapEvent",
    "SharedMemory",
    "Mapping",
    "HugePageReservation",
    "hugetlbfs_mount",
    "default_page_size",
    "default_huge_page_size",
    "buffer_address",
]
