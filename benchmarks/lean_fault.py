"""Lean remote fault: the language's floor on this machine, and what the service's source costs.

Theory of operation
-------------------
How much of a remote fault is Python itself, and how much is the service?
This benchmark times one faulting thread's remote faults, over the shaped
veth of :class:`aiopostcopy.tools.netns.LinkPair`, three ways, alternated
round by round:

* ``c``: the C baseline (``benchmarks/c``): its fault client against its page
  server, as ``python -m aiopostcopy bench`` runs it;
* ``lean-c``: a *lean* destination in Python against the same C page server:
  uvloop, ``add_reader`` on the userfaultfd and on the socket, one 16-byte
  request per fault, the reply received into a buffer and placed with one
  UFFDIO_COPY, nothing else (no sessions, no accounting, no reconnection);
* ``lean-source``: the same lean destination against the service's own source
  (``python -m aiopostcopy source``, its urgent channel only): the same
  Request and Pages frames the service exchanges (docs/protocol.md), the C
  page server of ``aiopostcopy/transport`` answering.

``lean-c`` against ``c`` is what the language costs a fault on this machine
(uvloop's callbacks, the interpreter between the system calls); ``lean-source``
against ``lean-c`` is what the service's source costs over a page server that
makes its pages up in memory.  The full service's own fault is ``bench``'s
quiet scenario; DESIGN.md's bar is 1.5x the C fault.

Each way, one thread touches ``--touches`` random pages of a memfd registered
with userfaultfd (MISSING), each timed in the thread (``aiopostcopy.tools``'s
``touch_pages``, in C without the GIL), and the lean handler times each
request to its reply (``rr``).  Every touched page is checked afterwards: the
C page server's page word (``benchmarks/c/cbench.h``), or the image's bytes.
The same script is the lean handler (``--handler``).  Root (namespaces)::

    PYTHONPATH=/work/main .venv/bin/python benchmarks/lean_fault.py [--rounds 4] [--touches 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

WAYS = ("c", "lean-c", "lean-source")
PAGE = 4096
_C_REQUEST = struct.Struct("<IIQ")  # struct cb_request: op, pages, first
_C_OP_PAGES, _C_FILL = 1, 0xA5


def _c_page(page: int) -> bytes:
    """The C page server's page ``page`` (cbench.h): its page word, then CB_FILL."""
    word = (page * 0x9E3779B97F4A7C15 + 1) & 0xFFFFFFFFFFFFFFFF
    return word.to_bytes(8, "little") + bytes([_C_FILL]) * (PAGE - 8)


# ---------------------------------------------------------------- the lean handler (a child)


def _handler(server: str, host: str, port: int, pages: int, touches: int, image: str | None) -> dict[str, Any]:
    """Touch ``touches`` random pages of a fresh registered memfd; serve the faults from
    ``server`` ("c": the C page server, "source": the service's source) on uvloop."""
    import uvloop

    from aiopostcopy.messages import PROTOCOL_VERSION, Channel, Hello, Role
    from aiopostcopy.tools._touch import ffi as touch_ffi
    from aiopostcopy.tools._touch import lib as touch_lib
    from aiopostcopy.transport.wire import Decoder, encode, encode_page_request
    from aiopostcopy.uffd import SharedMemory, Userfaultfd, buffer_address

    memory = SharedMemory.memfd("lean-fault", pages * PAGE)
    mapping = memory.map()
    uffd = Userfaultfd.open()
    uffd.register(mapping.address, mapping.length)
    sock = socket.create_connection((host, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if server == "source":  # the urgent channel's Hello, answered by the source's with the blocks
        sock.sendall(encode(Hello(version=PROTOCOL_VERSION, session_id="lean-fault", role=Role.DESTINATION,
                                  channel=Channel.URGENT)))
        decoder = Decoder()
        while not isinstance(event := decoder.next_event(), Hello):
            if event is not None:
                raise RuntimeError(f"the source answered {event!r}, not Hello")
            data = sock.recv(1 << 16)
            if not data:
                raise ConnectionError("the source closed the connection before its Hello")
            decoder.receive_data(data)
    sock.setblocking(False)
    base, buffer = mapping.address, bytearray(1 << 16)
    view, source_address, zeros = memoryview(buffer), buffer_address(buffer), bytearray(PAGE)
    zero_address = buffer_address(zeros)
    unpack, prefix = __import__("msgpack").unpackb, struct.Struct(">I")
    asked: list[int] = []  # the pages asked for, in order (a C reply names none)
    sent_ns: list[int] = []
    rr: list[int] = []
    held = 0  # bytes of a reply received so far

    def on_fault() -> None:
        for event in uffd.read_events():
            page = (event.address - base) // PAGE
            asked.append(page)
            sent_ns.append(time.perf_counter_ns())
            sock.send(_C_REQUEST.pack(_C_OP_PAGES, 1, page) if server == "c" else encode_page_request(0, page))

    def on_reply() -> None:
        nonlocal held
        try:
            got = sock.recv_into(view[held:])
        except BlockingIOError:
            return
        if not got:
            raise ConnectionError("the page server closed the connection")
        held += got
        while held:
            if server == "c":  # the page itself, nothing around it
                if held < PAGE:
                    return
                page, start, end = asked.pop(0), 0, PAGE
            else:  # a Pages or a Zero frame of one page
                if held < 4 or held < 4 + prefix.unpack_from(buffer)[0]:
                    return
                size = prefix.unpack_from(buffer)[0]
                header = unpack(view[4:4 + size])
                page, start = header[2], 4 + size
                end = start + (header[4] if header[0] == 3 else 0)
                if held < end:
                    return
                asked.remove(page)
            rr.append(time.perf_counter_ns() - sent_ns.pop(0))
            uffd.copy(base + page * PAGE, source_address + start if end > start else zero_address, PAGE)
            if held > end:
                buffer[:held - end] = buffer[end:held]
            held -= end

    chosen = random.Random(1).sample(range(pages), touches)

    async def run() -> int:
        loop = asyncio.get_running_loop()
        loop.add_reader(uffd.fileno(), on_fault)
        loop.add_reader(sock.fileno(), on_reply)
        addresses = touch_ffi.new("uint64_t[]", [base + page * PAGE for page in chosen])
        flats = touch_ffi.new("uint64_t[]", chosen)
        seen, hits = touch_ffi.new("uint8_t[]", pages), touch_ffi.new("uint64_t *")
        run.latencies = touch_ffi.new("int64_t[]", touches)  # type: ignore[attr-defined]
        return await loop.run_in_executor(None, touch_lib.touch_pages, addresses, flats, touches, 0, seen,
                                          run.latencies, hits)  # type: ignore[attr-defined]

    timed = uvloop.run(run())
    faults = sorted(run.latencies[i] for i in range(timed))  # type: ignore[attr-defined]
    content = open(image, "rb").read() if image else b""
    placed = mapping.buffer()  # every page checked was touched, hence placed: reading it faults no more
    bad = sum(placed[page * PAGE:(page + 1) * PAGE] != (content[page * PAGE:(page + 1) * PAGE] if image
                                                        else _c_page(page)) for page in chosen)
    placed.release()
    sock.close()
    return {"fault_ns": faults, "rr_ns": sorted(rr), "bad_pages": bad}


# ---------------------------------------------------------------- the driver


def _pct(values: Sequence[float], q: float) -> float:
    return values[min(len(values) - 1, int(len(values) * q))]


def _run_way(way: str, link: Any, c: Any, image: str, pages: int, touches: int, tree: str) -> dict[str, float]:
    python = [sys.executable]
    if way == "lean-source":
        server = link.popen("src", ["env", f"PYTHONPATH={tree}", *python, "-m", "aiopostcopy", "source",
                                    "--listen", f"{link.src_addr}:0", "--block", f"ram={image}",
                                    "--sweep-after-idle", "30"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        port = (server.stdout.readline().decode().rsplit(":", 1)[-1]).strip()
    else:
        server = link.popen("src", [str(c.server), link.src_addr], stdout=subprocess.PIPE)
        port = server.stdout.readline().decode().strip()
    try:
        if not port.isdigit():
            raise RuntimeError(f"the {way} page server did not start")
        if way == "c":
            argv = [str(c.client), link.src_addr, port, "fault", str(pages), str(touches), "1", "1"]
        else:
            argv = ["env", f"PYTHONPATH={tree}", *python, os.path.abspath(__file__), "--handler",
                    "c" if way == "lean-c" else "source", link.src_addr, port, str(pages), str(touches),
                    image if way == "lean-source" else ""]
        client = link.popen("dst", argv, stdout=subprocess.PIPE)
        out, _ = client.communicate(timeout=300)
        if client.returncode != 0:
            raise RuntimeError(f"the {way} client exited {client.returncode}")
        result = json.loads(out.decode().splitlines()[-1])
    finally:
        server.terminate()
        server.wait(10)
    faults = sorted(result["samples_ns"]) if way == "c" else result["fault_ns"]
    if result.get("bad_pages"):
        raise RuntimeError(f"{way}: {result['bad_pages']} pages wrong")
    row = {"fault_p50_us": _pct(faults, 0.5) / 1e3, "fault_p99_us": _pct(faults, 0.99) / 1e3}
    if way != "c":
        row.update(rr_p50_us=_pct(result["rr_ns"], 0.5) / 1e3, rr_p99_us=_pct(result["rr_ns"], 0.99) / 1e3)
    return row


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=4, help="rounds, each way once per round (4)")
    p.add_argument("--touches", type=int, default=2000, help="faults per run (2000)")
    p.add_argument("--pages", type=int, default=16384, help="pages of the memory and the image (16384)")
    p.add_argument("--rate", default="10gbit", help="tbf rate of both veth ends (10gbit)")
    p.add_argument("--ways", default=",".join(WAYS), help=f"subset of {','.join(WAYS)}")
    p.add_argument("--json", metavar="FILE", help="write every round's figures")
    p.add_argument("--handler", nargs=6, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.handler:
        server, host, port, pages, touches, image = args.handler
        print(json.dumps(_handler(server, host, int(port), int(pages), int(touches), image or None)))
        return 0
    from aiopostcopy.tools import netns
    from aiopostcopy.tools.bench_c import CBaseline

    ways = [w for w in args.ways.split(",") if w]
    if set(ways) - set(WAYS) or args.touches > args.pages:
        p.error(f"ways are {', '.join(WAYS)}; --touches must not exceed --pages")
    tree = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rounds: list[dict[str, dict[str, float]]] = []
    with tempfile.NamedTemporaryFile(dir="/dev/shm", prefix="lean-fault-") as image, \
            netns.LinkPair(args.rate) as link, CBaseline() as c:
        image.write(random.Random(2).randbytes(args.pages * PAGE))
        image.flush()
        for number in range(args.rounds):
            rounds.append({way: _run_way(way, link, c, image.name, args.pages, args.touches, tree) for way in ways})
            print(f"round {number + 1}: " + "; ".join(f"{way} p50 {row['fault_p50_us']:.1f} us"
                                                      for way, row in rounds[-1].items()), flush=True)
    print(f"\n{args.touches} faults a run, {args.rounds} rounds, link tbf {args.rate}; medians of the rounds "
          "(x c: each round's ratio to that round's C fault)")
    print(f"{'way':<12} {'fault p50':>10} {'p99':>9} {'x c p50':>8} {'rr p50':>8} {'rr p99':>8}")
    for way in ways:
        col = [r[way] for r in rounds]
        med = {k: statistics.median(row[k] for row in col) for k in col[0]}
        ratio = (statistics.median(r[way]["fault_p50_us"] / r["c"]["fault_p50_us"] for r in rounds)
                 if "c" in ways else float("nan"))
        print(f"{way:<12} {med['fault_p50_us']:>10.1f} {med['fault_p99_us']:>9.1f} {ratio:>7.2f}x "
              f"{med.get('rr_p50_us', float('nan')):>8.1f} {med.get('rr_p99_us', float('nan')):>8.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rounds": rounds, "touches": args.touches, "rate": args.rate}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
