"""The source's record of which discards the destination has surely seen.

Theory of operation
-------------------
A Discard must reach the destination *after* any stale copy of its pages,
and a stale copy may be in flight on either channel.  So a discard goes on
every open channel, each followed by a Ping whose Pong confirms that the
destination processed the Discard on that channel (a channel is ordered).
A closed channel needs nothing: its old connection can deliver no more.

A discard becomes *suspect* when the destination may hold a stale copy
without having processed the Discard: a channel broke before its Pong came
back, or no channel was open at all.  The next Resume says which pages the
destination holds; suspect pages among them are discarded again (with new
Pings), the rest need nothing (the destination will get a fresh copy).

Tokens of these Pings start at 2**62, apart from any keep-alive tokens the
server uses; a Pong with an unknown token is ignored.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from aiopostcopy import messages as m
from aiopostcopy.core.rangeset import RangeSet

__all__ = ["DiscardTracker"]

TOKEN_BASE = 1 << 62
_CHANNELS = (m.Channel.URGENT, m.Channel.BACKGROUND)


class DiscardTracker:
    """Discards sent, confirmed, and suspect.

    Args:
        blocks: number of blocks.
    """

    __slots__ = ("_next", "_unconfirmed", "_suspect")

    def __init__(self, blocks: int) -> None:
        self._next = TOKEN_BASE
        self._unconfirmed: dict[m.Channel, dict[int, tuple[int, int, int]]] = {c: {} for c in _CHANNELS}
        self._suspect = [RangeSet() for _ in range(blocks)]

    @property
    def unconfirmed(self) -> int:
        """Discards sent and not yet confirmed, summed over channels."""
        return sum(len(waiting) for waiting in self._unconfirmed.values())

    def issue(self, block: int, start: int, stop: int,
              open_channels: Collection[m.Channel]) -> list[tuple[m.Channel, m.Message]]:
        """Messages that discard pages ``[start, stop)`` of ``block``: Discard + Ping per open channel."""
        if not open_channels:
            self._suspect[block].add(start, stop)
            return []
        out: list[tuple[m.Channel, m.Message]] = []
        for channel in _CHANNELS:
            if channel in open_channels:
                token, self._next = self._next, self._next + 1
                self._unconfirmed[channel][token] = (block, start, stop)
                out.append((channel, m.Discard(block=block, first=start, count=stop - start)))
                out.append((channel, m.Ping(token=token)))
        return out

    def confirmed(self, channel: m.Channel, token: int) -> None:
        """A Pong came back on ``channel``."""
        self._unconfirmed[channel].pop(token, None)

    def lost(self, channel: m.Channel) -> None:
        """``channel`` broke: what it had not confirmed becomes suspect."""
        for block, start, stop in self._unconfirmed[channel].values():
            self._suspect[block].add(start, stop)
        self._unconfirmed[channel].clear()

    def replay(self, received: Sequence[RangeSet]) -> list[tuple[int, int, int]]:
        """After a Resume: suspect runs the destination holds, to discard again; forgets the rest."""
        runs = [(block, low, high)
                for block, suspect in enumerate(self._suspect)
                for start, stop in suspect
                for low, high in received[block].intersection(start, stop)]
        self._suspect = [RangeSet() for _ in self._suspect]
        return runs
