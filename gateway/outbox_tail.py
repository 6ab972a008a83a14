"""The newest end of the Timeline Event outbox, read-only, for people watching a site.

``stora-gateway watch`` shows each Timeline Event as it is queued, retried, delivered
or refused, and ``stora-gateway selftest`` reports whether the event of its unlock
reached Stora.  Both read the agent's state database (``[storage] path``) read-only,
beside the running agent: SQLite's WAL lets a reader see every committed row without
blocking the agent's writes, and a read-only connection cannot change anything.  The
agent's control socket was the other candidate, but it lists only pending and dead
events: one delivered within milliseconds (the usual case) would never be seen there.

On an install the database is ``stora-gateway`` 0640 in a 0750 directory
(``deploy/``): members of the group (technicians) can read it, as they can use the
control socket.

:class:`OutboxTail` is :class:`~gateway.store.Store` opened read-only (its checks, its
error translation) with the two reads ``Store`` lacks: the newest ``seq`` and the rows
after a given one.  They use ``store.py``'s column list and row reader, so only the
table's name and its ``seq`` key are known here.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Final

from gateway.store import _SELECT_EVENTS, EventRow, Store, _event_row

__all__ = ["MAX_ROWS", "OutboxTail"]

#: Most rows one read returns: a burst of events (a lockout sweep over a whole site) is
#: read in slices of this many, so one poll stays short.
MAX_ROWS: Final = 200


class OutboxTail(Store):
    """The state database at ``path``, read-only; raises ``StoreError`` when it cannot be
    opened (missing, not readable by this user, a schema this version does not know)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, read_only=True)

    def newest_seq(self) -> int:
        """The ``seq`` of the newest outbox row (0 when there is none)."""
        # The rows live in store.py's schema; reached through its guard, which turns
        # sqlite3 errors into StoreError naming the file.
        with self._guard("reading the outbox") as conn:
            row = conn.execute("SELECT coalesce(max(seq), 0) FROM events").fetchone()
        return int(row[0])

    def events_after(self, seq: int, limit: int = MAX_ROWS) -> list[EventRow]:
        """Rows with a ``seq`` above ``seq``, oldest first, at most ``limit``."""
        with self._guard("reading the outbox") as conn:
            rows = conn.execute(_SELECT_EVENTS + " WHERE seq > ? ORDER BY seq LIMIT ?",
                                (seq, limit)).fetchall()
        return [_event_row(r) for r in rows]

    def events_in(self, seqs: Iterable[int]) -> list[EventRow]:
        """The rows among ``seqs`` that still exist (pruned ones are gone), by ``seq``."""
        wanted = sorted(set(seqs))[:MAX_ROWS]
        if not wanted:
            return []
        marks = ",".join("?" * len(wanted))
        with self._guard("reading the outbox") as conn:
            rows = conn.execute(_SELECT_EVENTS + f" WHERE seq IN ({marks}) ORDER BY seq",
                                wanted).fetchall()
        return [_event_row(r) for r in rows]
