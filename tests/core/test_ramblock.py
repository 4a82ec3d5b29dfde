"""RAMBlock, BlockTable and MappingTable: translation both ways and every rejection."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aiopostcopy.core.ramblock import BlockTable, MappingTable, RAMBlock
from aiopostcopy.errors import MappingTableError, RemoteProtocolError
from aiopostcopy.messages import BlockInfo

PAGE = 4096
HUGE = 2 << 20
BLOCKS = BlockTable([RAMBlock(name="ram", length=64 * PAGE, page_size=PAGE),
                     RAMBlock(name="huge", length=4 * HUGE, page_size=HUGE)])


def test_ramblock_round_trips_blockinfo() -> None:
    info = BlockInfo(name="x", length=8 * PAGE, page_size=PAGE)
    block = RAMBlock.from_info(info)
    assert block.pages == 8
    assert block.info() == info


def test_block_table_indexes() -> None:
    assert len(BLOCKS) == 2
    assert BLOCKS.index_of("huge") == 1
    assert BLOCKS.by_name("ram").pages == 64
    assert BLOCKS.total_pages == 68
    assert BlockTable.from_infos(BLOCKS.infos()) == BLOCKS
    with pytest.raises(KeyError):
        BLOCKS.index_of("nope")
    with pytest.raises(ValueError):
        BlockTable([BLOCKS[0], BLOCKS[0]])


def test_check_run() -> None:
    BLOCKS.check_run(0, 60, 4)
    for run in ((2, 0, 1), (0, 60, 5), (1, 4, 1)):
        with pytest.raises(RemoteProtocolError) as info:
            BLOCKS.check_run(*run)
        assert info.value.code == "block"


def test_translate_and_address_of() -> None:
    table = MappingTable.build(BLOCKS, [(0x10000, 16 * PAGE, 0, 8 * PAGE), (0x40000000, 2 * HUGE, 1, HUGE)])
    assert table.translate(0x10000) == (0, 8)
    assert table.translate(0x10000 + 3 * PAGE + 17) == (0, 11)
    assert table.translate(0x10000 + 16 * PAGE) is None
    assert table.translate(0xFFFF) is None
    assert table.translate(0x40000000 + HUGE + 5) == (1, 2)
    assert table.address_of(0, 8) == 0x10000
    assert table.address_of(0, 7) is None
    assert table.address_of(1, 3) is None
    assert table.address_of(1, 1) == 0x40000000


def test_ranges_merges_and_includes_aliases() -> None:
    table = MappingTable.build(BLOCKS, [
        (0x10000, 8 * PAGE, 0, 0), (0x10000 + 8 * PAGE, 8 * PAGE, 0, 8 * PAGE),  # adjacent: merge
        (0x900000, 4 * PAGE, 0, 2 * PAGE),  # an alias of pages 2..5
    ])
    assert table.ranges(0, 6, 4) == [(0x10000 + 6 * PAGE, 4 * PAGE)]
    assert table.ranges(0, 0, 16) == [(0x10000, 16 * PAGE), (0x900000, 4 * PAGE)]
    assert table.ranges(0, 3, 1) == [(0x10000 + 3 * PAGE, PAGE), (0x900000 + PAGE, PAGE)]
    assert table.ranges(0, 40, 4) == []


def test_identity() -> None:
    table = MappingTable.identity(BLOCKS, [0x100000, 0x40000000])
    assert table.translate(0x100000 + 5 * PAGE) == (0, 5)
    assert table.address_of(1, 3) == 0x40000000 + 3 * HUGE
    with pytest.raises(MappingTableError, match="2 blocks"):
        MappingTable.identity(BLOCKS, [0x100000])


@pytest.mark.parametrize("entries, words", [
    ([(0x10000, PAGE, 5, 0)], ["entry 0", "no block 5"]),
    ([(0x10001, PAGE, 0, 0)], ["entry 0", "address", "not aligned"]),
    ([(0x10000, 100, 0, 0)], ["length", "not aligned"]),
    ([(0x10000, PAGE, 0, 12)], ["offset", "not aligned"]),
    ([(0x40000000, PAGE, 1, 0)], ["length", "page size 0x200000"]),
    ([(0x10000, 2 * PAGE, 0, 63 * PAGE)], ["runs past the end", "'ram'"]),
    ([(0x10000, 0, 0, 0)], ["positive"]),
    ([(0x10000, 4 * PAGE, 0, 0), (0x20000, PAGE, 0, 0), (0x12000, PAGE, 0, 0)],
     ["entry 2", "overlap mapping entry 0"]),
    ([(0x10000, PAGE, 0)], ["entry 0", "expected"]),
    ([(0x10000, PAGE, 0, "0")], ["integers"]),
])
def test_mapping_table_rejections_say_which_entry_and_why(entries: list, words: list[str]) -> None:
    with pytest.raises(MappingTableError) as info:
        MappingTable.build(BLOCKS, entries)
    for word in words:
        assert word in str(info.value)


def test_mapping_table_error_shows_values_in_hex() -> None:
    with pytest.raises(MappingTableError) as info:
        MappingTable.build(BLOCKS, [(0x10000, PAGE, 0, 0), (0x7F0000001000, 8, 0, 0)])
    assert "mapping entry 1 (address=0x7f0000001000, length=0x8, block=0, offset=0x0)" in str(info.value)


@given(st.lists(st.tuples(st.integers(0, 15), st.integers(1, 4), st.integers(0, 60)), max_size=6),
       st.integers(0, 20 * 8 * PAGE))
def test_translate_matches_brute_force(raw: list[tuple[int, int, int]], address: int) -> None:
    entries, used = [], set()
    for slot, pages, offset_page in raw:  # slots 8 pages apart: no overlaps
        if slot in used or offset_page + pages > 64:
            continue
        used.add(slot)
        entries.append((PAGE + slot * 8 * PAGE, pages * PAGE, 0, offset_page * PAGE))
    table = MappingTable.build(BLOCKS, entries)
    expected = None
    for start, length, block, offset in entries:
        if start <= address < start + length:
            expected = (block, (offset + address - start) // PAGE)
    assert table.translate(address) == expected
    if expected is not None:
        block, page = expected
        back = table.address_of(block, page)
        assert back is not None and table.translate(back) == expected
