"""The destination's request lane: a fault's Request written in C, before the bookkeeping.

A fault read from a userfaultfd is a thread stopped until its page arrives, so
the Request for the page should leave before anything else is done with it.
:meth:`RequestLane.send` takes the messages of one read, as the uffd binding
flattened them, and in one C call (``rq_send``, GIL released):

* translates each page fault's address with the fd's mapping table,
* keeps the pages whose state byte is MISSING, each once, at most ``budget``,
* encodes one Request frame for them, byte for byte what
  :func:`~aiopostcopy.transport.wire.encode_page_requests` makes of the same
  pages, and
* ``send()``\\ s it on the urgent socket without blocking.

It changes no state and decides nothing the session does not decide again: the
caller then hands the same faults to the session the usual way, which makes the
pages REQUESTED, records the waiters and counts them, and sends (the usual way)
any page the session asks for that the lane did not.  A page the lane asked for
and the session did not is answered anyway and placed as a page nobody asked
for: a wasted answer, never a wrong page.

The caller may use the lane only when a frame written on the socket now keeps
the channel's order: the urgent connection is a plain socket (not TLS) with
nothing queued in its transport, and the session would send a fault's Request
at once (:meth:`~aiopostcopy.core.session.DestinationSession.lane_budget`).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

from aiopostcopy.core.ramblock import MappingTable
from aiopostcopy.transport import page_server

__all__ = ["RequestLane", "available", "encode_requests"]

ffi, lib = page_server.ffi, page_server.lib


def available() -> bool:
    """The C side was built from the sources of this version."""
    return lib is not None


def encode_requests(pages: Sequence[tuple[int, int]]) -> bytes:
    """The C encoder's Request frame for ``(block, page)`` pairs (at most RQ_MAX_PAGES), for tests."""
    asked = ffi.new("uint64_t[]", [value for pair in pages for value in pair] or [0])
    frame = ffi.new("uint8_t[]", lib.RQ_FRAME_BYTES)
    length = lib.rq_encode(asked, len(pages), frame)
    if length < 0:
        raise ValueError(f"{len(pages)} pages: more than one Request of the lane holds ({lib.RQ_MAX_PAGES})")
    return bytes(ffi.buffer(frame, length))


class RequestLane:
    """One destination's request lane over its blocks' page states.

    Args:
        states: each block's state bytes (:attr:`~aiopostcopy.core.pages.PageStates.buffer`),
            kept alive and never resized while the lane lives.
        page_sizes: bytes per page of each block.
        pagefault_code: the slot value of a flattened page fault
            (:data:`aiopostcopy.uffd.events.PAGEFAULT_CODE`).
    """

    __slots__ = ("_keep", "_lane", "_asked", "_frame", "_lengths", "_tables", "_code")

    def __init__(self, states: Sequence[bytearray], page_sizes: Sequence[int], pagefault_code: int) -> None:
        if lib is None:
            raise RuntimeError("the request lane is not built (run make)")
        views = [ffi.from_buffer(state) for state in states]
        state_ptrs = ffi.new("uint8_t *[]", views)
        pages = ffi.new("uint64_t[]", [len(state) for state in states])
        sizes = ffi.new("uint64_t[]", list(page_sizes))
        lane = ffi.new("struct rq_lane *")
        lane.states, lane.pages, lane.page_size, lane.nblocks = state_ptrs, pages, sizes, len(states)
        self._keep = (states, views, state_ptrs, pages, sizes)
        self._lane = lane
        self._asked = ffi.new("uint64_t[]", 2 * lib.RQ_MAX_PAGES)
        self._frame = ffi.new("uint8_t[]", lib.RQ_FRAME_BYTES)
        self._lengths = ffi.new("int[2]")
        self._tables: dict[Hashable, tuple[object, object, int]] = {}
        self._code = pagefault_code

    def forget(self, key: Hashable) -> None:
        """Drop the table kept for ``key`` (its fd is retired)."""
        self._tables.pop(key, None)

    def send(self, sock: int, key: Hashable, table: MappingTable, slots_address: int, count: int,
             budget: int) -> tuple[list[tuple[int, int]], bytes]:
        """Write the Request of a read's faults on ``sock``.

        Args:
            sock: the urgent connection's socket (nothing queued ahead of it).
            key, table: the fd's key and its mapping table (kept in C form for ``key`` until
                the table object changes).
            slots_address, count: the read's flattened messages
                (:attr:`~aiopostcopy.uffd.userfaultfd.Userfaultfd.slots_address`).
            budget: pages the lane may ask for (0: none).

        Returns:
            ``(asked, rest)``: the ``(block, page)`` pairs in the Request, in its order, and
            the bytes of the frame the socket did not take (the caller writes them next;
            all of it when ``send`` failed).
        """
        kept = self._tables.get(key)
        if kept is None or kept[0] is not table:
            entries = table.entries  # (address, length, block, offset), sorted by address
            flat = ffi.new("uint64_t[]", [value for entry in entries for value in entry] or [0])
            kept = self._tables[key] = (table, flat, len(entries))
        lengths = self._lengths
        n = lib.rq_send(self._lane, sock, ffi.cast("uint64_t *", slots_address), count, self._code,
                        kept[1], kept[2], budget, self._asked, self._frame, lengths, lengths + 1)
        if n <= 0:
            return [], b""
        values = ffi.unpack(self._asked, 2 * n)
        asked = list(zip(values[0::2], values[1::2]))
        sent, length = lengths[1], lengths[0]
        return asked, (bytes(ffi.buffer(self._frame, length)[sent:]) if sent < length else b"")
