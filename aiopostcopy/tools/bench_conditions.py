"""The conditions of a benchmark run: the machine, the load, and the host's settings that move
every figure.

Theory of operation
-------------------
:func:`machine` names the machine (kernel, CPU, vCPUs, VM or not, Python, the
service's event loop, load average); :func:`cpu_snapshot` and :func:`other_load`
tell what CPU others used during the run, and the steal.

On a VM two settings of the host decide much of what a run measures
(benchmarks/README.md, "State the conditions with every figure"):

* :func:`host_page_reporting`: whether the guest gives its free memory back
  (virtio-balloon free page reporting), which makes placing pages into fresh
  memory cost host faults;
* :func:`idle_polling`: how an idle vCPU waits (the ``haltpoll`` cpuidle
  driver's ``guest_halt_poll_ns``); a halted vCPU is woken through the host,
  and every wake-up across vCPUs pays it.

The runners report both and change neither by themselves.
:func:`halt_polling` (``--halt-poll-ns``) sets the polling for one run, when
asked, and puts the old value back on every way out.
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

__all__ = ["machine", "cpu_snapshot", "other_load", "host_page_reporting", "idle_polling", "idle_polling_text",
           "halt_polling", "run_with_halt_polling"]


def machine() -> dict[str, Any]:
    """Kernel, CPU model, vCPUs, virtualization, Python, event loop, load average now."""
    cpu, hyper = "?", False
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == "?":
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and " hypervisor" in line:
                hyper = True
    except OSError:
        pass
    try:
        import uvloop

        loop = f"uvloop {uvloop.__version__}"
    except ImportError:
        loop = "stock asyncio (uvloop missing)"
    return {"host": platform.node(), "vcpus": os.cpu_count(), "cpu": cpu, "vm": hyper,
            "kernel": platform.release(), "python": f"{platform.python_version()} {sys.executable}",
            "loop": loop, "load_at_start": list(os.getloadavg())}


def cpu_snapshot() -> dict[str, float]:
    """Machine-wide busy and steal CPU seconds (/proc/stat) and ours (this process and reaped children)."""
    tick = os.sysconf("SC_CLK_TCK")
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    t = os.times()
    return {"busy": (user + nice + system + irq + softirq) / tick, "steal": steal / tick,
            "ours": t.user + t.system + t.children_user + t.children_system}


def other_load(start: dict[str, float], end: dict[str, float], wall: float) -> dict[str, float]:
    """CPU used outside our processes during the run (other sessions, kernel work), and steal."""
    others = max(0.0, (end["busy"] - start["busy"]) - (end["ours"] - start["ours"]))
    return {"ours_s": end["ours"] - start["ours"], "others_s": others, "others_vcpu": others / wall,
            "steal_s": end["steal"] - start["steal"], "wall_s": wall}


#: virtio-balloon's device ID and its feature bit VIRTIO_BALLOON_F_REPORTING (free page reporting)
_VIRTIO_ID_BALLOON, _BALLOON_F_REPORTING = 5, 5
#: the haltpoll cpuidle driver's poll time before a vCPU halts, under /sys
_HALT_POLL = "module/haltpoll/parameters/guest_halt_poll_ns"


def host_page_reporting(sys_root: Path = Path("/sys"), proc_root: Path = Path("/proc")) -> dict[str, Any]:
    """Whether this guest gives its free memory back to the host (virtio-balloon free page reporting).

    When it does, the host drops the pages behind every free block of ``2**order`` pages and
    up, and the guest's next use of them costs a fault on the host: placing pages into fresh
    shared memory (UFFDIO_COPY, the C stream and the service alike) then runs at a fraction
    of its speed, and by how much depends on what the guest freed last.  Returns ``on``
    (a balloon device with the feature and an order the kernel reports at), ``order`` and
    ``reported_kib`` (the total reported so far, where the kernel exports it; None elsewhere).
    """
    offered = False
    for device in sorted((sys_root / "bus/virtio/devices").glob("*")):
        try:
            if int((device / "device").read_text(), 16) != _VIRTIO_ID_BALLOON or not (device / "driver").exists():
                continue
            features = (device / "features").read_text().strip()  # one '0'/'1' per bit, bit 0 first
        except (OSError, ValueError):
            continue
        offered = offered or features[_BALLOON_F_REPORTING:_BALLOON_F_REPORTING + 1] == "1"
    params = sys_root / "module/page_reporting/parameters"
    order, reported = _int_file(params / "page_reporting_order"), _int_file(params / "reported_kib")
    try:  # orders 0..MAX_PAGE_ORDER: an order above the largest means nothing is reported
        largest = len((proc_root / "buddyinfo").read_text().splitlines()[0].split()) - 5
    except (OSError, IndexError):
        largest = None
    on = offered and order is not None and (largest is None or order <= largest)
    return {"on": on, "order": order, "reported_kib": reported}


def idle_polling(sys_root: Path = Path("/sys")) -> dict[str, Any]:
    """How an idle vCPU waits: the cpuidle driver and, with ``haltpoll``, how long it polls before
    it halts (``guest_halt_poll_ns``).

    A halted vCPU is woken by the host, which costs a VM exit and the host's scheduling: every
    wake-up across vCPUs (a fault's reader, the page server, the faulting thread) pays it.
    Measured here with `bench --quick`, 2 vCPUs: with ``guest_halt_poll_ns`` 0 the C request/reply
    took 77 us at p50, with 200000 (200 us of polling) 14-16 us; the C fault 100-115 against 24-26 us.
    :func:`halt_polling` sets it for a run (``bench --halt-poll-ns``).
    """
    driver = _text_file(sys_root / "devices/system/cpu/cpuidle/current_driver")
    poll = _int_file(sys_root / _HALT_POLL) if driver == "haltpoll" else None
    return {"cpuidle_driver": driver, "guest_halt_poll_ns": poll}


def idle_polling_text(polling: dict[str, Any], *, set_for_run: bool = False) -> str | None:
    """The header line of :func:`idle_polling`'s answer (None: no cpuidle driver to speak of);
    ``set_for_run``: the value is ``--halt-poll-ns``'s."""
    if polling["cpuidle_driver"] is None:
        return None
    poll_ns = polling["guest_halt_poll_ns"]
    return (f"idle vCPUs: cpuidle {polling['cpuidle_driver']}"
            + (f", guest_halt_poll_ns {poll_ns}" if poll_ns is not None else "")
            + (" (--halt-poll-ns, for this run)" if set_for_run else ""))


@contextlib.contextmanager
def halt_polling(ns: int | None, sys_root: Path = Path("/sys")) -> Iterator[None]:
    """Let idle vCPUs poll for ``ns`` nanoseconds before they halt, for the block's duration;
    the value found is written back on every way out.  None: leave it as it is.

    Raises:
        RuntimeError: the guest does not use the ``haltpoll`` cpuidle driver, or the value
            cannot be written (not root).
    """
    if ns is None:
        yield
        return
    polling = idle_polling(sys_root)
    if polling["guest_halt_poll_ns"] is None:
        raise RuntimeError(f"--halt-poll-ns needs the haltpoll cpuidle driver; this machine's is "
                           f"{polling['cpuidle_driver'] or 'none'}")
    path = sys_root / _HALT_POLL
    try:
        path.write_text(f"{ns}\n")
    except OSError as exc:
        raise RuntimeError(f"cannot set {path}: {exc.strerror}") from None
    try:
        yield
    finally:
        path.write_text(f"{polling['guest_halt_poll_ns']}\n")


def run_with_halt_polling(ns: int | None, name: str, run: Callable[[], int], sys_root: Path = Path("/sys")) -> int:
    """``run()`` under :func:`halt_polling`; when the polling cannot be set, say why (as ``name``)
    and return 2 without running.  Returns what ``run`` returns."""
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(halt_polling(ns, sys_root))
        except RuntimeError as exc:  # no haltpoll here, or not root
            print(f"{name}: {exc}", file=sys.stderr)
            return 2
        return run()


def _text_file(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def _int_file(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None
