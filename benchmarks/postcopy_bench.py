"""End-to-end postcopy benchmark: remote fault latency and migration goodput over the shaped veth.

Theory of operation
-------------------
One invocation measures, round by round, on one place (a
:class:`aiopostcopy.tools.netns.LinkPair` with ``tbf rate 10gbit`` both ways,
``--rate none`` unshaped, or 127.0.0.1 with ``--loopback``):

* ``link``: the baseline, from ``benchmarks/link_baseline.py`` (imported as
  a module): plain blocking-socket TCP, a 16 B request / 4 KiB reply (p50,
  p90, p99 over every run's samples) and a one-way bulk stream (GB/s, median
  of the runs).  It runs at the start of every round and once more at the
  end, so it brackets every subject.
* Every other scenario is a real migration of a ``--size`` pattern image
  (:func:`aiopostcopy.tools.pattern.fill`, seed ``--seed``):
  ``python -m aiopostcopy source`` in ``src``, ``python -m aiopostcopy dest
  --block-dir DIR --clients SOCK --json FILE`` in ``dst``, workers
  (``python -m aiopostcopy.tools.workload --workload random --raw-latencies``) in
  ``dst``, so each fault is timed in the faulting thread itself:

  - ``fault-quiet``: ONE worker (delegated; ``--mode self-served`` for the
    other kind), one thread; the source's sweep is
    held back while the toucher faults (``--sweep-after-idle``: the stock
    source with its background sender gated until no page was served for
    0.25 s), then released so the migration completes.  The demand path alone.
  - ``fault-bg``: the same with the sweep running as normal.
  - ``fault-nobg``: the same with the sweep throttled to one page per
    acknowledgement (source ``--window 4096 --run-pages 1``): at most 4 KiB of
    background data ahead of a reply, but a steady 1-page ping-pong that keeps
    both processes busy (its CPU shares are printed).
  - ``idle``: no worker: the destination report's duration and bytes
    received, i.e. what the sweep alone achieves, against the link's bulk GB/s.
  - ``mixed``: the demo's shape, 4 workers x 2 threads, delegated and
    self-served alternating, sweep as normal (orientation).

A *sample* is a worker's first touch of a page.  A page the sweep placed
before the touch costs a minor fault (a few us), not a remote fault, so
samples below ``--hit-us`` (default: the baseline rr p50 of this invocation,
as a remote fault includes at least such a round trip) are counted as *hits*,
as are the first touches the workers themselves found in memory (mincore)
and left out of the fault percentiles; the count of the rest is printed next
to the service's own count (destination faults + self-served client faults)
as a check.

Workers are started first and wait, already imported, for the control socket
to appear (``--role worker`` of this script, which then runs
``aiopostcopy.tools.workload.main``), so they join within milliseconds of the
destination opening it, while the sweep has barely begun.

Verification: every worker checks every page after End (exit status 0 and
``ok``); this script then checks the destination's block file with
:func:`aiopostcopy.tools.pattern.verify_block`; the source and destination must
exit 0 with a complete report.  Any failure is printed loudly at the end and
the exit status is 1 (the figures are still printed).

Per migration it also records the CPU time (user, system) the destination
used after it printed its first line (connected, blocks mapped) and the source
after it announced its port, read from /proc while the exited process is not
yet reaped, as a share of the migration's duration.  ``--profile SCENARIO``
adds one extra run of that scenario, not part of the figures, with the
destination and the source under cProfile, and prints their top functions;
``--sample SCENARIO`` does the same with py-spy attached instead (a sampling
profile, :mod:`sampled`: cProfile's cost per call inflates the many small
functions of the fault path, and a sample costs the process nothing);
``--count-ops SCENARIO`` runs the destination with the bytecode instructions
of the fault path's callbacks counted, per function, per demand fault
(:mod:`opcounts`: the same count run after run, whatever else the machine does).
``--taskset CPUS`` pins every child, baseline included (e.g. ``0`` puts
everything on one vCPU: no cross-CPU wake-ups).

Everything created is removed: the namespaces (LinkPair), a private
directory under /dev/shm, and every process started here (by PID).

Run (as root)::

    PYTHONPATH=/work/main /work/main/.venv/bin/python benchmarks/postcopy_bench.py
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Sequence

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BLOCK = "ram"
PAGE = 4096
SCENARIOS = ("fault-quiet", "fault-bg", "fault-nobg", "idle", "mixed")
C_REFERENCE = {"rr_p50_us": 28.0, "fault_p50_us": 38.0, "bulk_gbps": 1.17, "bulk_copy_gbps": 0.9}
"""DESIGN.md section 5, C over the shaped veth, another run: orientation only."""


sys.path.insert(0, str(ROOT))
from aiopostcopy.tools.bench_migration import GATE_IDLE_S, make_image, verify_file  # noqa: E402
from aiopostcopy.tools.bench_conditions import (cpu_snapshot, idle_polling, idle_polling_text, machine,  # noqa: E402
                                                other_load, run_with_halt_polling)
from aiopostcopy.tools.bench_procs import Pinned, first_line, stop, tail  # noqa: E402

if str(HERE) not in sys.path:  # this folder's own modules (a script's folder is there already)
    sys.path.insert(0, str(HERE))
import opcounts  # noqa: E402
import sampled  # noqa: E402


def _import_baseline() -> Any:
    """Import benchmarks/link_baseline.py as a module (same folder)."""
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    if str(ROOT) not in sys.path:
        sys.path.insert(1, str(ROOT))
    import link_baseline

    return link_baseline


# --------------------------------------------------------------------------- worker role


def role_worker(sock: str, argv: list[str]) -> int:
    """Import the workload, say "ready", wait for the control socket, then run it.

    Args:
        sock: The destination's control socket path.
        argv: Arguments for ``aiopostcopy.tools.workload.main``.

    Returns:
        The workload's exit status (3 if the socket never appeared).
    """
    sys.path.insert(0, str(ROOT))
    from aiopostcopy.tools import workload

    print("ready", flush=True)
    deadline = time.monotonic() + 60
    while not os.path.exists(sock):
        if time.monotonic() > deadline:
            return 3
        time.sleep(0.0005)
    time.sleep(0.002)  # the path appears at bind(); listen() follows in the same call
    return workload.main(argv + ["--socket", sock])


# --------------------------------------------------------------------------- processes


class Runner:
    """Starts children on one place and collects them.

    Args:
        place: ``link_baseline.Loopback`` or ``link_baseline.Veth``.
        env: Environment for the children.
    """

    def __init__(self, place: Any, env: dict[str, str]) -> None:
        self.place = place
        self.env = env

    def start(self, side: str, argv: Sequence[str], log: Path | None, **kw: Any) -> subprocess.Popen[bytes]:
        """Start a tracked child with stderr to ``log`` (or as ``kw`` says), cwd at the repository root."""
        if log is None:
            return self.place.popen(side, list(argv), env=self.env, cwd=str(ROOT), **kw)
        with open(log, "wb") as err:
            return self.place.popen(side, list(argv), stderr=err, env=self.env, cwd=str(ROOT), **kw)


def cpu_times(pid: int) -> tuple[float, float] | None:
    """(user, system) CPU seconds of a process, all its threads, from /proc (None if gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        tick = os.sysconf("SC_CLK_TCK")
        return int(fields[11]) / tick, int(fields[12]) / tick
    except (OSError, IndexError, ValueError):
        return None


def wait_with_cpu(proc: subprocess.Popen[bytes], timeout: float) -> tuple[int | None, tuple[float, float] | None]:
    """Wait for a child; read its CPU times while it is a zombie, then reap it.

    Args:
        proc: The child (``ip netns exec`` execs, so its PID is the program's).
        timeout: Seconds to wait.

    Returns:
        (exit status or None on timeout, (user, system) CPU seconds or None).
    """
    try:
        fd = os.pidfd_open(proc.pid)
    except OSError:
        return proc.wait(timeout), None
    try:
        if not select.select([fd], [], [], timeout)[0]:
            return None, None
    finally:
        os.close(fd)
    cpu = cpu_times(proc.pid)
    return proc.wait(), cpu


def _cpu_delta(end: tuple[float, float] | None, start: tuple[float, float] | None) -> dict[str, float] | None:
    if end is None or start is None:
        return None
    return {"user_s": end[0] - start[0], "sys_s": end[1] - start[1], "total_s": sum(end) - sum(start)}


class StderrTap:
    """Copy a child's stderr pipe to a log file; note its CPU times at the first line.

    The destination prints its first stderr line once connected and set up, so
    CPU used after it is the migration's, not Python start-up's.
    """

    def __init__(self, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.cpu_at_first_line: tuple[float, float] | None = None
        self._proc, self._log = proc, log
        self._thread = threading.Thread(target=self._copy, daemon=True)
        self._thread.start()

    def _copy(self) -> None:
        assert self._proc.stderr is not None
        with open(self._log, "wb") as out:
            for line in self._proc.stderr:
                if self.cpu_at_first_line is None:
                    self.cpu_at_first_line = cpu_times(self._proc.pid)
                out.write(line)

    def join(self) -> None:
        self._thread.join(10)


# --------------------------------------------------------------------------- one migration


def run_migration(runner: Runner, ctx: dict[str, Any], scenario: str, tag: str,
                  profile: Path | None = None, sample: Path | None = None,
                  count_ops: Path | None = None) -> dict[str, Any]:
    """Run one whole migration of ``scenario`` and check it.

    Args:
        runner: Starts children on the place.
        ctx: ``image``, ``workdir``, ``args`` (parsed options).
        scenario: One of :data:`SCENARIOS`.
        tag: Unique name for this run (its directory).
        profile: Write the destination's cProfile stats here (the source's to ``<profile>.source``).
        sample: Attach py-spy to the destination and the source and write their stacks here
            (and to ``<sample>.source``; :mod:`sampled`).
        count_ops: Count the destination's fault path instructions into this file (:mod:`opcounts`).

    Returns:
        The run's figures, its raw fault samples (``samples_ns``) and ``errors``.
    """
    args = ctx["args"]
    run = Path(ctx["workdir"]) / tag
    (run / "dest").mkdir(parents=True)
    sock = str(run / "clients.sock")
    py = sys.executable
    errors: list[str] = []
    place = runner.place

    src_cmd = [py, "-m", "aiopostcopy"]
    if profile is not None:
        src_cmd = _profiled(py, f"{profile}.source", src_cmd[1:], args.profile_clock)
    src_argv = [*src_cmd, "source", "--listen", f"{place.server_addr}:0",
                "--block", f"{BLOCK}={ctx['image']}", "--json", str(run / "source.json")]
    if scenario == "fault-quiet":  # demand first: the sweep waits until the toucher is done
        src_argv += ["--sweep-after-idle", str(GATE_IDLE_S)]
    if scenario == "fault-nobg":
        src_argv += ["--window", "4096", "--run-pages", "1"]
    else:
        src_argv += [f"--{k}={v}" for k, v in (("window", args.window), ("run-pages", args.run_pages)) if v]
    source = runner.start("src", src_argv, run / "source.err", stdout=subprocess.PIPE)
    line = first_line(source, 30)
    if "listening on" not in line:
        raise RuntimeError(f"source did not start: {line!r}\n{tail(run / 'source.err')}")
    address = line.rsplit(" ", 1)[1]
    src_cpu0 = cpu_times(source.pid)
    samplers = []
    if sample is not None:
        samplers.append(sampled.Sampler(source.pid, Path(f"{sample}.source"), Path(f"{sample}.source.log")))

    workers = []
    if scenario in ("fault-bg", "fault-nobg", "fault-quiet"):
        specs = [(args.mode, 1, args.touches)]
    elif scenario == "mixed":
        specs = [(("delegated", "self-served")[i % 2], args.mixed_threads, args.mixed_touches)
                 for i in range(args.mixed_clients)]
    else:
        specs = []
    for i, (mode, threads, touches) in enumerate(specs):
        slot = sum(spec[1] for spec in specs[:i])  # each thread its own random pages
        wargv = [py, str(Path(__file__).resolve()), "--role", "worker", sock,
                 "--threads", str(threads), "--mode", mode, "--workload", "random",
                 "--touches", str(touches), "--seed", str(args.seed), "--slot-base", str(slot), "--name", f"bench-{i}",
                 "--raw-latencies", "--timeout", "120", "--json", str(run / f"worker{i}.json")]
        workers.append(runner.start("dst", wargv, run / f"worker{i}.err", stdout=subprocess.PIPE))
    for i, w in enumerate(workers):
        if first_line(w, 30) != "ready":
            raise RuntimeError(f"worker {i} did not start\n{tail(run / f'worker{i}.err')}")

    dest_argv = [py, "-m", "aiopostcopy", "dest", "--source", address, "--block-dir", str(run / "dest"),
                 "--clients", sock, "--json", str(run / "dest.json")]
    if profile is not None:
        dest_argv = _profiled(py, str(profile), dest_argv[1:], args.profile_clock)
    if count_ops is not None:
        dest_argv = opcounts.counted(py, str(count_ops), dest_argv[1:])
    began = time.monotonic()
    dest = runner.start("dst", dest_argv, None, stderr=subprocess.PIPE)
    if sample is not None:
        samplers.append(sampled.Sampler(dest.pid, sample, Path(f"{sample}.log")))
    tap = StderrTap(dest, run / "dest.err")
    dest_rc, dest_end = wait_with_cpu(dest, args.timeout)
    wall = time.monotonic() - began
    tap.join()
    dest_cpu = _cpu_delta(dest_end, tap.cpu_at_first_line)
    if dest_rc is None:
        errors.append(f"{scenario}: destination still running after {args.timeout} s: stopped")
        stop(dest)
    elif dest_rc != 0:
        errors.append(f"{scenario}: destination exited {dest_rc}\n{tail(run / 'dest.err')}")
    if dest_rc != 0:  # nobody will end these: stop them now rather than wait for their timeouts
        for proc in (source, *workers):
            stop(proc)
    src_rc, src_end = wait_with_cpu(source, 30)
    src_cpu = _cpu_delta(src_end, src_cpu0)
    if src_rc is None:
        stop(source)
    for sampler in samplers:  # they end with their process
        if not sampler.wait():
            errors.append(f"{scenario}: py-spy wrote no samples to {sampler.out}"
                          f"{' (stopped after 30 s)' if sampler.stopped else ''}:\n{sampler.messages()}")
    if src_rc != 0:
        errors.append(f"{scenario}: source exited {src_rc}\n{tail(run / 'source.err')}")

    samples: list[int] = []
    worker_reports = []
    for i, w in enumerate(workers):
        rc, _ = wait_with_cpu(w, 60)
        if rc is None:
            stop(w)
        try:
            rep = json.loads((run / f"worker{i}.json").read_text())
        except (OSError, ValueError) as exc:
            rep = {"ok": False, "error": f"no report: {exc}"}
        worker_reports.append(rep)
        samples += rep.get("latencies_ns", [])
        if rc != 0 or not rep.get("ok"):
            errors.append(f"{scenario}: worker {i} ({specs[i][0]}) exit {rc}, ok={rep.get('ok')}, "
                          f"bad pages {rep.get('bad_page_count')}, error {rep.get('error')}\n"
                          f"{tail(run / f'worker{i}.err')}")

    report: dict[str, Any] = {}
    try:
        report = json.loads((run / "dest.json").read_text())
    except (OSError, ValueError) as exc:
        errors.append(f"{scenario}: no destination report: {exc}")
    if report and not (report.get("complete") and report.get("pages_placed") == report.get("pages_total")):
        errors.append(f"{scenario}: destination report incomplete: placed {report.get('pages_placed')}"
                      f"/{report.get('pages_total')}, aborted {report.get('aborted')}")

    bad: list[int] | None = None
    verify_s = 0.0
    if dest_rc == 0:
        t0 = time.monotonic()
        bad = verify_file(run / "dest" / BLOCK, args.seed)
        verify_s = time.monotonic() - t0
        if bad:
            errors.append(f"{scenario}: {len(bad)} pages of the destination block file do not verify, "
                          f"first {bad[:10]}")
    source_report = {}
    try:
        source_report = json.loads((run / "source.json").read_text())
    except (OSError, ValueError):
        pass
    if not args.keep:
        shutil.rmtree(run, ignore_errors=True)

    duration = report.get("duration_s") or 0.0
    received = report.get("bytes_received") or 0
    pages_total = report.get("pages_total") or 0
    return {
        "scenario": scenario,
        "tag": tag,
        "samples_ns": samples,
        "worker_hits": sum(rep.get("hits", 0) for rep in worker_reports),
        "errors": errors,
        "wall_s": wall,
        "dest_cpu": dest_cpu,
        "source_cpu": src_cpu,
        "duration_s": duration,
        "bytes_received": received,
        "goodput_gbit_report": report.get("goodput_gbps"),
        "wire_gbps": received / duration / 1e9 if duration else 0.0,
        "block_gbps": pages_total * PAGE / duration / 1e9 if duration else 0.0,
        "faults": report.get("faults"),
        "faults_joined": report.get("faults_joined"),
        "faults_already_placed": report.get("faults_already_placed"),
        "client_requests": report.get("client_requests"),
        "pages_demand": report.get("pages_demand"),
        "pages_background": report.get("pages_background"),
        "pages_zero": report.get("pages_zero"),
        "pages_duplicate": report.get("pages_duplicate"),
        "service_latency_us": report.get("service_latency_us"),
        "source": source_report,
        "self_served_faults": sum((r.get("client") or {}).get("faults", 0) for r in worker_reports),
        "pages_verified": (pages_total - len(bad)) if bad is not None else None,
        "verify_s": verify_s,
        "workers": [{k: r.get(k) for k in ("mode", "threads", "ok", "bad_page_count", "latencies",
                                           "join_ms", "touch_ms", "verify_ms", "client", "error")}
                    for r in worker_reports],
    }


# --------------------------------------------------------------------------- figures


def pct(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (0 for no values)."""
    if not sorted_values:
        return 0.0
    return float(_import_baseline().percentile(sorted_values, p))


def fault_summary(runs: list[dict[str, Any]], hit_us: float) -> dict[str, Any]:
    """Pool the fault samples of runs; split hits from remote faults.

    The workers already leave out first touches of pages mincore(2) showed in
    memory (their ``hits``); the ``hit_us`` threshold catches the pages placed
    between that check and the touch.
    """
    us = sorted(v / 1000 for r in runs for v in r["samples_ns"])
    faults = [v for v in us if v >= hit_us]
    return {
        "samples": len(us),
        "hits": len(us) - len(faults) + sum(r.get("worker_hits", 0) for r in runs),
        "faults_timed": len(faults),
        "faults_dest": sum((r["faults"] or 0) + r["self_served_faults"] for r in runs),
        "self_served_faults": sum(r["self_served_faults"] for r in runs),
        "client_requests": sum(r["client_requests"] or 0 for r in runs),
        "hit_us": hit_us,
        "p50_us": pct(faults, 50), "p90_us": pct(faults, 90), "p99_us": pct(faults, 99),
        "max_us": faults[-1] if faults else 0.0,
        "mean_us": statistics.fmean(faults) if faults else 0.0,
        "all_p50_us": pct(us, 50),
    }


def _share(runs: list[dict[str, Any]], key: str, field: str) -> float:
    """Median over runs of CPU seconds / migration duration."""
    vals = [r[key][field] / r["duration_s"] for r in runs if r.get(key) and r.get("duration_s")]
    return statistics.median(vals) if vals else 0.0


def rate_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median (and min/max) of the per-run migration figures."""
    def med(key: str) -> float:
        vals = [r[key] for r in runs if r.get(key) is not None]
        return statistics.median(vals) if vals else 0.0

    wire = [r["wire_gbps"] for r in runs]
    svc = [r["service_latency_us"]["p50"] for r in runs if r.get("service_latency_us")]
    return {
        "runs": len(runs),
        "wire_gbps": med("wire_gbps"), "wire_min_gbps": min(wire, default=0.0),
        "wire_max_gbps": max(wire, default=0.0),
        "block_gbps": med("block_gbps"),
        "goodput_gbit_report": med("goodput_gbit_report"),
        "duration_s": med("duration_s"),
        "dest_cpu_share": _share(runs, "dest_cpu", "total_s"),
        "dest_user_share": _share(runs, "dest_cpu", "user_s"),
        "source_cpu_share": _share(runs, "source_cpu", "total_s"),
        "service_p50_us": statistics.median(svc) if svc else 0.0,
        "pages_demand": med("pages_demand"), "pages_duplicate": med("pages_duplicate"),
    }


def report_lines(base: dict[str, float], faults: dict[str, dict[str, Any]],
                 rates: dict[str, dict[str, Any]], args: argparse.Namespace) -> list[str]:
    """The result tables, with ratios to the baseline of the same invocation."""
    hit = next(iter(faults.values()))["hit_us"] if faults else 0.0
    out = ["", f"latency (us; faults = first touches >= {hit:.1f} us, timed in the faulting thread; "
               "the rest are hits on pages already placed)"]
    head = (f"{'measure':<34}{'p50':>8}{'p90':>8}{'p99':>9}   {'x rr p50':>8}{'x rr p90':>9}{'x rr p99':>9}"
            f"{'x rr1 p50':>10}  {'timed/service faults':>20}{'hits':>6}")
    one = base.get("rr1_p50_us") or 0.0
    out += [head, "-" * len(head)]
    runs_p50 = ", ".join(f"{r['rr_p50_us']:.1f}" for r in base["per_run"])
    runs_bulk = ", ".join(f"{r['bulk_gbps']:.3f}" for r in base["per_run"])
    runs_one = ", ".join(f"{r['rr1_p50_us']:.1f}" for r in base["per_run"] if "rr1_p50_us" in r)
    out.insert(1, f"baseline runs, in order: rr p50 {runs_p50} us; bulk {runs_bulk} GB/s"
                  + (f"; rr on one vCPU p50 {runs_one} us" if runs_one else "") + " (pooled below)")
    out.append(f"{'link rr 16 B/4 KiB (baseline)':<34}{base['rr_p50_us']:>8.1f}{base['rr_p90_us']:>8.1f}"
               f"{base['rr_p99_us']:>9.1f}   {1:>7.2f}x{1:>8.2f}x{1:>8.2f}x")
    if one:
        out.append(f"{'link rr, both ends on one vCPU':<34}{one:>8.1f}{base['rr1_p90_us']:>8.1f}"
                   f"{base['rr1_p99_us']:>9.1f}   {one / base['rr_p50_us']:>7.2f}x{'':>9}{'':>9}{1:>9.2f}x")
    labels = {"fault-quiet": "fault, 1 toucher, sweep held", "fault-bg": "fault, 1 toucher, sweep on",
              "fault-nobg": "fault, 1 toucher, sweep 1 page/ack",
              "mixed": f"fault, {args.mixed_clients}x{args.mixed_threads} mixed, sweep on"}
    for key, label in labels.items():
        f = faults.get(key)
        if not f:
            continue
        out.append(f"{label:<34}{f['p50_us']:>8.1f}{f['p90_us']:>8.1f}{f['p99_us']:>9.1f}   "
                   f"{f['p50_us'] / base['rr_p50_us']:>7.2f}x{f['p90_us'] / base['rr_p90_us']:>8.2f}x"
                   f"{f['p99_us'] / base['rr_p99_us']:>8.2f}x"
                   + (f"{f['p50_us'] / one:>9.2f}x" if one else f"{'':>10}")
                   + f"  {f['faults_timed']:>11}/{f['faults_dest']:<8}"
                   f"{f['hits']:>6}")
    for a, b, label in (("fault-bg", "fault-nobg", "sweep on / sweep 1 page/ack"),
                        ("fault-bg", "fault-quiet", "sweep on / sweep held"),
                        ("fault-nobg", "fault-quiet", "sweep 1 page/ack / sweep held")):
        on, off = faults.get(a), faults.get(b)
        if on and off and off["p50_us"] and off["p90_us"] and off["p99_us"]:
            out.append(f"{label:<34}{on['p50_us'] / off['p50_us']:>7.2f}x{on['p90_us'] / off['p90_us']:>7.2f}x"
                       f"{on['p99_us'] / off['p99_us']:>8.2f}x")
    out += ["", "throughput (GB/s = 1e9 B/s; wire = bytes received / report duration; block = block bytes / duration)"]
    head = (f"{'measure':<34}{'wire GB/s':>10}{'min':>7}{'max':>7}{'x bulk':>8}{'block GB/s':>11}"
            f"{'Gbit/s rep':>11}{'dur s':>7}{'dest CPU/usr':>13}{'src CPU':>8}")
    out += [head, "-" * len(head)]
    out.append(f"{'link bulk one-way (baseline)':<34}{base['bulk_gbps']:>10.3f}{base['bulk_min_gbps']:>7.3f}"
               f"{base['bulk_max_gbps']:>7.3f}{1:>7.2f}x")
    labels = {"idle": "migration, no clients", "fault-bg": "migration, 1 toucher",
              "fault-quiet": "migration, sweep held, then on",
              "mixed": f"migration, {args.mixed_clients}x{args.mixed_threads} mixed",
              "fault-nobg": "migration, sweep off (1 page/ack)"}
    for key, label in labels.items():
        r = rates.get(key)
        if not r:
            continue
        out.append(f"{label:<34}{r['wire_gbps']:>10.3f}{r['wire_min_gbps']:>7.3f}{r['wire_max_gbps']:>7.3f}"
                   f"{r['wire_gbps'] / base['bulk_gbps']:>7.2f}x{r['block_gbps']:>11.3f}"
                   f"{r['goodput_gbit_report']:>11.2f}{r['duration_s']:>7.2f}"
                   f"{r['dest_cpu_share'] * 100:>9.0f}/{r['dest_user_share'] * 100:>2.0f}%"
                   f"{r['source_cpu_share'] * 100:>7.0f}%")
    out.append("CPU = CPU seconds used after start-up / report duration (100% = one vCPU; usr = user part); "
               "'sweep 1 page/ack' row: its duration is the 1-page sweep, not a goodput")
    return out


# --------------------------------------------------------------------------- conditions


# --------------------------------------------------------------------------- main


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", default="10gbit", help="tbf rate on both veth ends, or 'none' (10gbit)")
    p.add_argument("--loopback", action="store_true", help="no namespaces: everything on 127.0.0.1")
    p.add_argument("--size", type=int, default=256, help="block size in MiB (256)")
    p.add_argument("--seed", type=int, default=1, help="pattern seed (1)")
    p.add_argument("--repeat", type=int, default=3, help="rounds; each: baseline, then every scenario (3)")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"subset of {','.join(SCENARIOS)}")
    p.add_argument("--touches", type=int, default=3000, help="touches of the single toucher (3000)")
    p.add_argument("--mode", choices=("delegated", "self-served"), default="delegated",
                   help="the single toucher's client mode (delegated)")
    p.add_argument("--mixed-clients", type=int, default=4, help="workers in 'mixed' (4)")
    p.add_argument("--mixed-threads", type=int, default=2, help="threads per worker in 'mixed' (2)")
    p.add_argument("--mixed-touches", type=int, default=2000, help="touches per thread in 'mixed' (2000)")
    p.add_argument("--window", type=int, default=None,
                   help="source --window for the sweep-on scenarios (default: the source's, 8 MiB)")
    p.add_argument("--run-pages", type=int, default=None,
                   help="source --run-pages for the sweep-on scenarios (default: the source's, 256)")
    p.add_argument("--hit-us", type=float, default=None,
                   help="first touches faster than this are pages already placed "
                        "(default: the baseline rr p50 of this invocation)")
    p.add_argument("--rr-count", type=int, default=10000, help="baseline round trips per run (10000)")
    p.add_argument("--rr-warmup", type=int, default=1000, help="baseline warm-up round trips (1000)")
    p.add_argument("--bulk-mb", type=int, default=1024, help="baseline bulk MiB per run (1024)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds one migration may take (120)")
    p.add_argument("--profile", choices=SCENARIOS,
                   help="one extra run of this scenario with the destination and source under cProfile, "
                        "every thread")
    p.add_argument("--profile-out", default=None, help="keep the cProfile stats here (default: a temp file, removed)")
    p.add_argument("--trace", choices=SCENARIOS, default=None,
                   help="one extra run of this scenario with AIOPOSTCOPY_TRACE set; prints each hop of a fault")
    p.add_argument("--sample", choices=SCENARIOS, default=None,
                   help="one extra run of this scenario with py-spy attached to the destination and the source "
                        "(a sampling profile: no cost per call, unlike --profile; needs py-spy, the bench extra)")
    p.add_argument("--sample-out", default=None,
                   help="keep the sampled stacks here, and the source's in <this>.source (default: removed)")
    p.add_argument("--count-ops", choices=SCENARIOS, default=None,
                   help="one extra run of this scenario with the bytecode instructions of the destination's "
                        "fault path counted, per function and per demand fault (benchmarks/opcounts.py)")
    p.add_argument("--count-ops-out", default=None, help="keep the counts (JSON) here (default: removed)")
    p.add_argument("--profile-top", type=int, default=25, help="functions shown from the profile (25)")
    p.add_argument("--profile-clock", choices=("wall", "cpu"), default="wall",
                   help="what the profile counts, in every thread of each process: wall-clock time, or each "
                        "thread's own CPU time (time.thread_time), which leaves out time spent preempted or "
                        "waiting (wall)")
    p.add_argument("--one-cpu", default="0", metavar="CPU",
                   help="also measure the rr baseline with both ends pinned to this vCPU, no cross-CPU "
                        "wake-ups ('' to skip; default 0)")
    p.add_argument("--taskset", metavar="CPUS", help="run every child (baseline too) under taskset -c CPUS")
    p.add_argument("--keep", action="store_true",
                   help="keep the work directory under /dev/shm (image, logs, reports, dest block files)")
    p.add_argument("--json", metavar="FILE", help="also write every figure as JSON")
    p.add_argument("--halt-poll-ns", type=int, metavar="NS",
                   help="for the run, let idle vCPUs poll NS ns before they halt (haltpoll guests; the old value "
                        "is put back): cross-vCPU wake-ups then cost far less (benchmarks/README.md)")
    return p


def _sigterm_to_exit(signum: int, frame: object) -> None:
    """Turn SIGTERM into SystemExit so that every finally/with cleans up."""
    raise SystemExit(128 + signum)


_PROFILE_RUNNER = """\
import cProfile, pstats, runpy, sys, threading, time
out, clock, target, *rest = sys.argv[1:]
timer = time.thread_time if clock == "cpu" else time.perf_counter
profiles = [cProfile.Profile(timer)]


def profile_thread(*_):  # a new thread's first event: it gets a profiler of its own
    sys.setprofile(None)
    profiles.append(cProfile.Profile(timer))
    profiles[-1].enable()


threading.setprofile(profile_thread)
sys.argv = [target, *rest]
try:
    if target == "-m":
        sys.argv = rest
        profiles[0].runcall(runpy.run_module, rest[0], run_name="__main__", alter_sys=True)
    else:
        profiles[0].runcall(runpy.run_path, target, run_name="__main__")
finally:
    threading.setprofile(None)
    stats = pstats.Stats(profiles[0])
    for profile in profiles[1:]:
        if profile.getstats():  # a thread that made no call since it started has nothing to add
            stats.add(profile)
    stats.dump_stats(out)
"""


def _profiled(py: str, out: str, argv: Sequence[str], clock: str) -> list[str]:
    """``py argv...`` run under cProfile (stats to ``out``), every thread of it: each thread the
    process starts gets its own profiler (``threading.setprofile``), and the stats of all are
    added together.  ``clock``: ``wall`` (``time.perf_counter``) or ``cpu`` (each thread's own CPU
    time, ``time.thread_time``)."""
    return [py, "-c", _PROFILE_RUNNER, out, clock, *argv]


#: The destination's callbacks a demand fault goes through: a sampled profile shows them apart
FAULT_PATH = ("PostcopyDestination._serve_faults", "PostcopyDestination._place_answers",
              "PostcopyDestination._request_runs", "ClientRegistry._on_client_request")


def sampled_run(runner: Runner, ctx: dict[str, Any], scenario: str, out: str | None, top: int) -> list[str]:
    """One run of ``scenario`` with py-spy attached to the destination and the source; the
    tables of their samples (all, and the destination's under :data:`FAULT_PATH`).  The run's
    errors go to ``ctx["sample_errors"]``."""
    stacks = Path(out) if out else Path(ctx["workdir"]) / "dest.stacks"
    print(f"sampled run: {scenario} with py-spy attached to the destination and the source (not in the figures)",
          file=sys.stderr, flush=True)
    r = run_migration(runner, ctx, scenario, f"sample-{scenario}", sample=stacks)
    ctx["sample_errors"] = r["errors"]
    dest_cpu = (r["dest_cpu"] or {}).get("total_s", 0)
    faults = r["faults"] or 0
    text = ["", f"sampled run ({scenario}, py-spy attached, NOT in the figures): {r['duration_s']:.2f} s, "
            f"dest CPU {dest_cpu:.2f} s for {faults} faults read"]
    if stacks.exists():
        text += sampled.summary_lines(stacks, top, "destination")
        text += sampled.summary_lines(stacks, top, "destination, fault path", FAULT_PATH)
    if Path(f"{stacks}.source").exists():
        text += sampled.summary_lines(Path(f"{stacks}.source"), top, "source")
    return text


def profile_lines(path: Path, top: int, who: str, keys: Sequence[str], clock: str = "wall") -> list[str]:
    """Top functions of a cProfile stats file, by own time and/or cumulative time."""
    import io

    lines = []
    for key in keys:
        buf = io.StringIO()
        stats = pstats.Stats(str(path), stream=buf)
        stats.strip_dirs().sort_stats(key).print_stats(top)
        text = buf.getvalue().splitlines()
        start = next((i for i, line in enumerate(text) if "ncalls" in line), 0)
        total = next((line.strip() for line in text if "function calls" in line), "")
        what = ("wall-clock time of every thread, idle waits in runners.py:run and in the threads' blocking calls"
                if clock == "wall" else "CPU time, each thread's own, of every thread")
        lines += ["", f"{who} profile, top {top} by {key} ({total}; {what})"] + \
            [line for line in text[start:] if line.strip()]
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark (or, with ``--role worker``, one worker) and print the report."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["--role", "worker"]:
        return role_worker(argv[2], argv[3:])
    args = _parser().parse_args(argv)
    scenarios = [s for s in args.scenarios.split(",") if s]
    unknown = set(scenarios) - set(SCENARIOS)
    if unknown or args.repeat < 1:
        _parser().error(f"unknown scenarios {sorted(unknown)}" if unknown else "--repeat must be >= 1")
    lb = _import_baseline()
    from aiopostcopy.tools import netns

    if args.sample:  # found now, not after every measured round
        try:
            sampled.find_py_spy()
        except FileNotFoundError as exc:
            print(f"postcopy_bench: --sample: {exc}", file=sys.stderr)
            return 2
    if os.geteuid() != 0:
        print("postcopy_bench: needs root (namespaces, userfaultfd)", file=sys.stderr)
        return 2
    if not args.loopback:
        reason = netns.available()
        if reason is not None:
            print(f"postcopy_bench: cannot run: {reason}", file=sys.stderr)
            return 2
        netns.sweep_stale()
    signal.signal(signal.SIGTERM, _sigterm_to_exit)
    return run_with_halt_polling(args.halt_poll_ns, "postcopy_bench", lambda: _run(args, scenarios, lb, netns))


def _run(args: argparse.Namespace, scenarios: list[str], lb: Any, netns: Any) -> int:
    """The whole run: baselines and scenarios, then the report; returns the exit status."""
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    info = machine()
    rate = None if args.rate.lower() == "none" else args.rate
    link_text = ("loopback 127.0.0.1 (no namespaces, no shaping)" if args.loopback else
                 f"veth between two namespaces, tbf rate {rate} burst {netns.DEFAULT_BURST} "
                 f"limit {netns.DEFAULT_LIMIT} both ways" if rate else "veth between two namespaces, unshaped")
    header = [
        f"machine: {info['host']} Linux {info['kernel']}, nproc {info['vcpus']}, {info['cpu']}, "
        f"{'VM (hypervisor flag)' if info['vm'] else 'no hypervisor flag'}",
        f"python: {info['python']}; service loop {info['loop']}",
        f"load average at start: {' '.join(f'{v:.2f}' for v in info['load_at_start'])}",
        idle_polling_text(idle_polling(), set_for_run=args.halt_poll_ns is not None) or "idle vCPUs: no cpuidle driver",
        f"link: {link_text}",
        f"run: block {args.size} MiB 4 KiB pages seed {args.seed}; {args.repeat} rounds x "
        f"[baseline rr {args.rr_count}+{args.rr_warmup} warm-up, bulk {args.bulk_mb} MiB, "
        f"rr on vCPU {args.one_cpu or '-'}; {', '.join(scenarios)}]"
        f" + final baseline; children pinned: {args.taskset or 'no'}; 1 toucher: {args.touches} random touches, "
        f"{args.mode}; mixed: {args.mixed_clients}x{args.mixed_threads} x {args.mixed_touches} touches; sweep off = "
        f"source --window 4096 --run-pages 1; sweep on = source "
        f"--window {args.window or 'default (8 MiB)'} --run-pages {args.run_pages or 'default (256)'}",
    ]
    print("\n".join(header), flush=True)

    workdir = tempfile.mkdtemp(prefix="aiopostcopy-bench-", dir="/dev/shm")
    link = None
    place: Any = None
    errors: list[str] = []
    runs: list[dict[str, Any]] = []
    rr: list[int] = []
    rr1: list[int] = []
    bulk: list[float] = []
    rounds: list[dict[str, float]] = []
    shaped: list[str] = []
    prof_text: list[str] = []
    started = time.monotonic()
    cpu0 = cpu_snapshot()
    try:
        image = Path(workdir) / "source.img"
        t0 = time.monotonic()
        make_image(image, args.size << 20, args.seed)
        log(f"image: {args.size} MiB pattern in {time.monotonic() - t0:.1f} s")
        if args.loopback:
            place = lb.Loopback()
        else:
            link = netns.LinkPair(rate)
            place = lb.Veth(link)
        runner = Runner(Pinned(place, args.taskset) if args.taskset else place, env)
        if args.taskset:
            place = runner.place  # the baseline is pinned the same way
        ctx = {"image": image, "workdir": workdir, "args": args}
        total = args.bulk_mb << 20

        one_cpu = Pinned(getattr(place, "place", place), args.one_cpu) if args.one_cpu else None

        def baseline() -> None:
            rr.extend(lb.measure_rr(place, args.rr_count, args.rr_warmup))
            bulk.append(lb.measure_bulk(place, total))
            us = sorted(v / 1000 for v in rr[-args.rr_count:])
            rounds.append({"rr_p50_us": pct(us, 50), "rr_p99_us": pct(us, 99), "bulk_gbps": bulk[-1]})
            text = ""
            if one_cpu is not None:
                rr1.extend(lb.measure_rr(one_cpu, args.rr_count, args.rr_warmup))
                rounds[-1]["rr1_p50_us"] = pct(sorted(v / 1000 for v in rr1[-args.rr_count:]), 50)
                text = f", rr on vCPU {args.one_cpu} p50 {rounds[-1]['rr1_p50_us']:.1f} us"
            log(f"  baseline: rr p50 {pct(us, 50):.1f} us, bulk {bulk[-1]:.3f} GB/s{text}")

        for rnd in range(args.repeat):
            log(f"round {rnd + 1}/{args.repeat}")
            baseline()
            for scenario in scenarios:
                r = run_migration(runner, ctx, scenario, f"r{rnd}-{scenario}")
                runs.append(r)
                errors += r["errors"]
                f = fault_summary([r], args.hit_us if args.hit_us is not None else rounds[-1]["rr_p50_us"])
                log(f"  {scenario}: {r['duration_s']:.2f} s, wire {r['wire_gbps']:.3f} GB/s, "
                    f"fault p50 {f['p50_us']:.1f} us ({f['faults_timed']} timed, {f['hits']} hits, "
                    f"dest faults {r['faults']}), dest CPU {(r['dest_cpu'] or {}).get('total_s', 0):.2f} s"
                    + ("  FAILED" if r["errors"] else ""))
        log("final baseline")
        baseline()
        if args.profile:
            prof = Path(args.profile_out) if args.profile_out else Path(workdir) / "dest.prof"
            log(f"profile run: {args.profile} with the destination under cProfile (not in the figures)")
            r = run_migration(runner, ctx, args.profile, f"profile-{args.profile}", profile=prof)
            errors += r["errors"]
            prof_text = ["", f"profile run ({args.profile}, cProfile on, NOT in the figures): "
                         f"{r['duration_s']:.2f} s, wire {r['wire_gbps']:.3f} GB/s, "
                         f"dest CPU {(r['dest_cpu'] or {}).get('total_s', 0):.2f} s"]
            if prof.exists():
                prof_text += profile_lines(prof, args.profile_top, "destination", ("tottime", "cumulative"),
                                           args.profile_clock)
            if Path(f"{prof}.source").exists():
                prof_text += profile_lines(Path(f"{prof}.source"), args.profile_top, "source", ("tottime",),
                                           args.profile_clock)
        if args.trace:
            trace_dir = Path(workdir) / "trace"
            trace_dir.mkdir()
            log(f"trace run: {args.trace} with AIOPOSTCOPY_TRACE set (not in the figures)")
            saved_env, runner.env = runner.env, {**runner.env, "AIOPOSTCOPY_TRACE": str(trace_dir)}
            try:
                r = run_migration(runner, ctx, args.trace, f"trace-{args.trace}")
            finally:
                runner.env = saved_env
            errors += r["errors"]
            _import_baseline()  # puts this folder on sys.path
            import fault_trace

            timeline = fault_trace.load(str(trace_dir))
            prof_text += ["", f"trace run ({args.trace}, NOT in the figures): where a remote fault's time goes "
                          "(benchmarks/fault_trace.py)", *fault_trace.report(timeline), "",
                          *fault_trace.bands(timeline)]
        if args.sample:
            prof_text += sampled_run(runner, ctx, args.sample, args.sample_out, args.profile_top)
            errors += ctx.pop("sample_errors")
        if args.count_ops:
            counts = Path(args.count_ops_out) if args.count_ops_out else Path(workdir) / "dest.ops.json"
            log(f"counted run: {args.count_ops} with the destination's fault path instructions counted "
                "(not in the figures)")
            r = run_migration(runner, ctx, args.count_ops, f"count-{args.count_ops}", count_ops=counts)
            errors += r["errors"]
            counted_faults = (r["faults"] or 0) + r["self_served_faults"]
            prof_text += ["", f"counted run ({args.count_ops}, NOT in the figures): {r['duration_s']:.2f} s"]
            if counts.exists():
                prof_text += opcounts.summary_lines(counts, counted_faults, args.profile_top)
            else:
                errors.append(f"count-{args.count_ops}: the destination wrote no counts")
        if link is not None:
            shaped = lb.qdisc_lines(link)
    finally:
        if link is not None:
            link.close()
        elif place is not None:
            getattr(place, "place", place).close()
        if args.keep:
            log(f"kept {workdir} (remove it when done)")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    us = sorted(v / 1000 for v in rr)
    base = {"rr_p50_us": pct(us, 50), "rr_p90_us": pct(us, 90), "rr_p99_us": pct(us, 99),
            "bulk_gbps": statistics.median(bulk), "bulk_min_gbps": min(bulk), "bulk_max_gbps": max(bulk),
            "rr_samples": len(us), "bulk_runs": len(bulk), "per_run": rounds}
    if rr1:
        us1 = sorted(v / 1000 for v in rr1)
        base.update(rr1_p50_us=pct(us1, 50), rr1_p90_us=pct(us1, 90), rr1_p99_us=pct(us1, 99), rr1_cpu=args.one_cpu)
    by = {s: [r for r in runs if r["scenario"] == s] for s in scenarios}
    hit_us = args.hit_us if args.hit_us is not None else base["rr_p50_us"]
    faults = {s: fault_summary(by[s], hit_us) for s in ("fault-quiet", "fault-bg", "fault-nobg", "mixed")
              if by.get(s)}
    rates = {s: rate_summary(by[s]) for s in scenarios if by.get(s)}
    load_end = os.getloadavg()
    noise = other_load(cpu0, cpu_snapshot(), time.monotonic() - started)
    lines = report_lines(base, faults, rates, args)
    lines += ["", f"load average at end: {' '.join(f'{v:.2f}' for v in load_end)}; "
              f"wall {noise['wall_s']:.0f} s; CPU: ours {noise['ours_s']:.1f} s, not ours ~{noise['others_s']:.1f} s "
              f"(~{noise['others_vcpu'] * 100:.0f}% of one vCPU on average: other sessions' work and kernel "
              f"time outside our processes), steal {noise['steal_s']:.1f} s", *shaped,
              f"C over the shaped veth, another run (DESIGN.md 5): rr ~{C_REFERENCE['rr_p50_us']:.0f} us, "
              f"fault ~{C_REFERENCE['fault_p50_us']:.0f} us, bulk {C_REFERENCE['bulk_gbps']} GB/s, "
              f"bulk + UFFDIO_COPY ~{C_REFERENCE['bulk_copy_gbps']} GB/s"]
    verified = [r["pages_verified"] for r in runs]
    lines.append(f"verification: {len(runs)} migrations, "
                 f"{sum(v or 0 for v in verified)} pages checked in dest block files, "
                 f"{sum(len(r['workers']) for r in runs)} worker reports")
    print("\n".join(lines + prof_text), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "conditions": {**info, "loadavg_end": load_end, "cpu": noise, "header": header},
            "options": vars(args), "baseline": base, "faults": faults, "rates": rates,
            "runs": [{k: v for k, v in r.items() if k != "samples_ns"} for r in runs],
            "errors": errors}, indent=2, default=str))
    if errors:
        bar = "!" * 78
        print(f"\n{bar}\nFAILED: {len(errors)} problem(s)\n" + "\n".join(errors) + f"\n{bar}", flush=True)
        return 1
    print("all migrations complete and every page verified", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
