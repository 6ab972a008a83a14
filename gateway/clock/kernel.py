"""Whether the kernel says the wall clock is synchronized (rule 2 of the trusted clock):
``adjtimex(2)`` when it can be called, systemd-timesyncd's flag file otherwise.
See docs/design/clock.md.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Final

#: Touched by systemd-timesyncd when it first synchronizes; consulted only where the
#: kernel's own flag cannot be read, because the file survives a later manual step.
SYNCHRONIZED_FLAG_FILE: Final = "/run/systemd/timesync/synchronized"

# adjtimex(2): the return value TIME_ERROR and the status bit STA_UNSYNC both mean "the
# kernel clock is not synchronized" (an NTP daemon clears them when it disciplines it).
_TIME_ERROR: Final = 5
_STA_UNSYNC: Final = 0x0040


@functools.cache
def _adjtimex() -> Callable[[], tuple[int, int]] | None:
    """A function returning adjtimex's ``(state, status)``; ``None`` off Linux/glibc.

    ctypes is imported here, not at module level, to keep the CLI's cold start short.
    """
    import ctypes

    class Timex(ctypes.Structure):
        # Only the fields up to ``status`` are read; the kernel writes the whole struct
        # (208 bytes on 64-bit), so the tail is padded generously.  With ``modes`` = 0 the
        # call only reads, which needs no privilege.
        _fields_ = (
            ("modes", ctypes.c_uint),
            ("offset", ctypes.c_long),
            ("freq", ctypes.c_long),
            ("maxerror", ctypes.c_long),
            ("esterror", ctypes.c_long),
            ("status", ctypes.c_int),
            ("_rest", ctypes.c_byte * 512),
        )

    try:
        func = ctypes.CDLL(None, use_errno=True).adjtimex
    except (OSError, AttributeError):
        return None
    func.restype = ctypes.c_int

    def call() -> tuple[int, int]:
        buf = Timex()
        state = int(func(ctypes.byref(buf)))
        if state < 0:
            raise OSError(ctypes.get_errno(), "adjtimex failed")
        return state, int(buf.status)

    return call


def kernel_synchronized(
    adjtimex: Callable[[], tuple[int, int]] | None = None,
    flag_file: str = SYNCHRONIZED_FLAG_FILE,
) -> bool:
    """Whether the kernel says the wall clock is synchronized (by NTP or similar).

    ``adjtimex(2)`` answers when it can: synchronized unless it returns ``TIME_ERROR`` or
    has ``STA_UNSYNC`` set.  Only when it cannot be called (not Linux, a seccomp filter)
    does the existence of ``flag_file`` count.  Any other failure is ``False``: when in
    doubt, the clock is not trusted.  The arguments replace the system call and the flag
    file in tests.
    """
    try:
        call = adjtimex if adjtimex is not None else _adjtimex()
        if call is not None:
            state, status = call()
            return state != _TIME_ERROR and not status & _STA_UNSYNC
    except OSError:
        pass
    try:
        return os.path.exists(flag_file)
    except (OSError, ValueError):
        return False
