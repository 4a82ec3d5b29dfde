"""Bad input on the command line: one line naming the cause and the object, a documented
exit status, a JSON report, and nothing left behind.

Every case runs ``python -m aiopostcopy source|dest`` as a real process (a real
source process serves the destination cases that get as far as its Hello) and
checks:

* the exit status (README "Exit status");
* stderr: exactly one error line, holding the expected words, and no traceback;
* the ``--json`` report (when the arguments parsed): ``ok`` false, ``error``
  the same line, ``exit_code`` the status;
* nothing left behind: no file or directory the run made under this test's
  /dev/shm prefix, no process whose command line names it, no socket file.

Two runs that succeed close the table: README's own ``dest`` command on a
fresh host (block dir missing: created) started with ``--wait`` before its
source, whose ``--json -`` output must be pure JSON; every page of the block
file it leaves is verified against the pattern.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import mmap
import os
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator

import pytest

from aiopostcopy.tools.pattern import fill, verify_block
from aiopostcopy.tools.preflight import filesystem_type

PYTHON = sys.executable
SEED = 21
IMAGE_SIZE = 1 << 20  #: 256 pages: larger than the 64 KiB tmpfs of the "full" case
TIMEOUT = 60.0


# ----------------------------------------------------------------------------- the run's world


@dataclasses.dataclass
class World:
    """Names under one unique /dev/shm prefix, a source process, and clean-ups."""

    prefix: str
    image: str
    source: tuple[str, int] | None = None
    cleanups: list[Callable[[], None]] = dataclasses.field(default_factory=list)

    def path(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    @property
    def source_address(self) -> str:
        assert self.source is not None
        return f"{self.source[0]}:{self.source[1]}"

    def mount_tmpfs(self, name: str, options: str) -> str:
        """A tmpfs mounted for this case (root only), unmounted and removed afterwards."""
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root")
        where = self.path(name)
        os.mkdir(where)
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "apc-cli-test", where], check=True)

        def unmount() -> None:
            subprocess.run(["umount", where], check=True)
            os.rmdir(where)

        self.cleanups.insert(0, unmount)
        return where


def _make_image(path: str) -> None:
    with open(path, "w+b") as f:
        f.truncate(IMAGE_SIZE)
        with mmap.mmap(f.fileno(), IMAGE_SIZE) as memory:
            fill(memory, 0, 4096, SEED, assume_zeroed=True)


def _start_source(world: World, *extra: str) -> subprocess.Popen[str]:
    argv = [PYTHON, "-m", "aiopostcopy", "source", "--listen", "127.0.0.1:0", "--block", f"ram={world.image}",
            "--json", "-", *extra]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()  # stdout carries only the JSON report
    assert "listening on" in line, line
    host, _, port = line.rsplit(" ", 1)[1].strip().rpartition(":")
    world.source = (host, int(port))
    return proc


def _stop(proc: subprocess.Popen[str]) -> tuple[str, str]:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    return proc.communicate(timeout=TIMEOUT)


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    prefix = f"/dev/shm/apc-cli-{uuid.uuid4().hex[:8]}"
    w = World(prefix=prefix, image=f"{prefix}-image")
    _make_image(w.image)
    try:
        yield w
    finally:
        os.unlink(w.image)
        left = _ours(prefix)
        for path in left:  # a failed test's leftovers go too; the assert below still reports them
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            elif os.path.exists(path):
                os.unlink(path)
    assert left == [], "left behind"


def _ours(prefix: str) -> list[str]:
    """Files, directories and processes that name ``prefix``."""
    base = os.path.basename(prefix)
    found = [f"/dev/shm/{n}" for n in os.listdir("/dev/shm") if n.startswith(base)]
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if base.encode() in f.read():
                    found.append(f"process {pid}")
    return found


# ----------------------------------------------------------------------------- the table


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    argv: Callable[[World], list[str]]  #: arguments after ``python -m aiopostcopy``
    code: int
    words: Callable[[World], tuple[str, ...]]  #: each must appear in the error line
    reports: bool = True  #: the arguments parse and --json can be written


def _dest(*extra: str) -> Callable[[World], list[str]]:
    """A dest run against a source of its own (a source serves one session: the one that said Hello first)."""

    def argv(w: World) -> list[str]:
        source = _start_source(w)
        w.cleanups.append(lambda: _stop(source))
        return ["dest", "--source", w.source_address, "--json", w.path("report.json"), *extra]

    return argv


def _source(*blocks: str, listen: str = "127.0.0.1:0") -> Callable[[World], list[str]]:
    return lambda w: ["source", "--listen", listen, *[a for b in blocks for a in ("--block", b)],
                      "--json", w.path("report.json")]


def _stale_block_dir(w: World) -> list[str]:
    where = w.path("stale")
    os.mkdir(where)
    with open(os.path.join(where, "ram"), "wb"):
        pass
    w.cleanups.append(lambda: shutil.rmtree(where))
    return _dest("--block-dir", where, "--clients", w.path("clients.sock"))(w)


def _busy_source(w: World) -> list[str]:
    """A source already bound to another destination's session (that one failed on a stale file)."""
    argv = _stale_block_dir(w)
    first = subprocess.run([PYTHON, "-m", "aiopostcopy", *argv], capture_output=True, text=True, timeout=TIMEOUT)
    assert first.returncode == 2, first.stderr
    os.unlink(w.path("report.json"))
    return ["dest", "--source", w.source_address, "--json", w.path("report.json")]


def _disk_dir() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    if filesystem_type(here) in ("tmpfs", "hugetlbfs"):
        pytest.skip("the tests' own directory is not on a disk filesystem here")
    return os.path.join(here, f"apc-not-created-{uuid.uuid4().hex[:8]}")


def _busy_port(w: World) -> list[str]:
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    w.cleanups.append(held.close)
    return _source(f"ram={w.image}", listen=f"127.0.0.1:{held.getsockname()[1]}")(w)


def _silent_peer(w: World) -> list[str]:
    peer = socket.socket()  # accepts (the kernel completes the handshake) and never says a word
    peer.bind(("127.0.0.1", 0))
    peer.listen()
    w.cleanups.append(peer.close)
    return ["dest", "--source", f"127.0.0.1:{peer.getsockname()[1]}", "--handshake-timeout", "1",
            "--json", w.path("report.json")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CASES = [
    Case("dest-stale-block-file", _stale_block_dir, 2, lambda w: (w.path("stale") + "/ram", "already exists")),
    Case("dest-read-only-block-dir",
         lambda w: _dest("--block-dir", w.mount_tmpfs("ro", "ro,size=1m"))(w), 2,
         lambda w: (w.path("ro"), "read-only file system")),
    Case("dest-read-only-parent",
         lambda w: _dest("--block-dir", w.mount_tmpfs("ro2", "ro,size=1m") + "/vm1")(w), 2,
         lambda w: (w.path("ro2") + "/vm1", "Read-only file system")),
    Case("dest-block-dir-on-disk", lambda w: _dest("--block-dir", _disk_dir())(w), 2,
         lambda w: ("block dir", filesystem_type(os.path.dirname(os.path.abspath(__file__))),
                    "not tmpfs or hugetlbfs")),
    Case("dest-full-tmpfs", lambda w: _dest("--block-dir", w.mount_tmpfs("full", "size=64k") + "/vm1")(w), 2,
         lambda w: (w.path("full") + "/vm1", "no room", f"{IMAGE_SIZE} bytes needed")),
    Case("dest-source-port-out-of-range",
         lambda w: ["dest", "--source", "127.0.0.1:70000", "--json", w.path("report.json")], 2,
         lambda w: ("--source", "port 70000 out of range"), reports=False),
    Case("dest-source-down",
         lambda w: ["dest", "--source", f"127.0.0.1:{_free_port()}", "--json", w.path("report.json")], 3,
         lambda w: ("cannot reach source 127.0.0.1:", "Connection refused", "--wait")),
    Case("dest-wait-past-deadline",
         lambda w: ["dest", "--source", f"127.0.0.1:{_free_port()}", "--wait", "--deadline", "1",
                    "--block-dir", w.path("never") + "/a/b", "--json", w.path("report.json")], 3,
         lambda w: ("cannot reach source 127.0.0.1:", "waited 1 s")),
    Case("dest-silent-peer", _silent_peer, 3, lambda w: ("did not complete the handshake within 1 s",)),
    Case("dest-json-dir-missing",
         lambda w: ["dest", "--source", f"127.0.0.1:{_free_port()}", "--json", w.path("nodir") + "/r.json"], 2,
         lambda w: ("--json", w.path("nodir"), "does not exist"), reports=False),
    Case("dest-source-serving-another-session", _busy_source, 3,
         lambda w: ("source 127.0.0.1:", "ended the handshake")),
    Case("source-missing-block-file", _source("ram=/nonexistent/apc-ram"), 2,
         lambda w: ("/nonexistent/apc-ram", "No such file or directory")),
    Case("source-directory-as-block", lambda w: _source(f"ram={os.path.dirname(w.image)}")(w), 2,
         lambda w: ("/dev/shm", "is a directory")),
    Case("source-duplicate-names", lambda w: _source(f"ram={w.image}", f"ram={w.image}")(w), 2,
         lambda w: ("'ram'", "given twice")),
    Case("source-busy-port", _busy_port, 2, lambda w: ("cannot listen on 127.0.0.1:", "address already in use")),
    Case("source-port-out-of-range", _source("ram=/x", listen="127.0.0.1:70000"), 2,
         lambda w: ("--listen", "port 70000 out of range"), reports=False),
    Case("source-bad-page-size", lambda w: _source(f"ram={w.image}")(w) + ["--page-size", "3000"], 2,
         lambda w: (w.image, "not a positive multiple of the 3000-byte page")),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gets_one_line_and_its_exit_status(world: World, case: Case) -> None:
    world.cleanups.clear()
    try:
        argv = case.argv(world)
        done = subprocess.run([PYTHON, "-m", "aiopostcopy", *argv], capture_output=True, text=True, timeout=TIMEOUT)
        words = case.words(world)
    finally:
        for cleanup in world.cleanups:
            cleanup()
    error = _one_error_line(done.stderr)
    for word in words:
        assert word in error, (word, error)
    assert done.returncode == case.code, done.stderr
    assert done.stdout == ""
    report_path = world.path("report.json")
    if case.reports:
        with open(report_path, encoding="utf-8") as f:
            report = json.load(f)
        os.unlink(report_path)
        assert report["ok"] is False and report["exit_code"] == case.code
        assert report["error"] and report["error"] in error
        assert report["started_at"] <= report["ended_at"]
    assert _ours(world.prefix) == [world.image], "left behind"


def _one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if " ERROR " in line or ": error: " in line]
    assert len(errors) == 1, stderr
    return errors[0]


def test_ctrl_c_during_start_up_is_one_line(world: World) -> None:
    block_dir = world.path("interrupted")
    proc = subprocess.Popen([PYTHON, "-m", "aiopostcopy", "dest", "--source", f"127.0.0.1:{_free_port()}", "--wait",
                             "--block-dir", block_dir, "--json", world.path("report.json")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen = []
        while not any("waiting up to" in line for line in seen):  # it is in start-up now
            line = proc.stderr.readline()
            assert line, f"exited early: {seen}"
            seen.append(line)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130
    assert "interrupted by SIGINT" in _one_error_line("".join(seen) + err)
    with open(world.path("report.json"), encoding="utf-8") as f:
        report = json.load(f)
    os.unlink(world.path("report.json"))
    assert report["exit_code"] == 130 and report["ok"] is False
    assert not os.path.exists(block_dir), "the block dir it created stays behind"
    assert _ours(world.prefix) == [world.image]


def test_readme_dest_on_a_fresh_host_waits_for_its_source(world: World) -> None:
    """README's ``dest`` command, the block dir missing and the source not up yet."""
    image = world.path("fresh-image")
    _make_image(image)
    block_dir = world.path("fresh") + "/vm1"
    sock = world.path("fresh-clients.sock")
    port = _free_port()
    dest = subprocess.Popen([PYTHON, "-m", "aiopostcopy", "dest", "--source", f"127.0.0.1:{port}", "--wait",
                             "--block-dir", block_dir, "--clients", sock, "--json", "-", "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    source = None
    try:
        source = subprocess.Popen([PYTHON, "-m", "aiopostcopy", "source", "--listen", f"127.0.0.1:{port}",
                                   "--block", f"ram={image}", "--json", "-"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        dest_out, dest_err = dest.communicate(timeout=TIMEOUT)
        source_out, source_err = source.communicate(timeout=TIMEOUT)
    finally:
        for proc in (dest, source):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    assert dest.returncode == 0, dest_err
    assert source.returncode == 0, source_err
    dest_report, source_report = json.loads(dest_out), json.loads(source_out)  # pure JSON, nothing else
    for report in (dest_report, source_report):
        assert report["ok"] is True and report["error"] is None and report["exit_code"] == 0
        assert report["page_size"] == 4096 and report["started_at"] <= report["ended_at"]
    assert dest_report["source"] == f"127.0.0.1:{port}"
    assert dest_report["blocks"] == [{"name": "ram", "size": IMAGE_SIZE, "page_size": 4096,
                                      "path": f"{block_dir}/ram"}]
    assert source_report["blocks"] == [{"name": "ram", "size": IMAGE_SIZE, "page_size": 4096, "path": image}]
    assert dest_report["verified"] and dest_report["pages_placed"] == IMAGE_SIZE // 4096
    try:
        with open(f"{block_dir}/ram", "rb") as f, mmap.mmap(f.fileno(), IMAGE_SIZE, prot=mmap.PROT_READ) as memory:
            assert verify_block(memory, 0, 4096, SEED) == []  # every page, against the pattern
        assert not os.path.exists(sock)
    finally:
        shutil.rmtree(world.path("fresh"))
        os.unlink(image)
    assert _ours(world.prefix) == [world.image]
