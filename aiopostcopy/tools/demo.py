"""``python -m aiopostcopy demo``: a whole postcopy migration on this host.

1. Make a source image (default 256 MiB) in a private directory under
   /dev/shm with a per-page pattern (see :mod:`aiopostcopy.tools.pattern`; about one
   page in seven is a zero page).
2. Start a source process on loopback serving that image.
3. Start client processes (default 4, two threads each; delegated and
   self-served alternate).  They start first and wait for the control socket,
   as a workload already running on the destination host would, so they join
   within a millisecond of the service opening it and touch pages while the
   background sweep runs.  Each measures fault latency in its faulting
   threads (a touch of a page not yet in memory; touches of pages already
   there are counted as hits) and verifies every page after the end.
4. Start the destination service here, with a Unix control socket.
5. Show progress, then verify every page of the destination's block file
   against the pattern, and print a summary (``--json FILE`` for the same as
   JSON).

Everything created is removed at the end, and processes are stopped by the
PIDs started here, also when the demo is interrupted (SIGINT, SIGTERM: the
run is cancelled and cleans up).  Children also get PR_SET_PDEATHSIG, so a
demo killed outright (SIGKILL) takes its source and clients with it.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import mmap
import os
import shutil
import signal
import sys
import tempfile
import time
from typing import Any

from aiopostcopy.core.config import DestinationConfig
from aiopostcopy.errors import PostcopyError
from aiopostcopy.loop import DestinationOptions, PostcopyDestination
from aiopostcopy.tools.pattern import fill, verify_block
from aiopostcopy.tools.progress import ProgressLine

__all__ = ["add_demo_arguments", "demo_main", "percentiles"]

BLOCK = "ram"
_PR_SET_PDEATHSIG = 1  #: <linux/prctl.h>


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    text = text.strip().lower().rstrip("ib")
    scale = units.get(text[-1:], 1)
    value = int(float(text[:-1] if text[-1:] in units else text) * scale)
    if value <= 0 or value % 4096:
        raise argparse.ArgumentTypeError("size must be a positive multiple of 4 KiB")
    return value


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", type=_size, default=256 << 20, help="block size (default 256M)")
    parser.add_argument("--clients", type=int, default=4, help="client processes (default 4)")
    parser.add_argument("--threads", type=int, default=2, help="touching threads per client (default 2)")
    parser.add_argument("--workload", choices=["random", "sequential", "idle"], default="random")
    parser.add_argument("--touches", type=int, default=2000, help="page touches per thread (default 2000)")
    parser.add_argument("--mode", choices=["mixed", "delegated", "self-served"], default="mixed",
                        help="client mode (mixed alternates delegated and self-served)")
    parser.add_argument("--seed", type=int, default=1, help="pattern seed")
    parser.add_argument("--json", default=None, help="write the summary as JSON here ('-' for stdout)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


async def demo_main(args: argparse.Namespace) -> int:
    workdir = tempfile.mkdtemp(prefix="aiopostcopy-demo-", dir="/dev/shm")
    procs: list[asyncio.subprocess.Process] = []
    loop, task = asyncio.get_running_loop(), asyncio.current_task()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)  # type: ignore[union-attr]
    try:
        return await _demo(args, workdir, procs)
    except PostcopyError as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    except asyncio.CancelledError:
        print("demo interrupted", file=sys.stderr)
        return 130
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await _stop(procs)
        shutil.rmtree(workdir, ignore_errors=True)


async def _demo(args: argparse.Namespace, workdir: str, procs: list) -> int:
    image = os.path.join(workdir, "source.img")
    _make_image(image, args.size, args.seed)
    source, address = await _start_source(image, procs)
    dest_dir = os.path.join(workdir, "dest")
    os.mkdir(dest_dir)
    options = DestinationOptions(source=address, block_dir=dest_dir, control_path=os.path.join(workdir, "clients.sock"),
                                 session=DestinationConfig())
    clients = [await _start_client(args, options.control_path, i, procs) for i in range(args.clients)]
    await _wait_ready(clients)
    async with PostcopyDestination(options) as dest:
        print(f"demo: {args.size >> 20} MiB block, source pid {source.pid} on {address[0]}:{address[1]}, "
              f"userfaultfd opened via {dest.uffd_mode}", file=sys.stderr)
        if not args.quiet:
            dest.on_progress(ProgressLine(sys.stderr).update)
        report = await dest.wait_complete()
        results = await asyncio.gather(*(_client_result(c) for c in clients))
        began = time.monotonic()
        bad = verify_block(dest.memory(BLOCK), 0, 4096, args.seed)
        verify_s = time.monotonic() - began
    await asyncio.wait_for(source.wait(), 10)
    summary = _summary(args, report, results, bad, verify_s)
    _print_summary(summary, report)
    if args.json:
        text = json.dumps(summary, indent=2)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w", encoding="utf-8") as f:
                f.write(text + "\n")
    ok = report.verified and not bad and all(r.get("ok") for r in results) and source.returncode == 0
    return 0 if ok else 1


def _make_image(path: str, size: int, seed: int) -> None:
    with open(path, "w+b") as f:
        f.truncate(size)
        with mmap.mmap(f.fileno(), size) as memory:
            fill(memory, 0, 4096, seed, assume_zeroed=True)


async def _start_source(image: str, procs: list) -> tuple[asyncio.subprocess.Process, tuple[str, int]]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "aiopostcopy", "source", "--listen", "127.0.0.1:0", "--block", f"{BLOCK}={image}",
        stdout=asyncio.subprocess.PIPE, preexec_fn=_die_with_parent)
    procs.append(proc)
    line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
    if "listening on" not in line:
        raise PostcopyError(f"source did not start: {line!r}")
    host, _, port = line.rsplit(" ", 1)[1].strip().rpartition(":")
    return proc, (host, int(port))


async def _start_client(args: argparse.Namespace, path: str, index: int, procs: list) -> asyncio.subprocess.Process:
    mode = args.mode if args.mode != "mixed" else ("delegated", "self-served")[index % 2]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "aiopostcopy.tools.workload", "--socket", path, "--threads", str(args.threads),
        "--mode", mode, "--workload", args.workload, "--touches", str(args.touches), "--seed", str(args.seed),
        "--name", f"demo-client-{index}", "--raw-latencies", "--json", "-", "--wait-socket", "60",
        "--ready", stdout=asyncio.subprocess.PIPE, preexec_fn=_die_with_parent)
    procs.append(proc)
    return proc


async def _wait_ready(clients: list[asyncio.subprocess.Process]) -> None:
    """Wait until every client has imported everything and waits for the socket."""
    for proc in clients:
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode().strip()
        if line != "ready":
            raise PostcopyError(f"client pid {proc.pid} did not start: {line!r}")


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL this process when the demo dies (PR_SET_PDEATHSIG)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


async def _client_result(proc: asyncio.subprocess.Process) -> dict[str, Any]:
    out, _ = await proc.communicate()
    try:
        result = json.loads(out.decode() or "{}")
    except json.JSONDecodeError:
        result = {"error": f"unreadable output: {out[:200]!r}"}
    result["exit"] = proc.returncode
    result["ok"] = proc.returncode == 0 and result.get("ok", False)
    return result


async def _stop(procs: list) -> None:
    for proc in procs:
        if proc.returncode is None:
            proc.terminate()
    for proc in procs:
        try:
            await asyncio.wait_for(proc.wait(), 5)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()


def percentiles(samples_ns: list[int]) -> dict[str, float]:
    """p50/p90/p99/max of nanosecond samples, in microseconds (0 when empty)."""
    if not samples_ns:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0}
    ordered = sorted(samples_ns)
    pick = lambda q: round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000, 1)  # noqa: E731
    return {"p50": pick(0.50), "p90": pick(0.90), "p99": pick(0.99), "max": round(ordered[-1] / 1000, 1)}


def _summary(args, report, results, bad: list[int], verify_s: float) -> dict[str, Any]:
    samples = [s for r in results for s in r.get("latencies_ns", [])]
    return {
        "pages_total": report.pages_total,
        "pages_verified": report.pages_total - len(bad),
        "pages_bad": bad[:50],
        "pages_demand": report.pages_demand,
        "pages_background": report.pages_background,
        "pages_zero": report.pages_zero,
        "faults": report.faults,
        "client_requests": report.client_requests,
        "resumes": report.resumes,
        "fault_latency_us": percentiles(samples),
        "fault_samples": len(samples),
        "touch_hits": sum(r.get("hits", 0) for r in results),
        "service_latency_us": report.service_latency_us,
        "goodput_gbps": round(report.goodput_gbps, 3),
        "duration_s": round(report.duration_s, 3),
        "verify_s": round(verify_s, 3),
        "clients": [{k: r.get(k) for k in ("pid", "mode", "ok", "exit", "error", "bad_pages")} for r in results],
        "size_bytes": args.size,
        "workload": args.workload,
    }


def _print_summary(summary: dict[str, Any], report) -> None:
    lat = summary["fault_latency_us"]
    ok_clients = sum(1 for c in summary["clients"] if c["ok"])
    print(
        f"\npages: {summary['pages_verified']}/{summary['pages_total']} verified  "
        f"(demand {summary['pages_demand']}, background {summary['pages_background']}, zero {summary['pages_zero']})\n"
        f"fault latency in the faulting threads ({summary['fault_samples']} faults; "
        f"{summary['touch_hits']} first touches found the page already there): p50 {lat['p50']} us  "
        f"p90 {lat['p90']} us  p99 {lat['p99']} us  max {lat['max']} us\n"
        f"goodput {summary['goodput_gbps']} Gbit/s, duration {summary['duration_s']} s, "
        f"clients ok {ok_clients}/{len(summary['clients'])}",
        file=sys.stderr,
    )
    print(report.format(), file=sys.stderr)
