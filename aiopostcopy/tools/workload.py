"""A worker process for demos, end-to-end tests and benchmarks.

Theory of operation
-------------------
``python -m aiopostcopy.tools.workload --socket PATH ...`` joins a destination
service with :class:`~aiopostcopy.client.Client`, then starts ``--threads``
touching threads (named ``touch-<slot>`` in Python and in /proc, so the
service can report them).  Each thread touches ``--touches`` pages over all
blocks: ``random`` picks pages at random, ``sequential`` walks them in order
(thread *i* starting at the *i*-th fraction of the pages), ``idle`` touches
nothing.  A touch reads one byte of the page: a page that has not arrived
blocks that thread in the kernel until it is placed, and only that thread.
The touches run in C (:mod:`aiopostcopy.tools.touch`), a batch of them per
call with the GIL released, as a vCPU runs no interpreter between two reads of
memory; the pages are picked in Python before each batch, the same pages in
the same order as the Python loop, which runs instead with ``--counters``,
with a trace, or where the C loop is not built (a touch there is a
``ctypes.memmove``, which releases the GIL while it waits; see the GIL note
in :mod:`aiopostcopy.client`).  A touch is timed with CLOCK_MONOTONIC
(``perf_counter_ns`` in Python).
Before the first touch of each page by this process, mincore(2) says whether
the page is in memory yet (for shared memory it reports the page cache, which
is what a userfaultfd MISSING fault depends on): if not, the touch is a
*fault* and its time a fault-latency sample; if so, it is a *hit* (counted,
not timed as a fault).  A page placed between the check and the touch makes a
fast "fault": the race errs towards better figures by at most that.  On
hugetlbfs mincore reports this process's page table instead, so a page the
service placed but this process has not mapped yet counts as a fault (a fast
one): the hit count is then a lower bound.

``--wait-socket SECONDS`` lets a worker start before the destination: it
waits for the control socket to appear, then joins within a millisecond, as
a workload already running on the destination host would.

With ``--counters`` (the kernel selftests' stress run) a touch instead
increments the thread's own 8-byte little-endian counter at offset
``8 * slot`` of the page, ``slot = --slot-base + thread index`` (< 64, see
:data:`~aiopostcopy.tools.pattern.COUNTER_SLOTS`), and the thread tallies its
increments per (block, page).

After End the worker checks every page of every block against
:mod:`aiopostcopy.tools.pattern` (counter areas ignored), and with ``--counters``
every counter slot of its threads against their tallies, then prints one JSON
object (see :func:`report`).  Exit status: 0 only if the migration completed
and everything verified; 1 if a check failed; 2 if the run could not finish
(the process then exits without closing its userfaultfd, so no waiting
thread can ever read a zero-filled page).
"""

from __future__ import annotations

import argparse
import bisect
import ctypes
import json
import os
import random
import sys
import threading
import time

from aiopostcopy import trace
from aiopostcopy.client import Client, name_native_thread
from aiopostcopy.errors import PostcopyError
from aiopostcopy.messages import ClientMode
from aiopostcopy.tools import touch
from aiopostcopy.tools.pattern import COUNTER_BYTES, COUNTER_SLOTS, check_page, verify_block

__all__ = ["main", "parse_args", "Toucher", "report", "summarize"]

_MAX_LISTED = 50  #: bad pages / counter mismatches listed in the report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m aiopostcopy.tools.workload", description=__doc__.split("\n")[0])
    parser.add_argument("--socket", required=True, help="the service's Unix control socket")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mode", choices=[m.value for m in ClientMode], default=ClientMode.DELEGATED.value)
    parser.add_argument("--workload", choices=["random", "sequential", "idle"], default="random")
    parser.add_argument("--touches", type=int, default=1000, help="page touches per thread")
    parser.add_argument("--seed", type=int, default=0, help="pattern seed (as the source's); also seeds 'random'")
    parser.add_argument("--zero-every", type=int, default=7, help="pattern zero-page rate (as the source's)")
    parser.add_argument("--slot-base", type=int, default=0, help="first counter slot of this process")
    parser.add_argument("--counters", action="store_true", help="stress mode: count touches in the pages")
    parser.add_argument("--name", default=None, help="client name the service reports")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the touches and End")
    parser.add_argument("--json", default="-", help="where to write the report ('-' for stdout)")
    parser.add_argument("--raw-latencies", action="store_true", help="include every latency sample (ns)")
    parser.add_argument("--wait-socket", type=float, default=0.0, metavar="SECONDS",
                        help="wait up to this long for the control socket to appear before joining")
    parser.add_argument("--ready", action="store_true",
                        help="print 'ready' on stdout once started, before waiting for the socket")
    args = parser.parse_args(argv)
    if args.threads < 0 or args.touches < 0:
        parser.error("--threads and --touches must not be negative")
    if args.counters and not 0 <= args.slot_base <= COUNTER_SLOTS - max(args.threads, 1):
        parser.error(f"counter slots {args.slot_base}..{args.slot_base + args.threads - 1} do not fit in 0..63")
    return args


class Toucher:
    """The pages of a client's blocks as one flat index, and the touch itself.

    Args:
        client: a joined client.
    """

    def __init__(self, client: Client, *, in_c: bool = False) -> None:
        self.infos = client.block_info
        self.bases = [client.block_addresses[info.name] for info in self.infos]
        self.starts: list[int] = []
        total = 0
        for info in self.infos:
            self.starts.append(total)
            total += info.pages
        self.total = total
        #: the pages first touched by any thread of the process, when the touches run in C
        self.seen_pages = touch.SeenPages(total) if in_c else None

    def locate(self, flat: int) -> tuple[int, int]:
        """Flat page index -> (block index, page)."""
        block = bisect.bisect_right(self.starts, flat) - 1
        return block, flat - self.starts[block]

    def address(self, block: int, page: int, offset: int) -> int:
        return self.bases[block] + page * self.infos[block].page_size + offset

    def resident(self, block: int, page: int, vec: ctypes.Array) -> bool:
        """Whether the page is in memory already (mincore; a touch of it will not fault)."""
        size = self.infos[block].page_size  # asked about its first 4 KiB: a huge page is there whole or not
        if _libc.mincore(ctypes.c_void_p(self.bases[block] + page * size), ctypes.c_size_t(4096), vec) != 0:
            return False  # unknown: count the touch as a fault, as before
        return bool(vec[0] & 1)


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


def _touch_loop(toucher: Toucher, args: argparse.Namespace, index: int, out: dict) -> None:
    """One touching thread: fills ``out`` with latencies, first-touch keys and tallies."""
    slot = args.slot_base + index
    name_native_thread(f"touch-{slot}")
    rng = random.Random(args.seed * 1_000_003 + slot)
    if toucher.seen_pages is not None:  # the C loop: no counters, no trace
        return _touch_in_c(toucher, args, index, rng, out)
    scratch = ctypes.create_string_buffer(8)
    vec = (ctypes.c_ubyte * 1)()  # mincore's vector: one byte, for the first 4 KiB of the page
    latencies, tally, seen = out["latencies"], out["tally"], out["seen"]
    offset = 8 * slot if args.counters else COUNTER_BYTES
    start = toucher.total * index // max(args.threads, 1)
    for step in range(args.touches if toucher.total else 0):
        flat = rng.randrange(toucher.total) if args.workload == "random" else (start + step) % toucher.total
        key = toucher.locate(flat)
        address = toucher.address(key[0], key[1], offset)
        first = key not in seen
        seen.add(key)
        fault = first and not toucher.resident(key[0], key[1], vec)
        if trace.ENABLED and fault:
            trace.mark("touch", key[0], key[1])
        begin = time.perf_counter_ns()
        ctypes.memmove(scratch, address, 8 if args.counters else 1)  # releases the GIL while it faults
        took = time.perf_counter_ns() - begin
        if trace.ENABLED and fault:
            trace.mark("resumed", key[0], key[1])
        if fault:
            latencies.append(took)
        elif first:
            out["hits"] += 1
        if args.counters:
            value = int.from_bytes(scratch.raw, "little") + 1
            ctypes.memmove(address, value.to_bytes(8, "little"), 8)
            tally[key] = tally.get(key, 0) + 1


def _touch_in_c(toucher: Toucher, args: argparse.Namespace, index: int, rng: random.Random, out: dict) -> None:
    """:func:`_touch_loop`'s touches, the same pages in the same order, by
    :func:`~aiopostcopy.tools.touch.touch_pages` in batches: the pages are picked here,
    before each batch, and each batch runs without the GIL."""
    seen = toucher.seen_pages
    assert seen is not None
    start = toucher.total * index // max(args.threads, 1)
    for first_step in range(0, args.touches if toucher.total else 0, touch.BATCH):
        steps = range(first_step, min(first_step + touch.BATCH, args.touches))
        flats = [rng.randrange(toucher.total) if args.workload == "random" else (start + step) % toucher.total
                 for step in steps]
        pages = [toucher.address(*toucher.locate(flat), 0) for flat in flats]
        latencies, hits = touch.touch_pages(pages, flats, COUNTER_BYTES, seen)
        out["latencies"].extend(latencies)
        out["hits"] += hits


def summarize(latencies_ns: list[int]) -> dict:
    """count, mean, p50, p90, p99 and max of latencies, in microseconds."""
    if not latencies_ns:
        return {"count": 0}
    ordered = sorted(latencies_ns)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000, 2)

    return {"count": len(ordered), "mean_us": round(sum(ordered) / len(ordered) / 1000, 2),
            "p50_us": at(0.50), "p90_us": at(0.90), "p99_us": at(0.99), "max_us": round(ordered[-1] / 1000, 2)}


def verify_pages(client: Client, args: argparse.Namespace) -> tuple[int, list[dict]]:
    """Check every page of every block; return (bad page count, the first few described)."""
    count, listed = 0, []
    views = client.blocks
    for index, info in enumerate(client.block_info):
        view = views[info.name]
        bad = verify_block(view, index, info.page_size, args.seed, args.zero_every, counters_ok=True)
        count += len(bad)
        for page in bad[:_MAX_LISTED - len(listed)]:
            chunk = view[page * info.page_size:(page + 1) * info.page_size]
            problem = check_page(chunk, index, page, info.page_size, args.seed, args.zero_every, ignore_counters=True)
            listed.append({"block": info.name, "page": page, "problem": problem})
    return count, listed


def verify_counters(client: Client, args: argparse.Namespace, tallies: list[dict]) -> tuple[int, list[dict]]:
    """Compare each thread's counter slot in every page with its tally."""
    count, listed = 0, []
    views = client.blocks
    for index, info in enumerate(client.block_info):
        words = views[info.name].cast("Q")
        stride = info.page_size // 8
        for thread, tally in enumerate(tallies):
            slot = args.slot_base + thread
            for page, value in enumerate(words[slot::stride].tolist()):
                expected = tally.get((index, page), 0)
                if value != expected:
                    count += 1
                    if len(listed) < _MAX_LISTED:
                        listed.append({"block": info.name, "page": page, "slot": slot, "value": value,
                                       "expected": expected})
        words.release()
    return count, listed


def report(args: argparse.Namespace, client: Client | None, results: list[dict], timings: dict,
           **fields: object) -> dict:
    """Build the JSON report printed at the end.

    Fields: pid, mode, workload, threads, touches, seed, slot_base, counters,
    thread_names; latencies (count, mean_us, p50_us, p90_us, p99_us, max_us of
    faults: first touches of pages not yet in memory); hits (first touches of
    pages already there); join_ms, touch_ms, verify_ms; end_complete, ok, error;
    bad_page_count and bad_pages (the first 50: block, page, problem);
    counter_mismatches and counter_examples; blocks; client (its statistics());
    latencies_ns (every fault sample) with ``--raw-latencies``.
    """
    latencies = [value for out in results for value in out["latencies"]]
    body = {
        "pid": os.getpid(), "mode": args.mode, "workload": args.workload, "threads": args.threads,
        "touches": args.touches, "seed": args.seed, "slot_base": args.slot_base, "counters": args.counters,
        "thread_names": [f"touch-{args.slot_base + i}" for i in range(args.threads)],
        "latencies": summarize(latencies), "hits": sum(out.get("hits", 0) for out in results),
        **timings, **fields,
    }
    if client is not None:
        body["blocks"] = [{"name": b.name, "length": b.length, "page_size": b.page_size} for b in client.block_info]
        body["client"] = client.statistics()
    if args.raw_latencies:
        body["latencies_ns"] = latencies
    return body


def _emit(args: argparse.Namespace, body: dict) -> None:
    text = json.dumps(body, default=str)
    if args.json == "-":
        print(text, flush=True)
    else:
        with open(args.json, "w") as out:
            out.write(text + "\n")


def _run_threads(client: Client, args: argparse.Namespace, deadline: float) -> tuple[list[dict], bool]:
    toucher = Toucher(client, in_c=touch.available() and not args.counters and not trace.ENABLED)
    results = [{"latencies": [], "tally": {}, "seen": set(), "hits": 0} for _ in range(args.threads)]
    if args.workload == "idle":
        return results, True
    shared_seen: set = set()
    for out in results:
        out["seen"] = shared_seen  # "first touch" is per process
    threads = [threading.Thread(target=_touch_loop, args=(toucher, args, i, out), name=f"touch-{args.slot_base + i}",
                                daemon=True) for i, out in enumerate(results)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    return results, not any(thread.is_alive() for thread in threads)


def main(argv: list[str] | None = None) -> int:
    """Run the worker; returns the exit status (see the module docstring)."""
    args = parse_args(argv)
    trace.start("worker")
    if args.ready:
        print("ready", flush=True)
    if args.wait_socket > 0 and not _wait_for(args.socket, args.wait_socket):
        _emit(args, report(args, None, [], {}, end_complete=False, ok=False,
                           error=f"the control socket {args.socket} did not appear within {args.wait_socket} s"))
        return 2
    began = time.monotonic()
    deadline = began + args.timeout
    try:
        client = Client.join(args.socket, mode=ClientMode(args.mode), name=args.name, timeout=min(args.timeout, 60.0))
    except PostcopyError as exc:  # nothing is registered yet: a normal exit is safe
        _emit(args, report(args, None, [], {}, end_complete=False, error=f"{type(exc).__name__}: {exc}", ok=False))
        return 2
    timings = {"join_ms": round((time.monotonic() - began) * 1000, 2)}
    results, finished = _run_threads(client, args, deadline)
    timings["touch_ms"] = round((time.monotonic() - began) * 1000 - timings["join_ms"], 2)
    try:
        complete = finished and client.wait_end(max(0.0, deadline - time.monotonic()))
        error = None if complete else "timed out waiting for " + ("End" if finished else "the touching threads")
    except Exception as exc:  # noqa: BLE001 - reported in the JSON
        complete, error = False, f"{type(exc).__name__}: {exc}"
    if not complete:
        _emit(args, report(args, client, results, timings, end_complete=False, error=error, ok=False))
        os._exit(2)  # threads may still wait for pages: never close the uffd under them
    checked = time.monotonic()
    bad_count, bad_pages = verify_pages(client, args)
    mismatches, examples = verify_counters(client, args, [out["tally"] for out in results]) if args.counters else (0, [])
    timings["verify_ms"] = round((time.monotonic() - checked) * 1000, 2)
    ok = bad_count == 0 and mismatches == 0
    body = report(args, client, results, timings, end_complete=True, error=None, ok=ok, bad_page_count=bad_count,
                  bad_pages=bad_pages, counter_mismatches=mismatches, counter_examples=examples)
    client.leave()
    _emit(args, body)
    return 0 if ok else 1


def _wait_for(path: str, seconds: float) -> bool:
    """Poll for ``path`` every half millisecond for up to ``seconds``."""
    deadline = time.monotonic() + seconds
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.0005)
    time.sleep(0.002)  # the path appears at bind(); listen() follows in the same call
    return True


if __name__ == "__main__":
    sys.exit(main())
