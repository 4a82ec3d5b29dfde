"""PNG plots of a bench run: fault-latency CDFs per scenario and goodput over time.

Theory of operation
-------------------
matplotlib is optional (the ``bench`` extra: ``pip install '.[bench]'``); when
it is missing :func:`plot` writes nothing and says so.  ``fault_cdf.png``
shows, on a log time axis, the share of faults served within t for the C
baseline and each scenario (samples pooled over rounds).  ``goodput.png``
shows the bytes received on the destination side of the link per 20 ms
(sampled from /proc every 10 ms; on loopback every process's loopback traffic
counts), in GB/s, for the first run of each scenario, against the C bulk rate;
the time axis starts when the destination process starts (Python start-up
included).  Fault samples below the run's C rr p50 are hits, left out as in
the table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["plot"]

BIN_S = 0.02


def _cdf(ax: Any, samples_ns: list[int], label: str, floor_us: float = 0.0) -> None:
    us = sorted(v / 1000 for v in samples_ns if v / 1000 >= floor_us)
    if us:
        ax.plot(us, [(i + 1) / len(us) for i in range(len(us))], label=f"{label} (n={len(us)})")


def _goodput(rx: list[tuple[float, int]]) -> tuple[list[float], list[float]]:
    if len(rx) < 2:
        return [], []
    times, rates = [], []
    start_t, start_b = rx[0]
    for t, b in rx[1:]:
        if t - start_t >= BIN_S:
            times.append(t)
            rates.append((b - start_b) / (t - start_t) / 1e9)
            start_t, start_b = t, b
    return times, rates


def plot(out: Path, c: dict[str, list[Any]], runs: list[dict[str, Any]], floor_us: float = 0.0) -> str:
    """Write fault_cdf.png and goodput.png into ``out``; returns a line saying what was written.

    Scenario samples below ``floor_us`` (the run's C rr p50) are hits, as in the table, and left out.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plots: NOT written: matplotlib is not installed (pip install 'aiopostcopy[bench]' or '.[bench]')"
    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 5))
    _cdf(ax, [v for run in c["fault"] for v in run], "C remote fault")
    for name in dict.fromkeys(r["scenario"] for r in runs):
        _cdf(ax, [v for r in runs if r["scenario"] == name for v in r["samples_ns"]], name, floor_us)
    ax.set(xscale="log", xlabel="fault latency, us (timed in the faulting thread)", ylabel="share of faults",
           title="Remote fault latency CDF")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.savefig(out / "fault_cdf.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(8, 5))
    seen: set[str] = set()
    for r in runs:
        if r["scenario"] not in seen:
            seen.add(r["scenario"])
            ax.plot(*_goodput(r["rx"]), label=r["scenario"])
    if c["bulk"]:
        ax.axhline(sorted(c["bulk"])[len(c["bulk"]) // 2], color="grey", linestyle="--", label="C bulk")
    ax.set(xlabel="seconds since the destination started", ylabel="GB/s received (per 20 ms)",
           title="Goodput over time")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.savefig(out / "goodput.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return f"plots: {out / 'fault_cdf.png'}, {out / 'goodput.png'}"
