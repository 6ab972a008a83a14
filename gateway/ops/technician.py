"""What a technician does at a site, as plain functions over built hardware.

The CLI (``gateway.cli.main``) is a thin shell over these; later the agent's control socket
calls the same functions, so a test from the CLI and one from the cloud behave alike.

Outcomes follow the contract's vocabulary: ``done`` when the read-back confirmed the
asked-for state, ``not_confirmed`` when the controller answered but the lock is not in
that state, ``hardware_error`` when the controller could not be talked to.

A test cycle is what it says: the unlock is held for the time asked (by this process
on a lock the agent must relock, by the board on one that relocks itself, and a board
that relocks early fails the test), and a stop (Ctrl-C, the CLI hanging up on the
agent, the agent itself stopping) gets the lock under test relocked at once, never left
open; a stop that comes before the unlock opens nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from drivers.base import ActionResult, Clock, Controller, LockPoint, LockState, Reading, Sleep
from drivers.errors import DriverError
from gateway.config import LockConfig
from gateway.units.hardware import Site, point_of

#: How often a read-back is repeated while waiting for a board to relock by itself.
RELOCK_POLL_S = 0.1
#: How long a test waits for a self-relocking board (a latch that engages when the pulse
#: ends or the door is shut) before calling the relock failed.
RELOCK_TIMEOUT_S = 10.0
#: A board that times the unlock itself counts in units of 100 ms (a Modbus pulse, a
#: Tasmota ``PulseTime``, an OSDP timer; OSDP rounds to the nearest unit), so it may end
#: up to one unit before the time asked.  Ending earlier than that fails the test: the
#: board is not holding the door for the time the technician asked for.
EARLY_RELOCK_SLACK_S = 0.1
#: Drivers whose self-relocking unlock lasts as long as the *device* decides, whatever
#: ``seconds`` says: a lock board's firmware pulse (and a latch that waits for the door
#: to be shut), a Zigbee lock's own ``auto_relock`` timer.  Their hold is reported, not
#: judged against ``--seconds``.
DEVICE_TIMED_DRIVERS: Final = frozenset({"lockboard", "zigbee2mqtt"})


class Cancel(Protocol):
    """How a technician stops a test: set by Ctrl-C, or the CLI hanging up on the agent.

    ``threading.Event`` is one; tests pass one whose ``wait`` advances a fake clock.
    """

    def is_set(self) -> bool:
        """True once the technician asked to stop."""
        ...

    def wait(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` seconds for the stop; True when it came."""
        ...


@dataclass(frozen=True, slots=True)
class LockRow:
    """One row of ``stora-gateway locks``."""

    unit: str
    reference: str
    controller: str
    locked: bool | None
    door: str
    lockout: bool | None
    error: str | None = None

    @property
    def state(self) -> str:
        """``locked``, ``unlocked`` or ``unknown``."""
        if self.locked is None:
            return "unknown"
        return "locked" if self.locked else "unlocked"


@dataclass(frozen=True, slots=True)
class ActionOutcome:
    """The result of one unlock or lock."""

    unit: str
    reference: str
    action: str
    status: str
    detail: str
    elapsed_ms: float
    state: str
    door: str
    self_relocking: bool = False
    attempts: int = 1

    @property
    def ok(self) -> bool:
        """True when the action was confirmed by a read-back."""
        return self.status == "done"


@dataclass(frozen=True, slots=True)
class TestResult:
    """One row of ``stora-gateway test``: unlock, confirm, relock, confirm."""

    unit: str
    reference: str
    passed: bool
    unlock_ms: float | None
    relock_ms: float | None
    detail: str
    held_ms: float | None = None
    """How long the lock stayed unlocked: from the confirmed unlock to the relock sent by
    the test, or, on a board that relocks itself, from the unlock request to the first
    read-back showing it locked."""
    interrupted: bool = False
    """The technician stopped the test during this cycle; the lock was relocked early."""

    def as_dict(self) -> dict[str, object]:
        """The row as the CLI and the control socket carry it (``test --json``)."""
        return {"unit": self.unit, "reference": self.reference, "passed": self.passed,
                "unlock_ms": self.unlock_ms, "held_ms": self.held_ms,
                "relock_ms": self.relock_ms, "detail": self.detail}


def _locked(reading: Reading) -> bool | None:
    if reading.lock is LockState.UNKNOWN:
        return None
    return reading.lock is LockState.LOCKED


def read_locks(site: Site, locks: Sequence[LockConfig]) -> list[LockRow]:
    """Read every lock, one request per controller where the driver allows it.

    A controller that cannot be read yields rows with unknown state and its error; the
    other controllers are still read.
    """
    by_controller: dict[str, list[LockConfig]] = {}
    for lock in locks:
        by_controller.setdefault(lock.controller, []).append(lock)
    rows: dict[str, LockRow] = {}
    for name, group in by_controller.items():
        controller = site.controllers[name]
        try:
            readings = controller.read_many([point_of(lock) for lock in group])
        except DriverError as exc:
            for lock in group:
                rows[lock.unit] = LockRow(
                    lock.unit, lock.reference, name, None, "unknown", None, str(exc)
                )
            continue
        for lock, reading in zip(group, readings, strict=True):
            rows[lock.unit] = LockRow(
                lock.unit, lock.reference, name, _locked(reading), str(reading.door), None
            )
    return [rows[lock.unit] for lock in locks]


def _outcome(
    lock: LockConfig, action: str, run: Callable[[Controller, LockPoint], ActionResult], site: Site,
    clock: Clock,
) -> ActionOutcome:
    controller = site.controller_for(lock)
    point = point_of(lock)
    started = clock()
    try:
        result = run(controller, point)
    except DriverError as exc:
        elapsed = (clock() - started) * 1000
        return ActionOutcome(
            lock.unit, lock.reference, action, "hardware_error", str(exc), elapsed,
            "unknown", "unknown",
        )
    elapsed = (clock() - started) * 1000
    reading = result.reading
    status = "done" if result.confirmed else "not_confirmed"
    detail = result.detail or ("confirmed by read-back" if result.confirmed else "not confirmed")
    return ActionOutcome(
        lock.unit, lock.reference, action, status, detail, elapsed,
        str(reading.lock), str(reading.door), result.self_relocking, result.attempts,
    )


def unlock(
    site: Site, lock: LockConfig, seconds: float, *, clock: Clock = time.monotonic
) -> ActionOutcome:
    """Unlock ``lock`` for ``seconds`` and confirm by read-back."""
    return _outcome(lock, "unlock", lambda c, p: c.unlock(p, seconds), site, clock)


def relock(site: Site, lock: LockConfig, *, clock: Clock = time.monotonic) -> ActionOutcome:
    """Lock ``lock`` now and confirm by read-back."""
    return _outcome(lock, "lock", lambda c, p: c.lock(p), site, clock)


def wait_locked(
    site: Site,
    lock: LockConfig,
    timeout_s: float,
    *,
    clock: Clock = time.monotonic,
    sleep: Sleep = time.sleep,
) -> Reading | None:
    """Poll until the lock reads back locked; the last reading if it never does."""
    reading, _ = _poll_locked(site, lock, timeout_s, _Sleeper(sleep), clock)
    return reading


class _Sleeper:
    """A :class:`Cancel` that is never set and sleeps with ``sleep`` (no one to stop)."""

    def __init__(self, sleep: Sleep) -> None:
        self._sleep = sleep

    def is_set(self) -> bool:
        return False

    def wait(self, timeout: float | None = None) -> bool:
        self._sleep(timeout or 0.0)
        return False


def _poll_locked(
    site: Site, lock: LockConfig, timeout_s: float, cancel: Cancel, clock: Clock,
) -> tuple[Reading | None, bool]:
    """Poll until the lock reads locked, ``timeout_s`` passes or ``cancel`` is set.

    Returns the last reading (``None`` when the last read failed) and whether the
    technician stopped the wait.
    """
    controller = site.controller_for(lock)
    point = point_of(lock)
    deadline = clock() + timeout_s
    reading: Reading | None = None
    while True:
        try:
            reading = controller.read(point)
        except DriverError:
            reading = None
        if reading is not None and reading.lock is LockState.LOCKED:
            return reading, False
        if clock() >= deadline:
            return reading, False
        if cancel.wait(RELOCK_POLL_S):
            return reading, True


def _hold(seconds: float, cancel: Cancel, clock: Clock) -> bool:
    """Wait ``seconds`` unless the technician stops first; True when stopped."""
    deadline = clock() + seconds
    while (remaining := deadline - clock()) > 0:
        if cancel.wait(remaining):
            return True
    return False


def _device_timed(site: Site, lock: LockConfig) -> bool:
    """Whether ``lock``'s self-relocking unlock lasts as long as the device decides."""
    cfg = site.config.controller(lock.controller)
    return cfg is not None and cfg.driver in DEVICE_TIMED_DRIVERS


def run_test_cycle(
    site: Site,
    lock: LockConfig,
    seconds: float,
    *,
    relock_timeout_s: float = RELOCK_TIMEOUT_S,
    clock: Clock = time.monotonic,
    sleep: Sleep = time.sleep,
    cancel: Cancel | None = None,
) -> TestResult | None:
    """Unlock, confirm, hold ``seconds``, relock, confirm: the technician's test cycle.

    * A lock the gateway must relock is held ``seconds`` (checked still unlocked at the
      end of the hold), then locked explicitly.
    * A controller that relocks by itself (a board pulse, a latch that engages when the
      door is shut) is polled until it reads locked, for at most ``seconds`` plus
      ``relock_timeout_s``; one that asked to time the unlock and relocked before
      ``seconds`` (less one pulse unit) fails: its pulse setting is wrong.
    * An unlock that did not confirm is relocked at once; nothing is held.
    * ``cancel`` (Ctrl-C, the CLI hanging up) ends the hold at once: the lock is locked
      now (ending a board's pulse where the board allows it) and the row says
      ``interrupted``.
    * ``cancel`` already set: ``None``, and nothing is driven.

    ``sleep`` is only used when no ``cancel`` is given.
    """
    stop: Cancel = cancel if cancel is not None else _Sleeper(sleep)
    # Checked here, right before the unlock, and not only by the caller between locks:
    # the stop may come from another thread (the agent notices a hang-up on a watcher
    # thread) just after the caller looked, and then no door may open (found in review).
    if stop.is_set():
        return None
    opened = unlock(site, lock, seconds, clock=clock)
    if not opened.ok:
        # Nothing to hold: whatever happened, try to leave the door locked, now.
        closed = relock(site, lock, clock=clock)
        after = ("relocked at once" if closed.ok
                 else f"relock {closed.status.replace('_', ' ')}: {closed.detail}")
        return TestResult(
            lock.unit, lock.reference, False, opened.elapsed_ms, closed.elapsed_ms,
            f"unlock {opened.status.replace('_', ' ')}: {opened.detail}; {after}",
        )
    confirmed_at = clock()
    if opened.self_relocking:
        return _self_relock(site, lock, seconds, relock_timeout_s=relock_timeout_s,
                            opened=opened, confirmed_at=confirmed_at, stop=stop, clock=clock)
    interrupted = _hold(seconds, stop, clock)
    held_ms = (clock() - confirmed_at) * 1000
    early = None if interrupted else _relocked_early(site, lock)
    closed = relock(site, lock, clock=clock)
    if not closed.ok:
        detail = f"relock {closed.status.replace('_', ' ')}: {closed.detail}"
    elif interrupted:
        detail = f"interrupted after {held_ms / 1000:.1f} s of {seconds:g}: relocked at once"
    elif early is not None:
        detail = f"locked before the {seconds:g} s were up ({early}); relocked"
    else:
        detail = f"held {held_ms / 1000:.1f} s, relocked"
    return TestResult(
        lock.unit, lock.reference, closed.ok and not interrupted and early is None,
        opened.elapsed_ms, closed.elapsed_ms, detail, held_ms, interrupted,
    )


def _relocked_early(site: Site, lock: LockConfig) -> str | None:
    """Why the hold did not hold (the lock already reads locked), or ``None``.

    A read that fails proves nothing either way: the relock that follows says the rest.
    """
    try:
        reading = site.controller_for(lock).read(point_of(lock))
    except DriverError:
        return None
    if reading.lock is LockState.LOCKED:
        return "something else relocked it: another master on the bus, or a board timer"
    return None


def _self_relock(
    site: Site, lock: LockConfig, seconds: float, *, relock_timeout_s: float,
    opened: ActionOutcome, confirmed_at: float, stop: Cancel, clock: Clock,
) -> TestResult:
    """The second half of a test cycle on a controller that relocks by itself.

    ``relock_ms`` is the wait for the board's relock after the unlock confirmed;
    ``held_ms`` runs from the unlock request to the first read-back showing it locked:
    the board's own hold as seen from outside (at most one poll late), so a board that
    did hold is never failed for the latency of our read-back.
    """
    reading, interrupted = _poll_locked(site, lock, seconds + relock_timeout_s, stop, clock)
    waited_ms = (clock() - confirmed_at) * 1000
    held_ms = waited_ms + opened.elapsed_ms
    held = held_ms / 1000
    if interrupted:
        # End the board's pulse now where it can be ended; a lock board only reads back
        # (its latch engages when the door is shut), and its detail says so.
        closed = relock(site, lock, clock=clock)
        after = ("relocked at once" if closed.ok
                 else f"relock {closed.status.replace('_', ' ')}: {closed.detail}")
        return TestResult(
            lock.unit, lock.reference, False, opened.elapsed_ms, closed.elapsed_ms,
            f"interrupted after {held:.1f} s: {after}", held_ms, True,
        )
    if reading is None or reading.lock is not LockState.LOCKED:
        return TestResult(
            lock.unit, lock.reference, False, opened.elapsed_ms, waited_ms,
            "did not relock by itself after the board's pulse", None,
        )
    if _device_timed(site, lock):
        note = "" if held >= seconds else \
            " (the device times the unlock itself; --seconds does not apply)"
        return TestResult(
            lock.unit, lock.reference, True, opened.elapsed_ms, waited_ms,
            f"relocked by the device after {held:.1f} s{note}", held_ms,
        )
    if held < seconds - EARLY_RELOCK_SLACK_S:
        return TestResult(
            lock.unit, lock.reference, False, opened.elapsed_ms, waited_ms,
            f"the board relocked after {held:.1f} s, not {seconds:g} s: its timed unlock is "
            "shorter than asked (check the pulse settings, hardware.md)", held_ms,
        )
    return TestResult(
        lock.unit, lock.reference, True, opened.elapsed_ms, waited_ms,
        f"held {held:.1f} s, relocked by the board", held_ms,
    )
