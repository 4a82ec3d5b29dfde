"""benchmarks/opcounts.py: the bytecode instructions under the fault path's callbacks, counted per
function in a real process, the same count on every run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import opcounts  # noqa: E402  (scripts of benchmarks/, not a package)

from aiopostcopy.loop import PostcopyDestination  # noqa: E402
from aiopostcopy.transport.fdstream import ControlChannel  # noqa: E402
from aiopostcopy.transport.stream import FrameProtocol  # noqa: E402

SCRIPT = """\
def helper(n):
    total = 0
    for i in range(n):
        total += i
    return total


def outside():
    return helper(50)  # not under a root: not counted


def gen():
    yield helper(1)
    yield helper(1)


PENDING = []


class PostcopyDestination:
    def _serve_faults(self):
        started = gen()
        next(started)  # started under a root: counted
        PENDING.append(started)
        return helper(3) + helper(3)


class FrameProtocol:
    def __init__(self, read_first):
        self._read_first = read_first

    def buffer_updated(self, nbytes):
        return helper(nbytes)


for _ in range(5):
    outside()
    PostcopyDestination()._serve_faults()
    FrameProtocol(print).buffer_updated(2)  # the urgent channel's protocol: counted
    FrameProtocol(None).buffer_updated(9)  # the background channel's: not counted
    next(PENDING.pop())  # resumed outside a root: not counted, and the count stays in step
"""


def _count(tmp_path: Path, name: str) -> dict:
    script, out = tmp_path / "script.py", tmp_path / f"{name}.json"
    script.write_text(SCRIPT)
    subprocess.run(opcounts.counted(sys.executable, str(out), [str(script)]), check=True, timeout=60)
    return json.loads(out.read_text())


def test_only_what_runs_under_a_root_is_counted_the_same_every_run(tmp_path: Path) -> None:
    first, second = _count(tmp_path, "first"), _count(tmp_path, "second")
    assert first == second  # instructions, not time: nothing else changes them
    assert first["roots"] == {"PostcopyDestination._serve_faults": 5, "FrameProtocol.buffer_updated": 5}
    functions = {name.rsplit(":", 1)[-1]: (ops, calls) for name, ops, calls in first["functions"]}
    assert set(functions) == {"PostcopyDestination._serve_faults", "FrameProtocol.buffer_updated", "helper", "gen"}
    assert functions["helper"][1] == 20  # thrice per _serve_faults (once in gen), once per urgent buffer_updated
    assert functions["gen"][1] == 5  # its starts; its resumptions outside a root are not counted
    assert functions["helper"][0] > 0 and functions["PostcopyDestination._serve_faults"][0] > 0


def test_the_summary_divides_by_the_faults(tmp_path: Path) -> None:
    path = tmp_path / "counts.json"
    path.write_text(json.dumps({"roots": {"PostcopyDestination._serve_faults": 4},
                                "functions": [["loop.py:A.b", 400, 4], ["core/x.py:c", 1200, 8]]}))
    lines = opcounts.summary_lines(path, 4, top=1)
    assert lines[1].startswith("fault path instructions (bytecodes under PostcopyDestination._serve_faults): "
                               "400 per fault, 4 faults")
    assert lines[3:] == ["     300.0    2.00  core/x.py:c"]  # the top one only
    assert "no faults" in opcounts.summary_lines(path, 0)[1]


def test_the_roots_are_the_services_callbacks() -> None:
    """A rename in the service must not leave the counter counting nothing."""
    for qualname in opcounts.ROOTS:
        owner, method = qualname.split(".")
        cls = {"PostcopyDestination": PostcopyDestination, "ControlChannel": ControlChannel,
               "FrameProtocol": FrameProtocol}[owner]
        assert getattr(cls, method).__qualname__ == qualname
    assert "_read_first" in FrameProtocol.__init__.__code__.co_names  # what the runner tells the channels apart by
