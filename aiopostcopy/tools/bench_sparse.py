"""The ``sparse`` benchmark scenario: a sparse snapshot against the wire time of its data.

Theory of operation
-------------------
A VM memory snapshot written by QEMU's file migration or by Firecracker is a
sparse file: guest pages never written are holes.  ``source --block
NAME=FILE`` finds the holes with SEEK_DATA/SEEK_HOLE and sends them as Zero
runs without reading them, so only the data crosses the wire; the
destination fills the holes itself (fallocate on shmem, while the data is
being placed).  What such a migration can cost at best is the wire time of
its data, and this scenario measures how close it comes.

Two real migrations (:func:`~aiopostcopy.tools.bench_migration.run_migration`)
of a 1 GiB image (``--quick`` too: it takes well under a second) of which
``DATA_FRACTION`` is data in ``STRETCHES`` runs spread over it, the rest
holes, no clients: one with the destination's block dir on /dev/shm (4 KiB
pages), one on a tmpfs mounted here with ``THP_OPTIONS`` (root only, skipped
with the reason otherwise), where filling a hole allocates 2 MiB folios.  The
destination's block file is compared with the image byte for byte.  The baseline is the same run's bulk rate (the C baseline's
``bulk``, over the same place): ``sparse_wire_s`` = bytes the source sent /
that rate, and ``ratio_sparse`` = the destination's migration time / it.

Figures (JSON keys): ``sparse_image_bytes``, ``sparse_data_bytes`` (the
image's data, zero pages written as data included), ``sparse_bytes_sent``,
``sparse_bytes_read`` and ``sparse_pages_hole`` (the source's report),
``sparse_duration_s``, ``sparse_wire_s``, ``ratio_sparse`` and
``sparse_pages_verified``; the same with ``sparse_thp`` for the second run
(or ``sparse_thp_skipped``: why).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path
from typing import Any, Callable

from aiopostcopy.tools.bench_migration import PAGE, Context, Scenario, run_migration
from aiopostcopy.uffd.hugepages import private_mount

__all__ = ["IMAGE_BYTES", "DATA_FRACTION", "STRETCHES", "run_sparse", "sparse_table", "spread_runs",
           "write_sparse_image"]

IMAGE_BYTES = 1 << 30
DATA_FRACTION = 0.10  #: of the image's pages hold data; the rest are holes
STRETCHES = 50  #: data runs, spread evenly
#: the second run's block dir: a tmpfs whose files get transparent huge pages, so that filling
#: the holes allocates 2 MiB folios (512 times fewer allocations than 4 KiB pages)
THP_OPTIONS = "huge=within_size,size=2g"


def spread_runs(pages: int, fraction: float, stretches: int) -> list[tuple[int, int]]:
    """``stretches`` page runs ``(first, count)``, evenly spread, covering about ``fraction`` of ``pages``."""
    step = pages // stretches
    length = int(pages * fraction) // stretches
    return [(i * step + (i * 37) % (step - length), length) for i in range(stretches)]


def write_sparse_image(path: str | Path, size: int, data_runs: list[tuple[int, int]], *, seed: int,
                       page_size: int = PAGE) -> int:
    """A sparse file of ``size`` bytes holding the pattern of block 0 in ``data_runs`` (its zero
    pages written as data) and holes elsewhere; returns the data bytes written."""
    from aiopostcopy.tools.pattern import expected_pages

    with open(path, "wb") as f:
        f.truncate(size)
        for first, count in data_runs:
            os.pwrite(f.fileno(), expected_pages(0, first, count, page_size, seed=seed, zero_every=7),
                      first * page_size)
    return sum(count for _, count in data_runs) * page_size


def run_sparse(ctx: Context, bulk_gbps: float | None, log: Callable[[str], None]) -> dict[str, Any]:
    """Run the scenario (both block dirs); returns its figures (see the module docstring)."""
    image = ctx.workdir / "sparse.img"
    out: dict[str, Any] = {"sparse_errors": []}
    try:
        data = write_sparse_image(image, IMAGE_BYTES, spread_runs(IMAGE_BYTES // PAGE, DATA_FRACTION, STRETCHES),
                                  seed=ctx.seed)
        ctx = dataclasses.replace(ctx, image=image)
        for key in ("sparse", "sparse_thp"):
            with contextlib.ExitStack() as stack:
                block_dir = None
                if key == "sparse_thp":
                    try:
                        block_dir = stack.enter_context(private_mount("tmpfs", THP_OPTIONS,
                                                                      prefix="aiopostcopy-bench-thp-"))
                    except OSError as exc:
                        out["sparse_thp_skipped"] = str(exc)
                        log(f"  {key}: skipped: {exc}")
                        continue
                run = run_migration(ctx, Scenario(key, reference=image, block_dir=block_dir), key)
            out.update(_figures(key, data, run, bulk_gbps))
            out["sparse_errors"].extend(run["errors"])
            log(f"  {key}: {_line(key, out)}" + ("  FAILED" if run["errors"] else ""))
    finally:
        image.unlink(missing_ok=True)
    return out


def _figures(key: str, data: int, run: dict[str, Any], bulk_gbps: float | None) -> dict[str, Any]:
    source = run.get("source_report") or {}
    sent = source.get("bytes_sent")
    wire = sent / (bulk_gbps * 1e9) if sent and bulk_gbps else None
    duration = run.get("duration_s") or None
    return {f"{key}_image_bytes": IMAGE_BYTES, f"{key}_data_bytes": data, f"{key}_bytes_sent": sent,
            f"{key}_bytes_read": source.get("bytes_read"), f"{key}_pages_hole": source.get("pages_hole"),
            f"{key}_duration_s": duration, f"{key}_wire_s": wire,
            f"ratio_{key}": duration / wire if duration and wire else None,
            f"{key}_pages_verified": run.get("pages_verified")}


def _line(key: str, f: dict[str, Any]) -> str:
    if not f.get(f"{key}_duration_s"):
        return "no figure (the migration failed)"
    text = (f"{f[f'{key}_image_bytes'] >> 20} MiB image, {f[f'{key}_data_bytes'] >> 20} MiB data, "
            f"{(f[f'{key}_bytes_sent'] or 0) >> 20} MiB sent, migration {f[f'{key}_duration_s'] * 1e3:.0f} ms")
    if f.get(f"{key}_wire_s"):
        text += f", wire {f[f'{key}_wire_s'] * 1e3:.0f} ms at the bulk rate: {f[f'ratio_{key}']:.2f}x"
    return text


def sparse_table(f: dict[str, Any]) -> list[str]:
    """Lines for the closing table."""
    thp = f.get("sparse_thp_skipped")
    return ["sparse snapshot (migration time; wire = bytes sent / the run's bulk rate):",
            f"  block dir on /dev/shm: {_line('sparse', f)}",
            f"  block dir on tmpfs {THP_OPTIONS}: " + (f"skipped: {thp}" if thp else _line("sparse_thp", f))]
