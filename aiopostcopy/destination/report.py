"""The destination's report: live statistics and the final summary.

Built (:func:`build_report`) from the session's frozen statistics plus what
only the service knows, handed over explicitly:
block names, client processes (pid, name, mode, why a client was retired),
thread names from /proc (the seed asks that any thread blocked on guest
memory be identified: a thread blocked while holding a lock blocks every
thread waiting for that lock), bytes received and wall-clock duration.

Huge pages: a fault on a 2 MiB page waits for 2 MiB to cross the wire, one on
a 1 GiB page for a gigabyte (about a second at 10 Gbit/s).  Those waits are
reported on their own, per page size (``huge_page_waits``: count, percentiles,
max and each wait in milliseconds), beside the fault-latency histogram that
mixes every page size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from aiopostcopy.core.stats import DestinationStatistics

__all__ = ["DestinationReport", "BlockedThread", "build_report"]

_names: dict[tuple[int, int], str] = {}


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class BlockedThread:
    """Time one faulting thread spent blocked on missing pages."""

    client: str
    pid: int | None
    tid: int
    name: str
    blocked_s: float


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class DestinationReport:
    """Figures of one migration, live or final (see :meth:`to_dict` for the JSON form)."""

    session_id: str
    final: bool
    complete: bool
    aborted: str | None
    duration_s: float
    pages_total: int
    pages_placed: int
    pages_demand: int
    pages_background: int
    pages_zero: int
    pages_duplicate: int
    faults: int
    faults_joined: int
    faults_already_placed: int
    copies_to_client: int
    bad_faults: int
    client_requests: int
    requests_sent: int
    resumes: int
    pages_adopted: int
    integrity_pages: int
    bytes_received: int
    goodput_gbps: float
    service_latency_us: dict[str, float]
    blocked_by_client_s: dict[str, float]
    faults_by_client: dict[str, int]
    blocked_threads: tuple[BlockedThread, ...]
    faults_by_block: dict[str, int]
    clients: tuple[dict[str, Any], ...]
    #: per huge page size in bytes (as a string key): count, p50/p90/max and every wait, milliseconds
    huge_page_waits: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        data = dataclasses.asdict(self)
        data["verified"] = self.verified
        data["pages_from_source"] = self.pages_from_source
        data["blocked_threads"] = [dataclasses.asdict(t) for t in self.blocked_threads]
        return data

    @property
    def pages_from_source(self) -> int:
        """Pages placed from what the source sent (the others were here: an earlier copy, a crash's files)."""
        return self.pages_placed - self.pages_adopted

    @property
    def verified(self) -> bool:
        """Complete, and no page was found filled by someone else on the way."""
        return self.complete and not self.integrity_pages

    def format(self) -> str:
        """A human summary, a few lines."""
        lat = self.service_latency_us
        lines = [
            f"session {self.session_id}: {'complete' if self.complete else 'INCOMPLETE'}"
            + (f" (aborted: {self.aborted})" if self.aborted else ""),
            f"  pages {self.pages_placed}/{self.pages_total}: demand {self.pages_demand}, "
            f"background {self.pages_background}, zero {self.pages_zero}, duplicate {self.pages_duplicate}",
            f"  faults {self.faults} (joined {self.faults_joined}, already placed {self.faults_already_placed}, "
            f"bad {self.bad_faults}), self-served requests {self.client_requests}, resumes {self.resumes}",
            f"  service fault->wake latency us: p50 {lat['p50']:.0f} p90 {lat['p90']:.0f} "
            f"p99 {lat['p99']:.0f} max {lat['max']:.0f}",
            f"  {self.bytes_received / 1e6:.1f} MB in {self.duration_s:.2f} s = {self.goodput_gbps:.2f} Gbit/s",
        ]
        if self.pages_adopted:
            lines.append(f"  {self.pages_from_source} of {self.pages_total} pages came from the source; "
                         f"{self.pages_adopted} were here already (an earlier copy, unchanged, or a crashed "
                         "destination's files)")
        for size, waits in self.huge_page_waits.items():
            lines.append(f"  {_page_size_name(int(size))}-page waits: {waits['count']}, ms p50 {waits['p50_ms']:.1f} "
                         f"p90 {waits['p90_ms']:.1f} max {waits['max_ms']:.1f}")
        if self.integrity_pages:
            lines.append(f"  NOT VERIFIED: {self.integrity_pages} pages were found filled by someone else before the "
                         "service placed them (rewritten with the right bytes; a reader may have seen zeros)")
        for thread in sorted(self.blocked_threads, key=lambda t: -t.blocked_s)[:5]:
            lines.append(f"  blocked {thread.blocked_s * 1e3:8.1f} ms  {thread.client} pid {thread.pid} "
                         f"tid {thread.tid} ({thread.name})")
        for client in self.clients:
            if client.get("error"):
                lines.append(f"  client {client['key']} (pid {client['pid']}) retired: {client['error']}")
        return "\n".join(lines)


def build_report(stats: DestinationStatistics, *, final: bool, session_id: str, duration_s: float,
                 bytes_received: int, block_names: Sequence[str], clients: Sequence[dict[str, Any]],
                 pids: Mapping[str, int | None]) -> DestinationReport:
    """A report from the session's statistics and what only the service knows.

    Args:
        stats: the session's frozen statistics.
        final: the migration is over (this is the last report).
        duration_s: since the service started.
        bytes_received: on every connection to the source, dropped ones included.
        block_names: in block order.
        clients: one summary per client (key, pid, name, mode, error).
        pids: the process of each fd key (the service's own and every client's).
    """
    hist = stats.latency
    return DestinationReport(
        session_id=session_id,
        final=final,
        complete=stats.complete,
        aborted=stats.aborted,
        duration_s=duration_s,
        pages_total=stats.pages_total,
        pages_placed=stats.pages_placed,
        pages_demand=stats.pages_demand,
        pages_background=stats.pages_background,
        pages_zero=stats.pages_zero,
        pages_duplicate=stats.pages_duplicate,
        faults=stats.faults,
        faults_joined=stats.faults_joined,
        faults_already_placed=stats.faults_already_placed,
        copies_to_client=stats.copies_to_client,
        bad_faults=stats.bad_faults,
        client_requests=stats.client_requests,
        requests_sent=stats.requests_sent,
        resumes=stats.resumes,
        pages_adopted=stats.pages_adopted,
        integrity_pages=stats.integrity_pages,
        bytes_received=bytes_received,
        goodput_gbps=bytes_received * 8 / duration_s / 1e9,
        service_latency_us={k: v * 1e6 for k, v in zip(("p50", "p90", "p99", "max"),
                                                       (*hist.percentiles(0.5, 0.9, 0.99), hist.max))},
        blocked_by_client_s={str(k): v for k, v in stats.blocked_by_fd.items()},
        faults_by_client={str(k): v for k, v in stats.faults_by_fd.items()},
        blocked_threads=tuple(_threads(stats.blocked_by_thread, pids)),
        faults_by_block={block_names[i] if i < len(block_names) else str(i): n
                         for i, n in enumerate(stats.faults_by_block)},
        clients=tuple(clients),
        huge_page_waits=huge_page_waits(stats.huge_fault_waits),
    )


def huge_page_waits(waits: Sequence[tuple[int, float]]) -> dict[str, dict[str, Any]]:
    """Huge-page waits grouped by page size: count, p50/p90/max and each wait, in milliseconds."""
    by_size: dict[int, list[float]] = {}
    for size, seconds in waits:
        by_size.setdefault(size, []).append(seconds * 1e3)
    result = {}
    for size, ms in sorted(by_size.items()):
        ordered = sorted(ms)
        result[str(size)] = {"page_size": size, "count": len(ms), "p50_ms": _pick(ordered, 0.5),
                             "p90_ms": _pick(ordered, 0.9), "max_ms": ordered[-1], "waits_ms": ms}
    return result


def _pick(ordered: Sequence[float], fraction: float) -> float:
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def _page_size_name(size: int) -> str:
    return f"{size >> 30} GiB" if size >= 1 << 30 else f"{size >> 20} MiB" if size >= 1 << 20 else f"{size} B"


def _threads(blocked: dict, pids: Mapping[str, int | None]):
    for (key, tid), seconds in blocked.items():
        pid = pids.get(str(key))
        yield BlockedThread(client=str(key), pid=pid, tid=tid, name=_thread_name(pid, tid), blocked_s=seconds)


def _thread_name(pid: int | None, tid: int) -> str:
    if pid is None or not tid:
        return "?"
    cached = _names.get((pid, tid))
    if cached is not None:
        return cached
    try:
        with open(f"/proc/{pid}/task/{tid}/comm", encoding="utf-8", errors="replace") as f:
            name = f.read().strip()
    except OSError:
        return "?"
    _names[(pid, tid)] = name
    return name


def remember_thread_name(pid: int | None, tid: int) -> None:
    """Look a thread's name up while it still exists (called on its first fault)."""
    _thread_name(pid, tid)
