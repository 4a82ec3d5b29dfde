"""postcopy_bench.py --profile: every thread of the profiled process is in its stats."""

from __future__ import annotations

import pstats
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import postcopy_bench  # noqa: E402  (a script of benchmarks/, not a package)

SCRIPT = textwrap.dedent("""\
    import threading

    def spin_in_thread():
        total = 0
        for i in range(300_000):
            total += i * i
        return total

    def spin_in_main():
        return sum(i for i in range(100_000))

    worker = threading.Thread(target=lambda: [spin_in_thread() for _ in range(3)])
    worker.start()
    spin_in_main()
    worker.join()
    waiting = threading.Event()
    idle = threading.Thread(target=waiting.wait, daemon=True)  # still blocked when the stats are written
    idle.start()
""")


@pytest.mark.parametrize("clock", ["wall", "cpu"])
def test_the_profile_holds_the_work_of_every_thread(tmp_path, clock) -> None:
    script, out = tmp_path / "work.py", tmp_path / "work.prof"
    script.write_text(SCRIPT)
    argv = postcopy_bench._profiled(sys.executable, str(out), [str(script)], clock)
    subprocess.run(argv, check=True, timeout=120)
    by_name = {name: (calls, own) for (_file, _line, name), (_cc, calls, own, _cum, _callers)
               in pstats.Stats(str(out)).stats.items()}
    assert by_name["spin_in_thread"][0] == 3, "the thread's calls, each counted"
    assert by_name["spin_in_main"][0] == 1
    assert by_name["spin_in_thread"][1] > 0 and by_name["spin_in_main"][1] > 0, "each thread's time counted"
    lines = postcopy_bench.profile_lines(out, 10, "work", ["tottime"], clock)
    assert any("spin_in_thread" in line for line in lines)
