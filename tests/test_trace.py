"""aiopostcopy.trace writes one file per process when asked; benchmarks/fault_trace.py joins them."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

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


def test_report_joins_processes_by_page(tmp_path: pathlib.Path) -> None:
    times = {"touch": 0, "request": 10, "src-request": 30, "src-reply": 40, "reply": 70, "woken": 80, "resumed": 100}
    by_role = {"worker": ("touch", "resumed"), "dest": ("request", "reply", "woken"), "source": ("src-request", "src-reply")}
    for pid, (role, points) in enumerate(by_role.items()):
        lines = [f"{p} 0 {page} {page * 1000 + times[p] * 1000}\n" for page in range(3) for p in points]
        lines.append("touch 0 99 5\n") if role == "worker" else None  # a fault that never got further
        (tmp_path / f"{role}.{pid}.trace").write_text("".join(lines))
    text = "\n".join(fault_trace.report(fault_trace.load(str(tmp_path))))
    assert text.startswith("3 faults passed every point (4 touched")
    assert "     10.0" in text.splitlines()[2]  # touch -> request: 10 us
    assert "    100.0" in text.splitlines()[-1] and "100%" in text.splitlines()[-1]
