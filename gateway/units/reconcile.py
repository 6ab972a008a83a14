"""Reconciliation: reading every controller back and keeping the units as they should be.

Each pass re-applies lockouts that drifted, relocks doors found overdue (the backstop of
the relock timers), locks doors found unlocked while no unlock runs, marks the units of
an offline controller unknown, and raises the door and controller alarms.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import replace

from drivers.base import DoorState, Reading
from drivers.errors import DriverError
from gateway.config import LockConfig
from gateway.outbox.timeline import external_id_for
from gateway.store import StoreError, UnitRow
from gateway.units.hardware import point_of
from gateway.units.relock import Relocking

#: The logger of the module this one was split from (gateway/units/manager.py):
#: log lines keep their name, and what reads them (a journal filter) still matches.
LOGGER = logging.getLogger("gateway.units.manager")

#: A door open this long after its unlock ended raises ``door_held_open``.
DOOR_HELD_OPEN_S = 60.0


class Reconciling(Relocking):
    """The reconciliation part of the unit manager (:class:`gateway.units.manager.UnitManager`)."""

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
