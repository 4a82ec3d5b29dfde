"""The compiled binding: header-derived constants, HAS_* flags, errno mapping, build checks."""

from __future__ import annotations

import errno
import importlib.util
import inspect
import os
import subprocess
import sys

import pytest

from aiopostcopy import errors
from aiopostcopy.uffd import binding
from aiopostcopy.uffd import Feature, Ioctl, RegisterMode, feature_named, ioctl_named
from aiopostcopy.uffd.binding import buffer_address, check_os, check_rc, ffi, lib, uffd_error
from aiopostcopy.uffd.flags import describe_flags


def _header() -> str:
    with open("/usr/include/linux/userfaultfd.h", encoding="utf-8") as f:
        return f.read()


def test_layouts_come_from_the_compiler() -> None:
    assert ffi.sizeof("struct uffd_msg") == 32
    assert ffi.sizeof("struct uffdio_api") == 24
    assert ffi.offsetof("struct uffdio_range", "len") == 8
    assert lib.APC_MSG_SLOTS == 4


def test_constants_match_the_kernel_abi() -> None:
    assert lib.UFFD_API == 0xAA
    assert lib.UFFD_EVENT_PAGEFAULT == 0x12
    assert lib._UFFDIO_API == 0x3F
    assert Ioctl.COPY == 1 << 3
    assert RegisterMode.MISSING | RegisterMode.WP | RegisterMode.MINOR == 0b111


@pytest.mark.skipif(not os.path.exists("/usr/include/linux/userfaultfd.h"), reason="no kernel headers")
def test_has_flags_follow_the_headers() -> None:
    text = _header()
    assert bool(lib.HAS_MOVE) == ("UFFDIO_MOVE" in text)
    assert bool(lib.HAS_POISON) == ("UFFDIO_POISON" in text)
    assert ("MOVE" in Feature.__members__) == bool(lib.HAS_MOVE)
    assert ("POISON" in Ioctl.__members__) == bool(lib.HAS_POISON)


def test_missing_names_raise_unsupported_not_attribute_error() -> None:
    for name in ("MOVE", "POISON", "WP_ASYNC", "WP_UNPOPULATED"):
        if name in Feature.__members__:
            assert feature_named(name) is Feature[name]
        else:
            with pytest.raises(errors.UffdUnsupportedError, match="headers"):
                feature_named(name)
    with pytest.raises(errors.UffdUnsupportedError):
        ioctl_named("NO_SUCH_IOCTL")
    assert feature_named("THREAD_ID") is Feature.THREAD_ID


def test_describe_flags_names_unknown_bits() -> None:
    assert describe_flags(Feature.EVENT_FORK | Feature(1 << 40)) == ["EVENT_FORK", "bit 40"]


@pytest.mark.parametrize(
    ("err", "cls"),
    [
        (errno.EEXIST, errors.PageExistsError),
        (errno.EAGAIN, errors.UffdRetry),
        (errno.ENOENT, errors.RangeGoneError),
        (errno.ESRCH, errors.TargetGoneError),
        (errno.ENOTTY, errors.UffdUnsupportedError),
        (errno.EINVAL, errors.UffdError),
    ],
)
def test_errno_becomes_a_typed_oserror(err: int, cls: type[errors.UffdError]) -> None:
    exc = uffd_error(err, "UFFDIO_TEST", done=8192)
    assert type(exc) is cls and isinstance(exc, OSError)
    assert "UFFDIO_TEST" in str(exc)
    with pytest.raises(cls):
        check_rc(-err, "UFFDIO_TEST")
    if cls is errors.UffdRetry:
        assert exc.done == 8192


def test_check_rc_and_check_os_pass_zero() -> None:
    check_rc(0, "x")
    check_os(0, "x")
    with pytest.raises(FileNotFoundError):
        check_os(errno.ENOENT, "open")


def test_buffer_address_points_at_the_bytes() -> None:
    buf = bytearray(b"abc")
    assert ffi.buffer(ffi.cast("char *", buffer_address(buf)), 3)[:] == b"abc"


def test_missing_toolchain_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    path = os.path.join(os.path.dirname(binding.__file__), "_build.py")
    spec = importlib.util.spec_from_file_location("_apc_build", path)
    assert spec is not None and spec.loader is not None
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    monkeypatch.setenv("CC", "/nonexistent/cc-for-test")
    with pytest.raises(build.ToolchainError, match="apt-get install gcc linux-libc-dev python3-dev"):
        build.check_toolchain()


def test_missing_extension_says_how_to_build_it() -> None:
    """Hide the compiled module in a fresh interpreter: the ImportError names the fix."""
    code = (
        "import sys\n"
        "class Hide:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'aiopostcopy.uffd._uffd':\n"
        "            raise ImportError('hidden for the test')\n"
        "sys.meta_path.insert(0, Hide())\n"
        "try:\n"
        "    import aiopostcopy.uffd\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert "pip install ." in out.stdout


def _protocol_names() -> tuple[set[str], dict[str, inspect.Signature]]:
    constants = set(binding.UffdLib.__annotations__)
    functions = {name: inspect.signature(value) for name, value in vars(binding.UffdLib).items()
                 if not name.startswith("__") and inspect.isfunction(value)}
    return constants, functions


def test_the_typed_protocol_names_exactly_what_the_built_lib_has() -> None:
    constants, functions = _protocol_names()
    built = set(dir(lib))
    assert not constants & set(functions)
    assert sorted(built - constants - set(functions)) == [], "in the built lib, missing from UffdLib"
    assert sorted((constants | set(functions)) - built) == [], "in UffdLib, missing from the built lib"


def test_the_typed_protocol_takes_as_many_arguments_as_the_c_functions() -> None:
    constants, functions = _protocol_names()
    for name, signature in functions.items():
        c_type = ffi.typeof(getattr(lib, name))
        assert c_type.kind == "function", name
        assert len(signature.parameters) - 1 == len(c_type.args), f"{name}: {signature} vs {c_type.cname}"
    for name in constants:
        assert type(getattr(lib, name)) is int, name
