"""Soak: one long migration under clients, link cuts and source restarts; every byte checked.

Theory of operation
-------------------
A ``--size`` MiB pattern image is served by ``python -m aiopostcopy source``; the
destination (``python -m aiopostcopy dest`` with a block directory and a client
socket) reaches it through a TCP proxy in this process that forwards at most
``--rate`` bytes per second per connection, so the migration lasts about
``--minutes``.  While it runs:

* every ``--client-every`` seconds a new ``aiopostcopy.tools.workload`` client joins
  (delegated and self-served alternating) and touches random pages; each checks
  every page it touches and, at the end, every page of the block;
* at random times (about every ``--event-every`` seconds) the proxy cuts every
  connection (a broken link), or the source is killed with SIGKILL and started
  again on another port (the proxy then forwards there): the destination
  reconnects and resumes, the new source serves the rest;
* every 10 s from 20 s on, the destination's open fds and anonymous memory (RssAnon) are sampled.

At the end the destination must exit 0 with a verified report, every client
must report every page right, and the block file must equal the image byte for
byte.  It prints the counts, the fd and memory samples (first, last, max) and a
verdict line; the exit status is 0 only if everything held.  Traffic stays on
127.0.0.1; every process started is ended by PID; the work directory in
/dev/shm is removed.

Run::

    .venv/bin/python benchmarks/soak.py --minutes 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time

from aiopostcopy.tools.pattern import fill

PAGE = 4096


class Proxy:
    """Forwards 127.0.0.1:port to the current source, rate-limited, and can cut every connection."""

    def __init__(self, rate: float) -> None:
        self.rate, self.target = rate, ("127.0.0.1", 0)
        self.cuts, self.writers = 0, set()
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self.writers |= {writer, up_writer}
        await asyncio.gather(self._pump(reader, up_writer, None), self._pump(up_reader, writer, self.rate),
                             return_exceptions=True)
        for w in (writer, up_writer):
            self.writers.discard(w)
            w.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, rate: float | None) -> None:
        started, sent = time.monotonic(), 0
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
            sent += len(data)
            if rate:
                ahead = sent / rate - (time.monotonic() - started)
                if ahead > 0:
                    await asyncio.sleep(ahead)
        writer.close()

    def cut(self) -> None:
        self.cuts += 1
        for writer in list(self.writers):
            writer.transport.abort()


async def start_source(image: str, python: str) -> tuple[asyncio.subprocess.Process, int]:
    proc = await asyncio.create_subprocess_exec(
        python, "-m", "aiopostcopy", "source", "--listen", "127.0.0.1:0", "--block", f"ram={image}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, stdin=asyncio.subprocess.DEVNULL)
    line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
    return proc, int(line.rsplit(":", 1)[1])


def sample(pid: int) -> tuple[int, int]:
    """(open fds, RssAnon in KiB) of a process."""
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    with open(f"/proc/{pid}/status", encoding="utf-8") as f:
        anon = next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))
    return fds, anon


async def soak(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    work = tempfile.mkdtemp(prefix="apc-soak-", dir="/dev/shm")
    procs: list[asyncio.subprocess.Process] = []
    try:
        image = os.path.join(work, "ram.img")
        with open(image, "wb") as f:
            f.truncate(args.size << 20)
        import mmap
        with open(image, "r+b") as f, mmap.mmap(f.fileno(), args.size << 20) as memory:
            fill(memory, 0, PAGE, args.seed, assume_zeroed=True)
        proxy = Proxy(args.rate)
        port = await proxy.start()
        source, source_port = await start_source(image, sys.executable)
        procs.append(source)
        proxy.target = ("127.0.0.1", source_port)
        block_dir, sock = os.path.join(work, "dest"), os.path.join(work, "clients.sock")
        os.mkdir(block_dir)
        report_path = os.path.join(work, "dest.json")
        dest = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "aiopostcopy", "dest", "--source", f"127.0.0.1:{port}", "--block-dir", block_dir,
            "--clients", sock, "--deadline", "120", "--quiet", "--json", report_path,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        procs.append(dest)
        started = time.monotonic()
        workers, samples, restarts = [], [], 0
        next_client = next_event = next_sample = started
        while dest.returncode is None:
            now = time.monotonic()
            if now >= next_sample:
                next_sample = now + 10
                if now - started >= 20:  # after start-up: growth is what matters
                    samples.append(sample(dest.pid))
            if now >= next_client and os.path.exists(sock):
                next_client = now + args.client_every
                mode = ("delegated", "self-served")[len(workers) % 2]
                worker = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "aiopostcopy.tools.workload", "--socket", sock, "--mode", mode,
                    "--threads", "2", "--touches", str(args.touches), "--seed", str(args.seed),
                    "--slot-base", str(2 * len(workers)),  # each thread its own random order
                    "--name", f"soak-{len(workers)}", "--timeout", str(args.minutes * 60 * 3), "--json", "-",
                    stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
                procs.append(worker)
                workers.append(worker)
            if now >= next_event and now > started + 5:
                next_event = now + rng.expovariate(1 / args.event_every)
                if rng.random() < 0.5:
                    proxy.cut()
                else:
                    source.kill()
                    await source.wait()
                    source, source_port = await start_source(image, sys.executable)
                    procs.append(source)
                    proxy.target = ("127.0.0.1", source_port)
                    proxy.cut()
                    restarts += 1
            try:
                await asyncio.wait_for(dest.wait(), 1.0)
            except asyncio.TimeoutError:
                pass
        duration = time.monotonic() - started
        dest_err = (await dest.stderr.read()).decode(errors="replace")
        results = []
        for worker in workers:
            out, _ = await asyncio.wait_for(worker.communicate(), 120)
            text = out.decode().strip()
            results.append(json.loads(text[text.index("{"):]) if "{" in text else {"ok": False, "raw": text})
            results[-1]["exit"] = worker.returncode
        with open(report_path, encoding="utf-8") as f:
            report = json.load(f)
        wrong = compare(image, os.path.join(block_dir, "ram"))
        bad_clients = [r for r in results if r["exit"] != 0 or not r.get("ok") or r.get("bad_page_count")]
        fds, anon = [s[0] for s in samples] or [0], [s[1] for s in samples] or [0]
        print(f"soak: {duration:.0f} s, {args.size} MiB, {len(workers)} clients, {proxy.cuts} link cuts "
              f"({restarts} with a source restart), dest resumes {report.get('resumes')}, "
              f"faults {report.get('faults')}, client requests {report.get('client_requests')}")
        print(f"  dest fds: first {fds[0]}, last {fds[-1]}, max {max(fds)} (each client holds its control socket, "
              f"and a delegated one its userfaultfd, until End); RssAnon KiB: first {anon[0]}, last {anon[-1]}, "
              f"max {max(anon)} ({len(samples)} samples)")
        print(f"  dest exit {dest.returncode}, verified {report.get('verified')}; wrong pages in the block file: "
              f"{wrong}; clients with a bad page or failure: {len(bad_clients)}")
        ok = dest.returncode == 0 and report.get("verified") and wrong == 0 and not bad_clients
        if not ok:
            print(dest_err[-3000:])
            for r in bad_clients[:3]:
                print(json.dumps(r)[:1000])
        print("verdict:", "every page right" if ok else "FAILED")
        return 0 if ok else 1
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        shutil.rmtree(work, ignore_errors=True)


def compare(image: str, block: str) -> int:
    """Pages of ``block`` that differ from ``image`` (every page missing if there is no file)."""
    if not os.path.exists(block):
        return os.path.getsize(image) // PAGE
    wrong = 0
    with open(image, "rb") as a, open(block, "rb") as b:
        while chunk := a.read(PAGE * 256):
            other = b.read(len(chunk))
            for at in range(0, len(chunk), PAGE):
                wrong += chunk[at:at + PAGE] != other[at:at + PAGE]
    return wrong


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="about how long the migration lasts")
    parser.add_argument("--size", type=int, default=1024, help="image MiB")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--client-every", type=float, default=30.0, help="seconds between new clients")
    parser.add_argument("--touches", type=int, default=300, help="page touches per client thread")
    parser.add_argument("--event-every", type=float, default=20.0, help="mean seconds between link cuts/restarts")
    args = parser.parse_args(argv)
    # the proxy's rate that makes the non-zero part of the image last --minutes (zero pages travel as markers)
    args.rate = (args.size << 20) * 6 / 7 / (args.minutes * 60)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    return asyncio.run(soak(args))


if __name__ == "__main__":
    sys.exit(main())
