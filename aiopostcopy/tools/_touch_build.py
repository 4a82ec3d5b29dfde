"""Build the workload's touching loop: cffi out-of-line API mode.

``setup.py`` names ``aiopostcopy/tools/_touch_build.py:ffibuilder`` beside the
userfaultfd binding and the page server; setuptools compiles
``_touch_source.c`` into ``aiopostcopy.tools._touch``.  Python sees the
declarations of ``_touch_cdefs.h``.  Run ``python aiopostcopy/tools/_touch_build.py``
to compile in place.
"""

from __future__ import annotations

import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
MODULE = "aiopostcopy.tools._touch"


def _read(name: str) -> str:
    with open(os.path.join(HERE, name), encoding="utf-8") as f:
        return f.read()


def make_builder() -> FFI:
    """Return the configured :class:`cffi.FFI` builder."""
    builder = FFI()
    builder.cdef(_read("_touch_cdefs.h"))
    builder.set_source(MODULE, _read("_touch_source.c"), extra_compile_args=["-O2", "-std=gnu11", "-Wall"])
    return builder


ffibuilder = make_builder()

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=os.path.dirname(os.path.dirname(HERE)), verbose=True)
