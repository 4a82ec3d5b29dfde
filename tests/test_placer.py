"""Placement on the real kernel: runs with zero stretches, pages already there, the EAGAIN rules."""

from __future__ import annotations

import dataclasses

import pytest

from aiopostcopy.core.commands import Place, PlaceZero
from aiopostcopy.destination.memory import Staging
from aiopostcopy.destination.placer import Interrupted, Placement
from aiopostcopy.uffd import RegisterMode, SharedMemory, Userfaultfd

PAGE = 4096


@dataclasses.dataclass
class Block:
    address: int
    page_size: int = PAGE
    zeropage_ok: bool = True


class Memory:
    def __init__(self, block: Block) -> None:
        self._block = block

    def block(self, index: int) -> Block:
        return self._block


@pytest.fixture
def region():
    shm = SharedMemory.memfd("placer-test", 2400 * PAGE)
    mapping = shm.map(2400 * PAGE)
    uffd = Userfaultfd.open()
    uffd.register(mapping.address, mapping.length, RegisterMode.MISSING)
    try:
        yield uffd, mapping, Placement(uffd, Memory(Block(mapping.address)), 0)
    finally:
        uffd.close()
        mapping.close()
        shm.close()


def test_scattered_existing_pages_are_counted_not_fatal(region) -> None:
    """Every other page is there already: the kernel stops at each with EAGAIN-after-progress
    (or EEXIST); that is progress, not a changing mapping, on the loop thread and on the
    placement thread (drain None) alike."""
    uffd, mapping, placement = region
    one = Staging(PAGE)
    for page in range(1, 2400, 2):
        uffd.copy(mapping.address + page * PAGE, one.address, PAGE)
    drained = []
    assert placement.place(PlaceZero(0, 0, 1200), None, lambda: drained.append(1)) == 600
    assert placement.place(PlaceZero(0, 1200, 1200), None, None) == 600  # the placement thread's way
    assert drained == []
    assert bytes(mapping.buffer()[:2400 * PAGE]) == bytes(2400 * PAGE)


def test_place_with_zero_stretches_from_the_packed_payload(region) -> None:
    uffd, mapping, placement = region
    staging = Staging(8 * PAGE)
    view = staging.view(8 * PAGE)
    for i in range(5):
        view[i * PAGE:(i + 1) * PAGE] = bytes([i + 1]) * PAGE
    # a sub-run of 6 pages starting at payload page 1, with pages 1 and 4 zero
    assert placement.place(Place(0, 10, 6, 1, (1, 2, 4, 5)), staging, None) == 0
    expected = [2, 0, 3, 4, 0, 5]
    for i, value in enumerate(expected):
        page = mapping.buffer()[(10 + i) * PAGE:(11 + i) * PAGE]
        assert bytes(page) == bytes([value]) * PAGE, f"page {10 + i}"


def test_interrupted_carries_where_to_go_on() -> None:
    exc = Interrupted(7, 2)
    assert (exc.page, exc.existed) == (7, 2)
