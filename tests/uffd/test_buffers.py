"""Copy buffers: sized in whole huge-page steps from 256 KiB up, zeroed, writable, and read into
by the kernel like any memory."""

import mmap
import os

import pytest

from aiopostcopy.uffd.buffers import HUGE_STEP, copy_buffer


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


def test_the_kernel_reads_a_file_into_it_page_by_page(tmp_path) -> None:
    pages = 300  # over 1 MiB: the buffer is two huge-page steps' worth of one mapping
    data = b"".join(bytes([i % 251 + 1]) * mmap.PAGESIZE for i in range(pages))
    path = tmp_path / "image"
    path.write_bytes(data)
    buffer = copy_buffer(len(data))
    fd = os.open(path, os.O_RDONLY)
    try:
        view = memoryview(buffer)[:len(data)]
        assert os.preadv(fd, [view], 0) == len(data)
        for page in range(pages):
            at = page * mmap.PAGESIZE
            assert buffer[at:at + mmap.PAGESIZE] == data[at:at + mmap.PAGESIZE], page
        assert buffer[len(data):] == bytes(len(buffer) - len(data))  # nothing past what was read
        view.release()
    finally:
        os.close(fd)
        buffer.close()
