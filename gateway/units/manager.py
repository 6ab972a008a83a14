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

import logging
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import replace
from types import MappingProxyType
from typing import Any, Final

from drivers.base import ActionResult
from gateway.outbox.timeline import external_id_for
from gateway.store import CommandRow, Transaction
from gateway.units.outcome import Outcome, verdict
from gateway.units.reconcile import Reconciling
from sitelink.claims import Command
from sitelink.codes import Cmd, Reason, Status

__all__ = ["Outcome", "UnitManager"]

LOGGER = logging.getLogger(__name__)

#: The Timeline Event kind of each command, for one a restart interrupted.
_INTERRUPTED_KINDS: Final[MappingProxyType[str, str]] = MappingProxyType({
    Cmd.UNLOCK: "unlocked", Cmd.LOCK: "locked", Cmd.LOCKOUT: "overlocked",
    Cmd.CLEAR_LOCKOUT: "overlock_removed",
})


class UnitManager(Reconciling):
    """Executes actions on units and keeps hardware, desired state and audit in step.

    The relock timers are :class:`gateway.units.relock.Relocking`, reconciliation is
    :class:`gateway.units.reconcile.Reconciling`, the shared steps
    :class:`gateway.units.core.UnitCore`; this class applies verified commands.
    """

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
        self._timers.start(self._relock_due)

    def stop(self) -> None:
        """Shut down without leaving a door open.

        Commands not yet started stay ``queued`` in SQLite (verified again at the next
        start); running ones finish; then every door still waiting for its relock is
        locked now, early rather than left open while the agent is down.
        """
        self._executor.shutdown(cancel_pending=True)
        self._timers.stop()
        for unit in self._timers.units():
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

    def audit_interrupted(self, tx: Transaction, row: CommandRow) -> None:
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
            status, reason = verdict(result)
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
                self._timers.cancel(lock.unit)  # the lock below ends any unlock
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
