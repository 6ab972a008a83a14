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
   built) and the last wall time the agent saw while the clock was trusted, as saved in
   the store every minute and at shutdown and read back at start
   (:meth:`TrustedClock.load_floor`, :meth:`TrustedClock.save_floor`).  A box that boots
   at 1970, with a flat RTC battery, or with a clock behind its last run is untrusted.
   (One that boots at the time ``fake-hwclock`` saved at shutdown passes the floor; in
   mode ``"ntp"`` rule 2 still holds it until NTP has synchronized.)
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

The floor cannot be ratcheted
-----------------------------
Rule 3 accepts a step that leaves the kernel synchronized, so a forged NTP answer (or a
wrong one) can move the clock years ahead while it is "trusted".  Had that time been
saved as the floor, every command would be ``clock_untrusted`` once the real time came
back, until the forged date.  So what may be saved is bounded by what this box can
prove without believing any clock:

* **Proven time.**  Next to the floor the store keeps the *proven time*
  (:data:`PROVEN_KEY`): :data:`BUILD_FLOOR` (or the proven time of the last run, when
  later) plus the monotonic time the agent has really run since.  No clock step moves
  it, and it never lies ahead of the real time: the time the box spends switched off
  only leaves it further behind.
* **Bounded save.**  The floor saved is the wall time, but never more than the proven
  time plus :data:`FLOOR_MARGIN_S`.
* **Invalid floor.**  A floor read at start that lies more than :data:`FLOOR_MARGIN_S`
  ahead of the proven time (saved by a version without this bound, by a forged step, or
  garbage) is dropped to the proven time, logged, and reported as an alarm
  (``clock_floor_invalid``).
* **Step alarm.**  A forward step of :data:`STEP_ALARM_S` or more while the clock was
  trusted raises ``clock_step``, synchronized or not: a trusted clock never needs such a
  correction.  (The first synchronization after boot moves the clock by however long
  the box was off; the clock is not trusted yet then, so that step is not alarmed.)
* **Confirmed time.**  While the clock is trusted, a time from another source (the
  HTTPS ``Date`` of Stora or the relay) that agrees with the wall clock within
  :data:`SERVER_TIME_TOLERANCE_S` moves the proven time up to it, so on a gateway that
  talks to Stora the floor follows the real time; a forged step forward is not
  confirmed.  A floor saved by an earlier version, with no proven time beside it, that
  the wall clock has already passed is taken as proven at the first start.
* **Second source.**  While the wall clock reads before the floor, a time from another
  source (the HTTPS ``Date`` of Stora or the relay: :meth:`TrustedClock.observe_server_time`)
  that agrees with it within :data:`SERVER_TIME_TOLERANCE_S` confirms the wall clock:
  the floor is lowered to the confirmed time (never below the proven time), saved,
  logged and alarmed (``clock_floor_lowered``).  One source alone never lowers it.
* **Reset.**  A technician (``stora-gateway clock --reset-floor``, through the agent or
  straight on the database) or a signed management request sets the floor back to
  :data:`BUILD_FLOOR` (:meth:`TrustedClock.reset_floor`, :func:`reset_stored_floor`),
  logged and alarmed (``clock_floor_reset``) with who did it.  The build date rather
  than the proven time: a reset is for when the stored knowledge is wrong and a person
  vouches for the clock, and that knowledge includes the proven time (a crystal's drift
  over years of uptime, a hand-edited database); the next save, a minute later, puts
  the floor back at the wall time within the bound.

Wall time is for judging freshness and for timestamps; waiting (timeouts, backoff)
belongs on the monotonic clock, so a jump cannot stretch or shorten it (fault matrix #39).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from typing import Any, Final, Literal, Protocol

from gateway.errors import GatewayError, one_line
from sitelink.payloads import rfc3339  # the one time format of the gateway (contract §4)

__all__ = [
    "BUILD_FLOOR",
    "FLOOR_KEY",
    "FLOOR_MARGIN_S",
    "JUMP_THRESHOLD_S",
    "PROVEN_KEY",
    "RESET_NOTE_KEY",
    "SERVER_TIME_PROBE_S",
    "SERVER_TIME_TOLERANCE_S",
    "STEP_ALARM_S",
    "SYNCHRONIZED_FLAG_FILE",
    "ClockMode",
    "MetaStore",
    "TrustedClock",
    "kernel_synchronized",
    "reset_stored_floor",
    "rfc3339",
    "stored_floor",
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

#: How far the saved floor may lie ahead of the proven time (module docstring).  A floor
#: this version saves never needs it (both are written together, the proven time first),
#: so it is a tolerance, and the longest a forged step forward can still hold commands
#: back once the real time returns, on a box that has run without a break since its
#: release was built (time spent switched off only widens the gap).  Ten minutes: short
#: for an outage, far above float rounding and a crystal's drift between two saves.
FLOOR_MARGIN_S: Final = 600.0

#: A forward step at least this large while the clock was trusted raises ``clock_step``.
#: A trusted clock is corrected by slewing (500 ppm at most) or by steps of seconds; an
#: hour is already a wrong time zone or a mistyped date, and it makes every unexpired
#: command (``max_lifetime_s`` is minutes) look expired.
STEP_ALARM_S: Final = 3_600.0

#: How closely a second source (an HTTPS ``Date``) must agree with the wall clock to
#: confirm it.  ``Date`` has one-second resolution and is stamped when the server
#: answers, so it trails the wall clock by the request's round trip (bounded by the
#: client's timeouts, tens of seconds at worst); two minutes covers that and a server
#: clock a little off, and is still far below any error the floor is there to catch.
SERVER_TIME_TOLERANCE_S: Final = 120.0

#: While the wall clock reads before the floor, the agent asks Stora for its ``Date`` at
#: most this often (one GET; every other Stora answer is checked as it comes).  Five
#: minutes: a few requests an hour against Stora's limits, and a recovery within minutes.
SERVER_TIME_PROBE_S: Final = 300.0

#: Store keys (the ``meta`` table): the floor (its name predates the bound), the proven
#: time, and a reset done with the agent stopped, reported as an alarm at the next start.
FLOOR_KEY: Final = "last_trusted_time"
PROVEN_KEY: Final = "clock_proven_time"
RESET_NOTE_KEY: Final = "clock_floor_reset"

#: Touched by systemd-timesyncd when it first synchronizes; consulted only where the
#: kernel's own flag cannot be read, because the file survives a later manual step.
SYNCHRONIZED_FLAG_FILE: Final = "/run/systemd/timesync/synchronized"

# adjtimex(2): the return value TIME_ERROR and the status bit STA_UNSYNC both mean "the
# kernel clock is not synchronized" (an NTP daemon clears them when it disciplines it).
_TIME_ERROR: Final = 5
_STA_UNSYNC: Final = 0x0040

#: How much of an unreadable stored value an alarm quotes (alarms must stay small).
_QUOTE_MAX: Final = 40

#: ``(kind, detail)``: how the clock reports an alarm (the agent adds the unit, none).
Alarm = Callable[[str, str], None]


class MetaStore(Protocol):
    """The part of :class:`gateway.store.Store` the floor is kept in."""

    def meta(self, key: str) -> str | None:
        """The value stored under ``key``, or ``None``."""

    def set_meta(self, key: str, value: str) -> None:
        """Store ``value`` under ``key``."""


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


def _span(seconds: float) -> str:
    """A duration for people: ``3650 days``, ``5 h``, ``42 s``."""
    if not math.isfinite(seconds):
        return repr(seconds)
    size = abs(seconds)
    if size >= 2 * 86_400:
        return f"{seconds / 86_400:.0f} days"
    if size >= 2 * 3_600:
        return f"{seconds / 3_600:.0f} h"
    return f"{seconds:.0f} s"


def _at(ts: float | None) -> str:
    """``ts`` as RFC 3339 to the second, for messages (``None`` as ``unknown``)."""
    return rfc3339(ts, timespec="seconds") or "unknown"


def _quote(text: str) -> str:
    """A stored value quoted in a message: one line, cut short (alarms stay small)."""
    short = text if len(text) <= _QUOTE_MAX else text[:_QUOTE_MAX] + "…"
    return repr(one_line(short))


def _read_time(store: MetaStore, key: str) -> tuple[float | None, str | None]:
    """Epoch seconds stored under ``key``: ``(value, None)``; ``(None, None)`` when absent;
    ``(None, text)`` when unreadable (not a number, ``nan``, infinite, negative)."""
    text = store.meta(key)
    if text is None or not text.strip():
        return None, None
    try:
        value = float(text)
    except ValueError:
        return None, text
    if not math.isfinite(value) or value < 0:
        return None, text
    return value, None


def _proven_base(stored: float | None, build_floor: float) -> float:
    """The proven time a run starts from: the last run's, or the build date when later."""
    return build_floor if stored is None else max(build_floor, stored)


def _judge_floor(floor: float | None, garbage: str | None,
                 proven: float) -> tuple[float | None, str | None]:
    """The floor to use at start and, when the stored one is invalid, why (one sentence).

    ``None`` as the floor means "nothing stored": the build date alone applies.
    """
    if garbage is not None:
        return proven, (f"the saved trusted-time floor {_quote(garbage)} is unreadable; using "
                        f"the time this box's run time proves ({_at(proven)}) instead")
    if floor is not None and floor > proven + FLOOR_MARGIN_S:
        return proven, (f"the saved trusted-time floor {_at(floor)} lies {_span(floor - proven)} "
                        f"beyond what this box's run time proves ({_at(proven)}): saved by a "
                        "version that did not bound it, or after a forged clock step; using "
                        f"{_at(proven)} instead")
    return floor, None


def _describe_reset_note(text: str) -> str:
    """The alarm detail for a reset done while the agent was stopped (JSON note)."""
    try:
        note = json.loads(text)
    except ValueError:
        note = None
    if not isinstance(note, dict):
        return f"the trusted-time floor was reset while the agent was stopped ({_quote(text)})"
    at, previous = note.get("at"), note.get("previous")
    actor = one_line(str(note.get("actor") or "someone"))[:_QUOTE_MAX * 2]
    return (f"the trusted-time floor was reset to {_at(BUILD_FLOOR)} by {actor} at "
            f"{_at(at) if isinstance(at, int | float) else 'an unknown time'} while the agent "
            f"was stopped (it was "
            f"{_at(previous) if isinstance(previous, int | float) else 'unset'})")


def stored_floor(store: MetaStore | None, *, now: float | None = None) -> dict[str, Any]:
    """The floor as saved, and what the next start makes of it (``clock`` while the agent
    is stopped); ``None`` for a store that does not exist yet.  ``now`` replaces the wall
    clock in tests."""
    wall = time.time() if now is None else now
    floor, garbage = (None, None) if store is None else _read_time(store, FLOOR_KEY)
    stored_proven, _ = (None, None) if store is None else _read_time(store, PROVEN_KEY)
    proven = _proven_base(stored_proven, BUILD_FLOOR)
    effective, problem = _judge_floor(floor, garbage, proven)
    at_start = BUILD_FLOOR if effective is None else max(BUILD_FLOOR, effective)
    return {
        "agent": "not running",
        "now": _at(wall),
        "floor": _at(at_start),
        "floor_ok": wall >= at_start,
        "stored_floor": _at(floor) if garbage is None else _quote(garbage),
        "stored_floor_invalid": problem,
        "proven": _at(proven),
        "build_floor": _at(BUILD_FLOOR),
        "reset_pending": store is not None and bool(store.meta(RESET_NOTE_KEY)),
    }


def reset_stored_floor(store: MetaStore, actor: str, *, now: float | None = None
                       ) -> dict[str, Any]:
    """Set the saved floor back to :data:`BUILD_FLOOR` with the agent stopped (the
    technician's fix that used to mean editing SQLite).  The next start reports it as a
    ``clock_floor_reset`` alarm naming ``actor``.  Store errors propagate."""
    wall = time.time() if now is None else now
    floor, _ = _read_time(store, FLOOR_KEY)
    store.set_meta(FLOOR_KEY, repr(BUILD_FLOOR))
    store.set_meta(RESET_NOTE_KEY, json.dumps({"actor": actor, "at": wall, "previous": floor}))
    LOGGER.warning("the trusted-time floor was reset from %s to %s by %s (agent stopped)",
                   _at(floor), _at(BUILD_FLOOR), actor)
    return {"previous": None if floor is None else _at(floor), "floor": _at(BUILD_FLOOR),
            "actor": actor, "saved": True, "through_agent": False}


class TrustedClock:
    """The wall clock plus the rule of this module's docstring; safe across threads.

    ``wall``, ``mono`` and ``synced`` are injectable so the rule is tested without
    touching the system clock; ``floor`` is the build floor (:data:`BUILD_FLOOR`).
    ``now()`` always returns the wall clock, trusted or not: callers that judge
    time-bound things ask :meth:`trusted` first.  Alarms (``clock_step``,
    ``clock_floor_lowered``, ``clock_floor_reset``) go to :attr:`on_alarm`, called
    outside the clock's lock; they are logged in any case.
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
        alarm: Alarm | None = None,
    ) -> None:
        if mode not in ("ntp", "system"):
            raise ValueError(f"clock mode must be 'ntp' or 'system', not {mode!r}")
        self.mode: ClockMode = mode
        self._build_floor = float(floor)
        self._floor = float(floor)
        self._wall = wall
        self._mono = mono
        self._synced = synced
        self._threshold = jump_threshold_s
        self._lock = threading.Lock()
        self._offset: float | None = None  # wall - mono at the last reading
        self._jump: str | None = None  # an unconfirmed jump, described; cleared by sync
        self._last_verdict: tuple[bool, str] | None = None
        # The proven time (module docstring) is _proven_base at monotonic _proven_mono.
        self._proven_base = self._build_floor
        self._proven_mono = mono()
        self._store: MetaStore | None = None
        self._alarms: list[tuple[str, str]] = []  # raised under the lock, sent outside it
        self._server_note: str | None = None  # why the last server time was not used
        #: Called with ``(kind, detail)`` for each alarm; ``None`` only logs them.
        self.on_alarm: Alarm | None = alarm

    @property
    def floor(self) -> float:
        """The earliest wall time this clock may read and still be trusted."""
        with self._lock:
            return self._floor

    def raise_floor(self, t: float) -> None:
        """Raise the floor to ``t``; never lowers it.  (The agent uses :meth:`load_floor`,
        which also bounds what it reads.)"""
        with self._lock:
            if t > self._floor:  # false for nan, e.g. read from a damaged store
                self._floor = float(t)

    def proven(self) -> float:
        """The latest time this box's run time proves has passed (module docstring)."""
        with self._lock:
            return self._proven_now()

    def now(self) -> float:
        """Wall-clock seconds since the epoch (also watches for jumps)."""
        with self._lock:
            wall = self._observe()
        self._flush_alarms()
        return wall

    def trusted(self) -> tuple[bool, str]:
        """``(True, "")`` when the wall clock may judge freshness, else ``(False, why)``."""
        with self._lock:
            verdict = self._judge(self._observe())
        self._flush_alarms()
        return verdict

    def below_floor(self) -> bool:
        """Whether the wall clock reads before the floor: what a second source may correct."""
        with self._lock:
            wall = self._observe()
            below = not wall >= self._floor
        self._flush_alarms()
        return below

    def status(self) -> dict[str, Any]:
        """For ``status`` output: mode, trusted, why, now, floor and proven (RFC 3339),
        synced, jump.

        ``jump`` describes the last wall-clock jump no synchronization confirmed, or is
        ``None``; in mode ``"ntp"`` it clears when the kernel reports synchronization.
        """
        trusted, why = self.trusted()
        with self._lock:
            now, floor, jump, proven = self._wall(), self._floor, self._jump, self._proven_now()
        return {
            "mode": self.mode,
            "trusted": trusted,
            "why": why,
            "now": rfc3339(now, timespec="seconds"),
            "floor": rfc3339(floor, timespec="seconds"),
            "proven": rfc3339(proven, timespec="seconds"),
            "synced": self._is_synced(),
            "jump": jump,
        }

    # -- the saved floor ---------------------------------------------------------------------
    def load_floor(self, store: MetaStore) -> list[tuple[str, str]]:
        """Read the floor and proven time the last run saved; keep ``store`` for saving.

        Returns the alarms to raise, ``(kind, detail)``: a floor dropped as invalid
        (``clock_floor_invalid``), a reset done while the agent was stopped
        (``clock_floor_reset``).  Returned, not raised, because at start nothing can
        publish yet.  A store that cannot be read counts as empty, logged.
        """
        alarms: list[tuple[str, str]] = []
        try:
            floor, garbage = _read_time(store, FLOOR_KEY)
            stored_proven, bad_proven = _read_time(store, PROVEN_KEY)
            note = store.meta(RESET_NOTE_KEY)
        except GatewayError as exc:
            LOGGER.error("cannot read the saved trusted time (%s); only the build date "  # noqa: TRY400
                         "counts until it is saved again", exc)
            floor = stored_proven = None
            garbage = bad_proven = note = None
        if bad_proven is not None:
            LOGGER.warning("the saved proven time %s is unreadable; counting from the "
                           "build date", _quote(bad_proven))
        with self._lock:
            self._store = store
            self._proven_base = _proven_base(stored_proven, self._build_floor)
            self._proven_mono = self._mono()
            if (stored_proven is None and bad_proven is None and floor is not None
                    and garbage is None and floor <= self._wall()):
                # Saved by a version without the proven time: a floor the wall clock has
                # passed is taken as proven (found in review: it was reported as forged
                # on every upgraded site and dropped to the build date).  One still ahead
                # of the wall clock is judged as any other.
                LOGGER.info("trusted-time floor %s from an earlier version taken as the "
                            "proven time", _at(floor))
                self._proven_base = max(self._proven_base, floor)
            effective, problem = _judge_floor(floor, garbage, self._proven_base)
            if effective is not None and effective > self._floor:
                self._floor = effective
            floor_now = self._floor
        if problem is not None:
            LOGGER.warning("%s", problem)
            alarms.append(("clock_floor_invalid", problem))
            self._write(FLOOR_KEY, repr(floor_now), "the corrected trusted-time floor")
        if note:
            detail = _describe_reset_note(note)
            LOGGER.warning("%s", detail)
            alarms.append(("clock_floor_reset", detail))
            self._write(RESET_NOTE_KEY, "", "that the floor reset was reported")
        return alarms

    def save_floor(self) -> None:
        """Save the proven time and, while the clock is trusted, the wall time bounded by
        it (at most :data:`FLOOR_MARGIN_S` ahead): the floor of the next start.

        Does nothing before :meth:`load_floor`.  Store errors propagate (the agent's job
        runner turns them into an alarm).
        """
        with self._lock:
            store = self._store
            wall = self._observe()
            trusted, _ = self._judge(wall)
            proven = self._proven_now()
        self._flush_alarms()
        if store is None:
            return
        # The proven time first: a floor is never on disk without the time that bounds it.
        store.set_meta(PROVEN_KEY, repr(proven))
        if trusted:
            limit = proven + FLOOR_MARGIN_S
            if wall > limit:
                LOGGER.debug("trusted-time floor saved at the proven time plus the margin "
                             "(%s), %s behind the wall clock", _at(limit), _span(wall - limit))
            store.set_meta(FLOOR_KEY, repr(min(wall, limit)))

    def observe_server_time(self, t: float) -> None:
        """A time from a second source (an HTTPS ``Date``, epoch seconds).

        When the wall clock reads before the floor and ``t`` agrees with it within
        :data:`SERVER_TIME_TOLERANCE_S`, the floor is lowered to the confirmed time
        (never below the proven time), saved, logged and alarmed
        (``clock_floor_lowered``).  Cheap otherwise: it is called with every Stora
        answer (the client's ``on_server_date`` hook).
        """
        try:
            server = float(t)
        except (TypeError, ValueError):
            return
        with self._lock:
            wall = self._observe()
            if not (math.isfinite(server) and math.isfinite(wall)):
                return
            if wall >= self._floor:
                self._confirm_proven(wall, server)
                return
            old = self._floor
            proven = self._proven_now()
            new = max(min(wall, server), proven)
            if abs(server - wall) > SERVER_TIME_TOLERANCE_S:
                kind, note = "disagrees", (
                    f"a server's Date ({_at(server)}) does not confirm the wall clock "
                    f"({_at(wall)}, before the trusted-time floor {_at(old)}): floor kept")
            elif new > wall:
                kind, note = "proven", (
                    f"a server's Date confirms the wall clock ({_at(wall)}), but this box's "
                    f"run time proves a later time ({_at(proven)}): floor kept; if the clock "
                    "is right, reset it with `stora-gateway clock --reset-floor`")
            else:
                kind, note = "", ""
                self._floor = new
                detail = (f"the wall clock read {_at(wall)}, before the trusted-time floor "
                          f"{_at(old)}, and a server's Date ({_at(server)}) confirms it: "
                          f"floor lowered to {_at(new)}")
                self._alarms.append(("clock_floor_lowered", detail))
            repeated, self._server_note = self._server_note == kind, kind or None
        if note:
            if not repeated:  # every Stora answer lands here: say it once per change
                LOGGER.warning("%s", note)
            return
        LOGGER.warning("%s", detail)
        self._write(FLOOR_KEY, repr(new), "the lowered trusted-time floor")
        self._flush_alarms()

    def reset_floor(self, actor: str) -> dict[str, Any]:
        """Set the floor back to the build floor (module docstring says why not the proven
        time), save it, log it and raise ``clock_floor_reset`` naming ``actor``.

        Returns ``previous``, ``floor``, ``actor``, ``saved`` (False when the store
        refused: the reset holds until the agent restarts) and ``clock`` (the status).
        """
        who = one_line(actor)[:_QUOTE_MAX * 2]
        with self._lock:
            previous, self._floor = self._floor, self._build_floor
            store = self._store
        detail = (f"the trusted-time floor was reset from {_at(previous)} to "
                  f"{_at(self._build_floor)} by {who}")
        saved = store is not None and self._write(FLOOR_KEY, repr(self._build_floor),
                                                  "the reset trusted-time floor")
        if not saved:
            detail += "; it could not be saved, so a restart brings the old floor back"
        LOGGER.warning("%s", detail)
        with self._lock:
            self._alarms.append(("clock_floor_reset", detail))
        self._flush_alarms()
        return {"previous": _at(previous), "floor": _at(self._build_floor), "actor": who,
                "saved": saved, "clock": self.status()}

    # -- internals (called with self._lock held, unless said otherwise) ------------------------
    def _confirm_proven(self, wall: float, server: float) -> None:
        """A trusted wall clock that a server's time confirms moves the proven time up to
        it.  Found in review: proven time alone (build date plus run time) trails the real
        time by every day the box was off or waiting to be installed, and with it the
        floor, which then guarded against almost no step back.  A forged step forward is
        not confirmed (the server disagrees), so the bound still holds against it."""
        if abs(server - wall) > SERVER_TIME_TOLERANCE_S or not self._judge(wall)[0]:
            return
        confirmed = min(wall, server)
        if confirmed > self._proven_now():
            self._proven_base, self._proven_mono = confirmed, self._mono()

    def _proven_now(self) -> float:
        # Monotonic time never goes back; max() keeps an injected clock's from doing so.
        return self._proven_base + max(0.0, self._mono() - self._proven_mono)

    def _write(self, key: str, value: str, what: str) -> bool:
        """Save one value, without the lock; a store failure is logged, not raised."""
        store = self._store
        if store is None:
            return False
        try:
            store.set_meta(key, value)
        except GatewayError as exc:
            LOGGER.error("could not save %s: %s", what, exc)  # noqa: TRY400
            return False
        return True

    def _flush_alarms(self) -> None:
        """Send the alarms raised under the lock (called without it)."""
        with self._lock:
            alarms, self._alarms = self._alarms, []
        callback = self.on_alarm
        if callback is None:
            return
        for kind, detail in alarms:
            try:
                callback(kind, detail)
            except Exception:  # reading the clock must never fail because an alarm did
                LOGGER.exception("raising the %s alarm failed", kind)

    def _is_synced(self) -> bool:
        try:
            return bool(self._synced())
        except Exception:  # an injected or platform probe failing means "not synchronized"
            LOGGER.debug("clock synchronization probe failed", exc_info=True)
            return False

    def _observe(self) -> float:
        """Read both clocks; note a jump of ``wall - mono`` the kernel does not vouch for,
        and queue ``clock_step`` for a large step forward of a trusted clock."""
        wall = self._wall()
        offset = wall - self._mono()
        previous, self._offset = self._offset, offset
        if previous is not None and abs(offset - previous) > self._threshold:
            step = offset - previous
            synced = self._is_synced()
            if synced:
                LOGGER.info("wall clock stepped by %+.1f s while synchronized (NTP)", step)
            else:
                self._jump = f"the wall clock jumped by {step:+.0f} s at {rfc3339(wall)}"
                LOGGER.warning("%s without NTP synchronization", self._jump)
            was_trusted = self._last_verdict is not None and self._last_verdict[0]
            if step >= STEP_ALARM_S and was_trusted:
                self._alarms.append(("clock_step", (
                    f"the wall clock stepped forward by {_span(step)} to {_at(wall)} while "
                    f"trusted ({'synchronized' if synced else 'not synchronized'}); the "
                    f"floor saved stays within what run time proves ({_at(self._proven_now())})"
                )))
        return wall

    def _judge(self, wall: float) -> tuple[bool, str]:
        """The verdict, logged when it changes."""
        verdict = self._verdict(wall)
        if verdict != self._last_verdict:
            if verdict[0]:
                LOGGER.info("wall clock trusted (%s mode)", self.mode)
            else:
                LOGGER.warning("wall clock not trusted: %s", verdict[1])
            self._last_verdict = verdict
        return verdict

    def _verdict(self, wall: float) -> tuple[bool, str]:
        if not wall >= self._floor:  # also catches nan
            return False, (
                f"the wall clock reads {rfc3339(wall, timespec='seconds')}, before the last "
                f"time known good ({rfc3339(self._floor, timespec='seconds')}); if the clock "
                "is right, see `stora-gateway clock`"
            )
        if self.mode == "system":
            return True, ""
        if self._is_synced():
            self._jump = None
            return True, ""
        if self._jump is not None:
            return False, f"{self._jump}; waiting for NTP synchronization to confirm it"
        return False, "waiting for NTP synchronization (the kernel says it is unsynchronized)"
