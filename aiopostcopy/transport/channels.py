"""The destination's connections to the source: opening them, losing them, getting them back.

Theory of operation
-------------------
:class:`SourceChannels` owns the destination service's two connections to the
source, urgent and background (:attr:`SourceChannels.channels`), and the one
task that reconnects them.  It decides nothing about what they carry:
messages and payload buffers go to the service's callbacks, and the service
says what is sent.

* Connecting opens the urgent channel, then the background one.  Each is
  handed to the service (``on_open``) as soon as it is up, before anything
  else is sent on it: the service holds a background channel while its
  staging buffers are all out, and sends the session's Hello.
* Losing either channel drops both: a reconnect always replaces the pair.
  Both are aborted, then the service is told which channels went
  (``on_drop``): it gives back a buffer whose payload was cut short and tells
  the session.
* Before the handshake is done (the ``hello`` future), a loss is final: the
  future fails with SourceLostError.  After it, one reconnect task tries every
  ``reconnect_interval`` until both channels are up again (``on_reconnect``:
  the session sends Resume when the source's Hello is back) or the source has
  been unreachable past the ``deadline``, which aborts the migration.
* A loss with an error that is neither OSError nor PostcopyError is a bug in
  our own handling: the service fails at once and nothing is retried.  Once
  the migration is over (the ``done`` future), losses are ignored.

Bytes received on dropped connections are kept in
:attr:`SourceChannels.bytes_from_closed`, so the received count never goes back.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from aiopostcopy.errors import MigrationAborted, PostcopyError, SourceLostError
from aiopostcopy.messages import Channel, Hello, Message, Pages
from aiopostcopy.transport.stream import FrameProtocol

__all__ = ["SourceChannels"]

#: background bytes read per loop turn before the urgent channel gets a look in
_BACKGROUND_TURN_BYTES = 64 * 1024


class SourceChannels:
    """The urgent and background channels to the source, and their reconnection.

    Args:
        loop: the service's event loop.
        source: ``(host, port)`` for TCP, or a Unix socket path.
        reconnect_interval: seconds between attempts after the source is lost.
        deadline: seconds the source may stay unreachable before the migration
            is aborted (None: wait for an explicit abort).
        hello: the service's handshake future, failed if the source goes before it is done.
        done: the migration's outcome; once it is done, nothing is retried.
        on_message: a message arrived on a channel.
        payload_sink: where a Pages payload of ``nbytes`` on a channel lands.
        on_open: a channel is up; nothing has been sent on it yet.
        on_drop: channels were dropped (aborted), in the order they were opened.
        on_reconnect: both channels are up again after a loss.
        fail: fail the service with an error.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        source: tuple[str, int] | str,
        *,
        reconnect_interval: float,
        deadline: float | None,
        hello: asyncio.Future[Hello],
        done: asyncio.Future[Any],
        on_message: Callable[[Channel, Message], None],
        payload_sink: Callable[[Channel, Pages, int], memoryview],
        on_open: Callable[[Channel, FrameProtocol], None],
        on_drop: Callable[[tuple[Channel, ...]], None],
        on_reconnect: Callable[[], None],
        fail: Callable[[BaseException], None],
    ) -> None:
        self.channels: dict[Channel, FrameProtocol] = {}
        self.bytes_from_closed = 0  #: bytes received on connections dropped so far
        self._loop = loop
        self._source = source
        self._reconnect_interval = reconnect_interval
        self._deadline = deadline
        self._hello = hello
        self._done = done
        self._on_message = on_message
        self._payload_sink = payload_sink
        self._on_open = on_open
        self._on_drop = on_drop
        self._on_reconnect = on_reconnect
        self._fail = fail
        self._reconnect_task: asyncio.Task[None] | None = None

    async def connect(self) -> None:
        """Open the urgent channel, then the background one.

        Raises:
            OSError: the source could not be reached (a channel already open stays open).
        """
        for channel in (Channel.URGENT, Channel.BACKGROUND):
            proto = await self._open(channel)
            self.channels[channel] = proto
            self._on_open(channel, proto)

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
        """Close the open channels, sending ``farewell`` on the urgent one first."""
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
        self._on_drop(tuple(channels))

    async def stop_reconnecting(self) -> None:
        """Cancel the reconnect task, if one runs, and wait for it to end."""
        task = self._reconnect_task
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _open(self, channel: Channel) -> FrameProtocol:
        urgent = channel is Channel.URGENT
        factory = lambda: FrameProtocol(  # noqa: E731
            lambda msg: self._on_message(channel, msg),
            lambda exc: self._on_lost(channel, exc),
            payload_sink=lambda header, nbytes: self._payload_sink(channel, header, nbytes),
            yield_after=None if urgent else _BACKGROUND_TURN_BYTES,
        )
        if isinstance(self._source, str):
            _, proto = await self._loop.create_unix_connection(factory, self._source)
        else:
            _, proto = await self._loop.create_connection(factory, self._source[0], self._source[1])
        return proto

    def _on_lost(self, channel: Channel, exc: BaseException | None) -> None:
        if self.channels.get(channel) is None or self._done.done():
            return
        if exc is not None and not isinstance(exc, (OSError, PostcopyError)):
            self._fail(exc)  # a bug in our own handling: fail visibly
            return
        self.drop()
        if not self._hello.done():
            self._hello.set_exception(SourceLostError(f"source closed the {channel.value} channel"))
            return
        if self._reconnect_task is None:
            self._reconnect_task = self._loop.create_task(self._reconnect(exc))

    async def _reconnect(self, cause: BaseException | None) -> None:
        give_up = None if self._deadline is None else time.monotonic() + self._deadline
        try:
            while not self._done.done():
                await asyncio.sleep(self._reconnect_interval)
                try:
                    await self.connect()
                except OSError:
                    self.drop()
                    if give_up is not None and time.monotonic() > give_up:
                        err = SourceLostError("source unreachable past the deadline")
                        err.__cause__ = cause
                        self._fail(MigrationAborted(str(err)))
                        return
                    continue
                self._on_reconnect()  # the session sends Resume when the source's Hello is back
                return
        finally:
            self._reconnect_task = None
