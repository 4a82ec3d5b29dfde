"""Tuning records of the two sessions.

Theory of operation
-------------------
Frozen keyword-only dataclasses, validated when built, so a session never
runs with a bound that makes no sense.  The one rule across the two: the
destination must Ack before the source's background window is full, or the
sweep stalls.  So the source announces its window in its Hello (feature
``background-window=<bytes>``) and the destination acks after
``min(ack_bytes, window // 2)`` bytes.
"""

from __future__ import annotations

import dataclasses

__all__ = ["DestinationConfig", "SourceConfig", "WINDOW_FEATURE"]

#: Hello feature by which the source announces its background window, in bytes.
WINDOW_FEATURE = "background-window="


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class DestinationConfig:
    """Tuning of a :class:`~aiopostcopy.core.session.DestinationSession`.

    Attributes:
        max_run_pages: longest run in one request.
        max_in_flight_pages: pages requested and not arrived, at most.
        readahead_pages: pages after a faulted one to request with it.
        request_timeout: seconds after which a run still REQUESTED is asked
            for again (None: never; TCP does not lose requests).
        ack_bytes: send an Ack once this many background payload bytes
            arrived (at most half the window the source announces).
        deadline: a ``now`` value after which the migration is aborted, or None.

    Raises:
        ValueError: a bound is not positive.
    """

    max_run_pages: int = 64
    max_in_flight_pages: int = 4096
    readahead_pages: int = 0
    request_timeout: float | None = 5.0
    ack_bytes: int = 1 << 20
    deadline: float | None = None

    def __post_init__(self) -> None:
        if min(self.max_run_pages, self.max_in_flight_pages, self.ack_bytes) < 1:
            raise ValueError("max_run_pages, max_in_flight_pages and ack_bytes must be positive")
        if self.readahead_pages < 0:
            raise ValueError("readahead_pages must not be negative")
        if self.request_timeout is not None and self.request_timeout <= 0:
            raise ValueError("request_timeout must be positive or None")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SourceConfig:
    """Tuning of a :class:`~aiopostcopy.core.source_session.SourceSession`.

    Attributes:
        max_run_pages: longest run handed out for an urgent request.
        background_run_pages: longest run handed out by the sweep.
        background_window_bytes: background payload bytes that may be sent
            and not yet acknowledged; the sweep pauses when it is full.
        sweep_bridge_pages: a sweep run that would stop at pages already sent
            (answers to Requests ahead of the sweep) goes on over a stretch of
            at most this many of them, sending them again, when unsent pages
            follow: one frame of up to ``background_run_pages`` instead of a
            frame per stretch between faulted pages.  In all, a run sends again
            at most an eighth of its pages, and only on blocks of 4 KiB pages.
            Pages the destination said it holds (a Resume) are never sent
            again.  0: never send a page twice.

    Raises:
        ValueError: a bound is not positive (the bridge: negative).
    """

    max_run_pages: int = 64
    background_run_pages: int = 256
    background_window_bytes: int = 8 << 20
    sweep_bridge_pages: int = 4

    def __post_init__(self) -> None:
        if min(self.max_run_pages, self.background_run_pages, self.background_window_bytes) < 1:
            raise ValueError("source bounds must be positive")
        if self.sweep_bridge_pages < 0:
            raise ValueError("sweep_bridge_pages must not be negative")
