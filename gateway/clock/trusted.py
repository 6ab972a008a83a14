"""The trusted clock: :class:`TrustedClock`, the wall clock plus the rule that says when
it may judge the freshness of signed commands (contract reason ``clock_untrusted``): the
floor, the kernel's synchronization, unconfirmed jumps, and a second source (an HTTPS
``Date``) that confirms the wall clock.  See docs/design/clock.md.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any, Final, Literal

from gateway.clock.floor import (
    _QUOTE_MAX,
    BUILD_FLOOR,
    FLOOR_KEY,
    FLOOR_MARGIN_S,
    PROVEN_KEY,
    RESET_NOTE_KEY,
    MetaStore,
    _at,
    _describe_reset_note,
    _judge_floor,
    _proven_base,
    _quote,
    _read_time,
    _span,
)
from gateway.clock.kernel import kernel_synchronized
from gateway.errors import GatewayError, one_line
from sitelink.payloads import rfc3339  # the one time format of the gateway (contract §4)

#: The logger of the module this one was split from (gateway/clock.py):
#: log lines keep their name, and what reads them (a journal filter) still matches.
LOGGER = logging.getLogger("gateway.clock")

ClockMode = Literal["ntp", "system"]

#: How far ``wall - monotonic`` may move between two readings before it counts as a jump.
#: NTP slews at most 500 ppm, so slewing needs 10 000 s without a reading to move this
#: far; the agent reads the clock at least every second.  A step of 5 s or more is also
#: what matters for command freshness (``clock_skew_s`` defaults to 30 s).
JUMP_THRESHOLD_S: Final = 5.0

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

#: ``(kind, detail)``: how the clock reports an alarm (the agent adds the unit, none).
Alarm = Callable[[str, str], None]



class TrustedClock:
    """The wall clock plus the rule of docs/design/clock.md; safe across threads.

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
        # The proven time (docs/design/clock.md) is _proven_base at monotonic _proven_mono.
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
        """The latest time this box's run time proves has passed (docs/design/clock.md)."""
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
        """Set the floor back to the build floor (docs/design/clock.md says why not the proven
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
