"""Run the userfaultfd contract against the real kernel object and against the fake."""

from __future__ import annotations

import pytest

from aiopostcopy.uffd import Mapping, SharedMemory, Userfaultfd

from .conformance import check_userfaultfd_contract
from .fake import FakeHarness
from .helpers import PAGE, Resources, Toucher, wait_readable


class RealHarness:
    """A memfd-backed 4-page region, a real Userfaultfd, and toucher threads."""

    page_size = PAGE

    def __init__(self, res: Resources) -> None:
        self.res = res
        self.shm: SharedMemory = res.memfd(4, name="contract")
        self.mapping: Mapping = res.map(self.shm)
        self.uffd: Userfaultfd = res.uffd()
        self.start = self.mapping.address
        self.touchers: dict[int, Toucher] = {}

    def source(self, data: bytes) -> int:
        return self.res.source(data)

    def touch(self, index: int) -> None:
        self.touchers[index] = self.res.touch(self.mapping, index * PAGE, 1)

    def finish(self, index: int, timeout: float) -> bytes:
        self.touchers.pop(index).finish(timeout)
        return bytes(self.mapping.buffer()[index * PAGE : (index + 1) * PAGE])

    def readable(self, timeout: float) -> bool:
        return wait_readable(self.uffd.fileno(), timeout)

    def close(self) -> None:
        self.res.close_all()


def test_real_userfaultfd_keeps_the_contract(res: Resources) -> None:
    check_userfaultfd_contract(lambda: RealHarness(res))


def test_fake_userfaultfd_keeps_the_contract() -> None:
    check_userfaultfd_contract(FakeHarness)


def test_the_check_catches_a_broken_implementation() -> None:
    class NoExists(FakeHarness):
        def __init__(self) -> None:
            super().__init__()
            place = self.uffd._place

            def overwrite(what, dst, length, fill, src, dontwake):  # type: ignore[no-untyped-def]
                for off in range(0, length, PAGE):
                    self.memory.pages.pop(dst + off, None)
                return place(what, dst, length, fill, src, dontwake)

            self.uffd._place = overwrite  # type: ignore[method-assign]

    with pytest.raises(AssertionError, match="PageExistsError"):
        check_userfaultfd_contract(NoExists)
