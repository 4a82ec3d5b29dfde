"""The Resume a destination sends first after a reconnection.

Theory of operation
-------------------
Losing a channel forgets nothing (see :mod:`aiopostcopy.core.session`): when
the urgent channel is back, one Resume tells the source what the destination
already holds and what it still waits for.

* ``received``: per block, the pages PLACED or PLACING (arriving counts as
  received: the copy is in hand), as flattened bounds from the block's page
  states.  Past ``max_resume_runs`` runs the rest is left out; that only
  costs the source sending those pages again.
* ``pending``: the REQUESTED runs, oldest first; those beyond ``max_runs``
  are returned to be sent as Requests right after the Resume.
"""

from __future__ import annotations

from collections.abc import Sequence

from aiopostcopy import messages as m
from aiopostcopy.core.pages import REQUESTED, PageStates

__all__ = ["resume_for", "requested_runs"]

_REQUESTED = frozenset({REQUESTED})


def resume_for(session_id: str, states: Sequence[PageStates],
               pending: list[m.PageRun]) -> tuple[m.Resume, list[m.PageRun]]:
    """Build a Resume within the protocol's limits.

    Args:
        session_id: the migration.
        states: page states by block; PLACED and PLACING pages count as received.
        pending: REQUESTED runs, oldest first.

    Returns:
        The Resume and the pending runs that did not fit in it (send those
        as Requests right after).
    """
    budget = m.LIMITS.max_resume_runs
    received = []
    for block, block_states in enumerate(states):
        bounds = block_states.placed_set(including_placing=True).bounds()[:2 * budget]
        budget -= len(bounds) // 2
        if bounds:
            received.append((block, bounds))
    limit = m.LIMITS.max_runs
    resume = m.Resume(session_id=session_id, received=tuple(received), pending=tuple(pending[:limit]))
    return resume, pending[limit:]


def requested_runs(states: Sequence[PageStates]) -> list[m.PageRun]:
    """Every REQUESTED run of every block, in block order."""
    return [m.PageRun(block=block, first=start, count=stop - start)
            for block, block_states in enumerate(states)
            for start, stop in block_states.runs(0, block_states.pages, _REQUESTED)]
