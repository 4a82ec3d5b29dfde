"""Command line: ``python -m aiopostcopy {demo,source,dest,bench}``.

* ``demo``: a whole migration on this host with no arguments: a 256 MiB
  source image with a per-page pattern, a source process and the destination
  service on loopback, client processes touching pages while the background
  sweep runs, a progress bar, page-by-page verification and a summary.
* ``source``: serve block files to a destination (``--listen``, ``--block``).
* ``dest``: run the destination service against a source (``--source``,
  ``--block-dir``, ``--clients``, ``--json``).
* ``bench``: the benchmark runner (:mod:`aiopostcopy.tools.bench`): a C
  baseline and the service's scenarios over the shaped veth (or loopback).

Exit status: 0 on a complete, verified migration; 1 when the migration failed
or a page did not verify; 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from typing import Any

from aiopostcopy.core.config import DestinationConfig, SourceConfig
from aiopostcopy.errors import PostcopyError
from aiopostcopy.loop import DestinationOptions, PostcopyDestination
from aiopostcopy import trace
from aiopostcopy.source import BACKGROUND_SNDBUF, DEFAULT_LEASE, PostcopySource, SourceBlock

__all__ = ["main", "run"]


def parse_address(text: str) -> tuple[str, int] | str:
    """``HOST:PORT`` -> (host, port); anything with a slash is a Unix socket path."""
    if "/" in text:
        return text
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT or a socket path, got {text!r}")
    return host.strip("[]"), int(port)


def parse_block(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m aiopostcopy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop", help="event loop (default uvloop)")
    sub = parser.add_subparsers(dest="command", required=True)
    from aiopostcopy.tools.demo import add_demo_arguments

    add_demo_arguments(sub.add_parser("demo", help="a whole migration on this host, verified page by page"))
    src = sub.add_parser("source", help="serve RAMBlocks to a destination")
    src.add_argument("--listen", type=parse_address, default=("127.0.0.1", 4444), help="HOST:PORT or socket path")
    src.add_argument("--block", type=parse_block, action="append", required=True, help="NAME=PATH, repeatable")
    src.add_argument("--page-size", type=int, default=4096, help="page size of the blocks (4096 or 2097152)")
    src.add_argument("--window", type=int, default=SourceConfig().background_window_bytes, help="background window bytes")
    src.add_argument("--run-pages", type=int, default=SourceConfig().background_run_pages, help="pages per background run")
    src.add_argument("--sndbuf", type=int, default=BACKGROUND_SNDBUF,
                     help="SO_SNDBUF of the background connection, 0 for kernel autotuning")
    src.add_argument("--sweep-after-idle", type=float, default=None, metavar="SECONDS",
                     help="demand first: hold the background stream until pages were requested and then "
                          "none for SECONDS (benchmarks measure the demand path alone this way)")
    src.add_argument("--lease", type=float, default=DEFAULT_LEASE,
                     help="seconds a session is held without a channel from its destination (default %(default)s)")
    src.add_argument("--json", default=None, help="write the final report here ('-' for stdout)")
    dst = sub.add_parser("dest", help="run the destination service")
    dst.add_argument("--source", type=parse_address, required=True, help="HOST:PORT or socket path of the source")
    dst.add_argument("--block-dir", default=None, help="directory for the block files (default: memfd)")
    dst.add_argument("--clients", default=None, help="Unix socket path where clients join")
    dst.add_argument("--vhost-user", metavar="SOCK", action="append", default=[],
                     help="attach the vhost-user back-end listening on SOCK as a postcopy client (repeatable)")
    dst.add_argument("--deadline", type=float, default=60.0,
                     help="seconds without progress from the source (no pages arriving, whatever the cause)")
    dst.add_argument("--json", default=None, help="write the final report here ('-' for stdout)")
    dst.add_argument("--quiet", action="store_true", help="no progress line")
    from aiopostcopy.tools.bench import add_bench_arguments

    add_bench_arguments(sub.add_parser("bench", help="measure against a C baseline over the shaped veth"))
    return parser


def run(coro: Any, loop_name: str = "uvloop") -> Any:
    """Run ``coro`` on uvloop (or the stock loop when asked or when uvloop is missing)."""
    if loop_name == "uvloop":
        try:
            import uvloop

            return uvloop.run(coro)
        except ImportError:
            print("uvloop not installed: using the stock asyncio loop", file=sys.stderr)
    return asyncio.run(coro)


def write_json(path: str | None, data: dict[str, Any]) -> None:
    if path is None:
        return
    text = json.dumps(data, indent=2, default=str)
    if path == "-":
        print(text)
    else:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text + "\n")


async def source_main(args: argparse.Namespace) -> int:
    trace.start("source")
    blocks = [SourceBlock.from_path(name, path, page_size=args.page_size) for name, path in args.block]
    config = SourceConfig(background_window_bytes=args.window, background_run_pages=args.run_pages)
    source = PostcopySource(blocks, config=config, background_sndbuf=args.sndbuf or None, lease=args.lease,
                            sweep_after_idle=args.sweep_after_idle)
    if isinstance(args.listen, str):
        where = await source.listen_unix(args.listen)
    else:
        host, port = await source.listen(*args.listen)
        where = f"{host}:{port}"
    print(f"aiopostcopy source: listening on {where}", flush=True)
    _stop_on_signals(source.close)
    try:
        report = await source.wait_complete()
    finally:
        await source.close()
    print(f"aiopostcopy source: {'complete' if report.complete else 'stopped'}: {report.pages_urgent} urgent, "
          f"{report.pages_background} background, {report.pages_zero} zero pages", file=sys.stderr)
    write_json(args.json, report.__dict__ if hasattr(report, "__dict__") else _dataclass_dict(report))
    return 0 if report.complete else 1


async def dest_main(args: argparse.Namespace) -> int:
    trace.start("dest")
    options = DestinationOptions(source=args.source, block_dir=args.block_dir, control_path=args.clients,
                                 source_deadline=args.deadline, session=DestinationConfig(),
                                 vhost_user=tuple(args.vhost_user))
    dest = PostcopyDestination(options)
    try:
        await dest.start()
        print(f"aiopostcopy dest: {len(dest.blocks)} blocks, userfaultfd via {dest.uffd_mode}", file=sys.stderr)
        if not args.quiet:
            from aiopostcopy.tools.progress import ProgressLine

            dest.on_progress(ProgressLine(sys.stderr).update)
        _stop_on_signals(lambda: dest.abort("interrupted"))
        report = await dest.wait_complete()
    except PostcopyError as exc:
        print(f"aiopostcopy dest: failed: {exc}", file=sys.stderr)
        return 1
    finally:
        await dest.close()
    print(report.format(), file=sys.stderr)
    write_json(args.json, report.to_dict())
    return 0 if report.verified else 1


def _stop_on_signals(callback: Any) -> None:
    loop = asyncio.get_running_loop()

    def stop() -> None:
        result = callback()
        if asyncio.iscoroutine(result):
            loop.create_task(result)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)


def _dataclass_dict(obj: Any) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(obj)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from aiopostcopy.tools.demo import demo_main

        return run(demo_main(args), args.loop)
    if args.command == "bench":
        from aiopostcopy.tools.bench import bench_main

        return bench_main(args)
    if args.command == "source":
        return run(source_main(args), args.loop)
    return run(dest_main(args), args.loop)
