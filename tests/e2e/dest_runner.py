"""Run a destination and its client processes where the test process cannot: inside a netns.

``python dest_runner.py --source HOST:PORT --workdir DIR [--clients N ...]``

Talks to the test on stdin/stdout, one JSON object per line:

1. starts :class:`~aiopostcopy.loop.PostcopyDestination` (block files in
   ``DIR/dest``, control socket ``DIR/clients.sock``) and prints
   ``{"event": "started"}``; the test may now hold the source (SIGSTOP);
2. waits for ``go`` on stdin, starts ``N`` ``aiopostcopy.tools.workload`` clients
   (delegated and self-served alternating), waits until all are accepted and
   each has a thread blocked in ``handle_userfault``, prints
   ``{"event": "blocked"}``; the test releases the source (SIGCONT);
3. waits for completion and for the clients, checks every page of every
   block through the destination's mapping, prints ``{"event": "result", ...}``
   with the report, the clients' results and the bad pages, and exits 0 only
   if everything verified.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

from aiopostcopy.cli import parse_address, run
from aiopostcopy.loop import DestinationOptions, PostcopyDestination

import e2e_support as sup


def emit(**fields: object) -> None:
    print(json.dumps(fields, default=str), flush=True)


async def main(args: argparse.Namespace) -> int:
    procs = sup.Processes()
    block_dir = os.path.join(args.workdir, "dest")
    os.makedirs(block_dir, exist_ok=True)
    socket_path = os.path.join(args.workdir, "clients.sock")
    options = DestinationOptions(source=parse_address(args.source), block_dir=block_dir, control_path=socket_path,
                                 source_deadline=30.0)
    loop = asyncio.get_running_loop()
    try:
        async with PostcopyDestination(options) as dest:
            emit(event="started", uffd_mode=dest.uffd_mode)
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if line.strip() != "go":
                emit(event="result", ok=False, error=f"expected 'go', got {line!r}")
                return 1
            workers = await sup.start_blocked_workers(procs, socket_path, dest, args.clients, name="netns",
                                                      threads=args.threads, touches=args.touches, seed=args.seed)
            emit(event="blocked")
            report = await sup.bounded(dest.wait_complete(), "the migration")
            results = [await w.result() for w in workers]
            problems = sup.check_destination(dest, seed=args.seed)
    finally:
        await procs.cleanup()
    ok = report.complete and not problems and all(r["exit"] == 0 for r in results)
    emit(event="result", ok=ok, report=report.to_dict(), clients=results, problems=problems)
    return 0 if ok else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--source", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--touches", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--loop", default="uvloop")
    ns = parser.parse_args()
    sys.exit(run(main(ns), ns.loop))
