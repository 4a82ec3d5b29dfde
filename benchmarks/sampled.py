"""Sampled profiles of a running process: py-spy attached by PID, its stacks summed by function.

Theory of operation
-------------------
cProfile (``postcopy_bench.py --profile``) counts every call, and its own cost
per call is about that of a small function: on the fault path, made of many
small functions around a few system calls, it inflates the Python and hides
the kernel.  A sampling profiler costs the process nothing per call:
:class:`Sampler` attaches ``py-spy record --nonblocking`` to a PID (the
process is never stopped; a sample may rarely see a torn stack), which writes
one line per distinct stack, ``frame;frame;... count``, until the process
exits.  A sample whose innermost Python frame calls into C (a system call, a
cffi function) counts for that frame: "own" samples of a function that wraps a
system call are mostly the kernel's.  py-spy leaves out the samples of threads
it finds idle, but on a busy machine a thread that is ready and waiting for a
CPU may still count (the source's sweep thread, woken in ``Condition.wait``,
shows up so): the shares are of samples, not of CPU time.  Within a callback
of the loop, which never waits, they are close to CPU time.

:func:`summary_lines` turns such a file into two tables: each function's own
samples (innermost frame) and its inclusive samples (anywhere on the stack,
once per sample), as shares of all samples, optionally of only the samples
under some root functions (the callbacks of the fault path, say).

py-spy (0.4.3 or later, which names a method ``Class.method`` as the fault
path's roots do) is in the ``bench`` and ``test`` extras; it needs ptrace
rights over the process (root, or the same user with ptrace_scope 0).
"""

from __future__ import annotations

import collections
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

__all__ = ["Sampler", "find_py_spy", "load", "summary_lines"]

RATE = 1000  #: samples a second


def find_py_spy() -> str:
    """The py-spy program: beside this interpreter (a venv's bin), or on PATH.

    Raises:
        FileNotFoundError: not installed, with how to install it.
    """
    here = Path(sys.executable).with_name("py-spy")
    found = str(here) if here.exists() else shutil.which("py-spy")
    if not found:
        raise FileNotFoundError("py-spy is not installed: pip install '.[bench]' (or pip install py-spy)")
    return found


class Sampler:
    """``py-spy record`` attached to ``pid`` until it exits, stacks written to ``out``.

    Args:
        pid: the process to sample (started by the caller).
        out: where the collapsed stacks go.
        log: where py-spy's own messages go.
        rate: samples a second.
    """

    def __init__(self, pid: int, out: Path, log: Path, *, rate: int = RATE) -> None:
        self.out, self.log = out, log
        argv = [find_py_spy(), "record", "--nonblocking", "--pid", str(pid), "--rate", str(rate),
                "--format", "raw", "--output", str(out)]
        with open(log, "wb") as messages:  # py-spy has its own copy of the descriptor
            self._proc = subprocess.Popen(argv, stdout=messages, stderr=subprocess.STDOUT)
        self.stopped = False

    def wait(self, timeout: float = 30.0) -> bool:
        """Wait for py-spy to write its file (it ends when the process does).  False if it had to
        be stopped (:attr:`stopped`; on SIGINT it still writes what it has) or wrote nothing."""
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stopped = True
            self._proc.send_signal(signal.SIGINT)
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()  # by the PID started here
                self._proc.wait()
        return (not self.stopped and self._proc.returncode == 0 and self.out.exists()
                and os.path.getsize(self.out) > 0)

    def messages(self, lines: int = 5) -> str:
        """The last lines py-spy printed (why it wrote nothing, say)."""
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError as exc:
            return f"(no messages: {exc})"


def load(path: Path) -> collections.Counter[tuple[str, ...]]:
    """The stacks of a collapsed file, outermost frame first, each frame ``function (file)``."""
    stacks: collections.Counter[tuple[str, ...]] = collections.Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks[tuple(_frame(frame) for frame in stack.split(";"))] += int(count)
    return stacks


def _frame(frame: str) -> str:
    """``function (path/file.py:line)`` -> ``function (file.py)``: every line of a function as one."""
    function, _, where = frame.partition(" (")
    return f"{function} ({where.rsplit('/', 1)[-1].rsplit(':', 1)[0]})" if where else function


def summary_lines(path: Path, top: int, who: str, roots: Iterable[str] = ()) -> list[str]:
    """Two tables from a collapsed file: by own samples and by inclusive samples.

    Args:
        roots: keep only the samples with one of these function names on the stack (all if empty).
    """
    wanted = tuple(roots)
    stacks = load(path)
    if wanted:
        stacks = collections.Counter({stack: n for stack, n in stacks.items()
                                      if any(frame.split(" (")[0] in wanted for frame in stack)})
    total = sum(stacks.values())
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    for stack, n in stacks.items():
        own[stack[-1]] += n
        for frame in set(stack):  # a recursive function counts once per sample
            inclusive[frame] += n
    scope = f"samples under {', '.join(wanted)}" if wanted else "all samples"
    lines = ["", f"{who} sampled profile: {total} {scope} (py-spy, {RATE}/s)"]
    for title, counts in (("own", own), ("inclusive", inclusive)):
        lines.append(f"  top {top} by {title} samples")
        lines += [f"  {n / total * 100:6.1f}%  {frame}" for frame, n in counts.most_common(top)] if total else ["  (none)"]
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """``python benchmarks/sampled.py FILE [TOP] [ROOT...]``: the tables of a collapsed file."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print(main.__doc__, file=sys.stderr)
        return 2
    top = int(args[1]) if len(args) > 1 else 25
    print("\n".join(summary_lines(Path(args[0]), top, Path(args[0]).name, args[2:])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
