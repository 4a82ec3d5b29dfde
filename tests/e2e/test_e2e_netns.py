"""Scenario 4: a migration across two network namespaces joined by a veth shaped with tbf 10gbit.

The source runs in the ``src`` namespace; the destination and its four
clients run in the ``dst`` namespace under ``dest_runner.py`` (the test
process itself stays in the host namespace and steers both over pipes and
signals).  Namespaces, veth and processes are removed by :class:`LinkPair`.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess

import pytest

from aiopostcopy.tools import netns

from e2e_support import HERE, PYTHON, source_argv

MiB = 1 << 20


def _line(proc: subprocess.Popen, timeout: float = 60.0, *, stderr: bool = False) -> dict:
    """The next JSON line of ``proc``'s stdout (or stderr) (blocking; run it in a thread)."""
    import select

    stream = proc.stderr if stderr else proc.stdout
    ready, _, _ = select.select([stream], [], [], timeout)
    if not ready:
        raise AssertionError(f"no output from pid {proc.pid} within {timeout} s")
    line = stream.readline()
    if not line:
        raise AssertionError(f"pid {proc.pid} exited ({proc.wait()}) without output")
    return json.loads(line) if line.lstrip().startswith("{") else {"line": line}


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.asyncio
async def test_four_mixed_clients_over_shaped_veth(e2e) -> None:
    reason = netns.available()
    if reason is not None:
        pytest.skip(reason)
    seed, size = 404, 64 * MiB
    image = e2e.image(size, seed=seed)
    run = asyncio.to_thread
    with netns.LinkPair() as link:
        source = link.popen("src", source_argv({"ram": image}, listen=f"{link.src_addr}:0"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        listening = (await run(_line, source, stderr=True))["line"]  # stdout carries only the JSON report
        assert "listening on" in listening, listening
        port = int(listening.rsplit(":", 1)[1])
        runner = link.popen("dst", [PYTHON, os.path.join(HERE, "dest_runner.py"), "--source", f"{link.src_addr}:{port}",
                                    "--workdir", e2e.workdir, "--clients", "4", "--threads", "2", "--touches", "200",
                                    "--seed", str(seed)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        started = await run(_line, runner)
        assert started.get("event") == "started", started
        os.kill(source.pid, signal.SIGSTOP)  # `ip netns exec` execs: this is the source itself
        try:
            runner.stdin.write("go\n")
            runner.stdin.flush()
            blocked = await run(_line, runner)
            assert blocked.get("event") == "blocked", blocked
        finally:
            os.kill(source.pid, signal.SIGCONT)
        result = await run(_line, runner, 120.0)
        runner_exit = await run(runner.wait, 30)
        source_out = await run(source.communicate, None, 30)
        shaped = link.qdisc_stats("src")
        runner.stdin.close()

    assert result.get("event") == "result", result
    report = result["report"]
    assert result["problems"] == {}, result["problems"]
    assert report["complete"] and report["pages_placed"] == size // 4096
    for client in result["clients"]:
        assert client["exit"] == 0 and client["ok"] and client["bad_page_count"] == 0, client
    assert report["faults"] > 0 and report["client_requests"] > 0 and report["pages_demand"] > 0, report
    assert runner_exit == 0
    assert source.returncode == 0, source_out
    assert shaped["kind"] == "tbf"
    assert shaped["bytes"] >= report["bytes_received"], "the pages did not cross the shaped veth"
