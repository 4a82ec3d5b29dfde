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
* A loss with an error that is neither OSError nor PostcopyError is a bug in
  our own handling: the sink is failed at once and nothing is retried.

Bytes received on dropped connections are kept in
:attr:`SourceChannels.bytes_from_closed`, so the received count never goes back.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

from aiopostcopy.errors import MigrationAborted, PostcopyError, SourceLostError
from aiopostcopy.messages import Channel, Message, Pages
from aiopostcopy.transport.stream import FrameProtocol

__all__ = ["ChannelEvents", "SourceChannels"]

#: background bytes read per loop turn before the urgent channel gets a look in
_BACKGROUND_TURN_BYTES = 64 * 1024


class ChannelEvents(Protocol):
    """What happens to the channels, told to whoever owns them (the destination service)."""

    def channel_opened(self, channel: Channel, proto: FrameProtocol) -> None:
        """A channel is up; nothing has been sent on it yet."""

    def message_received(self, channel: Channel, msg: Message) -> None:
        """A message arrived on a channel."""

    def payload_sink(self, channel: Channel, header: Pages, nbytes: int) -> memoryview:
        """Where a Pages payload of ``nbytes`` on a channel lands."""

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
        deadline: seconds the source may stay unreachable before the migration
            is aborted (None: wait for an explicit abort).
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        source: tuple[str, int] | str,
        events: ChannelEvents,
        *,
        reconnect_interval: float,
        deadline: float | None,
    ) -> None:
        self.channels: dict[Channel, FrameProtocol] = {}
        self.bytes_from_closed = 0  #: bytes received on connections dropped so far
        self.source = source  #: where connections (and reconnections) go
        self._loop = loop
        self._events = events
        self._reconnect_interval = reconnect_interval
        self._deadline = deadline
        self._reconnect_task: asyncio.Task[None] | None = None

    async def connect(self) -> None:
        """Open the urgent channel, then the background one.

        Raises:
            OSError: the source could not be reached (a channel already open stays open).
        """
        for channel in (Channel.URGENT, Channel.BACKGROUND):
            proto = await self._open(channel)
            self.channels[channel] = proto
            self._events.channel_opened(channel, proto)

    def send(self, channel: Channel, msg: Message) -> None:
        """Send ``msg`` on ``channel`` if it is open; otherwise it is dropped."""
        proto = self.channels.get(channel)
        if proto is not None and proto.is_open:
            proto.send(msg)

    def hold_background(self) -> None:
        """Deliver no more background messages until :meth:`release_background`."""
        proto = self.channels.get(Channel.BACKGROUND)
        if proto is not None:
            proto.hold()

    def release_background(self) -> None:
        proto = self.channels.get(Channel.BACKGROUND)
        if proto is not None:
            proto.release()

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
        for proto in channels.values():
            self.bytes_from_closed += proto.bytes_received
            proto.abort()
        self._events.channels_dropped(tuple(channels))

    def cancel_reconnect(self) -> None:
        """Stop trying to reconnect (the migration is over)."""
        if self._reconnect_task is not None:
            self._reconnect_task.cancel()

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
            lambda msg: events.message_received(channel, msg),
            lambda exc: self._on_lost(channel, exc),
            payload_sink=lambda header, nbytes: events.payload_sink(channel, header, nbytes),
            yield_after=None if urgent else _BACKGROUND_TURN_BYTES,
        )
        if isinstance(self.source, str):
            _, proto = await self._loop.create_unix_connection(factory, self.source)
        else:
            _, proto = await self._loop.create_connection(factory, self.source[0], self.source[1])
        return proto

    def _on_lost(self, channel: Channel, exc: BaseException | None) -> None:
        if self.channels.get(channel) is None:
            return
        if exc is not None and not isinstance(exc, (OSError, PostcopyError)):
            self._events.source_failed(exc)  # a bug in our own handling: fail visibly
            return
        self.drop()
        error = SourceLostError(f"source closed the {channel.value} channel")
        error.__cause__ = exc
        if self._events.source_lost(error) and self._reconnect_task is None:
            self._reconnect_task = self._loop.create_task(self._reconnect(exc))

    async def _reconnect(self, cause: BaseException | None) -> None:
        give_up = None if self._deadline is None else time.monotonic() + self._deadline
        try:
            while True:
                await asyncio.sleep(self._reconnect_interval)
                try:
                    await self.connect()
                except OSError:
                    self.drop()
                    if give_up is not None and time.monotonic() > give_up:
                        err = SourceLostError("source unreachable past the deadline")
                        err.__cause__ = cause
                        self._events.source_failed(MigrationAborted(str(err)))
                        return
                    continue
                self._events.channels_restored()  # the session sends Resume when the source's Hello is back
                return
        finally:
            self._reconnect_task = None
