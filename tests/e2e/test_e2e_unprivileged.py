"""Scenario 13: the demo run by an unprivileged user works with UFFD_USER_MODE_ONLY and says so.

``nobody`` may not open /dev/userfaultfd (root-only) and, with
``vm.unprivileged_userfaultfd=0``, gets a userfaultfd from the system call
only with UFFD_USER_MODE_ONLY.  The demo's faults all come from user space
(``ctypes.memmove`` in the client threads), so it must work and say which
way it opened its userfaultfd.

How ``nobody`` runs the code.  The venv's interpreter usually cannot be
executed by ``nobody`` (pyenv keeps it under /root, mode 700; CI clones under
a root-only directory too), so the test:

1. picks a system interpreter ``nobody`` can execute whose major.minor is this
   interpreter's (the compiled extension modules are built for that ABI),
   probed as ``nobody``; none: skip, naming every candidate and why it failed;
2. stages a world-readable copy of what the demo imports in a fresh directory
   under /tmp: the aiopostcopy package (with its compiled cffi module) and the
   runtime dependencies cffi, _cffi_backend, msgpack and uvloop, each located
   through importlib in this interpreter, so the staged code is exactly what
   the rest of the suite tests;
3. runs ``python -m aiopostcopy demo`` as ``nobody`` with that directory as
   PYTHONPATH; the demo starts its source and client processes with
   ``sys.executable`` and the inherited environment, so they use the same
   interpreter and staged code.

The staging is the test's own doing, so a staged copy that ``nobody`` cannot
import fails the test (it does not skip).  The demo runs in a new session;
on timeout that whole process group (runuser, the demo and its children, all
started here) is SIGKILLed by the PID started here.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from typing import NamedTuple

import pytest

import aiopostcopy
from aiopostcopy.uffd.flags import OpenMode

USER = "nobody"
SIZE = 16 << 20
PAGE = 4096  #: the demo's block page size (it verifies with 4096-byte pages)
PAGES = SIZE // PAGE
PROBE_TIMEOUT = 20.0  #: seconds for one interpreter/import probe
DEMO_TIMEOUT = 45.0  #: seconds for the whole demo run (it takes a few seconds)
RUNTIME_MODULES = ("cffi", "_cffi_backend", "msgpack", "uvloop")  #: what the demo imports outside the stdlib
#: modules the demo's three kinds of process import, checked as ``nobody`` before the run
PROBED_MODULES = ("aiopostcopy.uffd", "aiopostcopy.tools.demo", "aiopostcopy.cli", "aiopostcopy.source",
                  "aiopostcopy.tools.workload", "aiopostcopy.uffd._uffd", "_cffi_backend", "msgpack", "uvloop")


# ----------------------------------------------------------------------------- running as nobody


def _env(pythonpath: str | None = None) -> dict[str, str]:
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1",
           "PYTHONNOUSERSITE": "1"}
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    return env


class Run(NamedTuple):
    returncode: int
    stdout: str
    stderr: str
    sid: int  #: the session (and process group) it ran in: the PID of the runuser started here


def _as_nobody(argv: list[str], *, timeout: float, cwd: str = "/tmp", pythonpath: str | None = None) -> Run:
    """Run ``argv`` as ``nobody`` in a new session; on timeout SIGKILL that process group."""
    proc = subprocess.Popen([shutil.which("runuser") or "runuser", "-u", USER, "--", *argv], cwd=cwd,
                            env=_env(pythonpath), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # runuser is not reaped yet (communicate() only waits once the pipes close), so its
        # PID, which is also the group's ID, cannot have been reused: the group is ours.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{argv[:6]} as {USER} did not finish in {timeout} s (its process group was killed)\n"
                    f"stdout: {out[-3000:]}\nstderr: {err[-3000:]}")
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return Run(proc.returncode, out, err, proc.pid)


def _session_members(sid: int) -> dict[int, str]:
    """Live processes still in session ``sid`` (the one the demo ran in): {PID: '(comm)'}.

    Zombies are left out: they have exited (an orphan's zombie waits for init to reap it).
    """
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", encoding="utf-8", errors="replace") as f:
                stat = f.read()
        except OSError:
            continue
        comm_end = stat.rfind(")")
        fields = stat[comm_end + 2:].split()  # state ppid pgrp session ...
        if len(fields) > 3 and int(fields[3]) == sid and fields[0] not in ("Z", "X"):
            found[int(name)] = stat[stat.find("("):comm_end + 1]
    return found


def _pick_interpreter() -> str:
    """A Python that ``nobody`` can execute with this interpreter's major.minor; skip if none."""
    want = "%d.%d" % sys.version_info[:2]
    candidates = [f"/usr/bin/python{want}", f"/usr/local/bin/python{want}", "/usr/bin/python3",
                  "/usr/local/bin/python3", sys.executable]
    tried, seen = [], set()
    for path in candidates:
        real = os.path.realpath(path)
        if real in seen:
            continue
        seen.add(real)
        if not os.path.exists(path):
            tried.append(f"{path}: missing")
            continue
        done = _as_nobody([path, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"], timeout=PROBE_TIMEOUT)
        got = done.stdout.strip()
        if done.returncode == 0 and got == want:
            return path
        why = f"Python {got}" if done.returncode == 0 else (done.stderr.strip().splitlines() or ["no output"])[-1]
        tried.append(f"{path}: {why}")
    pytest.skip(f"no interpreter that user {USER} can execute has Python {want} (the ABI of this venv's "
                f"compiled modules): {'; '.join(tried)}; install python{want} (Debian: python{want}-minimal) "
                f"or make {sys.executable} and its base interpreter world-readable")


# ----------------------------------------------------------------------------- the staged copy


def _module_root(name: str) -> str:
    """The file or package directory that provides top-level module ``name`` here."""
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.origin, f"{name} (a runtime dependency of the demo) is not importable here"
    if spec.submodule_search_locations:
        return os.path.dirname(spec.origin)
    return spec.origin


def _make_world_readable(top: str) -> None:
    os.chmod(top, 0o755)
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), 0o755)
        for name in filenames:
            path = os.path.join(dirpath, name)
            os.chmod(path, 0o755 if os.stat(path).st_mode & 0o111 else 0o644)


@pytest.fixture
def staged() -> Iterator[str]:
    """A world-readable copy of aiopostcopy and its runtime dependencies, under /tmp."""
    package = os.path.dirname(os.path.abspath(aiopostcopy.__file__))
    compiled = importlib.util.find_spec("aiopostcopy.uffd._uffd")
    assert compiled is not None and compiled.origin, "aiopostcopy.uffd._uffd is not built"
    assert os.path.commonpath([compiled.origin, package]) == package, (
        f"the compiled module {compiled.origin} is not inside the package {package}")
    top = tempfile.mkdtemp(prefix="apc-nobody-", dir="/tmp")
    try:
        skip = shutil.ignore_patterns("__pycache__", "*.pyc")
        shutil.copytree(package, os.path.join(top, "aiopostcopy"), ignore=skip)
        for name in RUNTIME_MODULES:
            source = _module_root(name)
            target = os.path.join(top, os.path.basename(source))
            if os.path.isdir(source):
                shutil.copytree(source, target, ignore=skip)
            else:
                shutil.copy2(source, target)
        _make_world_readable(top)
        yield top
    finally:
        shutil.rmtree(top, ignore_errors=True)


def _probe_imports(python: str, top: str) -> dict:
    """Import what the demo needs as ``nobody`` from the staged copy; fail if that does not work."""
    code = (
        "import importlib, json, os, sys\n"
        f"files = {{m: importlib.import_module(m).__file__ for m in {PROBED_MODULES!r}}}\n"
        "try:\n"
        "    os.close(os.open('/dev/userfaultfd', os.O_RDWR | os.O_CLOEXEC)); device = True\n"
        "except OSError:\n"
        "    device = False\n"
        "print(json.dumps({'files': files, 'euid': os.geteuid(), 'device': device}))\n"
    )
    done = _as_nobody([python, "-c", code], timeout=PROBE_TIMEOUT, cwd=top, pythonpath=top)
    assert done.returncode == 0, (f"user {USER} cannot import the staged copy in {top} with {python}:\n"
                                  f"{done.stdout}{done.stderr}")
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["euid"] == pwd.getpwnam(USER).pw_uid, found
    outside = {m: f for m, f in found["files"].items() if os.path.commonpath([f, top]) != top}
    assert not outside, f"as {USER}, these were imported from outside the staged copy {top}: {outside}"
    return found


# ----------------------------------------------------------------------------- checks


def _shm_owned_by(uid: int) -> set[str]:
    owned = set()
    for name in os.listdir("/dev/shm"):
        with contextlib.suppress(FileNotFoundError):
            if os.lstat(os.path.join("/dev/shm", name)).st_uid == uid:
                owned.add(name)
    return owned


def _expected_mode(device_access: bool) -> OpenMode:
    """The way an unprivileged user's userfaultfd opens first (the demo tries them in OpenMode order)."""
    if device_access:
        return OpenMode.DEVICE
    try:
        with open("/proc/sys/vm/unprivileged_userfaultfd", encoding="ascii") as f:
            unprivileged = int(f.read().strip())
    except FileNotFoundError:  # a kernel before 5.2: no knob, the system call is open to everyone
        unprivileged = 1
    return OpenMode.SYSCALL if unprivileged else OpenMode.USER_MODE_ONLY


def _printed_modes(output: str) -> list[OpenMode]:
    return [mode for mode in OpenMode if f"userfaultfd opened via {mode.value} (" in output]


@pytest.mark.root
@pytest.mark.slow
def test_demo_as_nobody_uses_user_mode_only(staged: str) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"switching to user {USER} needs root")
    if shutil.which("runuser") is None:
        pytest.skip("runuser (util-linux) is not installed")
    uid = pwd.getpwnam(USER).pw_uid
    python = _pick_interpreter()
    found = _probe_imports(python, staged)
    expected = _expected_mode(found["device"])

    shm_before = _shm_owned_by(uid)
    done = _as_nobody([python, "-m", "aiopostcopy", "demo", "--size", f"{SIZE >> 20}M", "--clients", "2",
                       "--quiet", "--json", "-"], timeout=DEMO_TIMEOUT, cwd=staged, pythonpath=staged)
    left_running = _session_members(done.sid)
    for pid in left_running:  # started (indirectly) here, in the session made for the demo
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    shm_left = _shm_owned_by(uid) - shm_before
    for name in shm_left:  # the run's leftovers: remove them, then fail below
        path = os.path.join("/dev/shm", name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    output = done.stdout + done.stderr

    assert done.returncode == 0, output
    assert not left_running, f"processes of the demo still running after it exited: {left_running}\n{output}"
    assert not shm_left, f"the demo left these in /dev/shm, owned by {USER}: {sorted(shm_left)}\n{output}"
    assert _printed_modes(output) == [expected], (
        f"expected 'userfaultfd opened via {expected.value} (...)' for user {USER}\n{output}")
    if expected is OpenMode.USER_MODE_ONLY:
        assert "user-mode-only" in output.lower() or "user_mode_only" in output.lower(), output
    assert f"{PAGES}/{PAGES} verified" in output, output
    summary = json.loads(done.stdout)
    assert summary["pages_total"] == summary["pages_verified"] == PAGES, summary
    assert summary["pages_bad"] == [], summary
    assert [c["ok"] for c in summary["clients"]] == [True, True], summary["clients"]
