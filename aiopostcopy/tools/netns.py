"""Two throw-away Linux network namespaces joined by a shaped veth pair.

Theory of operation
-------------------
Tests and benchmarks need a source and a destination that talk TCP over a
real link rather than loopback.  :class:`LinkPair` builds one with iproute2
(plain ``ip`` and ``tc`` subprocesses; no Python netlink dependency)::

    apc-<pid>-<tag>-src                    apc-<pid>-<tag>-dst
    +--------------------------+           +--------------------------+
    | lo (up)                  |           | lo (up)                  |
    | apc<tag>s 10.213.X.1/30 ===== veth ===== apc<tag>d 10.213.X.2/30 |
    |  root qdisc: tbf <rate>  |           |  root qdisc: tbf <rate>  |
    +--------------------------+           +--------------------------+

* Names are unique per pair: the creating PID plus a random tag.  The veth
  pair is created *inside* the src namespace with its peer placed straight
  into the dst namespace, so nothing ever appears in the host namespace and
  no host route or address changes.  The /30 (random ``X``) exists only
  inside the two namespaces.
* Both veth ends get a root ``tbf`` qdisc, so each direction is shaped.
  The defaults for 10 Gbit/s (see :data:`DEFAULT_BURST` and
  :data:`DEFAULT_LIMIT`) let a 64 KiB GSO super-packet through whole, keep
  shaping accurate to a few hundred microseconds, and hold the most a single
  TCP flow may queue (``tcp_limit_output_bytes``, 4 MiB here), so a bulk
  flow is paced by the token bucket instead of by drops.
* Processes are started with ``ip netns exec NS argv...`` (which execs the
  command, so the PID we hold *is* the program's PID) and tracked.
  :meth:`LinkPair.close` ends tracked processes (SIGTERM, then SIGKILL after a
  grace period, reaping each), then any straggler still inside one of *our*
  namespaces (found by ``ip netns pids``, checked and signalled through a
  pidfd so a recycled PID is never hit), then deletes both
  namespaces; deleting a namespace destroys its veth end and so the pair.
* Cleanup runs on ``with`` exit (also on exceptions and Ctrl-C), on an
  explicit :meth:`~LinkPair.close` (idempotent), at interpreter exit
  (``atexit``), and when construction fails half-way.  A process killed by
  SIGKILL cannot clean up: :func:`sweep_stale` (or
  ``python -m aiopostcopy.tools.netns sweep``) deletes pairs whose creating PID is
  gone.

Only loopback and these namespaces ever carry traffic.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import random
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import time
from typing import Any, Sequence

from aiopostcopy.errors import ClosedError, NetnsError

__all__ = [
    "DEFAULT_RATE",
    "DEFAULT_BURST",
    "DEFAULT_LIMIT",
    "NAME_PREFIX",
    "NetnsError",
    "LinkPair",
    "available",
    "parse_rate",
    "list_namespaces",
    "sweep_stale",
]

DEFAULT_RATE = "10gbit"
"""Shaping rate used when none is given (tc syntax)."""

DEFAULT_BURST = 256 * 1024
"""Token-bucket depth in bytes: 210 us of line time at 10 Gbit/s.

Large enough to pass a 64 KiB TSO/GSO skb whole (tbf would otherwise split
it) and several back-to-back, small enough that a sustained flow is held to
the rate within a fraction of a millisecond.  Measured here (kernel 6.18,
2 vCPUs): a 64 KiB bucket held one bulk flow to 0.92 GB/s, below the line
rate; 256 KiB and 1 MiB both gave line rate, 1.17-1.19 GB/s.  A 16 B request
or a 4 KiB reply never waits for tokens: shaping shows on sustained flows.
"""

DEFAULT_LIMIT = 6 * 1024 * 1024
"""Bytes a tbf may queue before dropping (tc reports it as ``lat 4.82ms``).

Above the 4 MiB one TCP socket may keep in qdiscs (``tcp_limit_output_bytes``)
so that one bulk flow is paced, not dropped, whatever its congestion control.
With this machine's default, BBR, the standing queue behind one bulk flow
measured p50 200 KB (~170 us), max 1.45 MB, no drops; a 1 MiB limit dropped
packets (91 in 1 GiB).  Anything sharing the link with a bulk flow waits
behind that queue, as behind a deep NIC ring.
"""

NAME_PREFIX = "apc-"
"""Every namespace this module creates is named ``apc-<pid>-<tag>-<role>``."""

_IP_TIMEOUT = 15.0
_NETNS_DIR = "/run/netns"
_NAME_RE = re.compile(r"^apc-(\d+)-([0-9a-f]+)-(src|dst)$")
_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$")
_RATE_UNITS = {
    "": 1, "bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12,
    "kibit": 2**10, "mibit": 2**20, "gibit": 2**30, "tibit": 2**40,
    "bps": 8, "kbps": 8 * 10**3, "mbps": 8 * 10**6, "gbps": 8 * 10**9, "tbps": 8 * 10**12,
}
_OPEN: "set[LinkPair]" = set()


# --------------------------------------------------------------------------- helpers


def _run(argv: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a short host command (``ip``/``tc``) and capture its output.

    Args:
        argv: The command line.
        check: Raise on a non-zero exit status.

    Returns:
        The completed process, text mode.

    Raises:
        NetnsError: The command failed, timed out or could not be started.
    """
    try:
        done = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=_IP_TIMEOUT, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetnsError(argv, None, str(exc)) from exc
    if check and done.returncode != 0:
        raise NetnsError(argv, done.returncode, done.stderr.strip())
    return done


def parse_rate(rate: str) -> int:
    """Convert a tc rate such as ``"10gbit"`` to bits per second.

    Args:
        rate: A number with an optional tc unit (``bit``, ``kbit``, ``mbit``,
            ``gbit``, ``tbit``, the ``*ibit`` binary forms, or the byte-based
            ``bps``, ``kbps``, ...).  Case-insensitive.

    Returns:
        The rate in bits per second.

    Raises:
        ValueError: The text is not a rate.
    """
    match = _RATE_RE.match(rate.lower())
    if match is None or match.group(2) not in _RATE_UNITS:
        raise ValueError(f"not a tc rate: {rate!r}")
    bits = float(match.group(1)) * _RATE_UNITS[match.group(2)]
    if bits <= 0:
        raise ValueError(f"rate must be positive: {rate!r}")
    return int(bits)


def list_namespaces() -> list[str]:
    """Names of all named network namespaces on the host (``ip netns list``).

    Returns:
        The names, in ``ip``'s order; empty if ``ip`` fails.
    """
    done = _run(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in done.stdout.splitlines() if line.strip()]


def _pid_alive(pid: int) -> bool:
    """Tell whether a PID is a live process (a zombie counts as dead).

    A zombie has already left its namespaces; it only waits for its parent
    (possibly an init that reaps slowly) to collect it.

    Args:
        pid: The process id.

    Returns:
        True if the process exists and is not a zombie.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    state = stat[stat.rindex(b")") + 2:][:1]
    return state not in (b"Z", b"X")


def _delete_namespace(name: str) -> None:
    """Delete a named namespace if it exists (its veth ends go with it).

    Args:
        name: The namespace name.

    Raises:
        NetnsError: ``ip netns del`` failed for a namespace that exists.
    """
    if name not in list_namespaces():
        return
    _run(["ip", "netns", "del", name])


def sweep_stale() -> list[str]:
    """Delete namespaces left by a LinkPair whose creating process is gone.

    Only names of this module's form (``apc-<pid>-<tag>-src|dst``) whose
    ``<pid>`` no longer exists are touched, so live pairs of concurrent runs
    are safe.  Needed only after a SIGKILL, which skips every cleanup.

    Returns:
        The names deleted.
    """
    deleted = []
    for name in list_namespaces():
        match = _NAME_RE.match(name)
        if match and not _pid_alive(int(match.group(1))):
            _kill_namespace_pids(name, grace=1.0)
            _delete_namespace(name)
            deleted.append(name)
    return deleted


@functools.cache
def available() -> str | None:
    """Check that LinkPair can work here, by building and removing a probe.

    The probe creates one namespace holding a veth pair with a tbf qdisc, so
    a missing veth or tbf kernel module is found as well.  Cached per process.

    Returns:
        None if usable, else a one-line reason fit for ``pytest.skip``.
    """
    if os.geteuid() != 0:
        return f"network namespaces need root (euid is {os.geteuid()})"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"iproute2 '{tool}' binary not found on PATH"
    name = f"{NAME_PREFIX}{os.getpid()}-{secrets.token_hex(3)}-src"
    try:
        _run(["ip", "netns", "add", name])
        _run(["ip", "-n", name, "link", "add", "p0", "type", "veth", "peer", "name", "p1"])
        _run(["tc", "-n", name, "qdisc", "add", "dev", "p0", "root", "tbf",
              "rate", DEFAULT_RATE, "burst", str(DEFAULT_BURST), "limit", str(DEFAULT_LIMIT)])
    except NetnsError as exc:
        return f"cannot build a shaped veth in a network namespace: {exc}"
    finally:
        try:
            _delete_namespace(name)
        except NetnsError:
            pass
    return None


def _namespace_pidfds(name: str) -> list[int]:
    """Open pidfds for the processes inside one of our namespaces.

    Each candidate from ``ip netns pids`` is pinned with a pidfd and then
    checked to still be in the namespace, so a PID reused meanwhile by an
    unrelated process is never signalled.

    Args:
        name: The namespace name (ours).

    Returns:
        Open pidfds; the caller closes them.
    """
    try:
        ns_id = _file_id(f"{_NETNS_DIR}/{name}")
    except OSError:
        return []
    done = _run(["ip", "netns", "pids", name], check=False)
    fds = []
    for pid in {int(tok) for tok in done.stdout.split() if tok.isdigit()} - {os.getpid()}:
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            continue
        try:
            same = _file_id(f"/proc/{pid}/ns/net") == ns_id
        except OSError:
            same = False
        if same:
            fds.append(fd)
        else:
            os.close(fd)
    return fds


def _file_id(path: str) -> tuple[int, int]:
    """The (device, inode) pair naming a file, here a namespace.

    Args:
        path: The path.

    Returns:
        ``(st_dev, st_ino)``.

    Raises:
        OSError: The path cannot be stat'ed.
    """
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _wait_pidfds(fds: list[int], timeout: float) -> list[int]:
    """Wait until the processes behind pidfds exit.

    Args:
        fds: pidfds.
        timeout: Seconds to wait at most.

    Returns:
        The pidfds whose process is still running.
    """
    pending = set(fds)
    poller = select.poll()
    for fd in pending:
        poller.register(fd, select.POLLIN)
    deadline = time.monotonic() + timeout
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        for fd, _ in poller.poll(left * 1000):
            pending.discard(fd)
            poller.unregister(fd)
    return [fd for fd in fds if fd in pending]


def _pidfd_signal(fd: int, sig: int) -> None:
    """Signal the process behind a pidfd, ignoring one that has exited.

    Args:
        fd: The pidfd.
        sig: The signal number.
    """
    try:
        signal.pidfd_send_signal(fd, sig)
    except ProcessLookupError:
        pass


def _kill_namespace_pids(name: str, grace: float) -> None:
    """End every process still inside one of our namespaces.

    These are processes started, directly or not, through our own uniquely
    named namespace (e.g. a grandchild of a tracked process).  SIGTERM, then
    SIGKILL after ``grace`` seconds; each is addressed through a pidfd.

    Args:
        name: The namespace name (ours).
        grace: Seconds between SIGTERM and SIGKILL.
    """
    fds = _namespace_pidfds(name)
    try:
        for fd in fds:
            _pidfd_signal(fd, signal.SIGTERM)
        stubborn = _wait_pidfds(fds, grace)
        for fd in stubborn:
            _pidfd_signal(fd, signal.SIGKILL)
        _wait_pidfds(stubborn, grace)
    finally:
        for fd in fds:
            os.close(fd)


def _stop_process(proc: subprocess.Popen[Any], grace: float) -> None:
    """End one child: SIGTERM, wait ``grace`` s, then SIGKILL, and reap it.

    Args:
        proc: The child (started by us).
        grace: Seconds to wait after SIGTERM.
    """
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait()


@atexit.register
def _close_all_at_exit() -> None:
    """Close every LinkPair still open when the interpreter exits."""
    for pair in list(_OPEN):
        pair.close()


# --------------------------------------------------------------------------- LinkPair


class LinkPair:
    """Two fresh network namespaces joined by a veth pair, shaped both ways.

    Use as a context manager::

        with LinkPair() as link:
            server = link.popen("src", [sys.executable, "server.py", link.src_addr])
            subprocess.run(link.argv("dst", ["ping", "-c1", link.src_addr]))

    Attributes:
        src_ns: Name of the source namespace.
        dst_ns: Name of the destination namespace.
        src_dev: Name of the veth end inside ``src_ns``.
        dst_dev: Name of the veth end inside ``dst_ns``.
        src_addr: IPv4 address of ``src_dev`` (no prefix length).
        dst_addr: IPv4 address of ``dst_dev``.
        prefixlen: Prefix length of both addresses (30).
        rate: The tc rate shaping each direction, or None if unshaped.
        burst: tbf bucket depth in bytes (None if unshaped).
        limit: tbf queue limit in bytes (None if unshaped).
        grace: Seconds :meth:`close` waits after SIGTERM before SIGKILL.
        closed: True once :meth:`close` has run.
    """

    def __init__(
        self,
        rate: str | None = DEFAULT_RATE,
        *,
        burst: int = DEFAULT_BURST,
        limit: int = DEFAULT_LIMIT,
        grace: float = 2.0,
    ) -> None:
        """Build the namespaces, the link, addresses and shaping.

        Args:
            rate: tc rate for both directions (``"10gbit"``), or None for no
                qdisc shaping at all.
            burst: tbf bucket depth in bytes.
            limit: tbf queue limit in bytes.
            grace: Seconds between SIGTERM and SIGKILL when closing.

        Raises:
            ValueError: ``rate`` is not a tc rate, or burst/limit not positive.
            NetnsError: An ``ip``/``tc`` command failed; whatever was built is
                removed again before this propagates.
        """
        if rate is not None:
            parse_rate(rate)
            if burst <= 0 or limit <= 0:
                raise ValueError("burst and limit must be positive")
        tag = secrets.token_hex(3)
        subnet = random.SystemRandom().randrange(256)
        self.src_ns = f"{NAME_PREFIX}{os.getpid()}-{tag}-src"
        self.dst_ns = f"{NAME_PREFIX}{os.getpid()}-{tag}-dst"
        self.src_dev = f"apc{tag}s"
        self.dst_dev = f"apc{tag}d"
        self.src_addr = f"10.213.{subnet}.1"
        self.dst_addr = f"10.213.{subnet}.2"
        self.prefixlen = 30
        self.rate = rate
        self.burst = burst if rate is not None else None
        self.limit = limit if rate is not None else None
        self.grace = grace
        self.closed = False
        self._procs: list[subprocess.Popen[Any]] = []
        _OPEN.add(self)
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    # ----------------------------------------------------------------- building

    def _build(self) -> None:
        """Create namespaces, veth, addresses, links up and qdiscs.

        Raises:
            NetnsError: A command failed.
        """
        _run(["ip", "netns", "add", self.src_ns])
        _run(["ip", "netns", "add", self.dst_ns])
        _run(["ip", "-n", self.src_ns, "link", "add", self.src_dev, "type", "veth",
              "peer", "name", self.dst_dev, "netns", self.dst_ns])
        for ns, dev, addr in ((self.src_ns, self.src_dev, self.src_addr),
                              (self.dst_ns, self.dst_dev, self.dst_addr)):
            self._configure_end(ns, dev, addr)

    def _configure_end(self, ns: str, dev: str, addr: str) -> None:
        """Address one veth end, bring it and lo up, and shape its egress.

        Args:
            ns: Namespace holding the end.
            dev: The veth end.
            addr: Its IPv4 address.

        Raises:
            NetnsError: A command failed.
        """
        _run(["ip", "-n", ns, "addr", "add", f"{addr}/{self.prefixlen}", "dev", dev])
        _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        if self.rate is not None:
            _run(["tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", self.rate,
                  "burst", str(self.burst), "limit", str(self.limit)])
        _run(["ip", "-n", ns, "link", "set", dev, "up"])

    # ----------------------------------------------------------------- using

    def _resolve(self, ns: str) -> str:
        """Map ``"src"``/``"dst"`` or one of our names to our namespace name.

        Args:
            ns: ``"src"``, ``"dst"``, ``self.src_ns`` or ``self.dst_ns``.

        Returns:
            The full namespace name.

        Raises:
            ValueError: ``ns`` is not one of this pair's namespaces.
            ClosedError: The pair is closed.
        """
        if self.closed:
            raise ClosedError(f"{self!r} is closed")
        names = {"src": self.src_ns, "dst": self.dst_ns,
                 self.src_ns: self.src_ns, self.dst_ns: self.dst_ns}
        if ns not in names:
            raise ValueError(f"{ns!r} is not a namespace of this LinkPair")
        return names[ns]

    def dev(self, ns: str) -> str:
        """The veth end inside a namespace of this pair.

        Args:
            ns: ``"src"``, ``"dst"`` or a full namespace name of this pair.

        Returns:
            The device name.

        Raises:
            ValueError: ``ns`` is not one of this pair's namespaces.
        """
        return self.src_dev if self._resolve(ns) == self.src_ns else self.dst_dev

    def argv(self, ns: str, argv: Sequence[str]) -> list[str]:
        """Prefix a command line so that it runs inside a namespace.

        Args:
            ns: ``"src"``, ``"dst"`` or a full namespace name of this pair.
            argv: The command line.

        Returns:
            ``["ip", "netns", "exec", NAME, *argv]``.

        Raises:
            ValueError: ``ns`` is not one of this pair's namespaces.
            ClosedError: The pair is closed.
        """
        return ["ip", "netns", "exec", self._resolve(ns), *argv]

    def popen(self, ns: str, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start a process inside a namespace and track it for :meth:`close`.

        ``ip netns exec`` execs the command, so ``proc.pid`` is the PID of
        the program itself.

        Args:
            ns: ``"src"``, ``"dst"`` or a full namespace name of this pair.
            argv: The command line.
            **kw: Passed to :class:`subprocess.Popen`.

        Returns:
            The started process.

        Raises:
            ValueError: ``ns`` is not one of this pair's namespaces.
            ClosedError: The pair is closed.
            OSError: The process could not be started.
        """
        proc = subprocess.Popen(self.argv(ns, argv), **kw)
        self._procs.append(proc)
        return proc

    def run(self, ns: str, argv: Sequence[str], *, check: bool = True,
            timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Run a short command inside a namespace and capture its text output.

        Args:
            ns: ``"src"``, ``"dst"`` or a full namespace name of this pair.
            argv: The command line.
            check: Raise if it exits non-zero.
            timeout: Seconds before it is killed.

        Returns:
            The completed process.

        Raises:
            ValueError: ``ns`` is not one of this pair's namespaces.
            subprocess.CalledProcessError: ``check`` and a non-zero exit.
            subprocess.TimeoutExpired: It ran longer than ``timeout``.
        """
        return subprocess.run(self.argv(ns, argv), capture_output=True, text=True,
                              timeout=timeout, check=check)

    def qdisc_stats(self, ns: str) -> dict[str, Any]:
        """The root qdisc of the veth end in a namespace, with statistics.

        Parsed from ``tc -j -s qdisc show``.  Keys include ``kind`` ("tbf"
        when shaped), ``bytes``, ``packets``, ``drops``, ``overlimits`` and,
        for tbf, ``options.rate`` in *bytes* per second.

        Args:
            ns: ``"src"``, ``"dst"`` or a full namespace name of this pair.

        Returns:
            The qdisc's JSON object.

        Raises:
            ValueError: ``ns`` is not one of this pair's namespaces.
            NetnsError: tc failed or showed no root qdisc.
        """
        argv = ["tc", "-n", self._resolve(ns), "-j", "-s", "qdisc", "show", "dev", self.dev(ns)]
        qdiscs = json.loads(_run(argv).stdout or "[]")
        for qdisc in qdiscs:
            if qdisc.get("root"):
                return dict(qdisc)
        raise NetnsError(argv, 0, "no root qdisc shown")

    # ----------------------------------------------------------------- closing

    def close(self) -> None:
        """Kill tracked processes and stragglers, then delete both namespaces.

        Idempotent.  Tracked processes get SIGTERM, then SIGKILL after
        :attr:`grace` seconds, and are reaped.  Every step is tried even if
        one fails; the first failure is raised at the end.  If the teardown
        itself is interrupted (Ctrl-C), the pair stays open so that a later
        call or the ``atexit`` hook finishes it.

        Raises:
            NetnsError: A namespace could not be deleted.
        """
        if self.closed:
            return
        errors = self._teardown()
        self.closed = True
        _OPEN.discard(self)
        if errors:
            raise errors[0]

    def _teardown(self) -> list[NetnsError]:
        """Stop processes and delete namespaces; each step is idempotent.

        Returns:
            The errors met while deleting namespaces.
        """
        errors: list[NetnsError] = []
        for proc in reversed(self._procs):
            _stop_process(proc, self.grace)
        for name in (self.src_ns, self.dst_ns):
            try:
                _kill_namespace_pids(name, self.grace)
                _delete_namespace(name)
            except NetnsError as exc:
                errors.append(exc)
        return errors

    def __enter__(self) -> "LinkPair":
        """Return self; the pair is already built."""
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Close the pair, whatever ended the block."""
        self.close()

    def __repr__(self) -> str:
        """Show names, addresses, rate and state."""
        state = "closed" if self.closed else "open"
        return (f"<LinkPair {self.src_ns}({self.src_addr}) <-> {self.dst_ns}({self.dst_addr})"
                f" rate={self.rate} {state}>")


def _main(argv: Sequence[str]) -> int:
    """``python -m aiopostcopy.tools.netns [check|list|sweep]``.

    Args:
        argv: Command-line arguments after the program name.

    Returns:
        The exit status.
    """
    cmd = argv[0] if argv else "check"
    if cmd == "check":
        reason = available()
        print(reason or "ok")
        return 0 if reason is None else 1
    if cmd == "list":
        print("\n".join(n for n in list_namespaces() if n.startswith(NAME_PREFIX)))
        return 0
    if cmd == "sweep":
        print("\n".join(sweep_stale()))
        return 0
    print("usage: python -m aiopostcopy.tools.netns [check|list|sweep]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
