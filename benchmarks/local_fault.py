"""Local fault round trip: a thread faults, an event loop places the page.

Theory of operation
-------------------
A plain thread (the "toucher") reads one byte of each fresh page of a
memfd mapping registered with userfaultfd (MISSING), one page at a time, and
times each access with ``time.perf_counter_ns``: that is the whole round trip
(fault -> event queued -> handler wakes -> read() -> UFFDIO_COPY -> toucher
woken -> back in Python).  The access is made from C with the GIL released
(``lib.apc_touch``), so the handler can run while the toucher waits.

The handler is what the service does: ``loop.add_reader`` on the uffd, drain
``read_events()`` (one read() of up to 64 messages) and resolve each fault
with one ``copy`` from a prepared page.  It runs on the stock asyncio loop
and on uvloop in the same invocation, and, as the baseline, in a plain thread
that polls the fd itself (no event loop), and as the reference, the same
toucher and handler written in C (compiled with cffi at start-up).  When the region is used up it is
recycled with fallocate(PUNCH_HOLE) outside the timed accesses.

DESIGN.md section 5 has C and Python figures for orientation; compare ratios
from one run, never absolute figures from different runs.

Run::

    .venv/bin/python benchmarks/local_fault.py --faults 20000 --loop both
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import select
import statistics
import sys
import threading
import time
from array import array
from collections.abc import Callable

from aiopostcopy.uffd import PageFault, SharedMemory, Userfaultfd, buffer_address, default_page_size
from aiopostcopy.uffd.binding import lib

PAGE = default_page_size()
WARMUP = 200

# The C reference: the same toucher and handler, both in C (a pthread handler
# polling the uffd, one UFFDIO_COPY per fault). Built with cffi at run time.
C_REFERENCE = r"""
#include <linux/userfaultfd.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <sys/ioctl.h>
#include <time.h>
struct bench { int uffd; uint64_t src; volatile int stop; };
static void *bench_handler(void *arg)
{
    struct bench *b = arg;
    struct uffd_msg msgs[64];
    struct pollfd pfd = { .fd = b->uffd, .events = POLLIN };
    while (!b->stop) {
        if (poll(&pfd, 1, 50) <= 0)
            continue;
        ssize_t got = read(b->uffd, msgs, sizeof msgs);
        for (ssize_t i = 0; got > 0 && i < got / (ssize_t)sizeof msgs[0]; i++) {
            struct uffdio_copy c = { .dst = msgs[i].arg.pagefault.address & ~4095ULL,
                                     .src = b->src, .len = 4096, .mode = 0 };
            ioctl(b->uffd, UFFDIO_COPY, &c);
        }
    }
    return NULL;
}
static int64_t bench_now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}
int bench_c(int uffd, int memfd, uint64_t base, uint64_t src, long pages, long faults, int64_t *lat)
{
    struct bench b = { .uffd = uffd, .src = src, .stop = 0 };
    pthread_t handler;
    if (pthread_create(&handler, NULL, bench_handler, &b) != 0)
        return -1;
    for (long i = 0; i < faults; i++) {
        long page = i % pages;
        if (page == 0 && i)
            fallocate(memfd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, pages * 4096);
        int64_t start = bench_now();
        (void)*(volatile char *)(uintptr_t)(base + page * 4096);
        lat[i] = bench_now() - start;
    }
    b.stop = 1;
    pthread_join(handler, NULL);
    return 0;
}
"""


def build_c_reference() -> object | None:
    """Compile the C reference into a temp dir; None (with a note) if that fails."""
    import importlib.util
    import tempfile

    from cffi import FFI

    builder = FFI()
    builder.cdef("int bench_c(int, int, uint64_t, uint64_t, long, long, int64_t *);")
    builder.set_source("_apc_local_fault_c", C_REFERENCE, libraries=["pthread"])
    with tempfile.TemporaryDirectory(prefix="apc-bench-") as tmp:  # removed once loaded
        try:
            path = builder.compile(tmpdir=tmp, verbose=False)
        except Exception as exc:  # a missing compiler only drops the reference row
            print(f"(no C reference: {exc})", file=sys.stderr)
            return None
        spec = importlib.util.spec_from_file_location("_apc_local_fault_c", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


class Region:
    """A registered memfd mapping, a copy source page, and the uffd."""

    def __init__(self, pages: int) -> None:
        self.pages = pages
        self.shm = SharedMemory.memfd("local-fault-bench", pages * PAGE)
        self.mapping = self.shm.map()
        self.uffd = Userfaultfd.open()
        self.uffd.register(self.mapping.address, self.mapping.length)
        self.source = bytearray(b"\x5a" * PAGE)
        self.src = buffer_address(self.source)

    def resolve_pending(self) -> int:
        """The handler: drain every queued event, copy each faulting page."""
        copy, src, mask = self.uffd.copy, self.src, ~(PAGE - 1)
        handled = 0
        for event in self.uffd.read_events(64):
            if type(event) is PageFault:
                copy(event.address & mask, src, PAGE)
                handled += 1
        return handled

    def close(self) -> None:
        self.uffd.close()
        self.mapping.close()
        self.shm.close()


def touch_pages(region: Region, faults: int, latencies: array) -> None:
    """The toucher: fault ``faults`` fresh pages one by one, timing each."""
    touch, now = lib.apc_touch, time.perf_counter_ns
    base, pages = region.mapping.address, region.pages
    for i in range(faults):
        page = i % pages
        if page == 0 and i:
            region.shm.punch_hole(0, pages * PAGE)  # recycle: every page is missing again
        start = now()
        touch(base + page * PAGE, 1, PAGE, 0, 0)
        latencies[i] = now() - start


def run_on_loop(new_loop: Callable[[], asyncio.AbstractEventLoop], faults: int, pages: int) -> array:
    """Handler on an event loop (add_reader); returns per-fault latencies in ns."""
    region, latencies = Region(pages), array("q", bytes(8 * faults))
    loop = new_loop()
    try:
        loop.run_until_complete(_serve(loop, region, faults, latencies))
    finally:
        loop.close()
        region.close()
    return latencies


async def _serve(loop: asyncio.AbstractEventLoop, region: Region, faults: int, latencies: array) -> None:
    finished: asyncio.Future[None] = loop.create_future()

    def toucher() -> None:
        try:
            touch_pages(region, faults, latencies)
        finally:
            loop.call_soon_threadsafe(finished.set_result, None)

    loop.add_reader(region.uffd.fd, region.resolve_pending)
    thread = threading.Thread(target=toucher, name="toucher")
    thread.start()
    try:
        await finished
    finally:
        loop.remove_reader(region.uffd.fd)
        thread.join()


def run_on_thread(faults: int, pages: int) -> array:
    """Baseline: the handler in a plain thread polling the uffd (no event loop)."""
    region, latencies = Region(pages), array("q", bytes(8 * faults))
    stop_r, stop_w = os.pipe()
    poller = select.poll()
    poller.register(region.uffd.fd, select.POLLIN)
    poller.register(stop_r, select.POLLIN)

    def handler() -> None:
        while True:
            ready = poller.poll()
            if any(fd == stop_r for fd, _ in ready):
                return
            region.resolve_pending()

    thread = threading.Thread(target=handler, name="handler")
    thread.start()
    try:
        touch_pages(region, faults, latencies)
    finally:
        os.write(stop_w, b"x")
        thread.join()
        os.close(stop_r)
        os.close(stop_w)
        region.close()
    return latencies


def run_in_c(module: object, faults: int, pages: int) -> array:
    """Reference: toucher and handler both in C, on the same kind of region."""
    region, latencies = Region(pages), array("q", bytes(8 * faults))
    ffi = module.ffi  # type: ignore[attr-defined]
    out = ffi.from_buffer("int64_t[]", latencies)
    try:
        rc = module.lib.bench_c(  # type: ignore[attr-defined]
            region.uffd.fd, region.shm.fd, region.mapping.address, region.src, pages, faults, out
        )
        assert rc == 0, "pthread_create failed"
    finally:
        region.close()
    return latencies


def _p50(values: array | list[int]) -> float:
    return statistics.median(values) / 1000


def summarize(name: str, rounds: list[array], base: list[array] | None) -> dict[str, object]:
    """Pooled rate and percentiles (us), plus the median over rounds of p50 / base p50.

    The ratio pairs each round with the baseline run just before it, which
    cancels most of the drift between the VM's fast and slow wake-up modes.
    """
    timed = sorted(v for r in rounds for v in r)
    pick = lambda q: timed[min(len(timed) - 1, int(q * len(timed)))] / 1000  # noqa: E731
    ratio = None if base is None else statistics.median(_p50(r) / _p50(b) for r, b in zip(rounds, base))
    return {
        "name": name,
        "faults": len(timed),
        "rate": len(timed) / (sum(timed) / 1e9),
        "p50": pick(0.50),
        "p90": pick(0.90),
        "p99": pick(0.99),
        "max": timed[-1] / 1000,
        "ratio": ratio,
    }


def _loop_factories(which: str) -> list[tuple[str, Callable[[], asyncio.AbstractEventLoop]]]:
    factories: list[tuple[str, Callable[[], asyncio.AbstractEventLoop]]] = []
    if which in ("asyncio", "both"):
        factories.append(("asyncio", asyncio.SelectorEventLoop))
    if which in ("uvloop", "both"):
        import uvloop

        factories.append(("uvloop", uvloop.new_event_loop))
    return factories


def print_table(rows: list[dict[str, object]], base_name: str | None) -> None:
    """One line per handler; the last column is the paired p50 ratio to the baseline."""
    head = f"{'handler':<15}{'faults':>7}{'faults/s':>10}{'p50 us':>8}{'p90 us':>8}{'p99 us':>8}{'max us':>8}"
    print(head + ("" if base_name is None else f"  p50 / {base_name} (paired median)"))
    for r in rows:
        line = (
            f"{r['name']:<15}{r['faults']:>7}{r['rate']:>10.0f}{r['p50']:>8.1f}"
            f"{r['p90']:>8.1f}{r['p99']:>8.1f}{r['max']:>8.0f}"
        )
        print(line + ("" if r["ratio"] is None else f"  {r['ratio']:.2f}"))


def _runners(args: argparse.Namespace) -> list[tuple[str, Callable[[], array]]]:
    total = args.faults + WARMUP
    runners: list[tuple[str, Callable[[], array]]] = []
    reference = None if args.no_baseline else build_c_reference()
    if reference is not None:
        runners.append(("C (reference)", lambda: run_in_c(reference, total, args.pages)))
    if not args.no_baseline:
        runners.append(("python thread", lambda: run_on_thread(total, args.pages)))
    for name, factory in _loop_factories(args.loop):
        runners.append((name, lambda f=factory: run_on_loop(f, total, args.pages)))
    return runners


def main(argv: list[str] | None = None) -> int:
    """Parse flags, run every handler ``--repeat`` times interleaved, print one table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faults", type=int, default=5000, help="timed faults per run (default 5000)")
    parser.add_argument("--pages", type=int, default=4096, help="region size in pages, recycled (default 4096)")
    parser.add_argument("--loop", choices=("asyncio", "uvloop", "both"), default="both")
    parser.add_argument("--repeat", type=int, default=10, help="interleaved rounds (default 10)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the C and plain-thread baselines")
    args = parser.parse_args(argv)
    runners = _runners(args)
    rounds: dict[str, list[array]] = {name: [] for name, _ in runners}
    gc.disable()
    for _ in range(args.repeat):
        for name, run in runners:
            rounds[name].append(run()[WARMUP:])
    gc.enable()
    base_name = None if args.no_baseline else runners[0][0]
    base = None if base_name is None else rounds[base_name]
    with Userfaultfd.open() as probe:
        how = probe.mode.value if probe.mode else "?"
    print(f"local 4 KiB faults: {args.repeat} rounds x {args.faults} per handler, one at a time; "
          f"uffd via {how}; python {sys.version.split()[0]}; {os.cpu_count()} CPUs")
    print_table([summarize(name, r, base) for name, r in rounds.items()], base_name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
