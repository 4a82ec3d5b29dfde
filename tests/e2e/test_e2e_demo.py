"""The demo as README's first command runs it (as root here; tests/e2e/test_e2e_unprivileged.py
runs it as nobody): every key the issue names, every page verified, no connection lost."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile

import pytest

from e2e_support import HERE

ROOT = os.path.dirname(os.path.dirname(HERE))
KEYS = {"pages_total", "pages_verified", "pages_demand", "pages_background", "pages_zero", "fault_latency_us",
        "goodput_gbps", "duration_s"}


@pytest.mark.slow
def test_demo_summary_is_complete_and_every_page_verified() -> None:
    with tempfile.TemporaryDirectory(prefix="aiopostcopy-demo-test-") as tmp:
        out = os.path.join(tmp, "summary.json")
        done = subprocess.run([sys.executable, "-m", "aiopostcopy", "demo", "--size", "64M", "--quiet", "--json", out],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        with open(out, encoding="utf-8") as f:
            summary = json.load(f)
    assert KEYS <= set(summary), sorted(KEYS - set(summary))
    pages = (64 << 20) // 4096
    assert summary["pages_total"] == summary["pages_verified"] == pages and summary["pages_bad"] == []
    assert summary["pages_demand"] + summary["pages_background"] + summary["pages_zero"] == pages
    assert set(summary["fault_latency_us"]) == {"p50", "p90", "p99", "max"}
    assert summary["fault_samples"] == 0 or 0 < summary["fault_latency_us"]["p50"] <= summary["fault_latency_us"]["max"]
    assert summary["resumes"] == 0, "the demo lost and resumed a connection"
    assert len(summary["clients"]) == 4 and all(c["ok"] for c in summary["clients"]), summary["clients"]
    assert "verified" in done.stderr and "userfaultfd opened via" in done.stderr


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/children", encoding="ascii") as f:
                kids += [int(k) for k in f.read().split()]
        except FileNotFoundError:  # a thread that ended meanwhile (a short-lived one, as at start-up)
            continue
    return kids


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.slow
def test_sigterm_stops_the_demo_its_processes_and_its_files() -> None:
    demo = subprocess.Popen([sys.executable, "-m", "aiopostcopy", "demo", "--quiet", "--workload", "idle", "--size", "1G"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        line = demo.stderr.readline()  # "demo: ... userfaultfd opened via ...": source and clients run
        assert line.startswith("demo:"), line
        kids = _children(demo.pid)
        assert len(kids) == 5, kids  # the source and 4 clients
        with open(f"/proc/{kids[0]}/cmdline", encoding="utf-8") as f:
            workdir = os.path.dirname(next(a for a in f.read().split("\0") if "/dev/shm/aiopostcopy-demo-" in a)
                                      .split("=", 1)[-1])
        assert os.path.isdir(workdir)
        demo.send_signal(signal.SIGTERM)
        assert demo.wait(30) == 130
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    assert not [k for k in kids if _alive(k)], "a child of the demo outlived it"
    assert not os.path.exists(workdir), "the demo left its directory in /dev/shm"
