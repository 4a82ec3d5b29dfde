"""SharedMemory and Mapping: memfd, /dev/shm and hugetlbfs files, views, discards."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator

import pytest

from aiopostcopy.uffd import Mapping, SharedMemory, default_page_size, hugetlbfs_mount
from aiopostcopy.uffd.binding import ffi
from aiopostcopy.uffd.hugepages import private_hugetlbfs

from .helpers import PAGE, Resources, read_events, require_root

HUGE = 2 << 20


def test_memfd_basics(res: Resources) -> None:
    shm = res.memfd(4, name="basics")
    assert shm.size == 4 * PAGE and shm.page_size == default_page_size() == PAGE
    assert shm.path is None and not shm.hugetlb
    assert os.readlink(f"/proc/self/fd/{shm.fd}").startswith("/memfd:basics")
    shm.unlink()  # no-op for a memfd
    with pytest.raises(ValueError, match="multiple"):
        SharedMemory.memfd("odd", PAGE + 1)


def test_two_mappings_share_pages(res: Resources) -> None:
    shm = res.memfd(2)
    a, b = res.map(shm), res.map(shm)
    assert a.address != b.address and a.length == 2 * PAGE
    a.buffer()[PAGE : PAGE + 5] = b"hello"
    assert bytes(b.buffer()[PAGE : PAGE + 5]) == b"hello"
    part = res.map(shm, length=PAGE, offset=PAGE)
    assert bytes(part.buffer()[:5]) == b"hello"


def test_read_only_mapping(res: Resources) -> None:
    shm = res.memfd(1)
    ro = res.map(shm, writable=False)
    assert ro.touch() == 0


def test_punch_hole_makes_pages_missing_everywhere(res: Resources) -> None:
    shm = res.memfd(2)
    mapping = res.map(shm)
    mapping.buffer()[:] = b"\x01" * 2 * PAGE
    shm.punch_hole(PAGE, PAGE)
    assert shm.size == 2 * PAGE
    uffd = res.uffd()
    uffd.register(mapping.address, mapping.length)
    toucher = res.touch(mapping, PAGE)
    assert [f.address for f in read_events(uffd, 1)] == [mapping.address + PAGE]  # type: ignore[union-attr]
    uffd.zeropage(mapping.address + PAGE, PAGE)
    assert toucher.finish() == 0
    assert mapping.buffer()[0] == 1


def test_madvise_on_a_shared_mapping(res: Resources) -> None:
    shm = res.memfd(2)
    mapping = res.map(shm)
    mapping.buffer()[:] = b"\x02" * 2 * PAGE
    mapping.madvise_dontneed(0, PAGE)  # only this mapping's PTEs: the page stays in the file
    assert mapping.buffer()[0] == 2
    mapping.madvise_remove(0, PAGE)  # frees the backing page
    assert mapping.buffer()[0] == 0 and mapping.buffer()[PAGE] == 2
    with pytest.raises(ValueError, match="outside"):
        mapping.madvise_dontneed(PAGE, 2 * PAGE)


def test_mapping_close_releases_views_and_is_idempotent() -> None:
    with Mapping.anonymous(PAGE) as mapping:
        view = mapping.buffer()
        view[0] = 9
        assert not mapping.closed
    assert mapping.closed
    with pytest.raises(ValueError):
        view[0]
    mapping.close()
    with pytest.raises(ValueError, match="closed"):
        mapping.buffer()


def test_mapping_close_refuses_while_a_view_is_exported() -> None:
    mapping = Mapping.anonymous(PAGE)
    view = mapping.buffer()
    pinned = ffi.from_buffer(view)  # holds an export of the view, like numpy.frombuffer would
    with pytest.raises(BufferError):
        mapping.close()
    assert not mapping.closed
    ffi.release(pinned)
    mapping.close()
    assert mapping.closed


def test_create_open_adopt_unlink_in_dev_shm(res: Resources) -> None:
    path = f"/dev/shm/aiopostcopy-test-{uuid.uuid4().hex}"
    shm = res.own_shm(SharedMemory.create(path, 3 * PAGE))
    assert shm.path == path and shm.size == 3 * PAGE and os.path.exists(path)
    with pytest.raises(FileExistsError):
        SharedMemory.create(path, PAGE)
    again = res.own_shm(SharedMemory.open(path))
    assert again.size == 3 * PAGE and again.path == path
    adopted = res.own_shm(SharedMemory.adopt(os.dup(shm.fd)))
    assert adopted.path is None and adopted.size == 3 * PAGE
    res.map(again).buffer()[0] = 4
    assert res.map(adopted).buffer()[0] == 4
    shm.unlink()
    assert not os.path.exists(path) and shm.path is None
    shm.unlink()
    shm.close()
    shm.close()
    with pytest.raises(ValueError, match="closed"):
        shm.map()


@pytest.fixture
def hugetlbfs_dir() -> Iterator[str]:
    """A private hugetlbfs mount (2 MiB pages), unmounted afterwards."""
    require_root()
    with contextlib.ExitStack() as stack:
        try:
            path = stack.enter_context(private_hugetlbfs(HUGE, prefix="apc-hugetlbfs-"))
        except OSError as exc:
            pytest.skip(str(exc))
        yield path


@pytest.mark.root
def test_create_on_hugetlbfs(hugetlbfs_dir: str, res: Resources) -> None:
    assert hugetlbfs_mount() is not None
    res.reserve_huge_pages(1)
    shm = res.own_shm(SharedMemory.create(os.path.join(hugetlbfs_dir, "block"), HUGE))
    assert shm.hugetlb and shm.page_size == HUGE
    mapping = res.map(shm)
    mapping.buffer()[HUGE - 1] = 7
    mapping.close()
    shm.punch_hole(0, HUGE)
    assert res.map(shm).buffer()[HUGE - 1] == 0
    odd = os.path.join(hugetlbfs_dir, "odd")
    with pytest.raises(OSError):
        SharedMemory.create(odd, HUGE + PAGE)  # not a whole huge page
    assert not os.path.exists(odd)
