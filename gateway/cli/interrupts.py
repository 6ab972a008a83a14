"""Ctrl-C, a hang-up or SIGTERM while the CLI drives a lock itself ("direct mode").

No agent would relock a door the CLI left open, so while a technician's command drives
the hardware, :func:`interrupts_set` turns each of :data:`STOP_SIGNALS` into the switch
the command waits on, and the command ends after relocking, with
:data:`EXIT_INTERRUPTED` (``gateway/cli/technician.py``, ``gateway/cli/doors.py``).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Final

__all__ = ["EXIT_INTERRUPTED", "STOP_SIGNALS", "interrupts_set"]

#: Exit status after Ctrl-C (128 + SIGINT), as shells report an interrupted command.
#: Also after a hang-up or SIGTERM in direct mode: one code for "stopped, every lock it
#: drove relocked", whatever stopped it.
EXIT_INTERRUPTED: Final = 130
#: What stops a technician's command in direct mode: Ctrl-C, a hang-up (an SSH session
#: dropping), and a polite kill (``kill``, ``timeout``, a logout's SIGTERM).
STOP_SIGNALS: Final = (signal.SIGINT, signal.SIGHUP, signal.SIGTERM)


@contextlib.contextmanager
def interrupts_set(stop: threading.Event) -> Iterator[None]:
    """While the block runs, any of :data:`STOP_SIGNALS` sets ``stop`` instead of ending
    the process, and so does every further one.

    The code inside checks ``stop`` between bus transactions (and waits on it during a
    hold), so a signal never cuts a write from its read-back, and the block ends only
    after the relock it owes has been confirmed or has failed: a second Ctrl-C, or the
    SIGHUP that follows a dropped SSH session, must not kill the CLI with a relay
    energized (found in review).  Outside the main thread (signals only go there)
    nothing is installed.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_signal(signum: int, frame: FrameType | None) -> None:
        del signum, frame
        stop.set()

    previous = {signum: signal.signal(signum, on_signal) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            # None: a handler not set from Python; the default is the closest there is.
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
