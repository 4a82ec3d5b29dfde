"""A destination killed mid-migration, started again with the same arguments, finishes the job.

Real processes: ``python -m aiopostcopy source``, ``python -m aiopostcopy dest`` and a
delegated ``aiopostcopy.tools.workload`` client whose threads are blocked on missing pages
when the destination dies (SIGKILL: no clean-up runs).  The block directory then holds
``ram.partial`` (with the pages placed so far) and the session id; a stale control socket
is left behind.  The second destination replaces the stale socket, adopts the partial file,
resumes the source's session, and the client joins it again on its own: its threads go on
with the right bytes, it verifies every page, and the final block file equals the image.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal

import pytest

from e2e_support import PYTHON, bounded, threads_in_userfault, wait_until

MiB = 1 << 20


def _data_bytes(path: str) -> int:
    """Bytes of ``path`` that hold pages (SEEK_DATA), without touching its memory."""
    total, position = 0, 0
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return 0
    try:
        size = os.fstat(fd).st_size
        while position < size:
            try:
                start = os.lseek(fd, position, os.SEEK_DATA)
            except OSError:
                break
            stop = os.lseek(fd, start, os.SEEK_HOLE)
            total, position = total + stop - start, stop
    finally:
        os.close(fd)
    return total


async def _start_dest(e2e, address: tuple[str, int], json_path: str) -> asyncio.subprocess.Process:
    argv = [PYTHON, "-m", "aiopostcopy", "dest", "--source", f"{address[0]}:{address[1]}",
            "--block-dir", e2e.block_dir, "--clients", e2e.socket, "--deadline", "60", "--quiet",
            "--json", json_path]
    proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    return e2e.procs.add(proc)


@pytest.mark.asyncio
async def test_a_destination_killed_mid_migration_is_started_again_and_completes(e2e) -> None:
    seed, size = 1301, 128 * MiB
    image = e2e.image(size, seed=seed)
    source = await e2e.source({"ram": image}, window=64 << 10)  # a slow sweep: the client rejoins in time
    partial = os.path.join(e2e.block_dir, "ram.partial")

    first = await _start_dest(e2e, source.address, os.path.join(e2e.workdir, "first.json"))
    await wait_until(lambda: _data_bytes(partial) > 0, "the first pages landed", timeout=30)
    os.kill(source.pid, signal.SIGSTOP)  # hold the migration part-way
    placed_before = _data_bytes(partial)
    assert 0 < placed_before < size, placed_before
    worker = await e2e.worker(mode="delegated", threads=2, touches=200, seed=seed, name="survivor")
    await wait_until(lambda: threads_in_userfault(worker.pid), "the client's threads blocked on missing pages")

    first.kill()  # SIGKILL: the destination dies with pages missing and threads waiting
    await first.wait()
    assert os.path.exists(partial) and not os.path.exists(os.path.join(e2e.block_dir, "ram"))
    assert os.path.exists(e2e.socket), "the dead service's socket is left behind"
    assert threads_in_userfault(worker.pid), "the client's threads stay blocked, never fed zeros"

    report_path = os.path.join(e2e.workdir, "second.json")
    second = await _start_dest(e2e, source.address, report_path)
    os.kill(source.pid, signal.SIGCONT)
    _, err = await bounded(second.communicate(), "the restarted destination")
    stderr = err.decode(errors="replace")
    assert second.returncode == 0, stderr
    assert "adopted the partial blocks" in stderr, stderr
    result = await worker.result()
    await source.report()

    with open(report_path, encoding="utf-8") as f:
        report = json.load(f)
    assert report["complete"] and report["verified"], report
    assert report["pages_adopted"] * 4096 >= placed_before, (report["pages_adopted"], placed_before)
    assert result["exit"] == 0 and result.get("ok") and result.get("end_complete"), json.dumps(result)[:3000]
    assert result.get("bad_page_count") == 0, result.get("bad_pages")
    assert result["client"]["rejoins"] == 1, result["client"]  # it joined the restarted service
    final = os.path.join(e2e.block_dir, "ram")
    assert not os.path.exists(partial) and os.path.exists(final)
    with open(image, "rb") as want, open(final, "rb") as got:
        page = 0
        while chunk := want.read(1 * MiB):
            assert got.read(len(chunk)) == chunk, f"block file differs in the MiB from page {page}"
            page += len(chunk) // 4096
    assert not os.path.exists(os.path.join(e2e.block_dir, ".aiopostcopy-session"))
