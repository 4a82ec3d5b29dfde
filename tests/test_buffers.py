"""Copy buffers: sized in whole huge-page steps from 256 KiB up, asked to be backed by huge pages,
zeroed, writable, read into by the kernel like any memory, and importable without the project's C
extensions (the source uses them)."""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
import subprocess
import sys

import pytest

from aiopostcopy.buffers import HUGE_STEP, copy_buffer


@pytest.mark.parametrize(("size", "length"), [
    (1, 1), (4096, 4096), (255 << 10, 255 << 10),  # small: as asked
    (256 << 10, HUGE_STEP), (1 << 20, HUGE_STEP), (HUGE_STEP, HUGE_STEP), (HUGE_STEP + 1, 2 * HUGE_STEP),
    (16 << 20, 16 << 20),
])
def test_sizes_round_up_to_whole_huge_page_steps_from_256_kib(size: int, length: int) -> None:
    buffer = copy_buffer(size)
    try:
        assert len(buffer) == length
        assert buffer[:] == bytes(length)  # fresh anonymous memory reads as zeros
    finally:
        buffer.close()


@pytest.mark.parametrize("size", [0, -1])
def test_an_empty_or_negative_size_is_refused(size: int) -> None:
    with pytest.raises(ValueError, match="copy buffer"):
        copy_buffer(size)


def _vm_flags(address: int) -> list[str]:
    """The VmFlags of this process's mapping that holds ``address`` (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                low, high = (int(part, 16) for part in head.split("-"))
                inside = low <= address < high
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def _kernel_at_least(major: int, minor: int) -> bool:
    release = platform.release().split(".")
    return (int(release[0]), int("".join(c for c in release[1] if c.isdigit()))) >= (major, minor)


@pytest.mark.parametrize("size", [1 << 20, 3 << 20])
def test_the_mapping_asks_for_huge_pages_on_a_huge_page_boundary(size: int) -> None:
    buffer = copy_buffer(size)
    try:
        address = ctypes.addressof(ctypes.c_char.from_buffer(buffer))
        assert "hg" in _vm_flags(address)  # MADV_HUGEPAGE recorded on the mapping
        if _kernel_at_least(6, 7):  # the kernels that place such a mapping on a 2 MiB boundary
            assert address % HUGE_STEP == 0
    finally:
        buffer.close()


def test_a_small_buffer_asks_for_nothing() -> None:
    buffer = copy_buffer(4096)
    try:
        assert "hg" not in _vm_flags(ctypes.addressof(ctypes.c_char.from_buffer(buffer)))
    finally:
        buffer.close()


def test_the_kernel_reads_a_file_into_it_page_by_page(tmp_path) -> None:
    pages = 300  # 1.2 MiB: one huge-page step, partly filled
    data = b"".join(bytes([i % 251 + 1]) * mmap.PAGESIZE for i in range(pages))
    path = tmp_path / "image"
    path.write_bytes(data)
    buffer = copy_buffer(len(data))
    fd = os.open(path, os.O_RDONLY)
    try:
        with memoryview(buffer)[:len(data)] as view:
            assert os.preadv(fd, [view], 0) == len(data)
        for page in range(pages):
            at = page * mmap.PAGESIZE
            assert buffer[at:at + mmap.PAGESIZE] == data[at:at + mmap.PAGESIZE], page
        assert buffer[len(data):] == bytes(len(buffer) - len(data))  # nothing past what was read
    finally:
        os.close(fd)
        buffer.close()


def test_the_source_imports_without_the_userfaultfd_binding() -> None:
    """The source serves from files: it must run where the userfaultfd extension is not built."""
    code = ("import sys; sys.modules['aiopostcopy.uffd._uffd'] = None\n"
            "import aiopostcopy.source\n"
            "assert 'aiopostcopy.uffd' not in sys.modules, 'the source imported the uffd package'\n"
            "from aiopostcopy.buffers import copy_buffer; assert len(copy_buffer(1 << 20)) == 2 << 20\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
