"""The fake ends of the in-memory world: a source server, a destination loop, a pipe.

Theory of operation
-------------------
h11's ``ConnectionPair`` idea, grown to what postcopy needs (the world that
joins these is :mod:`core_pump`):

* :class:`Pipe`: one channel (urgent or background) as two byte streams,
  encoded with :mod:`aiopostcopy.transport.wire` and fed to a fresh
  ``Decoder`` per connection, in pieces of any size.  It can be *cut*: bytes
  in flight are lost and both sides are told; *reconnecting* starts a new
  connection with the destination's Hello (and, like the real loop, the
  destination may send its Resume straight away).
* :class:`FakeSource`: the source server.  Page ``p`` of block ``b`` holds a
  pattern naming ``(b, p, version)``; a quarter of the pages are zero;
  discarding bumps the version (the memory changed).  It splits each run
  into Zero and Pages messages, like the real server.
* :class:`FakeDestination`: the destination loop.  Memory is a dict
  ``(block, page) -> bytes``.  Threads of several fds fault on addresses of
  their own mapping tables; a fault blocks the thread and queues a message
  that the loop reads later (faults are read late, as in the kernel).
  UFFDIO_COPY wakes blocked threads of the service's own fd; Wake releases
  client threads; a thread released before its page is in memory faults
  again (counted in ``early_wakes``).  Placements may be deferred, as if run
  on another thread.

Invariants are checked as things happen (a page placed twice, a request for
a page already in flight, a NotifyPlaced for a page not in memory, ...) and
by ``World.check_final``.
"""

from __future__ import annotations

import random
import struct
from collections import defaultdict

from aiopostcopy import messages as m
from aiopostcopy.core import (Abort, DestinationConfig, DestinationSession, DiscardPages,
                              MappingTable, MigrationComplete, NotifyPlaced, Place, PlaceZero,
                              SourceConfig, SourceSession, UnknownFault, Wake)
from aiopostcopy.transport.wire import Decoder, migration_allowed

PAGE = 4096
URGENT, BACKGROUND = m.Channel.URGENT, m.Channel.BACKGROUND
OWN = "own"


def page_content(block: int, page: int, version: int) -> bytes:
    """The source's page: zero for a quarter of the pages (version 0), else a pattern."""
    if version == 0 and (block * 31 + page) % 4 == 0:
        return bytes(PAGE)
    return struct.pack("<III", block, page, version) * (PAGE // 12) + bytes(PAGE % 12)


def allowed(receiver: m.Role, channel: m.Channel) -> frozenset[type]:
    """What the wire lets ``receiver`` get on ``channel``, as the real decoders are built.

    The sessions send Discard on both channels (see aiopostcopy.core.session,
    "Discards"); until wire.py's table lists Discard for the destination's
    background channel, it is added here.
    """
    types = migration_allowed(receiver, channel)
    if receiver is m.Role.DESTINATION:
        types |= {m.Discard}
    return types


class Pipe:
    """One channel: two byte streams and a decoder at each end."""

    def __init__(self, channel: m.Channel) -> None:
        self.channel = channel
        self.connected = False
        self.to_source = bytearray()
        self.to_dest = bytearray()
        self.connect()
        self.connected = False

    def connect(self) -> None:
        self.connected = True
        self.to_source.clear()
        self.to_dest.clear()
        self.source_decoder = Decoder(allowed=allowed(m.Role.SOURCE, self.channel))
        self.dest_decoder = Decoder(allowed=allowed(m.Role.DESTINATION, self.channel))

    def cut(self) -> None:
        self.connected = False
        self.to_source.clear()
        self.to_dest.clear()

    #: largest piece delivered at once by a random step (1: byte by byte)
    piece = 3 * PAGE

    def take(self, buffer: bytearray, rng: random.Random, whole: bool) -> list[bytes]:
        """Pieces from the front of ``buffer``: one random piece, or all of it in pieces."""
        pieces = []
        while buffer and (whole or not pieces):
            size = rng.randint(1, min(len(buffer), self.piece))
            pieces.append(bytes(buffer[:size]))
            del buffer[:size]
        return pieces


class FakeSource:
    """The source server around a SourceSession."""

    def __init__(self, blocks: tuple[m.BlockInfo, ...], config: SourceConfig) -> None:
        self.blocks = blocks
        self.session = SourceSession(blocks=blocks, config=config)
        self.version: dict[tuple[int, int], int] = defaultdict(int)

    def content(self, block: int, page: int) -> bytes:
        return page_content(block, page, self.version[(block, page)])

    def messages_for(self, run: m.PageRun) -> tuple[list[m.Message], int]:
        """Split a run into Zero/Pages messages; returns them and the payload bytes."""
        out: list[m.Message] = []
        nbytes = 0
        page = run.first
        while page < run.stop:
            zero = self.content(run.block, page) == bytes(PAGE)
            end = page + 1
            while end < run.stop and (self.content(run.block, end) == bytes(PAGE)) == zero:
                end += 1
            if zero:
                out.append(m.Zero(block=run.block, first=page, count=end - page))
            else:
                data = b"".join(self.content(run.block, p) for p in range(page, end))
                out.append(m.Pages(block=run.block, first=page, count=end - page, data=data))
                nbytes += len(data)
            page = end
        return out, nbytes

    def discard(self, block: int, first: int, count: int) -> None:
        for page in range(first, first + count):
            self.version[(block, page)] += 1
        self.session.discard(block, first, count)


class FakeDestination:
    """The destination loop around a DestinationSession, with fds, threads and memory."""

    def __init__(self, config: DestinationConfig, rng: random.Random, defer: float) -> None:
        self.session = DestinationSession(session_id="pump", config=config)
        self.rng = rng
        self.defer = defer
        self.memory: dict[tuple[int, int], bytes] = {}
        self.tables: dict[str, MappingTable] = {}
        self.woken_by_copy: set[str] = set()
        self.blocked: dict[tuple[str, int], tuple[int, int]] = {}  # (key, tid) -> (address, block/page)
        self.queued_faults: dict[str, list[tuple[int, int]]] = defaultdict(list)
        self.retired: set[str] = set()
        self.self_served: dict[str, set[tuple[int, int]]] = {}  # pages waited for
        self.self_asked: dict[str, set[tuple[int, int]]] = defaultdict(set)  # ever asked for
        self.deferred: list[tuple[int, int, int, bytes | None]] = []
        self.completes = 0
        self.early_wakes = 0
        self.unknown_faults: list[UnknownFault] = []
        self.aborts: list[Abort] = []
        self.placements: dict[tuple[int, int], int] = defaultdict(int)
        self.discards: dict[tuple[int, int], int] = defaultdict(int)
        self.next_tid = 1

    # ---------------------------------------------------------------- faults

    def add_fd(self, key: str, table: MappingTable, *, woken_by_copy: bool = False) -> None:
        self.tables[key] = table
        self.session.add_fd(key, table, woken_by_copy=woken_by_copy)
        if woken_by_copy:
            self.woken_by_copy.add(key)

    def touch(self, key: str, address: int) -> None:
        """A new thread of ``key`` touches ``address``: faults if the page is missing."""
        where = self.tables[key].translate(address)
        if where is not None and where in self.memory:
            return
        tid = self.next_tid
        self.next_tid += 1
        if where is not None:
            self.blocked[(key, tid)] = (address, *where)
        self.queued_faults[key].append((address, tid))

    def read_faults(self, key: str, now: float) -> None:
        for address, tid in self.queued_faults.pop(key, []):
            self.session.fault_received(key, address, tid, now)

    def release(self, key: str, start: int, length: int) -> None:
        for (fd, tid), (address, block, page) in list(self.blocked.items()):
            if fd == key and start <= address < start + length:
                del self.blocked[(fd, tid)]
                if (block, page) not in self.memory:  # the kernel faults it again
                    self.early_wakes += 1
                    self.blocked[(fd, tid)] = (address, block, page)
                    self.queued_faults[fd].append((address, tid))

    def retire(self, key: str, now: float) -> None:
        self.session.retire(key, now)
        self.retired.add(key)
        self.queued_faults.pop(key, None)
        for fd, tid in list(self.blocked):
            if fd == key:
                del self.blocked[(fd, tid)]
        self.self_served.pop(key, None)

    def client_request(self, key: str, runs: list[m.PageRun], now: float) -> None:
        pages = {(run.block, p) for run in runs for p in range(run.first, run.stop)}
        self.self_served[key].update(pages)
        self.self_asked[key].update(pages)
        self.session.client_request(key, runs, now)

    # ---------------------------------------------------------------- commands

    def run_commands(self, msg: m.Message | None, now: float) -> None:
        while True:
            commands = self.session.commands()
            if not commands:
                return
            for command in commands:
                self.carry_out(command, msg, now)

    def carry_out(self, command: object, msg: m.Message | None, now: float) -> None:
        kind = type(command)
        if kind is Place:
            assert isinstance(msg, m.Pages) and msg.data is not None
            start = command.payload_offset * PAGE
            self.place(command.block, command.first, command.count,
                       bytes(msg.data[start:start + command.count * PAGE]), now)
        elif kind is PlaceZero:
            self.place(command.block, command.first, command.count, None, now)
        elif kind is Wake:
            assert command.key not in self.retired, "wake for a retired fd"
            self.release(command.key, command.start, command.length)
        elif kind is NotifyPlaced:
            self.notified(command)
        elif kind is DiscardPages:
            for page in range(command.first, command.first + command.count):
                assert self.memory.pop((command.block, page), None) is not None, "discard of an absent page"
                self.discards[(command.block, page)] += 1
        elif kind is UnknownFault:
            self.unknown_faults.append(command)
        elif kind is MigrationComplete:
            self.completes += 1
        elif kind is Abort:
            self.aborts.append(command)

    def place(self, block: int, first: int, count: int, data: bytes | None, now: float) -> None:
        if self.rng.random() < self.defer:
            self.deferred.append((block, first, count, data))
        else:
            self.finish_place(block, first, count, data, now)

    def finish_place(self, block: int, first: int, count: int, data: bytes | None, now: float) -> None:
        for index in range(count):
            key = (block, first + index)
            assert key not in self.memory, f"page {key} placed twice"
            self.memory[key] = bytes(PAGE) if data is None else data[index * PAGE:(index + 1) * PAGE]
            self.placements[key] += 1
        for fd in self.woken_by_copy:  # UFFDIO_COPY wakes the range it copied, in its own mapping
            for address, length in self.tables[fd].ranges(block, first, count):
                self.release(fd, address, length)
        self.session.placed(block, first, count, now)

    def finish_deferred(self, now: float, all_of_them: bool = False) -> None:
        while self.deferred:
            index = 0 if all_of_them else self.rng.randrange(len(self.deferred))
            self.finish_place(*self.deferred.pop(index), now)
            self.run_commands(None, now)
            if not all_of_them:
                return

    def notified(self, command: NotifyPlaced) -> None:
        waiting = self.self_served.get(command.key)
        assert waiting is not None, "NotifyPlaced for an unknown client"
        for run in command.runs:
            for page in range(run.first, run.stop):
                assert (run.block, page) in self.memory, "NotifyPlaced before the page is in"
                assert (run.block, page) in self.self_asked[command.key], "NotifyPlaced unasked"
                waiting.discard((run.block, page))

