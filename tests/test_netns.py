"""Tests for aiopostcopy.tools.netns: real namespaces, a real veth, real TCP.

Theory of operation: every test builds its own LinkPair (about 25 ms), runs
small ``python -c`` programs inside the namespaces and checks what crosses
the link, what ``tc`` reports, and that nothing (namespace or process) is
left behind.  The whole module is skipped, with the reason from
:func:`aiopostcopy.tools.netns.available`, when namespaces cannot be built (not
root, no iproute2, no veth/tbf).
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from typing import Iterator

import pytest

from aiopostcopy.tools import netns
from aiopostcopy.errors import ClosedError

_REASON = netns.available()
pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(_REASON is not None, reason=f"netns unavailable: {_REASON}"),
]

ECHO_SERVER = r"""
import socket, sys
srv = socket.create_server((sys.argv[1], 0))
print(srv.getsockname()[1], flush=True)
conn, _ = srv.accept()
while data := conn.recv(65536):
    conn.sendall(data)
conn.close()
"""

ECHO_CLIENT = r"""
import socket, sys
payload = sys.stdin.buffer.read()
sock = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
sock.sendall(payload)
sock.shutdown(socket.SHUT_WR)
chunks = []
while data := sock.recv(65536):
    chunks.append(data)
sys.stdout.buffer.write(b"".join(chunks))
"""

STUBBORN = r"""
import signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("ready", flush=True)
time.sleep(600)
"""


def _readline(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> bytes:
    """Read one line from a child's stdout, failing the test on a timeout.

    Args:
        proc: A child started with ``stdout=PIPE``.
        timeout: Seconds to wait.

    Returns:
        The line, without its newline.
    """
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "child printed nothing in time"
    return proc.stdout.readline().strip()


def _exists(name: str) -> bool:
    """Tell whether a named namespace exists (in the list or as a file)."""
    return name in netns.list_namespaces() or os.path.exists(f"/run/netns/{name}")


def _pid_gone(pid: int) -> bool:
    """Tell whether a PID has exited: reaped, or a zombie awaiting its parent."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except FileNotFoundError:
        return True
    return stat[stat.rindex(b")") + 2:][:1] in (b"Z", b"X")


@pytest.fixture
def link() -> Iterator[netns.LinkPair]:
    """A shaped LinkPair at the default rate, closed after the test."""
    with netns.LinkPair() as pair:
        yield pair


def test_echo_crosses_the_link_byte_exact(link: netns.LinkPair) -> None:
    server = link.popen("dst", [sys.executable, "-c", ECHO_SERVER, link.dst_addr],
                        stdout=subprocess.PIPE)
    port = int(_readline(server))
    payload = bytes(range(256)) * 1024 + os.urandom(70001)
    client = link.popen("src", [sys.executable, "-c", ECHO_CLIENT, link.dst_addr, str(port)],
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    echoed, _ = client.communicate(payload, timeout=10)
    assert client.returncode == 0
    assert echoed == payload
    assert server.wait(timeout=5) == 0
    # The bytes went over the veth, through both tbf qdiscs.
    assert link.qdisc_stats("src")["bytes"] >= len(payload)
    assert link.qdisc_stats("dst")["bytes"] >= len(payload)


def test_host_cannot_reach_the_link(link: netns.LinkPair) -> None:
    routes = subprocess.run(["ip", "-4", "route", "get", link.dst_addr],
                            capture_output=True, text=True, check=False).stdout
    assert link.dst_dev not in routes and link.src_dev not in routes
    assert link.src_dev not in subprocess.run(["ip", "link"], capture_output=True,
                                              text=True, check=True).stdout


@pytest.mark.parametrize("ns", ["src", "dst"])
def test_qdisc_is_tbf_at_the_requested_rate(link: netns.LinkPair, ns: str) -> None:
    text = link.run(ns, ["tc", "-s", "qdisc", "show", "dev", link.dev(ns)]).stdout
    first = text.splitlines()[0].split()
    assert first[:2] == ["qdisc", "tbf"], text
    assert first[first.index("rate") + 1] == "10Gbit", text
    stats = link.qdisc_stats(ns)
    assert stats["kind"] == "tbf"
    assert stats["options"]["rate"] * 8 == netns.parse_rate("10gbit")
    assert stats["options"]["burst"] >= 64 * 1024


def test_custom_rate_and_unshaped() -> None:
    with netns.LinkPair("250mbit") as slow:
        assert slow.qdisc_stats("dst")["options"]["rate"] * 8 == 250_000_000
        assert slow.rate == "250mbit"
    with netns.LinkPair(rate=None) as plain:
        assert plain.rate is None
        assert plain.qdisc_stats("src")["kind"] != "tbf"
        assert plain.qdisc_stats("dst")["kind"] != "tbf"


def test_names_are_unique_and_addresses_are_a_slash_30() -> None:
    with netns.LinkPair() as one, netns.LinkPair() as two:
        names = {one.src_ns, one.dst_ns, two.src_ns, two.dst_ns}
        assert len(names) == 4
        assert all(n.startswith(f"apc-{os.getpid()}-") for n in names)
        out = one.run("src", ["ip", "-4", "-o", "addr", "show", "dev", one.src_dev]).stdout
        assert f"{one.src_addr}/30" in out
        assert one.src_addr.rsplit(".", 1)[0] == one.dst_addr.rsplit(".", 1)[0]


def test_namespaces_are_gone_after_close(link: netns.LinkPair) -> None:
    names = (link.src_ns, link.dst_ns)
    assert all(_exists(n) for n in names)
    link.close()
    assert not any(_exists(n) for n in names)
    link.close()  # idempotent
    assert link.closed


def test_namespaces_are_gone_after_an_exception() -> None:
    with pytest.raises(KeyError):
        with netns.LinkPair() as pair:
            names = (pair.src_ns, pair.dst_ns)
            pair.popen("src", ["sleep", "600"])
            raise KeyError("boom")
    assert not any(_exists(n) for n in names)
    assert pair.closed


def test_tracked_processes_are_killed() -> None:
    with netns.LinkPair(grace=0.3) as pair:
        polite = pair.popen("src", ["sleep", "600"])
        stubborn = pair.popen("dst", [sys.executable, "-c", STUBBORN], stdout=subprocess.PIPE)
        assert _readline(stubborn) == b"ready"
        started = time.monotonic()
    assert polite.returncode == -15  # SIGTERM
    assert stubborn.returncode == -9  # ignored SIGTERM, got SIGKILL after the grace
    assert time.monotonic() - started < 5
    for pid in (polite.pid, stubborn.pid):  # reaped by close(), not just exited
        assert not os.path.exists(f"/proc/{pid}")


def test_stragglers_in_our_namespace_are_killed() -> None:
    with netns.LinkPair(grace=0.3) as pair:
        # A grandchild that outlives its tracked parent, still in our namespace.
        parent = pair.popen("src", ["sh", "-c", "sleep 600 & echo $!"], stdout=subprocess.PIPE)
        grandchild = int(_readline(parent))
        parent.wait(timeout=5)
        assert not _pid_gone(grandchild)
    deadline = time.monotonic() + 5
    while not _pid_gone(grandchild) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _pid_gone(grandchild)


def test_argv_prefix_and_foreign_namespaces(link: netns.LinkPair) -> None:
    assert link.argv("src", ["true"]) == ["ip", "netns", "exec", link.src_ns, "true"]
    assert link.argv(link.dst_ns, ["a", "b"]) == ["ip", "netns", "exec", link.dst_ns, "a", "b"]
    with pytest.raises(ValueError):
        link.argv("someone-elses-ns", ["true"])
    link.close()
    with pytest.raises(ClosedError):
        link.popen("src", ["true"])


def test_parse_rate() -> None:
    assert netns.parse_rate("10gbit") == 10**10
    assert netns.parse_rate("10Gbit") == 10**10
    assert netns.parse_rate("1.5mbit") == 1_500_000
    assert netns.parse_rate("100mbps") == 800_000_000
    for bad in ("", "fast", "10 parsecs", "0bit"):
        with pytest.raises(ValueError):
            netns.parse_rate(bad)
    with pytest.raises(ValueError):
        netns.LinkPair("fast")


def test_sweep_stale_deletes_only_dead_owners() -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    name = f"apc-{dead.pid}-abcdef-src"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        with netns.LinkPair() as live:
            swept = netns.sweep_stale()
            assert name in swept
            assert live.src_ns not in swept and _exists(live.src_ns)
        assert not _exists(name)
    finally:
        if _exists(name):
            subprocess.run(["ip", "netns", "del", name], check=False)


ORPHAN = r"""
import signal, sys, time
from aiopostcopy.tools.netns import LinkPair
pair = LinkPair()
print(pair.src_ns, pair.dst_ns, flush=True)
if sys.argv[1] == "exit":
    sys.exit(0)  # never closed: the atexit hook must clean up
with pair:
    time.sleep(600)  # Ctrl-C arrives here
"""


def _our_namespaces(pid: int) -> set[str]:
    """Namespaces whose names say they were made by process ``pid``."""
    return {n for n in netns.list_namespaces() if n.startswith(f"apc-{pid}-")}


@pytest.mark.parametrize("how", ["exit", "sigint"])
def test_cleanup_at_exit_and_on_ctrl_c(how: str) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    child = subprocess.Popen([sys.executable, "-c", ORPHAN, how], stdout=subprocess.PIPE, env=env)
    try:
        names = _readline(child, timeout=10).decode().split()
        assert len(names) == 2
        if how == "sigint":
            assert all(_exists(n) for n in names)
            child.send_signal(2)
        child.wait(timeout=10)
        assert not any(_exists(n) for n in names)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        for name in _our_namespaces(child.pid):
            subprocess.run(["ip", "netns", "del", name], check=False)


def test_half_built_pair_is_removed(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object) -> None:
        raise netns.NetnsError(["tc"], 2, "injected")

    before = _our_namespaces(os.getpid())
    monkeypatch.setattr(netns.LinkPair, "_configure_end", fail)
    with pytest.raises(netns.NetnsError, match="injected"):
        netns.LinkPair()
    assert _our_namespaces(os.getpid()) == before
