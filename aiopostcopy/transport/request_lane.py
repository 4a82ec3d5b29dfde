"""The destination's request and reply lanes: a fault's Request written and its answer placed
in C, each before the session's bookkeeping.

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

The lane remembers, for each page it asked for, the fd the fault was read
from and the page's address in that fd's space (a table of RQ_PENDING slots;
a newer page may take an older page's slot, which then goes the usual way).
When bytes arrive on the urgent channel, :meth:`RequestLane.place` (``rq_place``)
reads the answers at their front: a one-page Pages frame in the form the source
writes, for a page still REQUESTED whose fault it remembers, is placed with one
UFFDIO_COPY through that fd at that address, straight from the receive buffer;
a one-page Zero frame the same way, from the lane's zero page
(:meth:`RequestLane.set_zero_page`; about one page in seven of a guest's memory
is zeros, and the source sends those as Zero).
The copy puts the page in the shared memory and wakes the faulting thread;
the caller then accounts it in the session
(:meth:`~aiopostcopy.core.session.DestinationSession.placed_through`), which
wakes any other waiter, and the decoder skips the frame.  Anything else (another
message, a copy that fails) stops it, and the decoder decodes it as before.
Pages the session asks for itself (a self-served client's, faults queued behind
others) are remembered too, with the service's own fd and mapping, and their
answers are placed the same way: a self-served client's ClientRequest has its
Request written here as well, before the session accounts it
(:meth:`RequestLane.ask_runs`, ``rq_ask_runs``: the one-page runs of MISSING
pages, by the same rules as ``send``), a queued fault's page only remembered
(:meth:`RequestLane.remember`).
The caller forgets an fd (:meth:`RequestLane.forget`) before closing it and
when its mappings change (a remap, remove or unmap event), so no answer is
placed through a stale fd or address.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

from aiopostcopy.core.pages import MISSING, REQUESTED
from aiopostcopy.core.ramblock import MappingTable
from aiopostcopy.transport import page_server

__all__ = ["MAX_ASK", "PLACE_BATCH", "RequestLane", "available", "encode_requests"]

ffi, lib = page_server.ffi, page_server.lib

#: Answers placed by one :meth:`RequestLane.place` call, at most.
PLACE_BATCH = 64
#: Pages of one Request :meth:`RequestLane.ask_runs` writes, and runs it looks at, at most (RQ_MAX_PAGES).
MAX_ASK = lib.RQ_MAX_PAGES if lib is not None else 0


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

    __slots__ = ("_keep", "_lane", "_asked", "_frame", "_lengths", "_tables", "_code", "_placed", "_consumed",
                 "_bases", "_largest", "_runs")

    def __init__(self, states: Sequence[bytearray], page_sizes: Sequence[int], pagefault_code: int) -> None:
        if lib is None:
            raise RuntimeError("the request lane is not built (run make)")
        if (lib.RQ_MISSING, lib.RQ_REQUESTED) != (MISSING, REQUESTED):
            raise RuntimeError("the C lane's page states differ from aiopostcopy.core.pages: rebuild it")
        views = [ffi.from_buffer(state) for state in states]
        state_ptrs = ffi.new("uint8_t *[]", views)
        pages = ffi.new("uint64_t[]", [len(state) for state in states])
        sizes = ffi.new("uint64_t[]", list(page_sizes))
        pending = ffi.new("struct rq_pending[]", lib.RQ_PENDING)
        for slot in pending:
            slot.uffd = -1
        lane = ffi.new("struct rq_lane *")
        lane.states, lane.pages, lane.page_size, lane.nblocks = state_ptrs, pages, sizes, len(states)
        lane.pending = pending
        self._keep = (states, views, state_ptrs, pages, sizes, pending)
        self._placed = ffi.new("uint64_t[]", lib.RQ_PLACED_FIELDS * PLACE_BATCH)
        self._consumed = ffi.new("size_t *")
        self._lane = lane
        self._asked = ffi.new("uint64_t[]", 2 * lib.RQ_MAX_PAGES)
        self._runs = ffi.new("uint64_t[]", 3 * lib.RQ_MAX_PAGES)  # a ClientRequest's runs, for ask_runs
        self._frame = ffi.new("uint8_t[]", lib.RQ_FRAME_BYTES)
        self._lengths = ffi.new("int[2]")
        self._tables: dict[Hashable, tuple[object, object, int]] = {}
        self._code = pagefault_code
        self._bases = ffi.new("uint64_t[]", len(states) or 1)  # each block's address in the service's mapping
        self._largest = max(page_sizes, default=0)

    def forget(self, key: Hashable, uffd: int) -> None:
        """Drop what is kept for fd ``key`` (number ``uffd``): it is retired, or its mappings
        changed (a remap, remove or unmap event), so no answer is placed through it here."""
        self._tables.pop(key, None)
        lib.rq_forget_fd(self._lane, uffd)

    def remember(self, block: int, page: int, uffd: int, address: int) -> None:
        """Remember that ``page`` of ``block`` is asked for by a Request the lane did not write
        (a queued fault, a self-served client's request): its answer is placed through fd
        ``uffd`` at ``address``, the page's address in that fd's space (the service's own)."""
        lib.rq_remember(self._lane, block, page, address, uffd)

    def set_own_mapping(self, addresses: Sequence[int]) -> None:
        """Each block's address in the service's own mapping, where :meth:`ask_runs` places answers."""
        for block, address in enumerate(addresses):
            self._bases[block] = address

    def ask_runs(self, sock: int, uffd: int, runs: Sequence[tuple[int, int, int]],
                 budget: int) -> tuple[list[tuple[int, int]], bytes]:
        """Write the Request of a self-served client's faults on ``sock`` (nothing queued ahead of
        it) before the session accounts them, as :meth:`send` does for a delegated fd's read.

        Of ``runs`` (a ClientRequest's, ``(block, first, count)``; the first :data:`MAX_ASK`
        looked at), each one-page run of a MISSING page inside the blocks is asked for, once, at
        most ``budget`` of them, and remembered as placed through ``uffd``, the service's own
        fd, at the page's address in the service's mapping (:meth:`set_own_mapping`).

        Returns:
            As :meth:`send`: the ``(block, page)`` pairs in the Request, in its order, and the
            bytes of the frame the socket did not take.
        """
        count, flat = min(len(runs), MAX_ASK), self._runs
        for i in range(count):
            flat[3 * i], flat[3 * i + 1], flat[3 * i + 2] = runs[i]
        lengths = self._lengths
        n = lib.rq_ask_runs(self._lane, sock, uffd, self._bases, flat, count, budget, self._asked, self._frame,
                            lengths, lengths + 1)
        return self._written(n, lengths)

    def set_zero_page(self, address: int, size: int) -> None:
        """Place one-page Zero answers too, copying from ``size`` zero bytes at ``address``,
        which stay mapped while the lane lives and cover the largest page of the blocks."""
        if size < self._largest:
            raise ValueError(f"a zero page of {size} bytes is smaller than the largest page ({self._largest})")
        self._lane.zero_page = ffi.cast("const uint8_t *", address)

    def remembered(self, uffd: int) -> int:
        """How many requested pages' faults read from fd ``uffd`` are remembered (for tests and
        checks: 0 once the fd is forgotten)."""
        return sum(1 for slot in self._keep[5] if slot.uffd == uffd)

    def send(self, sock: int, key: Hashable, uffd: int, table: MappingTable, slots_address: int, count: int,
             budget: int) -> tuple[list[tuple[int, int]], bytes]:
        """Write the Request of a read's faults on ``sock``.

        Args:
            sock: the urgent connection's socket (nothing queued ahead of it).
            key, uffd, table: the fd's key, its number and its mapping table (kept in C form
                for ``key`` until the table object changes).  Each page asked for is remembered
                with the fault's fd and page address, for :meth:`place`.
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
        n = lib.rq_send(self._lane, sock, uffd, ffi.cast("uint64_t *", slots_address), count, self._code,
                        kept[1], kept[2], budget, self._asked, self._frame, lengths, lengths + 1)
        return self._written(n, lengths)

    def _written(self, n: int, lengths) -> tuple[list[tuple[int, int]], bytes]:
        """The pages a C call asked for (``n`` of them) and the bytes of its frame left unsent."""
        if n <= 0:
            return [], b""
        asked_c, sent, length = self._asked, lengths[1], lengths[0]
        if n == 1:  # the usual read: one fault
            asked = [(asked_c[0], asked_c[1])]
        else:
            values = ffi.unpack(asked_c, 2 * n)
            asked = list(zip(values[0::2], values[1::2]))
        return asked, (bytes(ffi.buffer(self._frame, length)[sent:]) if sent < length else b"")

    def place(self, buffer: bytearray, start: int, end: int) -> tuple[list[tuple[int, int, int, int, int]], int]:
        """Place the answers at the front of ``buffer[start:end]`` (the urgent channel's bytes,
        from a frame's start) with UFFDIO_COPY through the fds their faults were read from.

        Only one-page Pages frames in the form the source writes (and one-page Zero frames,
        once :meth:`set_zero_page` gave their source), for REQUESTED pages whose fault
        :meth:`send` remembers, and only while each copy places the whole page; the first
        other frame (or failed copy) ends it, and its bytes are left in ``buffer``.

        Returns:
            ``(placed, consumed)``: ``(block, page, uffd, address, zero)`` of each page placed
            (the thread that faulted on it at ``address`` in fd ``uffd``'s space is woken;
            ``zero`` is 1 for a Zero answer), and the bytes of their frames, which the caller
            skips.  The page states are not changed: the caller accounts the pages in the
            session at once.
        """
        n = lib.rq_place(self._lane, ffi.from_buffer("uint8_t[]", buffer) + start, end - start, self._placed,
                         PLACE_BATCH, self._consumed)
        if n <= 0:
            return [], 0
        placed_c, fields = self._placed, lib.RQ_PLACED_FIELDS
        if n == 1:  # the usual read: one answer
            return [(placed_c[0], placed_c[1], placed_c[2], placed_c[3], placed_c[4])], self._consumed[0]
        values = ffi.unpack(placed_c, fields * n)
        return [tuple(values[i:i + fields]) for i in range(0, fields * n, fields)], self._consumed[0]  # type: ignore[misc]
