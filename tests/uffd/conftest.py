"""Fixtures for the userfaultfd tests: a resource tracker, a leak guard, the availability gate."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import pytest

from .helpers import Resources, kernel_features


def _open_fds() -> dict[int, str]:
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # the fd listdir itself used
            pass
    return fds


def _shared_mappings() -> list[str]:
    with open("/proc/self/maps", encoding="utf-8") as f:
        return sorted(line.split(None, 5)[-1].strip() for line in f if "/memfd:" in line or "/dev/shm/" in line)


@pytest.fixture(autouse=True)
def _no_leaks() -> Iterator[None]:
    """Fail a test that leaves an fd, a shared mapping or a thread behind."""
    fds_before = _open_fds()
    maps_before = _shared_mappings()
    threads_before = set(threading.enumerate())
    yield
    leaked = {fd: target for fd, target in _open_fds().items() if fds_before.get(fd) != target}
    assert not leaked, f"fds left open: {leaked}"
    assert _shared_mappings() == maps_before, "shared-memory mappings left mapped"
    threads = [t.name for t in set(threading.enumerate()) - threads_before if t.is_alive()]
    assert not threads, f"threads left running: {threads}"


@pytest.fixture
def res(_no_leaks: None) -> Iterator[Resources]:
    """Track what a test creates; release it all (in a safe order) afterwards."""
    resources = Resources()
    try:
        yield resources
    finally:
        resources.close_all()


@pytest.fixture(autouse=True)
def _userfaultfd_available() -> None:
    if not kernel_features():
        pytest.skip("no userfaultfd can be opened here (Userfaultfd.open's error names the fix)")
