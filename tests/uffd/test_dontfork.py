"""Why client and service mappings are MADV_DONTFORK: a forked child would zero-fill missing shared pages.

Without UFFD_FEATURE_EVENT_FORK a child inherits a registered mapping but not
its registration.  On shared memory its touch of a missing page allocates a
zero page in the shared object, visible to every process, and the real page
can then no longer be placed (EEXIST).  With the mapping marked DONTFORK the
child has no mapping there at all, and its touch is a SIGSEGV.
"""

from __future__ import annotations

import faulthandler
import os
import signal

import pytest

from aiopostcopy.errors import PageExistsError
from aiopostcopy.uffd import RegisterMode

from .helpers import PAGE, Resources


def child_touch(mapping) -> int:
    """Fork; the child reads the first page and exits 0; returns the child's wait status."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        faulthandler.disable()  # an expected SIGSEGV: no traceback dump
        try:
            mapping.touch(0, PAGE)
        finally:
            os._exit(0)
    return os.waitpid(pid, 0)[1]


def test_without_dontfork_a_child_zero_fills_a_missing_shared_page(res: Resources) -> None:
    mapping = res.map(res.memfd(1))
    uffd = res.uffd()
    uffd.register(mapping.address, mapping.length, RegisterMode.MISSING)
    status = child_touch(mapping)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0  # no fault reached us: it read zeros
    with pytest.raises(PageExistsError):  # and the real page can no longer be placed
        uffd.copy(mapping.address, res.source(b"\x5a" * PAGE), PAGE)


def test_with_dontfork_the_child_faults_loudly_and_the_page_stays_missing(res: Resources) -> None:
    mapping = res.map(res.memfd(1))
    mapping.dont_fork()
    uffd = res.uffd()
    uffd.register(mapping.address, mapping.length, RegisterMode.MISSING)
    status = child_touch(mapping)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSEGV
    uffd.copy(mapping.address, res.source(b"\x5a" * PAGE), PAGE)  # still missing: placed now
    assert mapping.buffer()[:PAGE] == b"\x5a" * PAGE
