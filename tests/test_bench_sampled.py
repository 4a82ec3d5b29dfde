"""benchmarks/sampled.py: py-spy attached to a process, its stacks summed by function."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import postcopy_bench  # noqa: E402  (scripts of benchmarks/, not a package)
import sampled  # noqa: E402

from aiopostcopy.destination.clients import ClientRegistry  # noqa: E402
from aiopostcopy.loop import PostcopyDestination  # noqa: E402

STACKS = """\
<module> (/x/__main__.py:1);run (/x/cli.py:10);spin (/x/work.py:5) 6
<module> (/x/__main__.py:1);run (/x/cli.py:11);wait (/x/work.py:9) 3
<module> (/x/__main__.py:1);walk (/x/tree.py:2);walk (/x/tree.py:4);walk (/x/tree.py:4) 1
"""


def test_own_and_inclusive_samples_by_function(tmp_path: Path) -> None:
    path = tmp_path / "stacks.txt"
    path.write_text(STACKS)
    assert sampled.load(path)[("<module> (__main__.py)", "run (cli.py)", "spin (work.py)")] == 6
    lines = sampled.summary_lines(path, 3, "who")
    assert lines[1] == f"who sampled profile: 10 all samples (py-spy, {sampled.RATE}/s)"
    own = lines[lines.index("  top 3 by own samples") + 1:lines.index("  top 3 by inclusive samples")]
    assert own == ["    60.0%  spin (work.py)", "    30.0%  wait (work.py)", "    10.0%  walk (tree.py)"]
    inclusive = lines[lines.index("  top 3 by inclusive samples") + 1:]
    # every line of a function counts as one; a recursive function once per sample
    assert inclusive == ["   100.0%  <module> (__main__.py)", "    90.0%  run (cli.py)", "    60.0%  spin (work.py)"]


def test_the_samples_under_some_functions(tmp_path: Path) -> None:
    path = tmp_path / "stacks.txt"
    path.write_text(STACKS)
    lines = sampled.summary_lines(path, 5, "who", ["wait", "walk"])
    assert lines[1].startswith("who sampled profile: 4 samples under wait, walk")
    own = lines[lines.index("  top 5 by own samples") + 1:lines.index("  top 5 by inclusive samples")]
    assert own == ["    75.0%  wait (work.py)", "    25.0%  walk (tree.py)"]


def test_the_fault_path_names_functions_of_the_destination() -> None:
    """A rename would leave the fault path's table empty without a word."""
    owners = {"PostcopyDestination": PostcopyDestination, "ClientRegistry": ClientRegistry}
    for name in postcopy_bench.FAULT_PATH:
        owner, _, method = name.partition(".")
        assert callable(getattr(owners[owner], method)), name


def _py_spy_missing() -> str | None:
    """Why py-spy cannot sample a child of this process here, or None."""
    try:
        sampled.find_py_spy()
    except FileNotFoundError as exc:
        return str(exc)
    scope = Path("/proc/sys/kernel/yama/ptrace_scope")
    if os.geteuid() != 0 and scope.exists() and int(scope.read_text()) >= 1:
        return "ptrace_scope >= 1 and not root: py-spy may not attach to a process it did not start"
    return None


@pytest.mark.skipif(_py_spy_missing() is not None, reason=str(_py_spy_missing()))
def test_py_spy_attached_to_a_process_finds_where_it_spins(tmp_path: Path) -> None:
    script = textwrap.dedent("""\
        import sys, time

        class Spinner:
            def spin_here(self, until):
                total = 0
                while time.monotonic() < until:
                    total += 1
                return total

        print("ready", flush=True)
        Spinner().spin_here(time.monotonic() + 2.5)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        sampler = sampled.Sampler(proc.pid, tmp_path / "stacks.txt", tmp_path / "py-spy.log")
        assert proc.wait(30) == 0
        assert sampler.wait(30), (tmp_path / "py-spy.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()  # the PID started here
            proc.wait()
    lines = sampled.summary_lines(tmp_path / "stacks.txt", 1, "spinner", ["Spinner.spin_here"])
    assert lines[lines.index("  top 1 by own samples") + 1].endswith("%  Spinner.spin_here (<string>)")
    samples = int(lines[1].split()[3])
    assert samples > 200  # about 2.5 s at 1000 a second, less what attaching took
