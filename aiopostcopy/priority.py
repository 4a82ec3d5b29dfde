"""Thread priorities: who runs first when the CPUs are busy.

Linux keeps a nice value per thread, so one thread of a process can yield to
the others.  Both ends use it for the same rule: the fault path (a blocked
thread waiting for its page) runs first, the background stream takes what is
left.  The destination's placement thread and the source's sweep threads raise
their own nice value (no privilege needed); the destination's loop thread and
the source's urgent thread may lower their own (root or CAP_SYS_NICE).
"""

from __future__ import annotations

import os
import threading


def set_niceness(niceness: int) -> bool:
    """Set the calling thread's nice value; False: not allowed (a lower value than now needs root
    or CAP_SYS_NICE), nothing changed."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)
    except OSError:
        return False
    return True


def thread_niceness() -> int:
    """The calling thread's nice value."""
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
