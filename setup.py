"""Build hook: compile the C parts with cffi (out-of-line API mode): the userfaultfd
binding, the source's page server and the workload's touching loop.

Everything else about the package lives in pyproject.toml; setuptools takes
``cffi_modules`` only from here.
"""

from setuptools import setup

setup(cffi_modules=["aiopostcopy/uffd/_build.py:ffibuilder",
                    "aiopostcopy/transport/_page_server_build.py:ffibuilder",
                    "aiopostcopy/tools/_touch_build.py:ffibuilder"])
