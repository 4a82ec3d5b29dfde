"""Places, processes and measurements the benchmark runner shares with benchmarks/ scripts.

Theory of operation
-------------------
A *place* runs a child on the source side (``"src"``) or the destination side
(``"dst"``) of the link under test: :class:`Loopback` runs both in the host
namespace over 127.0.0.1, :class:`Veth` in the two namespaces of a
:class:`aiopostcopy.tools.netns.LinkPair`, :class:`Pinned` wraps either to put
every child under ``taskset``.  Every child a place starts is tracked and
ended by its PID when the place closes.

CPU time of a process is its CPU clock: :func:`cpu_ns` reads it with one
``clock_gettime`` (nanoseconds, every thread, ended ones too, until the
process is reaped).  A :class:`Sampler` thread polls the CPU time of the
processes it watches and the bytes received on the destination side of the
link every few milliseconds, so a figure can be read at any instant of a run
(CPU per fault up to the moment the sweep was released, goodput over time).

What a run's conditions were (machine, load, the host's settings) is
:mod:`aiopostcopy.tools.bench_conditions`.
:func:`make_tls_files` makes a throwaway CA and the two certificates of the
TLS scenarios with the ``openssl`` command (P-256 keys, valid for a day).
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Sequence

__all__ = ["Loopback", "Veth", "Pinned", "Sampler", "cpu_ns", "first_line", "wait_exit", "stop",
           "tail", "StderrTap", "TlsFiles", "make_tls_files"]


# --------------------------------------------------------------------------- places


class Loopback:
    """Both sides in the host namespace over 127.0.0.1."""

    name = "loopback"
    server_addr = sink_addr = "127.0.0.1"
    link = None

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen[bytes]] = []

    def popen(self, side: str, argv: Sequence[str], **kw: Any) -> subprocess.Popen[bytes]:
        """Start and track a child; ``side`` ("src" or "dst") does not matter here."""
        proc = subprocess.Popen(list(argv), **kw)
        self._procs.append(proc)
        return proc

    def rx_bytes_path(self, pid: int) -> tuple[str, str]:
        """Where the destination side's received bytes are counted: /proc/net/dev, ``lo``."""
        return "/proc/net/dev", "lo"

    def close(self) -> None:
        """Stop every child we started (SIGTERM, then SIGKILL) and reap it."""
        for proc in self._procs:
            stop(proc, 2.0)
        self._procs.clear()


class Veth:
    """The source side in ``src``, the destination side in ``dst`` of a LinkPair."""

    def __init__(self, link: Any) -> None:
        self.link = link
        self.name = f"veth {link.rate or 'unshaped'}"
        self.server_addr = link.src_addr
        self.sink_addr = link.dst_addr

    def popen(self, side: str, argv: Sequence[str], **kw: Any) -> subprocess.Popen[bytes]:
        """Start a tracked child in the ``side`` namespace (the PID is the program's)."""
        return self.link.popen(side, argv, **kw)

    def rx_bytes_path(self, pid: int) -> tuple[str, str]:
        """The destination's veth end, seen through a process inside the dst namespace."""
        return f"/proc/{pid}/net/dev", self.link.dev("dst")

    def close(self) -> None:
        self.link.close()


class Pinned:
    """A place whose children all run under ``taskset -c CPUS``."""

    def __init__(self, place: Any, cpus: str) -> None:
        self.place, self.cpus = place, cpus
        self.name, self.server_addr, self.sink_addr = place.name, place.server_addr, place.sink_addr
        self.link = place.link

    def popen(self, side: str, argv: Sequence[str], **kw: Any) -> subprocess.Popen[bytes]:
        return self.place.popen(side, ["taskset", "-c", self.cpus, *argv], **kw)

    def rx_bytes_path(self, pid: int) -> tuple[str, str]:
        return self.place.rx_bytes_path(pid)

    def close(self) -> None:
        self.place.close()


# --------------------------------------------------------------------------- processes


def first_line(proc: subprocess.Popen[bytes], timeout: float) -> str:
    """The first stdout line of a child, or "" if none came in time."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline().decode(errors="replace").strip() if ready else ""


def _stat_ns(pid: int) -> int | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) * 1_000_000_000 // os.sysconf("SC_CLK_TCK")


def cpu_ns(pid: int) -> int | None:
    """CPU time of a process, all its threads (ended ones too), in ns (None if it is gone).

    One ``clock_gettime`` of the process's CPU clock (clockid ``(~pid << 3) | 2``,
    the kernel's CPUCLOCK_SCHED of the thread group), so a :class:`Sampler`
    polling every 10 ms costs the machine a few microseconds, not a read of
    every thread's ``/proc`` file.  A zombie's clock still reads (so
    :func:`wait_exit` reads it before reaping); a reaped pid has none, nor a
    ``/proc/PID/stat``: None.
    """
    try:
        return time.clock_gettime_ns(((~pid) << 3) | 2)
    except OSError:
        return _stat_ns(pid)


def wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> tuple[int | None, int | None]:
    """Wait for a child; read its CPU time (ns) while it is a zombie, then reap it.

    Returns:
        (exit status, or None on timeout; CPU ns, or None).
    """
    try:
        fd = os.pidfd_open(proc.pid)
    except OSError:
        return proc.wait(timeout), None
    try:
        if not select.select([fd], [], [], timeout)[0]:
            return None, None
    finally:
        os.close(fd)
    cpu = cpu_ns(proc.pid)
    return proc.wait(), cpu


def stop(proc: subprocess.Popen[bytes], grace: float = 3.0) -> None:
    """SIGTERM one child we started (by its PID), SIGKILL after ``grace`` s, and reap it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait()


def tail(path: Path, lines: int = 8) -> str:
    """The last lines of a log, indented."""
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "    (no log)"
    return "\n".join("    " + line for line in text[-lines:])


class StderrTap:
    """Copy a child's stderr pipe to a log; note its CPU time (ns) and the time of its first line.

    The destination prints its first stderr line once connected and set up, so
    CPU used after it is the migration's, not Python start-up's.
    """

    def __init__(self, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.cpu_at_first_line: int | None = None
        self.first_line_at: float | None = None
        self._proc, self._log = proc, log
        self._thread = threading.Thread(target=self._copy, daemon=True)
        self._thread.start()

    def _copy(self) -> None:
        assert self._proc.stderr is not None
        with open(self._log, "wb") as out:
            for line in self._proc.stderr:
                if self.cpu_at_first_line is None:
                    self.cpu_at_first_line = cpu_ns(self._proc.pid)
                    self.first_line_at = time.monotonic()
                out.write(line)

    def join(self) -> None:
        self._thread.join(10)


# --------------------------------------------------------------------------- sampling


def _rx_bytes(fd: int, dev: str) -> int | None:
    """Bytes ``dev`` received, from an open ``net/dev`` file (read again from its start)."""
    try:
        for line in os.pread(fd, 1 << 16, 0).decode().splitlines()[2:]:
            name, _, rest = line.partition(":")
            if name.strip() == dev:
                return int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return None


class Sampler:
    """Polls CPU time of watched processes and the link's received bytes every ``interval`` s.

    Attributes:
        rows: ``(monotonic time, {name: cpu ns}, rx bytes or None)``, in order.
    """

    def __init__(self, interval: float = 0.005) -> None:
        self.rows: list[tuple[float, dict[str, int], int | None]] = []
        self._pids: dict[str, int] = {}
        self._rx: tuple[str, str] | None = None  # the net/dev file and the device
        self._rx_fd: int | None = None  # that file, open once the device is in it
        self._interval = interval
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)

    def watch(self, name: str, pid: int) -> None:
        self._pids[name] = pid

    def count_rx(self, path: str, dev: str) -> None:
        """Poll ``dev``'s received bytes in ``path`` (a ``net/dev`` file).  The file is opened
        until ``dev`` is in it (a child started through ``ip netns exec`` joins its namespace a
        moment after it starts), then kept open and re-read: opening ``/proc/PID/net/dev`` every
        10 ms delayed the service's faults, re-reading it does not."""
        self._close_rx()
        self._rx = (path, dev)

    def _read_rx(self) -> int | None:
        if self._rx is None:
            return None
        if self._rx_fd is None:
            try:
                self._rx_fd = os.open(self._rx[0], os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                return None
        rx = _rx_bytes(self._rx_fd, self._rx[1])
        if rx is None:  # not (yet) the namespace that has the device: open it again next time
            self._close_rx()
        return rx

    def _close_rx(self) -> None:
        if self._rx_fd is not None:
            os.close(self._rx_fd)
            self._rx_fd = None

    def start(self) -> "Sampler":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._done.set()
        if self._thread.ident is not None:  # started
            self._thread.join(5)
        if not self._thread.is_alive():
            self._close_rx()

    def _run(self) -> None:
        while not self._done.is_set():
            cpu = {name: v for name, pid in list(self._pids.items()) if (v := cpu_ns(pid)) is not None}
            rx = self._read_rx()
            self.rows.append((time.monotonic(), cpu, rx))
            self._done.wait(self._interval)

    def cpu_at(self, name: str, when: float) -> int | None:
        """The last CPU reading of ``name`` at or before ``when``."""
        best = None
        for t, cpu, _ in self.rows:
            if t > when:
                break
            best = cpu.get(name, best)
        return best

    def rx_series(self) -> list[tuple[float, int]]:
        """(time, rx bytes) readings."""
        return [(t, rx) for t, _, rx in self.rows if rx is not None]


# --------------------------------------------------------------------------- TLS


class TlsFiles:
    """A CA and a certificate for each side, in ``directory`` (PEM): the TLS options of each role."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def options(self, role: str) -> list[str]:
        """``--tls-cert/--tls-key/--tls-ca`` of ``role`` (``source`` or ``dest``)."""
        d = self.directory
        return ["--tls-cert", str(d / f"{role}.pem"), "--tls-key", str(d / f"{role}.key"), "--tls-ca", str(d / "ca.pem")]


def make_tls_files(directory: Path, host: str) -> TlsFiles:
    """A CA and certificates for ``source`` (naming ``host``) and ``dest``, made with ``openssl``.

    Raises:
        RuntimeError: no ``openssl`` command, or it failed.
    """
    openssl = shutil.which("openssl")
    if openssl is None:
        raise RuntimeError("the TLS scenarios need the openssl command (apt-get install -y openssl), "
                           "or leave them out with --scenarios")
    directory.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*args: str) -> None:
        done = subprocess.run([openssl, *args], capture_output=True, text=True, timeout=60)
        if done.returncode:
            raise RuntimeError(f"openssl {args[0]} failed: {done.stderr.strip()[-300:]}")

    d = directory
    run("req", "-x509", *ec, "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"), "-days", "1",
        "-subj", "/CN=aiopostcopy bench CA")
    for role in ("source", "dest"):
        (d / f"{role}.ext").write_text(f"subjectAltName=IP:{host}\n" if role == "source"
                                       else "subjectAltName=DNS:aiopostcopy-dest\n")
        run("req", *ec, "-keyout", str(d / f"{role}.key"), "-out", str(d / f"{role}.csr"),
            "-subj", f"/CN=aiopostcopy bench {role}")
        run("x509", "-req", "-in", str(d / f"{role}.csr"), "-CA", str(d / "ca.pem"), "-CAkey", str(d / "ca.key"),
            "-CAcreateserial", "-out", str(d / f"{role}.pem"), "-days", "1", "-extfile", str(d / f"{role}.ext"))
    return TlsFiles(directory)
