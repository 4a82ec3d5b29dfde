"""The core's house rules: no I/O imports, frozen records, the latency histogram."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

import aiopostcopy.core
from aiopostcopy.core import commands
from aiopostcopy.core.stats import LatencyRecorder

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
    assert hist.buckets[0] == 51 and hist.buckets[6] == 40 and hist.buckets[10] == 9
    assert hist.p50 == pytest.approx(1e-6)  # upper edge of bucket 0
    assert hist.p90 == pytest.approx(64e-6)
    assert hist.p99 == pytest.approx(1024e-6)
    assert hist.max == pytest.approx(0.07)
    assert hist.percentile(1.0) == pytest.approx(0.07)
    assert LatencyRecorder().snapshot().p99 == 0.0
