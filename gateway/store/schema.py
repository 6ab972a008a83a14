"""The state database's schema: :data:`MIGRATIONS` and :func:`migrate`, the statuses a
command row and the states an event row can have, and how long rows are kept.

See docs/design/store-durability.md.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from gateway.store.faults import StoreError
from sitelink.codes import Status

__all__ = [
    "COMMAND_KEEP_MIN_S",
    "COMMAND_STATUSES",
    "DEAD_KEEP_S",
    "DELIVERED_KEEP_S",
    "EVENT_STATES",
    "MIGRATIONS",
    "SEND_HISTORY_KEEP_S",
    "Migration",
    "command_dedupe_s",
    "migrate",
]

LOGGER = logging.getLogger(__name__)

#: Every status a command row can have.  ``queued``: received, verified and durable
#: (the broker was acknowledged only after this), hardware not yet touched — safe to run
#: after a restart if still fresh.  ``executing``: only between start and finish.
COMMAND_STATUSES: Final = frozenset(
    {"queued", "executing", *(status.value for status in Status)})
_FINAL_STATUSES: Final = COMMAND_STATUSES - {"queued", "executing"}


@dataclass(frozen=True, slots=True)
class Migration:
    """One schema step: statements run in one transaction with the version bump."""

    description: str
    statements: tuple[str, ...]


#: The schema, version by version.  Append, never edit: a box in the field has applied
#: the earlier steps.  ``user_version`` = number of steps applied.
MIGRATIONS: Final[tuple[Migration, ...]] = (
    Migration(
        "inbox, unit state, Timeline Event outbox, meta",
        (
            """CREATE TABLE commands (
                jti TEXT PRIMARY KEY,
                cmd TEXT NOT NULL,
                unit TEXT,
                status TEXT NOT NULL CHECK (status IN
                    ('queued', 'executing', 'done', 'rejected', 'failed', 'unknown')),
                reason TEXT,
                result_json TEXT,
                received_at REAL NOT NULL,
                finished_at REAL,
                payload BLOB
            )""",
            "CREATE INDEX commands_queued ON commands (received_at) WHERE status = 'queued'",
            # recover_interrupted scans for 'executing' rows at every start.
            "CREATE INDEX commands_executing ON commands (jti) WHERE status = 'executing'",
            """CREATE TABLE units (
                unit TEXT PRIMARY KEY,
                lockout INTEGER NOT NULL DEFAULT 0 CHECK (lockout IN (0, 1)),
                lockout_ver INTEGER NOT NULL DEFAULT -1,
                relock_at REAL,
                locked INTEGER CHECK (locked IN (0, 1)),
                door TEXT NOT NULL DEFAULT 'unknown',
                confirmed INTEGER NOT NULL DEFAULT 0 CHECK (confirmed IN (0, 1)),
                updated_at REAL NOT NULL
            )""",
            # AUTOINCREMENT: a seq is never reused, even after the newest row is deleted,
            # so the drainer's order and any log line naming a seq stay unambiguous.
            # site_id is kept so a record can be rebuilt exactly (EventRow.record());
            # body_json stays NULL until the drainer freezes the POST body at the first
            # attempt, so every retry under one Idempotency-Key sends the same bytes.
            """CREATE TABLE events (
                seq INTEGER PRIMARY KEY AUTOINCREMENT,
                external_id TEXT NOT NULL UNIQUE,
                kind TEXT NOT NULL,
                unit TEXT NOT NULL,
                reference TEXT NOT NULL,
                site_id TEXT NOT NULL,
                description TEXT NOT NULL,
                contact TEXT,
                actor TEXT,
                occurred_at REAL NOT NULL,
                body_json TEXT,
                state TEXT NOT NULL DEFAULT 'pending',
                attempts INTEGER NOT NULL DEFAULT 0,
                last_error TEXT,
                created_at REAL NOT NULL
            )""",
            "CREATE INDEX events_state ON events (state, seq)",
            "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        ),
    ),
    Migration(
        "outbox delivery bookkeeping, dead letters, rate-limiter send history",
        (
            # The Idempotency-Key of the next attempt is f"{external_id}.{generation}";
            # generation and unanswered_since are written after every outcome, before
            # the next attempt (docs/design/idempotency.md, "Idempotency key policy").
            "ALTER TABLE events ADD COLUMN generation INTEGER NOT NULL DEFAULT 0",
            "ALTER TABLE events ADD COLUMN unanswered_since REAL",
            # Wall time the event is next due; 0 = due now (every existing row).
            "ALTER TABLE events ADD COLUMN next_attempt_at REAL NOT NULL DEFAULT 0",
            "ALTER TABLE events ADD COLUMN delivered_at REAL",
            "ALTER TABLE events ADD COLUMN stora_event_id TEXT",
            # Dead letters: what Stora said (HTTP status, error code, and the message,
            # details, request id and key as JSON), and when.
            "ALTER TABLE events ADD COLUMN dead_status INTEGER",
            "ALTER TABLE events ADD COLUMN dead_code TEXT",
            "ALTER TABLE events ADD COLUMN dead_json TEXT",
            "ALTER TABLE events ADD COLUMN dead_at REAL",
            "CREATE INDEX events_due ON events (next_attempt_at, seq) WHERE state = 'pending'",
            # Wall times of the requests sent to Stora in the last minute or so, so a
            # restarted agent (or a crash loop) never exceeds the rate limits.
            "CREATE TABLE send_history (at REAL NOT NULL)",
            "CREATE INDEX send_history_at ON send_history (at)",
        ),
    ),
    Migration(
        "index of delivery times (the last post to Stora, for telemetry)",
        (
            # status() asks for max(delivered_at) every telemetry interval; without an
            # index that scans every delivered event, a number that only grows.
            "CREATE INDEX events_state_delivered_at ON events (state, delivered_at)",
        ),
    ),
    Migration(
        "index of arrival times of commands (pruning ended ones)",
        (
            # The hourly prune deletes ended commands oldest first; without this it scans
            # the whole inbox every hour.
            "CREATE INDEX commands_received_at ON commands (received_at)",
        ),
    ),
)

#: Event states: ``pending`` until delivered; ``dead`` when Stora refused it for good
#: (kept with the error until a person retries it); ``delivered`` once Stora has it.
EVENT_STATES: Final = frozenset({"pending", "delivered", "dead"})
#: Send times older than this are pruned: the 60 s window plus the limiter's margin and
#: room for clock noise.
SEND_HISTORY_KEEP_S: Final = 120.0
#: An ended command's row is kept at least this long, for a technician's look back, and
#: longer while dedupe needs it (:func:`command_dedupe_s`); then it is pruned, so the
#: table stays bounded on an SD card (found in review: it was never pruned).
COMMAND_KEEP_MIN_S: Final = 7 * 86_400.0
#: Delivered Timeline Events are kept this long, for ``outbox`` and a technician's look
#: back; Stora has them, and their ``external_id`` no longer needs to dedupe anything
#: (an action's id is made from its command, which is long expired by then).
DELIVERED_KEEP_S: Final = 30 * 86_400.0
#: Dead letters wait this long for someone to retry them (``outbox retry``); after that
#: the alarm and the status have long said so, and the card must not fill with them.
DEAD_KEEP_S: Final = 90 * 86_400.0


def command_dedupe_s(max_lifetime_s: float, clock_skew_s: float) -> float:
    """How long before the trusted-time floor a command must have arrived for no copy of
    its token to pass the freshness check any more.

    A copy passes only until ``exp + clock_skew_s``; ``exp`` is at most ``iat +
    max_lifetime_s`` and ``iat`` at most ``clock_skew_s`` after arrival, so a command
    received before ``floor - (max_lifetime_s + 2 × clock_skew_s)`` is expired at any
    wall time the clock can be trusted at (gateway/clock/).  A minute on top for
    rounding.  Its ``jti`` may then go: nothing can replay it.
    """
    return max_lifetime_s + 2 * clock_skew_s + 60.0


def migrate(conn: sqlite3.Connection, migrations: Sequence[Migration] = MIGRATIONS) -> int:
    """Bring the database on ``conn`` (autocommit mode) up to ``len(migrations)``.

    Each step runs in its own ``BEGIN IMMEDIATE`` transaction with its ``user_version``,
    so a crash or an error leaves the file at the previous version, never half-migrated.
    Returns the number of steps applied.  Raises :class:`StoreError` for a file newer than
    this code; sqlite3 errors propagate to the caller, which translates them.
    """
    current = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if current > len(migrations):
        raise StoreError(
            f"the state database has schema version {current}, newer than this version of "
            f"the gateway understands ({len(migrations)}); upgrade the gateway"
        )
    applied = 0
    for version, step in enumerate(migrations[current:], start=current + 1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Re-read under the write lock: another process may have migrated meanwhile.
            if int(conn.execute("PRAGMA user_version").fetchone()[0]) >= version:
                conn.execute("ROLLBACK")
                continue
            for statement in step.statements:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {version:d}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        LOGGER.info("state database migrated to version %d: %s", version, step.description)
        applied += 1
    return applied
