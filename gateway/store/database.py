"""The connection to the state database (:class:`Database`, the base of
:class:`~gateway.store.Store`): opening and checking the file, configuring and migrating
it, the one lock, ``store.transaction()``, moving a corrupt file aside, and carrying on
when the filesystem fails under the open file.

See docs/design/store-durability.md.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final, Self

from gateway.store.faults import (
    _SQLITE_IOERR,
    StoreCorrupt,
    StoreError,
    StoreReadOnly,
    _file_id,
    _on_read_only_fs,
    _translate,
)
from gateway.store.schema import MIGRATIONS, migrate
from gateway.store.transaction import Transaction

__all__ = ["BUSY_TIMEOUT_S", "CACHE_KIB", "Database"]

LOGGER = logging.getLogger(__name__)

#: SQLite page cache per connection, KiB (``PRAGMA cache_size``; SQLite's default: 2000).
CACHE_KIB: Final = 512

#: How long a writer waits for another process's write lock before StoreBusy.  A
#: technician's CLI holds it for milliseconds; 5 s rides out a slow SD card's fsync.
BUSY_TIMEOUT_S: Final = 5.0

# The files SQLite keeps next to a database.  Quarantine moves the companions before the
# database itself: a stale -wal left beside a fresh database would be replayed into it.
_COMPANIONS: Final = ("-journal", "-wal", "-shm")


class Database:
    """One SQLite file behind one connection and one lock; :class:`~gateway.store.Store`
    adds the reads and single writes.  See docs/design/store-durability.md for the
    guarantees.

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
        """Check, configure and migrate a fresh connection (docs/design/store-durability.md)."""
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

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
