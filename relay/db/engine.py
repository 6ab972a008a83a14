"""The database engine: one way to open it, on SQLite or PostgreSQL.

SQLite is the embedded default, for one relay process: WAL (readers never wait for the
writer), ``synchronous=FULL`` (a webhook is answered 200 only once it is on disk),
foreign keys on, a busy timeout, and every transaction of :meth:`Database.session`
``BEGIN IMMEDIATE``, so two writers queue at the start instead of one failing at its
first write, and a read-then-write (the token refresh, the webhook's ``ver`` check) holds
the write lock from its read on; :meth:`Database.read` is for reads alone (a deferred
``BEGIN`` on connections of its own, which never waits for the writer).

``run`` takes :class:`ProcessLock` on the file: a second ``run`` on the same file refuses
to start with a clear message (the CLI's one-shot commands may still write beside it;
SQLite serialises them).

PostgreSQL (``postgresql://``, psycopg 3) serves several replicas: READ COMMITTED, row
locks (``SELECT … FOR UPDATE``) where a read decides a write, a pool of
:data:`PG_POOL_SIZE` connections (+ :data:`PG_MAX_OVERFLOW` at peaks) per replica, each
connection named ``stora-relay`` in ``pg_stat_activity`` and with
``idle_in_transaction_session_timeout`` set, so that a replica frozen inside a
transaction (a stopped VM, a debugger) cannot hold its row locks for longer than that.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from relay.errors import RelayError

__all__ = ["Database", "DatabaseLockedError", "ProcessLock", "sqlite_path"]

#: How long a SQLite writer waits for another (milliseconds).
BUSY_TIMEOUT_MS = 10_000
#: PostgreSQL connections per replica: the pool, and what it may open beyond at a peak
#: (the relay's request threads and the link's and jobs' workers share them).
PG_POOL_SIZE = 10
PG_MAX_OVERFLOW = 20
#: A session idle inside a transaction longer than this is ended by the server
#: (milliseconds); the relay's transactions last milliseconds.
PG_IDLE_IN_TRANSACTION_MS = 60_000


class DatabaseLockedError(RelayError):
    """Another ``stora-relay run`` holds the SQLite file."""


def sqlite_path(url: str) -> Path | None:
    """The file of a ``sqlite:///…`` URL (``None`` for another database or in memory)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database:
        return None
    if parsed.database == ":memory:":
        return None
    return Path(parsed.database)


def _normalise(url: str) -> str:
    """``postgresql://`` means psycopg 3 (SQLAlchemy's default driver would be psycopg2)."""
    if url.startswith("postgresql://"):
        return "postgresql+psycopg://" + url.removeprefix("postgresql://")
    return url


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    # pysqlite's own transaction handling is turned off; "begin" below starts each one.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    cursor.close()


def _sqlite_connect_relaxed(dbapi_connection: Any, record: Any) -> None:
    _sqlite_connect(dbapi_connection, record)
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _sqlite_begin(connection: Any) -> None:
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def _sqlite_begin_read(connection: Any) -> None:
    connection.exec_driver_sql("BEGIN")


def _sqlite_engine(url: str, connect: Callable[[Any, Any], None],
                   begin: Callable[[Any], None]) -> Engine:
    engine = create_engine(url, connect_args={"check_same_thread": False,
                                              "timeout": BUSY_TIMEOUT_MS / 1000})
    event.listen(engine, "connect", connect)
    event.listen(engine, "begin", begin)
    return engine


class Database:
    """The engine and a session factory for one database URL."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.path = sqlite_path(url)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.engine: Engine = _sqlite_engine(url, _sqlite_connect, _sqlite_begin)
            # Reads take no write lock: a deferred BEGIN, on connections of their own.
            self._read_engine = _sqlite_engine(url, _sqlite_connect, _sqlite_begin_read)
            self._relaxed_engine = _sqlite_engine(url, _sqlite_connect_relaxed, _sqlite_begin)
        else:
            self.engine = create_engine(
                _normalise(url), pool_pre_ping=True, pool_size=PG_POOL_SIZE,
                max_overflow=PG_MAX_OVERFLOW, pool_timeout=30,
                connect_args={"application_name": "stora-relay", "options":
                              f"-c idle_in_transaction_session_timeout="
                              f"{PG_IDLE_IN_TRANSACTION_MS}"})
            self._read_engine = self._relaxed_engine = self.engine
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._reads = sessionmaker(self._read_engine, expire_on_commit=False)
        self._relaxed = sessionmaker(self._relaxed_engine, expire_on_commit=False)

    @property
    def is_sqlite(self) -> bool:
        """Whether this is the embedded SQLite database."""
        return self.engine.dialect.name == "sqlite"

    @contextmanager
    def session(self) -> Iterator[Session]:
        """One transaction: committed when the block ends, rolled back if it raises."""
        with self._sessions.begin() as session:
            yield session

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A read-only transaction: on SQLite it waits for no writer and blocks none."""
        with self._reads.begin() as session:
            yield session

    @contextmanager
    def relaxed(self) -> Iterator[Session]:
        """A write that a power failure may lose without harm, because what it records
        is recorded again (a command's "published" mark, a gateway's result: the command
        is published again under its ``jti``, and the gateway answers it again).  On
        SQLite it commits without waiting for the disk (``synchronous=NORMAL`` in WAL: a
        crash of the process loses nothing, only the machine's power can); the next
        ``FULL`` commit of :meth:`session` makes it durable with its own."""
        with self._relaxed.begin() as session:
            yield session

    def integrity_check(self) -> str:
        """``ok``, or what SQLite's ``PRAGMA integrity_check`` found."""
        if not self.is_sqlite:
            return "ok"
        with self.engine.connect() as connection:
            rows = connection.exec_driver_sql("PRAGMA integrity_check").all()
        return "; ".join(str(r[0]) for r in rows)

    def close(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()
        self._read_engine.dispose()
        self._relaxed_engine.dispose()


class ProcessLock:
    """The one-process lock of a SQLite database: ``flock`` on ``<file>.lock``.

    The kernel drops it when the process dies, kill -9 included, so a crash never leaves
    a stale lock behind.
    """

    def __init__(self, database_file: Path) -> None:
        self.path = database_file.with_name(database_file.name + ".lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise :class:`DatabaseLockedError` naming the holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise DatabaseLockedError(
                f"another stora-relay process (pid {holder}) is running on "
                f"{self.path.with_suffix('')}: the SQLite database serves one process; "
                "stop it, or use PostgreSQL (database.url = \"postgresql://…\") for "
                "several replicas") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Let the lock go."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
