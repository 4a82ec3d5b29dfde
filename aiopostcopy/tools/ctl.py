"""The operator's side of the control socket: ``status``, ``events``, ``recover``, ``cancel``, ``set``.

Theory of operation
-------------------
:class:`ControlClient` speaks the JSON-lines protocol of docs/control.md to a
destination started with ``--control PATH``: one request line, one reply line;
``events`` turns the connection into a stream of event lines.  A reply with
``"ok": false`` raises :class:`ControlRefused` carrying the documented error
code.  The ``*_main`` functions are the command-line verbs built on it.

Exit status of the verbs: 0 done; 1 the service refused the request (the
reason on stderr), or ``status`` found the migration failed or cancelled; 2 bad
arguments; 3 the control socket cannot be reached (no such file, refused,
permission denied) or closed before replying.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import AsyncIterator
from typing import Any

from aiopostcopy.destination.operator import MAX_LINE, format_source, parse_rate, parse_source

__all__ = ["ControlClient", "ControlRefused", "ControlUnreachable", "add_control_arguments", "control_main"]

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3


class ControlRefused(Exception):
    """The service answered ``ok: false``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{message} ({code})")
        self.code = code


class ControlUnreachable(Exception):
    """The control socket could not be reached, or closed before replying."""


class ControlClient:
    """One connection to a destination's control socket.  Use ``async with``."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> "ControlClient":
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Raises: ControlUnreachable naming the path and the cause."""
        try:
            self._reader, self._writer = await asyncio.open_unix_connection(self.path, limit=16 * MAX_LINE)
        except OSError as exc:
            raise ControlUnreachable(f"cannot reach control socket {self.path}: {exc.strerror or exc}") from None

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            try:
                await self._writer.wait_closed()
            except OSError:
                pass
            self._writer = None

    async def request(self, verb: str, **fields: Any) -> dict[str, Any]:
        """Send one request; its reply (``ok`` true).

        Raises:
            ControlRefused: the service said no.
            ControlUnreachable: the connection closed before the reply.
        """
        assert self._writer is not None and self._reader is not None, "connect() first"
        self._writer.write(json.dumps({"verb": verb, **fields}).encode() + b"\n")
        try:
            await self._writer.drain()
            reply = await self._read()
        except OSError as exc:
            raise ControlUnreachable(f"control socket {self.path}: {exc.strerror or exc}") from None
        if reply is None:
            raise ControlUnreachable(f"control socket {self.path} closed before replying to {verb}")
        if not reply.get("ok"):
            error = reply.get("error") or {}
            raise ControlRefused(str(error.get("code", "error")), str(error.get("message", reply)))
        return reply

    async def _read(self) -> dict[str, Any] | None:
        assert self._reader is not None
        line = await self._reader.readline()
        if not line:
            return None
        return json.loads(line)

    async def status(self) -> dict[str, Any]:
        """The migration's status (docs/control.md, ``status``)."""
        return (await self.request("status"))["status"]

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """Event lines until the migration ends (the last is ``complete`` or ``failed``) or the socket closes."""
        await self.request("events")
        while True:
            try:
                event = await self._read()
            except OSError:
                return
            if event is None:
                return
            yield event

    async def recover(self, source: str | tuple[str, int]) -> str:
        """Switch the service to a new source address; the address as the service took it."""
        text = source if isinstance(source, str) else format_source(source)
        return (await self.request("recover", source=text))["source"]

    async def cancel(self, reason: str | None = None) -> None:
        await self.request("cancel", **({"reason": reason} if reason else {}))

    async def set_max_bandwidth(self, rate: int | str | None) -> int | None:
        """Cap the background stream (bytes per second, or a string like ``"500k"``; None or 0: no cap)."""
        return (await self.request("set", max_bandwidth=rate))["max_bandwidth"]


# ----------------------------------------------------------------------------- the command line


def _source(text: str) -> str:
    try:
        parse_source(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _rate(text: str) -> int:
    try:
        return parse_rate(text) or 0
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_control_arguments(sub: Any) -> None:
    """The verbs' subparsers (each with ``--control PATH``)."""
    def verb(name: str, help_text: str) -> argparse.ArgumentParser:
        parser = sub.add_parser(name, help=help_text)
        parser.add_argument("--control", required=True, metavar="PATH",
                            help="the destination's control socket (dest --control PATH)")
        return parser

    status = verb("status", "show a running migration (like QEMU's query-migrate)")
    status.add_argument("--json", action="store_true", help="one JSON object (with --watch: one per line)")
    status.add_argument("--watch", action="store_true", help="repeat until the migration ends")
    status.add_argument("--interval", type=float, default=1.0, help="seconds between --watch samples")
    verb("events", "stream events as JSON lines until the migration ends")
    recover = verb("recover", "switch to a new source address and resume (like QEMU's migrate_recover)")
    recover.add_argument("--source", required=True, type=_source, help="HOST:PORT or socket path of the new source")
    cancel = verb("cancel", "end the migration now (dest exits with status 4)")
    cancel.add_argument("--reason", default=None, help="said in the destination's report")
    settings = verb("set", "change a parameter of a running migration")
    settings.add_argument("--max-bandwidth", required=True, type=_rate, metavar="RATE",
                          help="background cap in bytes/s, optional k/M/G suffix (powers of 1000); 0: no cap")


async def control_main(args: argparse.Namespace) -> int:
    """Run one verb; the exit status (module docstring)."""
    try:
        async with ControlClient(args.control) as client:
            return await _VERBS[args.command](client, args)
    except ControlUnreachable as exc:
        print(f"aiopostcopy {args.command}: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except ControlRefused as exc:
        print(f"aiopostcopy {args.command}: refused: {exc}", file=sys.stderr)
        return EXIT_REFUSED


async def _status(client: ControlClient, args: argparse.Namespace) -> int:
    if not args.watch:
        return _show(await client.status(), args)
    # The service exits soon after the end: a second connection hears the last event even then.
    last = asyncio.ensure_future(_last_event(args.control))
    try:
        while True:
            try:
                status = await client.status()
            except ControlUnreachable:
                if not last.done():
                    raise
                status = None
            if last.done():
                return _show_end(last.result(), args)
            assert status is not None
            code = _show(status, args)
            if status["state"] in ("complete", "failed", "cancelled"):
                return code
            await asyncio.wait([last], timeout=max(args.interval, 0.05))
    finally:
        last.cancel()


def _show(status: dict[str, Any], args: argparse.Namespace) -> int:
    if args.json:
        print(json.dumps(status, default=str, indent=None if args.watch else 2), flush=True)
    else:
        print(format_status(status) + ("\n" if args.watch else ""), flush=True)
    return EXIT_REFUSED if status["state"] in ("failed", "cancelled") else EXIT_OK


def _show_end(event: dict[str, Any] | None, args: argparse.Namespace) -> int:
    """The migration ended between two samples: show its last event."""
    if event is None:
        raise ControlUnreachable(f"control socket {args.control} closed before the migration's end was seen")
    if args.json:
        print(json.dumps(event, default=str), flush=True)
    elif event["event"] == "complete":
        print(f"complete: {event['pages_total']} pages in {event['duration_s']:.2f} s"
              f"{'' if event['verified'] else ' (NOT verified: ' + str(event['integrity_pages']) + ' pages)'}",
              flush=True)
    else:
        print(f"{'cancelled' if event.get('cancelled') else 'failed'}: {event.get('error')}", flush=True)
    return EXIT_OK if event["event"] == "complete" and event.get("verified") else EXIT_REFUSED


async def _last_event(path: str) -> dict[str, Any] | None:
    """The last event of the migration (complete or failed), or None if the stream broke first."""
    last = None
    try:
        async with ControlClient(path) as client:
            async for event in client.events():
                last = event
    except (ControlUnreachable, ControlRefused, OSError, ValueError):
        return None
    return last if last is not None and last["event"] in ("complete", "failed") else None


async def _events(client: ControlClient, args: argparse.Namespace) -> int:
    async for event in client.events():
        print(json.dumps(event, default=str), flush=True)
    return EXIT_OK


async def _recover(client: ControlClient, args: argparse.Namespace) -> int:
    print(f"recovering from {await client.recover(args.source)}", file=sys.stderr)
    return EXIT_OK


async def _cancel(client: ControlClient, args: argparse.Namespace) -> int:
    await client.cancel(args.reason)
    return EXIT_OK


async def _set(client: ControlClient, args: argparse.Namespace) -> int:
    rate = await client.set_max_bandwidth(args.max_bandwidth or None)
    print(f"max-bandwidth {_human_rate(rate)}", file=sys.stderr)
    return EXIT_OK


_VERBS = {"status": _status, "events": _events, "recover": _recover, "cancel": _cancel, "set": _set}


def _human_rate(rate: float | None) -> str:
    if not rate:
        return "unlimited"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if rate >= scale:
            return f"{rate / scale:.1f} {unit}B/s"
    return f"{rate:.0f} B/s"


def format_status(s: dict[str, Any]) -> str:
    """A few human lines from a status object."""
    total = max(s["pages_total"], 1)
    kinds = s["pages_by_kind"]
    lat = s["service_latency_us"]
    remaining = s.get("remaining_s")
    lines = [
        f"{s['state']}: {s['pages_done']}/{s['pages_total']} pages ({100 * s['pages_done'] / total:.1f}%)"
        + (f"  error: {s['error']}" if s.get("error") else ""),
        f"  source {s['source']} ({'connected' if s['source_connected'] else 'NOT connected'}), "
        f"outages {s['outages']} ({s['outage_s']:.1f} s), resumes {s['resumes']}",
        f"  pages: demand {kinds['demand']}, background {kinds['background']}, zero {kinds['zero']}, "
        f"duplicate {kinds['duplicate']}",
        f"  {s['bytes_received'] / 1e6:.1f} MB received, {_human_rate(s['rate_bytes_per_s'])} now, "
        f"cap {_human_rate(s['max_bandwidth'])}, "
        + (f"about {remaining:.1f} s left" if remaining is not None else "time left unknown"),
        f"  fault latency us: p50 {lat['p50']:.0f} p90 {lat['p90']:.0f} p99 {lat['p99']:.0f} max {lat['max']:.0f}",
    ]
    for client, seconds in sorted(s["blocked_by_client_s"].items(), key=lambda kv: -kv[1]):
        lines.append(f"  blocked {seconds * 1e3:8.1f} ms  {client}")
    for thread in sorted(s["blocked_threads"], key=lambda t: -t["blocked_s"])[:10]:
        lines.append(f"  blocked {thread['blocked_s'] * 1e3:8.1f} ms  {thread['client']} pid {thread['pid']} "
                     f"tid {thread['tid']} ({thread['name']})")
    return "\n".join(lines)
