"""What a technician does at a site, as plain functions over built hardware.

The CLI (``gateway.cli``) is a thin shell over these; later the agent's control socket
calls the same functions, so a test from the CLI and one from the cloud behave alike.

Outcomes follow the contract's vocabulary: ``done`` when the read-back confirmed the
asked-for state, ``not_confirmed`` when the controller answered but the lock is not in
that state, ``hardware_error`` when the controller could not be talked to.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from drivers.base import ActionResult, Clock, Controller, LockPoint, LockState, Reading, Sleep
from drivers.errors import DriverError
from gateway.config import LockConfig
from gateway.hardware import Site, point_of

#: A test cycle's unlock time and its wait for the relock, in seconds: the bounds every
#: way in shares (the control socket, the ``locks.test`` management request).  Past them
#: a test would hold the unit's queue, and every command for that door, for hours.
TEST_SECONDS: Final = (0.2, 30.0)
TEST_RELOCK_TIMEOUT: Final = (1.0, 60.0)
#: How often a read-back is repeated while waiting for a board to relock by itself.
RELOCK_POLL_S = 0.1
#: How long a test waits for a self-relocking board (a latch that engages when the pulse
#: ends or the door is shut) before calling the relock failed.
RELOCK_TIMEOUT_S = 10.0


def check_test_timing(name: str, value: object, bounds: tuple[float, float]) -> float | None:
    """``value`` of the test parameter ``name`` as seconds within ``bounds``, or ``None``
    when not given; ``ValueError`` naming the bounds otherwise (NaN, ±infinity, a
    negative or huge number, a bool, text)."""
    if value is None:
        return None
    lo, hi = bounds
    if (not isinstance(value, int | float) or isinstance(value, bool)
            or not lo <= value <= hi):  # also false for NaN
        raise ValueError(f"{name} must be a number from {lo:g} to {hi:g}")
    return float(value)


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
            return reading
        if clock() >= deadline:
            return reading
        sleep(RELOCK_POLL_S)


def run_test_cycle(
    site: Site,
    lock: LockConfig,
    seconds: float,
    *,
    relock_timeout_s: float = RELOCK_TIMEOUT_S,
    clock: Clock = time.monotonic,
    sleep: Sleep = time.sleep,
) -> TestResult:
    """Unlock, confirm, relock, confirm: the technician's test cycle for one lock.

    A controller that relocks by itself (a board pulse, a latch that engages when the
    door is shut) is polled until it reads locked, for at most ``seconds`` plus
    ``relock_timeout_s``; otherwise the test locks it explicitly.
    """
    opened = unlock(site, lock, seconds, clock=clock)
    if not opened.ok:
        # Whatever happened, try to leave the door locked.
        relock(site, lock, clock=clock)
        return TestResult(
            lock.unit, lock.reference, False, opened.elapsed_ms, None,
            f"unlock {opened.status}: {opened.detail}",
        )
    started = clock()
    if opened.self_relocking:
        reading = wait_locked(
            site, lock, seconds + relock_timeout_s, clock=clock, sleep=sleep
        )
        relock_ms = (clock() - started) * 1000
        if reading is None or reading.lock is not LockState.LOCKED:
            return TestResult(
                lock.unit, lock.reference, False, opened.elapsed_ms, relock_ms,
                "did not relock by itself after the board's pulse",
            )
        return TestResult(
            lock.unit, lock.reference, True, opened.elapsed_ms, relock_ms,
            "relocked by the board",
        )
    closed = relock(site, lock, clock=clock)
    return TestResult(
        lock.unit, lock.reference, closed.ok, opened.elapsed_ms, closed.elapsed_ms,
        "ok" if closed.ok else f"relock {closed.status}: {closed.detail}",
    )
