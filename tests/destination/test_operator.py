"""The operator's control socket: its pure parts, and its server over a real Unix socket with a fake service.

The fake stands in for the service only (its status, events and verbs);
the socket, its permissions and the JSON lines are real.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import tempfile
from collections.abc import AsyncIterator

import pytest

from aiopostcopy.destination.operator import (
    ControlError,
    Monitor,
    OperatorEvent,
    OperatorPort,
    OperatorServer,
    OperatorStatus,
    TokenBucket,
    format_source,
    parse_rate,
    parse_request,
    parse_source,
)
from aiopostcopy.destination.report import DestinationReport
from aiopostcopy.errors import ClosedError

# ----------------------------------------------------------------------------- input


@pytest.mark.parametrize("text, rate", [
    ("0", None), ("unlimited", None), (None, None), (0, None), ("1", 1), ("500k", 500_000), ("500K", 500_000),
    ("1.5M", 1_500_000), ("2G", 2_000_000_000), ("  10m ", 10_000_000), (4096, 4096),
])
def test_rates_are_bytes_per_second_in_powers_of_1000(text, rate) -> None:
    assert parse_rate(text) == rate


@pytest.mark.parametrize("text", ["", "fast", "-1", "1T", "k", "nan", "1e30", True, -5])
def test_bad_rates_are_refused(text) -> None:
    with pytest.raises(ValueError):
        parse_rate(text)


@pytest.mark.parametrize("text, address", [
    ("127.0.0.1:4444", ("127.0.0.1", 4444)), ("[::1]:5", ("::1", 5)), ("/run/src.sock", "/run/src.sock"),
])
def test_source_addresses(text, address) -> None:
    assert parse_source(text) == address
    assert parse_source(format_source(address)) == address


@pytest.mark.parametrize("text", ["", "host", ":4444", "host:", "host:0", "host:70000", "host:x1"])
def test_bad_source_addresses_are_refused(text) -> None:
    with pytest.raises(ValueError):
        parse_source(text)


# ----------------------------------------------------------------------------- the bandwidth cap


def test_the_bucket_allows_a_burst_then_the_rate() -> None:
    bucket = TokenBucket(1000, now=0.0, burst=500)
    bucket.charge(500, 0.0)
    assert bucket.wait_time(0.0) == 0.0
    bucket.charge(1000, 0.0)  # a payload is charged whole: 1000 bytes in debt
    assert bucket.wait_time(0.0) == pytest.approx(1.0)
    assert bucket.wait_time(0.75) == pytest.approx(0.25)
    assert bucket.wait_time(1.0) == 0.0
    assert bucket.wait_time(100.0) == 0.0  # a quiet spell refills no more than the burst
    bucket.charge(600, 100.0)
    assert bucket.wait_time(100.0) == pytest.approx(0.1)


def test_the_bucket_keeps_the_rate_over_many_payloads() -> None:
    bucket = TokenBucket(1_000_000, now=0.0)
    now, sent = 0.0, 0
    while now < 10.0:  # a greedy sender that waits exactly as long as it is told
        bucket.charge(65536, now)
        sent += 65536
        now += bucket.wait_time(now)
    assert sent == pytest.approx(10_000_000, rel=0.03)


def test_the_bucket_wants_a_positive_rate() -> None:
    with pytest.raises(ValueError):
        TokenBucket(0, now=0.0)


# ----------------------------------------------------------------------------- the monitor


def test_outages_are_counted_and_timed() -> None:
    monitor = Monitor(0.0)
    assert not monitor.source_down and monitor.outages == 0
    monitor.source_lost(1.0)
    monitor.source_lost(1.5)  # the same outage, seen twice
    assert monitor.source_down and monitor.outage_s(3.0) == pytest.approx(2.0)
    assert monitor.source_regained(4.0) == pytest.approx(3.0)
    assert monitor.source_regained(5.0) == 0.0
    monitor.source_lost(10.0)
    assert monitor.outages == 2 and monitor.outage_s(11.0) == pytest.approx(4.0)


def test_the_rate_is_measured_over_the_recent_window() -> None:
    monitor = Monitor(0.0, window=2.0)
    for step in range(100):  # 1 MB/s for 5 s, then 100 kB/s
        now = step * 0.1
        rate = 1_000_000 if now < 5.0 else 100_000
        total = int(min(now, 5.0) * 1_000_000 + max(now - 5.0, 0.0) * 100_000)
        monitor.sample(now, total, total // 4096)
    byte_rate, page_rate = monitor.rates(9.9, total, total // 4096)
    assert byte_rate == pytest.approx(rate, rel=0.1)
    assert page_rate == pytest.approx(rate / 4096, rel=0.1)


def test_the_rate_before_any_history_is_the_average_since_the_start() -> None:
    monitor = Monitor(0.0)
    assert monitor.rates(2.0, 2000, 2)[0] == pytest.approx(1000)


def _client(key, mode=None, error=None, pid=10):
    return {"key": key, "pid": pid, "name": "worker", "mode": mode, "error": error}


def test_clients_joining_leaving_and_retired_become_events_once() -> None:
    monitor = Monitor(0.0)
    assert monitor.observe([_client("client-1")], ["client-1"], 0) == []  # connected, not registered yet
    events = monitor.observe([_client("client-1", "delegated"), _client("client-2", "self-served")],
                             ["client-1", "client-2"], 0)
    assert [(kind, fields["key"]) for kind, fields in events] == [("client_joined", "client-1"),
                                                                 ("client_joined", "client-2")]
    assert events[0][1] == {"key": "client-1", "pid": 10, "name": "worker", "mode": "delegated"}
    assert monitor.observe([_client("client-1", "delegated"), _client("client-2", "self-served")],
                           ["client-1", "client-2"], 0) == []
    events = monitor.observe([_client("client-1", "delegated"), _client("client-2", "self-served", "bad table")],
                             [], 3)
    assert events == [
        ("client_left", {"key": "client-1", "pid": 10, "name": "worker", "mode": "delegated"}),
        ("client_retired", {"key": "client-2", "pid": 10, "name": "worker", "mode": "self-served",
                            "error": "bad table"}),
        ("integrity", {"pages": 3, "total": 3}),
    ]
    assert monitor.observe([_client("client-1", "delegated"), _client("client-2", "self-served", "bad table")],
                           [], 3) == []


def test_a_client_refused_before_joining_is_reported_retired() -> None:
    monitor = Monitor(0.0)
    assert monitor.observe([_client("client-1", error="protocol version 9")], [], 0) == [
        ("client_retired", {"key": "client-1", "pid": 10, "name": "worker", "mode": None,
                            "error": "protocol version 9"})]
    assert monitor.observe([_client("client-2")], [], 0) == []  # connected and left without a word


# ----------------------------------------------------------------------------- requests


@pytest.mark.parametrize("line, expected", [
    (b'{"verb": "status"}', dict(verb="status")),
    (b'{"verb": "status", "id": 7}', dict(verb="status", id=7)),
    (b'{"verb": "events"}\n', dict(verb="events")),
    (b'{"verb": "recover", "source": "10.0.0.2:4444"}', dict(verb="recover", source=("10.0.0.2", 4444))),
    (b'{"verb": "cancel"}', dict(verb="cancel", reason="cancelled by the operator")),
    (b'{"verb": "cancel", "reason": "host going down"}', dict(verb="cancel", reason="host going down")),
    (b'{"verb": "set", "max_bandwidth": 1000000}', dict(verb="set", max_bandwidth=1_000_000)),
    (b'{"verb": "set", "max_bandwidth": "2M"}', dict(verb="set", max_bandwidth=2_000_000)),
    (b'{"verb": "set", "max_bandwidth": null}', dict(verb="set", max_bandwidth=None)),
    (b'{"verb": "set", "max_bandwidth": 0}', dict(verb="set", max_bandwidth=None)),
])
def test_requests(line, expected) -> None:
    request = parse_request(line)
    for name, value in expected.items():
        assert getattr(request, name) == value


@pytest.mark.parametrize("line, words", [
    (b"not json", "not a JSON line"),
    (b"\xff\xfe", "not a JSON line"),
    (b"[1, 2]", "JSON object"),
    (b'{"verb": "migrate"}', "unknown verb 'migrate'"),
    (b'{}', "unknown verb None"),
    (b'{"verb": "status", "extra": 1}', "unknown field(s) extra"),
    (b'{"verb": "recover"}', "'source'"),
    (b'{"verb": "recover", "source": "host:99999"}', "outside 1..65535"),
    (b'{"verb": "recover", "source": 5}', "HOST:PORT"),
    (b'{"verb": "set"}', "'max_bandwidth' is required"),
    (b'{"verb": "set", "max_bandwidth": -1}', "negative"),
    (b'{"verb": "set", "max_bandwidth": true}', "max_bandwidth must be"),
    (b'{"verb": "set", "max_bandwidth": [1]}', "max_bandwidth must be"),
    (b'{"verb": "set", "max_bandwidth": "fast"}', "k, M or G suffix"),
    (b'{"verb": "cancel", "reason": ""}', "reason must be"),
])
def test_bad_requests_say_what_is_wrong(line, words) -> None:
    with pytest.raises(ControlError) as info:
        parse_request(line)
    assert info.value.code == "bad_request"
    assert words in str(info.value)


# ----------------------------------------------------------------------------- the server, with a fake service


def _report(**overrides) -> DestinationReport:
    fields = dict(session_id="s", final=False, complete=False, aborted=None, duration_s=1.0, pages_total=100,
                  pages_placed=40, pages_adopted=0, pages_demand=5, pages_background=30, pages_zero=5, pages_duplicate=0, faults=5,
                  faults_joined=0, faults_already_placed=0, copies_to_client=0, bad_faults=0, client_requests=0, requests_sent=5,
                  resumes=0, integrity_pages=0, bytes_received=143360, goodput_gbps=0.001,
                  service_latency_us={"p50": 50.0, "p90": 90.0, "p99": 99.0, "max": 120.0},
                  blocked_by_client_s={}, faults_by_client={}, blocked_threads=(), faults_by_block={}, clients=())
    fields.update(overrides)
    return DestinationReport(**fields)


class FakeService:
    """The service's side of an OperatorPort, recording what it was asked."""

    def __init__(self) -> None:
        self.state = "running"
        self.calls: list[tuple[str, object]] = []
        self.queue: asyncio.Queue[OperatorEvent | None] = asyncio.Queue()

    def port(self) -> OperatorPort:
        return OperatorPort(status=self.status, events=self.events, recover=self.recover, cancel=self.cancel,
                            set_max_bandwidth=lambda rate: self.calls.append(("set", rate)))

    def status(self) -> OperatorStatus:
        return OperatorStatus(state=self.state, source="127.0.0.1:4444", source_connected=True,
                              max_bandwidth=None, rate_bytes_per_s=1e6, remaining_s=2.0, outages=0, outage_s=0.0,
                              error=None, report=_report())

    def events(self) -> AsyncIterator[OperatorEvent]:
        async def stream():
            while (event := await self.queue.get()) is not None:
                yield event
        return stream()

    def recover(self, source) -> None:
        if self.state != "running":
            raise ClosedError("the migration is over")
        self.calls.append(("recover", source))

    def cancel(self, reason: str) -> None:
        self.calls.append(("cancel", reason))
        self.state = "cancelled"


@pytest.fixture
def socket_dir():
    path = tempfile.mkdtemp(prefix="apc-op-", dir="/dev/shm")
    yield path
    for name in os.listdir(path):
        os.unlink(os.path.join(path, name))
    os.rmdir(path)


async def _exchange(path: str, *lines: bytes) -> list[dict]:
    reader, writer = await asyncio.open_unix_connection(path)
    try:
        replies = []
        for line in lines:
            writer.write(line + b"\n")
            replies.append(json.loads(await asyncio.wait_for(reader.readline(), 5)))
        return replies
    finally:
        writer.close()
        await writer.wait_closed()


@pytest.mark.asyncio
async def test_the_socket_is_owner_only_and_answers_each_verb(socket_dir) -> None:
    service = FakeService()
    path = os.path.join(socket_dir, "control.sock")
    server = OperatorServer(service.port(), path)
    await server.start()
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        status, bad, recovered, capped, garbage, cancelled, again, late = await _exchange(
            path,
            b'{"verb": "status", "id": "a"}',
            b'{"verb": "recover", "source": "host:0"}',
            b'{"verb": "recover", "source": "10.1.1.1:4445"}',
            b'{"verb": "set", "max_bandwidth": "250k"}',
            b"{{{",
            b'{"verb": "cancel", "reason": "maintenance"}',
            b'{"verb": "cancel"}',
            b'{"verb": "recover", "source": "10.1.1.1:4445"}',
        )
    finally:
        await server.close()
    assert status["ok"] and status["id"] == "a"
    assert status["status"]["state"] == "running" and status["status"]["pages_done"] == 40
    assert status["status"]["pages_by_kind"] == {"demand": 5, "background": 30, "zero": 5, "adopted": 0,
                                                   "duplicate": 0}
    assert status["status"]["protocol"] == 1 and status["status"]["remaining_s"] == 2.0
    assert bad == {"ok": False, "error": {"code": "bad_request", "message": bad["error"]["message"]}}
    assert "outside 1..65535" in bad["error"]["message"]
    assert recovered == {"ok": True, "source": "10.1.1.1:4445"}
    assert capped == {"ok": True, "max_bandwidth": 250_000}
    assert garbage["error"]["code"] == "bad_request"
    assert cancelled == {"ok": True}
    assert again["error"]["code"] == "bad_state"
    assert late["error"]["code"] == "bad_state" and "over" in late["error"]["message"]
    assert service.calls == [("recover", ("10.1.1.1", 4445)), ("set", 250_000), ("cancel", "maintenance")]
    assert not os.path.exists(path)


@pytest.mark.asyncio
async def test_events_stream_until_the_migration_ends(socket_dir) -> None:
    service = FakeService()
    path = os.path.join(socket_dir, "control.sock")
    server = OperatorServer(service.port(), path)
    await server.start()
    try:
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(b'{"verb": "events", "id": 1}\n')
        assert json.loads(await reader.readline()) == {"ok": True, "protocol": 1, "id": 1}
        service.queue.put_nowait(OperatorEvent(kind="source_lost", time=1.0, fields={"source": "h:1"}))
        service.queue.put_nowait(OperatorEvent(kind="complete", time=2.0, fields={"verified": True}))
        service.queue.put_nowait(None)
        lines = [json.loads(line) for line in (await asyncio.wait_for(reader.read(), 5)).splitlines()]
        writer.close()
        await writer.wait_closed()
    finally:
        await server.close()
    assert lines == [{"event": "source_lost", "time": 1.0, "source": "h:1"},
                     {"event": "complete", "time": 2.0, "verified": True}]


@pytest.mark.asyncio
async def test_a_line_too_long_is_refused_and_the_connection_closed(socket_dir) -> None:
    path = os.path.join(socket_dir, "control.sock")
    server = OperatorServer(FakeService().port(), path)
    await server.start()
    try:
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(b"x" * (128 * 1024) + b"\n")
        reply = json.loads(await asyncio.wait_for(reader.readline(), 5))
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        await writer.wait_closed()
    finally:
        await server.close()
    assert reply["error"]["code"] == "too_long"


@pytest.mark.asyncio
async def test_an_existing_path_is_not_taken_over(socket_dir) -> None:
    path = os.path.join(socket_dir, "control.sock")
    open(path, "w").close()
    with pytest.raises(OSError):
        await OperatorServer(FakeService().port(), path).start()
