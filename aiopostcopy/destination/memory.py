"""The destination's memory: RAMBlock backing objects, their mappings, and staging buffers.

:class:`BlockMemory` creates one shared-memory object per RAMBlock (a memfd,
or a file in a block directory: /dev/shm, a hugetlbfs mount for 2 MiB pages,
or any shared filesystem), maps it once in the service, and answers address
questions for the loop.  Files are created exclusively: a pre-existing file
would already hold pages, which userfaultfd would never report missing, so
stale content could pass for migrated memory.

Discarded pages are dropped with fallocate(PUNCH_HOLE) on the backing object,
which works for shmem and hugetlbfs alike (madvise(DONTNEED) on a shared
mapping only drops this process's page-table entries and keeps the page).

:class:`Staging` is a page-aligned anonymous mapping that a channel's receive
path writes page payloads into; its address is what UFFDIO_COPY copies from.
"""

from __future__ import annotations

import ctypes
import dataclasses
import mmap
import os
from collections.abc import Iterator, Sequence

from aiopostcopy.core.ramblock import BlockTable, MappingTable, RAMBlock
from aiopostcopy.errors import ConfigurationError
from aiopostcopy.messages import BlockInfo
from aiopostcopy.uffd import Ioctl, Mapping, SharedMemory

__all__ = ["BlockMemory", "MappedBlock", "Staging"]


@dataclasses.dataclass(slots=True)
class MappedBlock:
    """One RAMBlock as mapped by the service."""

    index: int
    info: BlockInfo
    shm: SharedMemory
    mapping: Mapping
    path: str | None
    zeropage_ok: bool = False

    @property
    def address(self) -> int:
        return self.mapping.address

    @property
    def length(self) -> int:
        return self.info.length

    @property
    def page_size(self) -> int:
        return self.info.page_size

    def allow_zeropage(self, ioctls: Ioctl) -> None:
        """Record whether UFFDIO_ZEROPAGE is allowed on this range (not on hugetlbfs)."""
        self.zeropage_ok = bool(ioctls & Ioctl.ZEROPAGE)


class BlockMemory:
    """All RAMBlocks of one migration, created, mapped and owned here."""

    def __init__(self, blocks: list[MappedBlock]) -> None:
        self._blocks = blocks
        self._by_name = {b.info.name: b for b in blocks}
        self.table = BlockTable([RAMBlock.from_info(b.info) for b in blocks])

    @classmethod
    def create(cls, infos: Sequence[BlockInfo], block_dir: str | None) -> "BlockMemory":
        """Create and map the backing of every block.

        Raises:
            ConfigurationError: ``block_dir`` has no room for every block.
            FileExistsError: a block file already exists in ``block_dir``.
            OSError: the memory could not be created (e.g. no hugepages reserved).
        """
        if block_dir is not None:
            _check_room(infos, block_dir)
        blocks: list[MappedBlock] = []
        try:
            for index, info in enumerate(infos):
                blocks.append(_create_block(index, info, block_dir))
        except BaseException:
            for block in blocks:
                _release(block, unlink=True)
            raise
        return cls(blocks)

    @property
    def mapped(self) -> bool:
        return bool(self._blocks)

    def __iter__(self) -> Iterator[MappedBlock]:
        return iter(self._blocks)

    def block(self, index: int) -> MappedBlock:
        return self._blocks[index]

    def by_name(self, name: str) -> MappedBlock:
        return self._by_name[name]

    def view(self, name: str) -> memoryview:
        return self._by_name[name].mapping.buffer()

    def path(self, name: str) -> str | None:
        return self._by_name[name].path

    def mapping_table(self) -> MappingTable:
        """The service's own mapping: block i at its mapped address."""
        return MappingTable.identity(self.table, [b.address for b in self._blocks])

    def discard(self, index: int, first: int, count: int) -> None:
        """Drop pages so that the next touch faults as missing again."""
        block = self._blocks[index]
        block.shm.punch_hole(first * block.page_size, count * block.page_size)

    def close(self, *, complete: bool) -> None:
        """Unmap and close every block.

        Args:
            complete: every page arrived.  Complete block files stay in the block
                directory for the workload; incomplete ones are removed, so that
                nobody mistakes holes for migrated memory.
        """
        for block in self._blocks:
            _release(block, unlink=not complete)
        self._blocks = []


def _create_block(index: int, info: BlockInfo, block_dir: str | None) -> MappedBlock:
    hugetlb = info.page_size != mmap.PAGESIZE
    if block_dir is None:
        shm = SharedMemory.memfd(info.name, info.length, hugetlb=hugetlb, huge_page_size=info.page_size)
        path = None
    else:
        path = os.path.join(block_dir, _file_name(info.name))
        shm = SharedMemory.create(path, info.length, exclusive=True)
        if shm.page_size != info.page_size:
            shm.close()
            os.unlink(path)
            raise OSError(f"block {info.name!r} needs {info.page_size}-byte pages but {block_dir} gives {shm.page_size}")
    try:
        mapping = shm.map(info.length)
    except BaseException:
        shm.close()
        raise
    try:
        mapping.dont_fork()  # a process the service forks (e.g. subprocess) must not zero-fill a page
    except BaseException:
        mapping.close()
        shm.close()
        raise
    return MappedBlock(index=index, info=info, shm=shm, mapping=mapping, path=path)


def _check_room(infos: Sequence[BlockInfo], block_dir: str) -> None:
    """Refuse before creating anything when the filesystem reports too little room
    (tmpfs files are sparse: a full one fails only when a page is placed)."""
    st = os.statvfs(block_dir)
    if st.f_blocks == 0:  # no limit reported (hugetlbfs without size=): mapping reserves the pages
        return
    need = sum(info.length for info in infos)
    free = st.f_bavail * st.f_frsize
    if need > free:
        raise ConfigurationError(f"block dir {block_dir}: no room for the blocks "
                                 f"({need} bytes needed, {free} bytes free)")


def _file_name(name: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return safe.lstrip(".") or "block"


def _release(block: MappedBlock, *, unlink: bool) -> None:
    block.mapping.close()
    block.shm.close()
    if unlink and block.path is not None:
        try:
            os.unlink(block.path)
        except FileNotFoundError:
            pass


class Staging:
    """A page-aligned receive buffer for one channel.

    Args:
        size: bytes; at least the largest Pages payload the channel accepts.
    """

    def __init__(self, size: int) -> None:
        self._memory = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._view = memoryview(self._memory)
        self.address = ctypes.addressof(ctypes.c_char.from_buffer(self._memory))
        self._zeros: mmap.mmap | None = None
        self._zeros_address = 0

    def view(self, nbytes: int) -> memoryview:
        """The first ``nbytes`` of the buffer, where the next payload lands."""
        return self._view[:nbytes]

    def zeroed(self, size: int) -> int:
        """Address of ``size`` zero bytes (for placing zero pages by copy)."""
        if self._zeros is None or len(self._zeros) < size:
            self._zeros = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            self._zeros_address = ctypes.addressof(ctypes.c_char.from_buffer(self._zeros))
        return self._zeros_address
