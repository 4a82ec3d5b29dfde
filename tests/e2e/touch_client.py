"""A client process that touches exactly the pages a test names, when the test says so.

``python touch_client.py --socket PATH [--mode delegated|self-served] [--name N]``
joins the destination service (:class:`aiopostcopy.client.Client`), prints
``{"event": "ready", ...}`` and then reads commands from stdin, one per line:

``touch BLOCK REPEAT PAGE [PAGE ...]``
    start ``REPEAT`` threads per page, each reading one byte of the page with
    ``ctypes.memmove`` (which releases the GIL, so a missing page blocks only
    that thread); prints ``{"event": "touching", ...}`` just before the threads
    touch and ``{"event": "touched", "latency_us": [...]}`` once all returned.
``fork-touch BLOCK PAGE``
    fork; the child reads one byte of the page (the block mappings are
    MADV_DONTFORK, so the child has no mapping there and dies of SIGSEGV
    instead of zero-filling the shared page); prints ``{"event": "forked",
    "signal": N, "exit": M}`` with how the child ended.
``end``
    wait for the touching threads and for End, verify every page of every
    block against the pattern, leave, print ``{"event": "result", "ok": ...}``
    and exit 0 only if the migration completed and every page verified.
    If the run cannot finish (the service dropped us, a timeout), exit 2 with
    ``os._exit`` so a blocked thread is never left with a closed userfaultfd.

Every line on stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import ctypes
import faulthandler
import json
import os
import sys
import threading
import time

from aiopostcopy.client import Client, name_native_thread
from aiopostcopy.messages import ClientMode
from aiopostcopy.tools.pattern import COUNTER_BYTES, verify_block


def emit(**fields: object) -> None:
    print(json.dumps(fields, default=str), flush=True)


def toucher(address: int, go: threading.Event, out: list, name: str) -> None:
    name_native_thread(name)
    scratch = ctypes.create_string_buffer(1)
    go.wait()
    begin = time.perf_counter_ns()
    ctypes.memmove(scratch, address, 1)  # blocks in the kernel until the page is placed
    out.append((time.perf_counter_ns() - begin) / 1000)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--socket", required=True)
    parser.add_argument("--mode", default="delegated", choices=[m.value for m in ClientMode])
    parser.add_argument("--name", default="touch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--zero-every", type=int, default=7)
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args()

    client = Client.join(args.socket, mode=ClientMode(args.mode), name=args.name, timeout=args.timeout)
    infos = client.block_info
    bases = [client.block_addresses[info.name] for info in infos]
    emit(event="ready", pid=os.getpid(), mode=args.mode,
         blocks=[{"name": i.name, "length": i.length, "page_size": i.page_size} for i in infos])
    threads: list[threading.Thread] = []
    batch = 0
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        if words[0] == "touch":
            block, repeat, pages = int(words[1]), int(words[2]), [int(w) for w in words[3:]]
            go, out = threading.Event(), []
            size = infos[block].page_size
            batch_threads = []
            for page in pages:
                for copy in range(repeat):
                    address = bases[block] + page * size + COUNTER_BYTES
                    thread = threading.Thread(target=toucher, args=(address, go, out, f"t{batch}-{page}-{copy}"),
                                              daemon=True)
                    thread.start()
                    batch_threads.append(thread)
            threads += batch_threads
            emit(event="touching", batch=batch, pages=pages, repeat=repeat, threads=len(batch_threads))
            go.set()

            def report(batch=batch, batch_threads=batch_threads, out=out, pages=pages) -> None:
                for thread in batch_threads:
                    thread.join()
                emit(event="touched", batch=batch, pages=pages, latency_us=sorted(out))

            threading.Thread(target=report, daemon=True).start()
            batch += 1
        elif words[0] == "fork-touch":
            block, page = int(words[1]), int(words[2])
            address = bases[block] + page * infos[block].page_size
            pid = os.fork()
            if pid == 0:  # the child: no Python cleanup, no shared state touched on the way out
                faulthandler.disable()
                ctypes.memmove(ctypes.create_string_buffer(1), address, 1)
                os._exit(0)
            status = os.waitpid(pid, 0)[1]
            emit(event="forked", signal=os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
                 exit=os.WEXITSTATUS(status) if os.WIFEXITED(status) else None)
        elif words[0] == "end":
            break
    deadline = time.monotonic() + args.timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    try:
        if any(thread.is_alive() for thread in threads):
            raise TimeoutError("touching threads still blocked")
        if not client.wait_end(max(0.0, deadline - time.monotonic())):
            raise TimeoutError("no End from the service")
    except Exception as exc:  # noqa: BLE001 - reported
        emit(event="result", ok=False, end_complete=False, error=f"{type(exc).__name__}: {exc}",
             client=client.statistics())
        os._exit(2)  # never close the uffd under a blocked thread
    bad = {}
    views = client.blocks
    for index, info in enumerate(infos):
        pages = verify_block(views[info.name], index, info.page_size, args.seed, args.zero_every)
        if pages:
            bad[info.name] = pages[:50]
    del views
    stats = client.statistics()
    client.leave()
    emit(event="result", ok=not bad, end_complete=True, bad_pages=bad, client=stats, error=None)
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
