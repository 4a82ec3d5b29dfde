"""The core's house rules: no I/O imports, frozen records, the latency histogram."""

from __future__ import annotations

import ast
import dataclasses
import math
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import aiopostcopy.core
from aiopostcopy.core import commands
from aiopostcopy.core.stats import BUCKETS, LatencyHistogram, LatencyRecorder, bucket_of, bucket_upper

CORE = Path(aiopostcopy.core.__file__).parent
FORBIDDEN = {"asyncio", "socket", "cffi", "os", "time", "uvloop", "selectors"}
FORBIDDEN_PACKAGES = ("aiopostcopy.uffd", "aiopostcopy.transport", "aiopostcopy.loop")


@pytest.mark.parametrize("path", sorted(CORE.glob("*.py")), ids=lambda path: path.name)
def test_core_modules_import_nothing_that_does_io(path: Path) -> None:
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        else:
            continue
        for name in names:
            assert name.split(".")[0] not in FORBIDDEN, f"{path.name} imports {name}"
            assert not name.startswith(FORBIDDEN_PACKAGES), f"{path.name} imports {name}"


def test_commands_are_frozen_slotted_dataclasses() -> None:
    for name in commands.__all__:
        cls = getattr(commands, name)
        if not isinstance(cls, type):
            continue
        assert dataclasses.is_dataclass(cls) and hasattr(cls, "__slots__"), name
        assert cls.__dataclass_params__.frozen, name  # type: ignore[attr-defined]
    wake = commands.Wake("fd", 0x1000, 4096)
    with pytest.raises(dataclasses.FrozenInstanceError):
        wake.start = 0  # type: ignore[misc]


def test_latency_histogram_buckets_and_percentiles() -> None:
    recorder = LatencyRecorder()
    for microseconds in [0.5] * 50 + [40] * 40 + [900] * 9 + [70_000]:
        recorder.record(microseconds / 1e6)
    recorder.record(-1.0)  # a clock step backwards counts as 0
    hist = recorder.snapshot()
    assert hist.count == 101
    assert hist.buckets[bucket_of(0)] == 51 and hist.buckets[bucket_of(40)] == 40 and hist.buckets[bucket_of(900)] == 9
    assert hist.p50 == pytest.approx(1e-6)  # upper edge of the 0 us bucket
    assert hist.p90 == pytest.approx(44e-6)  # 40 us lies in [40, 44)
    assert hist.p99 == pytest.approx(960e-6)  # 900 us lies in [896, 960)
    assert hist.max == pytest.approx(0.07)
    assert hist.percentile(1.0) == pytest.approx(0.07)
    assert LatencyRecorder().snapshot().p99 == 0.0


def _percentile_by_scan(hist: LatencyHistogram, fraction: float) -> float:
    """One percentile the plain way: the first bucket whose running count reaches the rank."""
    if not hist.count:
        return 0.0
    rank, seen = max(1, math.ceil(fraction * hist.count)), 0
    for index, bucket in enumerate(hist.buckets):
        seen += bucket
        if seen >= rank:
            return min(bucket_upper(index) / 1e6, hist.max)
    return hist.max


@given(st.lists(st.integers(0, 1 << 30), max_size=300),
       st.lists(st.floats(0.0, 1.0), min_size=1, max_size=5).map(sorted))
def test_percentiles_in_one_pass_are_each_percentile(latencies: list[int], fractions: list[float]) -> None:
    recorder = LatencyRecorder()
    for microseconds in latencies:
        recorder.record(microseconds / 1e6)
    hist = recorder.snapshot()
    assert hist.percentiles(*fractions) == tuple(_percentile_by_scan(hist, f) for f in fractions)
    assert hist.percentile(fractions[0]) == _percentile_by_scan(hist, fractions[0])


def test_percentiles_of_no_fractions_are_none() -> None:
    recorder = LatencyRecorder()
    assert recorder.snapshot().percentiles() == ()
    recorder.record(1e-3)
    assert recorder.snapshot().percentiles() == ()


def test_percentiles_out_of_order_are_refused() -> None:
    recorder = LatencyRecorder()
    for microseconds in range(100):
        recorder.record(microseconds / 1e6)
    with pytest.raises(ValueError, match="increasing"):
        recorder.snapshot().percentiles(0.99, 0.5)


@given(st.integers(0, 1 << 42))
def test_every_latency_falls_in_a_bucket_at_most_an_eighth_wide(microseconds: int) -> None:
    index = bucket_of(microseconds)
    low = bucket_upper(index - 1) if index else 0
    if index < BUCKETS - 1:
        assert low <= microseconds < bucket_upper(index)
        assert bucket_upper(index) - low <= max(1, low // 8)
    else:
        assert microseconds >= low
