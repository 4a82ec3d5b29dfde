"""Link baseline: what plain Python TCP gets over loopback and over the shaped veth.

Theory of operation
-------------------
Every aiopostcopy figure over the test link should be read against what the
link itself gives to the simplest possible Python program.  This benchmark
measures, in one invocation and interleaved, on two *places*:

* ``loopback``: two processes in the host namespace talking over 127.0.0.1;
* ``veth``: a :class:`aiopostcopy.tools.netns.LinkPair` (default ``tbf rate
  10gbit`` on both veth ends), the server side in ``src`` and the client
  side in ``dst`` as in postcopy (the destination asks, the source answers;
  the source streams, the destination receives).

Two measures, each with two processes and plain blocking sockets (no
asyncio, no uvloop, so this is Python's floor, not C's; DESIGN.md section 5
gives C figures for orientation, from another run):

* ``rr``: request/reply latency.  The client sends a 16-byte request and
  reads a 4096-byte reply, one outstanding, TCP_NODELAY on both ends;
  ``--count`` timed round trips after a warm-up, pooled over ``--repeat``
  runs; p50/p90/p99 in microseconds.
* ``bulk``: one-way throughput.  The sender ``sendall``s ``--bulk-mb`` MiB
  from a preallocated buffer; the receiver ``recv_into``s a preallocated
  1 MiB buffer and times first byte to end of stream; GB/s (1e9 bytes/s),
  median over ``--repeat`` runs.

The same script is the child program: ``--role`` selects the server, client,
sink or source, which print one line (a port, or a JSON result) on stdout.
The table reports each veth figure and its ratio to loopback from the same
run; absolute figures from different runs are not comparable (DESIGN.md).

Run (as root, for the namespaces)::

    PYTHONPATH=/work/main /work/main/.venv/bin/python benchmarks/link_baseline.py
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import select
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

REQUEST_SIZE = 16
REPLY_SIZE = 4096
BULK_CHUNK = 1 << 20
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from aiopostcopy.tools.bench_procs import Loopback, Veth  # noqa: E402  (places shared with the bench runner)

C_REFERENCE = {"rr_p50_us": 28.0, "bulk_gbps": 1.17}
"""C figures over the shaped veth from DESIGN.md section 5 (another run: orientation only)."""


# --------------------------------------------------------------------------- child roles


def _recv_exact(sock: socket.socket, view: memoryview) -> bool:
    """Fill ``view`` from ``sock``.

    Args:
        sock: A connected blocking socket.
        view: The buffer to fill.

    Returns:
        False if the peer closed before the first byte; True when full.

    Raises:
        ConnectionError: The peer closed part-way.
    """
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            if got == 0:
                return False
            raise ConnectionError("peer closed mid-message")
        got += n
    return True


def _listen(bind: str) -> socket.socket:
    """Listen on an ephemeral TCP port and announce it on stdout.

    Args:
        bind: Address to bind.

    Returns:
        The listening socket.
    """
    srv = socket.create_server((bind, 0))
    print(srv.getsockname()[1], flush=True)
    return srv


def _accept(srv: socket.socket) -> socket.socket:
    """Accept one connection with TCP_NODELAY set and close the listener.

    Args:
        srv: The listening socket.

    Returns:
        The connection.
    """
    conn, _ = srv.accept()
    srv.close()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


def role_rr_server(bind: str) -> None:
    """Answer each 16-byte request with a 4096-byte reply until EOF.

    Args:
        bind: Address to bind.
    """
    conn = _accept(_listen(bind))
    request = memoryview(bytearray(REQUEST_SIZE))
    reply = bytes(REPLY_SIZE)
    while _recv_exact(conn, request):
        conn.sendall(reply)
    conn.close()


def role_rr_client(host: str, port: int, count: int, warmup: int) -> None:
    """Time ``count`` request/reply round trips; print the samples as JSON.

    Args:
        host: Server address.
        port: Server port.
        count: Timed round trips.
        warmup: Untimed round trips first.
    """
    sock = socket.create_connection((host, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    request = bytes(REQUEST_SIZE)
    reply = memoryview(bytearray(REPLY_SIZE))
    samples = [0] * count
    clock = time.perf_counter_ns
    for i in range(warmup + count):
        start = clock()
        sock.sendall(request)
        _recv_exact(sock, reply)
        if i >= warmup:
            samples[i - warmup] = clock() - start
    sock.close()
    print(json.dumps({"samples_ns": samples}), flush=True)


def role_bulk_sink(bind: str) -> None:
    """Receive a stream into a preallocated buffer; print bytes and seconds.

    Timing runs from the first byte to end of stream.

    Args:
        bind: Address to bind.
    """
    conn = _accept(_listen(bind))
    view = memoryview(bytearray(BULK_CHUNK))
    total = conn.recv_into(view)
    start = time.perf_counter()
    while n := conn.recv_into(view):
        total += n
    seconds = time.perf_counter() - start
    conn.close()
    print(json.dumps({"bytes": total, "seconds": seconds}), flush=True)


def role_bulk_source(host: str, port: int, total: int) -> None:
    """Send ``total`` bytes from a preallocated buffer, then close.

    Args:
        host: Sink address.
        port: Sink port.
        total: Bytes to send.
    """
    sock = socket.create_connection((host, port))
    chunk = memoryview(bytes(BULK_CHUNK))
    left = total
    while left > 0:
        sock.sendall(chunk[: min(left, BULK_CHUNK)])
        left -= BULK_CHUNK
    sock.shutdown(socket.SHUT_WR)
    sock.recv(1)  # wait for the sink to finish reading
    sock.close()


# --------------------------------------------------------------------------- orchestration


def _child(role: str, *args: object) -> list[str]:
    """The command line that runs this script as a child role.

    Args:
        role: The role name.
        *args: Its positional arguments.

    Returns:
        argv.
    """
    return [sys.executable, str(Path(__file__).resolve()), "--role", role, *map(str, args)]


def _read_port(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> int:
    """Read the port a child server announces on its first stdout line.

    Args:
        proc: The child, started with ``stdout=PIPE``.
        timeout: Seconds to wait.

    Returns:
        The port.

    Raises:
        RuntimeError: Nothing arrived in time or the child died.
    """
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else b""
    if not line.strip():
        raise RuntimeError(f"server {proc.args!r} did not announce a port")
    return int(line)


def _result(proc: subprocess.Popen[bytes], timeout: float) -> dict[str, Any]:
    """Wait for a child and parse the JSON line it printed.

    Args:
        proc: The child, started with ``stdout=PIPE``.
        timeout: Seconds to wait.

    Returns:
        The parsed result.

    Raises:
        RuntimeError: The child failed.
    """
    out, _ = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{proc.args!r} exited {proc.returncode}")
    return dict(json.loads(out.splitlines()[-1]))


def measure_rr(place: Any, count: int, warmup: int) -> list[int]:
    """Run one request/reply measurement.

    Args:
        place: A :class:`Loopback` or :class:`Veth`.
        count: Timed round trips.
        warmup: Untimed round trips first.

    Returns:
        Round-trip times in nanoseconds.
    """
    server = place.popen("src", _child("rr-server", place.server_addr), stdout=subprocess.PIPE)
    port = _read_port(server)
    client = place.popen("dst", _child("rr-client", place.server_addr, port, count, warmup),
                         stdout=subprocess.PIPE)
    samples = list(_result(client, timeout=60 + count * 0.01)["samples_ns"])
    server.wait(timeout=10)
    return samples


def measure_bulk(place: Any, total: int) -> float:
    """Run one bulk transfer from src to dst.

    Args:
        place: A :class:`Loopback` or :class:`Veth`.
        total: Bytes to send.

    Returns:
        Throughput in GB/s (1e9 bytes per second).
    """
    sink = place.popen("dst", _child("bulk-sink", place.sink_addr), stdout=subprocess.PIPE)
    port = _read_port(sink)
    source = place.popen("src", _child("bulk-source", place.sink_addr, port, total))
    result = _result(sink, timeout=120 + total / 1e8)
    source.wait(timeout=10)
    if result["bytes"] != total:
        raise RuntimeError(f"sink got {result['bytes']} bytes of {total}")
    return float(result["bytes"] / result["seconds"] / 1e9)


def percentile(sorted_values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile.

    Args:
        sorted_values: Ascending, non-empty.
        pct: 0 < pct <= 100.

    Returns:
        The value at that rank.
    """
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def summarize(rr_ns: list[int], bulk: list[float]) -> dict[str, float]:
    """Reduce raw samples of one place to the reported figures.

    Args:
        rr_ns: Pooled round-trip times in ns.
        bulk: Per-run throughputs in GB/s.

    Returns:
        ``rr_p50_us``, ``rr_p90_us``, ``rr_p99_us``, ``bulk_gbps`` (median),
        ``bulk_min_gbps``, ``bulk_max_gbps``.
    """
    us = sorted(v / 1000 for v in rr_ns)
    return {
        "rr_p50_us": percentile(us, 50),
        "rr_p90_us": percentile(us, 90),
        "rr_p99_us": percentile(us, 99),
        "bulk_gbps": statistics.median(bulk),
        "bulk_min_gbps": min(bulk),
        "bulk_max_gbps": max(bulk),
    }


def run_places(places: list[Any], args: argparse.Namespace,
               log: Callable[[str], None]) -> dict[str, dict[str, float]]:
    """Measure every place ``args.repeat`` times, interleaved.

    Args:
        places: The places, the baseline first.
        args: Parsed options.
        log: Progress printer.

    Returns:
        Summary per place name.
    """
    rr: dict[str, list[int]] = {p.name: [] for p in places}
    bulk: dict[str, list[float]] = {p.name: [] for p in places}
    total = args.bulk_mb * (1 << 20)
    for rep in range(args.repeat):
        for place in places:
            rr[place.name] += measure_rr(place, args.count, args.warmup)
            bulk[place.name].append(measure_bulk(place, total))
            log(f"run {rep + 1}/{args.repeat} {place.name}: bulk {bulk[place.name][-1]:.3f} GB/s")
    return {p.name: summarize(rr[p.name], bulk[p.name]) for p in places}


# --------------------------------------------------------------------------- report


def conditions(args: argparse.Namespace) -> list[str]:
    """Describe the machine and the run, for the report header.

    Args:
        args: Parsed options.

    Returns:
        Lines of text.
    """
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    return [
        f"machine: {platform.node()} Linux {platform.release()}, {os.cpu_count()} CPUs ({cpu})",
        f"load average at start: {load}",
        f"python: {platform.python_version()} {sys.executable}",
        f"run: rate={args.rate}{_shaping_text(args)} count={args.count} warmup={args.warmup} "
        f"bulk={args.bulk_mb} MiB repeat={args.repeat} (interleaved)",
    ]


def _shaping_text(args: argparse.Namespace) -> str:
    """Describe the tbf burst and limit in force (nothing when unshaped).

    Args:
        args: Parsed options.

    Returns:
        Text such as ``" burst=262144 limit=6291456"``.
    """
    if args.rate.lower() == "none":
        return ""
    from aiopostcopy.tools import netns

    return (f" burst={args.burst or netns.DEFAULT_BURST}"
            f" limit={args.limit or netns.DEFAULT_LIMIT}")


def table(results: dict[str, dict[str, float]]) -> list[str]:
    """Format the figures with the ratio of each place to the first (baseline).

    Args:
        results: Summary per place, baseline first.

    Returns:
        Lines of text.
    """
    names = list(results)
    base = names[0]
    rows = [("rr p50 (us)", "rr_p50_us", 1), ("rr p90 (us)", "rr_p90_us", 1),
            ("rr p99 (us)", "rr_p99_us", 1), ("bulk median (GB/s)", "bulk_gbps", 3),
            ("bulk min (GB/s)", "bulk_min_gbps", 3), ("bulk max (GB/s)", "bulk_max_gbps", 3)]
    head = f"{'measure':<20}" + "".join(f"{n:>16}" for n in names)
    head += "".join(f"{n + '/' + base:>26}" for n in names[1:])
    lines = [head, "-" * len(head)]
    for label, key, digits in rows:
        line = f"{label:<20}" + "".join(f"{results[n][key]:>16.{digits}f}" for n in names)
        line += "".join(f"{results[n][key] / results[base][key]:>25.2f}x" for n in names[1:])
        lines.append(line)
    return lines


def qdisc_lines(link: Any) -> list[str]:
    """Show what each tbf did (bytes, overlimits = shaping, drops).

    Args:
        link: The LinkPair.

    Returns:
        Lines of text.
    """
    lines = []
    for side in ("src", "dst"):
        q = link.qdisc_stats(side)
        lines.append(f"qdisc {side}: {q['kind']} sent {q['bytes'] / 1e6:.1f} MB "
                     f"{q['packets']} pkts, overlimits {q['overlimits']}, drops {q['drops']}")
    return lines


# --------------------------------------------------------------------------- main


def _run_role(role: str, args: Sequence[str]) -> None:
    """Dispatch a child role.

    Args:
        role: The role name.
        args: Its positional arguments.

    Raises:
        SystemExit: Unknown role.
    """
    if role == "rr-server":
        role_rr_server(args[0])
    elif role == "rr-client":
        role_rr_client(args[0], int(args[1]), int(args[2]), int(args[3]))
    elif role == "bulk-sink":
        role_bulk_sink(args[0])
    elif role == "bulk-source":
        role_bulk_source(args[0], int(args[1]), int(args[2]))
    else:
        raise SystemExit(f"unknown role {role!r}")


def _parser() -> argparse.ArgumentParser:
    """Build the command-line parser.

    Returns:
        The parser.
    """
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", default="10gbit", help="tbf rate on the veth, or 'none' (10gbit)")
    p.add_argument("--burst", type=int, help="tbf burst in bytes (netns.DEFAULT_BURST)")
    p.add_argument("--limit", type=int, help="tbf queue limit in bytes (netns.DEFAULT_LIMIT)")
    p.add_argument("--count", type=int, default=20000, help="timed round trips per run (20000)")
    p.add_argument("--warmup", type=int, default=2000, help="untimed round trips per run (2000)")
    p.add_argument("--bulk-mb", type=int, default=1024, help="MiB per bulk run (1024)")
    p.add_argument("--repeat", type=int, default=3, help="interleaved runs per place (3)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--role", help=argparse.SUPPRESS)
    return p


def _sigterm_to_exit(signum: int, frame: object) -> None:
    """Turn SIGTERM into SystemExit so that every finally/with cleans up."""
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark (or, with --role, one child) and print the report.

    Args:
        argv: Command-line arguments (default: sys.argv[1:]).

    Returns:
        The exit status.
    """
    args, rest = _parser().parse_known_args(argv)
    if args.role:
        _run_role(args.role, rest)
        return 0
    if rest:
        _parser().error(f"unrecognized arguments: {' '.join(rest)}")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from aiopostcopy.tools import netns

    reason = netns.available()
    if reason is not None:
        print(f"link_baseline: cannot run: {reason}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _sigterm_to_exit)
    netns.sweep_stale()
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    header = conditions(args)
    print("\n".join(header), flush=True)
    rate = None if args.rate.lower() == "none" else args.rate
    loop = Loopback()
    try:
        shaping = {k: v for k, v in (("burst", args.burst), ("limit", args.limit)) if v}
        with netns.LinkPair(rate, **shaping) as link:
            results = run_places([loop, Veth(link)], args, log)
            shaped = qdisc_lines(link)
    finally:
        loop.close()
    print()
    print("\n".join(table(results)))
    print()
    print("\n".join(shaped))
    print("figures are Python (blocking sockets, one process per end); C over the shaped "
          f"veth in another run (DESIGN.md 5): rr ~{C_REFERENCE['rr_p50_us']:.0f} us, "
          f"bulk {C_REFERENCE['bulk_gbps']} GB/s")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"conditions": header, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
