"""Build the userfaultfd binding: cffi out-of-line API mode.

``setup.py`` names ``aiopostcopy/uffd/_build.py:ffibuilder``; setuptools then
compiles ``_source.c`` (which includes ``<linux/userfaultfd.h>``) into the
extension module ``aiopostcopy.uffd._uffd``.  The declarations Python sees are
in ``_cdefs.h``, as data: every constant is ``...`` and every struct ends in
``...;``, so the C compiler, not a person, supplies values and layouts.

Before anything is compiled, :func:`check_toolchain` makes sure a C compiler,
the kernel headers and Python's own headers are there, and otherwise raises
one error that says what to install.  Run ``python aiopostcopy/uffd/_build.py``
to compile in place for a quick experiment.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sysconfig

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
MODULE = "aiopostcopy.uffd._uffd"
INSTALL_HINT = "apt-get install gcc linux-libc-dev python3-dev"


class ToolchainError(RuntimeError):
    """The build needs something that is not installed."""


def _read(name: str) -> str:
    with open(os.path.join(HERE, name), encoding="utf-8") as f:
        return f.read()


def _compiler() -> list[str]:
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    return shlex.split(cc)


def _header_problem(cc: list[str]) -> str | None:
    probe = "#include <linux/userfaultfd.h>\n#include <linux/memfd.h>\n#include <linux/magic.h>\n"
    try:
        result = subprocess.run(
            [*cc, "-E", "-x", "c", "-"], input=probe, capture_output=True, text=True, check=False
        )
    except OSError as exc:
        return f"the C compiler {cc[0]!r} could not run ({exc})"
    if result.returncode != 0:
        return "the kernel headers <linux/userfaultfd.h> are missing"
    return None


def check_toolchain() -> None:
    """Check for a C compiler, the kernel headers and Python.h.

    Raises:
        ToolchainError: naming everything missing and the apt-get line that fixes it.
    """
    problems = []
    cc = _compiler()
    if shutil.which(cc[0]) is None:
        problems.append(f"no C compiler ({cc[0]!r} not found)")
    else:
        header = _header_problem(cc)
        if header is not None:
            problems.append(header)
    python_h = os.path.join(sysconfig.get_paths()["include"], "Python.h")
    if not os.path.exists(python_h):
        problems.append(f"Python's headers are missing ({python_h})")
    if problems:
        raise ToolchainError(
            "cannot build aiopostcopy.uffd._uffd: " + "; ".join(problems) + f". Install them with: {INSTALL_HINT}"
        )


def make_builder() -> FFI:
    """Return the configured :class:`cffi.FFI` builder (after :func:`check_toolchain`)."""
    check_toolchain()
    builder = FFI()
    builder.cdef(_read("_cdefs.h"))
    builder.set_source(MODULE, _read("_source.c"), extra_compile_args=["-O2", "-std=gnu11", "-Wall"])
    return builder


ffibuilder = make_builder()

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=os.path.dirname(os.path.dirname(HERE)), verbose=True)
