"""Figures, the table and the JSON of ``python -m aiopostcopy bench``.

Theory of operation
-------------------
The runner hands over what it measured: the C baseline's raw results per
round (``c``: lists of rr and fault samples, faults/s and CPU per fault of the
C rate, stream and bulk GB/s)
and one dict per migration (:func:`aiopostcopy.tools.bench_migration.run_migration`).
:func:`summarize` pools fault samples per scenario over rounds (nearest-rank
percentiles), takes medians of per-run rates, and derives every JSON key the
issue names; :func:`table` prints each figure beside its ratio to the same
run's baseline (the C fault for latencies and fault rates, the C bulk stream
for goodput, the wire time for the migration's duration, the C handler thread
and page server for CPU per fault) and the goal it is
held to.  The TLS scenarios are given against the same run's plain ones
(``fault_quiet_tls_ratio``, ``goodput_idle_tls_ratio``): what TLS costs.  A fault sample below the C rr p50 of this run cannot be a remote
fault (a page placed between the worker's mincore check and its touch) and is
counted as a hit.
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Sequence

__all__ = ["pct", "summarize", "table"]


def pct(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of ascending values (0.0 for none)."""
    if not sorted_values:
        return 0.0
    return float(sorted_values[max(1, math.ceil(p / 100 * len(sorted_values))) - 1])


def _dist(samples_ns: Sequence[int], floor_us: float = 0.0) -> dict[str, Any]:
    us = sorted(v / 1000 for v in samples_ns if v / 1000 >= floor_us)
    return {"p50": pct(us, 50), "p90": pct(us, 90), "p99": pct(us, 99), "count": len(us),
            "hits": len(samples_ns) - len(us)}


def _median(values: Sequence[float | None]) -> float:
    vals = [v for v in values if v is not None]
    return float(statistics.median(vals)) if vals else 0.0


def _per_fault_us(runs: list[dict[str, Any]], key: str) -> float:
    return _median([r[key] * 1e6 / r["demand_faults"] for r in runs
                    if r.get(key) is not None and r.get("demand_faults")])


def _rate(runs: list[dict[str, Any]]) -> float:
    return _median([r["demand_faults"] / r["touch_s"] for r in runs if r.get("touch_s")])


def summarize(c: dict[str, list[Any]], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Every figure of the run, keyed as the JSON has them (see the module docstring)."""
    by: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by.setdefault(r["scenario"], []).append(r)
    c_rr = _dist([v for run in c["rr"] for v in run])
    floor = c_rr["p50"]
    bulk = _median(c["bulk"])
    mixed = by.get("mixed", [])
    out: dict[str, Any] = {
        "c_rr_us": c_rr,
        "c_fault_us": _dist([v for run in c["fault"] for v in run]),
        "c_faults_per_s": _median(c["rate"]),
        "c_dest_cpu_us_per_fault": _median([dest for dest, _ in c.get("rate_cpu", [])]),
        "c_source_cpu_us_per_fault": _median([source for _, source in c.get("rate_cpu", [])]),
        "c_stream_gbps": _median(c["stream"]),
        "link_bulk_gbps": bulk,
        "hit_floor_us": floor,
    }
    for key, name in (("fault_quiet_us", "quiet"), ("fault_sweep_us", "sweep"), ("fault_mixed_us", "mixed"),
                      ("fault_rate_us", "rate"), ("fault_quiet_tls_us", "quiet_tls")):
        out[key] = _dist([v for r in by.get(name, []) for v in r["samples_ns"]], floor)
    out.update(
        goodput_idle_gbps=_median([r["wire_gbps"] for r in by.get("idle", [])]),
        goodput_mixed_gbps=_median([r["wire_gbps"] for r in mixed]),
        mixed_faults_per_s=_rate(mixed),
        fault_rate_per_s=_rate(by.get("rate", [])),
        mixed_duration_s=_median([r["duration_s"] for r in mixed]),
        wire_time_s=_median([r["bytes_received"] / (bulk * 1e9) for r in mixed]) if bulk else 0.0,
        dest_cpu_us_per_fault=_per_fault_us(by.get("rate", []), "dest_cpu_demand_s"),
        source_cpu_us_per_fault=_per_fault_us(by.get("rate", []), "source_cpu_demand_s"),
        dest_cpu_us_per_fault_mixed=_per_fault_us(mixed, "dest_cpu_s"),
        source_cpu_us_per_fault_mixed=_per_fault_us(mixed, "source_cpu_s"),
        goodput_idle_tls_gbps=_median([r["wire_gbps"] for r in by.get("idle_tls", [])]),
        pages_verified=sum(r["pages_verified"] for r in runs),
        pages_total=sum(r["pages_total"] for r in runs),
        migrations=len(runs),
        workers_ok=all(r["workers_ok"] for r in runs),
    )
    out.update(_tls_cost(out))
    return out


def _tls_cost(f: dict[str, Any]) -> dict[str, Any]:
    """TLS against plain, same run: fault latency (p50, p99) and idle goodput, as ratios (0.0: not measured)."""
    quiet, tls = f["fault_quiet_us"], f["fault_quiet_tls_us"]
    share = lambda a, b: a / b if a and b else 0.0  # noqa: E731
    return {"fault_quiet_tls_ratio": {"p50": share(tls["p50"], quiet["p50"]), "p99": share(tls["p99"], quiet["p99"])},
            "goodput_idle_tls_ratio": share(f["goodput_idle_tls_gbps"], f["goodput_idle_gbps"])}


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def _latency_rows(f: dict[str, Any], threads: str) -> list[tuple[str, ...]]:
    c = f["c_fault_us"]
    rows = [("C request/reply 16 B / 4 KiB, us", f"{f['c_rr_us']['p50']:.1f}", f"{f['c_rr_us']['p99']:.1f}",
             "", "", ""),
            ("C remote fault, 1 thread, us", f"{c['p50']:.1f}", f"{c['p99']:.1f}", "1.00x", "1.00x", "")]
    goals = {"fault_quiet_us": ("fault, 1 thread, sweep held, us", "p50<=1.5x p99<=2x"),
             "fault_sweep_us": ("fault, 1 thread, sweep running, us", "p50<=3x p99<=1 ms"),
             "fault_mixed_us": (f"fault, {threads} mixed + sweep, us", "p50<=8x"),
             "fault_rate_us": (f"fault, {threads} sweep held, us", "")}
    for key, (label, goal) in goals.items():
        d = f[key]
        if d["count"]:
            rows.append((label, f"{d['p50']:.1f}", f"{d['p99']:.1f}", _ratio(d["p50"], c["p50"]),
                         _ratio(d["p99"], c["p99"]), goal))
    return rows


def _rate_rows(f: dict[str, Any], threads: str, c_threads: int) -> list[tuple[str, ...]]:
    bulk, cps = f["link_bulk_gbps"], f["c_faults_per_s"]
    rows = [("link bulk, C receive only, GB/s", f"{bulk:.3f}", "", "1.00x", "", ""),
            ("C stream + UFFDIO_COPY, GB/s", f"{f['c_stream_gbps']:.3f}", "", _ratio(f["c_stream_gbps"], bulk), "", ""),
            ("goodput, no clients, GB/s", f"{f['goodput_idle_gbps']:.3f}", "", _ratio(f["goodput_idle_gbps"], bulk),
             "", ">=0.95x"),
            (f"goodput, {threads} clients, GB/s", f"{f['goodput_mixed_gbps']:.3f}", "",
             _ratio(f["goodput_mixed_gbps"], bulk), "", ">=0.7x"),
            (f"C faults/s, {c_threads} threads", f"{cps:.0f}", "", "1.00x", "", ""),
            (f"faults/s, {threads} sweep held", f"{f['fault_rate_per_s']:.0f}", "",
             _ratio(f["fault_rate_per_s"], cps), "", ">=20000/s"),
            (f"faults/s, {threads} + sweep", f"{f['mixed_faults_per_s']:.0f}", "",
             _ratio(f["mixed_faults_per_s"], cps), "", ""),
            (f"migration with {threads} clients, s", f"{f['mixed_duration_s']:.3f}", "",
             _ratio(f["mixed_duration_s"], f["wire_time_s"]), "", "<=1.5x wire"),
            ("  its wire time (bytes / link bulk), s", f"{f['wire_time_s']:.3f}", "", "", "", ""),
            (f"C handler CPU per fault, {c_threads} threads, us", f"{f['c_dest_cpu_us_per_fault']:.1f}", "", "1.00x",
             "", ""),
            (f"C page server CPU per fault, {c_threads} threads, us", f"{f['c_source_cpu_us_per_fault']:.1f}", "",
             "1.00x", "", ""),
            (f"dest CPU per fault, {threads} held, us", f"{f['dest_cpu_us_per_fault']:.1f}", "",
             _ratio(f["dest_cpu_us_per_fault"], f["c_dest_cpu_us_per_fault"]), "", "<=20 us"),
            (f"source CPU per fault, {threads} held, us", f"{f['source_cpu_us_per_fault']:.1f}", "",
             _ratio(f["source_cpu_us_per_fault"], f["c_source_cpu_us_per_fault"]), "", ""),
            (f"dest CPU per fault, {threads} + sweep, us", f"{f['dest_cpu_us_per_fault_mixed']:.1f}", "", "", "", ""),
            (f"source CPU per fault, {threads} + sweep, us", f"{f['source_cpu_us_per_fault_mixed']:.1f}", "", "",
             "", "")]
    return rows


def _tls_rows(f: dict[str, Any]) -> list[tuple[str, ...]]:
    """What TLS costs: the TLS scenarios against the C baseline, and against plain in the last column."""
    rows = []
    d, c, r = f["fault_quiet_tls_us"], f["c_fault_us"], f["fault_quiet_tls_ratio"]
    if d["count"]:
        rows.append(("fault, 1 thread, sweep held, TLS, us", f"{d['p50']:.1f}", f"{d['p99']:.1f}",
                     _ratio(d["p50"], c["p50"]), _ratio(d["p99"], c["p99"]),
                     f"{r['p50']:.2f}/{r['p99']:.2f}x plain"))
    if f["goodput_idle_tls_gbps"]:
        rows.append(("goodput, no clients, TLS, GB/s", f"{f['goodput_idle_tls_gbps']:.3f}", "",
                     _ratio(f["goodput_idle_tls_gbps"], f["link_bulk_gbps"]), "",
                     f"{f['goodput_idle_tls_ratio']:.2f}x plain"))
    return rows


def table(f: dict[str, Any], threads: str, c_threads: int) -> list[str]:
    """The report: latencies against the C fault, rates against the C link, each with its goal."""
    head = ("measure", "p50/value", "p99", "x C/link", "x C p99", "goal")
    widths = (44, 11, 10, 10, 9, 18)
    line = lambda row: "".join(  # noqa: E731
        (f"{cell:<{w}}" if i in (0, 5) else f"{cell:>{w}}  ") for i, (cell, w) in enumerate(zip(row, widths)))
    out = [line(head), "-" * (sum(widths) + 8)]
    out += [line(r) for r in _latency_rows(f, threads)]
    out.append("")
    out += [line(r) for r in _rate_rows(f, threads, c_threads)]
    tls = _tls_rows(f)
    if tls:
        out += ["", *(line(r) for r in tls)]
    return out
