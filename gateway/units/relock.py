"""Relocking: every unlock ends with the door locked again, on time.

The deadline of an unlock lives on the monotonic clock (:mod:`gateway.units.timers`);
the wall-clock ``relock_at`` in SQLite finds overdue doors after a restart.  A
self-relocking board gets a grace period to relock on its own; otherwise the agent locks.
"""

from __future__ import annotations

import functools
from dataclasses import replace

from drivers.base import LockState
from drivers.errors import DriverError
from gateway.outbox.timeline import external_id_for
from gateway.store import UnitRow
from gateway.units.core import UnitCore
from gateway.units.hardware import point_of
from sitelink.codes import Status

#: Extra time a self-relocking board gets past ``dur`` before the agent checks it.
SELF_RELOCK_GRACE_S = 1.0


class Relocking(UnitCore):
    """The relock part of the unit manager (:class:`gateway.units.manager.UnitManager`)."""

    def _schedule(self, unit: str, relock_at: float) -> None:
        """Relock ``unit`` at wall time ``relock_at`` (converted to the monotonic clock)."""
        self._schedule_in(unit, relock_at - self._now())

    def _schedule_in(self, unit: str, seconds: float) -> None:
        self._timers.schedule_in(unit, seconds)

    def _is_due(self, unit: str, row: UnitRow) -> bool:
        """Whether ``unit``'s unlock time is over (monotonic deadline; wall as fallback)."""
        if row.relock_at is None:
            return False
        deadline = self._timers.deadline(unit)
        if deadline is not None:
            return deadline <= self._mono()
        return row.relock_at <= self._now()

    def _relock_due(self, unit: str) -> None:
        """A deadline passed (on the timer thread): relock on the unit's queue."""
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
                self._timers.cancel(unit)
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
