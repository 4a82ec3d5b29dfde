"""The interpreter's steps on a demand fault's path, counted: postcopy_bench.py's ``--count-ops``.

Theory of operation
-------------------
A demand fault costs the destination several times the C handler's CPU, and
most of the difference is the interpreter running the fault path's Python:
the system calls are the C handler's. A profiler that times functions either
costs as much per call as the small functions it times (cProfile) or samples
too seldom to rank forty of them (py-spy). Counting the bytecode instructions
each function executes costs nothing that shows in the count. The count moves
only where the path branches on timing (how many faults one read brings, how
many answers one receive), by a few instructions a fault in a quiet run, the
same on a busy machine as on an idle one: two trees compare in one run each.

The destination runs under :data:`RUNNER`: ``sys.settrace`` with opcode events
on the loop thread, counting only inside the callbacks a demand fault goes
through (:data:`ROOTS`: a userfaultfd's faults read, the urgent channel's bytes
received, a client's control socket read) and everything they call; a
generator counted under a root is not counted when it resumes outside one.  At exit it
writes, per function, the instructions executed and the calls, and how often
each root ran.  :func:`summary_lines` divides them by the faults at the service.

The counts are instructions, not time: an instruction that calls into C counts
one whatever the C costs (a system call, a ``msgpack`` decode).  They say where
the interpreter's share of a fault goes and how a change moves it.

Run::

    python benchmarks/postcopy_bench.py --repeat 1 --scenarios fault-quiet --count-ops fault-quiet
    python benchmarks/opcounts.py COUNTS.json FAULTS [TOP]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

__all__ = ["ROOTS", "RUNNER", "counted", "load", "summary_lines"]

#: The destination's callbacks on a demand fault's path (``co_qualname``): counting starts in them.
#: ``FrameProtocol.buffer_updated`` counts only for the urgent channel (its protocol reads answers first).
ROOTS = ("PostcopyDestination._serve_faults", "ControlChannel._on_readable", "FrameProtocol.buffer_updated")

#: ``python -c RUNNER OUT -m aiopostcopy dest ...``: the destination with its fault path counted.
RUNNER = """\
import atexit, collections, json, runpy, sys
out, target, *rest = sys.argv[1:]
ROOTS = set(%r)
ops, calls, roots = collections.Counter(), collections.Counter(), collections.Counter()
depth = 0


def local(frame, event, arg):
    global depth
    if event == "opcode":
        ops[frame.f_code] += 1
    elif event == "return":
        depth -= 1
    return local


def enter(frame, event, arg):
    global depth
    code = frame.f_code
    if depth == 0:
        # a generator counted once keeps its tracer when resumed: take it away outside a root
        if code.co_qualname not in ROOTS or (code.co_qualname == "FrameProtocol.buffer_updated"
                                             and frame.f_locals["self"]._read_first is None):
            frame.f_trace = None  # (the background channel's bytes: the sweep, not a fault)
            return None
        roots[code.co_qualname] += 1
    depth += 1
    calls[code] += 1
    frame.f_trace_opcodes = True
    return local


def dump():
    sys.settrace(None)
    name = lambda code: f"{code.co_filename.rsplit('aiopostcopy/', 1)[-1]}:{code.co_qualname}"
    with open(out, "w") as f:
        json.dump({"roots": roots, "functions": [[name(code), ops[code], calls[code]] for code in calls]}, f)


atexit.register(dump)
sys.settrace(enter)
if target == "-m":
    sys.argv = rest
    runpy.run_module(rest[0], run_name="__main__", alter_sys=True)
else:
    sys.argv = [target, *rest]
    runpy.run_path(target, run_name="__main__")
""" % (ROOTS,)


def counted(py: str, out: str, argv: list[str]) -> list[str]:
    """``py argv...`` with the fault path's instructions counted into ``out`` (JSON)."""
    return [py, "-c", RUNNER, out, *argv]


def load(path: Path) -> tuple[dict[str, int], list[tuple[str, int, int]]]:
    """``(roots, functions)`` of a counts file: how often each root ran, and ``(name, ops, calls)``
    of every function counted, most instructions first."""
    data = json.loads(path.read_text())
    functions = sorted(((name, ops, calls) for name, ops, calls in data["functions"]), key=lambda f: -f[1])
    return dict(data["roots"]), functions


def summary_lines(path: Path, faults: int, top: int = 30) -> list[str]:
    """The instructions per demand fault, in all and by function (the ``top`` most)."""
    roots, functions = load(path)
    if faults <= 0:
        return ["", f"fault path instructions: no faults to divide by (roots ran {roots})"]
    total = sum(ops for _, ops, _ in functions)
    lines = ["", f"fault path instructions (bytecodes under {', '.join(sorted(roots))}): "
             f"{total / faults:.0f} per fault, {faults} faults; roots ran {roots}",
             f"{'per fault':>10} {'calls':>7}  function (own instructions)"]
    lines += [f"{ops / faults:10.1f} {calls / faults:7.2f}  {name}" for name, ops, calls in functions[:top]]
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) not in (2, 3):
        print(__doc__.split("Run::")[0].strip().splitlines()[0], file=sys.stderr)
        print("usage: opcounts.py COUNTS.json FAULTS [TOP]", file=sys.stderr)
        return 2
    print("\n".join(summary_lines(Path(argv[0]), int(argv[1]), int(argv[2]) if len(argv) == 3 else 30)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
