"""Where a remote fault's time goes: join the per-process traces of one migration by page.

Theory of operation
-------------------
Run a migration with ``AIOPOSTCOPY_TRACE=DIR`` in the environment of the
source, the destination and the workers (``postcopy_bench.py --trace DIR``
does it for one extra run of a scenario).  Each process writes
``DIR/<role>.<pid>.trace`` (see :mod:`aiopostcopy.trace`).  This script reads
them all, keeps the first time of each point per (block, page), and prints
the distribution of each hop, one table per path a fault can take:

* delegated: the service reads the fault from the client's userfaultfd and
  its copy through that fd wakes the thread;
* self-served: the client's own thread reads it, asks for the page with
  ClientRequest and wakes the thread itself when Placed arrives (the faults
  with a ``client-sent`` point)::

    python benchmarks/fault_trace.py [--bands] DIR

``--bands`` adds, per path, each hop's mean over the faults of each band of
the total (fastest half, ..., slowest 1%): where the tail loses its time.

Faults that joined a page already requested, or whose page the sweep placed
while the request was on its way, miss some points of their path and are left
out (their count is printed).  All times are CLOCK_MONOTONIC, one clock for
the host.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import sys
from collections.abc import Sequence

#: The points of each path, in order (aiopostcopy/trace.py says where each is taken).
PATHS = {
    "delegated": ("touch", "fault-read", "request", "src-request", "src-reply", "answer-read", "woken", "resumed"),
    "self-served": ("touch", "fault-read", "client-sent", "client-request", "request", "src-request", "src-reply",
                    "answer-read", "woken", "placed-sent", "placed-read", "client-woke", "resumed"),
}
HOPS = {
    ("touch", "fault-read"): "fault -> its reader begins the read (uffd wake-up)",
    ("fault-read", "request"): "read -> Request handed to the transport (decode, lane, send)",
    ("fault-read", "client-sent"): "client: read -> ClientRequest written",
    ("client-sent", "client-request"): "ClientRequest -> decoded by the service",
    ("client-request", "request"): "service: ClientRequest -> Request handed to the transport",
    ("request", "src-request"): "Request on the wire -> decoded at the source",
    ("src-request", "src-reply"): "source: read the page, write the reply",
    ("src-reply", "answer-read"): "reply on the wire -> the destination's loop takes it up",
    ("answer-read", "woken"): "destination: decode, place (UFFDIO_COPY; delegated: it wakes)",
    ("woken", "placed-sent"): "service: account, write Placed",
    ("placed-sent", "placed-read"): "Placed -> the client begins the read (a wake-up)",
    ("placed-read", "client-woke"): "client: read the Placed, UFFDIO_WAKE",
    ("client-woke", "resumed"): "woken -> the faulting thread runs again",
    ("woken", "resumed"): "woken -> the faulting thread runs again",
}
TOTAL = "total, in the faulting thread"


def load(directory: str) -> dict[tuple[int, int], dict[str, int]]:
    """(block, page) -> {point: first time in ns} over every trace file in ``directory``."""
    timeline: dict[tuple[int, int], dict[str, int]] = collections.defaultdict(dict)
    for path in sorted(glob.glob(os.path.join(directory, "*.trace"))):
        with open(path, encoding="ascii") as f:
            for line in f:
                event, block, page, when = line.split()
                timeline[(int(block), int(page))].setdefault(event, int(when))
    return timeline


def percentile(ordered: Sequence[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def path_of(points: dict[str, int]) -> str:
    return "self-served" if "client-sent" in points else "delegated"


def report(timeline: dict[tuple[int, int], dict[str, int]]) -> list[str]:
    """The hop table of each path that faults took, for the faults that passed every point of it."""
    touched = [t for t in timeline.values() if "touch" in t]
    lines: list[str] = []
    for path, points in PATHS.items():
        taken = [t for t in touched if path_of(t) == path]
        complete = [t for t in taken if all(p in t for p in points)]
        if not taken:
            continue
        lines += [f"{path}: {len(complete)} faults passed every point ({len(taken)} touched pages not in memory; "
                  "the rest joined a request already made, or the sweep placed the page first)",
                  f"{'hop':<75}{'p50 us':>9}{'p90 us':>9}{'share':>7}"]
        total = sorted((t["resumed"] - t["touch"]) / 1000 for t in complete)
        middle = percentile(total, 0.5)
        for a, b in [*zip(points, points[1:]), ("touch", "resumed")]:
            values = sorted((t[b] - t[a]) / 1000 for t in complete)
            what = TOTAL if (a, b) == ("touch", "resumed") else HOPS[(a, b)]
            share = percentile(values, 0.5) / middle if middle else 0.0
            lines.append(f"{what:<75}{percentile(values, 0.5):>9.1f}{percentile(values, 0.9):>9.1f}{share:>7.0%}")
    return lines or ["no touched page in the traces"]


#: Bands of faults by their total time, as fractions of the faults of a path (fastest first).
BANDS = ((0.0, 0.5), (0.5, 0.9), (0.9, 0.95), (0.95, 0.99), (0.99, 1.0))


def bands(timeline: dict[tuple[int, int], dict[str, int]]) -> list[str]:
    """Where the slow faults lose their time: for each path, its faults sorted by total and cut
    into :data:`BANDS`, each band's mean total and mean of each hop, in us."""
    lines: list[str] = []
    for path, points in PATHS.items():
        done = sorted((t for t in timeline.values() if "touch" in t and path_of(t) == path
                       and all(p in t for p in points)), key=lambda t: t["resumed"] - t["touch"])
        if not done:
            continue
        hops = list(zip(points, points[1:]))
        lines += [f"{path}: {len(done)} faults by their total, mean us per band; hops in path order:",
                  *(f"  {i + 1}. {HOPS[hop]}" for i, hop in enumerate(hops)),
                  f"{'faults':>14}{'n':>7}{'total':>9}" + "".join(f"{i + 1:>8}" for i in range(len(hops)))]
        for low, high in BANDS:
            part = done[int(low * len(done)):int(high * len(done))]
            if not part:
                continue
            mean = lambda a, b: sum(t[b] - t[a] for t in part) / len(part) / 1000  # noqa: E731
            lines.append(f"{f'{low:.0%}-{high:.0%}':>14}{len(part):>7}{mean('touch', 'resumed'):>9.1f}"
                         + "".join(f"{mean(a, b):>8.1f}" for a, b in hops))
    return lines or ["no fault passed every point of its path"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("directory", help="the AIOPOSTCOPY_TRACE directory of one migration")
    parser.add_argument("--bands", action="store_true",
                        help="also each hop's mean by band of the faults' total (where the tail loses its time)")
    args = parser.parse_args(argv)
    timeline = load(args.directory)
    if not timeline:
        print(f"no trace files in {args.directory}", file=sys.stderr)
        return 1
    print("\n".join(report(timeline) + (["", *bands(timeline)] if args.bands else [])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
