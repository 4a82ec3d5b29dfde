"""Commands: what the destination session asks the loop to carry out.

Theory of operation
-------------------
The session decides; the loop acts.  :meth:`DestinationSession.commands()
<aiopostcopy.core.session.DestinationSession.commands>` returns these in the
order they must be carried out.  Each is a frozen, slotted dataclass with
only integers, keys and tuples in it: no buffers, no fds.

Contract with the loop, per command:

* :class:`Place` / :class:`PlaceZero`: place the pages (UFFDIO_COPY from the
  payload of the Pages message just passed to ``message_received``, at
  ``payload_offset`` pages into it; UFFDIO_ZEROPAGE), then call
  ``placed(block, first, count, now, existed_pages=...)``, or
  ``placement_failed(...)`` if it could not.  Drain the commands before the
  payload buffer is reused.
* :class:`DiscardPages`: drop the pages from memory (madvise(DONTNEED), or
  fallocate(PUNCH_HOLE) on hugetlbfs).
* :class:`Wake`: UFFDIO_WAKE ``[start, start + length)`` on fd ``key``.
* :class:`NotifyPlaced`: tell self-served client ``key`` these runs are in.
* :class:`UnknownFault`: a fd faulted outside its mapping table: warn, and
  treat the client as broken (its thread stays blocked until retired).
* :class:`MigrationComplete`: every page is placed; unregister and report.
* :class:`Abort`: the migration is over without every page (deadline or
  explicit abort); report, never zero-fill.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable
from typing import Union

from aiopostcopy.messages import PageRun

__all__ = ["Place", "PlaceZero", "DiscardPages", "Wake", "NotifyPlaced", "UnknownFault",
           "MigrationComplete", "Abort", "Command"]

_command = dataclasses.dataclass(frozen=True, slots=True)


@_command
class Place:
    """Place ``count`` pages at ``block``/``first`` from the payload, starting at its page ``payload_offset``.

    ``zeros``: stretches of the run that are zero pages and have no payload
    (flattened half-open bounds relative to ``first``, as ``Pages.zeros``);
    the payload holds the other pages in order.
    """

    block: int
    first: int
    count: int
    payload_offset: int
    zeros: tuple[int, ...] = ()


@_command
class PlaceZero:
    """Fill ``count`` pages of ``block`` from ``first`` with zeros (UFFDIO_ZEROPAGE)."""

    block: int
    first: int
    count: int


@_command
class DiscardPages:
    """Drop pages the source discarded; they are missing again."""

    block: int
    first: int
    count: int


@_command
class Wake:
    """Wake ``[start, start + length)`` on the userfaultfd named ``key``."""

    key: Hashable
    start: int
    length: int


@_command
class NotifyPlaced:
    """Tell a self-served client that these runs it asked for are placed."""

    key: Hashable
    runs: tuple[PageRun, ...]


@_command
class UnknownFault:
    """Fd ``key`` faulted at an address its mapping table does not cover."""

    key: Hashable
    address: int
    thread_id: int


@_command
class MigrationComplete:
    """Every page of every block is placed (emitted once)."""


@_command
class Abort:
    """The migration ended before every page arrived; ``reason`` says why."""

    reason: str


Command = Union[Place, PlaceZero, DiscardPages, Wake, NotifyPlaced, UnknownFault,
                MigrationComplete, Abort]
