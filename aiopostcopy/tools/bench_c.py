"""The C baseline: build benchmarks/c/ with gcc at run time and run it over the link.

Theory of operation
-------------------
``benchmarks/c/page_server.c`` (the source side) and
``benchmarks/c/fault_client.c`` (the destination side) are compiled into a
private temporary directory when the runner starts (never into the tree), with
``gcc -O2 -pthread``.  Each measure is one fresh pair of processes on the
place under test: the server on ``src`` announces its port, the client on
``dst`` connects, measures, prints one JSON object and exits; the server exits
at EOF.  The client checks every page it received against the page word the
server wrote (``cbench.h``); a bad page fails the measure.

Measures (see fault_client.c): ``rr`` (16 B request / 4 KiB reply), ``fault``
(one thread faulting on a userfaultfd-registered memfd, each page fetched from
the server and placed with UFFDIO_COPY), ``rate`` (the same with several
faulting threads: faults per second, and CPU per fault: the client's handler
thread, the baseline's destination, and the page server, its source),
``stream`` (one request for every page,
received and placed: the sweep in C) and ``bulk`` (received and dropped: the
link's own rate).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from aiopostcopy.tools.bench_procs import first_line, stop

__all__ = ["C_DIR", "CBaseline", "CBuildError", "fault_cpu"]

C_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "c"
"""The C sources, in the repository beside the package."""

PAGE = 4096


class CBuildError(RuntimeError):
    """The C baseline cannot be built here (no gcc, no sources, a compile error)."""


class CBaseline:
    """The compiled C baseline; use as a context manager (removes the binaries).

    Args:
        sources: The directory holding page_server.c, fault_client.c and cbench.h.
    """

    def __init__(self, sources: Path = C_DIR) -> None:
        self.sources = sources
        self.dir = Path(tempfile.mkdtemp(prefix="aiopostcopy-cbench-"))
        try:
            self.server = self._compile("page_server")
            self.client = self._compile("fault_client")
        except BaseException:
            self.close()
            raise

    def _compile(self, name: str) -> Path:
        gcc = shutil.which("gcc") or shutil.which("cc")
        src = self.sources / f"{name}.c"
        if gcc is None:
            raise CBuildError("the C baseline needs gcc (apt-get install gcc), none found on PATH")
        if not src.exists():
            raise CBuildError(f"C baseline source {src} missing (run from a source checkout)")
        out = self.dir / name
        done = subprocess.run([gcc, "-O2", "-Wall", "-pthread", "-o", str(out), str(src)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise CBuildError(f"gcc failed on {src}:\n{done.stderr.strip()}")
        return out

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "CBaseline":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ measures

    def run(self, place: Any, *mode: object, timeout: float = 120.0) -> dict[str, Any]:
        """One server + one client on ``place``; the client's JSON result.

        Raises:
            RuntimeError: Either side failed, timed out or a page did not verify.
        """
        server = place.popen("src", [str(self.server), place.server_addr], stdout=subprocess.PIPE)
        try:
            port = first_line(server, 15)
            if not port.isdigit():
                raise RuntimeError(f"C page server did not start (said {port!r})")
            client = place.popen("dst", [str(self.client), place.server_addr, port, *map(str, mode)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            try:
                out, err = client.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                stop(client)
                raise RuntimeError(f"C client {mode[0]} timed out after {timeout} s") from None
            if client.returncode != 0:
                raise RuntimeError(f"C client {' '.join(map(str, mode))} exited {client.returncode}: "
                                   f"{err.decode(errors='replace').strip()}")
            server.wait(10)
            result = dict(json.loads(out.decode().splitlines()[-1]))
            result.update(_server_figures(server))
            return result
        finally:
            stop(server)

    def rr(self, place: Any, count: int, warmup: int) -> list[int]:
        """Request/reply round trips, ns."""
        return list(self.run(place, "rr", count, warmup)["samples_ns"])

    def fault(self, place: Any, pages: int, touches: int, threads: int = 1, seed: int = 1) -> dict[str, Any]:
        """Remote faults: ``samples_ns`` (each timed in the faulting thread) and ``faults_per_s``."""
        return self.run(place, "fault", pages, touches, threads, seed)

    def stream(self, place: Any, nbytes: int) -> float:
        """Receive + UFFDIO_COPY every page, GB/s."""
        return float(self.run(place, "stream", max(1, nbytes // PAGE))["gbps"])

    def bulk(self, place: Any, nbytes: int) -> float:
        """Receive only, GB/s: the link's bulk rate."""
        return float(self.run(place, "bulk", max(1, nbytes // PAGE))["gbps"])


def fault_cpu(result: dict[str, Any]) -> tuple[float | None, float | None]:
    """Microseconds of CPU per fault of a :meth:`CBaseline.fault` result: the client's handler
    thread (the baseline's destination) and the page server (its source); None if not reported."""
    faults = result.get("faults") or 0

    def per_fault(key: str) -> float | None:
        return result[key] / 1e3 / faults if faults and result.get(key) is not None else None

    return per_fault("handler_cpu_ns"), per_fault("server_cpu_ns")


def _server_figures(server: Any) -> dict[str, Any]:
    """What the page server printed when its client closed: its CPU time (``server_cpu_ns``)."""
    if server.stdout is None:
        return {}
    for line in reversed(server.stdout.read().decode(errors="replace").splitlines()):
        if line.startswith("{"):
            return {"server_cpu_ns": int(json.loads(line)["cpu_ns"])}
    return {}
