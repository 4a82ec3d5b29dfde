"""The destination's memory: RAMBlock backing objects, their mappings, and staging buffers.

:class:`BlockMemory` creates one shared-memory object per RAMBlock (a memfd,
or a file in a block directory: /dev/shm, or a hugetlbfs mount whose page
size, 2 MiB or 1 GiB, the blocks must have), maps it once in the service, and answers address
questions for the loop.  Files are created exclusively: a pre-existing file
would already hold pages, which userfaultfd would never report missing, so
stale content could pass for migrated memory.

Crash recovery.  In a block directory a block lives as ``NAME.partial`` until
the migration completes, then it is renamed ``NAME``: a file under its final
name is always complete.  The migration's session id is kept beside them in
``.aiopostcopy-session``.  A destination killed mid-migration leaves both; the
next one started on the same directory *adopts* the partial files (same size
and page size required): every page the file holds was placed by the service
(the service never writes a missing page any other way, and a client that
filled one early was refused), so :meth:`BlockMemory.present_runs` reports
them (SEEK_DATA) and the session resumes the source session for the rest.
Zero runs placed with fallocate and never touched since read as holes there:
they are punched and migrate again (as zero runs, a few bytes on the wire).
hugetlbfs cannot say which pages a file holds: an adopted hugetlbfs block is
emptied (punched) and migrates again whole.

Starting from an earlier copy (``from_copy``): a block file left under its
final name by an earlier, completed migration (or a ``.partial`` one) is
renamed ``NAME.partial`` and taken over like an adopted file, but none of its
pages counts as migrated until the source has compared them
(:mod:`aiopostcopy.destination.fromcopy`); a block without a file is created.

Discarded pages are dropped with fallocate(PUNCH_HOLE) on the backing object,
which works for shmem and hugetlbfs alike (madvise(DONTNEED) on a shared
mapping only drops this process's page-table entries and keeps the page).

:class:`Staging` is a page-aligned anonymous mapping that a channel's receive
path writes page payloads into; its address is what UFFDIO_COPY copies from.
A page larger than a frame's usual payload (1 GiB) arrives whole in one
frame and is placed with one UFFDIO_COPY (hugetlbfs places whole pages only),
so a channel that may receive one needs a staging buffer of that size:
:meth:`Staging.huge` makes it up front and touches it (transparent huge pages
where allowed), so that receiving into it never page-faults on the fault path.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import dataclasses
import mmap
import os
import urllib.parse
from collections.abc import Iterator, Sequence

from aiopostcopy.core.ramblock import BlockTable, MappingTable, RAMBlock
from aiopostcopy.errors import ConfigurationError
from aiopostcopy.messages import BlockInfo
from aiopostcopy.uffd import Ioctl, Mapping, SharedMemory
from aiopostcopy.buffers import copy_buffer
from aiopostcopy.uffd.hugepages import available_huge_pages, hugetlbfs_page_size, pool_hint

__all__ = ["BlockMemory", "MappedBlock", "Staging", "PARTIAL_SUFFIX", "SESSION_FILE", "adoptable_session",
           "forget_session", "remember_session"]

PARTIAL_SUFFIX = ".partial"  #: a block file's name until the migration completes
SESSION_FILE = ".aiopostcopy-session"  #: the session id of the migration a block directory holds
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  #: linux/mman.h


@dataclasses.dataclass(slots=True)
class MappedBlock:
    """One RAMBlock as mapped by the service."""

    index: int
    info: BlockInfo
    shm: SharedMemory
    mapping: Mapping
    path: str | None
    zeropage_ok: bool = False
    adopted: bool = False  #: an earlier destination's partial file, taken over

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
    def create(cls, infos: Sequence[BlockInfo], block_dir: str | None, *, adopt: bool = False,
               from_copy: bool = False) -> "BlockMemory":
        """Create and map the backing of every block.

        Args:
            adopt: take over ``NAME.partial`` files an earlier destination of the
                same migration left in ``block_dir`` (others are created).
            from_copy: take over ``NAME`` (renamed ``NAME.partial``) or
                ``NAME.partial`` files holding an earlier copy (others are created);
                their pages still have to be compared with the source.

        Raises:
            ConfigurationError: ``block_dir`` has no room for every block.
            FileExistsError: a block file already exists in ``block_dir`` (a
                complete one, or a partial one when not adopting).
            OSError: the memory could not be created (e.g. no hugepages reserved),
                or an adopted file has the wrong size or page size.
        """
        if block_dir is not None:
            if from_copy:
                for info in infos:
                    _copy_to_partial(info, block_dir)
            _check_room(infos, block_dir, adopt or from_copy)
        blocks: list[MappedBlock] = []
        try:
            for index, info in enumerate(infos):
                blocks.append(_create_block(index, info, block_dir, adopt or from_copy))
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

    def present_runs(self, index: int) -> list[tuple[int, int]]:
        """Page runs an adopted block's file already holds (none for a new block).

        An adopted hugetlbfs block cannot tell: it is emptied here instead.
        """
        block = self._blocks[index]
        if not block.adopted:
            return []
        runs = block.shm.held_runs()  # zero pages fallocated and never touched are punched: missing again
        if runs is None:
            block.shm.punch_hole(0, block.length)
            return []
        size = block.page_size
        return [(start // size, -(-stop // size)) for start, stop in runs]

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
            if complete and block.path is not None and block.path.endswith(PARTIAL_SUFFIX):
                final = block.path[:-len(PARTIAL_SUFFIX)]
                os.rename(block.path, final)
                block.path = final
        self._blocks = []


def _create_block(index: int, info: BlockInfo, block_dir: str | None, adopt: bool) -> MappedBlock:
    hugetlb = info.page_size != mmap.PAGESIZE
    adopted = False
    if block_dir is None:
        shm = SharedMemory.memfd(info.name, info.length, hugetlb=hugetlb, huge_page_size=info.page_size)
        path = None
    else:
        final = os.path.join(block_dir, _file_name(info.name))
        path = final + PARTIAL_SUFFIX
        if os.path.lexists(final):
            raise FileExistsError(errno.EEXIST, "a complete block file exists already", final)
        adopted = adopt and os.path.exists(path)
        shm = SharedMemory.open(path) if adopted else SharedMemory.create(path, info.length, exclusive=True)
        if shm.page_size != info.page_size or shm.size != info.length:
            shm.close()
            if not adopted:
                os.unlink(path)
            raise OSError(f"block {info.name!r} needs {info.length} bytes of {info.page_size}-byte pages but "
                          f"{path} has {shm.size} bytes of {shm.page_size}-byte pages")
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
    return MappedBlock(index=index, info=info, shm=shm, mapping=mapping, path=path, adopted=adopted)


def _copy_to_partial(info: BlockInfo, block_dir: str) -> None:
    """An earlier copy under the block's final name becomes its partial file (not yet verified)."""
    final = os.path.join(block_dir, _file_name(info.name))
    if not os.path.lexists(final):
        return
    if os.path.lexists(final + PARTIAL_SUFFIX):
        raise FileExistsError(errno.EEXIST, "both a block file and its .partial exist: which is the copy?", final)
    os.rename(final, final + PARTIAL_SUFFIX)


def _check_room(infos: Sequence[BlockInfo], block_dir: str, adopt: bool) -> None:
    """Refuse before creating anything when the filesystem reports too little room
    (tmpfs files are sparse: a full one fails only when a page is placed).  Pages
    that partial files being adopted already hold need no more room.  On hugetlbfs
    the room is the pool's free huge pages of the mount's size (a mapping reserves
    them all when it is made)."""
    huge = hugetlbfs_page_size(block_dir)
    if huge is not None:
        return _check_huge_room(infos, block_dir, huge, adopt)
    st = os.statvfs(block_dir)
    if st.f_blocks == 0:  # no limit reported (hugetlbfs without size=): mapping reserves the pages
        return
    need = sum(info.length for info in infos)
    if adopt:
        for info in infos:
            with contextlib.suppress(FileNotFoundError):
                need -= os.stat(os.path.join(block_dir, _file_name(info.name) + PARTIAL_SUFFIX)).st_blocks * 512
    free = st.f_bavail * st.f_frsize
    if need > free:
        raise ConfigurationError(f"block dir {block_dir}: no room for the blocks "
                                 f"({need} bytes needed, {free} bytes free)")


def _check_huge_room(infos: Sequence[BlockInfo], block_dir: str, huge: int, adopt: bool) -> None:
    """A hugetlbfs block dir holds blocks of exactly its page size, as many as free huge pages allow."""
    for info in infos:
        if info.page_size != huge:
            raise ConfigurationError(
                f"block dir {block_dir} is a hugetlbfs mount of {_size(huge)} pages, but block {info.name!r} "
                f"has {_size(info.page_size)} pages (its {info.length} bytes must be a multiple of {huge}: "
                f"mount hugetlbfs with pagesize={_size(info.page_size).replace(' ', '')}, or use /dev/shm)")
    need = 0
    for info in infos:
        partial = os.path.join(block_dir, _file_name(info.name) + PARTIAL_SUFFIX)
        if not (adopt and os.path.exists(partial)):  # an adopted file keeps the pages it has
            need += info.length // huge
    free = available_huge_pages(huge)
    if free is not None and need > free:
        raise ConfigurationError(
            f"block dir {block_dir} (hugetlbfs, {_size(huge)} pages): the blocks need {need} huge pages, "
            f"only {max(free, 0)} are free; {pool_hint(huge, need - max(free, 0))}")


def _size(nbytes: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if nbytes >= 1 << shift and nbytes % (1 << shift) == 0:
            return f"{nbytes >> shift} {unit}"
    return f"{nbytes} bytes"


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


def adoptable_session(block_dir: str) -> str | None:
    """The session id an earlier destination left in ``block_dir`` with partial blocks, or None."""
    path = os.path.join(block_dir, SESSION_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            session_id = f.read().strip()
    except FileNotFoundError:
        session_id = _named_session(block_dir)
    partial = any(name.endswith(PARTIAL_SUFFIX) for name in os.listdir(block_dir))
    return session_id if session_id and partial else None


def remember_session(block_dir: str, session_id: str) -> None:
    """Write the session id beside the blocks (atomically), for a destination that restarts.

    hugetlbfs files take no write() (nor symlinks): there the id is kept in the
    name of an empty file, ``.aiopostcopy-session=<id, percent-encoded>``, if
    that name fits (a long id with many odd characters is not remembered).
    """
    path = os.path.join(block_dir, SESSION_FILE)
    try:
        with open(path + ".new", "w", encoding="utf-8") as f:
            f.write(session_id + "\n")
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        os.unlink(path + ".new")
        _forget_named_session(block_dir)
        name = SESSION_FILE + "=" + urllib.parse.quote(session_id, safe="")
        if len(os.fsencode(name)) <= 255:
            os.close(os.open(os.path.join(block_dir, name), os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o600))
        return
    os.replace(path + ".new", path)


def forget_session(block_dir: str) -> None:
    """The migration ended (complete, or given up): nothing is left to adopt."""
    try:
        os.unlink(os.path.join(block_dir, SESSION_FILE))
    except FileNotFoundError:
        pass
    _forget_named_session(block_dir)


def _named_session(block_dir: str) -> str | None:
    for name in os.listdir(block_dir):
        if name.startswith(SESSION_FILE + "="):
            return urllib.parse.unquote(name[len(SESSION_FILE) + 1:])
    return None


def _forget_named_session(block_dir: str) -> None:
    for name in os.listdir(block_dir):
        if name.startswith(SESSION_FILE + "="):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(block_dir, name))


class Staging:
    """A page-aligned receive buffer for one channel: a copy buffer (huge-page-backed where it can
    be, which makes the receive into it and the placement from it cheaper).

    Args:
        size: bytes; at least the largest Pages payload the channel accepts.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._memory = copy_buffer(size)
        self._view = memoryview(self._memory)
        self.address = ctypes.addressof(ctypes.c_char.from_buffer(self._memory))
        self._zeros: mmap.mmap | None = None
        self._zeros_address = 0

    @classmethod
    def huge(cls, size: int) -> "Staging":
        """A buffer for one page of ``size`` bytes, backed and touched now (not on the fault path)."""
        staging = cls(size)  # transparent huge pages where the kernel has them: 512x fewer faults
        ctypes.memset(staging.address, 0, size)
        return staging

    def view(self, nbytes: int) -> memoryview:
        """The first ``nbytes`` of the buffer, where the next payload lands."""
        return self._view[:nbytes]

    def zeroed(self, size: int) -> int:
        """Address of ``size`` zero bytes (for placing zero pages by copy)."""
        if self._zeros is None or len(self._zeros) < size:
            self._zeros = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            self._zeros_address = ctypes.addressof(ctypes.c_char.from_buffer(self._zeros))
            _map_zero_page(self._zeros)
        return self._zeros_address


def _map_zero_page(memory: mmap.mmap) -> None:
    """Map the kernel's zero page all over ``memory`` now (no memory used).

    UFFDIO_COPY on hugetlbfs copies from the source with page faults disabled;
    a source page not mapped yet sends it down a slow path that allocates a
    *second* huge page for the copy, which fails with ENOMEM when the pool
    holds exactly the pages the blocks reserved.  MADV_POPULATE_READ (Linux
    5.14) maps the zero page without allocating; older kernels read one byte
    of each page instead.
    """
    try:
        memory.madvise(_MADV_POPULATE_READ)
    except OSError:
        view = memoryview(memory)
        for offset in range(0, len(memory), mmap.PAGESIZE):
            view[offset]  # noqa: B018  (a read fault maps the zero page)

