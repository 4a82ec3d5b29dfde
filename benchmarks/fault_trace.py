"""Where a remote fault's time goes: join the per-process traces of one migration by page.

Theory of operation
-------------------
Run a migration with ``AIOPOSTCOPY_TRACE=DIR`` in the environment of the
source, the destination and the workers (``postcopy_bench.py --trace DIR``
does it for one extra run of a scenario).  Each process writes
``DIR/<role>.<pid>.trace`` (see :mod:`aiopostcopy.trace`).  This script reads
them all, keeps the first time of each point per (block, page), and for the
faults that passed every point prints the distribution of each hop::

    python benchmarks/fault_trace.py DIR

Faults that joined a page already requested, or whose page the sweep placed
while the request was on its way, miss some points and are left out (their
count is printed).  All times are CLOCK_MONOTONIC, one clock for the host.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import sys
from collections.abc import Sequence

POINTS = ("touch", "request", "src-request", "src-reply", "reply", "woken", "resumed")
HOPS = {
    ("touch", "request"): "fault -> Request handed to the transport (uffd wake-up, read, coalesce)",
    ("request", "src-request"): "Request on the wire -> decoded at the source",
    ("src-request", "src-reply"): "source: read the page, write the reply",
    ("src-reply", "reply"): "reply on the wire -> decoded at the destination",
    ("reply", "woken"): "destination: place (UFFDIO_COPY) and wake",
    ("woken", "resumed"): "woken -> the faulting thread runs again",
    ("touch", "resumed"): "total, in the faulting thread",
}


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


def report(timeline: dict[tuple[int, int], dict[str, int]]) -> list[str]:
    """The hop table for the faults that passed every point, in path order."""
    complete = [t for t in timeline.values() if all(p in t for p in POINTS)]
    touched = sum(1 for t in timeline.values() if "touch" in t)
    lines = [f"{len(complete)} faults passed every point ({touched} touched pages not in memory; the rest "
             "joined a request already made, or the sweep placed the page first)",
             f"{'hop':<75}{'p50 us':>9}{'p90 us':>9}{'share':>7}"]
    total = sorted((t["resumed"] - t["touch"]) / 1000 for t in complete)
    for (a, b), what in HOPS.items():
        values = sorted((t[b] - t[a]) / 1000 for t in complete)
        share = percentile(values, 0.5) / percentile(total, 0.5) if total and percentile(total, 0.5) else 0.0
        lines.append(f"{what:<75}{percentile(values, 0.5):>9.1f}{percentile(values, 0.9):>9.1f}{share:>7.0%}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("directory", help="the AIOPOSTCOPY_TRACE directory of one migration")
    args = parser.parse_args(argv)
    timeline = load(args.directory)
    if not timeline:
        print(f"no trace files in {args.directory}", file=sys.stderr)
        return 1
    print("\n".join(report(timeline)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
