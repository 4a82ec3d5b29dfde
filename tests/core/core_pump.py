"""The in-memory world: both sessions, both channels, the fakes, and random life.

Theory of operation
-------------------
:class:`World` joins a :class:`~core_fakes.FakeSource` and a
:class:`~core_fakes.FakeDestination` with two :class:`~core_fakes.Pipe`
channels and steps them one random event at a time (a fault, a pass, some
bytes delivered one way, a run served, a channel cut or reconnected, a
discard, an fd retired, time passing).  :meth:`World.drain` then lets it run
without new faults until it must be complete, and :meth:`World.check_final`
checks the end state.  See :mod:`core_fakes` for what the fakes check on the way.
"""

from __future__ import annotations

import random

from core_fakes import OWN, PAGE, URGENT, BACKGROUND, FakeDestination, FakeSource, Pipe

from aiopostcopy import messages as m
from aiopostcopy.core import DestinationConfig, MappingTable, SourceConfig
from aiopostcopy.transport.wire import Decoder, encode

__all__ = ["World", "BLOCKS", "BASES", "PAGE", "URGENT", "BACKGROUND", "OWN", "client_tables"]

BLOCKS = (m.BlockInfo(name="ram0", length=96 * PAGE, page_size=PAGE),
          m.BlockInfo(name="ram1", length=40 * PAGE, page_size=PAGE))
BASES = (0x1000_0000, 0x2000_0000)


def client_tables(blocks: tuple[m.BlockInfo, ...]) -> dict[str, tuple[tuple[int, int, int, int], ...]]:
    """Two clients: "a" maps the middle of block 0, all of block 1 and the first half of
    block 1 a second time; "b" maps block 0 whole."""
    zero, one = blocks[0].length // PAGE, blocks[1].length // PAGE
    return {
        "a": ((0x7F00_0000_0000, (zero // 2) * PAGE, 0, (zero // 4) * PAGE),
              (0x7F00_0100_0000, one * PAGE, 1, 0),
              (0x7F00_0200_0000, (one // 2) * PAGE, 1, 0)),
        "b": ((0x5550_0000_0000, zero * PAGE, 0, 0),),
    }


class World:
    """Both sessions, both channels, the fake loop and the fake server; one step at a time.

    Args:
        seed: drives every random choice.
        dest_config / source_config: tuning of the sessions.
        defer: chance that a placement is finished later (another thread).
        loop_sends_resume: after reconnecting the urgent channel, the loop
            sends ``resume_message()`` itself (as loop.py does); otherwise the
            session queues its own Resume when the source's Hello returns.
    """

    def __init__(self, seed: int, *, dest_config: DestinationConfig | None = None,
                 source_config: SourceConfig | None = None, defer: float = 0.0,
                 loop_sends_resume: bool = True, blocks: tuple[m.BlockInfo, ...] = BLOCKS,
                 piece: int = 3 * PAGE) -> None:
        self.rng = random.Random(seed)
        self.now = 0.0
        dest_config = dest_config or DestinationConfig(request_timeout=None, ack_bytes=16 * PAGE)
        self.check_requests = dest_config.request_timeout is None
        self.source = FakeSource(blocks, source_config or SourceConfig(
            max_run_pages=8, background_run_pages=4, background_window_bytes=32 * PAGE))
        self.dest = FakeDestination(dest_config, self.rng, defer)
        self.pipes = {URGENT: Pipe(URGENT), BACKGROUND: Pipe(BACKGROUND)}
        for pipe in self.pipes.values():
            pipe.piece = piece
        self.loop_sends_resume = loop_sends_resume
        self.lost_since_resume = False
        self.resumes_sent = 0  #: Resume messages put on the urgent channel, by the loop or the session
        self.in_flight_requests: set[tuple[int, int]] = set()
        self.discarded_any = False
        for channel in (URGENT, BACKGROUND):
            self.reconnect(channel)
        self.settle()
        assert self.dest.session.blocks is not None

    # ---------------------------------------------------------------- plumbing

    def setup_fds(self) -> None:
        blocks = self.dest.session.blocks
        self.dest.add_fd(OWN, MappingTable.identity(blocks, BASES), woken_by_copy=True)
        for key, entries in client_tables(self.source.blocks).items():
            self.dest.add_fd(key, MappingTable.build(blocks, entries))
        self.dest.session.add_self_served("s")
        self.dest.self_served["s"] = set()

    def reconnect(self, channel: m.Channel) -> None:
        pipe = self.pipes[channel]
        pipe.connect()
        pipe.to_source += encode(self.dest.session.hello(channel))
        if channel is URGENT and self.loop_sends_resume and self.lost_since_resume:
            pipe.to_source += encode(self.dest.session.resume_message(self.now))
            self.resume_sent()
        self.dest_send()

    def resume_sent(self) -> None:
        """One Resume went out: there must have been a loss since the last one."""
        assert self.lost_since_resume, "a Resume without a channel lost since the previous one"
        self.lost_since_resume = False
        self.resumes_sent += 1

    def cut(self, channel: m.Channel) -> None:
        self.pipes[channel].cut()
        self.source.session.connection_lost(channel, self.now)
        self.dest.session.connection_lost(channel, self.now)
        self.lost_since_resume = True

    def dest_send(self) -> None:
        for channel, msg in self.dest.session.messages_to_send():
            if type(msg) is m.Resume:
                assert channel is URGENT, "a Resume on the background channel"
                self.resume_sent()
            if type(msg) is m.Request and self.check_requests:
                for run in msg.runs:
                    for page in range(run.first, run.stop):
                        assert (run.block, page) not in self.in_flight_requests, \
                            f"page {(run.block, page)} requested twice while in flight"
                        self.in_flight_requests.add((run.block, page))
            if self.pipes[channel].connected:
                self.pipes[channel].to_source += encode(msg)

    def source_send(self) -> None:
        for channel, msg in self.source.session.messages_to_send():
            if self.pipes[channel].connected:
                self.pipes[channel].to_dest += encode(msg)

    def deliver_to_source(self, channel: m.Channel, whole: bool = False) -> bool:
        pipe = self.pipes[channel]
        if not pipe.to_source:
            return False
        for piece in pipe.take(pipe.to_source, self.rng, whole):
            pipe.source_decoder.receive_data(piece)
            while (event := pipe.source_decoder.next_event()) is not None:
                self.source.session.message_received(channel, event, self.now)
        self.source_send()
        return True

    def deliver_to_dest(self, channel: m.Channel, whole: bool = False) -> bool:
        pipe = self.pipes[channel]
        if not pipe.to_dest:
            return False
        for piece in pipe.take(pipe.to_dest, self.rng, whole):
            pipe.dest_decoder.receive_data(piece)
            self.dest_events(channel, pipe.dest_decoder)
        self.dest_send()
        return True

    def dest_events(self, channel: m.Channel, decoder: Decoder) -> None:
        while (event := decoder.next_event()) is not None:
            first_hello = self.dest.session.blocks is None
            self.dest.session.message_received(channel, event, self.now)
            if first_hello and self.dest.session.blocks is not None:
                self.setup_fds()
            if type(event) in (m.Pages, m.Zero):
                self.in_flight_requests.difference_update(
                    (event.block, page) for page in range(event.first, event.first + event.count))
            self.dest.run_commands(event, self.now)

    def serve(self, channel: m.Channel) -> bool:
        if not self.pipes[channel].connected:
            return False
        self.source_send()
        session = self.source.session
        run = session.next_urgent() if channel is URGENT else session.next_background()
        if run is None:
            self.source_send()  # a Done may have been queued
            return False
        messages, nbytes = self.source.messages_for(run)
        for msg in messages:
            self.pipes[channel].to_dest += encode(msg)
        session.sent(channel, run, nbytes)
        return True

    def dest_pass(self) -> None:
        for key in list(self.dest.queued_faults):
            if key not in self.dest.retired:
                self.dest.read_faults(key, self.now)
        self.dest.run_commands(None, self.now)
        self.dest.session.flush(self.now)
        self.dest.run_commands(None, self.now)
        self.dest_send()

    def timer(self) -> None:
        due = self.dest.session.get_timer()
        if due is not None and due <= self.now:
            self.dest.session.handle_timer(self.now)
            self.dest.run_commands(None, self.now)
            self.dest_send()

    def settle(self) -> None:
        """Deliver everything in flight and serve until nothing moves (no new faults)."""
        for _ in range(100_000):
            moved = False
            for channel in (URGENT, BACKGROUND):
                moved |= self.deliver_to_source(channel, whole=True)
                moved |= self.deliver_to_dest(channel, whole=True)
            moved |= self.serve(URGENT) or self.serve(BACKGROUND)
            if not moved:
                return
        raise AssertionError("settle() did not settle")

    # ---------------------------------------------------------------- random life

    def random_address(self, key: str) -> int:
        if self.rng.random() < 0.03:
            return 0xDEAD_0000  # mapped nowhere: a bad fault
        table = self.dest.tables[key]
        address, length, _, _ = self.rng.choice(table.entries)
        return address + self.rng.randrange(length)

    def touch(self) -> None:
        keys = [key for key in self.dest.tables if key not in self.dest.retired]
        key = self.rng.choice(keys)
        self.dest.touch(key, self.random_address(key))

    def self_served_request(self) -> None:
        if "s" in self.dest.retired:
            return
        block = self.rng.randrange(len(self.source.blocks))
        pages = self.source.blocks[block].length // PAGE
        first = self.rng.randrange(pages)
        count = self.rng.randint(1, min(6, pages - first))
        self.dest.client_request("s", [m.PageRun(block=block, first=first, count=count)], self.now)
        self.dest.run_commands(None, self.now)

    def step(self, *, cuts: bool, discards: bool, retire: bool) -> None:
        """One random event."""
        self.now += self.rng.uniform(0, 0.002)
        roll = self.rng.random()
        channel = self.rng.choice((URGENT, BACKGROUND))
        if roll < 0.20:
            self.touch()
        elif roll < 0.25:
            self.self_served_request()
        elif roll < 0.40:
            self.dest_pass()
        elif roll < 0.55:
            self.deliver_to_source(channel)
        elif roll < 0.75:
            self.deliver_to_dest(channel)
        elif roll < 0.88:
            self.serve(channel)
        elif roll < 0.92:
            self.dest.finish_deferred(self.now)
        elif roll < 0.94:
            self.timer()
        elif roll < 0.96 and cuts:
            if self.pipes[channel].connected:
                if self.source.session.statistics().discards_unconfirmed == 0 or not self.replay_safe:
                    self.cut(channel)
            elif not self.both_complete():  # like the loop: no reconnecting once done
                self.reconnect(channel)
        elif roll < 0.97 and discards and self.discard_is_safe():
            block = self.rng.randrange(len(self.source.blocks))
            pages = self.source.blocks[block].length // PAGE
            first = self.rng.randrange(pages)
            self.source.discard(block, first, self.rng.randint(1, min(3, pages - first)))
            self.discarded_any = True
        elif roll < 0.975 and retire and "b" not in self.dest.retired:
            self.dest.retire("b", self.now)
        elif roll < 0.98 and retire and "s" not in self.dest.retired and self.rng.random() < 0.3:
            self.dest.retire("s", self.now)

    #: Cut no channel while a Discard is unconfirmed: a repeated Discard can come
    #: so late that it crosses the destination's Complete (see discard_is_safe);
    #: the repetition itself is covered by the SourceSession unit tests.
    replay_safe = True

    def both_complete(self) -> bool:
        return self.dest.session.complete and self.source.session.complete

    def discard_is_safe(self) -> bool:
        """Far enough from completion that no Discard can cross the destination's Complete.

        (A Discard after completion is a protocol error: the memory was handed
        over.  Pages in flight can complete the migration only if fewer are
        missing than can be in flight at once.)
        """
        stats = self.dest.session.statistics()
        return stats.pages_total - stats.pages_placed > 64

    def drain(self, limit: int = 20_000) -> None:
        """Let the world run to completion without new faults: everything must end."""
        for _ in range(limit):
            for channel in (URGENT, BACKGROUND):
                if not self.pipes[channel].connected and not self.both_complete():
                    self.reconnect(channel)
            self.dest.finish_deferred(self.now, all_of_them=True)
            self.dest_pass()
            self.settle()
            self.dest.finish_deferred(self.now, all_of_them=True)
            self.dest_pass()
            if self.finished():
                return
            self.now += 1.0
            self.timer()
        raise AssertionError(f"no completion: {self.dest.session.statistics()}")

    def finished(self) -> bool:
        pipes_empty = all(not p.to_source and not p.to_dest for p in self.pipes.values())
        return (self.dest.session.complete and pipes_empty and not self.dest.deferred
                and not self.dest.blocked and not any(self.dest.queued_faults.values())
                and not any(self.dest.self_served.values()))

    def check_final(self) -> None:
        dest, source = self.dest, self.source
        assert dest.completes == 1, "MigrationComplete must be emitted exactly once"
        assert not dest.aborts
        for block, info in enumerate(source.blocks):
            for page in range(info.length // PAGE):
                assert dest.memory.get((block, page)) == source.content(block, page), \
                    f"page {(block, page)} wrong after migration"
                assert dest.placements[(block, page)] == 1 + dest.discards[(block, page)]
        if not self.discarded_any:
            assert dest.early_wakes == 0, "a thread was woken before its page was in"
        stats = dest.session.statistics(self.now)
        assert stats.complete and stats.waiting == 0
        assert stats.faults == stats.woken + stats.waiters_dropped, "each waiter woken exactly once"
        assert stats.pages_placed == stats.pages_total
        assert source.session.statistics().complete
