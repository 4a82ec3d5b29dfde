"""Soak: one long migration under client faults, link cuts and source restarts; every byte checked.

Theory of operation
-------------------
A ``--size`` MiB pattern image is served by ``python -m aiopostcopy source``; the
destination (``python -m aiopostcopy dest`` with a block directory and a client
socket) reaches it through a TCP proxy in this process that forwards at most
``--rate`` bytes per second per connection, so the migration lasts about
``--minutes``.  While it runs, three things happen at random times, each from
its own seeded random stream (``--seed``), independently of the others:

* **resident clients**: ``--clients`` ``aiopostcopy.tools.workload`` processes
  (delegated and self-served alternating) join at the start, fault on random
  pages, stay until End and then check every page of the block;
* **transient clients**: about every ``--client-every`` seconds another one
  joins, faults on random pages and is killed with SIGKILL after a random
  lifetime (up to ``--client-life`` s; often while a thread of it waits for a
  page), so the service keeps taking clients and retiring dead ones;
* **link cuts and source restarts**: about every ``--event-every`` seconds
  (exponential gaps) either the proxy cuts every connection (a broken link)
  or the source is killed with SIGKILL and started again on another port (the
  proxy then forwards there): the destination reconnects and resumes, and the
  new source serves the rest.

**Leaks.** The destination's descriptors (``/proc/PID/fd``, by kind: sockets,
userfaultfds, the rest) and anonymous memory (``RssAnon``) are sampled at
*quiet points*: every ``--sample-every`` seconds after ``--warmup``, at a
moment when no transient client is alive (the last one was killed and
retired, the next not started), so every sample sees the same client
population (the residents).  Growth is the last sample minus
the first.  Sockets are also the migration's two channels, so a sample taken
during a reconnection may be one or two off either way; everything else must
not move.  Memory may grow by at most ``--rss-slack`` KiB (allocator noise).

At the end the destination must exit 0 with a verified report, every resident
client must report every page right, the block file must equal the image byte
for byte, and nothing may have grown.  The summary names the duration, the
counts (clients, faults, cuts, restarts, resumes), the wrong pages, and the fd
and memory figures at the first and the last quiet point; the exit status is 0
only if everything held.  Traffic stays on 127.0.0.1; every process started is
ended by PID; the work directory in /dev/shm is removed.

Run::

    .venv/bin/python benchmarks/soak.py --minutes 10
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import mmap
import os
import random
import shutil
import signal
import sys
import tempfile
import time

from aiopostcopy.tools.pattern import fill

PAGE = 4096
RETIRE_WAIT = 0.5  #: seconds for the service to see a killed client's socket close before a sample
SOCKET_JITTER = 2  #: the two migration channels may be mid-reconnection at a sample


class Proxy:
    """Forwards 127.0.0.1:port to the current source, rate-limited, and can cut every connection."""

    def __init__(self, rate: float) -> None:
        self.rate, self.target = rate, ("127.0.0.1", 0)
        self.writers: set[asyncio.StreamWriter] = set()
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
        for writer in list(self.writers):
            writer.transport.abort()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        self.cut()


@dataclasses.dataclass(frozen=True)
class Sample:
    """The destination's descriptors by kind and its anonymous memory at one quiet point."""

    at_s: float
    fds: int
    sockets: int
    userfaultfds: int
    rss_anon_kib: int

    @property
    def other(self) -> int:
        return self.fds - self.sockets - self.userfaultfds

    def describe(self) -> str:
        return (f"{self.fds} fds ({self.sockets} sockets, {self.userfaultfds} userfaultfds, {self.other} other), "
                f"RssAnon {self.rss_anon_kib} KiB at {self.at_s:.0f} s")


def sample(pid: int, at_s: float) -> Sample:
    """Read /proc/PID/fd and /proc/PID/status."""
    kinds = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            kinds.append(os.readlink(f"/proc/{pid}/fd/{name}"))
        except OSError:  # closed while we looked
            pass
    with open(f"/proc/{pid}/status", encoding="utf-8") as f:
        anon = next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))
    return Sample(at_s=at_s, fds=len(kinds), sockets=sum(k.startswith("socket:") for k in kinds),
                  userfaultfds=sum("userfaultfd" in k for k in kinds), rss_anon_kib=anon)


class Soak:
    """One run: the processes, the proxy, the random events and what they did."""

    def __init__(self, args: argparse.Namespace, work: str) -> None:
        self.args, self.work = args, work
        self.image = os.path.join(work, "ram.img")
        self.block_dir, self.sock = os.path.join(work, "dest"), os.path.join(work, "clients.sock")
        self.report_path = os.path.join(work, "dest.json")
        self.proxy = Proxy(args.rate)
        self.procs: list[asyncio.subprocess.Process] = []
        self.residents: list[asyncio.subprocess.Process] = []
        self.source: asyncio.subprocess.Process | None = None
        self.dest: asyncio.subprocess.Process | None = None
        self.cuts = self.restarts = self.transients = 0
        self.samples: list[Sample] = []
        self.quiet = asyncio.Event()  #: set while no transient client is alive
        self.quiet.set()
        self.started = 0.0

    # -- processes -------------------------------------------------------------

    async def spawn(self, *argv: str, stdout: int | None = None, stderr: int | None = None) -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, *argv, stdin=asyncio.subprocess.DEVNULL,
            stdout=stdout if stdout is not None else asyncio.subprocess.DEVNULL,
            stderr=stderr if stderr is not None else asyncio.subprocess.DEVNULL)
        self.procs.append(proc)
        return proc

    async def start_source(self) -> None:
        self.source = await self.spawn("-m", "aiopostcopy", "source", "--listen", "127.0.0.1:0",
                                       "--block", f"ram={self.image}", stdout=asyncio.subprocess.PIPE)
        line = (await asyncio.wait_for(self.source.stdout.readline(), 30)).decode()
        self.proxy.target = ("127.0.0.1", int(line.rsplit(":", 1)[1]))

    async def start_dest(self, port: int) -> None:
        os.mkdir(self.block_dir)
        self.dest = await self.spawn(
            "-m", "aiopostcopy", "dest", "--source", f"127.0.0.1:{port}", "--block-dir", self.block_dir,
            "--clients", self.sock, "--deadline", "120", "--quiet", "--json", self.report_path,
            stderr=asyncio.subprocess.PIPE)

    async def worker(self, index: int, *, timeout: float) -> asyncio.subprocess.Process:
        mode = ("delegated", "self-served")[index % 2]
        return await self.spawn(
            "-m", "aiopostcopy.tools.workload", "--socket", self.sock, "--mode", mode, "--threads", "2",
            "--touches", str(self.args.touches), "--seed", str(self.args.seed), "--name", f"soak-{index}",
            "--timeout", str(timeout), "--json", "-", "--wait-socket", "30", stdout=asyncio.subprocess.PIPE)

    # -- the random events -------------------------------------------------------

    async def faults_on_the_link(self, rng: random.Random) -> None:
        """Link cuts and source restarts at random times, for the whole run."""
        while True:
            await asyncio.sleep(rng.expovariate(1 / self.args.event_every))
            if rng.random() < 0.5:
                self.proxy.cut()
                self.cuts += 1
            else:
                self.source.kill()
                await self.source.wait()
                await self.start_source()
                self.proxy.cut()  # connections to the dead source end now, not at their next write
                self.restarts += 1

    async def transient_clients(self, rng: random.Random) -> None:
        """A client at a time joins, faults and is killed at a random time."""
        while True:
            await asyncio.sleep(rng.uniform(0, self.args.client_every))
            self.quiet.clear()
            proc = await self.worker(len(self.residents) + self.transients, timeout=self.args.minutes * 180)
            self.transients += 1
            await asyncio.sleep(rng.uniform(0.2, self.args.client_life))
            proc.kill()
            await proc.communicate()
            await asyncio.sleep(RETIRE_WAIT)  # the service sees its socket close and retires it
            self.quiet.set()

    async def sampler(self) -> None:
        """Every --sample-every seconds after --warmup, a sample at the next quiet point."""
        await asyncio.sleep(self.args.warmup)
        while self.dest.returncode is None:
            await self.quiet.wait()
            try:
                self.samples.append(sample(self.dest.pid, time.monotonic() - self.started))
            except (OSError, StopIteration):  # the destination exited just now
                return
            await asyncio.sleep(self.args.sample_every)

    # -- the run -----------------------------------------------------------------

    async def run(self) -> int:
        self.make_image()
        port = await self.proxy.start()
        await self.start_source()
        await self.start_dest(port)
        self.started = time.monotonic()
        for index in range(self.args.clients):
            self.residents.append(await self.worker(index, timeout=self.args.minutes * 180))
        rng = random.Random(self.args.seed)
        chaos = [asyncio.ensure_future(self.faults_on_the_link(random.Random(rng.random()))),
                 asyncio.ensure_future(self.transient_clients(random.Random(rng.random()))),
                 asyncio.ensure_future(self.sampler())]
        try:
            await self.dest.wait()
        finally:
            for task in chaos:
                task.cancel()
            await asyncio.gather(*chaos, return_exceptions=True)
        duration = time.monotonic() - self.started
        return await self.verdict(duration)

    def make_image(self) -> None:
        size = self.args.size << 20
        with open(self.image, "w+b") as f:
            f.truncate(size)
            with mmap.mmap(f.fileno(), size) as memory:
                fill(memory, 0, PAGE, self.args.seed, assume_zeroed=True)

    async def resident_results(self) -> list[dict]:
        results = []
        for proc in self.residents:
            out, _ = await asyncio.wait_for(proc.communicate(), 300)
            text = out.decode().strip()
            results.append(json.loads(text[text.index("{"):]) if "{" in text else {"ok": False, "raw": text})
            results[-1]["exit"] = proc.returncode
        return results

    async def verdict(self, duration: float) -> int:
        dest_err = (await self.dest.stderr.read()).decode(errors="replace")
        results = await self.resident_results()
        try:
            with open(self.report_path, encoding="utf-8") as f:
                report = json.load(f)
        except (OSError, ValueError):
            report = {}
        wrong = compare(self.image, os.path.join(self.block_dir, "ram"))
        bad_clients = [r for r in results if r["exit"] != 0 or not r.get("ok") or r.get("bad_page_count")]
        # a sample in the destination's last second may catch it closing (clients ended, channels gone)
        running = [s for s in self.samples if s.at_s < report.get("duration_s", float("inf")) - 1.0]
        growth_ok, growth_lines = judge_growth(running, self.args.rss_slack)
        print(f"soak: {duration:.0f} s, {self.args.size} MiB image, seed {self.args.seed}")
        print(f"  clients: {len(self.residents)} resident ({len(results) - len(bad_clients)} verified every page), "
              f"{self.transients} transient (killed at random times)")
        print(f"  faults {report.get('faults')} (self-served requests {report.get('client_requests')}, "
              f"bad {report.get('bad_faults')}); link cuts {self.cuts}; source restarts {self.restarts}; "
              f"dest resumes {report.get('resumes')}")
        print(f"  wrong pages in the block file: {wrong}; resident clients with a bad page or failure: "
              f"{len(bad_clients)}; dest exit {self.dest.returncode}, verified {report.get('verified')}")
        for line in growth_lines:
            print("  " + line)
        ok = self.dest.returncode == 0 and report.get("verified") and wrong == 0 and not bad_clients and growth_ok
        if not ok:
            print(dest_err[-3000:])
            for r in bad_clients[:3]:
                print(json.dumps(r)[:1000])
        print("verdict:", "every page right, no growth in fds or memory" if ok else "FAILED")
        return 0 if ok else 1


def judge_growth(samples: list[Sample], rss_slack_kib: int) -> tuple[bool, list[str]]:
    """First against last quiet-point sample: (nothing grew, the lines that say so)."""
    if len(samples) < 2:
        return False, [f"fds and memory: {len(samples)} quiet-point samples, too few to judge (run longer)"]
    first, last = samples[0], samples[-1]
    rss = last.rss_anon_kib - first.rss_anon_kib
    lines = [f"dest at the first quiet point: {first.describe()}",
             f"dest at the last quiet point:  {last.describe()}",
             f"growth over {len(samples)} samples: fds {last.fds - first.fds:+d} (other {last.other - first.other:+d}, "
             f"userfaultfds {last.userfaultfds - first.userfaultfds:+d}, sockets {last.sockets - first.sockets:+d}); "
             f"RssAnon {rss:+d} KiB (max {max(s.rss_anon_kib for s in samples)} KiB, "
             f"most fds {max(s.fds for s in samples)})",
             "samples (s: fds, RssAnon MiB): " + ", ".join(f"{s.at_s:.0f}: {s.fds}, {s.rss_anon_kib / 1024:.1f}"
                                                          for s in samples)]
    ok = (last.other <= first.other and last.userfaultfds <= first.userfaultfds
          and last.sockets - first.sockets <= SOCKET_JITTER and rss <= rss_slack_kib)
    return ok, lines


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


async def soak(args: argparse.Namespace) -> int:
    work = tempfile.mkdtemp(prefix="apc-soak-", dir="/dev/shm")
    run = Soak(args, work)
    try:
        return await run.run()
    finally:
        run.proxy.close()
        for proc in run.procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="about how long the migration lasts")
    parser.add_argument("--size", type=int, default=1024, help="image MiB")
    parser.add_argument("--seed", type=int, default=7, help="pattern seed, and the seed of every random choice")
    parser.add_argument("--clients", type=int, default=4, help="resident clients (stay until End, check every page)")
    parser.add_argument("--client-every", type=float, default=10.0,
                        help="at most this many seconds between a transient client's death and the next one")
    parser.add_argument("--client-life", type=float, default=8.0, help="a transient client lives up to this long")
    parser.add_argument("--touches", type=int, default=300, help="page touches per client thread")
    parser.add_argument("--event-every", type=float, default=20.0, help="mean seconds between link cuts/restarts")
    parser.add_argument("--warmup", type=float, default=None,
                        help="seconds before the first fd/memory sample (default: a tenth of the run, at least 10)")
    parser.add_argument("--sample-every", type=float, default=10.0, help="seconds between fd/memory samples")
    parser.add_argument("--rss-slack", type=int, default=4096, help="KiB of RssAnon growth still counted as none")
    args = parser.parse_args(argv)
    # the proxy's rate that makes the non-zero part of the image last --minutes (zero pages travel as markers)
    args.rate = (args.size << 20) * 6 / 7 / (args.minutes * 60)
    if args.warmup is None:  # start-up allocations (staging buffers, first clients) are not growth
        args.warmup = max(10.0, args.minutes * 6)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    return asyncio.run(soak(args))


if __name__ == "__main__":
    sys.exit(main())
