"""``python -m aiopostcopy bench``: the service against a C baseline, in one run, over one link.

Theory of operation
-------------------
The runner builds the link (two network namespaces joined by a veth pair with
``tbf rate 10gbit`` both ways, :class:`aiopostcopy.tools.netns.LinkPair`; or
127.0.0.1 with ``--loopback``), compiles the C baseline of benchmarks/c/ into a
temporary directory (:mod:`aiopostcopy.tools.bench_c`) and writes a pattern
image.  Then, ``--repeat`` rounds of:

1. the C baseline: request/reply, a remote fault (one thread), the fault rate
   (``--c-threads`` threads), stream + UFFDIO_COPY, the link's bulk rate;
2. the project's scenarios, each a real migration of the image
   (:mod:`aiopostcopy.tools.bench_migration`):

   - ``quiet``: one delegated worker, one thread; the sweep held until it is done;
   - ``sweep``: the same with the sweep running;
   - ``mixed``: 4 workers x 2 threads, delegated and self-served alternating, sweep running;
   - ``idle``: no worker: the sweep's goodput;
   - ``rate``: 4 x 2 threads with the sweep held: faults per second, and CPU per
     demand fault of the destination and the source up to the sweep's release;
   - ``quiet_tls`` and ``idle_tls``: ``quiet`` and ``idle`` with both channels
     over TLS (certificates made with ``openssl`` for the run), reported with
     their ratio to the same run's plain figures: what TLS costs;
   - ``huge`` (once, after the rounds): faults on 2 MiB and 1 GiB pages against
     the page's wire time at this run's bulk rate (:mod:`aiopostcopy.tools.bench_huge`);
   - ``sparse`` (once, after the rounds): a 1 GiB snapshot, 90% holes, against the
     wire time of what crossed at this run's bulk rate (:mod:`aiopostcopy.tools.bench_sparse`);

and a last C baseline, so every scenario is bracketed by baselines.  The
table gives each figure with its ratio to the same run's baseline and the goal
of issue 8; ``--json FILE`` writes every figure, ``--plot DIR`` PNGs of the
fault-latency CDFs and of goodput over time (matplotlib, the ``bench``
extra).  Every migration is verified page by page (workers and the
destination's block file); a failure is listed and the exit status is 1.
``--quick`` (one round, fewer touches) finishes well within 150 s.

Everything created is removed: namespaces, the work directory under /dev/shm,
the compiled baseline, every process started (by PID).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from aiopostcopy.tools import bench_report
from aiopostcopy.tools.bench_c import CBaseline, CBuildError, fault_cpu
from aiopostcopy.tools.bench_huge import huge_table, run_huge
from aiopostcopy.tools.bench_sparse import run_sparse, sparse_table
from aiopostcopy.tools.bench_migration import Context, Scenario, make_image, run_migration
from aiopostcopy.tools.bench_conditions import (cpu_snapshot, host_page_reporting, idle_polling, idle_polling_text,
                                                machine, other_load, run_with_halt_polling)
from aiopostcopy.tools.bench_procs import Loopback, Pinned, Veth, make_tls_files

__all__ = ["add_bench_arguments", "bench_main", "SCENARIOS"]

SCENARIOS = ("quiet", "sweep", "mixed", "idle", "rate", "quiet_tls", "idle_tls", "huge", "sparse")
ROOT = Path(__file__).resolve().parents[2]


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    """The ``bench`` subcommand's options."""
    p.add_argument("--loopback", action="store_true", help="no namespaces: everything on 127.0.0.1")
    p.add_argument("--rate", default="10gbit", help="tbf rate on both veth ends, or 'none' (10gbit)")
    p.add_argument("--quick", action="store_true", help="one round, fewer touches: under 150 s")
    p.add_argument("--repeat", type=int, default=None, help="rounds (3; 1 with --quick)")
    p.add_argument("--size", type=int, default=256, help="image size in MiB (256)")
    p.add_argument("--seed", type=int, default=1, help="pattern seed (1)")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"subset of {','.join(SCENARIOS)}")
    p.add_argument("--touches", type=int, default=None, help="touches of the single toucher (3000; 2000 quick)")
    p.add_argument("--clients", type=int, default=4, help="workers in mixed and rate (4)")
    p.add_argument("--threads", type=int, default=2, help="threads per worker in mixed and rate (2)")
    p.add_argument("--mixed-touches", type=int, default=None, help="touches per thread, mixed/rate (1500; 1000 quick)")
    p.add_argument("--c-threads", type=int, default=None, help="faulting threads of the C fault rate "
                                                               "(default: clients x threads)")
    p.add_argument("--bulk-mb", type=int, default=None, help="C bulk MiB per run (1024; 512 quick)")
    p.add_argument("--taskset", metavar="CPUS", help="run every child, baseline too, under taskset -c CPUS")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds one migration may take (120)")
    p.add_argument("--json", metavar="FILE", help="write every figure as JSON")
    p.add_argument("--plot", metavar="DIR", help="write PNG plots here (needs matplotlib: pip install '.[bench]')")
    p.add_argument("--keep", action="store_true", help="keep the work directory under /dev/shm")
    p.add_argument("--halt-poll-ns", type=int, metavar="NS",
                   help="for the run, let idle vCPUs poll NS ns before they halt (haltpoll guests, root; the old "
                        "value is put back): wake-ups across vCPUs then cost far less (benchmarks/README.md)")


def _defaults(args: argparse.Namespace) -> argparse.Namespace:
    quick = args.quick
    for name, full, fast in (("repeat", 3, 1), ("touches", 3000, 2000), ("mixed_touches", 1500, 1000),
                             ("bulk_mb", 1024, 512)):
        if getattr(args, name) is None:
            setattr(args, name, fast if quick else full)
    if args.c_threads is None:
        args.c_threads = args.clients * args.threads
    args.rr_count, args.c_touches = (5000, 2000) if quick else (10000, 3000)
    return args


def _check(args: argparse.Namespace) -> str | None:
    scenarios = [s for s in args.scenarios.split(",") if s]
    unknown = sorted(set(scenarios) - set(SCENARIOS))
    if unknown:
        return f"unknown scenarios {unknown} (choose from {', '.join(SCENARIOS)})"
    if args.repeat < 1 or args.size < 1 or args.touches < 1 or args.mixed_touches < 1 or args.clients < 1 \
            or args.threads < 1 or not 1 <= args.c_threads <= 64:
        return "--repeat, --size, --touches, --mixed-touches, --clients, --threads must be >= 1, --c-threads 1..64"
    pages = args.size << 8
    if max(args.touches, args.c_touches, args.c_threads * args.mixed_touches) > pages:
        return f"more touches than the {pages} pages of a {args.size} MiB image: raise --size"
    if args.halt_poll_ns is not None and args.halt_poll_ns < 0:
        return "--halt-poll-ns must be >= 0"
    if not args.loopback and os.geteuid() != 0:
        return "the veth link needs root (network namespaces); use --loopback or run as root"
    return None


def scenarios(args: argparse.Namespace) -> list[Scenario]:
    """The scenarios asked for, in order."""
    many = tuple((("delegated", "self-served")[i % 2], args.threads, args.mixed_touches) for i in range(args.clients))
    one = (("delegated", 1, args.touches),)
    known = {"quiet": Scenario("quiet", gated=True, workers=one), "sweep": Scenario("sweep", workers=one),
             "mixed": Scenario("mixed", workers=many), "idle": Scenario("idle"),
             "rate": Scenario("rate", gated=True, workers=many),
             "quiet_tls": Scenario("quiet_tls", gated=True, workers=one, tls=True),
             "idle_tls": Scenario("idle_tls", tls=True)}
    return [known[s] for s in args.scenarios.split(",") if s in known]  # huge runs once, after the rounds


def _c_round(cb: CBaseline, place: Any, args: argparse.Namespace, c: dict[str, list[Any]],
             log: Callable[[str], None]) -> None:
    pages = args.size << 8
    c["rr"].append(cb.rr(place, args.rr_count, args.rr_count // 10))
    fault = cb.fault(place, pages, args.c_touches, 1, args.seed)
    c["fault"].append(fault["samples_ns"])
    rate = cb.fault(place, pages, args.mixed_touches, args.c_threads, args.seed + 1)
    c["rate"].append(rate["faults_per_s"])
    c.setdefault("rate_cpu", []).append(fault_cpu(rate))
    c["stream"].append(cb.stream(place, args.size << 20))
    c["bulk"].append(cb.bulk(place, args.bulk_mb << 20))
    f = bench_report._dist(fault["samples_ns"])
    log(f"  C: rr p50 {bench_report._dist(c['rr'][-1])['p50']:.1f} us, fault p50 {f['p50']:.1f} "
        f"p99 {f['p99']:.1f} us, {c['rate'][-1]:.0f} faults/s ({args.c_threads} threads), "
        f"stream {c['stream'][-1]:.3f} GB/s, bulk {c['bulk'][-1]:.3f} GB/s")


def _place(args: argparse.Namespace) -> Any:
    if args.loopback:
        place: Any = Loopback()
    else:
        from aiopostcopy.tools import netns

        reason = netns.available()
        if reason is not None:
            raise RuntimeError(f"cannot build the veth link: {reason} (or use --loopback)")
        netns.sweep_stale()
        place = Veth(netns.LinkPair(None if args.rate.lower() == "none" else args.rate))
    return Pinned(place, args.taskset) if args.taskset else place


def _link_text(args: argparse.Namespace) -> str:
    if args.loopback:
        return "loopback 127.0.0.1 (no namespaces, no shaping)"
    if args.rate.lower() == "none":
        return "veth between two namespaces, unshaped"
    from aiopostcopy.tools import netns

    return (f"veth between two namespaces, tbf rate {args.rate} burst {netns.DEFAULT_BURST} "
            f"limit {netns.DEFAULT_LIMIT} both ways")


def _measure(args: argparse.Namespace, log: Callable[[str], None]) -> tuple[dict[str, list[Any]], list[dict[str, Any]],
                                                                             list[str]]:
    c: dict[str, list[Any]] = {"rr": [], "fault": [], "rate": [], "stream": [], "bulk": []}
    runs: list[dict[str, Any]] = []
    qdisc: list[str] = []
    workdir = Path(tempfile.mkdtemp(prefix="aiopostcopy-bench-", dir="/dev/shm"))
    place = None
    try:
        with CBaseline() as cb:
            began = time.monotonic()
            make_image(workdir / "source.img", args.size << 20, args.seed)
            log(f"image: {args.size} MiB pattern in {time.monotonic() - began:.1f} s")
            place = _place(args)
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH"))
                                                              if p))
            tls = (make_tls_files(workdir / "tls", place.server_addr) if any(sc.tls for sc in scenarios(args))
                   else None)
            ctx = Context(place=place, image=workdir / "source.img", workdir=workdir, seed=args.seed,
                          timeout=args.timeout, env=env, keep=args.keep, tls=tls)
            for rnd in range(args.repeat):
                log(f"round {rnd + 1}/{args.repeat}")
                _c_round(cb, place, args, c, log)
                for sc in scenarios(args):
                    runs.append(run_migration(ctx, sc, f"r{rnd}-{sc.name}"))
                    _log_run(runs[-1], c, log)
            if "huge" in args.scenarios.split(","):
                c["huge"] = [run_huge(ctx, bench_report._median(c["bulk"]), args.quick, log)]
            if "sparse" in args.scenarios.split(","):
                c["sparse"] = [run_sparse(ctx, bench_report._median(c["bulk"]), log)]
            log("final C baseline")
            _c_round(cb, place, args, c, log)
            if place.link is not None:
                qdisc = [_qdisc_line(place.link, side) for side in ("src", "dst")]
    finally:
        if place is not None:
            place.close()
        if args.keep:
            log(f"kept {workdir} (remove it when done)")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return c, runs, qdisc


def _qdisc_line(link: Any, side: str) -> str:
    q = link.qdisc_stats(side)
    return (f"qdisc {side}: {q['kind']} sent {q['bytes'] / 1e6:.1f} MB {q['packets']} pkts, "
            f"overlimits {q['overlimits']}, drops {q['drops']}")


def _log_run(r: dict[str, Any], c: dict[str, list[Any]], log: Callable[[str], None]) -> None:
    floor = bench_report._dist([v for run in c["rr"] for v in run])["p50"]
    f = bench_report._dist(r["samples_ns"], floor)
    log(f"  {r['scenario']}: {r['duration_s']:.2f} s, wire {r['wire_gbps']:.3f} GB/s, fault p50 {f['p50']:.1f} "
        f"p99 {f['p99']:.1f} us ({f['count']} timed, {r['demand_faults']} at the service), "
        f"dest CPU {r['dest_cpu_s'] or 0:.2f} s" + ("  FAILED" if r["errors"] else ""))


def bench_main(args: argparse.Namespace) -> int:
    """Run the benchmark; print the table; write ``--json`` and ``--plot``. Returns the exit status."""
    args = _defaults(args)
    problem = _check(args)
    if problem:
        print(f"aiopostcopy bench: {problem}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _sigterm_to_exit)
    return run_with_halt_polling(args.halt_poll_ns, "aiopostcopy bench", lambda: _bench(args))


def _bench(args: argparse.Namespace) -> int:
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    info = machine()
    info["link"] = _link_text(args)
    threads = f"{args.clients}x{args.threads}"
    header = [f"machine: Linux {info['kernel']}, {info['vcpus']} vCPUs, {info['cpu']}"
              f"{', VM' if info['vm'] else ''}; python {info['python']}; service loop {info['loop']}",
              f"load average at start: {' '.join(f'{v:.2f}' for v in info['load_at_start'])}",
              f"link: {info['link']}",
              f"run: {args.repeat} round(s) of [C baseline; {args.scenarios}] + a final C baseline; image "
              f"{args.size} MiB; 1 toucher x {args.touches}; {threads} x {args.mixed_touches} touches; C fault "
              f"{args.c_touches} touches, C rate {args.c_threads} threads; children pinned: {args.taskset or 'no'}"]
    info["idle_polling"] = idle_polling()
    polling = idle_polling_text(info["idle_polling"], set_for_run=args.halt_poll_ns is not None)
    if polling is not None:
        header.append(polling)
    reporting = host_page_reporting()
    if reporting["on"]:
        header.append(f"host free page reporting: on (order {reporting['order']}): memory the guest frees goes back "
                      "to the host, and placing pages into it again costs host faults (benchmarks/README.md)")
    print("\n".join(header), flush=True)
    started, cpu0 = time.monotonic(), cpu_snapshot()
    try:
        c, runs, qdisc = _measure(args, log)
    except (CBuildError, RuntimeError, OSError) as exc:
        print(f"aiopostcopy bench: failed: {exc}", file=sys.stderr)
        return 1
    figures = bench_report.summarize(c, runs)
    for once in (*c.get("huge", ()), *c.get("sparse", ())):  # the scenarios run once, after the rounds
        figures.update(once)
    noise = other_load(cpu0, cpu_snapshot(), time.monotonic() - started)
    info["host_page_reporting"] = _reported_during(reporting, host_page_reporting())
    errors = [e for r in runs for e in r["errors"]] + figures.get("huge_errors", []) + figures.get("sparse_errors", [])
    lines = ["", *bench_report.table(figures, threads, args.c_threads), "",
             *(huge_table(figures) + [""] if c.get("huge") else []),
             *(sparse_table(figures) + [""] if c.get("sparse") else []), *qdisc,
             f"load average at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}; wall {noise['wall_s']:.0f} s; "
             f"CPU not ours ~{noise['others_vcpu'] * 100:.0f}% of one vCPU; steal {noise['steal_s']:.1f} s"
             + _reporting_text(info["host_page_reporting"]),
             f"verification: {figures['migrations']} migrations, {figures['pages_verified']}/{figures['pages_total']} "
             f"pages checked in the destination block files, workers {'all ok' if figures['workers_ok'] else 'FAILED'}"]
    print("\n".join(lines), flush=True)
    if args.json:
        write_json(Path(args.json), figures, info, header, noise, args, runs, c, errors)
    if args.plot:
        from aiopostcopy.tools import bench_plot

        print(bench_plot.plot(Path(args.plot), c, runs, figures["hit_floor_us"]), flush=True)
    if errors:
        bar = "!" * 78
        print(f"\n{bar}\nFAILED: {len(errors)} problem(s)\n" + "\n".join(errors) + f"\n{bar}", flush=True)
        return 1
    print("all migrations complete and every page verified", flush=True)
    return 0


def _reported_during(start: dict[str, Any], end: dict[str, Any]) -> dict[str, Any]:
    """The host free page reporting of the run: on at either end, and the MiB reported meanwhile
    (None where the kernel does not count them)."""
    counted = start["reported_kib"] is not None and end["reported_kib"] is not None
    return {"on": start["on"] or end["on"], "order": end["order"],
            "reported_mib": (end["reported_kib"] - start["reported_kib"]) / 1024 if counted else None}


def _reporting_text(reporting: dict[str, Any]) -> str:
    if not reporting["on"]:
        return ""
    if reporting["reported_mib"] is None:
        return "; host free page reporting on"
    return f"; host free page reporting on: {reporting['reported_mib']:.0f} MiB given back during the run"


def write_json(path: Path, figures: dict[str, Any], info: dict[str, Any], header: list[str],
               noise: dict[str, float], args: argparse.Namespace, runs: list[dict[str, Any]],
               c: dict[str, list[Any]], errors: list[str]) -> None:
    """Every figure, the conditions, the per-run details (without raw samples) and any errors."""
    conditions = {**info, "load_at_end": list(os.getloadavg()), "cpu_outside": noise, "header": header}
    body = {**figures, "conditions": conditions, "options": vars(args), "errors": errors,
            "c_runs": {k: v for k, v in c.items() if k not in ("rr", "fault", "huge", "sparse")},
            "runs": [{k: v for k, v in r.items() if k not in ("samples_ns", "rx")} for r in runs]}
    path.write_text(json.dumps(body, indent=2, default=str) + "\n")


def _sigterm_to_exit(signum: int, frame: object) -> None:
    """SIGTERM -> SystemExit, so every finally clause cleans up."""
    raise SystemExit(128 + signum)
