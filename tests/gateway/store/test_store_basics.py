"""The state database (gateway/store/): opening, migrations, commands, units and meta;
guarantees, not calls.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from gateway.errors import GatewayError
from gateway.store import (
    MIGRATIONS,
    CommandRow,
    Migration,
    Store,
    StoreBusy,
    StoreCorrupt,
    StoreError,
    StoreFull,
    StoreReadOnly,
    UnitRow,
    migrate,
)
from tests.support.store import T0, raw, record

# --------------------------------------------------------------------------- opening


def test_opens_with_wal_full_sync_and_foreign_keys(store: Store, db: Path) -> None:
    conn = store._conn  # per-connection settings are only visible on the store's own
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 5000
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"commands", "units", "events", "meta"} <= tables


def test_errors_are_gateway_errors_with_retry_hints() -> None:
    assert issubclass(StoreError, GatewayError)
    assert StoreFull.retryable
    assert StoreBusy.retryable
    assert not StoreReadOnly.retryable
    assert not StoreCorrupt.retryable


def test_a_missing_directory_is_a_clear_store_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match=r"cannot open state database .*missing/gateway\.db"):
        Store(tmp_path / "missing" / "gateway.db")


def test_closed_store_refuses_work(db: Path) -> None:
    s = Store(db)
    s.close()
    s.close()  # idempotent
    with pytest.raises(StoreError, match="is closed"):
        s.units()
    # A clean close checkpoints the WAL into the database and removes it.
    assert not Path(f"{db}-wal").exists()


# --------------------------------------------------------------------------- migrations


def test_a_newer_schema_is_refused(db: Path) -> None:
    conn = raw(db)
    conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    conn.close()
    with pytest.raises(StoreError, match="newer than this version"):
        Store(db)


def test_a_failing_migration_leaves_the_previous_version(db: Path) -> None:
    conn = raw(db)
    migrate(conn)
    broken = (
        *MIGRATIONS,
        Migration("step n", ("ALTER TABLE events ADD COLUMN future_column REAL",
                             "THIS IS NOT SQL")),
    )
    with pytest.raises(sqlite3.OperationalError):
        migrate(conn, broken)
    assert not conn.in_transaction
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    columns = {r[1] for r in conn.execute("PRAGMA table_info(events)")}
    assert "future_column" not in columns  # the half-applied step was rolled back
    conn.close()


def test_a_later_migration_extends_an_existing_file(store: Store, db: Path) -> None:
    with store.transaction() as tx:
        tx.add_event(record(1))
    store.close()
    conn = raw(db)
    extended = (
        *MIGRATIONS,
        Migration("a later step", ("ALTER TABLE events ADD COLUMN future_column REAL",)),
    )
    assert migrate(conn, extended) == 1
    assert migrate(conn, extended) == 0  # idempotent
    assert conn.execute("SELECT count(*), max(future_column) FROM events").fetchone() == (1, None)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(extended)
    conn.close()


# --------------------------------------------------------------------------- commands


def test_claim_is_once_only_across_reopen(db: Path) -> None:
    with Store(db) as s, s.transaction() as tx:
        assert tx.claim_command("jti-1", "unlock", "unit_abc", T0) is True
        assert tx.claim_command("jti-1", "unlock", "unit_abc", T0) is False
    with Store(db) as s:
        with s.transaction() as tx:
            assert tx.claim_command("jti-1", "lock", "unit_abc", T0 + 5) is False
        row = s.command("jti-1")
    assert row == CommandRow("jti-1", "unlock", "unit_abc", "executing", None, {}, T0, None)


def test_claim_is_once_only_across_threads(store: Store) -> None:
    wins: list[bool] = []
    barrier = threading.Barrier(16)

    def claim() -> None:
        barrier.wait()
        with store.transaction() as tx:
            wins.append(tx.claim_command("jti-race", "unlock", "unit_abc", T0))

    threads = [threading.Thread(target=claim) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(wins) == [False] * 15 + [True]


def test_finish_command_records_the_result(store: Store) -> None:
    result = {"jti": "j", "status": "done", "state": {"locked": False}, "at_epoch": T0}
    with store.transaction() as tx:
        tx.claim_command("j", "unlock", "unit_abc", T0)
        tx.finish_command("j", "done", None, result)
        assert tx.command("j") is not None
    row = store.command("j")
    assert row is not None
    assert (row.status, row.reason, row.result, row.finished_at) == ("done", None, result, T0 + 1)
    with store.transaction() as tx:
        tx.claim_command("k", "lockout", "unit_abc", T0)
        tx.finish_command("k", "rejected", "stale_version", {})
    assert store.command("k") == CommandRow(
        "k", "lockout", "unit_abc", "rejected", "stale_version", {}, T0, T0 + 1
    )
    assert store.command("missing") is None


def test_finish_command_refuses_programming_errors(store: Store) -> None:
    with store.transaction() as tx:
        tx.claim_command("j", "unlock", "unit_abc", T0)
    with pytest.raises(ValueError, match="status is one of"), store.transaction() as tx:
        tx.finish_command("j", "executing", None, {})
    with pytest.raises(LookupError, match="never claimed"), store.transaction() as tx:
        tx.finish_command("nope", "done", None, {})
    with pytest.raises(ValueError, match="Out of range float"), store.transaction() as tx:
        tx.finish_command("j", "done", None, {"x": float("nan")})
    assert store.command("j") is not None
    assert store.command("j").status == "executing"  # type: ignore[union-attr]


def test_an_outcome_once_written_is_never_overwritten(store: Store) -> None:
    first = {"jti": "j", "status": "done"}
    with store.transaction() as tx:
        tx.claim_command("j", "unlock", "unit_abc", T0)
        tx.finish_command("j", "done", None, first)
    with pytest.raises(LookupError, match="already ended as 'done'"), \
            store.transaction() as tx:
        tx.finish_command("j", "unknown", None, {"jti": "j", "status": "unknown"})
    row = store.command("j")
    assert row is not None
    assert (row.status, row.result) == ("done", first)


def test_recover_interrupted_makes_executing_unknown_once(db: Path) -> None:
    with Store(db) as s, s.transaction() as tx:
        tx.claim_command("a", "unlock", "unit_abc", T0)
        tx.claim_command("b", "lock", "unit_def", T0 + 1)
        tx.claim_command("c", "unlock", "unit_abc", T0 + 2)
        tx.finish_command("c", "done", None, {"status": "done"})
    # ... the process dies here; at the next start:
    with Store(db) as s:
        recovered = s.recover_interrupted(T0 + 100)
        assert [r.jti for r in recovered] == ["a", "b"]
        a = recovered[0]
        assert (a.status, a.reason, a.finished_at) == ("unknown", None, T0 + 100)
        assert a.result == {
            "jti": "a", "cmd": "unlock", "unit": "unit_abc", "status": "unknown",
            "reason": None, "duplicate": False, "state": None,
            "at": "2026-11-30T00:55:00.000Z", "at_epoch": T0 + 100,
        }
        assert s.command("a") == a
        assert s.command("c").status == "done"  # type: ignore[union-attr]
        assert s.recover_interrupted(T0 + 200) == []
        with s.transaction() as tx:
            assert tx.claim_command("a", "unlock", "unit_abc", T0) is False  # never re-run


# --------------------------------------------------------------------------- units, meta


def test_unseen_unit_has_the_default_row(store: Store) -> None:
    expected = UnitRow("unit_x", False, -1, None, None, "unknown", False, 0.0)
    assert store.unit("unit_x") == expected == UnitRow.unseen("unit_x")
    with store.transaction() as tx:
        assert tx.unit("unit_x") == expected
    assert store.units() == []


@pytest.mark.parametrize("locked", [True, False, None])
def test_unit_round_trip(store: Store, locked: bool | None) -> None:
    row = UnitRow("unit_b", True, 7, T0 + 8, locked, "open", True, T0)
    with store.transaction() as tx:
        tx.put_unit(row)
        tx.put_unit(UnitRow.unseen("unit_a"))
    assert store.unit("unit_b") == row
    assert [r.unit for r in store.units()] == ["unit_a", "unit_b"]
    changed = UnitRow("unit_b", False, 8, None, False, "closed", False, T0 + 9)
    with store.transaction() as tx:
        tx.put_unit(changed)
    assert store.unit("unit_b") == changed


def test_meta(store: Store) -> None:
    assert store.meta("last_trusted_time") is None
    store.set_meta("last_trusted_time", "1796000000.5")
    store.set_meta("last_trusted_time", "1796000060.5")
    assert store.meta("last_trusted_time") == "1796000060.5"
    with store.transaction() as tx:
        tx.set_meta("k", "v")
        assert tx.meta("k") == "v"
