"""The destination's two channels to the source: the Hello that opens each, which are
open, what to send, flow control.

Theory of operation
-------------------
A channel is *open* from the source's Hello on it until the loop reports it
lost.  :func:`check_hello` holds the rules that Hello must meet (role,
channel, version, session, and the same blocks on every reconnection).  Messages are queued with their channel and drained in order by the
loop; when a channel is lost, what was queued for it is dropped (the
session re-creates what matters: a Resume and the pending requests).

Background flow control: payload bytes that arrive on the background
channel are counted; once ``ack_bytes`` have arrived an Ack for all of them
is queued, so the source's window reopens.  The count restarts when the
background channel is lost (the source resets its window on the new
connection too).  :func:`ack_threshold` keeps ``ack_bytes`` at most half the
window the source announced in its Hello, so a small window cannot stall the
sweep.
"""

from __future__ import annotations

from aiopostcopy import messages as m
from aiopostcopy.core.config import WINDOW_FEATURE
from aiopostcopy.core.ramblock import BlockTable
from aiopostcopy.errors import RemoteProtocolError

__all__ = ["Link", "check_hello", "ack_threshold"]

_URGENT = m.Channel.URGENT  # looked up once: an enum member costs a lookup per use


def check_hello(channel: m.Channel, msg: m.Hello, session_id: str, *,
                known: BlockTable | None) -> BlockTable:
    """Check a source's Hello and return its block table.

    Raises:
        RemoteProtocolError: wrong role/channel/version/session, no blocks,
            or blocks unlike before.
    """
    if msg.role is not m.Role.SOURCE or msg.channel is not channel:
        raise RemoteProtocolError(f"expected the source's Hello for the {channel.value} channel")
    if msg.version != m.PROTOCOL_VERSION:
        raise RemoteProtocolError(f"protocol version {msg.version} not supported", code="version")
    if msg.session_id != session_id:
        raise RemoteProtocolError(f"session {msg.session_id!r} is not ours", code="session")
    if not msg.blocks:
        raise RemoteProtocolError("the source's Hello lists no blocks")
    blocks = BlockTable.from_infos(msg.blocks)
    if known is not None and blocks != known:
        raise RemoteProtocolError("the source's block list differs from the one it sent before", code="session")
    return blocks


def ack_threshold(hello: m.Hello, ack_bytes: int) -> int:
    """Ack after this many background bytes: ``ack_bytes``, but at most half the
    window the source announced (feature ``background-window=<bytes>``)."""
    for feature in hello.features:
        if feature.startswith(WINDOW_FEATURE) and feature[len(WINDOW_FEATURE):].isdigit():
            return max(1, min(ack_bytes, int(feature[len(WINDOW_FEATURE):]) // 2))
    return ack_bytes


class Link:
    """Channel state and outgoing queue of a destination session.

    Args:
        ack_bytes: background payload bytes that trigger an Ack.
    """

    __slots__ = ("ack_bytes", "open", "lost", "_unacked", "_queue")

    def __init__(self, ack_bytes: int) -> None:
        self.ack_bytes = ack_bytes
        self.open: set[m.Channel] = set()
        self.lost = False  #: a channel was lost since the last Resume
        self._unacked = 0
        self._queue: list[tuple[m.Channel, m.Message]] = []

    def send(self, channel: m.Channel, msg: m.Message) -> None:
        """Queue ``msg`` for ``channel``."""
        self._queue.append((channel, msg))

    def send_open(self, msg: m.Message) -> None:
        """Queue ``msg`` on every open channel, urgent first."""
        for channel in (m.Channel.URGENT, m.Channel.BACKGROUND):
            if channel in self.open:
                self.send(channel, msg)

    def drain(self) -> list[tuple[m.Channel, m.Message]]:
        """Everything queued, in order; the queue is emptied."""
        result, self._queue = self._queue, []
        return result

    def opened(self, channel: m.Channel) -> None:
        """The source's Hello arrived on ``channel``."""
        self.open.add(channel)

    def closed(self, channel: m.Channel) -> None:
        """``channel`` broke: drop what was queued for it."""
        self.open.discard(channel)
        self.lost = True
        self._queue = [(ch, msg) for ch, msg in self._queue if ch is not channel]
        if channel is m.Channel.BACKGROUND:
            self._unacked = 0

    def background_bytes(self, nbytes: int) -> None:
        """Payload bytes arrived on the background channel."""
        self._unacked += nbytes

    def urgent_ready(self) -> bool:
        """The urgent channel is open and nothing is queued (a frame sent now keeps the order)."""
        return not self._queue and _URGENT in self.open

    @property
    def pending(self) -> bool:
        """Messages are queued, or an Ack is due."""
        return bool(self._queue) or (self._unacked >= self.ack_bytes and m.Channel.BACKGROUND in self.open)

    def ack_if_due(self) -> None:
        """Queue an Ack when enough background bytes arrived and the channel is open."""
        if self._unacked >= self.ack_bytes and m.Channel.BACKGROUND in self.open:
            self.send(m.Channel.BACKGROUND, m.Ack(nbytes=self._unacked))
            self._unacked = 0
