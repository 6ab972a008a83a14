"""A wall clock the agent can trust, or says why not (contract reason ``clock_untrusted``).

A Raspberry Pi has no real-time clock: at boot the wall clock reads 1970, or the time
``fake-hwclock`` saved at the last shutdown, until NTP synchronizes it.  Signed commands
carry ``iat``/``exp`` and must never run late (contract §5), so the gateway refuses
everything time-bound while the wall clock cannot be trusted, and says why.

The rule
--------
The wall clock is **trusted** when all of these hold:

1. **Floor.**  Wall time is not earlier than the *floor*: the larger of
   :data:`BUILD_FLOOR` (no correct clock reads earlier than the day this release was
   built) and the last wall time the agent saw while the clock was trusted.  The agent
   saves that time in the store every minute and at shutdown and hands it to
   :meth:`TrustedClock.raise_floor` at start.  A box that boots at 1970, with a flat RTC
   battery, or with a clock behind its last run is untrusted.  (One that boots at the
   time ``fake-hwclock`` saved at shutdown passes the floor; in mode ``"ntp"`` rule 2
   still holds it until NTP has synchronized.)
2. **Sync** (mode ``"ntp"`` only).  The kernel says the clock is synchronized
   (:func:`kernel_synchronized`: ``adjtimex`` reports neither ``TIME_ERROR`` nor
   ``STA_UNSYNC``).  Mode ``"system"`` skips this check, for boxes with a battery-backed
   RTC or whose time is disciplined some other way (GPS, PTP, an operator).
3. **No unconfirmed jump** (mode ``"ntp"``).  ``wall - monotonic`` is constant while
   nobody sets the clock.  If it moves by more than :data:`JUMP_THRESHOLD_S` between two
   readings and the kernel does not say "synchronized" at that moment, the clock was
   stepped by something other than NTP (``date -s``, a bad RTC read, a VM resume): the
   clock stays untrusted until the kernel reports synchronization again.  An NTP daemon
   that steps the clock leaves the kernel synchronized, so its steps are accepted.  (A
   manual step through ``settimeofday`` also marks the kernel clock unsynchronized, so
   rule 2 alone mostly catches it; rule 3 makes the reason explicit in ``why``, the log
   and :meth:`TrustedClock.status`.)  In mode ``"system"`` a jump is logged and
   reported but, by that mode's premise, taken as a correction: only the floor applies.

Wall time is for judging freshness and for timestamps; waiting (timeouts, backoff)
belongs on the monotonic clock, so a jump cannot stretch or shorten it (fault matrix #39).
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Final, Literal

__all__ = [
    "BUILD_FLOOR",
    "JUMP_THRESHOLD_S",
    "SYNCHRONIZED_FLAG_FILE",
    "ClockMode",
    "TrustedClock",
    "kernel_synchronized",
    "rfc3339",
]

LOGGER = logging.getLogger(__name__)

ClockMode = Literal["ntp", "system"]

#: 2026-11-01T00:00:00Z.  No correct clock reads earlier than this release was built, so
#: a clock that does (1970 at boot, a flat RTC battery) is certainly wrong.  Raise it
#: with each release; the persisted last trusted time raises it further at run time.
BUILD_FLOOR: Final = 1_793_491_200.0

#: How far ``wall - monotonic`` may move between two readings before it counts as a jump.
#: NTP slews at most 500 ppm, so slewing needs 10 000 s without a reading to move this
#: far; the agent reads the clock at least every second.  A step of 5 s or more is also
#: what matters for command freshness (``clock_skew_s`` defaults to 30 s).
JUMP_THRESHOLD_S: Final = 5.0

#: Touched by systemd-timesyncd when it first synchronizes; consulted only where the
#: kernel's own flag cannot be read, because the file survives a later manual step.
SYNCHRONIZED_FLAG_FILE: Final = "/run/systemd/timesync/synchronized"

# adjtimex(2): the return value TIME_ERROR and the status bit STA_UNSYNC both mean "the
# kernel clock is not synchronized" (an NTP daemon clears them when it disciplines it).
_TIME_ERROR: Final = 5
_STA_UNSYNC: Final = 0x0040


def rfc3339(ts: float | None, *, timespec: str = "milliseconds") -> str | None:
    """``ts`` (seconds since the epoch) as RFC 3339 UTC with a ``Z``, or ``None``.

    A value no calendar can show (an injected clock gone wild, ``nan``) is rendered as
    its ``repr`` rather than raising: this feeds status output that must never fail.
    """
    if ts is None:
        return None
    try:
        text = datetime.fromtimestamp(ts, UTC).isoformat(timespec=timespec)
    except (OverflowError, ValueError, OSError):
        return repr(ts)
    return text.replace("+00:00", "Z")


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


class TrustedClock:
    """The wall clock plus the rule of this module's docstring; safe across threads.

    ``wall``, ``mono`` and ``synced`` are injectable so the rule is tested without
    touching the system clock.  ``now()`` always returns the wall clock, trusted or not:
    callers that judge time-bound things ask :meth:`trusted` first.
    """

    def __init__(
        self,
        mode: ClockMode,
        *,
        floor: float = BUILD_FLOOR,
        wall: Callable[[], float] = time.time,
        mono: Callable[[], float] = time.monotonic,
        synced: Callable[[], bool] = kernel_synchronized,
        jump_threshold_s: float = JUMP_THRESHOLD_S,
    ) -> None:
        if mode not in ("ntp", "system"):
            raise ValueError(f"clock mode must be 'ntp' or 'system', not {mode!r}")
        self.mode: ClockMode = mode
        self._floor = float(floor)
        self._wall = wall
        self._mono = mono
        self._synced = synced
        self._threshold = jump_threshold_s
        self._lock = threading.Lock()
        self._offset: float | None = None  # wall - mono at the last reading
        self._jump: str | None = None  # an unconfirmed jump, described; cleared by sync
        self._last_verdict: tuple[bool, str] | None = None

    @property
    def floor(self) -> float:
        """The earliest wall time this clock may read and still be trusted."""
        with self._lock:
            return self._floor

    def raise_floor(self, t: float) -> None:
        """Raise the floor to ``t`` (the last trusted time persisted); never lowers it."""
        with self._lock:
            if t > self._floor:  # false for nan, e.g. read from a damaged store
                self._floor = float(t)

    def now(self) -> float:
        """Wall-clock seconds since the epoch (also watches for jumps)."""
        with self._lock:
            return self._observe()

    def trusted(self) -> tuple[bool, str]:
        """``(True, "")`` when the wall clock may judge freshness, else ``(False, why)``."""
        with self._lock:
            verdict = self._verdict(self._observe())
            if verdict != self._last_verdict:
                if verdict[0]:
                    LOGGER.info("wall clock trusted (%s mode)", self.mode)
                else:
                    LOGGER.warning("wall clock not trusted: %s", verdict[1])
                self._last_verdict = verdict
            return verdict

    def status(self) -> dict[str, Any]:
        """For ``status`` output: mode, trusted, why, now, floor (RFC 3339), synced, jump.

        ``jump`` describes the last wall-clock jump no synchronization confirmed, or is
        ``None``; in mode ``"ntp"`` it clears when the kernel reports synchronization.
        """
        trusted, why = self.trusted()
        with self._lock:
            now, floor, jump = self._wall(), self._floor, self._jump
        return {
            "mode": self.mode,
            "trusted": trusted,
            "why": why,
            "now": rfc3339(now, timespec="seconds"),
            "floor": rfc3339(floor, timespec="seconds"),
            "synced": self._is_synced(),
            "jump": jump,
        }

    # -- internals (called with self._lock held) -------------------------------------------
    def _is_synced(self) -> bool:
        try:
            return bool(self._synced())
        except Exception:  # an injected or platform probe failing means "not synchronized"
            LOGGER.debug("clock synchronization probe failed", exc_info=True)
            return False

    def _observe(self) -> float:
        """Read both clocks; note a jump of ``wall - mono`` the kernel does not vouch for."""
        wall = self._wall()
        offset = wall - self._mono()
        previous, self._offset = self._offset, offset
        if previous is not None and abs(offset - previous) > self._threshold:
            step = offset - previous
            if self._is_synced():
                LOGGER.info("wall clock stepped by %+.1f s while synchronized (NTP)", step)
            else:
                self._jump = f"the wall clock jumped by {step:+.0f} s at {rfc3339(wall)}"
                LOGGER.warning("%s without NTP synchronization", self._jump)
        return wall

    def _verdict(self, wall: float) -> tuple[bool, str]:
        if not wall >= self._floor:  # also catches nan
            return False, (
                f"the wall clock reads {rfc3339(wall, timespec='seconds')}, before the last "
                f"time known good ({rfc3339(self._floor, timespec='seconds')})"
            )
        if self.mode == "system":
            return True, ""
        if self._is_synced():
            self._jump = None
            return True, ""
        if self._jump is not None:
            return False, f"{self._jump}; waiting for NTP synchronization to confirm it"
        return False, "waiting for NTP synchronization (the kernel says it is unsynchronized)"
