"""A real, unmodified DPDK back-end (dpdk-testpmd) served as a postcopy client.

Guest memory comes from a source over TCP as postcopy.  The guest's
virtio-net virtqueues live in that memory, and the only copy of a packet is
in the source's image, in a transmit buffer.  testpmd (vhost PMD, io
forwarding, loop topology) is attached through the vhost-user front-end: it
registers its own userfaultfd, faults on the rings while handling
SET_VRING_KICK and on the buffers from its forwarding thread, and the
service serves those faults.  The packet must come out byte-identical in a
receive buffer, the report must show testpmd's faults under its own name,
and every page of guest memory must match the source (plus what forwarding
legitimately wrote: used rings and the receive buffer).

The source's background sweep is held until the packet has arrived, so
every page testpmd touches reaches it through a fault (a hook on the
in-process source, as the placement hooks of the other tests).

The testpmd tests are skipped, with the reason, only when dpdk-testpmd is
not installed (.ci/run installs it: dpdk-dev, librte-net-vhost23,
librte-mempool-ring23).  A scripted back-end (rogue_vhost.py) checks the
refusals of one that lacks PAGEFAULT, answers out of order or dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import select
import sys

import pytest

from aiopostcopy.errors import MigrationAborted, RemoteProtocolError
from aiopostcopy.loop import PostcopyDestination
from aiopostcopy.source import PostcopySource, SourceBlock

from e2e_support import bounded, wait_until
from vhost_guest import PAGE, RX_BUFFER_AT, build_image, expected_after_forward, expected_untouched, used_entries

TESTPMD = shutil.which("dpdk-testpmd")
needs_testpmd = pytest.mark.skipif(TESTPMD is None, reason="dpdk-testpmd is not installed "
                                "(apt-get install dpdk-dev librte-net-vhost23 librte-mempool-ring23)")

MiB = 1 << 20
DPDK_RUNTIME = "/var/run/dpdk"
SEED = 11


def pmd_argv(sock: str, prefix: str, *, mlockall: bool = False) -> list[str]:
    argv = [TESTPMD, "-l", "0-1", "--no-pci", "--no-huge", "-m", "512", "--no-shconf", "--file-prefix", prefix,
            "--vdev", f"net_vhost0,iface={sock},client=0,postcopy-support=1",
            "--", "--port-topology=loop", "--auto-start", "--forward-mode=io", "--total-num-mbufs=2048"]
    return argv if mlockall else argv + ["--no-mlockall"]


async def start_testpmd(e2e, sock: str, **kw) -> asyncio.subprocess.Process:
    """Start testpmd (it listens on ``sock``); it exits when its stdin closes.  Its
    runtime directory (/var/run/dpdk/PREFIX, made even with --no-shconf) goes at teardown."""
    log = open(os.path.join(e2e.workdir, "testpmd.log"), "wb")
    prefix = os.path.basename(e2e.workdir)
    e2e.procs.closers.append(log.close)
    e2e.procs.closers.append(lambda: shutil.rmtree(os.path.join(DPDK_RUNTIME, prefix), ignore_errors=True))
    proc = e2e.procs.add(await asyncio.create_subprocess_exec(
        *pmd_argv(sock, prefix, **kw),
        stdin=asyncio.subprocess.PIPE, stdout=log, stderr=log))
    await wait_until(lambda: os.path.exists(sock) or proc.returncode is not None, "testpmd's socket", timeout=60)
    assert proc.returncode is None, f"testpmd exited early: {pmd_log(e2e)}"
    return proc


def pmd_log(e2e, tail: int = 3000) -> str:
    with open(os.path.join(e2e.workdir, "testpmd.log"), "rb") as f:
        return f.read().decode(errors="replace")[-tail:]


async def stop_testpmd(proc: asyncio.subprocess.Process) -> None:
    """Close its stdin (testpmd then quits); the PID we started is killed if it lingers."""
    proc.stdin.close()
    try:
        await asyncio.wait_for(proc.wait(), 20)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()


def assert_pages(got: memoryview, want: bytes) -> None:
    bad = [page for page in range(len(want) // PAGE)
           if got[page * PAGE:(page + 1) * PAGE] != want[page * PAGE:(page + 1) * PAGE]]
    assert not bad, f"{len(bad)} pages differ from the source, first {bad[:10]}"


class HeldSource:
    """An in-process source whose background sweep waits until released."""

    def __init__(self, image: str) -> None:
        self.source = PostcopySource([SourceBlock.from_path("ram", image)])
        self.source.hold_sweep()

    def release(self) -> None:
        self.source.release_sweep()


async def wait_eventfd(fd: int, what: str) -> None:
    def readable() -> bool:
        return bool(select.select([fd], [], [], 0)[0])

    await wait_until(readable, what, timeout=60)
    os.eventfd_read(fd)


@needs_testpmd
@pytest.mark.slow
@pytest.mark.asyncio
async def test_testpmd_forwards_a_packet_from_postcopy_memory(e2e) -> None:
    image = os.path.join(e2e.workdir, "guest.img")
    guest = build_image(image, 8 * MiB, seed=SEED)
    with open(image, "rb") as f:
        source_bytes = f.read()
    sock = os.path.join(e2e.workdir, "vhost.sock")
    testpmd = await start_testpmd(e2e, sock)
    held = HeldSource(image)
    host, port = await held.source.listen("127.0.0.1", 0)
    dest = PostcopyDestination(e2e.options((host, port), block_dir=False, clients=False, vhost_user=(sock,)))
    try:
        await bounded(dest.start(), "the destination and testpmd's set-up (faults served during it)")
        front_end = dest._vhost_user[0]
        assert front_end.net_header_size == guest.header_size
        front_end.kick(1)  # the transmit queue has a packet
        try:
            await wait_eventfd(front_end.call_fd(0), "testpmd to use a receive buffer (call eventfd)")
        except AssertionError as exc:  # what the service saw, and testpmd's own words, for the record
            raise AssertionError(f"{exc}\n{dest.statistics().format()}\ntestpmd's log:\n{pmd_log(e2e)}") from None
        held.release()
        report = await bounded(dest.wait_complete(), "the migration to complete")
        name = front_end.name
        assert report.complete, report.format()
        faults = report.faults_by_client.get(name, 0)
        assert faults >= len(guest.touched_pages), (faults, report.format())
        assert report.blocked_by_client_s.get(name, 0) > 0, report.format()
        assert any(c["key"] == name and c["pid"] == testpmd.pid and not c["error"] for c in report.clients), \
            report.clients
        got = dest.memory("ram")
        _, rx_idx, rx_used = used_entries(got, guest.layout.used(0))
        packet = got[RX_BUFFER_AT + guest.header_size:RX_BUFFER_AT + guest.header_size + len(guest.frame)]
        assert rx_idx == 1 and rx_used[0] == (0, guest.header_size + len(guest.frame)), rx_used
        assert bytes(packet) == guest.frame, "the forwarded packet differs from the one in the source's image"
        assert_pages(got, expected_after_forward(source_bytes, got, guest))
        del got, packet
        await dest.close()
        assert front_end.ended, "POSTCOPY_END was not answered"
        assert "VHOST_USER_POSTCOPY_END" in pmd_log(e2e, 200_000)
        print(f"testpmd: {faults} faults served, blocked {report.blocked_by_client_s[name] * 1e3:.2f} ms "
              f"(mean {report.blocked_by_client_s[name] / faults * 1e6:.0f} us per fault); "
              f"service p50 {report.service_latency_us['p50']:.0f} us max {report.service_latency_us['max']:.0f} us")
    finally:
        await dest.close()
        await held.source.close()
        await stop_testpmd(testpmd)


@needs_testpmd
@pytest.mark.slow
@pytest.mark.asyncio
async def test_back_end_killed_while_running_is_retired(e2e) -> None:
    """testpmd SIGKILLed after its set-up: the client is retired with the reason, the migration completes."""
    image = os.path.join(e2e.workdir, "guest.img")
    guest = build_image(image, 4 * MiB, seed=SEED, packet=False)
    with open(image, "rb") as f:
        source_bytes = f.read()
    sock = os.path.join(e2e.workdir, "vhost.sock")
    testpmd = await start_testpmd(e2e, sock)
    held = HeldSource(image)
    host, port = await held.source.listen("127.0.0.1", 0)
    dest = PostcopyDestination(e2e.options((host, port), block_dir=False, clients=False, vhost_user=(sock,)))
    try:
        await bounded(dest.start(), "testpmd's set-up")
        name = dest._vhost_user[0].name
        testpmd.kill()  # the PID we started
        await testpmd.wait()

        def retired() -> bool:
            return any(c["key"] == name and c["error"] for c in dest.statistics().clients)

        await wait_until(retired, "the dead back-end to be retired")
        held.release()
        report = await bounded(dest.wait_complete(), "the migration to complete without it")
        assert report.complete, report.format()
        (client,) = [c for c in report.clients if c["key"] == name]
        assert "closed by the back-end" in client["error"], client
        assert report.faults_by_client.get(name, 0) >= 4, report.format()  # rings read in SET_VRING_KICK
        got = dest.memory("ram")
        assert_pages(got, expected_untouched(source_bytes, got, guest))
    finally:
        await dest.close()
        await held.source.close()
        if testpmd.returncode is None:
            await stop_testpmd(testpmd)


def userfaultfds(pid: int | str) -> int:
    """How many userfaultfds process ``pid`` holds open."""
    fd_dir = f"/proc/{pid}/fd"
    count = 0
    for name in os.listdir(fd_dir):
        with contextlib.suppress(OSError):
            count += os.readlink(os.path.join(fd_dir, name)) == "anon_inode:[userfaultfd]"
    return count


@needs_testpmd
@pytest.mark.slow
@pytest.mark.asyncio
async def test_an_aborted_migration_lets_go_of_the_back_ends_userfaultfd(e2e) -> None:
    """After an abort the service keeps its copies of the back-end's userfaultfd while it runs (a
    thread waiting for a page stays blocked, never reads zeros); closing the service closes the
    connection and lets them go.  The back-end's own fd is its own: testpmd keeps running."""
    image = os.path.join(e2e.workdir, "guest.img")
    build_image(image, 4 * MiB, seed=SEED, packet=False)
    sock = os.path.join(e2e.workdir, "vhost.sock")
    testpmd = await start_testpmd(e2e, sock)
    held = HeldSource(image)
    host, port = await held.source.listen("127.0.0.1", 0)
    ours_before = userfaultfds("self")
    dest = PostcopyDestination(e2e.options((host, port), block_dir=False, clients=False, vhost_user=(sock,)))
    try:
        await bounded(dest.start(), "testpmd's set-up")
        name = dest._vhost_user[0].name
        assert userfaultfds(testpmd.pid) == 1, "testpmd holds the userfaultfd it registered"
        dest.abort("aborted by the test")
        with pytest.raises(MigrationAborted, match="aborted by the test"):
            await bounded(dest.wait_complete(), "the abort")
        assert userfaultfds("self") > ours_before, "the service kept its copies after the abort"
        assert testpmd.returncode is None and userfaultfds(testpmd.pid) == 1, "testpmd still holds its own"
        await dest.close()
        assert userfaultfds("self") == ours_before, "closed, the service holds no copy of testpmd's fd"
        assert testpmd.returncode is None, f"testpmd exited: {pmd_log(e2e)}"
        assert any(c["key"] == name for c in dest.statistics().clients), dest.statistics().clients
    finally:
        await dest.close()
        await held.source.close()
        await stop_testpmd(testpmd)


@needs_testpmd
@pytest.mark.slow
@pytest.mark.asyncio
async def test_locked_back_end_is_refused(e2e) -> None:
    """testpmd without --no-mlockall fills its mapping before registering: refused, saying so."""
    image = os.path.join(e2e.workdir, "guest.img")
    build_image(image, 4 * MiB, seed=SEED)
    sock = os.path.join(e2e.workdir, "vhost.sock")
    testpmd = await start_testpmd(e2e, sock, mlockall=True)
    held = HeldSource(image)
    host, port = await held.source.listen("127.0.0.1", 0)
    dest = PostcopyDestination(e2e.options((host, port), block_dir=False, clients=False, vhost_user=(sock,)))
    try:
        with pytest.raises(RemoteProtocolError, match="already has .* resident.*mlockall"):
            await bounded(dest.start(), "the refusal")
        # its zeros are in the shared memory now: the migration cannot be trusted and was aborted
        with pytest.raises(MigrationAborted, match="mlockall"):
            await dest.wait_complete()
    finally:
        await dest.close()
        await held.source.close()
        with contextlib.suppress(ProcessLookupError):
            await stop_testpmd(testpmd)


ROGUE = os.path.join(os.path.dirname(__file__), "rogue_vhost.py")


@pytest.mark.asyncio
@pytest.mark.parametrize(("mode", "message"), [
    ("no-pagefault", "lacks protocol feature.*PAGEFAULT"),
    ("out-of-order", "answered GET_PROTOCOL_FEATURES while GET_FEATURES was awaited"),
    ("dies", "closed the connection while POSTCOPY_ADVISE was awaiting its reply"),
])
async def test_misbehaving_back_end_is_refused_clearly(e2e, mode: str, message: str) -> None:
    """No testpmd needed: a scripted back-end lacks PAGEFAULT, answers out of order, or dies."""
    image = os.path.join(e2e.workdir, "guest.img")
    build_image(image, 1 * MiB, seed=SEED)
    sock = os.path.join(e2e.workdir, "rogue.sock")
    rogue = e2e.procs.add(await asyncio.create_subprocess_exec(
        sys.executable, ROGUE, sock, mode, stdout=asyncio.subprocess.PIPE))
    assert (await bounded(rogue.stdout.readline(), "the rogue back-end")).strip() == b"listening"
    held = HeldSource(image)
    host, port = await held.source.listen("127.0.0.1", 0)
    dest = PostcopyDestination(e2e.options((host, port), block_dir=False, clients=False, vhost_user=(sock,)))
    try:
        with pytest.raises(RemoteProtocolError, match=message) as caught:
            await bounded(dest.start(), f"the refusal of a back-end that {mode}")
        assert sock in str(caught.value)
    finally:
        await dest.close()
        await held.source.close()
