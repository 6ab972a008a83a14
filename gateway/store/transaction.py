"""The operations of one open transaction (:class:`Transaction`): the inbox of commands,
the unit rows, the outbox of Timeline Events and its delivery bookkeeping, the
rate-limiter's send history and the small ``meta`` facts.

See docs/design/store-durability.md.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from gateway.outbox.timeline import EventRecord
from gateway.store.rows import (
    _SELECT_COMMANDS,
    _SELECT_EVENTS,
    _SELECT_UNITS,
    CommandRow,
    EventRow,
    UnitRow,
    _command_row,
    _dumps,
    _event_row,
    _unit_row,
)
from gateway.store.schema import _FINAL_STATUSES, SEND_HISTORY_KEEP_S

if TYPE_CHECKING:
    from gateway.store.database import Database

__all__ = ["Transaction"]


class Transaction:
    """The operations of one open transaction; valid only inside ``store.transaction()``."""

    def __init__(self, store: Database) -> None:
        self._store = store
        self._conn = store._conn
        self._active = True
        #: Events this transaction added (for the store's hooks).
        self.events_added = 0

    def _q(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        if not self._active:
            raise RuntimeError("this transaction has ended; open a new store.transaction()")
        return self._conn.execute(sql, params)

    def claim_command(self, jti: str, cmd: str, unit: str | None, received_at: float) -> bool:
        """Record ``jti`` as ``executing``; ``False`` if it was ever claimed before.

        Only a conflict on the ``jti`` counts as "seen before" (``ON CONFLICT DO
        NOTHING``, not ``INSERT OR IGNORE``, which would also swallow a NOT NULL or CHECK
        violation and report a bug as a duplicate).
        """
        cur = self._q(
            "INSERT INTO commands (jti, cmd, unit, status, received_at) "
            "VALUES (?, ?, ?, 'executing', ?) ON CONFLICT (jti) DO NOTHING",
            (jti, cmd, unit, received_at),
        )
        return cur.rowcount == 1

    def queue_command(self, jti: str, cmd: str, unit: str | None, received_at: float,
                      payload: bytes) -> bool:
        """Record a verified command as ``queued`` with its signed ``payload``.

        ``False`` if the ``jti`` was ever seen before.  The agent acknowledges the MQTT
        delivery only after this commits, so a crash before it means the broker delivers
        again, and a crash after it leaves a row the next start can act on.
        """
        cur = self._q(
            "INSERT INTO commands (jti, cmd, unit, status, received_at, payload) "
            "VALUES (?, ?, ?, 'queued', ?, ?) ON CONFLICT (jti) DO NOTHING",
            (jti, cmd, unit, received_at, payload),
        )
        return cur.rowcount == 1

    def start_command(self, jti: str) -> bool:
        """``queued`` → ``executing``; ``False`` if it was not queued (already started)."""
        cur = self._q(
            "UPDATE commands SET status = 'executing' WHERE jti = ? AND status = 'queued'",
            (jti,),
        )
        return cur.rowcount == 1

    def finish_command(self, jti: str, status: str, reason: str | None,
                       result: dict[str, Any]) -> None:
        """Record a claimed command's outcome (``status`` one of done/rejected/failed/unknown).

        Raises ``ValueError`` for another status and ``LookupError`` for a ``jti`` never
        claimed: both are programming errors.
        """
        if status not in _FINAL_STATUSES:
            raise ValueError(f"a finished command's status is one of {sorted(_FINAL_STATUSES)}, "
                             f"not {status!r}")
        # Only a command still in flight can end: an outcome, once written, is what every
        # duplicate is answered with, so nothing may overwrite it.
        cur = self._q(
            "UPDATE commands SET status = ?, reason = ?, result_json = ?, finished_at = ? "
            "WHERE jti = ? AND status IN ('queued', 'executing')",
            (status, reason, _dumps(result), self._store._clock(), jti),
        )
        if cur.rowcount != 1:
            row = self.command(jti)
            if row is None:
                raise LookupError(f"command {jti!r} was never claimed")
            raise LookupError(f"command {jti!r} already ended as {row.status!r}")

    def command(self, jti: str) -> CommandRow | None:
        """The inbox row of ``jti``, or ``None``."""
        r = self._q(_SELECT_COMMANDS + " WHERE jti = ?", (jti,)).fetchone()
        return None if r is None else _command_row(r)

    def unit(self, unit: str) -> UnitRow:
        """The state of ``unit``; :meth:`UnitRow.unseen` if it was never recorded."""
        r = self._q(_SELECT_UNITS + " WHERE unit = ?", (unit,)).fetchone()
        return UnitRow.unseen(unit) if r is None else _unit_row(r)

    def put_unit(self, row: UnitRow) -> None:
        """Insert or replace the state of ``row.unit``."""
        self._q(
            "INSERT INTO units (unit, lockout, lockout_ver, relock_at, locked, door, confirmed, "
            "updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (unit) DO UPDATE SET lockout = excluded.lockout, "
            "lockout_ver = excluded.lockout_ver, relock_at = excluded.relock_at, "
            "locked = excluded.locked, door = excluded.door, confirmed = excluded.confirmed, "
            "updated_at = excluded.updated_at",
            (row.unit, int(row.lockout), row.lockout_ver, row.relock_at,
             None if row.locked is None else int(row.locked), row.door, int(row.confirmed),
             row.updated_at),
        )

    def add_event(self, record: EventRecord) -> bool:
        """Queue ``record`` in the outbox as ``pending``; ``False`` if its id is queued already.

        Idempotent on ``external_id``: the same action recorded twice (a retry after a
        crash) is one event.
        """
        cur = self._q(
            "INSERT INTO events (external_id, kind, unit, reference, site_id, description, "
            "contact, actor, occurred_at, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (external_id) DO NOTHING",
            (record.external_id, record.kind, record.unit, record.reference, record.site_id,
             record.description, record.contact, record.actor, record.occurred_at,
             self._store._clock()),
        )
        if cur.rowcount == 1:
            self.events_added += 1
            return True
        return False

    # -- outbox delivery (gateway/outbox/drainer.py) ----------------------------------------------
    def due_event(self, now: float) -> EventRow | None:
        """The oldest ``pending`` event whose ``next_attempt_at`` has come, or ``None``."""
        r = self._q(_SELECT_EVENTS + " WHERE state = 'pending' AND next_attempt_at <= ? "
                    "ORDER BY seq LIMIT 1", (now,)).fetchone()
        return None if r is None else _event_row(r)

    def event(self, seq: int) -> EventRow | None:
        """The outbox row ``seq``, or ``None``."""
        r = self._q(_SELECT_EVENTS + " WHERE seq = ?", (seq,)).fetchone()
        return None if r is None else _event_row(r)

    def freeze_body(self, seq: int, body: dict[str, Any]) -> dict[str, Any]:
        """Keep ``body`` as the event's POST body unless one is kept already; the kept one.

        Every attempt under one Idempotency-Key must send the same bytes, so the body is
        written before the first attempt and never replaced while the event is pending.
        """
        self._q("UPDATE events SET body_json = ? WHERE seq = ? AND body_json IS NULL",
                (_dumps(body), seq))
        r = self._q("SELECT body_json FROM events WHERE seq = ?", (seq,)).fetchone()
        if r is None or r[0] is None:
            raise LookupError(f"no outbox event {seq}")
        kept: dict[str, Any] = json.loads(r[0])
        return kept

    def record_attempt(self, seq: int, *, generation: int, unanswered_since: float | None,
                       next_attempt_at: float, attempts: int, last_error: str | None) -> None:
        """A pending event's key, schedule and attempt count after an attempt."""
        self._q("UPDATE events SET generation = ?, unanswered_since = ?, next_attempt_at = ?, "
                "attempts = ?, last_error = ? WHERE seq = ? AND state = 'pending'",
                (generation, unanswered_since, next_attempt_at, attempts, last_error, seq))

    def mark_delivered(self, seq: int, *, generation: int, attempts: int, delivered_at: float,
                       stora_event_id: str | None) -> None:
        """Stora has the event: ``delivered``, with its ``aevt_…`` id when Stora gave one."""
        self._q("UPDATE events SET state = 'delivered', generation = ?, attempts = ?, "
                "delivered_at = ?, stora_event_id = ?, last_error = NULL "
                "WHERE seq = ? AND state = 'pending'",
                (generation, attempts, delivered_at, stora_event_id, seq))

    def mark_dead(self, seq: int, *, generation: int, unanswered_since: float | None,
                  attempts: int, status: int | None, code: str, error: dict[str, Any],
                  dead_at: float) -> None:
        """Stora refused the event for good: ``dead``, with what it said (``error``)."""
        self._q("UPDATE events SET state = 'dead', generation = ?, unanswered_since = ?, "
                "attempts = ?, dead_status = ?, dead_code = ?, dead_json = ?, dead_at = ?, "
                "last_error = ? WHERE seq = ? AND state = 'pending'",
                (generation, unanswered_since, attempts, status, code, _dumps(error), dead_at,
                 f"{status or '-'} {code}", seq))

    def retry_dead(self, seq: int | None = None) -> list[int]:
        """Dead event ``seq`` (every dead event when ``None``) back to ``pending``; the seqs.

        The key generation is **rotated**: Stora answered the dead event's key with a
        definitive error, which it would replay for 24 hours.  The kept body is dropped
        too (the new key has never been sent, so a body built afresh from the current
        configuration is safe, and it says the event is late).
        """
        # "? IS NULL OR seq = ?": one literal statement for one seq or all of them.
        params = (seq, seq)
        seqs = [int(r[0]) for r in self._q(
            "SELECT seq FROM events WHERE state = 'dead' AND (? IS NULL OR seq = ?) "
            "ORDER BY seq", params).fetchall()]
        self._q("UPDATE events SET state = 'pending', generation = generation + 1, "
                "unanswered_since = NULL, next_attempt_at = 0, body_json = NULL, "
                "last_error = 'retried after: ' || coalesce(dead_status, '-') || ' ' || "
                "coalesce(dead_code, '?'), dead_status = NULL, dead_code = NULL, "
                "dead_json = NULL, dead_at = NULL "
                "WHERE state = 'dead' AND (? IS NULL OR seq = ?)", params)
        return seqs

    def pull_forward(self, later_than: float, to: float) -> int:
        """Pending events due after ``later_than`` become due at ``to``; how many.

        For a wall clock stepped back: a schedule written before the step must not hold
        an event for as long as the step.
        """
        cur = self._q("UPDATE events SET next_attempt_at = ? "
                      "WHERE state = 'pending' AND next_attempt_at > ?", (to, later_than))
        return cur.rowcount

    def prune(self, *, commands_before: float, delivered_before: float,
              dead_before: float, limit: int = 10_000) -> dict[str, int]:
        """Delete what no guarantee needs any more; how many rows of each kind went.

        Commands that ended (any final status) and were received before
        ``commands_before``; Timeline Events delivered before ``delivered_before``;
        dead letters that died before ``dead_before``; at most ``limit`` of each, oldest
        first (call again while a count reaches it).  Queued and executing commands and
        pending events are never touched.  The caller picks the times from what dedupe
        needs (:data:`COMMAND_KEEP_MIN_S`, :func:`command_dedupe_s`).
        """
        final = tuple(sorted(_FINAL_STATUSES))
        marks = ", ".join("?" * len(final))
        commands = self._q(
            "DELETE FROM commands WHERE rowid IN (SELECT rowid FROM commands "  # noqa: S608
            f"WHERE received_at < ? AND status IN ({marks}) ORDER BY received_at LIMIT ?)",
            (commands_before, *final, limit)).rowcount
        delivered = self._q(
            "DELETE FROM events WHERE seq IN (SELECT seq FROM events WHERE state = "
            "'delivered' AND delivered_at < ? ORDER BY delivered_at LIMIT ?)",
            (delivered_before, limit)).rowcount
        dead = self._q(
            "DELETE FROM events WHERE seq IN (SELECT seq FROM events WHERE state = 'dead' "
            "AND dead_at < ? ORDER BY seq LIMIT ?)", (dead_before, limit)).rowcount
        return {"commands": commands, "delivered": delivered, "dead": dead}

    def record_send(self, at: float) -> None:
        """One request sent to Stora at wall time ``at``; prunes what no window needs."""
        self._q("INSERT INTO send_history (at) VALUES (?)", (at,))
        self._q("DELETE FROM send_history WHERE at < ?", (at - SEND_HISTORY_KEEP_S,))

    def meta(self, key: str) -> str | None:
        """The value stored under ``key``, or ``None``."""
        r = self._q("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if r is None else str(r[0])

    def set_meta(self, key: str, value: str) -> None:
        """Store ``value`` under ``key``."""
        self._q("INSERT INTO meta (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (key, value))
