"""relay/db: migrations equal the models, SQLite settings, the one-process lock."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import text

from relay.db.engine import Database, DatabaseLockedError, ProcessLock, sqlite_path
from relay.db.migrate import current_revision, head_revision, pending_revisions, upgrade
from relay.db.models import Base
from tests.support.relay import new_database_url

ROOT = Path(__file__).resolve().parents[2]


def test_the_migrations_create_exactly_the_models(tmp_path: Path) -> None:
    """On both databases: the same migrations, the same tables as the models."""
    db = Database(new_database_url(tmp_path))
    pending = pending_revisions(db)
    assert pending[0] == "0001"
    assert pending[-1] == head_revision()
    assert upgrade(db) == pending
    assert current_revision(db) == head_revision()
    assert upgrade(db) == []
    with db.engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert diff == []
    assert db.integrity_check() == "ok"
    db.close()


@pytest.mark.backends("sqlite")
def test_sqlite_runs_in_wal_with_full_sync_and_foreign_keys(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'r.db'}")
    with db.engine.connect() as connection:
        pragmas = {name: connection.exec_driver_sql(f"PRAGMA {name}").scalar()
                   for name in ("journal_mode", "synchronous", "foreign_keys")}
    assert pragmas == {"journal_mode": "wal", "synchronous": 2, "foreign_keys": 1}


@pytest.mark.backends("sqlite")
def test_sqlite_path_of_urls() -> None:
    assert sqlite_path("sqlite:////var/lib/r.db") == Path("/var/lib/r.db")
    assert sqlite_path("sqlite:///:memory:") is None
    assert sqlite_path("postgresql://u@h/db") is None


@pytest.mark.backends("sqlite")
def test_a_second_process_on_the_same_file_is_refused(tmp_path: Path) -> None:
    """The lock is the kernel's (flock), so it is another process that must be refused."""
    db_file = tmp_path / "relay.db"
    lock = ProcessLock(db_file)
    lock.acquire()
    try:
        code = ("import sys; from pathlib import Path\n"
                "from relay.db.engine import ProcessLock, DatabaseLockedError\n"
                "try:\n    ProcessLock(Path(sys.argv[1])).acquire()\n"
                "except DatabaseLockedError as exc:\n    print(exc)\n")
        done = subprocess.run([sys.executable, "-c", code, str(db_file)], cwd=ROOT,
                              capture_output=True, text=True, check=True)
        assert f"another stora-relay process (pid {os.getpid()}) is running on" in done.stdout
        assert "use PostgreSQL" in done.stdout
    finally:
        lock.release()
    again = ProcessLock(db_file)
    again.acquire()  # free once released (and when the holder dies: flock)
    again.release()


@pytest.mark.backends("sqlite")
def test_the_lock_refuses_within_one_process_too(tmp_path: Path) -> None:
    first = ProcessLock(tmp_path / "relay.db")
    first.acquire()
    try:
        with pytest.raises(DatabaseLockedError):
            ProcessLock(tmp_path / "relay.db").acquire()
    finally:
        first.release()


@pytest.mark.backends("postgresql")
def test_postgresql_sessions_are_named_and_cannot_idle_in_a_transaction(
        tmp_path: Path) -> None:
    db = Database(new_database_url(tmp_path))
    try:
        with db.read() as s:
            name = s.execute(text("SHOW application_name")).scalar_one()
            idle = s.execute(text("SHOW idle_in_transaction_session_timeout")).scalar_one()
    finally:
        db.close()
    assert (name, idle) == ("stora-relay", "1min")
