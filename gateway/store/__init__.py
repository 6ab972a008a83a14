"""The agent's durable state: one SQLite file (``[storage] path``).

What lives here
---------------
``commands``  the inbox: one row per command ``jti`` ever claimed, so a command is never
              executed twice (contract §4), with its final result for duplicates.
``units``     each unit's desired state (lockout and its version, the relock deadline)
              and last read-back state.
``events``    the Timeline Event outbox (contract §6): records wait here, ``pending``,
              until the drainer (gateway/outbox/drainer.py) has delivered them, or ``dead``
              with Stora's error until a person retries them.  Each row carries its
              delivery bookkeeping: the frozen POST body, the Idempotency-Key
              ``generation`` and ``unanswered_since``, ``next_attempt_at``,
              ``attempts``, ``delivered_at`` and Stora's event id, or the dead letter.
``send_history``  wall times of the requests sent to Stora in the last two minutes, so
              a restarted rate limiter honours the windows (gateway/stora/).
``meta``      small key/value facts, e.g. the last trusted wall time (gateway/clock.py).

Durability
----------
* WAL journal with ``synchronous=FULL``: when :meth:`Store.transaction` returns, the
  commit is on the disk; a ``kill -9`` or a power cut cannot lose it (fault matrix #21,
  #22).  ``NORMAL`` would be faster but may lose the last commits on power loss, and an
  acknowledged command or event must never be lost.
* ``BEGIN IMMEDIATE``: the write lock is taken when a transaction starts, not at its
  first write, so a transaction never fails half-way on a lock held by another process
  (a technician's CLI); ``busy_timeout`` makes that process wait instead of failing.
* ``PRAGMA quick_check`` at every open (milliseconds at this size): a corrupt file
  raises :class:`StoreCorrupt` instead of failing later in the middle of a command; the
  agent moves it aside with :meth:`Store.quarantine` and starts empty (fault matrix #24).
* Schema changes are :data:`MIGRATIONS`, a list applied in order, each in its own
  transaction together with the ``PRAGMA user_version`` that records it; a file written
  by a newer version is refused rather than misread.  (The style guide suggests
  sqlite-utils for migrations; this project keeps the store on the standard library, and
  what it needs is a dozen lines.)

Errors
------
Foreign exceptions are translated here, at one boundary::

    GatewayError
    └── StoreError          the state database failed; ``retryable`` says if trying again helps
        ├── StoreFull       disk full (SQLITE_FULL): retryable once space is freed
        ├── StoreReadOnly   the file or its filesystem is read-only: a person must fix it
        ├── StoreCorrupt    quick_check failed or the file is not a database: quarantine it
        └── StoreBusy       another process held the write lock past busy_timeout: retryable

Hooks: ``on_events_added(n)`` after a commit that added events (the agent wakes the
drainer), ``on_write_failed(error, n)`` after a transaction that failed with a
:class:`StoreError`, ``n`` being the events it refused (counted in ``events_refused``;
the agent raises a storage alarm).  Both run outside the store's lock.

Whenever a statement fails inside a transaction the transaction is rolled back with an
explicit ``ROLLBACK`` (SQLite leaves some failures, e.g. SQLITE_READONLY, with the
transaction still open) before the error propagates, so the connection is always usable
again: after a disk-full error, reads still work and writes work once space is freed.

A filesystem that turns read-only *while* the agent runs (fault matrix #25) is the
kernel's answer to a storage error (ext4 ``errors=remount-ro``); an operator's
``mount -o remount,ro`` is refused (EBUSY) while the agent has the file open.  SQLite
reports the EROFS of its write() as an I/O error, so an I/O error probes the directory
and becomes :class:`StoreReadOnly` when it refuses a new file; reads keep working from
the open file.  The kernel does not undo such a remount under open files, so the error
says a restart is needed once the filesystem is repaired; if a repaired filesystem is
mounted over the database's directory while the agent runs, the next transaction
notices a different file at ``path`` and moves the connection to it (writes resume, no
restart).  Covered by tests/test_storage_faults.py.

Threads
-------
One connection, guarded by one re-entrant lock, shared by every thread.  SQLite allows one
writer at a time anyway, our transactions are short (the hardware is never driven inside
one: see gateway/units/manager.py), and a single connection keeps the order of operations
obvious, makes :meth:`Store.close` trivial and costs one page cache on a small box.
Connections per thread would buy concurrent reads, which a site with tens of commands a
minute does not need, at the price of tracking and closing them.  Inside a transaction
the owning thread may also call the store's read methods (they see its uncommitted
writes); other threads wait until it ends, so never wait on another thread while a
transaction is open.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from gateway.errors import GatewayError, one_line
from gateway.outbox.timeline import EventRecord
from sitelink.codes import Status
from sitelink.payloads import result_payload, rfc3339

__all__ = [
    "BUSY_TIMEOUT_S",
    "COMMAND_KEEP_MIN_S",
    "COMMAND_STATUSES",
    "DEAD_KEEP_S",
    "DELIVERED_KEEP_S",
    "EVENT_STATES",
    "MIGRATIONS",
    "SEND_HISTORY_KEEP_S",
    "CommandRow",
    "EventRow",
    "Migration",
    "Store",
    "StoreBusy",
    "StoreCorrupt",
    "StoreError",
    "StoreFull",
    "StoreReadOnly",
    "Transaction",
    "UnitRow",
    "command_dedupe_s",
    "migrate",
]

LOGGER = logging.getLogger(__name__)

#: SQLite page cache per connection, KiB (``PRAGMA cache_size``; SQLite's default: 2000).
CACHE_KIB: Final = 512

#: How long a writer waits for another process's write lock before StoreBusy.  A
#: technician's CLI holds it for milliseconds; 5 s rides out a slow SD card's fsync.
BUSY_TIMEOUT_S: Final = 5.0

#: Every status a command row can have.  ``queued``: received, verified and durable
#: (the broker was acknowledged only after this), hardware not yet touched — safe to run
#: after a restart if still fresh.  ``executing``: only between start and finish.
COMMAND_STATUSES: Final = frozenset(
    {"queued", "executing", *(status.value for status in Status)})
_FINAL_STATUSES: Final = COMMAND_STATUSES - {"queued", "executing"}

# Primary SQLite result codes (the low byte of an extended code).
_SQLITE_BUSY: Final = 5
_SQLITE_LOCKED: Final = 6
_SQLITE_READONLY: Final = 8
_SQLITE_IOERR: Final = 10
_SQLITE_CORRUPT: Final = 11
_SQLITE_FULL: Final = 13
_SQLITE_CANTOPEN: Final = 14
_SQLITE_NOTADB: Final = 26

# The files SQLite keeps next to a database.  Quarantine moves the companions before the
# database itself: a stale -wal left beside a fresh database would be replayed into it.
_COMPANIONS: Final = ("-journal", "-wal", "-shm")


# --------------------------------------------------------------------------- errors


class StoreError(GatewayError):
    """The state database failed; the message names the file and what was being done."""

    def __init__(self, message: str, *, retryable: bool | None = None) -> None:
        super().__init__(one_line(message))
        if retryable is not None:
            self.retryable = retryable


class StoreFull(StoreError):  # noqa: N818 - the names the agent uses
    """The filesystem is full (SQLITE_FULL); the transaction was rolled back."""

    retryable = True


class StoreReadOnly(StoreError):  # noqa: N818 - the names the agent uses
    """The database or its filesystem is read-only; the transaction was rolled back."""

    retryable = False


class StoreCorrupt(StoreError):  # noqa: N818 - the names the agent uses
    """The file is damaged or not a database; move it aside with :meth:`Store.quarantine`."""

    retryable = False


class StoreBusy(StoreError):  # noqa: N818 - the names the agent uses
    """Another process held the write lock for longer than the busy timeout."""

    retryable = True


def _translate(exc: sqlite3.Error, path: Path, doing: str) -> StoreError:
    """The :class:`StoreError` for a sqlite3 exception raised while ``doing``."""
    code = getattr(exc, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    where = f"state database {path}"
    if primary == _SQLITE_FULL:
        return StoreFull(f"{where}: disk full while {doing}; free space on its filesystem")
    if primary == _SQLITE_READONLY:
        return StoreReadOnly(
            f"{where} is read-only ({exc}) while {doing}; check the filesystem is mounted "
            "read-write and the file is writable by the agent's user"
        )
    if primary in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
        return StoreCorrupt(f"{where} is corrupt ({exc}) while {doing}")
    if primary in (_SQLITE_BUSY, _SQLITE_LOCKED):
        return StoreBusy(f"{where} is locked by another process while {doing} ({exc})")
    if primary == _SQLITE_CANTOPEN:
        if _on_read_only_fs(path.parent):
            # Also for an existing file: a WAL database cannot be opened where its -wal and
            # -shm files neither exist nor can be created.
            return StoreReadOnly(f"{where} cannot be opened: its filesystem is read-only; "
                                 "remount it read-write")
        return StoreError(
            f"cannot open {where} ({exc}); check its directory exists and the agent's "
            "user may write there"
        )
    if primary == _SQLITE_IOERR:
        if _refuses_writes(path.parent):
            # A filesystem that turns read-only under open files (ext4 ``errors=remount-
            # ro`` after a storage error) fails SQLite's write() or fsync() with EROFS,
            # which SQLite reports as an I/O error; and ext4 does not always set
            # ST_RDONLY then, so only a write attempt tells.
            return StoreReadOnly(
                f"{where}: its filesystem turned read-only while {doing} ({exc}); nothing "
                "new can be recorded.  Repair the filesystem (fsck) and mount it read-write "
                f"at {path.parent} again, then RESTART THE AGENT: the kernel does not undo "
                "an error remount under open files.  (A freshly mounted filesystem there is "
                "picked up without a restart, at the next write.)"
            )
        return StoreError(f"{where}: I/O error while {doing} ({exc}); check the storage device")
    return StoreError(f"{where}: {doing} failed: {exc}")


def _on_read_only_fs(directory: Path) -> bool:
    """Whether ``directory`` is on a filesystem mounted read-only (root cannot write there)."""
    try:
        return bool(os.statvfs(directory).f_flag & os.ST_RDONLY)
    except (OSError, ValueError):
        return False


def _refuses_writes(directory: Path) -> bool:
    """Whether creating a file in ``directory`` fails with EROFS (or it is mounted read-only).

    Used only after an I/O error: a filesystem the kernel turned read-only after an error
    may still report itself read-write to ``statvfs``.  The probe file is removed again.
    """
    if _on_read_only_fs(directory):
        return True
    # A fresh name, created exclusively and never through a link: the directory may be
    # writable by others, and a planted symlink must not make this open (O_TRUNC, as it
    # was: found in review) truncate whatever it points to.
    probe = directory / f".stora-gateway-probe-{os.getpid()}-{secrets.token_hex(8)}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        return exc.errno == errno.EROFS
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)
    return False


def _file_id(path: Path) -> tuple[int, int] | None:
    """``(st_dev, st_ino)`` of ``path``, or ``None`` when it cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


# --------------------------------------------------------------------------- schema


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
            # the next attempt (gateway/stora/, "Idempotency key policy").
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
    wall time the clock can be trusted at (gateway/clock.py).  A minute on top for
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


# --------------------------------------------------------------------------- rows


@dataclass(frozen=True, slots=True)
class CommandRow:
    """One inbox row.  ``result`` is ``{}`` until the command is finished."""

    jti: str
    cmd: str
    unit: str | None
    status: str
    reason: str | None
    result: dict[str, Any]
    received_at: float
    finished_at: float | None


@dataclass(frozen=True, slots=True)
class UnitRow:
    """A unit's desired and last known state.

    ``lockout_ver`` is ``-1`` until a lockout command has been applied (contract
    ``ver`` values are integers that only grow, so any real one is newer).  ``locked`` is
    ``None`` while unknown, never guessed; ``relock_at`` is a wall-clock deadline.
    """

    unit: str
    lockout: bool
    lockout_ver: int
    relock_at: float | None
    locked: bool | None
    door: str
    confirmed: bool
    updated_at: float

    @classmethod
    def unseen(cls, unit: str) -> UnitRow:
        """The row of a unit never recorded: no lockout, nothing known, ``updated_at`` 0."""
        return cls(unit=unit, lockout=False, lockout_ver=-1, relock_at=None, locked=None,
                   door="unknown", confirmed=False, updated_at=0.0)


@dataclass(frozen=True, slots=True)
class EventRow:
    """One outbox row: the record plus its delivery bookkeeping."""

    seq: int
    external_id: str
    kind: str
    unit: str
    reference: str
    site_id: str
    description: str
    contact: str | None
    actor: str | None
    occurred_at: float
    body: dict[str, Any] | None
    state: str
    attempts: int
    last_error: str | None
    created_at: float
    generation: int = 0
    unanswered_since: float | None = None
    next_attempt_at: float = 0.0
    delivered_at: float | None = None
    stora_event_id: str | None = None
    dead_status: int | None = None
    dead_code: str | None = None
    dead: dict[str, Any] | None = None
    dead_at: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready data for ``stora-gateway outbox --json`` and the control socket."""
        return {
            "seq": self.seq, "external_id": self.external_id, "kind": self.kind,
            "unit": self.unit, "reference": self.reference,
            "description": self.description, "state": self.state,
            "occurred_at": rfc3339(self.occurred_at), "created_at": rfc3339(self.created_at),
            "attempts": self.attempts, "last_error": self.last_error,
            "generation": self.generation,
            "next_attempt_at": rfc3339(self.next_attempt_at) if self.next_attempt_at else None,
            "delivered_at": rfc3339(self.delivered_at) if self.delivered_at else None,
            "stora_event_id": self.stora_event_id,
            "error": None if self.state != "dead" else {
                "status": self.dead_status, "code": self.dead_code, **(self.dead or {}),
                "dead_at": rfc3339(self.dead_at) if self.dead_at else None,
            },
        }

    def record(self) -> EventRecord:
        """The :class:`EventRecord` this row was added from."""
        return EventRecord(
            external_id=self.external_id, kind=self.kind, unit=self.unit,
            reference=self.reference, site_id=self.site_id, description=self.description,
            contact=self.contact, actor=self.actor, occurred_at=self.occurred_at,
        )


# Whole literal statements, in the column order the _*_row functions read.
_SELECT_COMMANDS: Final = (
    "SELECT jti, cmd, unit, status, reason, result_json, received_at, finished_at "
    "FROM commands"
)
_SELECT_UNITS: Final = (
    "SELECT unit, lockout, lockout_ver, relock_at, locked, door, confirmed, updated_at "
    "FROM units"
)
_SELECT_EVENTS: Final = (
    "SELECT seq, external_id, kind, unit, reference, site_id, description, contact, actor, "
    "occurred_at, body_json, state, attempts, last_error, created_at, generation, "
    "unanswered_since, next_attempt_at, delivered_at, stora_event_id, dead_status, "
    "dead_code, dead_json, dead_at FROM events"
)


def _command_row(r: sqlite3.Row | tuple[Any, ...]) -> CommandRow:
    return CommandRow(jti=r[0], cmd=r[1], unit=r[2], status=r[3], reason=r[4],
                      result=json.loads(r[5]) if r[5] else {}, received_at=r[6],
                      finished_at=r[7])


def _unit_row(r: sqlite3.Row | tuple[Any, ...]) -> UnitRow:
    return UnitRow(unit=r[0], lockout=bool(r[1]), lockout_ver=int(r[2]), relock_at=r[3],
                   locked=None if r[4] is None else bool(r[4]), door=r[5],
                   confirmed=bool(r[6]), updated_at=r[7])


def _event_row(r: sqlite3.Row | tuple[Any, ...]) -> EventRow:
    return EventRow(seq=r[0], external_id=r[1], kind=r[2], unit=r[3], reference=r[4],
                    site_id=r[5], description=r[6], contact=r[7], actor=r[8],
                    occurred_at=r[9], body=json.loads(r[10]) if r[10] else None,
                    state=r[11], attempts=r[12], last_error=r[13], created_at=r[14],
                    generation=r[15], unanswered_since=r[16], next_attempt_at=r[17],
                    delivered_at=r[18], stora_event_id=r[19], dead_status=r[20],
                    dead_code=r[21], dead=json.loads(r[22]) if r[22] else None,
                    dead_at=r[23])


def _dumps(value: dict[str, Any]) -> str:
    # allow_nan=False: the stored result is re-published as JSON, where NaN is invalid.
    return json.dumps(value, separators=(",", ":"), sort_keys=True, allow_nan=False)


def _unknown_result(row: CommandRow, now: float) -> dict[str, Any]:
    """The result of an interrupted command, shaped like every other stored result.

    The fields are those of a ``P/S/cmd/result`` payload (contract §4) plus ``at_epoch``,
    so a duplicate of the ``jti`` re-publishes "unknown" like any finished command.
    """
    return {**result_payload(row.jti, row.cmd, row.unit, Status.UNKNOWN, None,
                             duplicate=False, state=None, at=now),
            "at_epoch": now}


# --------------------------------------------------------------------------- transaction


class Transaction:
    """The operations of one open transaction; valid only inside ``store.transaction()``."""

    def __init__(self, store: Store) -> None:
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
        return json.loads(r[0])  # type: ignore[no-any-return]

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


# --------------------------------------------------------------------------- store


class Store:
    """The state database; see the module docstring for the guarantees.

    ``clock`` stamps ``finished_at`` and ``created_at`` (wall seconds).  ``read_only``
    opens the file for inspection only (a technician's CLI while the agent runs): every
    write raises :class:`StoreReadOnly`, and a file needing migration is refused.
    ``busy_timeout_s`` is :data:`BUSY_TIMEOUT_S`; tests shrink it.
    """

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time,
                 read_only: bool = False, busy_timeout_s: float = BUSY_TIMEOUT_S,
                 ephemeral: bool = False) -> None:
        self.path = Path(path)
        self._clock = clock
        self._busy_timeout_s = busy_timeout_s
        self._read_only = read_only
        #: An in-memory database standing in for ``path`` (which cannot be written):
        #: the agent keeps driving locks, nothing survives a restart.
        self.ephemeral = ephemeral
        self._lock = threading.RLock()
        self._tx: Transaction | None = None
        self._closed = False
        #: Called with the number of events after a transaction that added some commits
        #: (the agent wakes the outbox drainer).
        self.on_events_added: Callable[[int], None] | None = None
        #: Called with the error and the number of events it refused after a transaction
        #: failed with a :class:`StoreError` (the agent raises a storage alarm).
        self.on_write_failed: Callable[[StoreError, int], None] | None = None
        #: Events refused because their transaction failed (disk full, read-only, …).
        self.events_refused = 0
        #: Set when a statement failed because the filesystem went read-only or failed
        #: (I/O error) under the open file; cleared when a reopened file takes over.
        self._failing_fs = False
        #: The message of the first write that found the filesystem turned read-only.
        self._went_read_only: str | None = None
        self._conn = self._open()
        #: Which file the connection has open, to notice a repaired filesystem mounted
        #: over the failed one (see :meth:`_reopen_if_replaced`).
        self._opened_id = None if ephemeral else _file_id(self.path)

    # -- opening --------------------------------------------------------------------------
    def _open(self) -> sqlite3.Connection:
        try:
            if self.ephemeral:
                target, uri = ":memory:", False
            elif self._read_only:
                if not self.path.exists():
                    raise StoreError(f"state database {self.path} does not exist")
                target, uri = self.path.resolve().as_uri() + "?mode=ro", True
            else:
                target, uri = str(self.path), False
            # isolation_level=None: the sqlite3 module issues no BEGIN/COMMIT of its own;
            # this class does, explicitly.  check_same_thread=False: the lock below
            # serializes use across threads.
            conn = sqlite3.connect(target, uri=uri, isolation_level=None,
                                   check_same_thread=False, timeout=self._busy_timeout_s)
        except sqlite3.Error as exc:
            raise _translate(exc, self.path, "opening it") from exc
        try:
            self._set_up(conn)
        except sqlite3.Error as exc:
            conn.close()
            raise _translate(exc, self.path, "opening it") from exc
        except BaseException:
            conn.close()
            raise
        if _on_read_only_fs(self.path.parent) and not self._read_only and not self.ephemeral:
            LOGGER.error("state database %s is on a read-only filesystem: every write will "
                         "fail", self.path)
        return conn

    def _set_up(self, conn: sqlite3.Connection) -> None:
        """Check, configure and migrate a fresh connection (see the module docstring)."""
        conn.execute(f"PRAGMA busy_timeout = {round(self._busy_timeout_s * 1000):d}")
        rows = [str(r[0]) for r in conn.execute("PRAGMA quick_check(3)")]
        if rows != ["ok"]:
            # A row may hold several lines, the first naming the schema ("*** in database
            # main ***"); one line per problem reads better in a log and an alarm.
            problems = [line.strip() for row in rows for line in row.splitlines()
                        if line.strip() and not line.startswith("***")]
            raise StoreCorrupt(f"state database {self.path} is corrupt: quick_check found "
                               f"{'; '.join(problems[:3]) or rows[0]}")
        if not self._read_only and not self.ephemeral:
            mode = str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0])
            if mode.lower() != "wal":
                if _on_read_only_fs(self.path.parent):
                    raise StoreReadOnly(f"state database {self.path} is on a read-only "
                                        "filesystem and cannot be switched to WAL")
                raise StoreError(f"state database {self.path} cannot use WAL journaling "
                                 f"(journal_mode stays {mode!r})")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
        # The page cache: SQLite's default is 2 MiB per connection.  The hot pages (the
        # due end of the outbox, unit rows, the inbox's recent end) are a few hundred
        # KiB; the rest is re-read from the OS page cache when needed.  Memory on a Pi
        # (bench/agent_footprint.py).
        conn.execute(f"PRAGMA cache_size = -{CACHE_KIB:d}")
        if not self._read_only:
            migrate(conn)
            return
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if version != len(MIGRATIONS):
            raise StoreError(
                f"state database {self.path} has schema version {version}, this gateway "
                f"version uses {len(MIGRATIONS)}; start the agent once to migrate it"
            )

    @staticmethod
    def quarantine(path: Path, *, now: float | None = None) -> Path:
        """Move the database at ``path`` and its -wal/-shm/-journal aside; return the new path.

        The new name is ``<name>.bad-<UTC timestamp>`` (plus ``-<n>`` if taken), its
        companions keep their suffixes after it, so the set can still be opened for
        forensics.  Companions move first (see ``_COMPANIONS``); the directory is synced
        so the move survives a power cut.  Call it only with the store closed.
        """
        path = Path(path)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))
        base = path.with_name(f"{path.name}.bad-{stamp}")
        n = 1
        while any(Path(f"{base}{s}").exists() for s in ("", *_COMPANIONS)):
            n += 1
            base = path.with_name(f"{path.name}.bad-{stamp}-{n}")
        try:
            if not path.exists():
                raise FileNotFoundError(f"{path} does not exist")
            for suffix in (*_COMPANIONS, ""):
                source = Path(f"{path}{suffix}")
                if source.exists():
                    os.rename(source, f"{base}{suffix}")
            fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise StoreError(f"cannot move state database {path} aside: {exc}") from exc
        LOGGER.warning("state database %s moved aside to %s", path, base)
        return base

    # -- plumbing -------------------------------------------------------------------------
    def _rollback(self) -> None:
        """End any open transaction; SQLite may already have rolled it back itself."""
        if self._conn.in_transaction:
            try:
                self._conn.execute("ROLLBACK")
            except sqlite3.Error:
                LOGGER.exception("ROLLBACK failed on %s", self.path)

    @contextlib.contextmanager
    def _guard(self, doing: str) -> Iterator[sqlite3.Connection]:
        """Hold the lock; translate sqlite3 errors after rolling back."""
        with self._lock:
            if self._closed:
                raise StoreError(f"state database {self.path} is closed")
            try:
                yield self._conn
            except sqlite3.Error as exc:
                self._rollback()  # a no-op when transaction() has rolled back already
                error = _translate(exc, self.path, doing)
                code = getattr(exc, "sqlite_errorcode", None)
                io_error = isinstance(code, int) and code & 0xFF == _SQLITE_IOERR
                if not self._read_only and not self.ephemeral and (
                        io_error or isinstance(error, StoreReadOnly)):
                    self._failing_fs = True
                    if isinstance(error, StoreReadOnly):
                        self._went_read_only = str(error)
                    elif self._went_read_only is not None:
                        # The probe looks at the directory, where another filesystem
                        # may be mounted by now; the open file's one never recovers.
                        error = StoreReadOnly(self._went_read_only)
                raise error from exc

    def _reopen_if_replaced(self) -> None:
        """After the filesystem failed under the open file: use a repaired one if mounted.

        Called with the lock held, before a transaction, only while ``_failing_fs``.  A
        filesystem the kernel turned read-only after an error cannot be remounted
        read-write under open files; once a repaired filesystem is mounted at the
        database's directory (another file at ``path``: a different device or inode),
        the connection moves to that file, so writes resume without a restart.  Nothing
        happens while ``path`` is the old file or is missing (an empty filesystem: a
        fresh database would forget lockouts and the inbox, so that takes a restart,
        which says so in its alarm).  If the new file cannot be opened yet, the old
        connection stays (reads keep working) and the next transaction tries again.
        """
        now_id = _file_id(self.path)
        if now_id is None or now_id == self._opened_id:
            return
        try:
            fresh = self._open()
        except StoreError as exc:
            LOGGER.warning("state database %s: a new file is there but cannot be opened "
                           "yet: %s", self.path, exc)
            return
        old, self._conn = self._conn, fresh
        self._opened_id = now_id
        self._failing_fs = False
        self._went_read_only = None
        try:
            old.close()  # releases the failed filesystem, so it can be unmounted
        except sqlite3.Error:
            LOGGER.debug("closing the connection to the failed file %s", self.path,
                         exc_info=True)
        LOGGER.warning("state database %s reopened on the filesystem now mounted at %s; "
                       "writes resume", self.path, self.path.parent)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """``BEGIN IMMEDIATE`` … ``COMMIT``; ``ROLLBACK`` if the block raises.

        sqlite3 errors inside the block or at commit are raised as :class:`StoreError`
        subclasses, after the rollback.  Transactions do not nest (``RuntimeError``).
        """
        tx: Transaction | None = None
        try:
            with self._guard("writing"):
                if self._tx is not None:
                    raise RuntimeError("store transactions do not nest")
                if self._failing_fs:
                    self._reopen_if_replaced()
                conn = self._conn  # after a reopen, the new one
                conn.execute("BEGIN IMMEDIATE")
                tx = self._tx = Transaction(self)
                try:
                    yield tx
                    conn.execute("COMMIT")
                except BaseException:
                    self._rollback()
                    raise
                finally:
                    tx._active = False
                    self._tx = None
        except StoreError as exc:
            # Outside the lock: the hook may publish an alarm.
            refused = tx.events_added if tx is not None else 0
            self.events_refused += refused
            if self.on_write_failed is not None:
                self.on_write_failed(exc, refused)
            raise
        if tx.events_added and self.on_events_added is not None:
            self.on_events_added(tx.events_added)

    @property
    def in_transaction(self) -> bool:
        """Whether the connection has a transaction open (health checks, tests)."""
        with self._lock:
            return not self._closed and self._conn.in_transaction

    @property
    def read_only(self) -> bool:
        """Whether writes cannot succeed: opened read-only, on a read-only filesystem, or
        the last write found the filesystem turned read-only under the open file."""
        if self.ephemeral:
            return False
        return (self._read_only or self._went_read_only is not None
                or _on_read_only_fs(self.path.parent))

    def close(self) -> None:
        """Close the database (idempotent).  A clean close checkpoints and removes the WAL."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._rollback()
            try:
                self._conn.close()
            except sqlite3.Error:
                LOGGER.exception("closing %s failed", self.path)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

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

    def outbox_summary(self, now: float) -> dict[str, Any]:
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

    @staticmethod
    def count_pending(path: Path) -> int | None:
        """Best effort, read-only: how many undelivered events the file at ``path`` holds.

        For the alarm about a corrupt file: ``None`` when that cannot be read at all.
        Never writes, never raises.
        """
        uri = Path(path).resolve().as_uri()
        for suffix in ("?mode=ro", "?mode=ro&immutable=1"):
            try:
                conn = sqlite3.connect(uri + suffix, uri=True, isolation_level=None)
            except sqlite3.Error:
                continue
            try:
                conn.execute("PRAGMA query_only = ON")
                r = conn.execute("SELECT count(*) FROM events WHERE state != 'delivered'"
                                 ).fetchone()
                return int(r[0])
            except sqlite3.Error:
                continue
            finally:
                conn.close()
        return None
