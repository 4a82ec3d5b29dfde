"""The operator's control socket: status, events, recover, cancel and a bandwidth cap.

Theory of operation
-------------------
An operator watches and steers a running migration the way QEMU's monitor does
(``query-migrate``, ``migrate_recover``, ``migrate_cancel``,
``max-postcopy-bandwidth``), over a Unix socket that only the service's owner
may use (mode 0600, and the peer's uid checked with SO_PEERCRED).  The protocol
is JSON lines, documented in docs/control.md: each request is one line, each
reply one line; ``events`` turns the connection into a stream of event lines
that ends with the migration.

Everything here that decides is pure and takes ``now``:

* :func:`parse_rate` and :func:`parse_source` read an operator's input;
* :class:`TokenBucket` is the background stream's bandwidth cap.  The service
  charges it for every background payload and, when it is in debt, holds the
  background channel until the debt is paid; TCP flow control then slows the
  source.  Urgent pages are never charged, so faults are never throttled;
* :class:`Monitor` keeps what the report does not: outages, a windowed rate,
  and the differences between successive reports that become client and
  integrity events;
* :func:`parse_request` turns a line into a :class:`ControlRequest` or raises
  :class:`ControlError` with a documented code.

:class:`OperatorServer` is the thin asyncio part: it reads a line, asks the
service through an :class:`OperatorPort` and writes the reply.  It never
touches the service's internals, so the same verbs are the service's public
API (:class:`~aiopostcopy.loop.PostcopyDestination`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import os
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Any

from aiopostcopy.destination.report import DestinationReport
from aiopostcopy.errors import PostcopyError

__all__ = [
    "ControlError",
    "ControlRequest",
    "Monitor",
    "OperatorEvent",
    "OperatorPort",
    "OperatorServer",
    "OperatorStatus",
    "TokenBucket",
    "format_source",
    "parse_rate",
    "parse_request",
    "parse_source",
]

PROTOCOL_VERSION = 1
MAX_LINE = 64 * 1024  #: bytes in one request line
MAX_RATE = 10**13  #: bytes per second (80 Tbit/s): anything larger is a typo
_SUFFIXES = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3}
VERBS = ("status", "events", "recover", "cancel", "set")
#: states of a migration as the operator sees it
STATES = ("running", "source_lost", "complete", "failed", "cancelled")
TERMINAL_EVENTS = frozenset({"complete", "failed"})


class ControlError(Exception):
    """A request refused, with a documented ``code`` (docs/control.md)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code

    def to_reply(self, request_id: Any = None) -> dict[str, Any]:
        reply: dict[str, Any] = {"ok": False, "error": {"code": self.code, "message": str(self)}}
        if request_id is not None:
            reply["id"] = request_id
        return reply


# ----------------------------------------------------------------------------- operator input


def parse_rate(text: str | int | None) -> int | None:
    """Bytes per second from ``"RATE"`` with an optional k, M or G suffix (powers of 1000).

    ``0``, ``None`` and ``"unlimited"`` mean no cap (None), as QEMU's
    ``max-postcopy-bandwidth`` 0 does.

    Raises:
        ValueError: not a rate, negative, or absurdly large.
    """
    if text is None:
        return None
    if isinstance(text, bool):
        raise ValueError(f"expected a rate in bytes per second, got {text!r}")
    if isinstance(text, int):
        value = text
    else:
        raw = text.strip()
        if raw.lower() in ("unlimited", "none", "off"):
            return None
        number, suffix = raw, ""
        if raw and raw[-1].lower() in "kmg":
            number, suffix = raw[:-1], raw[-1].lower()
        try:
            value = round(float(number) * _SUFFIXES[suffix])
        except ValueError:
            raise ValueError(f"expected a rate in bytes per second with an optional k, M or G suffix "
                             f"(e.g. 500k, 1.5G), got {text!r}") from None
        if value != value:  # NaN
            raise ValueError(f"expected a rate in bytes per second, got {text!r}")
    if value < 0:
        raise ValueError(f"a rate cannot be negative, got {text!r}")
    if value > MAX_RATE:
        raise ValueError(f"rate {text!r} is over {MAX_RATE} bytes per second")
    return value or None


def parse_source(text: str) -> tuple[str, int] | str:
    """``HOST:PORT`` (``[v6]:PORT``) -> (host, port); anything with a slash is a Unix socket path.

    Raises:
        ValueError: neither form, or a port outside 1..65535.
    """
    if not isinstance(text, str) or not text:
        raise ValueError(f"expected HOST:PORT or a socket path, got {text!r}")
    if "/" in text:
        return text
    host, _, port = text.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit():
        raise ValueError(f"expected HOST:PORT or a socket path, got {text!r}")
    if not 1 <= int(port) <= 65535:
        raise ValueError(f"port {port} of {text!r} is outside 1..65535")
    return host, int(port)


def format_source(address: tuple[str, int] | str) -> str:
    if isinstance(address, str):
        return address
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# ----------------------------------------------------------------------------- the bandwidth cap


class TokenBucket:
    """A byte budget refilled at ``rate`` bytes per second, holding at most ``burst`` bytes.

    :meth:`charge` may take the budget below zero (a payload is charged whole
    once it has arrived); :meth:`wait_time` then says how long until it is paid
    back, which is how long the background channel stays held.

    Args:
        rate: bytes per second, > 0.
        now: the clock's current time (seconds).
        burst: the most that may arrive at once after a quiet spell (default: a
            tenth of a second's worth, at least 64 KiB).
    """

    def __init__(self, rate: int, now: float, *, burst: int | None = None) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be > 0, got {rate}")
        self.rate = rate
        self.burst = burst if burst is not None else max(rate // 10, 64 * 1024)
        self._tokens = float(self.burst)
        self._at = now

    def _refill(self, now: float) -> None:
        if now > self._at:
            self._tokens = min(float(self.burst), self._tokens + (now - self._at) * self.rate)
            self._at = now

    def charge(self, nbytes: int, now: float) -> None:
        """``nbytes`` arrived."""
        self._refill(now)
        self._tokens -= nbytes

    def wait_time(self, now: float) -> float:
        """Seconds until the budget is back to zero (0.0: within budget)."""
        self._refill(now)
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate


# ----------------------------------------------------------------------------- status and events


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class OperatorEvent:
    """Something an operator is told about as it happens.

    Attributes:
        kind: ``source_lost``, ``source_regained``, ``client_joined``,
            ``client_left``, ``client_retired``, ``integrity``, ``complete``
            or ``failed`` (docs/control.md says what each carries).
        time: wall-clock time (seconds since the epoch) the service noticed it.
        fields: the kind's details, JSON-ready.
    """

    kind: str
    time: float
    fields: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"event": self.kind, "time": self.time, **self.fields}


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class OperatorStatus:
    """A migration as ``status`` shows it: the live report plus what only the service knows.

    Attributes:
        state: one of :data:`STATES`.
        source: the address connections (and reconnections) go to.
        source_connected: both channels to the source are up.
        max_bandwidth: the background cap in bytes per second (None: none).
        rate_bytes_per_s: bytes received per second over the last few seconds.
        remaining_s: pages left at the recent page rate (None: no rate yet).
        outages: times the source was lost.
        outage_s: seconds spent without a source, the current outage included.
        error: why the migration failed or was cancelled.
        report: the live :class:`DestinationReport`.
    """

    state: str
    source: str
    source_connected: bool
    max_bandwidth: int | None
    rate_bytes_per_s: float
    remaining_s: float | None
    outages: int
    outage_s: float
    error: str | None
    report: DestinationReport

    @property
    def pages_done(self) -> int:
        return self.report.pages_placed

    @property
    def pages_total(self) -> int:
        return self.report.pages_total

    def to_dict(self) -> dict[str, Any]:
        """The JSON form of ``status`` (docs/control.md): the report's keys plus the operator's."""
        report = self.report
        data = report.to_dict()
        data.update(
            protocol=PROTOCOL_VERSION,
            state=self.state,
            error=self.error,
            source=self.source,
            source_connected=self.source_connected,
            max_bandwidth=self.max_bandwidth,
            pages_done=report.pages_placed,
            pages_by_kind={"demand": report.pages_demand, "background": report.pages_background,
                           "zero": report.pages_zero, "adopted": report.pages_adopted,
                           "duplicate": report.pages_duplicate},
            rate_bytes_per_s=self.rate_bytes_per_s,
            remaining_s=self.remaining_s,
            outages=self.outages,
            outage_s=self.outage_s,
        )
        return data


class Monitor:
    """What the operator sees that the session does not count (pure: time comes in as ``now``).

    Args:
        now: when the migration started.
        window: seconds of history the rate is measured over.
    """

    def __init__(self, now: float, *, window: float = 3.0) -> None:
        self.outages = 0
        self._outage_total = 0.0
        self._lost_at: float | None = None
        self._window = window
        self._samples: collections.deque[tuple[float, int, int]] = collections.deque()
        self._started = now
        self._clients: dict[str, str] = {}  #: key -> "joined" / "gone", as last seen
        self._integrity = 0

    # -- the source -----------------------------------------------------------

    def source_lost(self, now: float) -> None:
        if self._lost_at is None:
            self.outages += 1
            self._lost_at = now

    def source_regained(self, now: float) -> float:
        """The outage is over; returns its length in seconds."""
        if self._lost_at is None:
            return 0.0
        length = max(now - self._lost_at, 0.0)
        self._outage_total += length
        self._lost_at = None
        return length

    @property
    def source_down(self) -> bool:
        return self._lost_at is not None

    def outage_s(self, now: float) -> float:
        return self._outage_total + (max(now - self._lost_at, 0.0) if self._lost_at is not None else 0.0)

    # -- rate --------------------------------------------------------------------

    def sample(self, now: float, bytes_received: int, pages_placed: int) -> None:
        """Record the counters at ``now`` (keeps one sample per 50 ms at most)."""
        samples = self._samples
        if samples and now - samples[-1][0] < 0.05:
            return
        samples.append((now, bytes_received, pages_placed))
        while len(samples) > 2 and now - samples[1][0] >= self._window:
            samples.popleft()

    def rates(self, now: float, bytes_received: int, pages_placed: int) -> tuple[float, float]:
        """(bytes/s, pages/s) over the window, or since the start while history is short."""
        self.sample(now, bytes_received, pages_placed)
        then, old_bytes, old_pages = self._samples[0]
        if now - then < 0.2:  # too short to say: average since the start
            then, old_bytes, old_pages = self._started, 0, 0
        elapsed = max(now - then, 1e-9)
        return (bytes_received - old_bytes) / elapsed, (pages_placed - old_pages) / elapsed

    # -- differences between reports ------------------------------------------------

    def observe(self, clients: Iterable[Mapping[str, Any]], active: Iterable[str],
                integrity_pages: int) -> list[tuple[str, dict[str, Any]]]:
        """Events (kind, fields) since the last call, from the report's clients and integrity count.

        Args:
            clients: the report's client summaries (key, pid, name, mode, error).
            active: keys of the clients the service still serves.
            integrity_pages: the report's count so far.
        """
        events: list[tuple[str, dict[str, Any]]] = []
        active = set(active)
        for client in clients:
            key = client["key"]
            seen = self._clients.get(key)
            fields = {k: client.get(k) for k in ("key", "pid", "name", "mode")}
            if key in active:
                if seen is None and client.get("mode") is not None:  # registered: it has joined
                    self._clients[key] = "joined"
                    events.append(("client_joined", fields))
            elif seen != "gone":
                if seen is None and client.get("mode") is None and not client.get("error"):
                    self._clients[key] = "gone"  # connected and left before joining: nothing to say
                    continue
                self._clients[key] = "gone"
                if client.get("error"):
                    events.append(("client_retired", {**fields, "error": client["error"]}))
                else:
                    events.append(("client_left", fields))
        if integrity_pages > self._integrity:
            events.append(("integrity", {"pages": integrity_pages - self._integrity, "total": integrity_pages}))
            self._integrity = integrity_pages
        return events


# ----------------------------------------------------------------------------- requests


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ControlRequest:
    """One request line, checked.

    Attributes:
        verb: one of :data:`VERBS`.
        id: echoed in the reply when given.
        source: ``recover``: the new source address.
        max_bandwidth: ``set``: bytes per second, None for no cap.
        reason: ``cancel``: said in the report (default: "cancelled by the operator").
    """

    verb: str
    id: Any = None
    source: tuple[str, int] | str | None = None
    max_bandwidth: int | None = None
    reason: str = "cancelled by the operator"


_FIELDS = {
    "status": set(),
    "events": set(),
    "recover": {"source"},
    "cancel": {"reason"},
    "set": {"max_bandwidth"},
}


def parse_request(line: bytes) -> ControlRequest:
    """A request line -> :class:`ControlRequest`.

    Raises:
        ControlError: ``bad_request`` for anything that is not a known verb with valid fields.
    """
    try:
        data = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ControlError("bad_request", f"not a JSON line: {exc}") from None
    if not isinstance(data, dict):
        raise ControlError("bad_request", f"a request is a JSON object, got {type(data).__name__}")
    request_id = data.get("id")
    verb = data.get("verb")
    if verb not in _FIELDS:
        raise _bad(f"unknown verb {verb!r} (verbs: {', '.join(VERBS)})", request_id)
    unknown = set(data) - _FIELDS[verb] - {"verb", "id"}
    if unknown:
        raise _bad(f"{verb}: unknown field(s) {', '.join(sorted(unknown))}", request_id)
    if verb == "recover":
        if "source" not in data:
            raise _bad("recover: the field 'source' (HOST:PORT or a socket path) is required", request_id)
        try:
            return ControlRequest(verb=verb, id=request_id, source=parse_source(data["source"]))
        except ValueError as exc:
            raise _bad(f"recover: {exc}", request_id) from None
    if verb == "set":
        if "max_bandwidth" not in data:
            raise _bad("set: the field 'max_bandwidth' is required", request_id)
        value = data["max_bandwidth"]
        if not (value is None or isinstance(value, (int, str))) or isinstance(value, bool):
            raise _bad(f"set: max_bandwidth must be an integer, a string like '500k', or null, got {value!r}",
                       request_id)
        try:
            return ControlRequest(verb=verb, id=request_id, max_bandwidth=parse_rate(value))
        except ValueError as exc:
            raise _bad(f"set: {exc}", request_id) from None
    if verb == "cancel" and "reason" in data:
        reason = data["reason"]
        if not isinstance(reason, str) or not reason or len(reason) > 1000:
            raise _bad("cancel: reason must be a non-empty string of at most 1000 characters", request_id)
        return ControlRequest(verb=verb, id=request_id, reason=reason)
    return ControlRequest(verb=verb, id=request_id)


def _bad(message: str, request_id: Any) -> ControlError:
    error = ControlError("bad_request", message)
    error.request_id = request_id  # type: ignore[attr-defined]
    return error


# ----------------------------------------------------------------------------- the server


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class OperatorPort:
    """All the operator server may use of the service (its public API).

    Attributes:
        status: a live :class:`OperatorStatus`.
        events: a new subscription: an async iterator of events that ends with the migration.
        recover: point the service at a new source address and reconnect now
            (raises ControlError ``bad_state`` once the migration is over).
        cancel: end the migration now, with a reason.
        set_max_bandwidth: cap the background stream (None: no cap).
    """

    status: Callable[[], OperatorStatus]
    events: Callable[[], AsyncIterator[OperatorEvent]]
    recover: Callable[[tuple[str, int] | str], None]
    cancel: Callable[[str], None]
    set_max_bandwidth: Callable[[int | None], None]


class OperatorServer:
    """Serves the control protocol on a Unix socket only the owner may use."""

    def __init__(self, port: OperatorPort, path: str) -> None:
        self._port = port
        self.path = path
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._streams: set[asyncio.Task[None]] = set()  #: connections streaming events

    async def start(self) -> None:
        """Create the socket (mode 0600, never readable by others even for an instant) and serve.

        Raises:
            OSError: the path exists or its directory is not writable.
        """
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            old = os.umask(0o177)  # bind creates the file with these bits: owner read and write only
            try:
                sock.bind(self.path)
            finally:
                os.umask(old)
            os.chmod(self.path, 0o600)
            sock.listen(16)
            sock.setblocking(False)
            self._server = await asyncio.start_unix_server(self._serve, sock=sock, limit=MAX_LINE)
        except BaseException:
            sock.close()
            raise

    async def close(self) -> None:
        """Stop accepting, end every connection, remove the socket file."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        if self._streams:  # let the last event (complete, failed) reach its subscribers
            await asyncio.wait(set(self._streams), timeout=1.0)
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 1.0)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            if not _same_user(writer.get_extra_info("socket")):
                await _write(writer, ControlError("forbidden", "only the service's user may control it").to_reply())
                return
            await self._requests(reader, writer)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._connections.discard(task)
            self._streams.discard(task)
            writer.close()

    async def _requests(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                line = await reader.readline()
            except (ValueError, asyncio.LimitOverrunError):
                await _write(writer, ControlError("too_long", f"a request line is at most {MAX_LINE} bytes")
                             .to_reply())
                return
            if not line:
                return
            if not line.strip():
                continue
            try:
                request = parse_request(line)
            except ControlError as exc:
                await _write(writer, exc.to_reply(getattr(exc, "request_id", None)))
                continue
            if request.verb == "events":
                await self._stream_events(request, writer)
                return
            await self._answer(request, writer)

    async def _answer(self, request: ControlRequest, writer: asyncio.StreamWriter) -> None:
        port = self._port
        reply: dict[str, Any] = {"ok": True}
        try:
            if request.verb == "status":
                reply["status"] = port.status().to_dict()
            elif request.verb == "recover":
                assert request.source is not None
                port.recover(request.source)
                reply["source"] = format_source(request.source)
            elif request.verb == "set":
                port.set_max_bandwidth(request.max_bandwidth)
                reply["max_bandwidth"] = request.max_bandwidth
            elif request.verb == "cancel":
                if port.status().state in ("complete", "failed", "cancelled"):
                    raise ControlError("bad_state", "the migration is already over")
        except ControlError as exc:
            await _write(writer, exc.to_reply(request.id))
            return
        except PostcopyError as exc:  # the service refused: the migration is over
            await _write(writer, ControlError("bad_state", str(exc)).to_reply(request.id))
            return
        except Exception as exc:  # a bug of ours: say so, then let the loop's handler show it
            await _write(writer, ControlError("internal", f"{type(exc).__name__}: {exc}").to_reply(request.id))
            raise
        if request.id is not None:
            reply["id"] = request.id
        await _write(writer, reply)
        if request.verb == "cancel":  # after the reply: the service may exit right after
            port.cancel(request.reason)

    async def _stream_events(self, request: ControlRequest, writer: asyncio.StreamWriter) -> None:
        events = self._port.events()
        task = asyncio.current_task()
        assert task is not None
        self._streams.add(task)
        reply: dict[str, Any] = {"ok": True, "protocol": PROTOCOL_VERSION}
        if request.id is not None:
            reply["id"] = request.id
        await _write(writer, reply)
        async for event in events:
            await _write(writer, event.to_dict())


async def _write(writer: asyncio.StreamWriter, data: Mapping[str, Any]) -> None:
    writer.write(json.dumps(data, default=str, separators=(",", ":")).encode() + b"\n")
    await writer.drain()


def _same_user(sock: socket.socket | None) -> bool:
    """The peer runs as our user, or as root (who could read the socket anyway)."""
    if sock is None:
        return False
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return False
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid in (os.getuid(), 0)


def wall_clock() -> float:
    """The time events are stamped with (seconds since the epoch)."""
    return time.time()
