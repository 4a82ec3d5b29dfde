"""RAMBlocks, the block table, and mapping tables (address range <-> block/offset).

Theory of operation
-------------------
A :class:`RAMBlock` is a named, page-aligned region of migrated memory; a
:class:`BlockTable` is the session's ordered list of them, indexed by number
(the protocol's ``block`` field) and by name.

A :class:`MappingTable` says where one userfaultfd's address space maps the
blocks: entries ``(address, length, block, offset)``.  Each client has its
own table (QEMU's "mapping table that allows fault addresses in the client's
address space to be converted back to RAMBlock/offsets"); the service's own
mapping is :meth:`MappingTable.identity`.  Tables are validated once, at
build time, and every rejection names the entry and the reason, because the
text goes back to the client in a ``Reject``.

Lookups are bisections over two views built at construction:

* by address (entries sorted by address, no overlaps): ``translate`` a
  faulting address to ``(block, page)``;
* by block (entries of each block sorted by offset; a block may be mapped
  more than once): ``address_of`` and ``ranges`` go the other way.
"""

from __future__ import annotations

import dataclasses
from bisect import bisect_right
from collections.abc import Iterable, Iterator, Sequence

from aiopostcopy.errors import MappingTableError, RemoteProtocolError
from aiopostcopy.messages import BlockInfo

__all__ = ["RAMBlock", "BlockTable", "MappingTable"]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class RAMBlock:
    """One block of migrated memory.

    Attributes:
        name: unique name within the session.
        length: bytes, a multiple of ``page_size``.
        page_size: bytes per page (4096, or 2 MiB for hugetlbfs).
    """

    name: str
    length: int
    page_size: int

    @property
    def pages(self) -> int:
        """Number of pages in the block."""
        return self.length // self.page_size

    @classmethod
    def from_info(cls, info: BlockInfo) -> RAMBlock:
        """Build from the protocol's (already validated) :class:`BlockInfo`."""
        return cls(name=info.name, length=info.length, page_size=info.page_size)

    def info(self) -> BlockInfo:
        """The protocol's description of this block."""
        return BlockInfo(name=self.name, length=self.length, page_size=self.page_size)


class BlockTable:
    """The ordered blocks of a session, indexed by number and by name.

    Args:
        blocks: the blocks in protocol order.

    Raises:
        ValueError: two blocks share a name.
    """

    __slots__ = ("_blocks", "_by_name", "_pages", "page_sizes")

    def __init__(self, blocks: Iterable[RAMBlock]) -> None:
        self._blocks: tuple[RAMBlock, ...] = tuple(blocks)
        self._pages = tuple(block.pages for block in self._blocks)
        #: page size of each block, by index (read per fault: no RAMBlock lookup)
        self.page_sizes: tuple[int, ...] = tuple(block.page_size for block in self._blocks)
        self._by_name = {block.name: index for index, block in enumerate(self._blocks)}
        if len(self._by_name) != len(self._blocks):
            raise ValueError("block names must be unique")

    @classmethod
    def from_infos(cls, infos: Iterable[BlockInfo]) -> BlockTable:
        """Build from a Hello's block list."""
        return cls(RAMBlock.from_info(info) for info in infos)

    def infos(self) -> tuple[BlockInfo, ...]:
        """The block list as a Hello carries it."""
        return tuple(block.info() for block in self._blocks)

    def __getitem__(self, index: int) -> RAMBlock:
        return self._blocks[index]

    def __len__(self) -> int:
        return len(self._blocks)

    def __iter__(self) -> Iterator[RAMBlock]:
        return iter(self._blocks)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BlockTable):
            return NotImplemented
        return self._blocks == other._blocks

    def __repr__(self) -> str:
        return f"BlockTable({list(self._blocks)!r})"

    def index_of(self, name: str) -> int:
        """The number of the block called ``name``.

        Raises:
            KeyError: no such block.
        """
        return self._by_name[name]

    def by_name(self, name: str) -> RAMBlock:
        """The block called ``name``.

        Raises:
            KeyError: no such block.
        """
        return self._blocks[self._by_name[name]]

    def check_run(self, block: int, first: int, count: int) -> None:
        """Check that a run a peer sent lies inside a block.

        Raises:
            RemoteProtocolError: (code ``block``) no such block, or the run
                goes past its end.
        """
        pages = self._pages
        if not 0 <= block < len(pages) or first < 0 or count < 1 or first + count > pages[block]:
            raise RemoteProtocolError(f"run (block={block}, first={first}, count={count}) "
                                      "is out of range", code="block")

    @property
    def total_pages(self) -> int:
        """Pages in all blocks together."""
        return sum(block.pages for block in self._blocks)


def _entry_text(index: int, entry: tuple[int, int, int, int]) -> str:
    address, length, block, offset = entry
    return (f"mapping entry {index} (address={address:#x}, length={length:#x}, "
            f"block={block}, offset={offset:#x})")


def _check_entry(blocks: BlockTable, index: int, entry: tuple[int, int, int, int]) -> None:
    address, length, block, offset = entry
    if not all(type(value) is int for value in entry):
        raise MappingTableError(f"mapping entry {index} {entry!r:.120}: fields must be integers")
    if not 0 <= block < len(blocks):
        raise MappingTableError(f"{_entry_text(index, entry)}: no block {block} "
                                f"(the session has {len(blocks)})")
    ram = blocks[block]
    if length <= 0 or address <= 0 or offset < 0:
        raise MappingTableError(f"{_entry_text(index, entry)}: address and length must be "
                                "positive, offset not negative")
    for name, value in (("address", address), ("length", length), ("offset", offset)):
        if value % ram.page_size:
            raise MappingTableError(f"{_entry_text(index, entry)}: {name} is not aligned to "
                                    f"block {ram.name!r}'s page size {ram.page_size:#x}")
    if offset + length > ram.length:
        raise MappingTableError(f"{_entry_text(index, entry)}: offset + length {offset + length:#x} "
                                f"runs past the end of block {ram.name!r} ({ram.length:#x})")


class MappingTable:
    """Where one userfaultfd's address space maps the session's blocks.

    Build it with :meth:`build` (validates) or :meth:`identity`.
    """

    __slots__ = ("blocks", "_starts", "_entries", "_by_block", "_block_offsets")

    def __init__(self, blocks: BlockTable, entries: list[tuple[int, int, int, int]]) -> None:
        # Private: use build() or identity(). ``entries`` are validated and sorted by address.
        self.blocks = blocks
        self._entries = entries
        self._starts = [entry[0] for entry in entries]
        per_block: list[list[tuple[int, int, int]]] = [[] for _ in range(len(blocks))]
        for address, length, block, offset in entries:
            per_block[block].append((offset, offset + length, address))
        for items in per_block:
            items.sort()
        self._by_block = per_block
        self._block_offsets = [[item[0] for item in items] for items in per_block]

    @classmethod
    def build(cls, blocks: BlockTable,
              entries: Iterable[tuple[int, int, int, int]]) -> MappingTable:
        """Validate a mapping table.

        Args:
            blocks: the session's blocks.
            entries: ``(address, length, block_index, offset)`` in any order.

        Returns:
            The table.

        Raises:
            MappingTableError: an entry is misaligned, names a missing block,
                runs past its block, or overlaps another entry's addresses.
                The message names the entry (index and values) and the reason.
        """
        listed = [tuple(entry) for entry in entries]
        for index, entry in enumerate(listed):
            if len(entry) != 4:
                raise MappingTableError(f"mapping entry {index}: expected "
                                        f"(address, length, block, offset), got {entry!r:.120}")
            _check_entry(blocks, index, entry)  # type: ignore[arg-type]
        order = sorted(range(len(listed)), key=lambda index: listed[index][0])
        for before, after in zip(order, order[1:]):
            if listed[before][0] + listed[before][1] > listed[after][0]:
                raise MappingTableError(f"{_entry_text(after, listed[after])}: its addresses "  # type: ignore[arg-type]
                                        f"overlap mapping entry {before}")
        return cls(blocks, [listed[index] for index in order])  # type: ignore[misc]

    @classmethod
    def identity(cls, blocks: BlockTable, bases: Sequence[int]) -> MappingTable:
        """The service's own mapping: block ``i`` mapped whole at ``bases[i]``.

        Raises:
            MappingTableError: wrong number of bases, or bases that overlap or misalign.
        """
        if len(bases) != len(blocks):
            raise MappingTableError(f"{len(bases)} base addresses for {len(blocks)} blocks")
        return cls.build(blocks, ((base, blocks[index].length, index, 0)
                                  for index, base in enumerate(bases)))

    @property
    def entries(self) -> tuple[tuple[int, int, int, int], ...]:
        """The entries sorted by address."""
        return tuple(self._entries)

    def translate(self, address: int) -> tuple[int, int] | None:
        """The ``(block, page)`` a faulting address falls in, or None if unmapped."""
        index = bisect_right(self._starts, address) - 1
        if index < 0:
            return None
        start, length, block, offset = self._entries[index]
        if address >= start + length:
            return None
        return block, (offset + address - start) // self.blocks.page_sizes[block]

    def address_of(self, block: int, page: int) -> int | None:
        """Address of ``page`` of ``block`` in this space (the first mapping of it), or None."""
        offset = page * self.blocks[block].page_size
        for low, high, address in self._by_block[block]:
            if low <= offset < high:
                return address + offset - low
            if low > offset:
                return None
        return None

    def ranges(self, block: int, first: int, count: int) -> list[tuple[int, int]]:
        """The ``(address, length)`` pieces of a page run mapped in this space, merged.

        Every mapping of the run is included (a block may be mapped twice);
        pieces adjacent in address are merged.  Unmapped pages are left out.
        """
        page_size = self.blocks[block].page_size
        low_wanted, high_wanted = first * page_size, (first + count) * page_size
        stop = bisect_right(self._block_offsets[block], high_wanted - 1)
        pieces = []
        for low, high, address in self._by_block[block][:stop]:
            low_piece, high_piece = max(low, low_wanted), min(high, high_wanted)
            if low_piece < high_piece:
                pieces.append((address + low_piece - low, high_piece - low_piece))
        return _merge_pieces(pieces)


def _merge_pieces(pieces: list[tuple[int, int]]) -> list[tuple[int, int]]:
    pieces.sort()
    merged: list[tuple[int, int]] = []
    for start, length in pieces:
        if merged and merged[-1][0] + merged[-1][1] == start:
            merged[-1] = (merged[-1][0], merged[-1][1] + length)
        else:
            merged.append((start, length))
    return merged
