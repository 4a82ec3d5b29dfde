"""Per-page timestamps across processes: where a remote fault's time goes.

Theory of operation
-------------------
Off unless the environment variable ``AIOPOSTCOPY_TRACE`` names a directory
when the process starts.  Then the source, the destination and the workload
workers each record ``(event, block, page, CLOCK_MONOTONIC ns)`` at fixed
points of a fault's path, in memory (the first :data:`MAX_EVENTS`), and write
``<dir>/<role>.<pid>.trace`` (one event per line) when the process exits.
CLOCK_MONOTONIC is one clock for every process on a host, so the files join
by (block, page) into one timeline per fault: ``benchmarks/fault_trace.py``
does that and prints the time between consecutive points.

The points, in path order (the first page of a run stands for the run)::

    touch          worker    a thread is about to touch a page not in memory
    fault-read     dest      the loop began the read of the userfaultfd that brought the fault
                   (client)  (a self-served client: its thread began that read)
    client-sent    client    the ClientRequest naming the page was written (self-served)
    client-request dest      that ClientRequest has been decoded (self-served)
    request        dest      a Request naming the page is handed to the transport
    src-request    source    the Request has been decoded
    src-reply      source    the Pages/Zero frame answering it was written
    answer-read    dest      the loop began handling the urgent bytes that hold the answer
    reply          dest      the answer has been decoded (urgent channel)
    woken          dest      the page is placed and its waiters woken (a self-served
                             client's thread: placed, the client not told yet)
    placed-sent    dest      Placed naming the page was written to the client (self-served)
    placed-read    client    the client's thread began the read that brought that Placed
                             (self-served)
    client-woke    client    it was read and its UFFDIO_WAKE returned (self-served)
    resumed        worker    the touching thread runs again

``client`` is the self-served client's own thread, inside the worker process.

Call sites test :data:`ENABLED` first, so tracing off costs one global lookup.
"""

from __future__ import annotations

import atexit
import os
import time

__all__ = ["ENABLED", "MAX_EVENTS", "mark", "start"]

MAX_EVENTS = 200_000
_DIRECTORY = os.environ.get("AIOPOSTCOPY_TRACE") or None
ENABLED = _DIRECTORY is not None
_events: list[tuple[str, int, int, int]] = []
_role = ["process"]


def start(role: str) -> None:
    """Name this process's trace file (``role``.pid.trace); call once, early."""
    _role[0] = role


def mark(event: str, block: int, page: int, when_ns: int | None = None) -> None:
    """Record one point (``when_ns``: a time.monotonic_ns() taken by the caller, or now)."""
    if len(_events) < MAX_EVENTS:
        _events.append((event, block, page, time.monotonic_ns() if when_ns is None else when_ns))


def _write() -> None:
    if not _events or _DIRECTORY is None:
        return
    path = os.path.join(_DIRECTORY, f"{_role[0]}.{os.getpid()}.trace")
    with open(path, "w", encoding="ascii") as out:
        out.writelines(f"{e} {b} {p} {t}\n" for e, b, p, t in _events)


if ENABLED:
    atexit.register(_write)
