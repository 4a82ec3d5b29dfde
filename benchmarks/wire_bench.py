"""Wire codec throughput: messages/s encoded and decoded, payload MB/s through the sink.

Theory of operation
-------------------
Each case pre-builds one message, then times ``encode`` in a loop and times a
decoder fed a pre-encoded stream the way ``asyncio.BufferedProtocol`` feeds
it: ``get_buffer`` / copy one chunk (standing in for ``recv_into``) /
``buffer_updated`` / drain ``next_event``.  Pages cases decode through a
payload sink into a preallocated staging area, so the payload copy is the
one a real ``recv_into`` would do.  Each figure is the best of ``--repeat``
runs of at least ``--seconds``; compare ratios within one run, not absolute
numbers across runs (shared machines drift).

Run:  PYTHONPATH=. python benchmarks/wire_bench.py [--seconds 0.5] [--repeat 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable

from aiopostcopy.messages import PageRun, Pages, Request, Resume, Zero
from aiopostcopy.transport.wire import Decoder, encode, encode_pages_header

PAGE = 4096


class Staging:
    """A ring of page-aligned staging memory handed out to the decoder's sink."""

    def __init__(self, size: int) -> None:
        self.view = memoryview(bytearray(size))
        self.at = 0

    def __call__(self, block: int, first: int, count: int, nbytes: int) -> memoryview:
        if self.at + nbytes > len(self.view):
            self.at = 0
        start, self.at = self.at, self.at + nbytes
        return self.view[start:self.at]


def best_rate(run: Callable[[], int], seconds: float, repeat: int) -> float:
    """Best items/s over ``repeat`` runs, each repeating ``run`` for ``seconds``."""
    best = 0.0
    for _ in range(repeat):
        done, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds:
            done += run()
        best = max(best, done / elapsed)
    return best


def encode_loop(msg: object, batch: int) -> Callable[[], int]:
    def run() -> int:
        for _ in range(batch):
            encode(msg)
        return batch
    return run


def pages_header_loop(nbytes: int, batch: int) -> Callable[[], int]:
    def run() -> int:
        for i in range(batch):
            encode_pages_header(0, i, nbytes // PAGE, nbytes)
        return batch
    return run


def decode_loop(stream: bytes, per_stream: int, chunk: int, sink: Staging | None) -> Callable[[], int]:
    """Feed ``stream`` in ``chunk``-sized recv_into-like copies; return messages decoded."""
    source = memoryview(stream)

    def run() -> int:
        decoder, at, events = Decoder(payload_sink=sink), 0, 0
        while at < len(source):
            buf = decoder.get_buffer(chunk)
            n = min(len(buf), chunk, len(source) - at)
            buf[:n] = source[at:at + n]
            decoder.buffer_updated(n)
            at += n
            while decoder.next_event() is not None:
                events += 1
        assert events == per_stream, (events, per_stream)
        return events
    return run


def resume_message(runs: int) -> Resume:
    bounds = tuple(b for i in range(runs) for b in (10 * i, 10 * i + 3))
    return Resume(session_id="bench", received=((0, bounds),), pending=(PageRun(block=0, first=1, count=2),))


def cases(args: argparse.Namespace) -> dict[str, tuple[object, int]]:
    """name -> (message, frames per decoded stream)."""
    payload = bytes(range(256)) * (PAGE // 256)
    return {
        "request-1-run": (Request(runs=(PageRun(block=0, first=123456, count=1),)), 2000),
        "pages-4k-sink": (Pages(block=0, first=123456, count=1, data=payload), 2000),
        "zero": (Zero(block=0, first=123456, count=64), 2000),
        f"resume-{args.resume_runs}-runs": (resume_message(args.resume_runs), 4),
    }


def measure(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    staging = Staging(64 << 20)
    results: dict[str, dict[str, float]] = {}
    for name, (msg, count) in cases(args).items():
        sink = staging if type(msg) is Pages else None
        frame = encode(msg)
        results[name] = {
            "frame_bytes": len(frame),
            "encode_per_s": best_rate(encode_loop(msg, max(1, count // 4)), args.seconds, args.repeat),
            "decode_per_s": best_rate(decode_loop(frame * count, count, args.chunk, sink), args.seconds, args.repeat),
        }
        if type(msg) is Pages:
            results[name]["header_only_encode_per_s"] = best_rate(
                pages_header_loop(PAGE, count), args.seconds, args.repeat)
    for pages in args.run_pages:
        nbytes = pages * PAGE
        frame = encode(Pages(block=0, first=0, count=pages, data=bytes(nbytes)))
        count = max(4, (64 << 20) // nbytes)
        rate = best_rate(decode_loop(frame * count, count, args.chunk, staging), args.seconds, args.repeat)
        results[f"payload-{pages}-pages-sink"] = {"frames_per_s": rate, "MB_per_s": rate * nbytes / 1e6}
    results["memcpy-baseline"] = {"MB_per_s": memcpy_rate(args, staging)}
    return results


def memcpy_rate(args: argparse.Namespace, staging: Staging) -> float:
    """The same chunked copies into the same staging ring, no decoder: the sink path's ceiling."""
    src, dst = memoryview(bytes(64 << 20)), staging.view

    def run() -> int:
        for at in range(0, len(src), args.chunk):
            dst[at:at + args.chunk] = src[at:at + args.chunk]
        return len(src)
    return best_rate(run, args.seconds, args.repeat) / 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=0.5, help="minimum time per measurement")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure; the best is kept")
    parser.add_argument("--chunk", type=int, default=256 << 10, help="bytes per simulated recv_into")
    parser.add_argument("--resume-runs", type=int, default=10_000, help="runs in the Resume case")
    parser.add_argument("--run-pages", type=int, nargs="+", default=[1, 16, 64],
                        help="pages per Pages frame for the MB/s figures")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    results = measure(args)
    if args.json:
        json.dump(results, sys.stdout, indent=2)
        print()
        return 0
    for name, figures in results.items():
        shown = "  ".join(f"{key}={value:,.0f}" for key, value in figures.items())
        print(f"{name:28} {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
