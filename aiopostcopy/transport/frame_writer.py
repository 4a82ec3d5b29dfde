"""A connection's writer thread: whole frames written in the order they were queued.

The source's sweep reads a run, finds its zero pages, then writes the frame.
Done in one thread, the link waits while the next run is read: the socket's
send buffer is kept small on purpose (an urgent reply must not queue behind
megabytes of sweep in a shared device queue), so it drains in a fraction of a
millisecond, about the time one 1 MiB ``preadv`` takes.  :class:`FrameWriter`
takes the writing to a thread of its own: the sweep queues each frame with
:meth:`put` and goes on reading the next run while this one is written.  Both
``preadv`` and ``sendmsg`` release the GIL, so the two overlap.

Rules:

* Frames are written in :meth:`put` order, each whole, by ``send`` (which
  takes the connection's lock: other threads' frames never land inside one).
* At most ``depth`` frames wait; :meth:`put` blocks while that many do.  Each
  may name a ``release`` callback, called once its bytes are written (or
  dropped after an error): the sweep's staging buffer goes back to its pool.
* Before each frame the thread calls ``wait_turn`` (the source: a faulted huge
  page has the link alone).
* The first exception ``send`` raises ends the writing: the frames still
  queued are dropped (released), and :meth:`put`, :meth:`flush` and
  :meth:`close` raise it in the thread that queues, as a ``send`` of its own
  would have.
* :meth:`flush` returns once everything queued is written; the caller may then
  write on the connection itself.  :meth:`close` writes what is queued and ends
  the thread.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["FrameWriter"]

Buffers = Sequence[Any]  # bytes-like pieces of whole frames


class FrameWriter:
    """Write queued frames on a thread of their own, in order (see the module docstring).

    Args:
        send: writes one item's buffers whole (blocking); raises on a broken connection.
        depth: items that may wait behind the one being written.
        wait_turn: called before each item is written (may block), or None.
        name: the thread's name.
        on_start: called first on the writer thread (e.g. to set its nice value), or None.
        on_end: called last on the writer thread, however it ends, or None.
    """

    def __init__(self, send: Callable[[Buffers], None], *, depth: int = 2,
                 wait_turn: Callable[[], object] | None = None, name: str = "aiopostcopy-writer",
                 on_start: Callable[[], object] | None = None, on_end: Callable[[], object] | None = None) -> None:
        if depth < 1:
            raise ValueError("depth must be at least 1")
        self._send, self._depth, self._wait_turn = send, depth, wait_turn
        self._items: deque[tuple[Buffers, Callable[[], None] | None] | None] = deque()
        self._cond = threading.Condition()
        self._busy = False  #: the thread holds an item it has not finished
        self._error: BaseException | None = None
        self._closed = False
        self._on_start, self._on_end = on_start, on_end
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def error(self) -> BaseException | None:
        """What ended the writing, or None."""
        return self._error

    def put(self, buffers: Buffers, release: Callable[[], None] | None = None) -> None:
        """Queue one item (whole frames) to be written after those before it.

        Blocks while ``depth`` items wait.  Raises the writer's error (the
        item is then released, not written) or RuntimeError after :meth:`close`.
        """
        with self._cond:
            while len(self._items) >= self._depth and self._error is None:
                self._cond.wait()
            if self._closed:
                raise RuntimeError("the writer is closed")
            if self._error is not None:
                error = self._error
            else:
                self._items.append((buffers, release))
                self._cond.notify_all()
                return
        if release is not None:
            release()
        raise error

    def flush(self) -> None:
        """Wait until every queued item is written; raises the writer's error."""
        with self._cond:
            while (self._items or self._busy) and self._error is None:
                self._cond.wait()
            if self._error is not None:
                raise self._error

    def close(self) -> None:
        """Write what is queued, then end the thread (waits for it).  Raises the writer's error,
        if any; closing again does nothing."""
        with self._cond:
            if not self._closed:
                self._closed = True
                self._items.append(None)
                self._cond.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join()
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        try:
            self._write_items()
        finally:
            if self._on_end is not None:
                self._on_end()

    def _write_items(self) -> None:
        if self._on_start is not None:
            self._on_start()
        while True:
            with self._cond:
                while not self._items:
                    self._cond.wait()
                item = self._items.popleft()
                self._busy = item is not None
                self._cond.notify_all()  # room for one more
            if item is None:
                return
            buffers, release = item
            try:
                if self._error is None:
                    if self._wait_turn is not None:
                        self._wait_turn()
                    self._send(buffers)
            except BaseException as exc:  # noqa: BLE001 - handed to the thread that queues
                with self._cond:
                    self._error = exc
                    self._drop_queued()
                    self._cond.notify_all()
            finally:
                if release is not None:
                    release()
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _drop_queued(self) -> None:
        """After an error (lock held): release the queued items; keep the end marker."""
        kept: deque[tuple[Buffers, Callable[[], None] | None] | None] = deque()
        for item in self._items:
            if item is None:
                kept.append(None)
            elif item[1] is not None:
                item[1]()
        self._items = kept
