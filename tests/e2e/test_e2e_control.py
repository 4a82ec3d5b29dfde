"""The operator's verbs on real migrations: ``status``, ``events``, ``recover``, ``cancel``, ``set``.

Every process is real: a ``source`` process, a ``dest --control PATH`` process
and each verb run as ``python -m aiopostcopy VERB --control PATH``.  Migrations
are slowed with ``dest --max-bandwidth`` so that each verb meets a running one
(the cap holds the background channel; nothing sleeps to make a race likely).
A completed migration's block file, left in the block directory, is checked
page by page against the source's pattern.

The bandwidth test compares bytes received over two windows of wall time; its
bounds are generous (the cap is enforced by the destination's token bucket on
bytes it reads, so only scheduling noise widens them).
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import time
from typing import Any

import pytest

from aiopostcopy.tools.ctl import ControlClient
from e2e_support import PYTHON, TIMEOUT, Processes, bounded, check_block_file, read_listening, spawn, wait_until

MiB = 1 << 20
SEED = 1234
EXIT_CANCELLED = 4  #: documented in docs/control.md and cli.py


class Dest:
    """A ``python -m aiopostcopy dest --control`` process."""

    def __init__(self, proc: asyncio.subprocess.Process, control: str, block_dir: str, json_path: str) -> None:
        self.proc, self.control, self.block_dir, self.json_path = proc, control, block_dir, json_path

    async def exit(self, timeout: float = TIMEOUT) -> int:
        return await bounded(self.proc.wait(), "the destination to exit", timeout)

    def report(self) -> dict[str, Any]:
        with open(self.json_path, encoding="utf-8") as f:
            return json.load(f)

    def bad_pages(self) -> list[str]:
        """Every page of the block file the destination left, against the pattern."""
        return check_block_file(os.path.join(self.block_dir, "ram"), seed=SEED)


async def start_source(procs: Processes, image: str) -> tuple[asyncio.subprocess.Process, tuple[str, int]]:
    """A source process on a fresh port, sending short background runs (16 pages) so the cap is smooth."""
    proc = await spawn(procs, [PYTHON, "-m", "aiopostcopy", "source", "--listen", "127.0.0.1:0", "--run-pages",
                               "16", "--block", f"ram={image}"])
    return proc, await read_listening(proc, proc.stdout)


async def start_dest(e2e, address: tuple[str, int], rate: str, *, clients: bool = False) -> Dest:
    control = os.path.join(e2e.workdir, "control.sock")
    json_path = os.path.join(e2e.workdir, "dest.json")
    proc = await spawn(e2e.procs, [PYTHON, "-m", "aiopostcopy", "dest", "--source", f"{address[0]}:{address[1]}",
                                   "--block-dir", e2e.block_dir, "--control", control, "--max-bandwidth", rate,
                                   "--deadline", "30", "--quiet", "--json", json_path,
                                   *(["--clients", e2e.socket] if clients else [])])
    await wait_until(lambda: os.path.exists(control) or proc.returncode is not None, "the control socket")
    assert proc.returncode is None, f"dest exited with status {proc.returncode}"
    return Dest(proc, control, e2e.block_dir, json_path)


async def verb(procs: Processes, *args: str) -> tuple[int, bytes]:
    """Run ``python -m aiopostcopy ARGS``: (exit status, stdout)."""
    proc = await spawn(procs, [PYTHON, "-m", "aiopostcopy", *args])
    out, _ = await bounded(proc.communicate(), f"aiopostcopy {' '.join(args)}")
    return proc.returncode, out


async def status(procs: Processes, control: str) -> tuple[dict[str, Any], float]:
    """``status --json`` (a process), and when it was taken (the middle of the call)."""
    before = time.monotonic()
    code, out = await verb(procs, "status", "--control", control, "--json")
    after = time.monotonic()
    assert code == 0, out
    return json.loads(out), (before + after) / 2


async def received_over(procs: Processes, control: str, seconds: float) -> tuple[int, float]:
    """Bytes the destination received over about ``seconds`` of wall time: (bytes, seconds)."""
    first, t0 = await status(procs, control)
    await asyncio.sleep(seconds)
    second, t1 = await status(procs, control)
    assert second["state"] == "running", "the migration ended inside the window: nothing was measured"
    return second["bytes_received"] - first["bytes_received"], t1 - t0


def subscribers(path: str) -> int:
    """Connections accepted on the Unix socket ``path`` (from /proc/net/unix)."""
    with open("/proc/net/unix", encoding="utf-8") as f:
        return sum(1 for line in f if line.split()[-1] == path and line.split()[5] == "03")


class EventReader:
    """An ``events`` process whose JSON lines are collected as they come."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.events: list[dict[str, Any]] = []
        self.task = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        while line := await self.proc.stdout.readline():
            self.events.append(json.loads(line))

    def kinds(self) -> list[str]:
        return [e["event"] for e in self.events]

    async def wait_for(self, kind: str) -> dict[str, Any]:
        await wait_until(lambda: kind in self.kinds(), f"a {kind} event")
        return next(e for e in self.events if e["event"] == kind)

    async def end(self) -> int:
        await bounded(self.task, "the events stream to end")
        return await bounded(self.proc.wait(), "the events process to exit")


@pytest.mark.asyncio
async def test_status_during_the_run_and_set_max_bandwidth_slows_the_background(e2e) -> None:
    image = e2e.image(16 * MiB, seed=SEED)
    source, address = await start_source(e2e.procs, image)
    dest = await start_dest(e2e, address, "2M")
    assert stat.S_IMODE(os.stat(dest.control).st_mode) == 0o600, "the control socket is owner-only"

    running, _ = await status(e2e.procs, dest.control)
    assert running["state"] == "running" and running["pages_total"] == 4096
    assert 0 <= running["pages_done"] < running["pages_total"]
    assert running["max_bandwidth"] == 2_000_000 and running["source"] == f"{address[0]}:{address[1]}"
    assert running["source_connected"] is True and running["outages"] == 0
    for key in ("pages_by_kind", "bytes_received", "rate_bytes_per_s", "remaining_s", "service_latency_us",
                "blocked_by_client_s", "blocked_threads", "resumes", "session_id"):
        assert key in running, key
    code, text = await verb(e2e.procs, "status", "--control", dest.control)
    assert code == 0 and b"running:" in text and b"pages" in text

    fast, fast_s = await received_over(e2e.procs, dest.control, 1.5)
    code, _ = await verb(e2e.procs, "set", "--control", dest.control, "--max-bandwidth", "200k")
    assert code == 0
    capped, _ = await status(e2e.procs, dest.control)
    assert capped["max_bandwidth"] == 200_000
    slow, slow_s = await received_over(e2e.procs, dest.control, 1.5)

    code, _ = await verb(e2e.procs, "set", "--control", dest.control, "--max-bandwidth", "0")  # no cap: finish
    assert code == 0
    assert await dest.exit() == 0
    report = dest.report()
    await bounded(source.wait(), "the source to exit")

    slack = 256 * 1024  # the bucket's burst and one background run in flight
    assert 0 < fast <= 2_000_000 * fast_s * 1.5 + slack, (fast, fast_s)
    assert slow <= 200_000 * slow_s * 1.5 + slack, (slow, slow_s)
    assert slow < fast / 3, f"200k cap: {slow} bytes in {slow_s:.2f} s; 2M cap: {fast} bytes in {fast_s:.2f} s"
    assert report["complete"] and report["verified"], report
    assert dest.bad_pages() == []


@pytest.mark.asyncio
async def test_events_see_a_source_loss_and_recover_resumes_from_a_source_on_another_port(e2e) -> None:
    image = e2e.image(16 * MiB, seed=SEED)
    first, first_address = await start_source(e2e.procs, image)
    dest = await start_dest(e2e, first_address, "2M", clients=True)
    reader = EventReader(await spawn(e2e.procs, [PYTHON, "-m", "aiopostcopy", "events", "--control", dest.control]))
    await wait_until(lambda: subscribers(dest.control) >= 1, "the events subscription")
    worker = await e2e.worker(threads=2, touches=50, seed=SEED, name="ops-worker")
    joined = await reader.wait_for("client_joined")
    rogue = await e2e.rogue("table-past-block")
    retired = await reader.wait_for("client_retired")
    async with ControlClient(dest.control) as client:
        await wait_until_done(client, 512)
        first.kill()
        await first.wait()
        lost = await reader.wait_for("source_lost")
        paused = await client.status()
        second, second_address = await start_source(e2e.procs, image)
        assert second_address != first_address
        code, _ = await verb(e2e.procs, "recover", "--control", dest.control, "--source",
                             f"{second_address[0]}:{second_address[1]}")
        assert code == 0
        regained = await reader.wait_for("source_regained")
        resumed = await client.status()
        await client.set_max_bandwidth(None)
    assert await dest.exit() == 0
    assert await reader.end() == 0
    await bounded(second.wait(), "the second source to exit")
    report = dest.report()
    result = await worker.result()

    assert joined["pid"] == worker.pid and joined["mode"] == "delegated"
    assert rogue["exit"] == 0 and retired["key"] != joined["key"] and "past" in retired["error"], (rogue, retired)
    assert result["exit"] == 0 and result.get("ok") and result.get("bad_page_count") == 0, result

    assert lost["source"] == f"{first_address[0]}:{first_address[1]}"
    assert regained["source"] == f"{second_address[0]}:{second_address[1]}" and regained["outage_s"] >= 0
    assert paused["state"] == "source_lost" and not paused["source_connected"] and paused["outages"] == 1
    assert paused["pages_done"] < paused["pages_total"], "the migration ended before the loss: nothing was tested"
    assert resumed["source"] == regained["source"] and resumed["outages"] == 1
    kinds = reader.kinds()
    assert kinds.index("source_lost") < kinds.index("source_regained") < kinds.index("complete") == len(kinds) - 1
    assert reader.events[-1]["verified"] is True
    assert report["complete"] and report["verified"] and report["resumes"] >= 1, report
    assert dest.bad_pages() == []


async def wait_until_done(client: ControlClient, pages: int) -> None:
    deadline = time.monotonic() + TIMEOUT
    while (await client.status())["pages_done"] < pages:
        assert time.monotonic() < deadline, f"fewer than {pages} pages arrived"
        await asyncio.sleep(0.05)


@pytest.mark.asyncio
async def test_cancel_ends_dest_with_its_exit_status_and_a_json_report(e2e) -> None:
    image = e2e.image(16 * MiB, seed=SEED)
    source, address = await start_source(e2e.procs, image)
    dest = await start_dest(e2e, address, "1M")
    async with ControlClient(dest.control) as client:
        await wait_until_done(client, 64)
    missing = os.path.join(e2e.workdir, "nothing.sock")
    code, _ = await verb(e2e.procs, "status", "--control", missing)
    assert code == 3, "an unreachable control socket has its own exit status"
    watch = await spawn(e2e.procs, [PYTHON, "-m", "aiopostcopy", "status", "--control", dest.control, "--watch",
                                    "--json", "--interval", "0.2"])
    first_sample = json.loads(await bounded(watch.stdout.readline(), "a first --watch sample"))
    code, _ = await verb(e2e.procs, "cancel", "--control", dest.control, "--reason", "operator test")
    assert code == 0
    assert await dest.exit() == EXIT_CANCELLED
    watched, _ = await bounded(watch.communicate(), "status --watch to end")
    last_sample = json.loads(watched.splitlines()[-1])
    await bounded(source.wait(), "the source to exit after the cancel")
    report = dest.report()
    assert report["ok"] is False and report["exit_code"] == EXIT_CANCELLED and report["state"] == "cancelled"
    assert "operator test" in report["error"] and report["aborted"] == "operator test"
    assert 64 <= report["pages_done"] < report["pages_total"] == 4096
    assert not os.path.exists(dest.control), "the control socket is removed on exit"
    assert first_sample["state"] == "running" and watch.returncode == 1, (first_sample["state"], watch.returncode)
    assert last_sample.get("state") == "cancelled" or (last_sample.get("event") == "failed"
                                                       and last_sample["cancelled"] is True), last_sample


@pytest.mark.asyncio
async def test_the_library_api_recovers_from_a_live_source_to_another(e2e) -> None:
    """The same verbs in process, typed: recover while the old source still serves (its channels are
    dropped, as after a loss), events as OperatorEvent, and recover refused once the migration is over."""
    from aiopostcopy.errors import ClosedError
    from aiopostcopy.loop import PostcopyDestination
    from e2e_support import check_destination

    image = e2e.image(16 * MiB, seed=SEED)
    first, first_address = await start_source(e2e.procs, image)
    second, second_address = await start_source(e2e.procs, image)
    async with PostcopyDestination(e2e.options(first_address, clients=False, max_bandwidth=2_000_000)) as dest:
        events = dest.events()
        assert dest.max_bandwidth == 2_000_000 and dest.state == "running"
        await wait_until(lambda: dest.status().pages_done >= 256, "some pages from the first source")
        dest.recover(second_address)
        seen = []
        async for event in events:
            seen.append(event)
            if event.kind == "source_regained":
                dest.set_max_bandwidth(None)
        report = await bounded(dest.wait_complete(), "the migration from the second source")
        final = dest.status()
        problems = check_destination(dest, seed=SEED)
        with pytest.raises(ClosedError):
            dest.recover(first_address)
        dest.cancel()  # over already: nothing to cancel, nothing changes
        assert dest.state == "complete"
    first.kill()
    await first.wait()
    await bounded(second.wait(), "the second source to exit")

    kinds = [event.kind for event in seen]
    assert kinds == ["source_lost", "source_regained", "complete"], kinds
    assert "recover" in seen[0].fields["error"] and seen[1].fields["source"] == f"{second_address[0]}:{second_address[1]}"
    assert final.state == "complete" and final.remaining_s == 0.0 and final.outages == 1
    assert final.max_bandwidth is None and final.source == seen[1].fields["source"]
    assert report.complete and report.resumes >= 1 and problems == {}
