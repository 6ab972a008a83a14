"""Unit state: what each unit should be, what it is, and keeping the two together.

Every action on a unit runs through ``UnitManager`` on a per-unit queue, so one
operation at a time per unit, in arrival order, whoever asked (a signed command or a
technician on the control socket).

Durability, in the order things happen for an unlock:

0. At receipt (before the broker is acknowledged) the verified command is recorded
   ``queued`` with its signed payload; a ``jti`` already present is never queued again.
1. One transaction moves it to ``executing`` and records the unit's ``relock_at``
   deadline.  A command that already started or ended is never executed again.
2. The hardware is driven and read back.
3. One transaction records the outcome (``done``/``failed``), the unit's read-back state
   and the Timeline Event record of the action.

A crash between 0 and 1 leaves ``queued``: the hardware was not touched, so the next
start verifies the payload again (it may have expired meanwhile) and runs it.
A crash between 1 and 3 leaves ``executing``: at the next start it becomes ``unknown``
(never re-run) and, because ``relock_at`` was written *before* the door was touched,
reconciliation relocks the door as soon as the agent is back.  So no door stays unlocked
longer than its ``dur`` plus the time the agent was down plus one reconciliation pass.

Lockout is desired state with a version: a ``lockout``/``clear_lockout`` whose ``ver`` is
not above the applied one is ``stale_version``; a unit in lockout is kept locked,
re-applied whenever a read-back shows it drifted or its controller comes back.  An
``unlock`` of a unit in lockout is refused ``overlocked`` unless overridden with a
reason, and that refusal is audited too.
"""

from __future__ import annotations

import functools
import heapq
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any, Final

from drivers.base import ActionResult, DoorState, LockState, Reading
from drivers.errors import DriverError
from gateway.config import Config, LockConfig
from gateway.intake.commands import Command
from gateway.outbox.timeline import external_id_for, make_event
from gateway.store import Store, StoreError, UnitRow
from gateway.units.executor import KeyedSerialExecutor
from gateway.units.hardware import Site, point_of
from sitelink.codes import Cmd, Reason, Status
from sitelink.payloads import result_payload, unit_state_payload

LOGGER = logging.getLogger(__name__)

#: A door open this long after its unlock ended raises ``door_held_open``.
DOOR_HELD_OPEN_S = 60.0
#: Extra time a self-relocking board gets past ``dur`` before the agent checks it.
SELF_RELOCK_GRACE_S = 1.0
#: The Timeline Event kind of each command, for one a restart interrupted.
_INTERRUPTED_KINDS: Final = MappingProxyType({
    Cmd.UNLOCK: "unlocked", Cmd.LOCK: "locked", Cmd.LOCKOUT: "overlocked",
    Cmd.CLEAR_LOCKOUT: "overlock_removed",
})


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a command came to: the payload of ``P/S/cmd/result`` is built from it.

    ``jti``, ``cmd`` and ``unit`` are ``None`` only in the rejection of a token whose
    signature did not verify: its claims are the sender's word, not the relay's.
    """

    jti: str | None
    cmd: str | None
    unit: str | None
    status: str
    reason: str | None
    state: dict[str, Any] | None
    at: float
    duplicate: bool = False

    def payload(self) -> dict[str, Any]:
        """The contract §4 result payload (:func:`sitelink.payloads.result_payload`)."""
        return result_payload(self.jti, self.cmd, self.unit, self.status, self.reason,
                              duplicate=self.duplicate, state=self.state, at=self.at)

    @classmethod
    def from_result(cls, result: dict[str, Any], *, duplicate: bool) -> Outcome:
        """An outcome read back from the inbox (to answer a duplicate)."""
        return cls(
            jti=str(result.get("jti")),
            cmd=str(result.get("cmd")),
            unit=result.get("unit"),
            status=str(result.get("status")),
            reason=result.get("reason"),
            state=result.get("state"),
            at=float(result.get("at_epoch") or time.time()),
            duplicate=duplicate,
        )

    def record(self) -> dict[str, Any]:
        """What the inbox stores, enough to re-publish the result for a duplicate."""
        return {**self.payload(), "at_epoch": self.at}


#: The Timeline Event detail of a lock the gateway made on its own, by why.
_LOCK_DETAIL: Final = {
    "relock": "relocked when the unlock time ended",
    "drift": "locked again: it read back unlocked while no unlock was running",
}


def _verdict(result: ActionResult | None) -> tuple[Status, Reason | None]:
    """Contract §4 status and reason of a hardware action (None: no answer at all)."""
    if result is None:
        return Status.FAILED, Reason.HARDWARE_ERROR
    if result.confirmed:
        return Status.DONE, None
    return Status.FAILED, Reason.NOT_CONFIRMED


Publish = Callable[[str, dict[str, Any]], None]
Alarm = Callable[[str, str | None, str], None]


class UnitManager:
    """Executes actions on units and keeps hardware, desired state and audit in step."""

    def __init__(
        self,
        config: Config,
        site: Site,
        store: Store,
        *,
        now: Callable[[], float],
        publish_unit: Publish,
        alarm: Alarm,
        mono: Callable[[], float] = time.monotonic,
        workers: int = 4,
    ) -> None:
        self.config = config
        self.site = site
        self.store = store
        self._now = now
        self._mono = mono
        self._publish_unit = publish_unit
        self._alarm = alarm
        self._executor = KeyedSerialExecutor(workers)
        self._locks = {lock.unit: lock for lock in config.locks}
        # Relock deadlines run on the monotonic clock: a wall-clock step (NTP at boot,
        # `date -s`) must not postpone a relock.  The wall-clock `relock_at` in SQLite is
        # only for finding overdue doors after a restart.
        self._timers: list[tuple[float, str]] = []  # (monotonic deadline, unit)
        self._deadline: dict[str, float] = {}  # unit -> its current monotonic deadline
        self._timer_cv = threading.Condition()
        self._stop = threading.Event()
        self._timer_thread = threading.Thread(target=self._timer_loop, name="relock", daemon=True)
        self._offline: set[str] = set()
        self._grace: set[str] = set()
        self._door_open_since: dict[str, float] = {}
        # Monotonic times of the last hardware action and of the last relock per unit:
        # a reconciliation reading older than an action is stale, and a door still open
        # just after a relock is someone in the doorway, not a forced door.
        self._acted_at: dict[str, float] = {}
        self._relocked_at: dict[str, float] = {}
        self._last_published: dict[str, dict[str, Any]] = {}
        self.actuations = 0

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        """Forget last run's read-backs, schedule recorded relocks, start the timer.

        The state published before the first read-back says "unknown" (contract §4:
        never guessed); relocks recorded before a restart are due at their wall time, or
        at once when overdue.
        """
        for row in self.store.units():
            if row.unit not in self._locks:
                continue
            with self.store.transaction() as tx:
                tx.put_unit(replace(row, locked=None, confirmed=False))
            if row.relock_at is not None:
                self._schedule(row.unit, row.relock_at)
        self._timer_thread.start()

    def mark_acted(self, unit: str) -> None:
        """The hardware of ``unit`` was driven outside a command (a technician test):
        readings taken before now are stale (see ``_reconcile_unit``)."""
        self._acted_at[unit] = self._mono()

    def timer_thread(self) -> threading.Thread:
        """The relock timer's thread, for the watchdog's liveness check."""
        return self._timer_thread

    def stop(self) -> None:
        """Shut down without leaving a door open.

        Commands not yet started stay ``queued`` in SQLite (verified again at the next
        start); running ones finish; then every door still waiting for its relock is
        locked now, early rather than left open while the agent is down.
        """
        self._executor.shutdown(cancel_pending=True)
        self._stop.set()
        with self._timer_cv:
            self._timer_cv.notify_all()
        if self._timer_thread.is_alive():
            self._timer_thread.join(timeout=5)
        for unit in list(self._deadline):
            try:
                self._lock_now(self._locks[unit], external_id_for(unit, "shutdown",
                                                                  str(self._now())),
                               None, "relock", claimed=False)
            except Exception:  # best effort at shutdown; the next start relocks from SQLite
                LOGGER.exception("%s: relock at shutdown failed", unit)

    def lock_unrecorded(self, unit: str, why: str) -> Future[Any]:
        """Lock ``unit`` now without recording anything (the store is failing).

        For a ``lock`` or ``lockout`` command whose inbox write failed: the command is
        answered ``failed`` (nothing durable says it ran, so it may come again, and
        locking twice is harmless), but the door is locked, on the unit's queue.
        """
        lock = self._locks[unit]

        def run() -> ActionResult | None:
            result, error = self._drive(lock, "lock")
            LOGGER.warning("%s: locked without a record (%s): %s", lock.reference, why,
                           "confirmed" if result is not None and result.confirmed
                           else error or "not confirmed")
            if error:
                self._alarm("hardware_error", unit, error)
            elif result is not None and not result.confirmed:
                self._alarm("jam", unit, result.detail or "lock did not confirm locked")
            return result

        return self._executor.submit(unit, run)

    def run_exclusive(self, unit: str, fn: Callable[[], Any]) -> Future[Any]:
        """Run ``fn`` on ``unit``'s queue, serialized with its commands (a technician test)."""
        return self._executor.submit(unit, fn)

    def lock_config(self, unit: str) -> LockConfig | None:
        """The configured lock of ``unit`` (a unit id)."""
        return self._locks.get(unit)

    # -- commands -------------------------------------------------------------------------
    def submit(self, command: Command, *, received_at: float | None = None) -> Future[Outcome]:
        """Queue a verified command behind the unit's other work."""
        key = command.unit or "-"
        return self._executor.submit(
            key, lambda: self.execute(command, received_at=received_at or self._now())
        )

    def answer_duplicate(self, command: Command, first_unit: str | None) -> Future[Outcome]:
        """Answer a redelivered ``jti`` with its first outcome, never running it.

        Queued behind the *first* command's unit, so the answer waits for that outcome
        when it is still running; a token that reuses the ``jti`` for another unit (or
        another action) is answered the same way and moves nothing.
        """
        def answer() -> Outcome:
            row = self.store.command(command.jti)
            return self._duplicate(dict(row.result) if row is not None and row.result else {},
                                   command)

        return self._executor.submit(first_unit or "-", answer)

    def audit_interrupted(self, tx: Any, row: Any) -> None:
        """The Timeline Event record of a command a restart interrupted (``unknown``).

        The hardware may have moved, so staff must see the attempt; the detail says the
        outcome is unknown.  Same external id as a finished command's event would have.
        """
        kind = _INTERRUPTED_KINDS.get(row.cmd)
        lock = self._locks.get(row.unit) if row.unit else None
        if kind is None or lock is None:
            return  # not an action on a configured lock (or the lock left the config)
        self._event(tx, kind, lock, row.jti, None,
                    "outcome unknown: the gateway restarted while this was under way")

    def execute(self, command: Command, *, received_at: float) -> Outcome:
        """Run one verified command (call through ``submit`` to keep per-unit order)."""
        existing = self.store.command(command.jti)
        if existing is not None and existing.status != "queued":
            return self._duplicate(existing.result, command)
        if command.cmd in (Cmd.UNLOCK, Cmd.LOCK) and (
                self._now() >= command.exp + self.config.commands.clock_skew_s):
            # It was fresh when verified but waited on the unit's queue past its expiry:
            # a momentary action never runs late (contract §5).
            return self._reject_late(command, received_at)
        handlers: dict[str, Callable[[Command, float], Outcome]] = {
            Cmd.UNLOCK: self._unlock,
            Cmd.LOCK: self._lock,
            Cmd.LOCKOUT: self._lockout,
            Cmd.CLEAR_LOCKOUT: self._clear_lockout,
        }
        return handlers[command.cmd](command, received_at)

    def _reject_late(self, command: Command, received_at: float) -> Outcome:
        with self.store.transaction() as tx:
            if not self._claim(tx, command, received_at):
                return self._duplicate(self._stored(tx, command.jti), command)
            row = tx.unit(command.unit) if command.unit else None
            return self._finish(tx, Outcome(
                command.jti, command.cmd, command.unit, Status.REJECTED, Reason.EXPIRED,
                self._state(row) if row is not None else None, self._now()))

    @staticmethod
    def _claim(tx: Any, command: Command, received_at: float) -> bool:
        """Start a command queued at receipt, or claim one that was not (the control
        socket's); ``False`` when it already started or ended: never run twice."""
        if tx.start_command(command.jti):
            return True
        return bool(tx.claim_command(command.jti, command.cmd, command.unit, received_at))

    @staticmethod
    def _stored(tx: Any, jti: str) -> dict[str, Any]:
        row = tx.command(jti)
        return dict(row.result) if row is not None else {}

    def _duplicate(self, stored: dict[str, Any], command: Command) -> Outcome:
        if stored:
            return Outcome.from_result(stored, duplicate=True)
        return Outcome(command.jti, command.cmd, command.unit, Status.UNKNOWN, None, None,
                       self._now(), duplicate=True)

    def _finish(self, tx: Any, outcome: Outcome) -> Outcome:
        tx.finish_command(outcome.jti, outcome.status, outcome.reason, outcome.record())
        return outcome

    def _state(self, row: UnitRow) -> dict[str, Any]:
        lock = self._locks[row.unit]
        return unit_state_payload(row.unit, lock.reference, locked=row.locked,
                                  lockout=row.lockout, door=row.door,
                                  relock_at=row.relock_at, confirmed=row.confirmed,
                                  updated_at=row.updated_at)

    def _event(self, tx: Any, kind: str, lock: LockConfig, key: str,  # noqa: PLR0917
               command: Command | None, detail: str) -> None:
        actor = command.actor if command else None
        parts = [p for p in (detail, f"unit {lock.reference}", f"by {actor}" if actor else "")
                 if p]
        tx.add_event(make_event(
            kind,
            app_name=self.config.site.app_name,
            site_id=self.config.site.id,
            unit=lock.unit,
            reference=lock.reference,
            external_id=external_id_for(self.config.site.id, key, kind),
            occurred_at=self._now(),
            contact=command.contact if command else None,
            actor=actor,
            detail="; ".join(parts),
        ))

    def _apply_reading(self, row: UnitRow, reading: Reading, confirmed: bool) -> UnitRow:
        locked = None if reading.lock is LockState.UNKNOWN else reading.lock is LockState.LOCKED
        return replace(row, locked=locked, door=str(reading.door), confirmed=confirmed,
                       updated_at=self._now())

    def _drive(self, lock: LockConfig, action: str, seconds: float = 0.0) -> tuple[
            ActionResult | None, str | None]:
        """Drive the hardware; (result, None) or (None, hardware error text)."""
        controller = self.site.controller_for(lock)
        self.actuations += 1
        self._acted_at[lock.unit] = self._mono()
        try:
            if action == "unlock":
                return controller.unlock(point_of(lock), seconds), None
            return controller.lock(point_of(lock)), None
        except DriverError as exc:
            return None, str(exc)

    def _unlock(self, command: Command, received_at: float) -> Outcome:
        assert command.unit is not None
        lock = self._locks[command.unit]
        dur = float(command.dur or lock.unlock_seconds)
        with self.store.transaction() as tx:
            if not self._claim(tx, command, received_at):
                return self._duplicate(self._stored(tx, command.jti), command)
            row = tx.unit(lock.unit)
            if row.lockout and not command.override:
                self._event(tx, "unlock_refused", lock, command.jti, command,
                            "the unit is overlocked")
                return self._finish(tx, Outcome(command.jti, command.cmd, lock.unit,
                                                Status.REJECTED, Reason.OVERLOCKED,
                                                self._state(row), self._now()))
            # The relock deadline is durable before the door is touched (module docstring).
            relock_at = self._now() + dur
            tx.put_unit(replace(row, relock_at=relock_at))
        # Armed before the door is driven, so no failure after this point (a full disk
        # at the next write, say) can leave the door open without a relock coming.
        self._schedule_in(lock.unit, dur)
        result, error = self._drive(lock, "unlock", dur)
        confirmed = result is not None and result.confirmed
        with self.store.transaction() as tx:
            row = tx.unit(lock.unit)
            status, reason = _verdict(result)
            if result is not None:
                row = self._apply_reading(row, result.reading, result.confirmed)
                if result.confirmed:
                    detail = f"for {dur:g} s"
                    if command.override:
                        detail += f"; overlock overridden: {command.reason}"
                    self._event(tx, "unlocked", lock, command.jti, command, detail)
            if not confirmed:
                # The unlock failed, but the door may have half moved: it is locked again
                # now, not after the unlock time (found in review, issue 12).
                row = replace(row, relock_at=self._now())
            tx.put_unit(row)
            outcome = self._finish(tx, Outcome(command.jti, command.cmd, lock.unit, status,
                                               reason, self._state(row), self._now()))
        if not confirmed:
            self._schedule_in(lock.unit, 0.0)
        if error:
            self._alarm("hardware_error", lock.unit, error)
        self._publish(row)
        return outcome

    def _lock(self, command: Command, received_at: float) -> Outcome:
        assert command.unit is not None
        lock = self._locks[command.unit]
        with self.store.transaction() as tx:
            if not self._claim(tx, command, received_at):
                return self._duplicate(self._stored(tx, command.jti), command)
        return self._lock_now(lock, command.jti, command, "lock")

    def _lock_now(self, lock: LockConfig, key: str, command: Command | None, why: str,
                  *, claimed: bool = True) -> Outcome:
        """Lock, read back, record the outcome, the state and the audit event.

        The door is driven first, so a storage failure (disk full, read-only) can only
        cost the record: a relock or a lockout's lock is applied regardless.  Without a
        claimed command the failure is logged (the store's hook raised the alarm) and
        the unrecorded outcome returned; a claimed command's failure propagates, so its
        outcome becomes ``unknown``.
        """
        result, error = self._drive(lock, "lock")
        status, reason = _verdict(result)
        try:
            with self.store.transaction() as tx:
                row = tx.unit(lock.unit)
                if result is not None:
                    row = self._apply_reading(row, result.reading, result.confirmed)
                if result is not None and result.confirmed:
                    row = replace(row, relock_at=None)
                    if why != "reapply":
                        self._event(tx, "locked", lock, key, command,
                                    _LOCK_DETAIL.get(why, ""))
                tx.put_unit(row)
                outcome = Outcome(key, command.cmd if command else Cmd.LOCK, lock.unit, status,
                                  reason, self._state(row), self._now())
                if claimed and command is not None:
                    self._finish(tx, outcome)
        except StoreError as exc:
            if claimed and command is not None:
                raise
            LOGGER.error("%s: locked (%s) but not recorded: %s",  # noqa: TRY400
                         lock.reference, status, exc)
            row = self.store.unit(lock.unit)
            if result is not None:
                row = self._apply_reading(row, result.reading, result.confirmed)
            outcome = Outcome(key, command.cmd if command else Cmd.LOCK, lock.unit, status,
                              reason, self._state(row), self._now())
        if result is not None and result.confirmed:
            self._deadline.pop(lock.unit, None)
            if why == "relock":
                self._relocked_at[lock.unit] = self._mono()
        if error:
            self._alarm("hardware_error", lock.unit, error)
        elif result is not None and not result.confirmed:
            self._alarm("jam", lock.unit, result.detail or "lock did not confirm locked")
        self._publish(row)
        return outcome

    def _lockout(self, command: Command, received_at: float) -> Outcome:
        return self._set_lockout(command, received_at, lockout=True)

    def _clear_lockout(self, command: Command, received_at: float) -> Outcome:
        return self._set_lockout(command, received_at, lockout=False)

    def _set_lockout(self, command: Command, received_at: float, *, lockout: bool) -> Outcome:
        assert command.unit is not None
        assert command.ver is not None
        lock = self._locks[command.unit]
        with self.store.transaction() as tx:
            if not self._claim(tx, command, received_at):
                return self._duplicate(self._stored(tx, command.jti), command)
            row = tx.unit(lock.unit)
            if command.ver <= row.lockout_ver:
                return self._finish(tx, Outcome(
                    command.jti, command.cmd, lock.unit, Status.REJECTED, Reason.STALE_VERSION,
                    self._state(row), self._now()))
            row = replace(row, lockout=lockout, lockout_ver=command.ver,
                          relock_at=None if lockout else row.relock_at,
                          updated_at=self._now())
            if lockout:
                self._deadline.pop(lock.unit, None)  # the lock below ends any unlock
            tx.put_unit(row)
            kind = "overlocked" if lockout else "overlock_removed"
            self._event(tx, kind, lock, command.jti, command, f"version {command.ver}")
            if not lockout:
                cleared = self._finish(tx, Outcome(command.jti, command.cmd, lock.unit,
                                                   Status.DONE, None, self._state(row),
                                                   self._now()))
        if not lockout:
            self._publish(row)  # the retained unit state must say the lockout ended
            return cleared
        # Desired state is recorded; now make the hardware match (a running unlock ends).
        outcome = self._lock_now(lock, command.jti, command, "reapply", claimed=False)
        with self.store.transaction() as tx:
            return self._finish(tx, replace(outcome, cmd=command.cmd, jti=command.jti))

    # -- relock timers --------------------------------------------------------------------
    def _schedule(self, unit: str, relock_at: float) -> None:
        """Relock ``unit`` at wall time ``relock_at`` (converted to the monotonic clock)."""
        self._schedule_in(unit, relock_at - self._now())

    def _schedule_in(self, unit: str, seconds: float) -> None:
        deadline = self._mono() + max(0.0, seconds)
        with self._timer_cv:
            self._deadline[unit] = deadline
            heapq.heappush(self._timers, (deadline, unit))
            self._timer_cv.notify()

    def _is_due(self, unit: str, row: UnitRow) -> bool:
        """Whether ``unit``'s unlock time is over (monotonic deadline; wall as fallback)."""
        if row.relock_at is None:
            return False
        deadline = self._deadline.get(unit)
        if deadline is not None:
            return deadline <= self._mono()
        return row.relock_at <= self._now()

    def _timer_loop(self) -> None:
        while not self._stop.is_set():
            with self._timer_cv:
                due: list[str] = []
                now = self._mono()
                while self._timers and self._timers[0][0] <= now:
                    deadline, unit = heapq.heappop(self._timers)
                    if self._deadline.get(unit) == deadline:  # else superseded
                        due.append(unit)
                if not due:
                    wait = self._timers[0][0] - now if self._timers else 1.0
                    self._timer_cv.wait(timeout=min(max(wait, 0.01), 1.0))
                    continue
            for unit in due:
                self._executor.submit(unit, functools.partial(self._relock_if_due, unit))

    def _relock_if_due(self, unit: str) -> None:
        row = self.store.unit(unit)
        lock = self._locks[unit]
        if not self._is_due(unit, row):
            return  # already relocked, or a later unlock moved the deadline
        controller = self.site.controller_for(lock)
        if controller.self_relocking:
            try:
                reading = controller.read(point_of(lock))
            except DriverError as exc:
                self._alarm("hardware_error", unit, str(exc))
                self._schedule_in(unit, 5.0)
                return
            if reading.lock is LockState.LOCKED:
                with self.store.transaction() as tx:
                    row = self._apply_reading(tx.unit(unit), reading, True)
                    row = replace(row, relock_at=None)
                    tx.put_unit(row)
                    self._event(tx, "locked", lock, external_id_for(unit, str(row.updated_at)),
                                None, "relocked by the controller when the unlock time ended")
                self._deadline.pop(unit, None)
                self._publish(row)
                return
            if unit not in self._grace:
                self._grace.add(unit)  # one grace period for the board's own relock
                self._schedule_in(unit, SELF_RELOCK_GRACE_S)
                return
        self._grace.discard(unit)
        outcome = self._lock_now(lock, external_id_for(unit, "relock", str(row.relock_at)),
                                 None, "relock", claimed=False)
        if outcome.status != Status.DONE:
            self._schedule_in(unit, 5.0)  # keep trying; alarms were raised

    # -- reconciliation -------------------------------------------------------------------
    def reconcile(self) -> None:
        """Read every controller; re-apply lockouts and overdue relocks; raise alarms.

        Runs on each unit's queue, so it never races a command on that unit.
        """
        by_controller: dict[str, list[LockConfig]] = {}
        for lock in self.config.locks:
            by_controller.setdefault(lock.controller, []).append(lock)
        for name, locks in by_controller.items():
            controller = self.site.controllers[name]
            try:
                readings = controller.read_many([point_of(lock) for lock in locks])
                if len(readings) != len(locks):
                    raise DriverError(  # noqa: TRY301 - same handling as a driver error
                        f"{name}: {len(readings)} readings for {len(locks)} locks")
            # A driver bug must not stop the other controllers from being reconciled.
            except Exception as exc:  # noqa: BLE001
                if name not in self._offline:
                    self._offline.add(name)
                    for lock in locks:
                        self._alarm("controller_offline", lock.unit, f"{name}: {exc}")
                        self._mark_unknown(lock)
                continue
            came_back = name in self._offline
            self._offline.discard(name)
            for lock, reading in zip(locks, readings, strict=True):
                self._executor.submit(
                    lock.unit,
                    functools.partial(self._reconcile_unit, lock, reading, came_back),
                )
        for name, locks in by_controller.items():
            self._raise_notices(name, locks)

    def _raise_notices(self, name: str, locks: list[LockConfig]) -> None:
        """Publish what a controller noticed by itself (a low battery) as alarms."""
        try:
            notices = self.site.controllers[name].notices()
        except Exception:  # a driver bug must not stop reconciliation
            LOGGER.exception("%s: collecting notices failed", name)
            return
        for notice in notices:
            unit = next((lock.unit for lock in locks
                         if (notice.device is not None and lock.device == notice.device)
                         or (notice.device is None and notice.channel is not None
                             and lock.channel == notice.channel)), None)
            self._alarm(notice.kind, unit, f"{name}: {notice.detail}")

    def _mark_unknown(self, lock: LockConfig) -> None:
        with self.store.transaction() as tx:
            row = replace(tx.unit(lock.unit), locked=None, door=str(DoorState.UNKNOWN),
                          confirmed=False, updated_at=self._now())
            tx.put_unit(row)
        self._publish(row)

    def _reconcile_unit(self, lock: LockConfig, reading: Reading, came_back: bool) -> None:
        if reading.at < self._acted_at.get(lock.unit, float("-inf")):
            return  # read before a command on this unit ran; its own read-back is newer
        before = self.store.unit(lock.unit)
        row = self._apply_reading(before, reading, True)
        changed = (row.locked, row.door, row.confirmed) != (before.locked, before.door,
                                                             before.confirmed)
        if changed:
            # Written and published only on change: an idle site costs no SQLite write
            # (no SD-card wear) and no MQTT traffic every pass.  A storage failure here
            # must not stop a lockout from being re-applied below.
            try:
                with self.store.transaction() as tx:
                    tx.put_unit(row)
            except StoreError as exc:
                LOGGER.error("%s: read-back not recorded: %s", lock.reference, exc)  # noqa: TRY400
        self._check_door(lock, row)
        if came_back:
            LOGGER.info("%s: controller back online; state re-read", lock.reference)
        running_override = row.relock_at is not None and not self._is_due(lock.unit, row)
        if row.lockout and row.locked is not True and not running_override:
            self._alarm("lockout_drift", lock.unit,
                        "unit in lockout read back unlocked; locking again")
            self._lock_now(lock, external_id_for(lock.unit, "reapply", str(self._now())),
                           None, "reapply", claimed=False)
            return
        if self._is_due(lock.unit, row) and row.locked is False:
            self._relock_if_due(lock.unit)
            return
        if before.locked is not False and row.locked is False and row.relock_at is None:
            # Read unlocked while no unlock of ours is running, after it was locked or
            # unknown: the hardware drifted (a glitch, someone at the device), or it was
            # found so at start or when its controller came back (a fail-safe maglock
            # after a power cut: every coil off, every door released).  A door is never
            # left open on its own say-so: locked again, once per such change (a latch
            # that cannot be locked by command gets one attempt, not one every pass).
            found = ("found unlocked when it was first read back" if before.locked is None
                     else "read back unlocked while it should be locked")
            self._alarm("drift", lock.unit, f"{found}; locking again")
            self._lock_now(lock, external_id_for(lock.unit, "drift", str(self._now())),
                           None, "drift", claimed=False)
            return
        if changed or lock.unit not in self._last_published:
            self._publish(row)

    def _check_door(self, lock: LockConfig, row: UnitRow) -> None:
        if row.door != str(DoorState.OPEN):
            self._door_open_since.pop(lock.unit, None)
            return
        now = self._mono()
        since = self._door_open_since.setdefault(lock.unit, now)
        just_relocked = now - self._relocked_at.get(lock.unit, float("-inf")) < DOOR_HELD_OPEN_S
        if row.locked is True and row.relock_at is None and since == now and not just_relocked:
            self._alarm("door_forced", lock.unit, "door open while the lock is locked")
        elif now - since >= DOOR_HELD_OPEN_S and row.relock_at is None:
            self._alarm("door_held_open", lock.unit,
                        f"door open for {now - since:.0f} s after the unlock ended")
            self._door_open_since[lock.unit] = now  # once a minute, not every pass

    # -- publishing -----------------------------------------------------------------------
    def _publish(self, row: UnitRow) -> None:
        state = self._state(row)
        self._last_published[row.unit] = state
        self._publish_unit(row.unit, state)

    def republish(self) -> None:
        """Publish every unit's retained state again (after a reconnect)."""
        for row in self.store.units():
            if row.unit in self._locks:
                self._publish(row)
        for lock in self.config.locks:
            if lock.unit not in self._last_published:
                self._publish(self.store.unit(lock.unit))

    def states(self) -> list[dict[str, Any]]:
        """Every unit's last known state, in config order."""
        return [self._state(self.store.unit(lock.unit)) for lock in self.config.locks]
