"""aiopostcopy.trace writes one file per process when asked; benchmarks/fault_trace.py joins them."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import fault_trace  # noqa: E402


def test_off_unless_the_environment_names_a_directory(tmp_path: pathlib.Path) -> None:
    code = ("from aiopostcopy import trace; trace.start('dest'); "
            "print(trace.ENABLED); trace.ENABLED and trace.mark('reply', 0, 5, 1000)")
    env = {k: v for k, v in os.environ.items() if k != "AIOPOSTCOPY_TRACE"}
    off = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT, check=True)
    assert off.stdout.strip() == "False" and list(tmp_path.iterdir()) == []
    on = subprocess.run([sys.executable, "-c", code], env={**env, "AIOPOSTCOPY_TRACE": str(tmp_path)},
                        capture_output=True, text=True, cwd=ROOT, check=True)
    assert on.stdout.strip() == "True"
    [written] = list(tmp_path.iterdir())
    assert written.name.startswith("dest.") and written.read_text() == "reply 0 5 1000\n"


def _write_faults(directory: pathlib.Path, times: dict[str, int], by_role: dict[str, tuple[str, ...]],
                  pages: range) -> None:
    for pid, (role, points) in enumerate(by_role.items()):
        lines = [f"{p} 0 {page} {page * 1000 + times[p] * 1000}\n" for page in pages for p in points]
        lines.append(f"touch 0 {pages.stop + 90} 5\n") if role == "worker" else None  # a fault that got no further
        (directory / f"{role}.{pages.start}{pid}.trace").write_text("".join(lines))


def test_report_joins_processes_by_page(tmp_path: pathlib.Path) -> None:
    times = {"touch": 0, "fault-read": 4, "request": 10, "src-request": 30, "src-reply": 40, "answer-read": 50,
             "reply": 70, "woken": 80, "resumed": 100}
    by_role = {"worker": ("touch", "resumed"), "dest": ("fault-read", "request", "answer-read", "reply", "woken"),
               "source": ("src-request", "src-reply")}
    _write_faults(tmp_path, times, by_role, range(3))
    lines = fault_trace.report(fault_trace.load(str(tmp_path)))
    assert lines[0].startswith("delegated: 3 faults passed every point (4 touched")
    assert "fault -> its reader begins the read" in lines[2] and "      4.0" in lines[2]
    assert "answer-read" not in "\n".join(lines) and "      30.0" in lines[7]  # answer-read -> woken: 30 us
    assert lines[-1].startswith("total, in the faulting thread") and "    100.0" in lines[-1] and "100%" in lines[-1]
    assert not any(line.startswith("self-served") for line in lines)


def test_report_gives_self_served_faults_their_own_table(tmp_path: pathlib.Path) -> None:
    delegated = {"touch": 0, "fault-read": 4, "request": 10, "src-request": 30, "src-reply": 40,
                 "answer-read": 50, "woken": 80, "resumed": 100}
    _write_faults(tmp_path, delegated, {"worker": ("touch", "resumed"),
                                        "dest": ("fault-read", "request", "answer-read", "woken"),
                                        "source": ("src-request", "src-reply")}, range(2))
    served = {"touch": 0, "fault-read": 10, "client-sent": 30, "client-request": 60, "request": 70,
              "src-request": 80, "src-reply": 100, "answer-read": 120, "woken": 140, "placed-sent": 150,
              "placed-read": 200, "client-woke": 210, "resumed": 300}
    _write_faults(tmp_path, served, {"worker": ("touch", "fault-read", "client-sent", "placed-read", "client-woke",
                                                "resumed"),
                                     "dest": ("client-request", "request", "answer-read", "woken", "placed-sent"),
                                     "source": ("src-request", "src-reply")}, range(10, 15))
    lines = fault_trace.report(fault_trace.load(str(tmp_path)))
    [delegated_at] = [i for i, line in enumerate(lines) if line.startswith("delegated: 2 faults")]
    [served_at] = [i for i, line in enumerate(lines) if line.startswith("self-served: 5 faults")]
    table = lines[served_at + 2:]
    assert [line.split("  ")[0] for line in table[:3]] == [
        "fault -> its reader begins the read (uffd wake-up)", "client: read -> ClientRequest written",
        "ClientRequest -> decoded by the service"]
    assert "     50.0" in table[9]  # Placed -> the client begins the read: 50 us
    assert table[-1].startswith("total, in the faulting thread") and "    300.0" in table[-1]
    assert "    100.0" in lines[served_at - 1]  # the delegated table's total ends before it
    assert delegated_at < served_at


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["delegated", "self-served"])
def test_a_traced_migration_gives_every_fault_every_point_of_its_path(mode: str) -> None:
    """postcopy_bench.py --trace on loopback, one toucher of ``mode`` on a 16 MiB image: the real
    source, destination and worker mark every point of that path for its faults (the table's
    count of faults that passed them all is most of the faults touched), and nothing of the
    other path's table."""
    if os.geteuid() != 0:
        pytest.skip("postcopy_bench.py runs as root")
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "postcopy_bench.py"), "--loopback", "--repeat", "1",
         "--size", "16", "--scenarios", "fault-quiet", "--trace", "fault-quiet", "--mode", mode, "--touches", "300",
         "--rr-count", "200", "--rr-warmup", "20", "--bulk-mb", "16"],
        capture_output=True, text=True, cwd=ROOT, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    lines = run.stdout.splitlines()
    [header] = [line for line in lines if line.startswith(f"{mode}: ") and "passed every point" in line]
    passed, touched = (int(number) for number in re.findall(r"\d+", header)[:2])
    assert touched >= 250 and passed >= touched * 9 // 10, header
    other = "self-served" if mode == "delegated" else "delegated"
    assert not any(line.startswith(f"{other}: ") for line in lines)
    assert any(line.startswith(f"{mode}: ") and "by their total" in line for line in lines)  # the bands too
    table = lines[lines.index(header) + 2:]
    assert len([line for line in table[:len(fault_trace.PATHS[mode])] if line.split()]) == len(fault_trace.PATHS[mode])
    assert table[len(fault_trace.PATHS[mode]) - 1].startswith("total, in the faulting thread")


def test_bands_give_each_hops_mean_over_the_slowest_faults_apart(tmp_path: pathlib.Path) -> None:
    fast = {"touch": 0, "fault-read": 4, "request": 10, "src-request": 30, "src-reply": 40,
            "answer-read": 50, "woken": 80, "resumed": 100}
    slow = dict(fast, **{"src-request": 930, "src-reply": 940, "answer-read": 950, "woken": 980, "resumed": 1000})
    roles = {"worker": ("touch", "resumed"), "dest": ("fault-read", "request", "answer-read", "woken"),
             "source": ("src-request", "src-reply")}
    _write_faults(tmp_path, fast, roles, range(99))
    _write_faults(tmp_path, slow, roles, range(200, 201))  # one fault in 100 waits 900 us for the source
    lines = fault_trace.bands(fault_trace.load(str(tmp_path)))
    assert lines[0].startswith("delegated: 100 faults by their total")
    rows = {line.split()[0]: line.split()[1:] for line in lines if line.strip().endswith(tuple("0123456789"))
            and "%" in line}
    assert rows["0%-50%"][:2] == ["50", "100.0"] and rows["0%-50%"][4] == "20.0"  # request -> source: 20 us
    assert rows["99%-100%"][:2] == ["1", "1000.0"] and rows["99%-100%"][4] == "920.0"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fault_trace.py"), "--bands", str(tmp_path)],
                         capture_output=True, text=True, check=True)
    assert "faults by their total" in run.stdout and run.stdout.startswith("delegated: 100 faults passed")
