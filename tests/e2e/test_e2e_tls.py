"""TLS with mutual authentication, and the source's bandwidth cap, on real migrations.

Every source is a ``python -m aiopostcopy source`` process on loopback TCP;
destinations are ``dest`` processes (their exit status and one-line message
are what an operator sees) or, where clients fault, the service in this test
process.  Certificates are made for each test with the ``openssl`` command
(tls_support.py): a CA with a source and a destination certificate, and for
the refusals a second CA.  Every completed migration is checked page by page
against the source's pattern.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import pytest

from aiopostcopy.loop import PostcopyDestination
from aiopostcopy.transport.tls import TlsConfig
from e2e_support import (PYTHON, TIMEOUT, SourceProcess, blocked_somewhere, bounded, check_destination,
                         check_block_file, parse_json_output, read_listening, source_argv, spawn, wait_until)
from tls_support import Pki, make_pki, needs_openssl

pytestmark = needs_openssl

MiB = 1 << 20
SEED = 4242
EXIT_TLS = 5  #: documented in README.md and cli.py
EXIT_UNREACHABLE = 3


class LoggedSource(SourceProcess):
    """A source process whose stderr (its log) is kept for the test to read."""

    def __init__(self, proc: asyncio.subprocess.Process, address: tuple[str, int]) -> None:
        super().__init__(proc, address)
        self.log: list[str] = []
        self._task = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        while line := await self.proc.stderr.readline():
            self.log.append(line.decode(errors="replace"))

    def lines(self, text: str) -> list[str]:
        return [line for line in self.log if text in line]


async def start_source(e2e: Any, image: str, *extra: str) -> LoggedSource:
    proc = await spawn(e2e.procs, [*source_argv({"ram": image}), *extra], stderr=asyncio.subprocess.PIPE)
    address = await read_listening(proc, proc.stderr)
    source = LoggedSource(proc, address)
    e2e.procs.closers.append(source._task.cancel)
    return source


async def run_dest(e2e: Any, address: tuple[str, int], *extra: str) -> tuple[int, str, float]:
    """A ``dest`` process into the test's block dir: (exit status, its log, seconds it ran)."""
    began = time.monotonic()
    proc = await spawn(e2e.procs, [PYTHON, "-m", "aiopostcopy", "dest", "--source", f"{address[0]}:{address[1]}",
                                   "--block-dir", e2e.block_dir, "--deadline", "30", "--quiet", *extra],
                       stderr=asyncio.subprocess.PIPE)
    _, err = await bounded(proc.communicate(), "the destination process")
    return proc.returncode, err.decode(errors="replace"), time.monotonic() - began


def bad_pages(block_dir: str) -> list[str]:
    """Every page of the block file a destination left, against the pattern."""
    return check_block_file(os.path.join(block_dir, "ram"), seed=SEED)


def error_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if " ERROR " in line]


async def source_result(source: SourceProcess) -> dict[str, Any]:
    out = await asyncio.wait_for(source.proc.stdout.read(), TIMEOUT)
    result = parse_json_output(out)
    result["exit"] = await asyncio.wait_for(source.proc.wait(), TIMEOUT)
    return result


@pytest.fixture
def pki(e2e: Any) -> Pki:
    return make_pki(e2e.workdir)


@pytest.mark.asyncio
async def test_tls_migration_with_faulting_clients(e2e: Any, pki: Pki) -> None:
    """Both channels over TLS: clients block on missing pages, the urgent replies and the sweep
    come through TLS, and every page is right."""
    size = 16 * MiB
    source = await start_source(e2e, e2e.image(size, seed=SEED), *pki.options("source"))
    tls = TlsConfig(cert=pki.cert("dest"), key=pki.key("dest"), ca=pki.ca).client_context()
    async with PostcopyDestination(e2e.options(source.address, tls=tls)) as dest:
        source.stop()
        workers = [await e2e.worker(mode=mode, threads=2, touches=100, seed=SEED, name=f"tls-{mode}")
                   for mode in ("delegated", "self-served")]
        await wait_until(lambda: blocked_somewhere(dest) >= 2, "the clients blocked on missing pages")
        # the request lane cannot write under TLS; the session's Requests are remembered for the
        # reply lane, which places their answers from the decrypted bytes
        assert dest._source.urgent_fd() == -1
        remembered = dest._lane is None or bool(dest._lane_keys)
        source.cont()
        report = await bounded(dest.wait_complete(), "the migration over TLS")
        results = [await w.result() for w in workers]
        problems = check_destination(dest, seed=SEED)
    source_report = await source_result(source)

    assert report.complete and report.pages_placed == report.pages_total == size // 4096, report.format()
    assert problems == {}
    for result in results:
        assert result["exit"] == 0 and result.get("bad_page_count") == 0, result
    assert report.pages_demand > 0, "no page came on demand: the urgent channel over TLS was not exercised"
    assert remembered, "no requested page was remembered for the reply lane"
    assert source_report["exit"] == 0 and source_report["complete"] and source_report["tls"], source_report


@pytest.mark.asyncio
async def test_tls_source_refuses_wrong_certificates_and_serves_the_right_one(e2e: Any, pki: Pki) -> None:
    """A destination whose certificate another CA signed, then one without TLS, are refused with
    one clear line on each side; the source goes on and serves a good destination to the end."""
    other = make_pki(e2e.workdir, "other-ca")
    source = await start_source(e2e, e2e.image(8 * MiB, seed=SEED), *pki.options("source"))

    wrong = ["--tls-cert", other.cert("dest"), "--tls-key", other.key("dest"), "--tls-ca", pki.ca]
    code, log, _ = await run_dest(e2e, source.address, *wrong)
    assert code == EXIT_TLS, log
    [line] = error_lines(log)
    assert "TLS handshake with the source at" in line and "unknown ca" in line, line
    await wait_until(lambda: source.lines("TLS handshake failed"), "the source's refusal line")
    [refusal] = source.lines("refused")
    assert "127.0.0.1:" in refusal and "certificate verify failed" in refusal, refusal

    code, log, _ = await run_dest(e2e, source.address)
    assert code == EXIT_UNREACHABLE, log
    [line] = error_lines(log)
    assert "this source requires TLS" in line, line
    await wait_until(lambda: source.lines("did not open a TLS handshake"), "the source's line for a plain peer")

    code, log, _ = await run_dest(e2e, source.address, *pki.options("dest"))
    assert code == 0, log
    assert bad_pages(e2e.block_dir) == []
    result = await source_result(source)
    assert result["exit"] == 0 and result["complete"], result


@pytest.mark.asyncio
async def test_dest_checks_the_source_certificate(e2e: Any, pki: Pki) -> None:
    """The destination refuses a source whose certificate another CA signed, or whose name is not
    the one asked for; a TLS destination against a plain source says the source does not speak TLS."""
    other = make_pki(e2e.workdir, "other-ca")
    image = e2e.image(4 * MiB, seed=SEED)
    source = await start_source(e2e, image, *other.options("source"))
    code, log, _ = await run_dest(e2e, source.address, *pki.options("dest"))
    assert code == EXIT_TLS, log
    [line] = error_lines(log)
    assert "certificate verify failed" in line, line

    source.kill()
    source = await start_source(e2e, image, *pki.options("source"))
    code, log, _ = await run_dest(e2e, source.address, *pki.options("dest"), "--tls-server-name", "elsewhere.example")
    assert code == EXIT_TLS, log
    assert "Hostname mismatch" in error_lines(log)[0], log

    source.kill()
    source = await start_source(e2e, image)
    code, log, _ = await run_dest(e2e, source.address, *pki.options("dest"))
    assert code == EXIT_TLS, log
    [line] = error_lines(log)
    assert "does not speak TLS" in line, line
    await wait_until(lambda: source.lines("this source does not use TLS"), "the plain source's line")
    assert os.listdir(e2e.block_dir) == [], "a refused destination left a block file"


@pytest.mark.asyncio
async def test_source_max_bandwidth_caps_the_sweep(e2e: Any) -> None:
    """``source --max-bandwidth 8M``: a 16 MiB image (about 14.4 MB of data pages) takes at least
    about its size over the cap, and every page is right.  A lower bound only: this is behaviour."""
    source = await start_source(e2e, e2e.image(16 * MiB, seed=SEED), "--max-bandwidth", "8M")
    code, log, seconds = await run_dest(e2e, source.address)
    assert code == 0, log
    assert seconds >= 1.2, f"16 MiB at 8 MB/s arrived in {seconds:.2f} s: the cap did not hold"
    assert bad_pages(e2e.block_dir) == []
    result = await source_result(source)
    assert result["exit"] == 0 and result["complete"], result
