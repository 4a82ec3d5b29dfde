"""An unprivileged user (nobody, 65534) gets a userfaultfd through UFFD_USER_MODE_ONLY.

The test (root) forks; the child drops to nobody and runs the scenario, then
reports one line of text through a pipe and leaves with os._exit.  As nobody,
/dev/userfaultfd (root-only) and plain userfaultfd(2) (with
vm.unprivileged_userfaultfd=0) are refused, so auto mode must fall back to
USER_MODE_ONLY, and a user-space fault is still resolved.
"""

from __future__ import annotations

import errno
import os
import select
import signal
import stat
import threading
import traceback

import pytest

from aiopostcopy.errors import UffdUnavailableError, UffdUnsupportedError
from aiopostcopy.uffd import (
    Feature,
    HugePageReservation,
    OpenMode,
    PageFault,
    SharedMemory,
    Userfaultfd,
    buffer_address,
)
from aiopostcopy.uffd import opening

from .helpers import PAGE, TIMEOUT, read_events, require_root

pytestmark = pytest.mark.root

NOBODY = 65534


def _expected_auto_mode() -> OpenMode:
    """What auto mode should pick for nobody on this machine's settings."""
    if os.stat("/dev/userfaultfd").st_mode & (stat.S_IROTH | stat.S_IWOTH) == (stat.S_IROTH | stat.S_IWOTH):
        return OpenMode.DEVICE
    with open("/proc/sys/vm/unprivileged_userfaultfd", encoding="ascii") as f:
        return OpenMode.SYSCALL if f.read().strip() == "1" else OpenMode.USER_MODE_ONLY


def _resolve_one_fault(uffd: Userfaultfd) -> None:
    shm = SharedMemory.memfd("nobody", 2 * PAGE)
    mapping = shm.map()
    uffd.register(mapping.address, mapping.length)
    got: list[int] = []
    toucher = threading.Thread(target=lambda: got.append(mapping.touch(PAGE, 1)))
    toucher.start()
    [fault] = read_events(uffd, 1)
    assert isinstance(fault, PageFault) and fault.address == mapping.address + PAGE
    src = bytearray(b"\x3c" * PAGE)
    uffd.copy(fault.address, buffer_address(src), PAGE)
    toucher.join(TIMEOUT)
    assert got == [0x3C], got
    r, w = os.pipe()
    os.write(w, b"x")
    try:
        os.readv(r, [mapping.buffer()[0:1]])  # a kernel-context fault on a missing page
        raise AssertionError("kernel fault should fail in user-mode-only")
    except OSError as exc:
        assert exc.errno == errno.EFAULT, exc
    mapping.close()
    shm.close()


def _scenario(expected: OpenMode) -> str:
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)
    opening._probe.cache_clear()  # probe again, as nobody
    assert Feature.MISSING_SHMEM in opening.supported_features()
    if expected is OpenMode.USER_MODE_ONLY:
        for mode in (OpenMode.DEVICE, OpenMode.SYSCALL):
            try:
                Userfaultfd.open(mode=mode).close()
                raise AssertionError(f"{mode} opened as nobody")
            except UffdUnavailableError as exc:
                assert mode.value in str(exc) and "unprivileged_userfaultfd=1" in str(exc), exc
    try:
        Userfaultfd.open(Feature.EVENT_FORK, mode=OpenMode.USER_MODE_ONLY).close()
        raise AssertionError("EVENT_FORK granted without CAP_SYS_PTRACE")
    except UffdUnsupportedError as exc:
        assert "CAP_SYS_PTRACE" in str(exc), exc
    try:
        HugePageReservation(1).__enter__()
        raise AssertionError("huge page pool changed by nobody")
    except PermissionError:
        pass
    with Userfaultfd.open(Feature.THREAD_ID) as uffd:
        assert uffd.mode is expected, uffd.mode
        _resolve_one_fault(uffd)
    return "ok"


def _run_child(w: int, expected: OpenMode) -> None:
    try:
        result = _scenario(expected)
    except BaseException:
        result = traceback.format_exc()
    os.write(w, result.encode())
    os._exit(0)


def _read_all(r: int) -> bytes:
    chunks = []
    while select.select([r], [], [], TIMEOUT)[0]:
        chunk = os.read(r, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def test_nobody_falls_back_to_user_mode_only() -> None:
    require_root()
    if not os.path.exists("/dev/userfaultfd"):
        pytest.skip("no /dev/userfaultfd on this kernel")
    expected = _expected_auto_mode()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        os.close(r)
        _run_child(w, expected)
    os.close(w)
    try:
        output = _read_all(r).decode()
    finally:
        os.close(r)
        if os.waitpid(pid, os.WNOHANG) == (0, 0):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    assert output == "ok", output
