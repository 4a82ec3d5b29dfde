"""The source's brain: which runs to send next, on which channel.

Theory of operation
-------------------
:class:`SourceSession` is I/O-free.  The server feeds it the destination's
messages and asks it, whenever a channel can take more, for the next run:

* :meth:`~SourceSession.next_urgent`: requested runs in arrival order, split
  to ``max_run_pages``; always served before the sweep;
* :meth:`~SourceSession.next_background`: the sweep.  It walks every block
  from a cursor, skipping pages already handed out (a :class:`RangeSet` of
  sent pages per block), wrapping around, so every page goes exactly once
  unless a discard or a resume makes it unsent again.  Each request moves
  the cursor just past the requested run (locality: what follows a fault is
  likely next).  It pauses while ``background_window_bytes`` are
  unacknowledged and queues Done once everything has gone.

Holes: a block may come with the page runs its file is known to hold no data
in (a sparse snapshot's holes, from SEEK_DATA/SEEK_HOLE).  The sweep hands a
hole out as one run as long as a Zero frame allows (no read, no payload) and
ends a data run where the next hole begins, so that the server reads data
runs whole and never reads a hole.

The server reads the page bytes itself, splits each run into zero and
non-zero sub-runs, sends Zero/Pages, and reports :meth:`~SourceSession.sent`
(payload bytes; zero runs count 0).  Drain :meth:`~SourceSession.messages_to_send`
before asking for runs, so that a Discard precedes the pages sent again.

Discards (:meth:`~SourceSession.discard`, after the memory changed) go on
every open channel, since an old copy may be in flight on either; the pages
are swept again, and the destination re-requests what it drops.  Discards
the destination may have missed are repeated after the next Resume (see
:mod:`aiopostcopy.core.discards`).  Discards belong to the start of
postcopy (QEMU's discard phase): one sent late can cross the destination's
Complete, which the destination rejects as a protocol error.

Starting from an earlier copy (feature ``from-copy``): a destination whose
Hello names the feature holds an earlier copy of the memory.  Its Digests
are queued for the server (:meth:`~SourceSession.next_comparison`), which
hashes its own pages and answers Changed; the sweep is held until the
session's first Resume, which tells which pages of the copy the destination
kept (the unchanged ones): only the others are ever sent.

Sessions: the first destination Hello fixes the session id (or the one
given).  A Hello with another id while it runs is refused with
RemoteProtocolError code ``busy`` (``session`` once it completed, and any
Hello ``aborted`` once aborted); the same id may reconnect even after
Complete (its Complete may have crossed the reconnection); the server answers Error(code) on that
connection and closes it.  A Hello on a channel already open replaces that
connection (the server closes the old one).  A Resume says what the
destination holds: exactly those pages count as sent; its pending runs are
served first; discards it may have missed are sent again.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Sequence

from aiopostcopy import messages as m
from aiopostcopy.core.config import WINDOW_FEATURE, SourceConfig
from aiopostcopy.core.digests import FROM_COPY_FEATURE
from aiopostcopy.core.discards import DiscardTracker
from aiopostcopy.core.pageset import PageSet
from aiopostcopy.core.ramblock import BlockTable
from aiopostcopy.core.rangeset import RangeSet
from aiopostcopy.core.stats import SourceStatistics
from aiopostcopy.errors import LocalProtocolError, RemoteProtocolError

BRIDGE_PAGE_SIZE = 4096  #: the sweep bridges sent pages only on blocks of pages this size or smaller

__all__ = ["SourceConfig", "SourceSession"]

URGENT, BACKGROUND = m.Channel.URGENT, m.Channel.BACKGROUND
#: the one channel each of these messages may arrive on (docs/protocol.md, section 4.1)
_ONLY_ON = {m.Request: URGENT, m.Resume: URGENT, m.Complete: URGENT, m.Ack: BACKGROUND, m.Digests: URGENT}
#: the longest run a Zero frame names (its count field)
MAX_ZERO_RUN = 1 << 32


@dataclasses.dataclass(slots=True)
class _Counts:
    pages_sent_urgent: int = 0
    pages_sent_background: int = 0
    bytes_urgent: int = 0
    bytes_background: int = 0
    requests: int = 0
    request_runs: int = 0
    resumes: int = 0
    rejected: int = 0
    pages_discarded: int = 0


class SourceSession:
    """Decides what the source sends (see the module docstring).

    Args:
        blocks: the memory served, in protocol order.
        session_id: accept only this session, or None for the first that says Hello.
        config: tuning; defaults to ``SourceConfig()``.
        holes: per block, ``(start, stop)`` page runs known to be all zero without
            reading them (a sparse file's holes); the sweep sends each as Zero runs.
    """

    def __init__(self, *, blocks: Sequence[m.BlockInfo], session_id: str | None = None,
                 config: SourceConfig | None = None,
                 holes: Sequence[Sequence[tuple[int, int]]] | None = None) -> None:
        self.blocks = BlockTable.from_infos(blocks)
        self.config = config if config is not None else SourceConfig()
        self.session_id = session_id
        self._fixed = session_id is not None
        self._open: set[m.Channel] = set()
        self._queue: list[tuple[m.Channel, m.Message]] = []
        self._sent = [PageSet(block.pages) for block in self.blocks]  # handed out, on either channel
        self._held = [RangeSet() for _ in self.blocks]  # the destination's own, as its last Resume said: never bridged
        self._holes = [RangeSet(runs) for runs in holes] if holes is not None else [RangeSet() for _ in self.blocks]
        if len(self._holes) != len(self.blocks):
            raise ValueError(f"holes for {len(self._holes)} blocks, but {len(self.blocks)} blocks")
        self._discards = DiscardTracker(len(self.blocks))
        self._urgent: deque[m.PageRun] = deque()
        self._comparisons: deque[m.Digests] = deque()
        self._copy_pending = False  # from-copy: the sweep waits for the first Resume
        self._resumed = False
        self._cursor = (0, 0)
        self._record = 0  # bumped when a Resume replaces or a Discard cuts the record of pages sent
        self._unacked = self._background_pages = 0
        self._done_sent = self.complete = self.aborted = False
        # a run fits one Pages frame: its payload, and its zero stretches (at most one per two pages)
        self._limits = [max(1, min(m.LIMITS.max_payload // block.page_size, 2 * m.LIMITS.max_zero_runs))
                        for block in self.blocks]
        self._count = _Counts()
        self._handlers = {m.Request: self._on_request, m.Resume: self._on_resume,
                          m.Ack: self._on_ack, m.Complete: self._on_complete,
                          m.Ping: self._on_ping, m.Pong: self._on_pong, m.Error: self._on_error,
                          m.Digests: self._on_digests}

    # ------------------------------------------------------------ messages in

    def message_received(self, channel: m.Channel, msg: m.Message, now: float) -> None:
        """Handle one message from the destination.

        Raises:
            RemoteProtocolError: malformed, out of order or out of range (``code``
                says what to put in the Error); ``busy`` for a second session.
                State is unchanged.
        """
        if type(msg) is m.Hello:
            return self._on_hello(channel, msg)
        if channel not in self._open:
            raise RemoteProtocolError(f"{type(msg).__name__} before Hello on the {channel.value} channel")
        handler = self._handlers.get(type(msg))
        if handler is None:
            raise RemoteProtocolError(f"unexpected {type(msg).__name__} from the destination")
        only = _ONLY_ON.get(type(msg))
        if only is not None and only is not channel:
            raise RemoteProtocolError(f"{type(msg).__name__} on the {channel.value} channel (it belongs on the "
                                      f"{only.value} channel)")
        handler(channel, msg)

    def _on_hello(self, channel: m.Channel, msg: m.Hello) -> None:
        if msg.role is not m.Role.DESTINATION or msg.channel is not channel:
            raise RemoteProtocolError(f"expected the destination's Hello for the {channel.value} channel")
        if msg.version != m.PROTOCOL_VERSION:
            raise RemoteProtocolError(f"protocol version {msg.version} not supported", code="version")
        if self._fixed and msg.session_id != self.session_id:
            raise self._reject(f"session {msg.session_id!r} is not the one served", "session")
        if self.aborted:
            raise self._reject(f"session {self.session_id!r} was aborted", "aborted")
        if self.complete and msg.session_id != self.session_id:
            raise self._reject(f"session {self.session_id!r} has ended", "session")
        if self.session_id is not None and msg.session_id != self.session_id:
            raise self._reject(f"busy serving session {self.session_id!r}", "busy")
        self.session_id = msg.session_id
        if channel in self._open:  # a new connection replaces one we did not see break
            self.connection_lost(channel, 0.0)
        self._open.add(channel)
        if channel is BACKGROUND:
            self._unacked = self._background_pages = 0
            self._done_sent = False
        if FROM_COPY_FEATURE in msg.features and not self._resumed:
            self._copy_pending = True
        window = f"{WINDOW_FEATURE}{self.config.background_window_bytes}"
        self._queue.append((channel, m.Hello(version=m.PROTOCOL_VERSION, session_id=msg.session_id,
                                             role=m.Role.SOURCE, channel=channel,
                                             features=(window, FROM_COPY_FEATURE),
                                             blocks=self.blocks.infos())))

    def _reject(self, text: str, code: str) -> RemoteProtocolError:
        self._count.rejected += 1
        return RemoteProtocolError(text, code=code)

    def _on_request(self, channel: m.Channel, msg: m.Request) -> None:
        for run in msg.runs:
            self.blocks.check_run(run.block, run.first, run.count)
        self._urgent.extend(msg.runs)
        self._count.requests += 1
        self._count.request_runs += len(msg.runs)
        last = msg.runs[-1]
        self._cursor = (last.block, last.stop)

    def _on_resume(self, channel: m.Channel, msg: m.Resume) -> None:
        if msg.session_id != self.session_id:
            raise RemoteProtocolError(f"resume for session {msg.session_id!r}", code="session")
        received = [RangeSet() for _ in self.blocks]
        for block, bounds in msg.received:  # pages we do not have: the destination holds another block list
            if block >= len(self.blocks) or (bounds and bounds[-1] > self.blocks[block].pages):
                raise RemoteProtocolError(f"resume: block {block} bounds out of range: not this source's "
                                          f"block list", code="session")
            received[block] = RangeSet.from_bounds(bounds)
        for run in msg.pending:
            self.blocks.check_run(run.block, run.first, run.count)
        self._sent = [PageSet(block.pages, runs) for block, runs in zip(self.blocks, received)]
        self._record += 1
        self._held = [ranges.copy() for ranges in received]
        self._urgent = deque(msg.pending)
        self._comparisons.clear()
        self._copy_pending, self._resumed = False, True
        self._count.resumes += 1
        self._done_sent = False
        for block, start, stop in self._discards.replay(received):
            self._queue_discard(block, start, stop)
        if msg.pending:
            self._cursor = (msg.pending[0].block, msg.pending[0].stop)

    def _on_digests(self, channel: m.Channel, msg: m.Digests) -> None:
        if not self._copy_pending:
            raise RemoteProtocolError("Digests outside a from-copy comparison (the destination's Hello did not "
                                      "name from-copy, or its Resume came already)")
        self.blocks.check_run(msg.block, msg.first, len(msg.digests))
        self._comparisons.append(msg)

    def _on_ack(self, channel: m.Channel, msg: m.Ack) -> None:
        self._unacked = max(0, self._unacked - msg.nbytes)

    def _on_complete(self, channel: m.Channel, msg: m.Complete) -> None:
        self.complete = True
        self._urgent.clear()

    def _on_ping(self, channel: m.Channel, msg: m.Ping) -> None:
        self._queue.append((channel, m.Pong(token=msg.token)))

    def _on_pong(self, channel: m.Channel, msg: m.Pong) -> None:
        self._discards.confirmed(channel, msg.token)

    def _on_error(self, channel: m.Channel, msg: m.Error) -> None:
        if msg.code is m.ErrorCode.ABORTED:
            self.aborted = True
            self._urgent.clear()
            return
        raise RemoteProtocolError(f"the destination sent error {msg.code.value}: {msg.text}",
                                  code=msg.code.value)

    def abort(self) -> None:
        """The destination aborted the migration (its Error(aborted) may have outrun its channel)."""
        self.aborted = True
        self._urgent.clear()

    def connection_lost(self, channel: m.Channel, now: float) -> None:
        """A channel broke: drop what was queued for it; wait for Hello and Resume."""
        self._open.discard(channel)
        if channel is URGENT:
            self._comparisons.clear()  # the destination sends them again, or gives the copy up
        self._queue = [(ch, msg) for ch, msg in self._queue if ch is not channel]
        self._discards.lost(channel)
        if channel is BACKGROUND:
            self._unacked = 0

    # ------------------------------------------------------------ what to send

    def may_answer_urgent(self) -> bool:
        """Requests may be answered as they come (the C page server's condition, as
        :meth:`urgent_page`'s): the urgent channel is open on a live session, and no
        request or message is queued to go first."""
        return not (self._urgent or self._queue or self.complete or self.aborted or URGENT not in self._open)

    def urgent_page(self, block: int, page: int) -> bool:
        """A Request for one page (the usual fault), answered at once: accounted as
        :meth:`message_received` and :meth:`next_urgent` would, when nothing goes before it
        (no request or message queued) and the urgent channel is open on a live session.
        Returns False, with nothing changed, otherwise: the caller takes the general path.

        Raises:
            RemoteProtocolError: the page is outside the blocks (state unchanged).
        """
        if not self.may_answer_urgent():
            return False
        self.blocks.check_run(block, page, 1)
        count = self._count
        count.requests += 1
        count.request_runs += 1
        count.pages_sent_urgent += 1
        self._cursor = (block, page + 1)
        self._sent[block].add(page, page + 1)
        return True

    @property
    def sent_record(self) -> int:
        """Changes whenever a Resume replaces, or a Discard cuts, the record of pages sent: an
        answer read before such a change may be stale (see :meth:`answered`)."""
        return self._record

    def answered(self, block: int, first: int, count: int, runs: int, record: int, nbytes: int) -> None:
        """A run was answered on the urgent channel without this session (the C page server),
        and is accounted after it was sent, as :meth:`message_received` of its Request,
        :meth:`next_urgent` and :meth:`sent` (``nbytes`` of payload) would have: ``runs`` is the
        Request's number of runs on its first run, else 0.

        The server answers only Requests in range, of runs no longer than
        :meth:`urgent_run_limit`, read while :attr:`sent_record` was ``record``.  If it has
        changed since (a Discard or Resume came), the pages are not recorded as sent and the
        sweep sends them again, since the copy may predate the Discard.
        """
        counts = self._count
        if runs:
            counts.requests += 1
            counts.request_runs += runs
        counts.pages_sent_urgent += count
        counts.bytes_urgent += nbytes
        if record == self._record:
            self._sent[block].add(first, first + count)
        self._cursor = (block, first + count)

    def urgent_run_limit(self, block: int) -> int:
        """The longest run :meth:`next_urgent` hands out on ``block``."""
        return min(self.config.max_run_pages, self._limits[block])

    def next_urgent(self) -> m.PageRun | None:
        """The next requested run to send on the urgent channel, or None."""
        if not self._urgent or URGENT not in self._open or self.complete or self.aborted:
            return None
        run = self._urgent.popleft()
        limit = self.urgent_run_limit(run.block)
        if run.count > limit:
            self._urgent.appendleft(m.PageRun(block=run.block, first=run.first + limit,
                                              count=run.count - limit))
            run = m.PageRun(block=run.block, first=run.first, count=limit)
        self._sent[run.block].add(run.first, run.stop)
        self._count.pages_sent_urgent += run.count
        return run

    def next_comparison(self) -> m.Digests | None:
        """The next Digests for the server to answer with Changed (urgent channel), or None."""
        if not self._comparisons or URGENT not in self._open or self.complete or self.aborted:
            return None
        return self._comparisons.popleft()

    def next_background(self) -> m.PageRun | None:
        """The next sweep run for the background channel, or None.

        None when the channel is closed, the window is full, or every page
        has been handed out (then Done is queued, once).
        """
        if BACKGROUND not in self._open or self.complete or self.aborted or self._copy_pending:
            return None
        if self._unacked >= self.config.background_window_bytes:
            return None
        gap = self._next_gap()
        if gap is None:
            if not self._done_sent:
                self._done_sent = True
                self._queue.append((BACKGROUND, m.Done(pages=self._background_pages)))
            return None
        block, start, stop = gap
        stop = self._bridge(block, start, stop)
        stop = self._clip_sweep_run(block, start, stop)
        self._sent[block].add(start, stop)
        self._cursor = (block, stop)
        self._count.pages_sent_background += stop - start
        return m.PageRun(block=block, first=start, count=stop - start)

    def _bridge(self, block: int, start: int, stop: int) -> int:
        """Extend the unsent gap ``[start, stop)`` over short stretches of pages this source sent
        (answers to Requests ahead of the sweep) to the unsent ones after them, up to the run
        length (see ``SourceConfig.sweep_bridge_pages``): each stretch at most that many pages,
        all of them at most an eighth of the run's pages, and only on blocks of base pages (a
        huge page sent twice costs more than a frame).  Pages the destination said it holds
        (its Resume: an earlier copy, a reconnection) are never bridged."""
        if self.blocks[block].page_size > BRIDGE_PAGE_SIZE:
            return stop
        bridge, longest = self.config.sweep_bridge_pages, start + self.config.background_run_pages
        pages, sent, held = self.blocks[block].pages, self._sent[block], self._held[block]
        budget = self.config.background_run_pages // 8
        while bridge and stop < min(longest, pages):
            after = sent.first_gap_from(stop, pages)
            if (after is None or after[0] - stop > min(bridge, budget)
                    or (held and held.intersection(stop, after[0]))):
                break
            budget -= after[0] - stop
            stop = after[1]
        return stop

    def _clip_sweep_run(self, block: int, start: int, stop: int) -> int:
        """Where a sweep run from ``start`` ends: a hole goes whole (up to a Zero frame's
        count), data up to the run length, the frame's limits, or the next hole."""
        holes = self._holes[block]
        if start in holes:
            hole_end = holes.first_gap_from(start, self.blocks[block].pages)
            return min(stop, hole_end[0] if hole_end is not None else stop, start + MAX_ZERO_RUN)
        stop = min(stop, start + self.config.background_run_pages, start + self._limits[block])
        ahead = holes.intersection(start, stop)
        return ahead[0][0] if ahead else stop

    def _next_gap(self) -> tuple[int, int, int] | None:
        """First unsent run at or after the cursor, wrapping around once."""
        block, page = self._cursor
        blocks = len(self.blocks)
        for step in range(blocks + 1):
            index = (block + step) % blocks
            gap = self._sent[index].first_gap_from(page if step == 0 else 0, self.blocks[index].pages)
            if gap is not None:
                return index, gap[0], gap[1]
        return None

    def sent(self, channel: m.Channel, run: m.PageRun, nbytes: int) -> None:
        """The server sent ``run`` on ``channel``: ``nbytes`` of page payload (zeros: 0)."""
        if channel is BACKGROUND:
            self._unacked += nbytes
            self._background_pages += run.count
            self._count.bytes_background += nbytes
        else:
            self._count.bytes_urgent += nbytes

    def discard(self, block: int, first: int, count: int) -> None:
        """The destination must drop these pages; the sweep sends them again.

        Raises:
            LocalProtocolError: the run is out of range.
        """
        if block >= len(self.blocks) or first < 0 or count < 1 or first + count > self.blocks[block].pages:
            raise LocalProtocolError(f"discard (block={block}, first={first}, count={count}) out of range")
        self._queue_discard(block, first, first + count)
        self._count.pages_discarded += count

    def _queue_discard(self, block: int, start: int, stop: int) -> None:
        self._sent[block].subtract(start, stop)
        self._record += 1
        self._held[block].subtract(start, stop)
        self._holes[block].subtract(start, stop)  # the memory changed: read these pages
        self._queue.extend(self._discards.issue(block, start, stop, self._open))
        self._done_sent = False

    def messages_to_send(self) -> list[tuple[m.Channel, m.Message]]:
        """Messages to send, each with its channel, in order (drains)."""
        result, self._queue = self._queue, []
        return result

    @property
    def all_sent(self) -> bool:
        """Every page has been handed out (since the last resume or discard)."""
        return all(sent.covers(0, block.pages) for sent, block in zip(self._sent, self.blocks))

    def is_open(self, channel: m.Channel) -> bool:
        """The destination's Hello arrived on ``channel`` and it was not lost since."""
        return channel in self._open

    def statistics(self) -> SourceStatistics:
        """A frozen snapshot of the counters."""
        return SourceStatistics(
            pages_total=self.blocks.total_pages, unacked_bytes=self._unacked,
            discards_unconfirmed=self._discards.unconfirmed,
            all_sent=self.all_sent, complete=self.complete, aborted=self.aborted,
            **dataclasses.asdict(self._count))
