"""The ``huge`` benchmark scenario: faults on 2 MiB and 1 GiB pages against their wire time.

Theory of operation
-------------------
A thread that faults on a huge page waits for the whole page: 2 MiB take
1.7 ms at 10 Gbit/s, 1 GiB about 0.9 s.  The least the kernel allows is the
page's wire time plus one UFFDIO_COPY of it; this scenario measures how close
the service comes, for each size, in the same run as the link's bulk rate
(the C baseline's ``bulk``, measured over the same place), so the figure is a
ratio: fault latency / (page size / bulk rate).

For each page size, one real migration (:func:`~aiopostcopy.tools.bench_migration.run_migration`):
a pattern image of that page size, ``source --page-size``, the destination's
block dir on a hugetlbfs mount of that page size (mounted in a temporary
directory here, visible in the namespaces), one delegated worker with one
thread touching ``touches`` random pages, the source's sweep held until the
touches are done (a gated scenario), so every sample is a demand fault of a
whole huge page.  The kernel's pool of that size is grown for the run and put
back afterwards (:class:`~aiopostcopy.uffd.HugePageReservation`); a size whose
pages cannot be reserved (or mounted, or without root) is skipped and the
reason is given in the figures (``huge_skipped``).

Figures (JSON keys): ``fault_huge_2m_us`` and ``fault_huge_1g_ms`` (the
faulting thread's wait, p50/p99/max over the samples), ``wire_huge_2m_us`` /
``wire_huge_1g_ms`` (page size / bulk rate), ``ratio_huge_2m`` /
``ratio_huge_1g`` (p50 / wire), and ``huge_service_waits`` (the destination
report's own huge-page waits, per page size).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

from aiopostcopy.tools.bench_migration import Context, Scenario, run_migration
from aiopostcopy.uffd.hugepages import private_hugetlbfs

__all__ = ["SIZES", "run_huge", "huge_figures", "huge_table"]

MiB, GiB = 1 << 20, 1 << 30
#: (key, page size, pages in the image, touches; the same in --quick)
SIZES = (("2m", 2 * MiB, 64, 16), ("1g", GiB, 1, 1))
QUICK_TOUCHES = {"2m": 6, "1g": 1}


def run_huge(ctx: Context, bulk_gbps: float | None, quick: bool, log: Callable[[str], None]) -> dict[str, Any]:
    """Run the scenario for every page size; returns its figures (see the module docstring)."""
    out: dict[str, Any] = {"huge_skipped": {}, "huge_errors": [], "huge_service_waits": {}}
    for key, size, pages, touches in SIZES:
        touches = QUICK_TOUCHES[key] if quick else touches
        try:
            run = _run_size(ctx, key, size, pages, touches)
        except _Skip as exc:
            out["huge_skipped"][key] = str(exc)
            log(f"  huge {key}: skipped: {exc}")
            continue
        out["huge_errors"].extend(run["errors"])
        out.update(_size_figures(key, size, run, bulk_gbps))
        waits = run.get("huge_page_waits") or {}
        out["huge_service_waits"].update(waits)
        log(f"  huge {key}: {_line(key, out)}" + ("  FAILED" if run["errors"] else ""))
    return out


class _Skip(Exception):
    """This page size cannot be measured here (the reason is the message)."""


def _run_size(ctx: Context, key: str, size: int, pages: int, touches: int) -> dict[str, Any]:
    from aiopostcopy.uffd import HugePageReservation

    if os.geteuid() != 0:
        raise _Skip("needs root (hugetlbfs mount and huge page reservation)")
    reservation = HugePageReservation(pages, page_size=size)
    try:
        reservation.__enter__()
    except OSError as exc:
        raise _Skip(f"cannot reserve {pages} huge page(s) of {size >> 20} MiB: {exc}") from exc
    image = ctx.workdir / f"huge-{key}.img"
    ctx = dataclasses.replace(ctx, seed=_data_seed(ctx.seed), image=image)
    try:
        _make_image(image, size * pages, size, ctx.seed)
        with _mount(size) as mount:
            sc = Scenario(f"huge-{key}", gated=True, workers=(("delegated", 1, touches),),
                          source_args=("--page-size", str(size)), block_dir=mount, page_size=size)
            return run_migration(ctx, sc, f"huge-{key}")
    finally:
        image.unlink(missing_ok=True)
        reservation.__exit__(None, None, None)


@contextlib.contextmanager
def _mount(size: int) -> Iterator[str]:
    """A private hugetlbfs mount of ``size`` pages (:func:`private_hugetlbfs`); a mount that
    cannot be made skips the scenario, saying why."""
    with contextlib.ExitStack() as stack:
        try:
            path = stack.enter_context(private_hugetlbfs(size, prefix="aiopostcopy-bench-hugetlbfs-"))
        except OSError as exc:
            raise _Skip(str(exc)) from exc
        yield path


def _data_seed(seed: int) -> int:
    """The first pattern seed from ``seed`` on whose page 0 holds data (a fault on a zero page
    would measure the zero-page path, not the wire)."""
    from aiopostcopy.tools.pattern import is_zero_page

    while is_zero_page(0, 0, seed):
        seed += 1
    return seed


def _make_image(path: Path, length: int, page_size: int, seed: int) -> None:
    import mmap

    from aiopostcopy.tools.pattern import fill

    with open(path, "w+b") as f:
        f.truncate(length)
        with mmap.mmap(f.fileno(), length) as memory:
            fill(memory, 0, page_size, seed, assume_zeroed=True)


def _size_figures(key: str, size: int, run: dict[str, Any], bulk_gbps: float | None) -> dict[str, Any]:
    """The faulting thread's waits against the page's wire time at the run's bulk rate."""
    scale, unit = (1e3, "us") if size < GiB else (1e6, "ms")
    waits = sorted(ns / scale for ns in run["samples_ns"])
    dist = {"count": len(waits), "p50": _pick(waits, 0.5), "p99": _pick(waits, 0.99),
            "max": waits[-1] if waits else None}
    wire = size / (bulk_gbps * 1e9) * (1e6 if unit == "us" else 1e3) if bulk_gbps else None
    return {f"fault_huge_{key}_{unit}": dist, f"wire_huge_{key}_{unit}": wire,
            f"ratio_huge_{key}": dist["p50"] / wire if wire and dist["p50"] is not None else None,
            f"huge_{key}_pages_verified": run.get("pages_verified")}


def _pick(ordered: list[float], fraction: float) -> float | None:
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else None


def _line(key: str, f: dict[str, Any]) -> str:
    unit = "us" if key == "2m" else "ms"
    d, wire, ratio = f.get(f"fault_huge_{key}_{unit}") or {}, f.get(f"wire_huge_{key}_{unit}"), f.get(f"ratio_huge_{key}")
    if not d.get("count"):
        return "no fault sample"
    text = f"fault p50 {d['p50']:.1f} max {d['max']:.1f} {unit} ({d['count']} faults)"
    if wire:
        text += f", wire {wire:.1f} {unit} at the bulk rate: {ratio:.2f}x"
    return text


def huge_figures(result: dict[str, Any]) -> dict[str, Any]:
    """The scenario's figures as they go into the JSON (already keyed)."""
    return dict(result)


def huge_table(f: dict[str, Any]) -> list[str]:
    """Lines for the closing table."""
    lines = ["huge pages (fault = the faulting thread's wait; wire = page / the run's bulk rate):"]
    for key, size, _, _ in SIZES:
        name = f"{size >> 20} MiB" if size < GiB else f"{size >> 30} GiB"
        reason = f.get("huge_skipped", {}).get(key)
        lines.append(f"  {name}: " + (f"skipped: {reason}" if reason else _line(key, f)))
    return lines
