"""Opening, adopting and closing a userfaultfd; the typed errors of the basic calls."""

from __future__ import annotations

import errno
import os
import socket

import pytest

from aiopostcopy.errors import (
    ClosedError,
    PageExistsError,
    RangeGoneError,
    UffdError,
    UffdUnsupportedError,
)
from aiopostcopy.uffd import Feature, Ioctl, OpenMode, PageFault, RegisterMode, Userfaultfd, supported_features
from aiopostcopy.uffd.binding import lib

from .helpers import PAGE, Resources, read_events, require_root, wait_readable


def test_supported_features_is_a_cached_probe() -> None:
    features = supported_features()
    assert features & Feature.MISSING_SHMEM
    assert supported_features() is features


@pytest.mark.root
@pytest.mark.parametrize("mode", list(OpenMode))
def test_every_open_mode_as_root(res: Resources, mode: OpenMode) -> None:
    require_root()
    uffd = res.uffd(Feature.THREAD_ID, mode=mode)
    assert uffd.mode is mode and mode.meaning
    assert uffd.features == Feature.THREAD_ID
    assert Ioctl.API in uffd.ioctls and Ioctl.REGISTER in uffd.ioctls
    assert os.get_blocking(uffd.fd) is False
    assert uffd.fileno() == uffd.fd


@pytest.mark.root
def test_auto_mode_prefers_the_device_as_root(res: Resources) -> None:
    require_root()
    assert res.uffd().mode is OpenMode.DEVICE


def test_blocking_open(res: Resources) -> None:
    uffd = res.uffd(nonblocking=False)
    assert os.get_blocking(uffd.fd) is True


def test_unsupported_feature_is_named(res: Resources) -> None:
    with pytest.raises(UffdUnsupportedError, match="bit 40") as info:
        Userfaultfd.open(Feature.THREAD_ID | Feature(1 << 40))
    assert isinstance(info.value, OSError)


def test_user_mode_only_meaning_mentions_efault() -> None:
    assert "EFAULT" in OpenMode.USER_MODE_ONLY.meaning
    assert OpenMode.DEVICE.value == "/dev/userfaultfd"


def test_read_events_on_an_empty_queue_returns_nothing(res: Resources) -> None:
    uffd = res.uffd()
    assert uffd.read_events() == []
    assert uffd.read_events(1) == []
    with pytest.raises(ValueError):
        uffd.read_events(0)


def test_close_is_idempotent_and_later_calls_raise_closed(res: Resources) -> None:
    mapping = res.anon(1)
    with Userfaultfd.open() as uffd:
        uffd.register(mapping.address, PAGE)
    assert uffd.closed
    uffd.close()
    src = res.source(bytes(PAGE))
    calls = [
        lambda: uffd.fd,
        uffd.fileno,
        lambda: uffd.register(mapping.address, PAGE),
        lambda: uffd.unregister(mapping.address, PAGE),
        lambda: uffd.wake(mapping.address, PAGE),
        lambda: uffd.copy(mapping.address, src, PAGE),
        lambda: uffd.zeropage(mapping.address, PAGE),
        lambda: uffd.continue_(mapping.address, PAGE),
        lambda: uffd.writeprotect(mapping.address, PAGE, wp=True),
        uffd.read_events,
    ]
    for call in calls:
        with pytest.raises(ClosedError):
            call()
    assert "closed" in repr(uffd)


def test_errors_are_typed_oserrors(res: Resources) -> None:
    uffd = res.uffd()
    mapping = res.anon(4)
    src = res.source(b"\x01" * PAGE)
    with pytest.raises(UffdError) as bad:
        uffd.register(mapping.address + 1, PAGE)
    assert bad.value.errno == errno.EINVAL and isinstance(bad.value, OSError)
    with pytest.raises(RangeGoneError) as gone:
        uffd.copy(mapping.address, src, PAGE)
    assert gone.value.errno == errno.ENOENT
    ioctls = uffd.register(mapping.address, mapping.length, RegisterMode.MISSING)
    assert Ioctl.COPY in ioctls and Ioctl.ZEROPAGE in ioctls and Ioctl.WAKE in ioctls
    assert uffd.copy(mapping.address, src, PAGE) == PAGE
    with pytest.raises(PageExistsError) as exists:
        uffd.copy(mapping.address, src, PAGE)
    assert exists.value.errno == errno.EEXIST and isinstance(exists.value, OSError)
    uffd.unregister(mapping.address, mapping.length)


def test_poison_and_move_need_header_support(res: Resources) -> None:
    uffd = res.uffd()
    mapping = res.anon(2)
    uffd.register(mapping.address, mapping.length)
    if not lib.HAS_POISON:
        with pytest.raises(UffdUnsupportedError, match="UFFD.*POISON"):
            uffd.poison(mapping.address, PAGE)
    if not lib.HAS_MOVE:
        with pytest.raises(UffdUnsupportedError, match="MOVE"):
            uffd.move(mapping.address, mapping.address + PAGE, PAGE)


def test_adopt_takes_ownership_without_handshake(res: Resources) -> None:
    donor = Userfaultfd.open(Feature.THREAD_ID, nonblocking=False)
    fd = os.dup(donor.fd)
    donor.close()
    uffd = res.own_uffd(Userfaultfd.adopt(fd, features=Feature.THREAD_ID))
    assert uffd.mode is None and uffd.features == Feature.THREAD_ID
    assert os.get_blocking(fd) is False
    assert Ioctl.REGISTER in uffd.ioctls
    mapping = res.anon(1)
    uffd.register(mapping.address, PAGE)
    uffd.close()
    with pytest.raises(OSError):
        os.fstat(fd)


def test_adopt_rejects_other_fds() -> None:
    a, b = socket.socketpair()
    with a, b, pytest.raises(ValueError, match="not a userfaultfd"):
        Userfaultfd.adopt(a.fileno())


def test_kernel_fault_fails_efault_in_user_mode_only(res: Resources) -> None:
    """A read() syscall writing into a missing page: EFAULT, no event."""
    shm = res.memfd(2)
    mapping = res.map(shm)
    uffd = res.uffd(mode=OpenMode.USER_MODE_ONLY)
    uffd.register(mapping.address, mapping.length)
    r, w = os.pipe()
    res.fds += [r, w]
    os.write(w, b"kernel writes here")
    with pytest.raises(OSError) as info:
        os.readv(r, [mapping.buffer()[PAGE : PAGE + 32]])
    assert info.value.errno == errno.EFAULT
    assert uffd.read_events() == []


@pytest.mark.root
def test_kernel_fault_waits_for_the_device_mode(res: Resources) -> None:
    """The same read() with a device-opened fd becomes a fault we resolve."""
    require_root()
    shm = res.memfd(2)
    mapping = res.map(shm)
    uffd = res.uffd(mode=OpenMode.DEVICE)
    uffd.register(mapping.address, mapping.length)
    r, w = os.pipe()
    res.fds += [r, w]
    os.write(w, b"kernel writes here")
    view = mapping.buffer()[PAGE : PAGE + 32]
    got: list[int] = []
    reader = res.call_in_thread(lambda: got.append(os.readv(r, [view])))
    [fault] = read_events(uffd, 1)
    assert isinstance(fault, PageFault) and fault.address == mapping.address + PAGE
    uffd.copy(fault.address, res.source(b"\xee" * PAGE), PAGE)
    reader.join(10)
    assert got == [18] and bytes(view[:18]) == b"kernel writes here"
    assert not wait_readable(uffd.fd, 0)
