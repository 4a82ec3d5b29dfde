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

One real migration (:func:`~aiopostcopy.tools.bench_migration.run_migration`)
of a 1 GiB image (``--quick`` too: it takes well under a second) of which
``DATA_FRACTION`` is data in ``STRETCHES`` runs spread over it, the rest
holes, no clients.  The destination's block file is compared with the image
byte for byte.  The baseline is the same run's bulk rate (the C baseline's
``bulk``, over the same place): ``sparse_wire_s`` = bytes the source sent /
that rate, and ``ratio_sparse`` = the destination's migration time / it.

Figures (JSON keys): ``sparse_image_bytes``, ``sparse_data_bytes`` (the
image's data, zero pages written as data included), ``sparse_bytes_sent``,
``sparse_bytes_read`` and ``sparse_pages_hole`` (the source's report),
``sparse_duration_s``, ``sparse_wire_s``, ``ratio_sparse`` and
``sparse_pages_verified``.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable

from aiopostcopy.tools.bench_migration import PAGE, Context, Scenario, run_migration

__all__ = ["IMAGE_BYTES", "DATA_FRACTION", "STRETCHES", "run_sparse", "sparse_table", "spread_runs",
           "write_sparse_image"]

IMAGE_BYTES = 1 << 30
DATA_FRACTION = 0.10  #: of the image's pages hold data; the rest are holes
STRETCHES = 50  #: data runs, spread evenly


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
    """Run the scenario once; returns its figures (see the module docstring)."""
    image = ctx.workdir / "sparse.img"
    try:
        data = write_sparse_image(image, IMAGE_BYTES, spread_runs(IMAGE_BYTES // PAGE, DATA_FRACTION, STRETCHES),
                                  seed=ctx.seed)
        run = run_migration(dataclasses.replace(ctx, image=image), Scenario("sparse", reference=image), "sparse")
    finally:
        image.unlink(missing_ok=True)
    source = run.get("source_report") or {}
    sent = source.get("bytes_sent")
    wire = sent / (bulk_gbps * 1e9) if sent and bulk_gbps else None
    duration = run.get("duration_s") or None
    out = {"sparse_image_bytes": IMAGE_BYTES, "sparse_data_bytes": data, "sparse_bytes_sent": sent,
           "sparse_bytes_read": source.get("bytes_read"), "sparse_pages_hole": source.get("pages_hole"),
           "sparse_duration_s": duration, "sparse_wire_s": wire,
           "ratio_sparse": duration / wire if duration and wire else None,
           "sparse_pages_verified": run.get("pages_verified"), "sparse_errors": run["errors"]}
    log(f"  sparse: {_line(out)}" + ("  FAILED" if run["errors"] else ""))
    return out


def _line(f: dict[str, Any]) -> str:
    if not f.get("sparse_duration_s"):
        return "no figure (the migration failed)"
    text = (f"{f['sparse_image_bytes'] >> 20} MiB image, {f['sparse_data_bytes'] >> 20} MiB data, "
            f"{(f['sparse_bytes_sent'] or 0) >> 20} MiB sent, migration {f['sparse_duration_s'] * 1e3:.0f} ms")
    if f.get("sparse_wire_s"):
        text += f", wire {f['sparse_wire_s'] * 1e3:.0f} ms at the bulk rate: {f['ratio_sparse']:.2f}x"
    return text


def sparse_table(f: dict[str, Any]) -> list[str]:
    """Lines for the closing table."""
    return ["sparse snapshot (migration time; wire = bytes sent / the run's bulk rate):", f"  {_line(f)}"]
