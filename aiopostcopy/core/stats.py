"""Statistics: the counters a session keeps, the frozen records it hands out, the histogram.

Theory of operation
-------------------
Sessions count into plain mutable attributes while they run (cheap on the
fault path) and build a frozen record when :meth:`statistics()` is asked for
(trio's habit: a ``statistics()`` method returning a frozen record).  The
destination's counters are :class:`Counters`, frozen into
:class:`DestinationStatistics` by :meth:`Counters.snapshot`; its methods
update the few figures that move together (a fault, a wake, a blocked thread).

Fault latency (fault seen -> wake issued) goes into a log-linear histogram
of whole microseconds (HdrHistogram's layout, coarse): below 8 us one bucket
per microsecond, then every power of two split into 8 equal buckets.  A
percentile is reported as the upper edge of the bucket that holds it (capped
by the maximum seen), so it is at most 12.5% high, for a few hundred
integers of memory.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Hashable, Iterable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aiopostcopy.core.waiters import RunPiece, Waiter
    from aiopostcopy.messages import Channel

__all__ = ["LatencyHistogram", "LatencyRecorder", "Counters", "DestinationStatistics", "SourceStatistics"]

SUB = 8  #: buckets per power of two (and exact buckets below SUB us)
_SUB_BITS = SUB.bit_length() - 1
BUCKETS = SUB + (40 - _SUB_BITS) * SUB  #: up to 2**40 us (12 days); the last bucket takes the rest
HUGE_WAITS_KEPT = 4096  #: huge-page waits kept one by one (a 1 GiB page is a second's wait: few of them)


def bucket_of(microseconds: int) -> int:
    """The bucket index of a latency in whole microseconds."""
    if microseconds < SUB:
        return microseconds if microseconds > 0 else 0
    exponent = microseconds.bit_length() - 1
    index = SUB + (exponent - _SUB_BITS) * SUB + ((microseconds >> (exponent - _SUB_BITS)) & (SUB - 1))
    return index if index < BUCKETS else BUCKETS - 1


#: :func:`bucket_of` of every latency below _LOOKED_UP us, looked up instead (once per fault)
_LOOKED_UP = 1 << 12
_BUCKET_OF = bytes(bucket_of(microseconds) for microseconds in range(_LOOKED_UP))


def bucket_upper(index: int) -> int:
    """The smallest whole-microsecond latency above bucket ``index``."""
    if index < SUB:
        return index + 1
    octave, sub = divmod(index - SUB, SUB)
    return (SUB + sub + 1) << octave


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class LatencyHistogram:
    """Log-linear histogram of latencies (see the module doc).

    Attributes:
        buckets: counts; bucket ``i`` holds whole-microsecond latencies from
            ``bucket_upper(i - 1)`` up to ``bucket_upper(i)`` (exclusive).
        count: latencies recorded.
        total: sum of latencies, seconds.
        max: the largest latency, seconds.
    """

    buckets: tuple[int, ...] = (0,) * BUCKETS
    count: int = 0
    total: float = 0.0
    max: float = 0.0

    def percentile(self, fraction: float) -> float:
        """Latency (seconds) under which ``fraction`` of the samples fall.

        Args:
            fraction: in ``[0, 1]``, e.g. 0.99.

        Returns:
            The upper edge of the bucket holding that sample, capped at
            :attr:`max`; 0.0 when nothing was recorded.
        """
        return self.percentiles(fraction)[0]

    def percentiles(self, *fractions: float) -> tuple[float, ...]:
        """:meth:`percentile` of each of ``fractions`` (in increasing order), in one pass over the
        buckets (a report asks for three on every progress tick)."""
        if not self.count or not fractions:
            return (0.0,) * len(fractions)
        ranks = [max(1, math.ceil(fraction * self.count)) for fraction in fractions]
        if ranks != sorted(ranks):
            raise ValueError(f"fractions {fractions} are not in increasing order")
        found: list[float] = []
        seen = 0
        for index, bucket in enumerate(self.buckets):
            if not bucket:
                continue
            seen += bucket
            while seen >= ranks[len(found)]:
                found.append(min(bucket_upper(index) / 1e6, self.max))
                if len(found) == len(ranks):
                    return tuple(found)
        return (*found, *(self.max,) * (len(ranks) - len(found)))

    @property
    def p50(self) -> float:
        return self.percentile(0.50)

    @property
    def p90(self) -> float:
        return self.percentile(0.90)

    @property
    def p99(self) -> float:
        return self.percentile(0.99)

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0


class LatencyRecorder:
    """The mutable side of :class:`LatencyHistogram`."""

    __slots__ = ("_buckets", "_count", "_total", "_max")

    def __init__(self) -> None:
        self._buckets = [0] * BUCKETS
        self._count = 0
        self._total = 0.0
        self._max = 0.0

    def record(self, seconds: float) -> None:
        """Add one latency (negative values count as 0)."""
        if seconds < 0.0:
            seconds = 0.0
        microseconds = int(seconds * 1e6)
        self._buckets[_BUCKET_OF[microseconds] if microseconds < _LOOKED_UP else bucket_of(microseconds)] += 1
        self._count += 1
        self._total += seconds
        if seconds > self._max:
            self._max = seconds

    def snapshot(self) -> LatencyHistogram:
        """A frozen copy."""
        return LatencyHistogram(buckets=tuple(self._buckets), count=self._count,
                                total=self._total, max=self._max)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class DestinationStatistics:
    """What the destination session has done so far.

    Attributes:
        pages_total: pages in all blocks (0 before the source's Hello).
        pages_placed: pages currently placed.
        pages_demand: pages placed from urgent Pages that answered a request.
        pages_background: pages placed from other Pages (the sweep).
        pages_zero: pages placed from Zero runs.
        pages_discarded: placed pages the source discarded.
        pages_duplicate: pages that arrived again after arriving once (skipped).
        pages_requested: pages named in Requests (first requests only).
        pages_re_requested: pages asked for again (timeout or resume).
        requests_sent: Request messages queued.
        faults: faults received from delegated fds.
        bad_faults: faults at addresses no mapping table knows.
        faults_joined: faults on a page already requested or arriving.
        faults_already_placed: faults on a page already placed (woken at once).
        client_requests: runs asked for by self-served clients.
        wakes: Wake commands emitted.
        copies_to_client: demand pages placed with UFFDIO_COPY through the one delegated
            fd waiting on them, which woke its threads in the same call (no Wake needed).
        woken: waiters woken (each exactly once).
        waiters_dropped: waiters of retired fds, dropped unwoken; always
            ``faults == woken + waiters_dropped + waiting``.
        waiting: waiters still blocked.
        latency: fault seen -> woken histogram (delegated fds).
        blocked_by_fd: seconds blocked, summed per fd key.
        faults_by_fd: faults translated, per fd key.
        blocked_by_thread: seconds blocked, per ``(fd key, thread id)``.
        faults_by_block: faults per block index.
        resumes: Resume messages sent after a reconnection.
        pages_adopted: pages an earlier destination of the session had placed (adopted
            from its partial block files after it died).
        integrity_pages: pages found filled by someone else before the service
            placed them (a client touched memory it had not registered): the
            right bytes were written over them, but a reader may have seen the
            wrong ones, so the migration is not verified.
        huge_fault_waits: ``(page_size, seconds)`` of each huge-page wait answered
            (a fault, or a self-served client's request, on a block of pages larger
            than 4 KiB), oldest first; at most :data:`HUGE_WAITS_KEPT`.
        complete: every page is placed.
        aborted: the abort reason, or None.
    """

    pages_total: int
    pages_placed: int
    pages_demand: int
    pages_background: int
    pages_zero: int
    pages_discarded: int
    pages_duplicate: int
    pages_requested: int
    pages_re_requested: int
    requests_sent: int
    faults: int
    bad_faults: int
    faults_joined: int
    faults_already_placed: int
    client_requests: int
    wakes: int
    copies_to_client: int
    woken: int
    waiters_dropped: int
    waiting: int
    latency: LatencyHistogram
    blocked_by_fd: Mapping[Hashable, float]
    faults_by_fd: Mapping[Hashable, int]
    blocked_by_thread: Mapping[tuple[Hashable, int], float]
    faults_by_block: tuple[int, ...]
    resumes: int
    pages_adopted: int
    integrity_pages: int
    huge_fault_waits: tuple[tuple[int, float], ...]
    complete: bool
    aborted: str | None


_PLAIN = ("pages_demand", "pages_background", "pages_zero", "pages_discarded", "pages_duplicate",
          "pages_requested", "pages_re_requested", "requests_sent", "faults", "bad_faults",
          "faults_joined", "faults_already_placed", "client_requests", "wakes", "copies_to_client", "woken",
          "waiters_dropped", "resumes", "pages_adopted", "integrity_pages")


@dataclasses.dataclass(slots=True)
class Counters:
    """Mutable counters of a destination session (see :class:`DestinationStatistics`)."""

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
    copies_to_client: int = 0
    woken: int = 0
    waiters_dropped: int = 0
    resumes: int = 0
    pages_adopted: int = 0
    integrity_pages: int = 0
    faults_by_block: list[int] = dataclasses.field(default_factory=list)
    latency: LatencyRecorder = dataclasses.field(default_factory=LatencyRecorder)
    blocked_by_fd: dict[Hashable, float] = dataclasses.field(default_factory=dict)
    faults_by_fd: dict[Hashable, int] = dataclasses.field(default_factory=dict)
    blocked_by_thread: dict[tuple[Hashable, int], float] = dataclasses.field(default_factory=dict)
    done_channels: set[Channel] = dataclasses.field(default_factory=set)
    #: per block index: its page size if larger than 4 KiB (its waits are kept), else 0
    huge_sizes: list[int] = dataclasses.field(default_factory=list)
    huge_waits: list[tuple[int, float]] = dataclasses.field(default_factory=list)

    def huge_wait(self, block: int, seconds: float) -> None:
        """Keep a wait for a page of ``block`` if its pages are huge (the newest HUGE_WAITS_KEPT)."""
        size = self.huge_sizes[block] if block < len(self.huge_sizes) else 0
        if size:
            waits = self.huge_waits
            if len(waits) >= HUGE_WAITS_KEPT:
                del waits[:len(waits) // 2]
            waits.append((size, seconds))

    def fault(self, block: int, key: Hashable) -> None:
        """One fault on ``block`` translated, read from fd ``key``."""
        self.faults += 1
        self.faults_by_block[block] += 1
        self.faults_by_fd[key] = self.faults_by_fd.get(key, 0) + 1

    def blocked(self, waiter: Waiter, now: float) -> None:
        """Account the time ``waiter``'s thread was blocked, up to ``now``."""
        seconds = max(now - waiter.since, 0.0)
        self.blocked_by_fd[waiter.key] = self.blocked_by_fd.get(waiter.key, 0.0) + seconds
        thread = (waiter.key, waiter.thread_id)
        self.blocked_by_thread[thread] = self.blocked_by_thread.get(thread, 0.0) + seconds

    def woken_waiter(self, waiter: Waiter, now: float) -> None:
        """A waiter was woken at ``now`` (hot path: once per fault)."""
        self.woken += 1
        key, block, _, _, thread_id, since = waiter
        seconds = now - since if now > since else 0.0
        self.latency.record(seconds)
        if self.huge_sizes and self.huge_sizes[block]:
            self.huge_wait(block, seconds)
        by_fd, by_thread = self.blocked_by_fd, self.blocked_by_thread
        thread = (key, thread_id)
        by_fd[key] = by_fd.get(key, 0.0) + seconds
        by_thread[thread] = by_thread.get(thread, 0.0) + seconds

    def run_woken(self, piece: RunPiece, now: float) -> None:
        """A self-served client's wait (or part of it) was answered at ``now``."""
        seconds = max(now - piece.since, 0.0)
        self.blocked_by_fd[piece.key] = self.blocked_by_fd.get(piece.key, 0.0) + seconds
        if self.huge_sizes and self.huge_sizes[piece.block]:
            self.huge_wait(piece.block, seconds)

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
            faults_by_block=tuple(self.faults_by_block), huge_fault_waits=tuple(self.huge_waits))


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SourceStatistics:
    """What the source session has done so far.

    Attributes:
        pages_total: pages in all blocks.
        pages_sent_urgent: pages handed out by ``next_urgent``.
        pages_sent_background: pages handed out by ``next_background``.
        bytes_urgent: bytes reported sent on the urgent channel.
        bytes_background: bytes reported sent on the background channel.
        requests: Request messages received.
        request_runs: runs in them.
        resumes: Resume messages received.
        rejected: Hellos refused (busy or wrong session).
        pages_discarded: pages discarded by the source.
        unacked_bytes: background bytes not yet acknowledged.
        discards_unconfirmed: Discards sent whose Pong has not come back.
        all_sent: every page handed out at least once (since the last resume).
        complete: the destination said Complete.
        aborted: the destination aborted.
    """

    pages_total: int
    pages_sent_urgent: int
    pages_sent_background: int
    bytes_urgent: int
    bytes_background: int
    requests: int
    request_runs: int
    resumes: int
    rejected: int
    pages_discarded: int
    unacked_bytes: int
    discards_unconfirmed: int
    all_sent: bool
    complete: bool
    aborted: bool
