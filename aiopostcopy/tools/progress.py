"""A one-line progress bar on a terminal (plain text when not a terminal)."""

from __future__ import annotations

import time
from typing import IO, Any

__all__ = ["ProgressLine"]


class ProgressLine:
    """Redraws ``[#####.....] placed/total pages`` at most ``hz`` times a second."""

    def __init__(self, stream: IO[str], *, width: int = 32, hz: float = 10.0) -> None:
        self._stream = stream
        self._width = width
        self._interval = 1.0 / hz
        self._last = 0.0
        self._tty = stream.isatty()

    def update(self, report: Any) -> None:
        now = time.monotonic()
        done = report.pages_placed >= report.pages_total > 0
        if now - self._last < self._interval and not done:
            return
        if not self._tty and not done and now - self._last < 1.0:
            return
        self._last = now
        total = max(report.pages_total, 1)
        filled = self._width * report.pages_placed // total
        bar = "#" * filled + "." * (self._width - filled)
        line = (f"[{bar}] {report.pages_placed}/{report.pages_total} pages  demand {report.pages_demand}  "
                f"zero {report.pages_zero}  {report.goodput_gbps:.2f} Gbit/s")
        self._stream.write(("\r" if self._tty else "") + line + ("" if self._tty and not done else "\n"))
        if done and self._tty:
            self._stream.write("\n")
        self._stream.flush()
