"""The destination's connections to the source: opening them, losing them, getting them back.

Theory of operation
-------------------
:class:`SourceChannels` owns the destination service's two connections to the
source, urgent and background (:attr:`SourceChannels.channels`), and the one
task that reconnects them.  It decides nothing about what they carry:
everything that happens to them goes to one event sink
(:class:`ChannelEvents`), and the service says what is sent.

* Connecting opens the urgent channel, then the background one.  Each is
  handed to the sink (``channel_opened``) as soon as it is up, before anything
  else is sent on it: the service holds a background channel while its
  staging buffers are all out, and sends the session's Hello.
* Losing either channel drops both: a reconnect always replaces the pair.
  Both are aborted, then the sink is told which channels went
  (``channels_dropped``): it gives back a buffer whose payload was cut short
  and tells the session.
* The sink decides whether a loss is worth a reconnect (``source_lost``):
  before the handshake it is final, and once the migration is over it is
  ignored.  Otherwise one reconnect task tries every ``reconnect_interval``
  until both channels are up again (``channels_restored``: the session sends
  Resume when the source's Hello is back) or the source has been unreachable
  past the ``deadline``, which fails the migration (``source_failed``).
* A protocol error with code ``version``, ``session``, ``busy`` or
  ``aborted`` (sent or received) ends the migration: reconnecting cannot help.
* A loss with an error that is neither OSError nor PostcopyError is a bug in
  our own handling: the sink is failed at once and nothing is retried.
* A watchdog looks every second.  Connections on which nothing arrived for a
  while get a Ping (after the source's Hello); after ``idle_timeout`` seconds
  of silence they are dropped like a broken connection (a source that accepts
  and never speaks fails the handshake).  ``deadline`` counts seconds without
  *progress*: messages that carry the migration forward (Pages, Zero, Discard,
  Done), not a connect, a Hello or an Error, so a peer that accepts and then
  sends nothing useful, or bad frames, ends the migration as surely as one
  that cannot be reached.  Every loss and reconnection is logged with its cause.

:meth:`SourceChannels.redirect` (an operator's ``recover``) sends every
connection from then on to a new address: an outage's next attempt starts at
once (an attempt already under way finishes first), channels still open to the
old source are dropped as after a loss, and the deadline starts again.

Bytes received on dropped connections are kept in
:attr:`SourceChannels.bytes_from_closed`, so the received count never goes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import ssl
import time
from collections.abc import Callable
from typing import Protocol

from aiopostcopy.errors import MigrationAborted, PostcopyError, ProtocolError, SourceLostError, TlsHandshakeError
from aiopostcopy.messages import Channel, Discard, Done, Hello, Message, Pages, Ping, Zero
from aiopostcopy.transport.stream import FrameProtocol
from aiopostcopy.transport.tls import check_context, describe_tls_error
from aiopostcopy.transport.wire import Decoder

__all__ = ["ChannelEvents", "SourceChannels"]

#: background bytes read per loop turn before the urgent channel gets a look in
_BACKGROUND_TURN_BYTES = 64 * 1024
#: seconds without a byte from the source before its connections count as broken
IDLE_TIMEOUT = 5.0
_TICK = 1.0  #: seconds between watchdog looks (at most; a third of the idle timeout if shorter)
#: messages that are progress of the migration; a peer that only says Hello, Ping or Error makes none
_PROGRESS = frozenset({Pages, Zero, Discard, Done})
#: error codes after which reconnecting cannot help: the migration ends with a report
_FINAL_CODES = frozenset({"version", "session", "busy", "aborted"})

log = logging.getLogger("aiopostcopy.dest")


class ChannelEvents(Protocol):
    """What happens to the channels, told to whoever owns them (the destination service)."""

    def channel_opened(self, channel: Channel, proto: FrameProtocol) -> None:
        """A channel is up; nothing has been sent on it yet."""

    def message_received(self, channel: Channel, msg: Message) -> None:
        """A message arrived on a channel."""

    def payload_sink(self, channel: Channel, header: Pages, nbytes: int) -> memoryview:
        """Where a Pages payload of ``nbytes`` on a channel lands."""

    def page_sink(self, block: int, page: int, nbytes: int) -> memoryview | None:
        """Where the payload of a one-page Pages on the urgent channel lands (a demand page's
        answer); None: the general way (``payload_sink``, then ``message_received``)."""

    def page_landed(self, block: int, page: int) -> None:
        """A page :meth:`page_sink` took is in its memory (instead of ``message_received``)."""

    def read_first(self, decoder: Decoder) -> None:
        """Bytes arrived on the urgent channel: whole frames may be taken from ``decoder`` before
        it decodes them (:meth:`Decoder.unread`, :meth:`Decoder.skip`; then :meth:`SourceChannels.note_progress`)."""

    def channels_dropped(self, channels: tuple[Channel, ...]) -> None:
        """Channels were dropped (aborted), in the order they were opened."""

    def source_lost(self, error: SourceLostError) -> bool:
        """The source went away; return True to reconnect."""

    def channels_restored(self) -> None:
        """Both channels are up again after a loss."""

    def source_failed(self, exc: BaseException) -> None:
        """Give up: the deadline passed, or our own handling raised a bug."""


class SourceChannels:
    """The urgent and background channels to the source, and their reconnection.

    Args:
        loop: the service's event loop.
        source: ``(host, port)`` for TCP, or a Unix socket path.
        events: told everything that happens to the channels.
        reconnect_interval: seconds between attempts after the source is lost.
        deadline: seconds without progress from the source (pages, zero runs,
            discards or Done, whatever the cause: unreachable, silent, answering
            with errors) before the migration is aborted (None: wait for an
            explicit abort).
        idle_timeout: seconds without a byte on the open connections before
            they count as broken (None: never); the source is pinged meanwhile.
        tls: open both channels over TLS with this client context (it must
            require and check the source's certificate); None: plain.
        server_name: the name the source's certificate must carry (default:
            the host part of the source's TCP address; required for a Unix path).

    Raises:
        ValueError: a TLS context that does not authenticate the source.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        source: tuple[str, int] | str,
        events: ChannelEvents,
        *,
        reconnect_interval: float,
        deadline: float | None,
        idle_timeout: float | None = IDLE_TIMEOUT,
        tls: ssl.SSLContext | None = None,
        server_name: str | None = None,
    ) -> None:
        if tls is not None:
            check_context(tls, server=False)
        self._tls = tls
        self._server_name = server_name
        self.channels: dict[Channel, FrameProtocol] = {}
        self.bytes_from_closed = 0  #: bytes received on connections dropped so far
        self.source = source  #: where connections (and reconnections) go
        self.last_progress = time.monotonic()  #: when the source last sent data (see _PROGRESS)
        self.outages = 0  #: times the source was lost after the handshake
        self._loop = loop
        self._events = events
        self._reconnect_interval = reconnect_interval
        self._deadline = deadline
        self._idle_timeout = idle_timeout
        self._reconnect_task: asyncio.Task[None] | None = None
        self._progress = self._progress_seen = 0  # data messages received, and as of the last tick
        self._heard: set[Channel] = set()  # channels whose source Hello arrived: Ping is allowed
        self._rx_seen, self._rx_at = 0, time.monotonic()
        self._pings = itertools.count(1)
        self._watchdog: asyncio.TimerHandle | None = None
        self._lost_because: str | None = None
        self._stopped = False  # given up: no channel is opened any more
        self._retry_now = asyncio.Event()  #: set by :meth:`redirect`: the next attempt goes at once

    async def connect(self) -> None:
        """Open the urgent channel, then the background one.

        Raises:
            OSError: the source could not be reached (a channel already open stays open).
        """
        if self._watchdog is None:
            self._arm_watchdog()
        for channel in (Channel.URGENT, Channel.BACKGROUND):
            proto = await self._open(channel)
            if self._stopped:  # given up while this one was connecting
                proto.abort()
                return
            if not proto.is_open:  # accepted, then closed before we could say Hello (a dying source)
                raise ConnectionResetError(f"the source at {_where(self.source)} closed the "
                                           f"{channel.value} connection at once")
            self.channels[channel] = proto
            self._events.channel_opened(channel, proto)
        self._rx_at = time.monotonic()  # the silence clock starts with the new connections

    def send(self, channel: Channel, msg: Message) -> None:
        """Send ``msg`` on ``channel`` if it is open; otherwise it is dropped."""
        proto = self.channels.get(channel)
        if proto is not None and proto.is_open:
            proto.send(msg)

    def send_frame(self, channel: Channel, frame: bytes) -> None:
        """Send an already-encoded frame on ``channel`` if it is open; otherwise it is dropped."""
        proto = self.channels.get(channel)
        if proto is not None and proto.is_open:
            proto.send_frames((frame,))

    def urgent_fd(self) -> int:
        """The urgent connection's socket when a frame written to it now keeps the channel's order
        (a plain connection, open, nothing queued: :meth:`FrameProtocol.idle_fd`); -1 otherwise."""
        proto = self.channels.get(Channel.URGENT)
        return -1 if proto is None or self._tls is not None else proto.idle_fd()

    def hold_background(self) -> None:
        """Deliver no more background messages until :meth:`release_background`."""
        proto = self.channels.get(Channel.BACKGROUND)
        if proto is not None:
            proto.hold()

    def release_background(self) -> None:
        proto = self.channels.get(Channel.BACKGROUND)
        if proto is not None:
            proto.release()

    def redirect(self, source: tuple[str, int] | str) -> None:
        """Connect to ``source`` from now on, at once: drop channels still open to the old one
        (as after a loss) or cut the current outage's wait short; the deadline starts again."""
        if self._reconnect_task is None and self.channels:
            self.drop()
            self._lost(f"left it for {_where(source)} (recover)", None)
        self.source = source
        self.last_progress = time.monotonic()
        self._retry_now.set()

    def close(self, farewell: Message | None = None) -> None:
        """Stop reconnecting; close the open channels, sending ``farewell`` on the urgent one first."""
        self.cancel_reconnect()
        for channel, proto in self.channels.items():
            if proto.is_open:
                if farewell is not None and channel is Channel.URGENT:
                    proto.send(farewell)
                proto.close()

    def drop(self) -> None:
        """Abort both channels and tell the service (a reconnect replaces both)."""
        channels, self.channels = self.channels, {}
        self._heard.clear()
        self._rx_seen = -1
        for proto in channels.values():
            self.bytes_from_closed += proto.bytes_received
            proto.abort()
        self._events.channels_dropped(tuple(channels))

    def cancel_reconnect(self) -> None:
        """Stop trying to reconnect and watching the source (the migration is over)."""
        if self._reconnect_task is not None:
            self._reconnect_task.cancel()
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    async def stop_reconnecting(self) -> None:
        """Cancel the reconnect task, if one runs, and wait for it to end."""
        task = self._reconnect_task
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _open(self, channel: Channel) -> FrameProtocol:
        urgent = channel is Channel.URGENT
        events = self._events
        factory = lambda: FrameProtocol(  # noqa: E731
            lambda msg: self._received(channel, msg),
            lambda exc: self._on_lost(channel, exc),
            payload_sink=lambda header, nbytes: events.payload_sink(channel, header, nbytes),
            page_sink=events.page_sink if urgent else None,
            on_page=self._page_landed if urgent else None,
            read_first=events.read_first if urgent else None,
            yield_after=None if urgent else _BACKGROUND_TURN_BYTES,
        )
        if self._tls is not None:
            return await self._open_tls(factory)
        if isinstance(self.source, str):
            _, proto = await self._loop.create_unix_connection(factory, self.source)
        else:
            _, proto = await self._loop.create_connection(factory, self.source[0], self.source[1])
        return proto

    async def _open_tls(self, factory: Callable[[], FrameProtocol]) -> FrameProtocol:
        """Connect and complete the TLS handshake.

        Raises:
            TlsHandshakeError: the handshake failed (certificate, name, a peer without TLS).
            OSError: the source could not be reached.
        """
        source = self.source
        name = self._server_name or (None if isinstance(source, str) else source[0])
        if name is None:
            raise TlsHandshakeError(f"TLS to the Unix socket {source} needs the source's certificate name "
                                    "(--tls-server-name)")
        try:
            if isinstance(source, str):
                _, proto = await self._loop.create_unix_connection(factory, source, ssl=self._tls,
                                                                   server_hostname=name)
            else:
                _, proto = await self._loop.create_connection(factory, source[0], source[1], ssl=self._tls,
                                                              server_hostname=name)
        except ssl.SSLError as exc:
            raise _tls_failed(source, exc) from exc
        return proto

    def _received(self, channel: Channel, msg: Message) -> None:
        kind = type(msg)
        if kind in _PROGRESS:
            self._progress += 1
        elif kind is Hello:
            self._heard.add(channel)
        self._events.message_received(channel, msg)

    def note_progress(self, messages: int) -> None:
        """``messages`` data messages were taken from a channel by :meth:`ChannelEvents.read_first`."""
        self._progress += messages

    def _page_landed(self, block: int, page: int) -> None:
        self._progress += 1  # a Pages message, in the one-page lane's form
        self._events.page_landed(block, page)

    def _on_lost(self, channel: Channel, exc: BaseException | None) -> None:
        if self.channels.get(channel) is None:
            return
        if exc is not None and not isinstance(exc, (OSError, PostcopyError)):
            self._events.source_failed(exc)  # a bug in our own handling: fail visibly
            return
        if isinstance(exc, ProtocolError) and exc.code in _FINAL_CODES:  # docs/protocol.md section 6
            self._give_up(SourceLostError(f"the source at {_where(self.source)} cannot go on with this "
                                          f"migration ({exc.code}): {exc}"))
            return
        self.drop()
        self._lost(f"{exc}" if exc is not None else f"the source closed the {channel.value} channel", exc)

    def _lost(self, why: str, exc: BaseException | None) -> None:
        """The channels were dropped: tell the sink, and reconnect if it wants."""
        if isinstance(exc, ssl.SSLError):  # TLS 1.3: the source refuses our certificate after our handshake
            error: SourceLostError = _tls_failed(self.source, exc)
            why = describe_tls_error(exc)
        else:
            error = SourceLostError(f"lost the source at {_where(self.source)}: {why}")
        error.__cause__ = exc
        if self._events.source_lost(error) and self._reconnect_task is None:
            self.outages += 1
            self._lost_because = why
            log.warning("lost the source at %s (%s); reconnecting every %.1f s", _where(self.source), why,
                        self._reconnect_interval)
            self._reconnect_task = self._loop.create_task(self._reconnect())

    async def _reconnect(self) -> None:
        lost_at = time.monotonic()
        try:
            while True:
                await self._pause()
                try:
                    await self.connect()
                except OSError as exc:
                    self.drop()
                    self._lost_because = f"cannot connect: {exc}"
                    continue
                except TlsHandshakeError as exc:  # the source may come back with the right certificate
                    self.drop()
                    self._lost_because = str(exc)
                    continue
                log.warning("reconnected to the source at %s after %.1f s", _where(self.source),
                            time.monotonic() - lost_at)
                self._events.channels_restored()  # the session sends Resume when the source's Hello is back
                return
        finally:
            self._reconnect_task = None

    async def _pause(self) -> None:
        """Wait ``reconnect_interval``, or less if :meth:`redirect` says go."""
        if not self._retry_now.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._retry_now.wait(), self._reconnect_interval)
        self._retry_now.clear()

    # -- the watchdog: silence, pings and the deadline ------------------------------

    def _arm_watchdog(self) -> None:
        tick = _TICK if self._idle_timeout is None else min(_TICK, self._idle_timeout / 3)
        self._watchdog = self._loop.call_later(tick, self._on_watchdog)

    def _on_watchdog(self) -> None:
        """Every tick: note progress, end the migration past the deadline, ping a quiet source,
        drop connections that stayed silent for the idle timeout."""
        self._watchdog = None
        now = time.monotonic()
        if self._progress != self._progress_seen:
            self._progress_seen, self.last_progress = self._progress, now
        if self._deadline is not None and now - self.last_progress > self._deadline:
            why = self._lost_because or "connected, but no pages arrived"
            self._give_up(SourceLostError(f"no progress from the source at {_where(self.source)} for "
                                          f"{now - self.last_progress:.0f} s (deadline {self._deadline:g} s): {why}"))
            return
        if self.channels:
            self._check_silence(now)
        self._arm_watchdog()

    def _check_silence(self, now: float) -> None:
        received = sum(proto.bytes_received for proto in self.channels.values())
        if received != self._rx_seen:
            self._rx_seen, self._rx_at = received, now
            return
        quiet = now - self._rx_at
        if self._idle_timeout is not None and quiet >= self._idle_timeout:
            channel = next(iter(self.channels))
            self._on_lost(channel, SourceLostError(f"nothing received for {quiet:.1f} s"))
            return
        for channel in self._heard & self.channels.keys():  # a Ping only after the source's Hello
            self.send(channel, Ping(token=next(self._pings)))

    def _give_up(self, error: SourceLostError) -> None:
        """The deadline passed: fail the handshake, or end the migration."""
        self._stopped = True
        self.cancel_reconnect()
        self.drop()
        if self._events.source_lost(error):  # the caller reports the failure
            self._events.source_failed(MigrationAborted(str(error)))


def _tls_failed(source: tuple[str, int] | str, exc: ssl.SSLError) -> TlsHandshakeError:
    return TlsHandshakeError(f"TLS handshake with the source at {_where(source)} failed: {describe_tls_error(exc)}")


def _where(source: tuple[str, int] | str) -> str:
    return source if isinstance(source, str) else f"{source[0]}:{source[1]}"
