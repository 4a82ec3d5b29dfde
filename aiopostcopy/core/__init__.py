"""The I/O-free core: page bookkeeping and the two session state machines.

Nothing here imports asyncio, socket, cffi, os, time, the uffd layer or the
transport; time arrives as ``now`` (seconds, any monotonic clock).  The loop
(:mod:`aiopostcopy.loop`) feeds a :class:`DestinationSession` and carries out
the commands it returns; the source server feeds a :class:`SourceSession`.

Modules: ``ramblock`` (blocks, mapping tables), ``rangeset`` (page runs and
their arithmetic), ``pages`` (per-page state, one byte per page), ``waiters``,
``wakeups`` (who waits, and how they are woken), ``coalesce``, ``inflight``,
``link`` (the channels and the source's Hello), ``resume``, ``commands``,
``config``, ``stats`` (counters and frozen records), ``session``
(destination), ``source_session``, and ``pager`` (a self-served client's
bookkeeping, for :mod:`aiopostcopy.client`).
"""

from aiopostcopy.core.commands import (Abort, Command, DiscardPages, MigrationComplete,
                                       NotifyPlaced, Place, PlaceZero, UnknownFault, Wake)
from aiopostcopy.core.config import DestinationConfig, SourceConfig
from aiopostcopy.core.ramblock import BlockTable, MappingTable, RAMBlock
from aiopostcopy.core.rangeset import RangeSet
from aiopostcopy.core.session import DestinationSession
from aiopostcopy.core.source_session import SourceSession
from aiopostcopy.core.stats import DestinationStatistics, LatencyHistogram, SourceStatistics

__all__ = [
    "Abort", "Command", "DiscardPages", "MigrationComplete", "NotifyPlaced", "Place", "PlaceZero",
    "UnknownFault", "Wake", "DestinationConfig", "SourceConfig", "BlockTable", "MappingTable",
    "RAMBlock", "RangeSet", "DestinationSession", "SourceSession", "DestinationStatistics",
    "LatencyHistogram", "SourceStatistics",
]
