"""A client process's fault, resolved through our own mapping of the shared memory.

The QEMU shared-memory postcopy flow: the client registers its own mapping
with its own userfaultfd and passes that fd over SCM_RIGHTS.  We read the
fault (a *client* address), translate it with the client's mapping table,
place the page with UFFDIO_COPY through *our* mapping (registered with *our*
userfaultfd), then UFFDIO_WAKE the client's fd.
"""

from __future__ import annotations

import json
import os
import socket
import sys

import pytest

from aiopostcopy.errors import TargetGoneError
from aiopostcopy.uffd import Feature, PageFault, Userfaultfd

from .helpers import PAGE, TIMEOUT, Resources, read_events, wait_readable

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


def _env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": REPO + (os.pathsep + path if path else "")}


def test_client_fault_placed_through_our_mapping_and_woken(res: Resources) -> None:
    shm = res.memfd(4, name="shared-block")
    own = res.map(shm)
    own_uffd = res.uffd()
    own_uffd.register(own.address, own.length)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, theirs:
        ours.settimeout(TIMEOUT)
        script = os.path.join(HERE, "_client_child.py")
        argv = [sys.executable, script, str(theirs.fileno()), str(shm.fd), "2"]
        proc = res.popen(argv, pass_fds=[theirs.fileno(), shm.fd], env=_env())
        theirs.close()
        msg, fds, _flags, _addr = socket.recv_fds(ours, 4096, 1)
        table = json.loads(msg)
        client = res.own_uffd(Userfaultfd.adopt(fds[0], features=Feature.THREAD_ID))

        [fault] = read_events(client, 1)
        assert isinstance(fault, PageFault)
        assert fault.thread_id == proc.pid == table["pid"]
        offset = fault.page_start(PAGE) - table["address"] + table["offset"]
        assert offset == 2 * PAGE
        assert own_uffd.copy(own.address + offset, res.source(b"\xa5" * PAGE), PAGE) == PAGE
        assert not wait_readable(ours.fileno(), 0.2), "the client must wait for the wake on its own fd"
        client.wake(fault.page_start(PAGE), PAGE)
        assert ours.recv(16) == b"ok"
        assert bytes(own.buffer()[offset : offset + PAGE]) == b"\xa5" * PAGE

        ours.sendall(b"x")
        assert proc.wait(TIMEOUT) == 0
        with pytest.raises(TargetGoneError) as gone:  # the client's mm is gone: ESRCH
            client.copy(table["address"], res.source(bytes(PAGE)), PAGE)
        assert isinstance(gone.value, OSError)
