"""The state database as the agent, the outbox drainer and the CLI use it
(:class:`Store`): the reads and the single writes, each under the store's lock, over the
connection :class:`~gateway.store.database.Database` keeps.

See docs/design/store-durability.md.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Final, TypedDict

from gateway.store.database import Database
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
    _unknown_result,
)
from gateway.store.transaction import Transaction
from sitelink.codes import Status

__all__ = ["OutboxSummary", "Store"]

LOGGER = logging.getLogger(__name__)


class OutboxSummary(TypedDict):
    """:meth:`Store.outbox_summary`: the outbox's depth at a glance."""

    #: Events waiting to be delivered.
    pending: int
    #: Seconds since the oldest pending event was added (``None`` when none is).
    oldest_age_s: float | None
    #: Dead letters waiting for a person.
    dead: int


class Store(Database):
    """The state database; see docs/design/store-durability.md for the guarantees.

    ``clock`` stamps ``finished_at`` and ``created_at`` (wall seconds).  ``read_only``
    opens the file for inspection only (a technician's CLI while the agent runs): every
    write raises :class:`StoreReadOnly`, and a file needing migration is refused.
    ``busy_timeout_s`` is :data:`BUSY_TIMEOUT_S`; tests shrink it.  Opening, the lock
    and ``transaction()`` are :class:`~gateway.store.database.Database`'s.
    """

    # -- reads and single writes ----------------------------------------------------------
    def command(self, jti: str) -> CommandRow | None:
        """The inbox row of ``jti``, or ``None``."""
        with self._guard("reading a command") as conn:
            r = conn.execute(_SELECT_COMMANDS + " WHERE jti = ?",
                             (jti,)).fetchone()
        return None if r is None else _command_row(r)

    def unit(self, unit: str) -> UnitRow:
        """The state of ``unit``; :meth:`UnitRow.unseen` if it was never recorded."""
        with self._guard("reading a unit") as conn:
            r = conn.execute(_SELECT_UNITS + " WHERE unit = ?",
                             (unit,)).fetchone()
        return UnitRow.unseen(unit) if r is None else _unit_row(r)

    def units(self) -> list[UnitRow]:
        """Every recorded unit, by unit id."""
        with self._guard("reading units") as conn:
            rows = conn.execute(_SELECT_UNITS + " ORDER BY unit").fetchall()
        return [_unit_row(r) for r in rows]

    #: Most outbox rows one read of :meth:`events_after` returns, and most ``seq`` values
    #: one statement of :meth:`events_in` asks for: a burst of events (a lockout sweep
    #: over a whole site) is read in slices of this many, so one poll of ``watch`` or
    #: ``selftest`` stays short beside the running agent; and a statement's ``?`` marks
    #: stay well below SQLite's limit on them (999 before SQLite 3.32).
    OUTBOX_READ_SLICE: Final = 200

    def newest_seq(self) -> int:
        """The ``seq`` of the newest outbox row (0 when there is none)."""
        with self._guard("reading the outbox") as conn:
            row = conn.execute("SELECT coalesce(max(seq), 0) FROM events").fetchone()
        return int(row[0])

    def events_after(self, seq: int, limit: int = OUTBOX_READ_SLICE) -> list[EventRow]:
        """Outbox rows with a ``seq`` above ``seq``, oldest first, at most ``limit``: the
        newest end, for people watching a site (``watch``, ``selftest``)."""
        with self._guard("reading the outbox") as conn:
            rows = conn.execute(_SELECT_EVENTS + " WHERE seq > ? ORDER BY seq LIMIT ?",
                                (seq, limit)).fetchall()
        return [_event_row(r) for r in rows]

    def events_in(self, seqs: Iterable[int]) -> list[EventRow]:
        """The rows among ``seqs`` that still exist (pruned ones are gone), by ``seq``:
        all of them, asked for :attr:`OUTBOX_READ_SLICE` at a time."""
        wanted = sorted(set(seqs))
        found: list[EventRow] = []
        with self._guard("reading the outbox") as conn:
            for start in range(0, len(wanted), self.OUTBOX_READ_SLICE):
                part = wanted[start:start + self.OUTBOX_READ_SLICE]
                marks = ",".join("?" * len(part))
                found += map(_event_row, conn.execute(
                    _SELECT_EVENTS + f" WHERE seq IN ({marks}) ORDER BY seq", part))
        return found

    def events(self, state: str | None = None, limit: int = 100) -> list[EventRow]:
        """Outbox rows in the order they were added, optionally only those in ``state``."""
        with self._guard("reading events") as conn:
            if state is None:
                rows = conn.execute(_SELECT_EVENTS + " ORDER BY seq LIMIT ?", (limit,)).fetchall()
            else:
                rows = conn.execute(_SELECT_EVENTS + " WHERE state = ? ORDER BY seq LIMIT ?",
                                    (state, limit)).fetchall()
        return [_event_row(r) for r in rows]

    def event_count(self, state: str | None = None) -> int:
        """How many outbox rows there are (in ``state``, if given)."""
        with self._guard("counting events") as conn:
            if state is None:
                r = conn.execute("SELECT count(*) FROM events").fetchone()
            else:
                r = conn.execute("SELECT count(*) FROM events WHERE state = ?",
                                 (state,)).fetchone()
        return int(r[0])

    def meta(self, key: str) -> str | None:
        """The value stored under ``key``, or ``None``."""
        with self._guard("reading meta") as conn:
            r = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if r is None else str(r[0])

    def set_meta(self, key: str, value: str) -> None:
        """Store ``value`` under ``key``, in a transaction of its own (inside one, use
        :meth:`Transaction.set_meta`)."""
        with self.transaction() as tx:
            tx.set_meta(key, value)

    def queued_commands(self) -> list[tuple[CommandRow, bytes]]:
        """Commands received but never started, oldest first, with their signed payload."""
        with self.transaction() as tx:
            found = tx._q(_SELECT_COMMANDS.replace(" FROM", ", payload FROM", 1)
                          + " WHERE status = 'queued' ORDER BY received_at, jti").fetchall()
        return [(_command_row(r), bytes(r[8] or b"")) for r in found]

    def recover_interrupted(
        self, now: float, audit: Callable[[Transaction, CommandRow], None] | None = None
    ) -> list[CommandRow]:
        """At start: every ``executing`` command becomes ``unknown``; they are returned.

        A command still ``executing`` was interrupted by a crash between its claim and its
        outcome: whether the hardware moved cannot be known, so it is never executed
        again (contract §4); the agent publishes and audits the returned rows.  Their
        ``reason`` is ``None`` and their ``result`` the unknown result payload.
        ``audit(tx, row)`` is called for each in the same transaction, so the record of
        an action that may have happened is written together with its ``unknown``.
        """
        with self.transaction() as tx:
            found = tx._q(_SELECT_COMMANDS + " WHERE status = 'executing' "
                          "ORDER BY received_at, jti").fetchall()
            rows = [_command_row(r) for r in found]
            recovered = []
            for row in rows:
                result = _unknown_result(row, now)
                tx._q("UPDATE commands SET status = 'unknown', reason = NULL, "
                      "result_json = ?, finished_at = ? WHERE jti = ?",
                      (_dumps(result), now, row.jti))
                ended = CommandRow(
                    jti=row.jti, cmd=row.cmd, unit=row.unit, status=Status.UNKNOWN, reason=None,
                    result=result, received_at=row.received_at, finished_at=now)
                if audit is not None:
                    audit(tx, ended)
                recovered.append(ended)
        if recovered:
            LOGGER.warning("%d command(s) interrupted by the last stop are now 'unknown'",
                           len(recovered))
        return recovered

    # -- outbox (gateway/outbox/drainer.py, ``stora-gateway outbox``) ------------------
    def due_event(self, now: float) -> EventRow | None:
        """The oldest pending event due at ``now`` (a read; see :meth:`Transaction.due_event`)."""
        with self._guard("reading the outbox") as conn:
            r = conn.execute(_SELECT_EVENTS + " WHERE state = 'pending' "
                             "AND next_attempt_at <= ? ORDER BY seq LIMIT 1", (now,)).fetchone()
        return None if r is None else _event_row(r)

    def next_due_at(self) -> float | None:
        """The earliest ``next_attempt_at`` of a pending event, or ``None`` when none is."""
        with self._guard("reading the outbox") as conn:
            r = conn.execute("SELECT min(next_attempt_at) FROM events "
                             "WHERE state = 'pending'").fetchone()
        return None if r[0] is None else float(r[0])

    def last_delivered_at(self) -> float | None:
        """When Stora last accepted a Timeline Event (wall time), or ``None``; from the
        database, so it survives a restart (telemetry)."""
        with self._guard("reading the outbox") as conn:
            row = conn.execute("SELECT max(delivered_at) FROM events "
                               "WHERE state = 'delivered'").fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def outbox_summary(self, now: float) -> OutboxSummary:
        """Pending depth, the oldest pending event's age (s, ``None`` when empty), dead count."""
        with self._guard("reading the outbox") as conn:
            pending, oldest = conn.execute(
                "SELECT count(*), min(created_at) FROM events WHERE state = 'pending'"
            ).fetchone()
            dead = conn.execute("SELECT count(*) FROM events WHERE state = 'dead'").fetchone()[0]
        return {"pending": int(pending),
                "oldest_age_s": None if oldest is None else round(max(0.0, now - oldest), 1),
                "dead": int(dead)}

    def event(self, seq: int) -> EventRow | None:
        """The outbox row ``seq``, or ``None``."""
        with self._guard("reading events") as conn:
            r = conn.execute(_SELECT_EVENTS + " WHERE seq = ?", (seq,)).fetchone()
        return None if r is None else _event_row(r)

    def retry_dead(self, seq: int | None = None) -> list[int]:
        """:meth:`Transaction.retry_dead` in a transaction of its own."""
        with self.transaction() as tx:
            return tx.retry_dead(seq)

    def send_history(self, since: float) -> list[float]:
        """Wall times of the requests sent to Stora at or after ``since`` (for RateLimiter)."""
        with self._guard("reading the send history") as conn:
            rows = conn.execute("SELECT at FROM send_history WHERE at >= ? ORDER BY at",
                                (since,)).fetchall()
        return [float(r[0]) for r in rows]

    def record_send(self, at: float) -> None:
        """:meth:`Transaction.record_send` in a transaction of its own (before the request)."""
        with self.transaction() as tx:
            tx.record_send(at)
