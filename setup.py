"""Build hook: compile the userfaultfd binding with cffi (out-of-line API mode).

Everything else about the package lives in pyproject.toml; setuptools takes
``cffi_modules`` only from here.
"""

from setuptools import setup

setup(cffi_modules=["aiopostcopy/uffd/_build.py:ffibuilder"])
