"""A self-served client's lane: its fault path's per-page steps in C.

A self-served client's pager thread is the path of every fault its threads
take: it reads the faults from its userfaultfd, asks the service for their
pages in a ClientRequest, and wakes the threads when a Placed says the pages
are in.  In Python each fault cost its thread about as much CPU as the
service's whole handling of it, and that CPU is taken from the service and the
other clients on a busy host.  :class:`ClientLane` does the per-page steps in
one C call each (GIL released), over the pager's state byte per page
(:class:`~aiopostcopy.core.pager.ClientPages`):

* :meth:`ClientLane.faults` (``cl_faults``) takes the flattened messages of
  one read: it translates each page fault's address with the client's mapping
  table, makes a page nobody asked for ASKED and encodes their ClientRequest
  frame (byte for byte what
  :func:`~aiopostcopy.transport.wire.encode_client_request` makes of the same
  pages), counts a page asked for already as joined, and sends a page known
  placed that faults again (dropped since) back to NONE with its range to wake.
  It stops at the first message that is not a page fault or whose address no
  mapping covers; the caller decodes those the usual way.
* :meth:`ClientLane.placed` (``cl_placed``) takes the control socket's bytes
  at a frame's start: while they are Placed frames of at most 15 runs, each
  inside the blocks, in the form the service writes, their pages become
  KNOWN_PLACED and each run is woken with UFFDIO_WAKE.  Anything else stops
  it, and the decoder decodes (and rejects, if it is bad) what is left.

The caller writes the frame (it holds the channel's send lock) and uses the
lane only while the pager queues nothing, so every fault read is asked for at
once, as :meth:`~aiopostcopy.core.pager.Pager.take_pages` would ask for it.
The lane keeps the counts of the faults and pages it handled (:meth:`totals`);
the pager keeps the rest, and its in-flight count learns of the lane's pages
(:meth:`~aiopostcopy.core.pager.Pager.lane_took`,
:meth:`~aiopostcopy.core.pager.Pager.lane_settled`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from aiopostcopy.core.pager import ASKED, KNOWN_PLACED, NONE, QUEUED
from aiopostcopy.core.ramblock import MappingTable
from aiopostcopy.errors import UffdError
from aiopostcopy.transport import page_server

__all__ = ["ClientLane", "MAX_PLACED_RUNS", "available"]

ffi, lib = page_server.ffi, page_server.lib

#: Runs of Placed frames one :meth:`ClientLane.placed` call takes, at most.
MAX_PLACED_RUNS = 256
#: Messages of one read :meth:`ClientLane.faults` takes, at most.
MAX_MESSAGES = 64
_TOTALS = ("faults", "joined", "woken_at_once", "requested_pages", "requests", "placed_pages", "wakes")


def available() -> bool:
    """The C side was built from the sources of this version."""
    return lib is not None


class ClientLane:
    """One self-served client's lane over its pager's page states.

    Args:
        states: each block's state bytes (the pager's), kept alive and never resized while the
            lane lives.
        table: where this process maps the blocks, each block whole and once (the pager's).
        uffd: the client's userfaultfd, through which placed runs are woken.
        pagefault_code: the slot value of a flattened page fault
            (:data:`aiopostcopy.uffd.events.PAGEFAULT_CODE`).
    """

    __slots__ = ("_keep", "_lane", "_code", "_asked", "_wakes", "_tids", "_counts", "_frame", "_lengths",
                 "_runs", "_settled", "_consumed", "_fds", "_truncated", "_wake_error")

    def __init__(self, states: Sequence[bytearray], table: MappingTable, uffd: int, pagefault_code: int) -> None:
        if lib is None:
            raise RuntimeError("the client lane is not built (run make)")
        if (lib.CL_NONE, lib.CL_QUEUED, lib.CL_ASKED, lib.CL_KNOWN_PLACED) != (NONE, QUEUED, ASKED, KNOWN_PLACED):
            raise RuntimeError("the C lane's page states differ from aiopostcopy.core.pager: rebuild it")
        blocks = table.blocks
        bases = []
        for index, block in enumerate(blocks):
            address = table.address_of(index, 0)
            if address is None or table.ranges(index, 0, block.pages) != [(address, block.pages * block.page_size)]:
                raise ValueError(f"block {block.name!r} is not mapped whole, once")
            bases.append(address)
        views = [ffi.from_buffer(state) for state in states]
        state_ptrs = ffi.new("uint8_t *[]", views or 1)
        pages = ffi.new("uint64_t[]", [block.pages for block in blocks] or [0])
        sizes = ffi.new("uint64_t[]", [block.page_size for block in blocks] or [0])
        base = ffi.new("uint64_t[]", bases or [0])
        flat = ffi.new("uint64_t[]", [value for entry in table.entries for value in entry] or [0])
        lane = ffi.new("struct cl_lane *")
        lane.states, lane.pages, lane.page_size, lane.base, lane.nblocks = state_ptrs, pages, sizes, base, len(blocks)
        lane.table, lane.ntable, lane.uffd = flat, len(table.entries), uffd
        self._keep = (states, views, state_ptrs, pages, sizes, base, flat)
        self._lane = lane
        self._code = pagefault_code
        self._asked = ffi.new("uint64_t[]", 2 * lib.RQ_MAX_PAGES)
        self._wakes = ffi.new("uint64_t[]", 2 * MAX_MESSAGES)
        self._tids = ffi.new("uint64_t[]", MAX_MESSAGES)
        self._counts = ffi.new("uint32_t[2]")
        self._frame = ffi.new("uint8_t[]", lib.RQ_FRAME_BYTES)
        self._lengths = ffi.new("int[2]")  # a frame's bytes, and those the socket took
        self._runs = ffi.new("uint64_t[]", 3 * MAX_PLACED_RUNS)
        self._settled = ffi.new("uint64_t *")
        self._consumed = ffi.new("size_t *")
        self._fds = ffi.new("int[]", lib.CL_MAX_FDS)
        self._truncated = ffi.new("int *")
        self._wake_error = ffi.new("int *")

    def faults(self, slots_address: int, count: int, sock: int = -1) -> tuple[int, list[tuple[int, int]], bytes,
                                                                           list[tuple[int, int]], list[int]]:
        """Take the page faults at the front of one read's flattened messages.

        Args:
            slots_address, count: the read's messages, as the uffd binding flattened them
                (:attr:`~aiopostcopy.uffd.userfaultfd.Userfaultfd.slots_address`), at most
                :data:`MAX_MESSAGES`.
            sock: where to ``send()`` their ClientRequest frame without blocking (the control
                socket, with every other writer held off and nothing queued ahead), or -1.

        Returns:
            ``(taken, asked, rest, wakes, thread_ids)``: how many messages were taken (from
            the first; the rest begin with one the caller decodes), the ``(block, page)``
            pairs made ASKED, in the order faulted, the bytes of their ClientRequest frame the
            socket did not take (the whole frame without ``sock``, or when ``send()`` failed;
            empty when nothing was asked for), the ``(address, length)`` ranges of pages known
            placed that faulted again (NONE again: the caller wakes them), and the thread id
            of each fault taken.
        """
        if not 0 <= count <= MAX_MESSAGES:
            raise ValueError(f"{count} messages: the lane takes at most {MAX_MESSAGES} at once")
        counts, lengths = self._counts, self._lengths
        taken = lib.cl_faults(self._lane, ffi.cast("uint64_t *", slots_address), count, self._code, self._asked,
                              counts, self._wakes, counts + 1, self._tids, self._frame, lengths, sock, lengths + 1)
        nasked, nwakes = counts[0], counts[1]
        asked_c = self._asked
        if nasked == 1:  # the usual read: one fault
            asked = [(asked_c[0], asked_c[1])]
        elif nasked:
            values = ffi.unpack(asked_c, 2 * nasked)
            asked = list(zip(values[0::2], values[1::2]))
        else:
            asked = []
        length, sent = lengths[0], lengths[1]
        rest = ffi.buffer(self._frame, length)[sent:] if sent < length else b""
        wakes: list[tuple[int, int]] = []
        if nwakes:
            values = ffi.unpack(self._wakes, 2 * nwakes)
            wakes = list(zip(values[0::2], values[1::2]))
        return taken, asked, rest, wakes, ffi.unpack(self._tids, taken) if taken else []

    def placed(self, buffer: bytearray, start: int, end: int) -> tuple[int, int, list[tuple[int, int, int]]]:
        """Take the Placed frames at the front of ``buffer[start:end]`` (the control socket's bytes,
        from a frame's start): their pages become KNOWN_PLACED and each run is woken.

        Returns:
            ``(consumed, settled, runs)``: the bytes of the frames taken (the caller skips
            them), how many of their pages were ASKED, and their runs ``(block, first,
            count)``.

        Raises:
            UffdError: a wake failed (the runs of that frame up to it are marked; the client fails).
            ValueError: ``start`` and ``end`` are not within ``buffer``.
        """
        if not 0 <= start <= end <= len(buffer):
            raise ValueError(f"bytes [{start}, {end}) of a buffer of {len(buffer)}")
        rc = lib.cl_placed(self._lane, ffi.from_buffer("uint8_t[]", buffer) + start, end - start, self._runs,
                           MAX_PLACED_RUNS, self._counts, self._settled, self._consumed)
        if rc < 0:
            raise UffdError(-rc, f"UFFDIO_WAKE of a placed run: {os.strerror(-rc)}")
        return self._consumed[0], self._settled[0], self._runs_taken(self._counts[0])

    def receive(self, sock: int, buffer: memoryview) -> tuple[int, int, int, list[int], bool,
                                                            list[tuple[int, int, int]]]:
        """One ``recvmsg`` of the control socket into ``buffer`` (the decoder holds nothing, so
        the bytes begin a frame), then :meth:`placed` over them when no descriptors came along.

        Returns:
            ``(got, consumed, settled, fds, truncated, runs)``: the bytes received (0: the peer
            closed; ``-errno`` when the call failed, ``-EAGAIN``: nothing there), the bytes of
            the Placed frames taken, how many of their pages were ASKED, the descriptors
            received (the caller owns them), whether the kernel had more than fitted, and the
            runs taken.

        Raises:
            UffdError: a wake failed (the runs of that frame up to it are marked; the client fails).
        """
        counts = self._counts
        got = lib.cl_receive(self._lane, sock, ffi.from_buffer("uint8_t[]", buffer, require_writable=True),
                             len(buffer), self._fds, lib.CL_MAX_FDS, counts, self._truncated, self._runs,
                             MAX_PLACED_RUNS, counts + 1, self._settled, self._consumed, self._wake_error)
        if self._wake_error[0]:
            raise UffdError(-self._wake_error[0], f"UFFDIO_WAKE of a placed run: {os.strerror(-self._wake_error[0])}")
        fds = ffi.unpack(self._fds, counts[0]) if counts[0] else []
        return got, self._consumed[0], self._settled[0], fds, bool(self._truncated[0]), self._runs_taken(counts[1])

    def _runs_taken(self, count: int) -> list[tuple[int, int, int]]:
        """The first ``count`` runs the last call took, as ``(block, first, count)``."""
        runs = self._runs
        if count == 1:  # the usual read: one Placed of one run
            return [(runs[0], runs[1], runs[2])]
        values = ffi.unpack(runs, 3 * count) if count else []
        return list(zip(values[0::3], values[1::3], values[2::3]))

    def totals(self) -> dict[str, int]:
        """The lane's counts since it was made, named as the pager's statistics name them
        (``faults``, ``joined``, ``woken_at_once``, ``requested_pages``, ``requests``,
        ``placed_pages``, ``wakes``)."""
        lane = self._lane
        return {name: getattr(lane, name) for name in _TOTALS}
