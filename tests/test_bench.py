"""``python -m aiopostcopy bench --quick --loopback`` end to end, with a small image.

The run compiles and runs the C baseline and every scenario (real source,
destination and worker processes); the test checks the JSON has every key of
issue 8 with sane types and that every migration in it verified every page.
It asserts nothing about speed: that is what the figures are for.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from aiopostcopy.errors import UffdError
from aiopostcopy.uffd import supported_features

ROOT = Path(__file__).resolve().parents[1]
SIZE_MIB = 16
SCENARIOS = ("quiet", "sweep", "mixed", "idle", "rate", "quiet_tls", "idle_tls")
LATENCIES = ("c_fault_us", "fault_quiet_us", "fault_sweep_us", "fault_mixed_us", "fault_quiet_tls_us")
NUMBERS = ("link_bulk_gbps", "goodput_idle_gbps", "goodput_mixed_gbps", "mixed_faults_per_s", "mixed_duration_s",
           "wire_time_s", "dest_cpu_us_per_fault", "source_cpu_us_per_fault", "c_dest_cpu_us_per_fault",
           "c_source_cpu_us_per_fault", "goodput_idle_tls_gbps",
           "goodput_idle_tls_ratio")
CONDITIONS = ("kernel", "cpu", "vcpus", "load_at_start", "loop", "link")


def _skip_unless_runnable() -> None:
    if shutil.which("gcc") is None:
        pytest.skip("the C baseline needs gcc")
    if shutil.which("openssl") is None:
        pytest.skip("the TLS scenarios need the openssl command")
    try:
        supported_features()
    except UffdError as exc:
        pytest.skip(f"no userfaultfd can be opened here: {exc}")


@pytest.fixture(scope="module")
def bench_json() -> dict:
    _skip_unless_runnable()
    with tempfile.TemporaryDirectory(prefix="aiopostcopy-bench-test-") as tmp:
        out = Path(tmp) / "bench.json"
        done = subprocess.run(
            [sys.executable, "-m", "aiopostcopy", "bench", "--quick", "--loopback", "--size", str(SIZE_MIB),
             "--touches", "300", "--mixed-touches", "100", "--bulk-mb", "64", "--json", str(out)],
            cwd=ROOT, capture_output=True, text=True, timeout=300,
            env=dict(os.environ, PYTHONPATH=str(ROOT)))
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "every page verified" in done.stdout
        return dict(json.loads(out.read_text()))


@pytest.mark.slow
def test_every_key_is_there_with_a_sane_type(bench_json: dict) -> None:
    for key in LATENCIES:
        value = bench_json[key]
        assert isinstance(value["p50"], float) and isinstance(value["p99"], float), key
        assert value["count"] == 0 or 0 < value["p50"] <= value["p99"], (key, value)
    # the C fault and the quiet fault (sweep held) always fault; with the sweep running on a
    # small image the workers may find every page placed already
    assert bench_json["c_fault_us"]["count"] > 0 and bench_json["fault_quiet_us"]["count"] > 0
    assert bench_json["fault_quiet_tls_us"]["count"] > 0, "no fault timed over TLS"
    ratio = bench_json["fault_quiet_tls_ratio"]  # TLS against the same run's plain figures
    assert isinstance(ratio["p50"], float) and ratio["p50"] > 0 and ratio["p99"] > 0, ratio
    for key in NUMBERS:
        assert isinstance(bench_json[key], float) and bench_json[key] >= 0, (key, bench_json[key])
    assert bench_json["link_bulk_gbps"] > 0 and bench_json["goodput_idle_gbps"] > 0
    assert bench_json["dest_cpu_us_per_fault"] > 0 and bench_json["mixed_duration_s"] > 0
    # the C baseline's own CPU per fault, the same run's yardstick for the two above
    assert bench_json["c_dest_cpu_us_per_fault"] > 0 and bench_json["c_source_cpu_us_per_fault"] > 0
    conditions = bench_json["conditions"]
    assert all(conditions.get(key) not in (None, "") for key in CONDITIONS), conditions
    assert "loopback" in conditions["link"] and len(conditions["load_at_start"]) == 3
    reporting = conditions["host_page_reporting"]  # the host's part in placement speed (test_bench_conditions)
    assert isinstance(reporting["on"], bool) and set(reporting) == {"on", "order", "reported_mib"}, reporting
    assert set(conditions["idle_polling"]) == {"cpuidle_driver", "guest_halt_poll_ns"}, conditions["idle_polling"]


@pytest.mark.slow
def test_huge_pages_are_measured_or_skipped_with_a_reason(bench_json: dict) -> None:
    """2 MiB and 1 GiB faults against the page's wire time, unless the machine cannot (then: why)."""
    for key, unit in (("2m", "us"), ("1g", "ms")):
        reason = bench_json["huge_skipped"].get(key)
        if reason is not None:
            assert isinstance(reason, str) and reason, key
            continue
        fault, wire = bench_json[f"fault_huge_{key}_{unit}"], bench_json[f"wire_huge_{key}_{unit}"]
        assert fault["count"] > 0 and 0 < fault["p50"] <= fault["max"], (key, fault)
        assert wire > 0 and bench_json[f"ratio_huge_{key}"] == fault["p50"] / wire
        assert bench_json[f"huge_{key}_pages_verified"] > 0
    assert bench_json["huge_errors"] == []


@pytest.mark.slow
def test_the_sparse_snapshot_is_measured_and_verified(bench_json: dict) -> None:
    """A 1 GiB snapshot of 90% holes: only its data is read and sent, every page compared."""
    from aiopostcopy.tools.bench_sparse import IMAGE_BYTES

    assert bench_json["sparse_errors"] == []
    keys = ["sparse"]
    if "sparse_thp_skipped" in bench_json:  # the tmpfs with transparent huge pages needs root
        assert isinstance(bench_json["sparse_thp_skipped"], str) and bench_json["sparse_thp_skipped"]
    else:
        keys.append("sparse_thp")
    for key in keys:
        assert bench_json[f"{key}_pages_verified"] == IMAGE_BYTES // 4096, key
        data, sent = bench_json[f"{key}_data_bytes"], bench_json[f"{key}_bytes_sent"]
        assert bench_json[f"{key}_bytes_read"] == data and 0 < sent < data, key
        assert bench_json[f"{key}_pages_hole"] == (IMAGE_BYTES - data) // 4096, key
        wire, duration = bench_json[f"{key}_wire_s"], bench_json[f"{key}_duration_s"]
        assert wire > 0 and duration > 0 and bench_json[f"ratio_{key}"] == duration / wire, key


@pytest.mark.slow
def test_every_migration_verified_every_page(bench_json: dict) -> None:
    pages = (SIZE_MIB << 20) // 4096
    runs = bench_json["runs"]
    assert [r["scenario"] for r in runs] == list(SCENARIOS)
    assert bench_json["errors"] == [] and bench_json["workers_ok"] is True
    for run in runs:
        assert run["errors"] == [] and run["workers_ok"], run["scenario"]
        assert run["pages_total"] == run["pages_verified"] == pages and run["pages_bad"] == 0, run["scenario"]
    assert bench_json["pages_verified"] == bench_json["pages_total"] == pages * len(SCENARIOS)
