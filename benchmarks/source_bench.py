"""The source's urgent path alone: request -> reply latency and source CPU per request.

Theory of operation
-------------------
One process plays the destination with blocking sockets and the wire codec;
it drives real source processes (``python -m aiopostcopy source``) on
loopback and, as the same-run baseline, a minimal page server written here
(``--role baseline``: blocking recv of a Request frame, ``os.preadv`` of the
page, one ``sendmsg`` of header + page: the floor of Python for this job).

Rounds alternate the subjects (baseline, then each source tree given with
``--tree NAME=DIR``, so two versions of the source can be compared in one
run).  Each subject runs the scenarios:

* ``quiet``: only the urgent connection is open; ``--requests`` single-page
  Requests at random pages, one at a time, each timed from send to the last
  payload byte; the subject's CPU time (utime + stime from /proc) over the
  requests, divided by their number, is its CPU per request.
* ``sweep``: the same while the background connection is open and a reader
  thread drains the sweep and acknowledges it; when the sweep says Done the
  measuring thread sends Resume with nothing received, so the sweep runs
  again and never stops during the measurement.  (Baseline: skipped.)

Every reply is checked against the image (the page's bytes).  Printed: p50,
p90, p99 latency and CPU per request, each with its ratio to the baseline of
the same run.  The image lives under /dev/shm and is removed; every process
started is stopped by its PID.

Run::

    .venv/bin/python benchmarks/source_bench.py --tree new=. --tree old=/tmp/old-tree
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import msgpack

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aiopostcopy import messages as m  # noqa: E402
from aiopostcopy.transport.wire import encode  # noqa: E402

PAGE = 4096
PREFIX = struct.Struct(">I")
TICK = os.sysconf("SC_CLK_TCK")


# ----------------------------------------------------------------- baseline server


def role_baseline(path: str) -> int:
    """A minimal page server: one connection, Request frames in, Pages frames out."""
    fd = os.open(path, os.O_RDONLY)
    lsock = socket.create_server(("127.0.0.1", 0))
    print(f"listening on 127.0.0.1:{lsock.getsockname()[1]}", flush=True)
    conn, _ = lsock.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray(64 * PAGE)
    view = memoryview(buf)
    head = bytearray(4)
    while True:
        if conn.recv_into(head, 4, socket.MSG_WAITALL) < 4:
            return 0
        size = PREFIX.unpack(head)[0]
        frame = conn.recv(size, socket.MSG_WAITALL)
        fields = msgpack.unpackb(frame, use_list=False)
        if fields[0] == m.Hello.TYPE:
            conn.sendall(encode(m.Hello(version=1, session_id=fields[2], role=m.Role.SOURCE, channel=m.Channel.URGENT,
                                        blocks=(m.BlockInfo(name="ram", length=os.fstat(fd).st_size,
                                                            page_size=PAGE),))))
            continue
        for block, first, count in fields[1]:
            nbytes = count * PAGE
            os.preadv(fd, [view[:nbytes]], first * PAGE)
            header = msgpack.packb((3, block, first, count, nbytes, ()))
            conn.sendmsg([PREFIX.pack(len(header)) + header, view[:nbytes]])


# ----------------------------------------------------------------- the destination side


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = sock.recv(n, socket.MSG_WAITALL)
    if len(data) != n:
        raise ConnectionError("subject closed the connection")
    return data


def recv_frame(sock: socket.socket, payload: memoryview | None = None) -> tuple:
    size = PREFIX.unpack(recv_exact(sock, 4))[0]
    fields = msgpack.unpackb(recv_exact(sock, size), use_list=False, raw=False)
    if fields[0] == m.Pages.TYPE:
        nbytes = fields[4]
        target = payload[:nbytes] if payload is not None else memoryview(bytearray(nbytes))
        got = 0
        while got < nbytes:
            n = sock.recv_into(target[got:], nbytes - got)
            if not n:
                raise ConnectionError("subject closed inside a payload")
            got += n
    return fields


def connect(port: int, channel: m.Channel, session: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(encode(m.Hello(version=1, session_id=session, role=m.Role.DESTINATION, channel=channel)))
    fields = recv_frame(sock)
    if fields[0] != m.Hello.TYPE:
        raise RuntimeError(f"expected Hello, got {fields!r}")
    return sock


class Sweep(threading.Thread):
    """Drain the background channel, Ack every MiB, flag each Done."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.done = threading.Event()
        self.stop = False
        self.bytes = 0

    def run(self) -> None:
        buf = memoryview(bytearray(16 << 20))
        unacked = 0
        try:
            while not self.stop:
                fields = recv_frame(self.sock, buf)
                if fields[0] == m.Pages.TYPE:
                    unacked += fields[4]
                    self.bytes += fields[4]
                    if unacked >= 1 << 20:
                        self.sock.sendall(encode(m.Ack(nbytes=unacked)))
                        unacked = 0
                elif fields[0] == m.Done.TYPE:
                    self.done.set()
        except (ConnectionError, OSError):
            pass


def cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def measure(proc: subprocess.Popen, port: int, image: memoryview, scenario: str, n: int, seed: int) -> dict:
    session = f"bench-{seed}"
    urgent = connect(port, m.Channel.URGENT, session)
    sweep = None
    if scenario == "sweep":
        sweep = Sweep(connect(port, m.Channel.BACKGROUND, session))
        sweep.start()
        time.sleep(0.05)
    rng = random.Random(seed)
    pages = len(image) // PAGE
    payload = memoryview(bytearray(PAGE))
    lat = []
    resumes = 0
    start_cpu, start_wall = cpu_ticks(proc.pid), time.perf_counter()
    for _ in range(n):
        if sweep is not None and sweep.done.is_set():
            sweep.done.clear()
            urgent.sendall(encode(m.Resume(session_id=session, received=(), pending=())))
            resumes += 1
        page = rng.randrange(pages)
        msg = encode(m.Request(runs=(m.PageRun(block=0, first=page, count=1),)))
        t0 = time.perf_counter_ns()
        urgent.sendall(msg)
        fields = recv_frame(urgent, payload)
        lat.append((time.perf_counter_ns() - t0) / 1000)
        if fields[0] != m.Pages.TYPE or fields[2] != page or payload != image[page * PAGE:(page + 1) * PAGE]:
            raise RuntimeError(f"wrong reply for page {page}: {fields!r}")
    cpu_s = (cpu_ticks(proc.pid) - start_cpu) / TICK
    wall = time.perf_counter() - start_wall
    swept = 0
    if sweep is not None:
        sweep.stop = True
        swept = sweep.bytes
    urgent.close()
    if sweep is not None:
        sweep.sock.close()
        sweep.join(5)
    lat.sort()
    return {"p50": lat[len(lat) // 2], "p90": lat[int(len(lat) * 0.9)], "p99": lat[int(len(lat) * 0.99)],
            "cpu_us": cpu_s * 1e6 / n, "sweep_gbps": swept / wall / 1e9, "resumes": resumes}


def start_subject(name: str, tree: str | None, image: str, py: str) -> tuple[subprocess.Popen, int]:
    if tree is None:
        argv = [py, __file__, "--role", "baseline", image]
        env, cwd = dict(os.environ), None
    else:  # run in the tree: "python -m" puts the working directory ahead of PYTHONPATH
        argv = [py, "-m", "aiopostcopy", "source", "--listen", "127.0.0.1:0", "--block", f"ram={image}"]
        cwd = str(Path(tree).resolve())
        env = dict(os.environ, PYTHONPATH=cwd)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, cwd=cwd)
    line = proc.stdout.readline().decode()
    if "listening on" not in line:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"{name} did not start: {line!r}")
    return proc, int(line.rsplit(":", 1)[1])


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--role", default=None)
    p.add_argument("--tree", action="append", default=[], help="NAME=DIR of a source tree (repeatable)")
    p.add_argument("--size-mib", type=int, default=256)
    p.add_argument("--requests", type=int, default=5000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--scenario", action="append", choices=("quiet", "sweep"), default=None)
    args, rest = p.parse_known_args(argv)
    if args.role == "baseline":
        return role_baseline(rest[0])
    trees = [tuple(t.split("=", 1)) for t in args.tree] or [("source", str(ROOT))]
    scenarios = args.scenario or ["quiet", "sweep"]
    fd, image_path = tempfile.mkstemp(prefix="srcbench-", dir="/dev/shm")
    try:
        data = random.Random(1).randbytes(1 << 20) * args.size_mib
        os.write(fd, data)
        image = memoryview(data)
        results: dict[tuple[str, str], list[dict]] = {}
        for rnd in range(args.rounds):
            for scenario in scenarios:
                for name, tree in [("baseline", None), *trees]:
                    if tree is None and scenario == "sweep":
                        continue
                    proc, port = start_subject(name, tree, image_path, sys.executable)
                    try:
                        r = measure(proc, port, image, scenario, args.requests, seed=rnd)
                    finally:
                        stop(proc)
                    results.setdefault((name, scenario), []).append(r)
                    print(f"round {rnd} {scenario:5} {name:9} p50 {r['p50']:7.1f} p99 {r['p99']:7.1f} us  "
                          f"cpu {r['cpu_us']:6.1f} us/req  sweep {r['sweep_gbps']:.2f} GB/s", flush=True)
        base = {k: statistics.median(x[k] for x in results[("baseline", "quiet")]) for k in ("p50", "p99", "cpu_us")}
        print(f"\nmedians over {args.rounds} rounds x {args.requests} requests; ratio to the same-run baseline "
              f"(p50 {base['p50']:.1f} us, p99 {base['p99']:.1f} us, cpu {base['cpu_us']:.1f} us/req)")
        for (name, scenario), rs in results.items():
            med = {k: statistics.median(x[k] for x in rs) for k in ("p50", "p90", "p99", "cpu_us", "sweep_gbps")}
            print(f"{scenario:5} {name:9} p50 {med['p50']:7.1f} us ({med['p50'] / base['p50']:.2f}x)  "
                  f"p90 {med['p90']:7.1f}  p99 {med['p99']:7.1f} us ({med['p99'] / base['p99']:.2f}x)  "
                  f"cpu {med['cpu_us']:6.1f} us/req ({med['cpu_us'] / base['cpu_us']:.2f}x)  "
                  f"sweep {med['sweep_gbps']:.2f} GB/s")
    finally:
        os.close(fd)
        os.unlink(image_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
