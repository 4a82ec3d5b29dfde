"""One real migration, measured: source, destination and workers as separate processes.

Theory of operation
-------------------
:func:`run_migration` runs ``python -m aiopostcopy source`` on the source side
of a place, workers (``python -m aiopostcopy.tools.workload --ready
--wait-socket``, started first so they join within a millisecond of the
control socket appearing) and ``python -m aiopostcopy dest --block-dir DIR
--clients SOCK --json FILE`` on the destination side, waits for the
destination to finish, and collects:

* every worker's fault samples (first touches of pages not in memory, timed
  in the faulting thread), its hits, touch time and page-by-page verdict;
* the destination's report (duration, bytes received, faults, demand pages);
* the destination block file checked page by page against the pattern;
* from a :class:`~aiopostcopy.tools.bench_procs.Sampler`: CPU time of the
  destination and the source over the run and the bytes received on the
  destination side of the link over time.

A *TLS* scenario runs both with ``--tls-cert/--tls-key/--tls-ca`` (the
certificates of ``Context.tls``): the same migration, both channels over TLS.

A *gated* scenario runs the stock source with ``--sweep-after-idle GATE_IDLE_S``:
it sends nothing in the background until no page was served on demand for
that long (the workers are done), then sweeps as normal so the migration
completes.  It prints the CLOCK_MONOTONIC time of the release, so CPU used by
the destination and the source up to that instant is CPU spent on demand
faults alone.

Every failure (a process exiting non-zero, a page that does not verify, an
incomplete report) is returned in ``errors``; nothing is raised for them.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from aiopostcopy.tools.bench_procs import Sampler, StderrTap, cpu_ns, first_line, stop, tail, wait_exit

__all__ = ["Scenario", "run_migration", "make_image", "verify_file", "differing_pages", "BLOCK", "PAGE"]

BLOCK = "ram"
PAGE = 4096
GATE_IDLE_S = 0.25  #: gated source: release the sweep once no page was served for this long
_RELEASED = re.compile(r"sweep released at ([0-9.]+)")


@dataclass(frozen=True)
class Scenario:
    """What one migration runs.

    Attributes:
        name: Its key in the figures.
        gated: Hold the sweep until demand faults stop.
        workers: (mode, threads, touches per thread) of each worker.
        source_args: Extra ``aiopostcopy source`` options.
        tls: Both channels over TLS (the certificates of ``Context.tls``).
        block_dir: the destination's block dir (default: a directory of the run under /dev/shm).
        page_size: the image's page size (what the block file is verified with).
        reference: compare the block file with this file byte for byte, page by page,
            instead of with the pattern (an image that is not all pattern).
    """

    name: str
    gated: bool = False
    workers: tuple[tuple[str, int, int], ...] = ()
    source_args: tuple[str, ...] = field(default=())
    tls: bool = False
    block_dir: str | None = None
    page_size: int = 4096
    reference: Path | None = None


@dataclass
class Context:
    """What every migration of a run shares."""

    place: Any
    image: Path
    workdir: Path
    seed: int
    timeout: float
    env: dict[str, str]
    keep: bool = False
    source_prefix: Sequence[str] | None = None  #: replaces [python, -m, aiopostcopy] for the source
    dest_prefix: Sequence[str] | None = None  #: the same for the destination
    tls: Any = None  #: a bench_procs.TlsFiles for the TLS scenarios


# --------------------------------------------------------------------------- processes


def _start(ctx: Context, side: str, argv: Sequence[str], log: Path | None, **kw: Any) -> subprocess.Popen[bytes]:
    if log is None:
        return ctx.place.popen(side, list(argv), env=ctx.env, **kw)
    with open(log, "wb") as err:
        return ctx.place.popen(side, list(argv), stderr=err, env=ctx.env, **kw)


def _start_source(ctx: Context, sc: Scenario, run: Path) -> tuple[subprocess.Popen[bytes], str]:
    py = sys.executable
    cmd = list(ctx.source_prefix or [py, "-m", "aiopostcopy"])
    gate = ["--sweep-after-idle", str(GATE_IDLE_S)] if sc.gated else []
    argv = [*cmd, "source", "--listen", f"{ctx.place.server_addr}:0", "--block", f"{BLOCK}={ctx.image}",
            "--json", str(run / "source.json"), *gate, *sc.source_args, *_tls_options(ctx, sc, "source")]
    source = _start(ctx, "src", argv, run / "source.err", stdout=subprocess.PIPE)
    line = first_line(source, 30)
    if "listening on" not in line:
        stop(source)
        raise RuntimeError(f"source did not start: {line!r}\n{tail(run / 'source.err')}")
    return source, line.rsplit(" ", 1)[1]


def _tls_options(ctx: Context, sc: Scenario, role: str) -> list[str]:
    if not sc.tls:
        return []
    if ctx.tls is None:
        raise RuntimeError(f"scenario {sc.name} needs TLS certificates (Context.tls)")
    return list(ctx.tls.options(role))


def _start_workers(ctx: Context, sc: Scenario, run: Path, sock: str) -> list[subprocess.Popen[bytes]]:
    workers, slot = [], 0
    for i, (mode, threads, touches) in enumerate(sc.workers):
        # each thread its own slot, hence its own random pages (as each C toucher has its own):
        # workers on one slot would touch the same pages in step, every fault but one joining
        argv = [sys.executable, "-m", "aiopostcopy.tools.workload", "--socket", sock, "--ready",
                "--wait-socket", "60", "--threads", str(threads), "--mode", mode, "--workload", "random",
                "--touches", str(touches), "--seed", str(ctx.seed), "--slot-base", str(slot), "--name", f"bench-{i}",
                "--raw-latencies", "--timeout", "120", "--json", str(run / f"worker{i}.json")]
        slot += threads
        workers.append(_start(ctx, "dst", argv, run / f"worker{i}.err", stdout=subprocess.PIPE))
    for i, w in enumerate(workers):
        if first_line(w, 30) != "ready":
            for proc in workers:
                stop(proc)
            raise RuntimeError(f"worker {i} did not start\n{tail(run / f'worker{i}.err')}")
    return workers


def _collect_workers(workers: list[subprocess.Popen[bytes]], sc: Scenario, run: Path,
                     errors: list[str]) -> list[dict[str, Any]]:
    reports = []
    for i, w in enumerate(workers):
        rc, _ = wait_exit(w, 60)
        if rc is None:
            stop(w)
        try:
            rep = json.loads((run / f"worker{i}.json").read_text())
        except (OSError, ValueError) as exc:
            rep = {"ok": False, "error": f"no report: {exc}"}
        reports.append(rep)
        if rc != 0 or not rep.get("ok"):
            errors.append(f"{sc.name}: worker {i} ({sc.workers[i][0]}) exit {rc}, ok={rep.get('ok')}, "
                          f"bad pages {rep.get('bad_page_count')}, error {rep.get('error')}\n"
                          f"{tail(run / f'worker{i}.err')}")
    return reports


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return {}


def _released_at(run: Path) -> float | None:
    try:
        found = _RELEASED.search((run / "source.err").read_text(errors="replace"))
    except OSError:
        return None
    return float(found.group(1)) if found else None


# --------------------------------------------------------------------------- one migration


def run_migration(ctx: Context, sc: Scenario, tag: str) -> dict[str, Any]:
    """Run one whole migration of ``sc`` and check it; see the module docstring.

    Returns:
        The run's figures, its raw fault samples (``samples_ns``), its link
        timeline (``rx``: (seconds since the destination started, bytes)) and ``errors``.
    """
    run = ctx.workdir / tag
    (run / "dest").mkdir(parents=True)
    sock = str(run / "clients.sock")
    errors: list[str] = []
    source, address = _start_source(ctx, sc, run)
    src_cpu0 = cpu_ns(source.pid)
    try:
        workers = _start_workers(ctx, sc, run, sock)
    except BaseException:
        stop(source)
        raise
    dest_argv = [*(ctx.dest_prefix or [sys.executable, "-m", "aiopostcopy"]), "dest", "--source", address,
                 "--block-dir", sc.block_dir or str(run / "dest"), "--clients", sock, "--json", str(run / "dest.json"),
                 *_tls_options(ctx, sc, "dest")]
    sampler = Sampler(0.01)
    began = time.monotonic()
    dest = _start(ctx, "dst", dest_argv, None, stderr=subprocess.PIPE)
    try:
        sampler.watch("dest", dest.pid)
        sampler.watch("source", source.pid)
        sampler.count_rx(*ctx.place.rx_bytes_path(dest.pid))
        sampler.start()
        tap = StderrTap(dest, run / "dest.err")
        dest_rc, dest_cpu_end = wait_exit(dest, ctx.timeout)
    finally:
        sampler.stop()
    tap.join()
    if dest_rc is None:
        errors.append(f"{sc.name}: destination still running after {ctx.timeout} s: stopped")
        stop(dest)
    elif dest_rc != 0:
        errors.append(f"{sc.name}: destination exited {dest_rc}\n{tail(run / 'dest.err')}")
    if dest_rc != 0:  # nobody will end these: stop them rather than wait for their timeouts
        for proc in (source, *workers):
            stop(proc)
    src_rc, src_cpu_end = wait_exit(source, 30)
    if src_rc is None:
        stop(source)
    if src_rc != 0:
        errors.append(f"{sc.name}: source exited {src_rc}\n{tail(run / 'source.err')}")
    reports = _collect_workers(workers, sc, run, errors)
    report = _read_json(run / "dest.json")
    if not report:
        errors.append(f"{sc.name}: no destination report")
    elif not (report.get("complete") and report.get("pages_placed") == report.get("pages_total")):
        errors.append(f"{sc.name}: destination report incomplete: placed {report.get('pages_placed')}"
                      f"/{report.get('pages_total')}, aborted {report.get('aborted')}")
    bad = None
    if dest_rc == 0:
        block = Path(sc.block_dir or run / "dest") / BLOCK
        bad = (differing_pages(block, sc.reference, sc.page_size) if sc.reference is not None
               else verify_file(block, ctx.seed, sc.page_size))
    if bad:
        errors.append(f"{sc.name}: {len(bad)} pages of the destination block file do not verify, first {bad[:10]}")
    released = _released_at(run) if sc.gated else None
    if sc.gated and released is None:
        errors.append(f"{sc.name}: the gated source did not say when it released the sweep\n"
                      f"{tail(run / 'source.err')}")
    figures = _figures(report, reports, bad)
    figures.update(
        scenario=sc.name, tag=tag, errors=errors, wall_s=time.monotonic() - began,
        samples_ns=[v for rep in reports for v in rep.get("latencies_ns", [])],
        dest_cpu_s=_delta_s(dest_cpu_end, tap.cpu_at_first_line),
        source_cpu_s=_delta_s(src_cpu_end, src_cpu0),
        dest_cpu_demand_s=_delta_s(sampler.cpu_at("dest", released), tap.cpu_at_first_line) if released else None,
        source_cpu_demand_s=_delta_s(sampler.cpu_at("source", released), src_cpu0) if released else None,
        rx=[(t - began, b) for t, b in sampler.rx_series()],
        source_report=_read_json(run / "source.json"))
    if not ctx.keep:
        shutil.rmtree(run, ignore_errors=True)
    return figures


def _delta_s(end: int | None, start: int | None) -> float | None:
    return None if end is None or start is None else (end - start) / 1e9


def _figures(report: dict[str, Any], workers: list[dict[str, Any]], bad: list[int] | None) -> dict[str, Any]:
    duration = report.get("duration_s") or 0.0
    received = report.get("bytes_received") or 0
    pages_total = report.get("pages_total") or 0
    self_served = sum((r.get("client") or {}).get("faults", 0) for r in workers)
    return {
        "duration_s": duration, "bytes_received": received,
        "wire_gbps": received / duration / 1e9 if duration else 0.0,
        "pages_total": pages_total, "pages_demand": report.get("pages_demand"),
        "pages_verified": (pages_total - len(bad)) if bad is not None else 0,
        "pages_bad": len(bad) if bad is not None else None,
        "demand_faults": (report.get("faults") or 0) + self_served,
        "worker_hits": sum(r.get("hits", 0) for r in workers),
        "touch_s": max((r.get("touch_ms") or 0.0 for r in workers), default=0.0) / 1000,
        "workers_ok": all(r.get("ok") for r in workers),
        "worker_pages_checked": sum(1 for r in workers if r.get("ok")),
        "service_latency_us": report.get("service_latency_us"),
        "huge_page_waits": report.get("huge_page_waits"),
    }


def verify_file(path: Path, seed: int, page_size: int = PAGE) -> list[int]:
    """Check every page of a block file against the pattern; returns the bad pages."""
    from aiopostcopy.tools.pattern import verify_block

    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        with mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as memory:
            return verify_block(memory, 0, page_size, seed)


def differing_pages(path: Path | str, reference: Path | str, page_size: int = PAGE,
                    chunk: int = 16 << 20) -> list[int]:
    """The pages whose bytes differ between two files (holes read as zeros; a shorter file's
    missing tail differs)."""
    bad: list[int] = []
    with open(path, "rb") as a, open(reference, "rb") as b:
        size = max(os.fstat(a.fileno()).st_size, os.fstat(b.fileno()).st_size)
        for offset in range(0, size, chunk):
            left, right = os.pread(a.fileno(), chunk, offset), os.pread(b.fileno(), chunk, offset)
            if left == right:
                continue
            for at in range(0, max(len(left), len(right)), page_size):
                if left[at:at + page_size] != right[at:at + page_size]:
                    bad.append((offset + at) // page_size)
    return bad


def make_image(path: Path, size: int, seed: int) -> None:
    """Write the pattern image the source serves (zero pages left as holes)."""
    from aiopostcopy.tools.pattern import fill

    with open(path, "w+b") as f:
        f.truncate(size)
        with mmap.mmap(f.fileno(), size) as memory:
            fill(memory, 0, PAGE, seed, assume_zeroed=True)
