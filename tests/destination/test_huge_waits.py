"""Huge-page waits: kept per block page size by the counters, grouped per page size in the report,
and the benchmark's huge-page figures (fault against wire time)."""

from __future__ import annotations

from aiopostcopy.core.stats import HUGE_WAITS_KEPT, Counters
from aiopostcopy.core.waiters import Waiter
from aiopostcopy.destination.report import huge_page_waits
from aiopostcopy.tools.bench_huge import _size_figures, huge_table

MiB, GiB = 1 << 20, 1 << 30


def _counters() -> Counters:
    counters = Counters(faults_by_block=[0, 0, 0])
    counters.huge_sizes = [0, 2 * MiB, GiB]  # block 0 has 4 KiB pages: its waits are not kept
    return counters


def test_only_waits_on_huge_pages_are_kept_with_their_page_size() -> None:
    counters = _counters()
    for block, since in ((0, 9.0), (1, 9.5), (2, 8.0)):
        counters.woken_waiter(Waiter(key="own", block=block, page=0, address=0, thread_id=1, since=since), 10.0)
    assert counters.huge_waits == [(2 * MiB, 0.5), (GiB, 2.0)]
    assert counters.woken == 3


def test_the_kept_waits_are_bounded() -> None:
    counters = _counters()
    for _ in range(HUGE_WAITS_KEPT + 10):
        counters.huge_wait(1, 0.001)
    assert len(counters.huge_waits) <= HUGE_WAITS_KEPT


def test_the_report_groups_waits_by_page_size_in_milliseconds() -> None:
    waits = huge_page_waits([(2 * MiB, 0.002), (GiB, 1.5), (2 * MiB, 0.004), (2 * MiB, 0.003)])
    assert list(waits) == [str(2 * MiB), str(GiB)]
    two = waits[str(2 * MiB)]
    assert (two["page_size"], two["count"], two["p50_ms"], two["max_ms"]) == (2 * MiB, 3, 3.0, 4.0)
    assert [round(ms, 6) for ms in two["waits_ms"]] == [2.0, 4.0, 3.0]  # in the order they came
    assert waits[str(GiB)]["waits_ms"] == [1500.0]
    assert huge_page_waits([]) == {}


def test_bench_figures_set_the_fault_against_the_wire_time_at_the_bulk_rate() -> None:
    run = {"samples_ns": [3_000_000, 4_000_000, 5_000_000], "pages_verified": 64}
    f = _size_figures("2m", 2 * MiB, run, bulk_gbps=1.0)  # 1 GB/s: 2 MiB in 2097.152 us
    assert f["fault_huge_2m_us"] == {"count": 3, "p50": 4000.0, "p99": 5000.0, "max": 5000.0}
    assert round(f["wire_huge_2m_us"], 3) == 2097.152
    assert round(f["ratio_huge_2m"], 3) == round(4000.0 / 2097.152, 3)
    g = _size_figures("1g", GiB, {"samples_ns": [2_000_000_000]}, bulk_gbps=None)
    assert g["fault_huge_1g_ms"]["p50"] == 2000.0 and g["wire_huge_1g_ms"] is None and g["ratio_huge_1g"] is None
    lines = huge_table({**f, **g, "huge_skipped": {}})
    assert "2 MiB: fault p50 4000.0" in lines[1] and "1.91x" in lines[1]
    assert "1 GiB: fault p50 2000.0" in lines[2]
    assert "skipped: no room" in huge_table({"huge_skipped": {"1g": "no room"}})[2]
