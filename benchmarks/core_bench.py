"""Core bookkeeping cost: how many faults and pages per second the I/O-free core can handle.

Theory of operation
-------------------
No kernel, no sockets: this times only the Python decisions the service makes
per fault and per page, so the figures say how much of a loop pass the core
eats.  Every case runs ``--repeat`` times and the median is reported.

* ``faults random``: a :class:`DestinationSession` with one block of
  ``--block-mb`` MiB and the service's own fd.  Each pass: ``--batch``
  faults at random missing pages (``fault_received``), ``flush`` (Requests),
  then the answers as the loop would feed them (``message_received`` of
  payload-less Pages on the urgent channel, then ``placed`` for each Place
  command).  Nothing coalesces: this is the per-fault cost.
* ``faults sequential``: the same with a batch of neighbouring pages, as a
  scan produces: they coalesce into runs of ``max_run_pages``.
* ``faults client``: random faults from a client fd with its own mapping
  table, so every placement also emits Wake commands.
* ``urgent path``: what the service does now for a client's fault: each
  fault of a read of ``--threads`` faults requested at once (``fault_request``),
  then each answer taken on the urgent path (``urgent_page`` with its copy
  target, ``copied_to_client``), as when every page is placed through the
  client's own userfaultfd.  The per-fault bookkeeping of the fault path.
* ``lanes``: the same faults when the C lanes wrote the Request and placed
  the answer (``fault_request``, then ``placed_through``): the bookkeeping
  left in Python per fault.
* ``self-served faults, lanes``: a self-served client's fault asked for at once
  (``client_fault_request``), its answer placed by the reply lane through the
  service's own fd (``placed_through``) and the NotifyPlaced that answers
  the client taken: the session's part of such a fault.
* ``sweep``: background Pages of 64 pages through ``message_received`` and
  ``placed`` (pages/s of sweep bookkeeping, no faults).
* ``PageStates``: ``mark`` REQUESTED -> PLACING -> PLACED in runs of 64 pages.
* ``Coalescer``: ``add`` random pages and ``flush`` (pages/s).
* ``source``: ``next_background`` + ``sent`` (pages/s handed to the server).
* ``resume``: building a Resume for a block with every other run placed.

The baseline for the fault cases, run in the same invocation, is a naive
first-prototype handler (dicts and sets with an object per page, no
validation, commands, statistics or recovery): ``x baseline`` is how many
times its cost the core takes.  ``of which`` shows what building the answers'
Pages objects costs (in the service the wire decoder pays it).  Absolute
figures drift 30% between runs on shared machines; compare ratios.

Run::

    PYTHONPATH=/work/main /work/main/.venv/bin/python benchmarks/core_bench.py
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable

from aiopostcopy import messages as m
from aiopostcopy.core import (DestinationConfig, DestinationSession, MappingTable, NotifyPlaced, Place,
                              PlaceZero, SourceConfig, SourceSession)
from aiopostcopy.core.coalesce import Coalescer
from aiopostcopy.core.pages import PLACED, PLACING, REQUESTED, PageStates

PAGE = 4096
URGENT, BACKGROUND = m.Channel.URGENT, m.Channel.BACKGROUND
OWN_BASE, CLIENT_BASE = 0x1000_0000_0000, 0x7F00_0000_0000


def destination(pages: int, *, client: bool = False) -> DestinationSession:
    """A session with both channels open, one block and one fd registered."""
    session = DestinationSession(session_id="bench", config=DestinationConfig(
        request_timeout=None, max_in_flight_pages=1 << 30))
    block = m.BlockInfo(name="ram", length=pages * PAGE, page_size=PAGE)
    for channel in (URGENT, BACKGROUND):
        session.message_received(channel, m.Hello(version=m.PROTOCOL_VERSION, session_id="bench",
                                                  role=m.Role.SOURCE, channel=channel,
                                                  blocks=(block,)), 0.0)
    blocks = session.blocks
    assert blocks is not None
    if client:
        session.add_fd("fd", MappingTable.build(blocks, [(CLIENT_BASE, pages * PAGE, 0, 0)]))
    else:
        session.add_fd("fd", MappingTable.identity(blocks, [OWN_BASE]), woken_by_copy=True)
    return session


def answer(session: DestinationSession, now: float) -> int:
    """Feed the answers to the Requests queued, as the loop would; returns Wakes seen."""
    wakes = 0
    for channel, msg in session.messages_to_send():
        if type(msg) is not m.Request:
            continue
        for run in msg.runs:
            session.message_received(URGENT, m.Pages(block=run.block, first=run.first,
                                                     count=run.count), now)
            wakes += carry_out(session, now)
    return wakes


def carry_out(session: DestinationSession, now: float) -> int:
    wakes = 0
    for command in session.commands():
        kind = type(command)
        if kind is Place or kind is PlaceZero:
            session.placed(command.block, command.first, command.count, now)
            wakes += sum(1 for c in session.commands() if type(c).__name__ == "Wake")
    return wakes


def fault_case(pages: int, faults: int, batch: int, *, sequential: bool, client: bool) -> float:
    """Faults per second through fault_received + flush + answers + placed."""
    session = destination(pages, client=client)
    order = list(range(pages))
    if not sequential:
        random.Random(1).shuffle(order)
    order = order[:faults]
    base = CLIENT_BASE if client else OWN_BASE
    start = time.perf_counter()
    for index in range(0, len(order), batch):
        now = time.perf_counter() - start
        for tid, page in enumerate(order[index:index + batch]):
            session.fault_received("fd", base + page * PAGE + 8, tid, now)
        session.flush(now)
        answer(session, now)
    elapsed = time.perf_counter() - start
    stats = session.statistics()
    assert stats.woken == len(order), (stats.woken, len(order))
    return len(order) / elapsed


def _client_faults_case(pages: int, faults: int, threads: int,
                        answered: Callable[[DestinationSession, int, int, float], None]) -> float:
    """Faults per second of a client fd, ``threads`` per read, each requested at once
    (``fault_request``) and its answer taken by ``answered(session, block, page, now)``."""
    session = destination(pages, client=True)
    order = list(range(pages))
    random.Random(1).shuffle(order)
    order = order[:faults]
    start = time.perf_counter()
    for index in range(0, len(order), threads):
        now = time.perf_counter() - start
        asked = []
        for tid, page in enumerate(order[index:index + threads]):
            found = session.fault_request("fd", CLIENT_BASE + page * PAGE + 8, tid, now, new_request=not asked)
            assert found is not None
            asked.append(found)
        for block, page in asked:
            answered(session, block, page, now)
            session.commands()
    elapsed = time.perf_counter() - start
    stats = session.statistics()
    assert stats.woken == stats.copies_to_client == len(order), (stats.woken, len(order))
    return len(order) / elapsed


def _urgent_answer(session: DestinationSession, block: int, page: int, now: float) -> None:
    assert type(session.urgent_page(block, page, target=True)) is tuple
    session.copied_to_client(block, page, now)


def _lane_answer(session: DestinationSession, block: int, page: int, now: float) -> None:
    session.placed_through(block, page, "fd", CLIENT_BASE + page * PAGE, now)


def urgent_case(pages: int, faults: int, threads: int) -> float:
    """Faults per second through fault_request + urgent_page(target) + copied_to_client."""
    return _client_faults_case(pages, faults, threads, _urgent_answer)


def lanes_case(pages: int, faults: int, threads: int) -> float:
    """Faults per second through fault_request + placed_through (the C lanes did the I/O)."""
    return _client_faults_case(pages, faults, threads, _lane_answer)


def self_served_case(pages: int, faults: int) -> float:
    """Faults per second of a self-served client's faults: ``client_fault_request`` asks for each
    page at once, the reply lane places it through the service's own fd (``placed_through``),
    and the NotifyPlaced that answers the client is taken."""
    session = destination(pages)
    session.add_self_served("client")
    order = list(range(pages))
    random.Random(1).shuffle(order)
    order = order[:faults]
    start = time.perf_counter()
    for page in order:
        now = time.perf_counter() - start
        assert session.client_fault_request("client", ((0, page, 1),), now) == [(0, page)]
        session.placed_through(0, page, "fd", OWN_BASE + page * PAGE, now)
        (notify,) = session.commands()
        assert type(notify) is NotifyPlaced
    elapsed = time.perf_counter() - start
    assert session.statistics().pages_demand == len(order)
    return len(order) / elapsed


def sweep_case(pages: int) -> float:
    """Background pages per second through message_received + placed."""
    session = destination(pages)
    start = time.perf_counter()
    for first in range(0, pages, 64):
        session.message_received(BACKGROUND, m.Pages(block=0, first=first, count=min(64, pages - first)), 0.0)
        carry_out(session, 0.0)
        session.flush(0.0)
    elapsed = time.perf_counter() - start
    assert session.complete
    return pages / elapsed


def states_case(pages: int) -> float:
    states = PageStates(pages)
    start = time.perf_counter()
    for first in range(0, pages - 63, 64):
        states.mark(first, 64, REQUESTED)
        states.mark(first, 64, PLACING)
        states.mark(first, 64, PLACED)
    return pages / (time.perf_counter() - start)


def coalescer_case(pages: int, faults: int, batch: int) -> float:
    states = [PageStates(pages)]
    coalescer = Coalescer(max_in_flight_pages=1 << 30)
    rng = random.Random(2)
    picks = [rng.randrange(pages) for _ in range(faults)]
    start = time.perf_counter()
    for index in range(0, faults, batch):
        for page in picks[index:index + batch]:
            coalescer.add(0, page)
        coalescer.flush(states)
    return faults / (time.perf_counter() - start)


def source_case(pages: int) -> float:
    block = m.BlockInfo(name="ram", length=pages * PAGE, page_size=PAGE)
    session = SourceSession(blocks=(block,), config=SourceConfig(background_window_bytes=1 << 62))
    session.message_received(BACKGROUND, m.Hello(version=m.PROTOCOL_VERSION, session_id="b",
                                                 role=m.Role.DESTINATION, channel=BACKGROUND), 0.0)
    start = time.perf_counter()
    sent = 0
    while (run := session.next_background()) is not None:
        session.sent(BACKGROUND, run, run.count * PAGE)
        sent += run.count
    assert sent == pages
    return pages / (time.perf_counter() - start)


def resume_case(pages: int) -> float:
    """Seconds to build a Resume with pages/128 placed runs (fragmented)."""
    session = destination(pages)
    for first in range(0, pages, 128):
        session.message_received(BACKGROUND, m.Pages(block=0, first=first, count=64), 0.0)
        carry_out(session, 0.0)
    start = time.perf_counter()
    resume = session.resume_message(0.0)
    elapsed = time.perf_counter() - start
    assert len(resume.received[0][1]) == 2 * (pages // 128)
    return elapsed


def naive_case(pages: int, faults: int, batch: int, *, sequential: bool) -> float:
    """Baseline: a first prototype's handler, with Python objects per page.

    A dict of waiter lists per page, sets of requested and placed pages, runs
    as tuples; no validation, commands, statistics or recovery.  (Its sets
    would hold 30+ bytes per page of a 1 TiB guest: what the core avoids.)
    """
    order = list(range(pages))
    if not sequential:
        random.Random(1).shuffle(order)
    order = order[:faults]
    waiters: dict[int, list[tuple[int, float]]] = {}
    requested: set[int] = set()
    placed: set[int] = set()
    woken = 0
    start = time.perf_counter()
    for index in range(0, len(order), batch):
        now = time.perf_counter() - start
        pending = []
        for tid, page in enumerate(order[index:index + batch]):
            if page in placed:
                woken += 1
                continue
            waiters.setdefault(page, []).append((tid, now))
            if page not in requested:
                requested.add(page)
                pending.append(page)
        for first, count in _runs(sorted(pending)):
            for page in range(first, first + count):  # the answer arrives, is placed
                placed.add(page)
                requested.discard(page)
                woken += len(waiters.pop(page, ()))
    elapsed = time.perf_counter() - start
    assert woken == len(order)
    return len(order) / elapsed


def _runs(pages: list[int]) -> list[tuple[int, int]]:
    runs: list[list[int]] = []
    for page in pages:
        if runs and runs[-1][0] + runs[-1][1] == page and runs[-1][1] < 64:
            runs[-1][1] += 1
        else:
            runs.append([page, 1])
    return [(first, count) for first, count in runs]


def message_case(count: int) -> float:
    """What building the answers' Pages objects costs (the wire decoder's share)."""
    start = time.perf_counter()
    for page in range(count):
        m.Pages(block=0, first=page, count=1)
    return count / (time.perf_counter() - start)


def median(repeat: int, case: Callable[[], float]) -> float:
    return statistics.median(case() for _ in range(repeat))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--block-mb", type=int, default=1024, help="block size in MiB (4 KiB pages)")
    parser.add_argument("--faults", type=int, default=100_000, help="faults per fault case")
    parser.add_argument("--batch", type=int, default=64, help="faults per loop pass")
    parser.add_argument("--repeat", type=int, default=3, help="runs per case (median reported)")
    parser.add_argument("--threads", type=int, default=8, help="faults per read in the urgent path case")
    args = parser.parse_args(argv)
    pages = args.block_mb * (1 << 20) // PAGE
    faults = min(args.faults, pages)
    naive_random = median(args.repeat, lambda: naive_case(pages, faults, args.batch, sequential=False))
    naive_sequential = median(args.repeat, lambda: naive_case(pages, faults, args.batch, sequential=True))
    rows = [
        ("baseline: naive handler, random", "faults/s", naive_random, None),
        ("faults random (own fd)", "faults/s", median(args.repeat, lambda: fault_case(
            pages, faults, args.batch, sequential=False, client=False)), naive_random),
        ("faults random (client fd, Wake)", "faults/s", median(args.repeat, lambda: fault_case(
            pages, faults, args.batch, sequential=False, client=True)), naive_random),
        (f"urgent path (client fd, {args.threads}/read)", "faults/s", median(args.repeat, lambda: urgent_case(
            pages, faults, args.threads)), naive_random),
        (f"lanes (client fd, {args.threads}/read)", "faults/s", median(args.repeat, lambda: lanes_case(
            pages, faults, args.threads)), naive_random),
        ("self-served faults, lanes", "faults/s", median(args.repeat, lambda: self_served_case(pages, faults)),
         naive_random),
        ("  of which: building Pages msgs", "msgs/s", median(args.repeat, lambda: message_case(faults)), None),
        ("baseline: naive handler, sequential", "faults/s", naive_sequential, None),
        ("faults sequential (own fd)", "faults/s", median(args.repeat, lambda: fault_case(
            pages, faults, args.batch, sequential=True, client=False)), naive_sequential),
        ("sweep placement", "pages/s", median(args.repeat, lambda: sweep_case(pages)), None),
        ("PageStates mark x3, runs of 64", "pages/s", median(args.repeat, lambda: states_case(pages)), None),
        ("Coalescer add+flush, random", "pages/s",
         median(args.repeat, lambda: coalescer_case(pages, faults, args.batch)), None),
        ("SourceSession sweep", "pages/s", median(args.repeat, lambda: source_case(pages)), None),
    ]
    resume = median(args.repeat, lambda: resume_case(pages))
    print(f"core_bench: block {args.block_mb} MiB ({pages} pages), {faults} faults, "
          f"batch {args.batch}, median of {args.repeat}, Python {sys.version.split()[0]}")
    print(f"{'case':36} {'rate':>12} {'unit':9} {'us/item':>8} {'x baseline':>10}")
    for name, unit, rate, base in rows:
        ratio = f"{base / rate:10.2f}" if base else ""
        print(f"{name:36} {rate:12,.0f} {unit:9} {1e6 / rate:8.2f} {ratio}")
    print(f"{'Resume build, ' + str(pages // 128) + ' placed runs':36} {resume * 1e3:12.2f} {'ms':9}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
