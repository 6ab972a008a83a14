"""The core of the unit manager: the state it keeps and the steps each action on a unit is
made of (claim a command, drive the hardware, read it back, record the outcome, the
unit's state and the Timeline Event, publish the state).  See gateway/units/manager.py.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import replace
from typing import Any, Final

from drivers.base import ActionResult, LockState, Reading
from drivers.errors import DriverError
from gateway.config import Config, LockConfig
from gateway.outbox.timeline import external_id_for, make_event
from gateway.store import Store, StoreError, Transaction, UnitRow
from gateway.units.executor import KeyedSerialExecutor
from gateway.units.hardware import Site, point_of
from gateway.units.outcome import Outcome, verdict
from gateway.units.timers import RelockTimers
from sitelink.claims import Command
from sitelink.codes import Cmd, Status
from sitelink.payloads import unit_state_payload

#: The logger of the module this one was split from (gateway/units/manager.py):
#: log lines keep their name, and what reads them (a journal filter) still matches.
LOGGER = logging.getLogger("gateway.units.manager")

#: The Timeline Event detail of a lock the gateway made on its own, by why.
_LOCK_DETAIL: Final = {
    "relock": "relocked when the unlock time ended",
    "drift": "locked again: it read back unlocked while no unlock was running",
}

Publish = Callable[[str, dict[str, Any]], None]
Alarm = Callable[[str, str | None, str], None]


class UnitCore:
    """What every part of the unit manager shares: the units' configuration, the store,
    the hardware, the relock timers, and the steps each action is made of.

    :class:`gateway.units.manager.UnitManager` is the class to use; the relock
    (:mod:`gateway.units.relock`) and reconciliation (:mod:`gateway.units.reconcile`)
    parts build on this one.
    """

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
        self._timers = RelockTimers(mono)
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

    def mark_acted(self, unit: str) -> None:
        """The hardware of ``unit`` was driven outside a command (a technician test):
        readings taken before now are stale (see ``_reconcile_unit``)."""
        self._acted_at[unit] = self._mono()

    def timer_thread(self) -> threading.Thread:
        """The relock timer's thread, for the watchdog's liveness check."""
        return self._timers.thread

    def run_exclusive(self, unit: str, fn: Callable[[], Any]) -> Future[Any]:
        """Run ``fn`` on ``unit``'s queue, serialized with its commands (a technician test)."""
        return self._executor.submit(unit, fn)

    def lock_config(self, unit: str) -> LockConfig | None:
        """The configured lock of ``unit`` (a unit id)."""
        return self._locks.get(unit)

    @staticmethod
    def _claim(tx: Transaction, command: Command, received_at: float) -> bool:
        """Start a command queued at receipt, or claim one that was not (the control
        socket's); ``False`` when it already started or ended: never run twice."""
        if tx.start_command(command.jti):
            return True
        return bool(tx.claim_command(command.jti, command.cmd, command.unit, received_at))

    @staticmethod
    def _stored(tx: Transaction, jti: str) -> dict[str, Any]:
        row = tx.command(jti)
        return dict(row.result) if row is not None else {}

    def _duplicate(self, stored: dict[str, Any], command: Command) -> Outcome:
        if stored:
            return Outcome.from_result(stored, duplicate=True)
        return Outcome(command.jti, command.cmd, command.unit, Status.UNKNOWN, None, None,
                       self._now(), duplicate=True)

    def _finish(self, tx: Transaction, outcome: Outcome) -> Outcome:
        assert outcome.jti is not None  # only a forged token's rejection has none: never here
        tx.finish_command(outcome.jti, outcome.status, outcome.reason, outcome.record())
        return outcome

    def _state(self, row: UnitRow) -> dict[str, Any]:
        lock = self._locks[row.unit]
        return unit_state_payload(row.unit, lock.reference, locked=row.locked,
                                  lockout=row.lockout, door=row.door,
                                  relock_at=row.relock_at, confirmed=row.confirmed,
                                  updated_at=row.updated_at)

    def _event(self, tx: Transaction, kind: str, lock: LockConfig, key: str,  # noqa: PLR0917
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
        status, reason = verdict(result)
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
            self._timers.cancel(lock.unit)
            if why == "relock":
                self._relocked_at[lock.unit] = self._mono()
        if error:
            self._alarm("hardware_error", lock.unit, error)
        elif result is not None and not result.confirmed:
            self._alarm("jam", lock.unit, result.detail or "lock did not confirm locked")
        self._publish(row)
        return outcome

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
