"""The benchmark's conditions read from /sys and /proc trees: the host's free page reporting and
how an idle vCPU waits.

Pure logic on trees made here (the machine's own /sys says whatever its host set up); the
end-to-end run in test_bench.py checks the key is in a real run's JSON.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from aiopostcopy.tools.bench import _reported_during, _reporting_text
from aiopostcopy.tools.bench_conditions import (halt_polling, host_page_reporting, idle_polling, idle_polling_text,
                                                run_with_halt_polling)

#: /proc/buddyinfo of a machine whose largest order is 10 (11 columns)
BUDDYINFO = "Node 0, zone      DMA      0      0      0      0      0      0      0      0      1      1      3\n"


def _tree(tmp_path: Path, *, features: str | None, order: int | None, reported: int | None = None,
          bound: bool = True) -> tuple[Path, Path]:
    sys_root, proc_root = tmp_path / "sys", tmp_path / "proc"
    devices = sys_root / "bus/virtio/devices"
    devices.mkdir(parents=True)
    net = devices / "virtio0"  # a device that is not a balloon, with bit 5 set: not counted
    net.mkdir()
    (net / "device").write_text("0x0001\n")
    (net / "features").write_text("1111110000\n")
    (net / "driver").mkdir()
    if features is not None:
        balloon = devices / "virtio1"
        balloon.mkdir()
        (balloon / "device").write_text("0x0005\n")
        (balloon / "features").write_text(features + "\n")
        if bound:
            (balloon / "driver").mkdir()
    params = sys_root / "module/page_reporting/parameters"
    params.mkdir(parents=True)
    if order is not None:
        (params / "page_reporting_order").write_text(f"{order}\n")
    if reported is not None:
        (params / "reported_kib").write_text(f"{reported}\n")
    proc_root.mkdir()
    (proc_root / "buddyinfo").write_text(BUDDYINFO)
    return sys_root, proc_root


def test_a_balloon_with_free_page_reporting_at_an_order_the_kernel_has_is_on(tmp_path: Path) -> None:
    sys_root, proc_root = _tree(tmp_path, features="0110010000", order=9, reported=2048)
    assert host_page_reporting(sys_root, proc_root) == {"on": True, "order": 9, "reported_kib": 2048}


def test_an_order_above_the_largest_turns_reporting_off(tmp_path: Path) -> None:
    sys_root, proc_root = _tree(tmp_path, features="0110010000", order=11)
    assert host_page_reporting(sys_root, proc_root) == {"on": False, "order": 11, "reported_kib": None}


def test_a_balloon_without_the_feature_or_without_a_driver_reports_nothing(tmp_path: Path) -> None:
    sys_root, proc_root = _tree(tmp_path / "a", features="0110000000", order=9)
    assert host_page_reporting(sys_root, proc_root)["on"] is False
    sys_root, proc_root = _tree(tmp_path / "b", features="0110010000", order=9, bound=False)
    assert host_page_reporting(sys_root, proc_root)["on"] is False


def test_a_machine_with_no_balloon_and_no_module_is_off(tmp_path: Path) -> None:
    assert host_page_reporting(tmp_path / "none", tmp_path / "none") == {"on": False, "order": None,
                                                                         "reported_kib": None}


def test_the_run_counts_what_was_reported_between_its_ends() -> None:
    start = {"on": True, "order": 9, "reported_kib": 1000}
    during = _reported_during(start, {"on": True, "order": 9, "reported_kib": 1000 + 512 * 1024})
    assert during == {"on": True, "order": 9, "reported_mib": 512.0}
    assert _reporting_text(during) == "; host free page reporting on: 512 MiB given back during the run"
    uncounted = _reported_during({"on": True, "order": 9, "reported_kib": None},
                                 {"on": True, "order": 9, "reported_kib": None})
    assert uncounted["reported_mib"] is None and _reporting_text(uncounted) == "; host free page reporting on"
    off = _reported_during({"on": False, "order": 11, "reported_kib": 7}, {"on": False, "order": 11, "reported_kib": 7})
    assert _reporting_text(off) == ""


def test_a_haltpoll_guest_says_how_long_it_polls(tmp_path: Path) -> None:
    (tmp_path / "devices/system/cpu/cpuidle").mkdir(parents=True)
    (tmp_path / "devices/system/cpu/cpuidle/current_driver").write_text("haltpoll\n")
    (tmp_path / "module/haltpoll/parameters").mkdir(parents=True)
    (tmp_path / "module/haltpoll/parameters/guest_halt_poll_ns").write_text("200000\n")
    assert idle_polling(tmp_path) == {"cpuidle_driver": "haltpoll", "guest_halt_poll_ns": 200000}
    assert idle_polling_text(idle_polling(tmp_path), set_for_run=True) == \
        "idle vCPUs: cpuidle haltpoll, guest_halt_poll_ns 200000 (--halt-poll-ns, for this run)"


def test_another_cpuidle_driver_has_no_halt_polling_and_none_at_all_is_none(tmp_path: Path) -> None:
    (tmp_path / "devices/system/cpu/cpuidle").mkdir(parents=True)
    (tmp_path / "devices/system/cpu/cpuidle/current_driver").write_text("intel_idle\n")
    (tmp_path / "module/haltpoll/parameters").mkdir(parents=True)  # the module, not the driver in use
    (tmp_path / "module/haltpoll/parameters/guest_halt_poll_ns").write_text("200000\n")
    assert idle_polling(tmp_path) == {"cpuidle_driver": "intel_idle", "guest_halt_poll_ns": None}
    assert idle_polling_text(idle_polling(tmp_path)) == "idle vCPUs: cpuidle intel_idle"
    assert idle_polling(tmp_path / "none") == {"cpuidle_driver": None, "guest_halt_poll_ns": None}
    assert idle_polling_text(idle_polling(tmp_path / "none")) is None


def _haltpoll_guest(root: Path, ns: int) -> Path:
    (root / "devices/system/cpu/cpuidle").mkdir(parents=True)
    (root / "devices/system/cpu/cpuidle/current_driver").write_text("haltpoll\n")
    (root / "module/haltpoll/parameters").mkdir(parents=True)
    path = root / "module/haltpoll/parameters/guest_halt_poll_ns"
    path.write_text(f"{ns}\n")
    return path


def test_halt_polling_is_set_for_the_block_and_put_back_on_every_way_out(tmp_path: Path) -> None:
    path = _haltpoll_guest(tmp_path, 0)
    with halt_polling(200000, tmp_path):
        assert idle_polling(tmp_path)["guest_halt_poll_ns"] == 200000
    assert path.read_text() == "0\n"
    with pytest.raises(KeyboardInterrupt), halt_polling(50000, tmp_path):
        assert path.read_text() == "50000\n"
        raise KeyboardInterrupt
    assert path.read_text() == "0\n"
    with halt_polling(None, tmp_path):  # None: as it is
        assert path.read_text() == "0\n"


def test_halt_polling_refuses_a_guest_without_haltpoll(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="haltpoll cpuidle driver; this machine's is none"):
        with halt_polling(1000, tmp_path):
            pass


def test_a_runner_runs_under_the_polling_or_says_why_it_cannot(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = _haltpoll_guest(tmp_path / "guest", 0)
    seen: list[str] = []
    assert run_with_halt_polling(100000, "bench", lambda: seen.append(path.read_text()) or 7, tmp_path / "guest") == 7
    assert seen == ["100000\n"] and path.read_text() == "0\n"
    ran: list[bool] = []
    assert run_with_halt_polling(100000, "bench", lambda: ran.append(True) or 0, tmp_path / "none") == 2
    assert not ran and "bench: --halt-poll-ns needs the haltpoll cpuidle driver" in capsys.readouterr().err
