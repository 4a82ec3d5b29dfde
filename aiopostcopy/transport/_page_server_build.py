"""Build the source's urgent-channel page server: cffi out-of-line API mode.

``setup.py`` names ``aiopostcopy/transport/_page_server_build.py:ffibuilder``
beside the userfaultfd binding; setuptools compiles ``_page_server_source.c``
into ``aiopostcopy.transport._page_server``.  Python sees the declarations of
``_page_server_cdefs.h``.  It needs only a C compiler and Python's headers,
which the userfaultfd binding's toolchain check already asks for.
Run ``python aiopostcopy/transport/_page_server_build.py`` to compile in place.
"""

from __future__ import annotations

import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
MODULE = "aiopostcopy.transport._page_server"


def _read(name: str) -> str:
    with open(os.path.join(HERE, name), encoding="utf-8") as f:
        return f.read()


def make_builder() -> FFI:
    """Return the configured :class:`cffi.FFI` builder."""
    builder = FFI()
    builder.cdef(_read("_page_server_cdefs.h"))
    builder.set_source(MODULE, _read("_page_server_source.c"),
                       extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-pthread"])
    return builder


ffibuilder = make_builder()

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=os.path.dirname(os.path.dirname(HERE)), verbose=True)
