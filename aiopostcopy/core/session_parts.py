"""Pieces of the destination session that need none of its state.

Theory of operation
-------------------
Kept apart so :mod:`aiopostcopy.core.session` stays about decisions:

* :class:`Counters`: the mutable counters behind
  :class:`~aiopostcopy.core.stats.DestinationStatistics`, with the few
  methods that update several at once (a fault, a wake, a blocked thread);
* :func:`resume_for` and :func:`requested_runs`: build a Resume within the
  protocol's limits;
* :func:`check_hello`: the rules a source's Hello must meet, and
  :func:`ack_threshold`: when to Ack, given the window the source announced;
* :func:`merge_runs` and :func:`chunks`: run-list helpers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Iterable, Sequence
from typing import TypeVar

from aiopostcopy import messages as m
from aiopostcopy.core.config import WINDOW_FEATURE
from aiopostcopy.core.pages import REQUESTED, PageStates
from aiopostcopy.core.ramblock import BlockTable
from aiopostcopy.core.stats import DestinationStatistics, LatencyRecorder
from aiopostcopy.core.waiters import RunPiece, Waiter
from aiopostcopy.errors import RemoteProtocolError

__all__ = ["Counters", "WINDOW_FEATURE", "ack_threshold", "resume_for", "check_hello", "requested_runs", "merge_runs", "chunks"]

T = TypeVar("T")
_REQUESTED = frozenset({REQUESTED})

_PLAIN = ("pages_demand", "pages_background", "pages_zero", "pages_discarded", "pages_duplicate",
          "pages_requested", "pages_re_requested", "requests_sent", "faults", "bad_faults",
          "faults_joined", "faults_already_placed", "client_requests", "wakes", "woken",
          "waiters_dropped", "resumes")


@dataclasses.dataclass(slots=True)
class Counters:
    """Mutable counters of a destination session (see DestinationStatistics)."""

    pages_demand: int = 0
    pages_background: int = 0
    pages_zero: int = 0
    pages_discarded: int = 0
    pages_duplicate: int = 0
    pages_requested: int = 0
    pages_re_requested: int = 0
    requests_sent: int = 0
    faults: int = 0
    bad_faults: int = 0
    faults_joined: int = 0
    faults_already_placed: int = 0
    client_requests: int = 0
    wakes: int = 0
    woken: int = 0
    waiters_dropped: int = 0
    resumes: int = 0
    faults_by_block: list[int] = dataclasses.field(default_factory=list)
    latency: LatencyRecorder = dataclasses.field(default_factory=LatencyRecorder)
    blocked_by_fd: dict[Hashable, float] = dataclasses.field(default_factory=dict)
    faults_by_fd: dict[Hashable, int] = dataclasses.field(default_factory=dict)
    blocked_by_thread: dict[tuple[Hashable, int], float] = dataclasses.field(default_factory=dict)
    done_channels: set[m.Channel] = dataclasses.field(default_factory=set)

    def fault(self, block: int) -> None:
        """One fault on ``block`` translated."""
        self.faults += 1
        self.faults_by_block[block] += 1

    def blocked(self, waiter: Waiter, now: float) -> None:
        """Account the time ``waiter``'s thread was blocked, up to ``now``."""
        seconds = max(now - waiter.since, 0.0)
        self.blocked_by_fd[waiter.key] = self.blocked_by_fd.get(waiter.key, 0.0) + seconds
        thread = (waiter.key, waiter.thread_id)
        self.blocked_by_thread[thread] = self.blocked_by_thread.get(thread, 0.0) + seconds

    def woken_waiter(self, waiter: Waiter, now: float) -> None:
        """A waiter was woken at ``now`` (hot path: once per fault)."""
        self.woken += 1
        seconds = max(now - waiter.since, 0.0)
        self.latency.record(seconds)
        by_fd, by_thread = self.blocked_by_fd, self.blocked_by_thread
        key, thread = waiter.key, (waiter.key, waiter.thread_id)
        by_fd[key] = by_fd.get(key, 0.0) + seconds
        by_thread[thread] = by_thread.get(thread, 0.0) + seconds

    def run_woken(self, piece: RunPiece, now: float) -> None:
        """A self-served client's wait (or part of it) was answered at ``now``."""
        seconds = max(now - piece.since, 0.0)
        self.blocked_by_fd[piece.key] = self.blocked_by_fd.get(piece.key, 0.0) + seconds

    def snapshot(self, *, still_blocked: Iterable[Waiter], now: float | None,
                 **fields: object) -> DestinationStatistics:
        """Freeze into a :class:`DestinationStatistics`; ``fields`` fills the rest."""
        by_fd, by_thread = dict(self.blocked_by_fd), dict(self.blocked_by_thread)
        for waiter in still_blocked:
            seconds = max((now or 0.0) - waiter.since, 0.0)
            by_fd[waiter.key] = by_fd.get(waiter.key, 0.0) + seconds
            thread = (waiter.key, waiter.thread_id)
            by_thread[thread] = by_thread.get(thread, 0.0) + seconds
        plain = {name: getattr(self, name) for name in _PLAIN}
        return DestinationStatistics(
            **plain, **fields, latency=self.latency.snapshot(),  # type: ignore[arg-type]
            blocked_by_fd=by_fd, blocked_by_thread=by_thread, faults_by_fd=dict(self.faults_by_fd),
            faults_by_block=tuple(self.faults_by_block))


def check_hello(channel: m.Channel, msg: m.Hello, session_id: str, *,
                known: BlockTable | None) -> BlockTable:
    """Check a source's Hello and return its block table.

    Raises:
        RemoteProtocolError: wrong role/channel/version/session, no blocks,
            or blocks unlike before.
    """
    if msg.role is not m.Role.SOURCE or msg.channel is not channel:
        raise RemoteProtocolError(f"expected the source's Hello for the {channel.value} channel")
    if msg.version != m.PROTOCOL_VERSION:
        raise RemoteProtocolError(f"protocol version {msg.version} not supported", code="version")
    if msg.session_id != session_id:
        raise RemoteProtocolError(f"session {msg.session_id!r} is not ours", code="session")
    if not msg.blocks:
        raise RemoteProtocolError("the source's Hello lists no blocks")
    blocks = BlockTable.from_infos(msg.blocks)
    if known is not None and blocks != known:
        raise RemoteProtocolError("the source's block list differs from the one it sent before")
    return blocks


def ack_threshold(hello: m.Hello, ack_bytes: int) -> int:
    """Ack after this many background bytes: ``ack_bytes``, but at most half the
    window the source announced (feature ``background-window=<bytes>``), so a
    window smaller than ``ack_bytes`` cannot stall the sweep."""
    for feature in hello.features:
        if feature.startswith(WINDOW_FEATURE) and feature[len(WINDOW_FEATURE):].isdigit():
            return max(1, min(ack_bytes, int(feature[len(WINDOW_FEATURE):]) // 2))
    return ack_bytes


def resume_for(session_id: str, states: Sequence[PageStates],
               pending: list[m.PageRun]) -> tuple[m.Resume, list[m.PageRun]]:
    """Build a Resume within the protocol's limits.

    Args:
        session_id: the migration.
        states: page states by block; PLACED and PLACING pages count as received.
        pending: REQUESTED runs, oldest first.

    Returns:
        The Resume and the pending runs that did not fit in it (send those
        as Requests right after).  Received runs past the limit are left out:
        that only costs the source sending those pages again.
    """
    budget = m.LIMITS.max_resume_runs
    received = []
    for block, block_states in enumerate(states):
        bounds = block_states.placed_set(including_placing=True).bounds()[:2 * budget]
        budget -= len(bounds) // 2
        if bounds:
            received.append((block, bounds))
    limit = m.LIMITS.max_runs
    resume = m.Resume(session_id=session_id, received=tuple(received), pending=tuple(pending[:limit]))
    return resume, pending[limit:]


def requested_runs(states: Sequence[PageStates]) -> list[m.PageRun]:
    """Every REQUESTED run of every block, in block order."""
    return [m.PageRun(block=block, first=start, count=stop - start)
            for block, block_states in enumerate(states)
            for start, stop in block_states.runs(0, block_states.pages, _REQUESTED)]


def merge_runs(runs: Iterable[m.PageRun]) -> tuple[m.PageRun, ...]:
    """Sort runs and merge those that overlap or touch."""
    merged: list[list[int]] = []
    for run in sorted(runs, key=lambda run: (run.block, run.first)):
        last = merged[-1] if merged else None
        if last is not None and last[0] == run.block and run.first <= last[2]:
            last[2] = max(last[2], run.stop)
        else:
            merged.append([run.block, run.first, run.stop])
    return tuple(m.PageRun(block=block, first=first, count=stop - first)
                 for block, first, stop in merged)


def chunks(items: list[T], size: int) -> Iterable[tuple[T, ...]]:
    """Consecutive tuples of at most ``size`` items."""
    for start in range(0, len(items), size):
        yield tuple(items[start:start + size])
