"""The state database (gateway/store/): guarantees, not calls.

The fault cases follow the fault matrix: #21 (kill -9 during writes: a real SIGKILL of a
writer process at random moments), #23 (disk full: a 256 KiB tmpfs), #24 (corrupt
files: zero-filled, truncated, random pages overwritten, not a database) and #25
(read-only: a tmpfs remounted read-only, and a store opened ``read_only``).  The tmpfs
tests need root (``mount``); without it they are skipped with the reason.

Not covered here: power loss (#22, dropping unsynced pages needs LazyFS or a VM).  A
filesystem turning read-only *under* an open store (the kernel refuses to remount a
filesystem read-only while a file on it is open for writing, so the test has the kernel
do it after an ext4 error) is in tests/test_storage_faults.py, with a running agent.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.errors import GatewayError
from gateway.outbox.timeline import EventRecord, external_id_for, make_event
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

REPO = Path(__file__).resolve().parent.parent
T0 = 1_796_000_000.0


def record(n: int | str, *, detail: str = "unit A-101", kind: str = "unlocked") -> EventRecord:
    return make_event(
        kind,
        app_name="YourApp",
        site_id="site_123",
        unit="unit_abc",
        reference="A-101",
        external_id=external_id_for("test", str(n)),
        occurred_at=T0,
        contact="con_1",
        actor="tenant app",
        detail=detail,
    )


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "gateway.db"


@pytest.fixture
def store(db: Path) -> Iterator[Store]:
    with Store(db, clock=lambda: T0 + 1) as s:
        yield s


def raw(path: Path) -> sqlite3.Connection:
    """A plain connection to inspect the file as SQLite sees it."""
    return sqlite3.connect(path, isolation_level=None)


def integrity(path: Path) -> list[str]:
    conn = raw(path)
    try:
        return [r[0] for r in conn.execute("PRAGMA integrity_check")]
    finally:
        conn.close()


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


# --------------------------------------------------------------------------- events


def test_add_event_is_idempotent_on_external_id(store: Store) -> None:
    with store.transaction() as tx:
        assert tx.add_event(record(1)) is True
        assert tx.add_event(record(1, detail="a retry after a crash")) is False
        assert tx.add_event(record(2, kind="locked")) is True
    rows = store.events()
    assert [r.external_id for r in rows] == [record(1).external_id, record(2).external_id]
    first = rows[0]
    assert first.record() == record(1)  # the original, not the retry
    assert (first.state, first.attempts, first.last_error, first.body) == ("pending", 0, None, None)
    assert first.created_at == T0 + 1
    assert rows[1].seq > first.seq
    assert store.event_count() == 2
    assert store.event_count("pending") == 2
    assert store.event_count("sent") == 0
    assert store.events("sent") == []
    assert len(store.events(limit=1)) == 1


# --------------------------------------------------------------------------- transactions


def test_an_exception_rolls_everything_back(store: Store) -> None:
    def half_done() -> None:
        with store.transaction() as tx:
            tx.claim_command("j", "unlock", "unit_abc", T0)
            tx.add_event(record(1))
            tx.put_unit(UnitRow.unseen("unit_abc"))
            raise KeyError("boom")

    with pytest.raises(KeyError):
        half_done()
    assert not store.in_transaction
    assert store.command("j") is None
    assert store.event_count() == 0
    assert store.units() == []


def test_transactions_do_not_nest_and_end(store: Store) -> None:
    with store.transaction() as tx:
        with pytest.raises(RuntimeError, match="do not nest"), store.transaction():
            pass
        tx.set_meta("still", "usable")
    with pytest.raises(RuntimeError, match="has ended"):
        tx.meta("still")
    assert store.meta("still") == "usable"


def test_reads_in_a_transaction_see_its_writes(store: Store) -> None:
    with store.transaction() as tx:
        tx.put_unit(UnitRow("unit_a", True, 1, None, True, "closed", True, T0))
        assert store.unit("unit_a").lockout is True  # same thread, same connection


def test_another_process_holding_the_lock_is_store_busy(db: Path) -> None:
    with Store(db, busy_timeout_s=0.05) as s:
        other = raw(db)
        other.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(StoreBusy, match="locked by another process"), s.transaction():
                pass
            assert s.units() == []  # readers are not blocked by a writer in WAL mode
        finally:
            other.execute("ROLLBACK")
            other.close()
        s.set_meta("after", "ok")


# --------------------------------------------------------------------------- kill -9

CHILD = r"""
import sys
from pathlib import Path
from gateway.store import Store
from gateway.outbox.timeline import external_id_for, make_event

db, run, previous = sys.argv[1], sys.argv[2], sys.argv[3]
store = Store(Path(db))
if previous != "-":
    with store.transaction() as tx:
        print("dup-ok" if not tx.claim_command(previous, "unlock", "u", 0.0) else "DUP-RUN",
              flush=True)
print("ready", flush=True)
i = 0
while True:
    jti = f"{run}-{i}"
    with store.transaction() as tx:
        assert tx.claim_command(jti, "unlock", "unit_abc", float(i))
    print("claimed", jti, flush=True)
    with store.transaction() as tx:
        tx.finish_command(jti, "done", None, {"jti": jti, "status": "done", "pad": "x" * 200})
        tx.add_event(make_event(
            "unlocked", app_name="App", site_id="s", unit="unit_abc", reference="A-101",
            external_id=external_id_for(jti), occurred_at=1.8e9, detail="d" * 300))
    print("done", jti, flush=True)
    i += 1
"""


def test_kill_minus_9_never_loses_or_duplicates_what_was_acknowledged(db: Path) -> None:
    """Fault matrix #21: SIGKILL a writer at random moments, 60 times; check after each."""
    rng = random.Random(21)
    Store(db).close()  # create and migrate once, so every child starts writing at once
    claimed: set[str] = set()
    done: list[str] = []
    previous = "-"
    interrupted = 0
    started = time.monotonic()
    iterations = 60
    for run in range(iterations):
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(db), f"r{run}", previous],
            stdout=subprocess.PIPE, cwd=REPO,
        )
        assert proc.stdout is not None
        if previous != "-":
            assert proc.stdout.readline() == b"dup-ok\n"
        assert proc.stdout.readline() == b"ready\n"
        time.sleep(rng.uniform(0.0, 0.03))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        out = proc.stdout.read()
        proc.stdout.close()
        assert proc.returncode == -signal.SIGKILL
        for line in out.split(b"\n")[:-1]:  # a line cut by the kill has no newline
            what, jti = line.decode().split()
            (claimed.add if what == "claimed" else done.append)(jti)
        assert integrity(db) == ["ok"]
        with Store(db) as s:
            recovered = s.recover_interrupted(T0)
            # At most the one command in flight was interrupted, and it had been claimed.
            assert len(recovered) <= 1
            interrupted += len(recovered)
            for row in recovered:
                assert row.jti not in done
            if done:
                previous = done[-1]
    conn = raw(db)
    statuses = dict(conn.execute("SELECT jti, status FROM commands").fetchall())
    events = [r[0] for r in conn.execute("SELECT external_id FROM events")]
    conn.close()
    assert len(done) > iterations  # the kills really landed while writing ...
    assert interrupted > 0  # ... and some between a claim and its outcome
    assert claimed >= set(done)
    assert all(statuses[jti] == "done" for jti in done)  # present, finished, exactly once
    assert set(statuses) >= claimed
    assert "executing" not in statuses.values()
    for jti in done:
        assert events.count(external_id_for(jti)) == 1
    assert len(events) == len(set(events))
    assert time.monotonic() - started < 30


# --------------------------------------------------------------------------- corruption


@pytest.fixture
def populated(db: Path) -> bytes:
    """A database of ~50 pages, checkpointed into the main file; returns its bytes."""
    with Store(db) as s:
        for i in range(300):
            with s.transaction() as tx:
                tx.claim_command(f"j{i}", "unlock", "unit_abc", T0)
                tx.finish_command(f"j{i}", "done", None, {"pad": "x" * 50})
                tx.add_event(record(i, detail="d" * 100))
    assert not Path(f"{db}-wal").exists()
    return db.read_bytes()


def overwrite_pages(data: bytes, seed: int) -> bytes:
    rng = random.Random(seed)
    page = 4096
    damaged = bytearray(data)
    for n in rng.sample(range(1, len(data) // page), 3):
        damaged[n * page : (n + 1) * page] = rng.randbytes(page)
    return bytes(damaged)


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda d: bytes(len(d)), id="zero-filled"),
        pytest.param(lambda d: d[: len(d) // 2], id="truncated-half"),
        pytest.param(lambda d: b"not a database\n" * 100, id="not-sqlite"),
        *(pytest.param(lambda d, s=s: overwrite_pages(d, s), id=f"pages-{s}") for s in range(5)),
    ],
)
def test_a_corrupt_file_is_detected_and_quarantined(
    db: Path, populated: bytes, damage: object
) -> None:
    db.write_bytes(damage(populated))  # type: ignore[operator]
    with pytest.raises(StoreCorrupt, match=f"state database {db} is corrupt") as info:
        Store(db)
    assert "\n" not in str(info.value)
    Path(f"{db}-wal").write_bytes(b"stale wal")  # a companion that must move with it
    moved = Store.quarantine(db, now=T0)
    assert moved.name == "gateway.db.bad-20261130T005320Z"
    assert moved.exists()
    assert Path(f"{moved}-wal").read_bytes() == b"stale wal"
    assert not db.exists()
    assert not Path(f"{db}-wal").exists()
    with Store(db) as fresh:  # the agent starts empty
        assert fresh.event_count() == 0


def test_quarantine_never_overwrites_an_earlier_one(db: Path) -> None:
    db.write_bytes(b"first")
    first = Store.quarantine(db, now=T0)
    db.write_bytes(b"second")
    second = Store.quarantine(db, now=T0)
    assert first != second
    assert second.name.endswith("-2")
    assert (first.read_bytes(), second.read_bytes()) == (b"first", b"second")


def test_quarantine_of_nothing_is_a_store_error(db: Path) -> None:
    with pytest.raises(StoreError, match="cannot move"):
        Store.quarantine(db)


# --------------------------------------------------------------------------- read-only


def test_read_only_store_reads_and_refuses_writes_after_rollback(store: Store, db: Path) -> None:
    with store.transaction() as tx:
        tx.add_event(record(1))
        tx.claim_command("j", "unlock", "unit_abc", T0)
    with Store(db, read_only=True) as ro:
        assert ro.read_only
        assert ro.event_count() == 1
        with pytest.raises(StoreReadOnly, match="is read-only") as info, ro.transaction() as tx:
            tx.add_event(record(2))
        assert not info.value.retryable
        assert not ro.in_transaction  # the explicit ROLLBACK ran
        assert ro.event_count() == 1  # and reads still work
        with pytest.raises(StoreReadOnly):
            ro.set_meta("k", "v")
    assert store.event_count() == 1


def test_read_only_store_needs_an_existing_current_file(db: Path) -> None:
    with pytest.raises(StoreError, match="does not exist"):
        Store(db, read_only=True)
    raw(db).close()
    db.write_bytes(b"")
    with pytest.raises(StoreError, match="schema version 0"):
        Store(db, read_only=True)


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs, unmounted afterwards; skipped where mounting is not allowed."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8); disk-full/read-only FS untested")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k,mode=0755", "tmpfs", str(mnt)],
        capture_output=True, text=True, check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


CRASHED_WRITER = r"""
import sys
from pathlib import Path
from gateway.store import Store
store = Store(Path(sys.argv[1]))
store.set_meta("last", "written before the crash")
print("ok", flush=True)
sys.stdin.read()
"""


def test_read_only_filesystem_after_a_crash(tiny_fs: Path) -> None:
    """Fault matrix #25: the agent died, the filesystem came back read-only (fsck)."""
    db = tiny_fs / "gateway.db"
    with Store(db) as s, s.transaction() as tx:
        tx.add_event(record(1))
    proc = subprocess.Popen([sys.executable, "-c", CRASHED_WRITER, str(db)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=REPO)
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"ok\n"
    proc.kill()  # leaves the -wal and -shm behind, as a crash does
    proc.communicate()
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_fs)], check=True)
    with Store(db) as s:  # opens: reads work, so the agent can report what is wrong
        assert s.read_only
        assert s.meta("last") == "written before the crash"
        with pytest.raises(StoreReadOnly, match="read-write") as info, s.transaction() as tx:
            tx.add_event(record(2))
        assert not info.value.retryable
        assert not s.in_transaction  # rolled back explicitly
        assert s.events()[0].record() == record(1)
        assert s.event_count() == 1


def test_read_only_filesystem_at_open(tiny_fs: Path) -> None:
    db = tiny_fs / "gateway.db"
    Store(db).close()  # a clean close removes the -wal and -shm
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_fs)], check=True)
    # SQLite cannot open a WAL database whose -wal/-shm it can neither find nor create.
    with pytest.raises(StoreReadOnly, match="filesystem is read-only"):
        Store(db)
    with pytest.raises(StoreReadOnly, match="filesystem is read-only"):
        Store(tiny_fs / "new.db")


def test_disk_full_rolls_back_keeps_reads_and_recovers(tiny_fs: Path) -> None:
    db = tiny_fs / "gateway.db"
    filler = tiny_fs / "filler"
    filler.write_bytes(os.urandom(64 * 1024))  # space to free later
    accepted = 0
    with Store(db) as s:
        with pytest.raises(StoreFull, match="disk full") as info:  # noqa: PT012
            for i in range(10_000):
                with s.transaction() as tx:
                    tx.claim_command(f"j{i}", "unlock", "unit_abc", T0)
                    tx.add_event(record(i, detail="x" * 400))
                accepted += 1
        assert info.value.retryable
        assert 0 < accepted < 10_000
        assert not s.in_transaction
        # Refused, not accepted-then-lost: exactly what was committed is there.
        assert s.event_count() == accepted
        assert s.command(f"j{accepted}") is None
        assert s.command(f"j{accepted - 1}") is not None
        assert len(s.events(limit=10_000)) == accepted
        filler.unlink()
        with s.transaction() as tx:
            tx.add_event(record("after"))
        assert s.event_count() == accepted + 1
    assert integrity(db) == ["ok"]


# --------------------------------------------------------------------------- outbox


def test_migration_2_upgrades_a_version_1_file_keeping_its_events_due(db: Path) -> None:
    conn = raw(db)
    migrate(conn, MIGRATIONS[:1])
    conn.execute(
        "INSERT INTO events (external_id, kind, unit, reference, site_id, description, "
        "occurred_at, created_at) VALUES ('sgw-old', 'locked', 'unit_abc', 'A-101', "
        "'site_123', 'Unit locked via YourApp', ?, ?)", (T0, T0))
    conn.close()
    with Store(db, clock=lambda: T0 + 5) as s:
        row = s.due_event(T0 + 5)
        assert row is not None
        assert (row.external_id, row.state, row.generation, row.next_attempt_at) == (
            "sgw-old", "pending", 0, 0.0)
        assert s.send_history(0) == []
    assert raw(db).execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS) == 4


def test_due_event_is_oldest_first_and_honours_next_attempt_at(store: Store) -> None:
    with store.transaction() as tx:
        for i in range(3):
            tx.add_event(record(i))
    first, second, third = store.events()
    with store.transaction() as tx:
        tx.record_attempt(first.seq, generation=1, unanswered_since=None,
                          next_attempt_at=T0 + 60, attempts=1, last_error="server_error 500")
    assert store.due_event(T0) == store.events()[1]
    assert store.next_due_at() == 0.0
    with store.transaction() as tx:
        tx.mark_delivered(second.seq, generation=0, attempts=1, delivered_at=T0,
                          stora_event_id="aevt_1")
        tx.mark_delivered(third.seq, generation=0, attempts=1, delivered_at=T0,
                          stora_event_id=None)
    assert store.due_event(T0) is None
    assert store.next_due_at() == T0 + 60
    due = store.due_event(T0 + 60)
    assert due is not None
    assert (due.seq, due.generation, due.attempts, due.last_error) == (
        first.seq, 1, 1, "server_error 500")
    assert store.outbox_summary(T0 + 11) == {"pending": 1, "oldest_age_s": 10.0, "dead": 0}


def test_a_body_is_frozen_once(store: Store) -> None:
    with store.transaction() as tx:
        tx.add_event(record(1))
        (row,) = tx._store.events()
        assert tx.freeze_body(row.seq, {"n": 1}) == {"n": 1}
        assert tx.freeze_body(row.seq, {"n": 2}) == {"n": 1}  # every attempt, same bytes
    assert store.events()[0].body == {"n": 1}


def test_retry_dead_rotates_the_key_and_forgets_the_body(store: Store) -> None:
    with store.transaction() as tx:
        for i in range(3):
            tx.add_event(record(i))
    rows = store.events()
    error = {"message": "external.id is rejected", "details": [], "request_id": None,
             "idempotency_key": f"{rows[0].external_id}.0"}
    with store.transaction() as tx:
        tx.freeze_body(rows[0].seq, {"b": 1})
        for row in rows[:2]:
            tx.mark_dead(row.seq, generation=0, unanswered_since=None, attempts=1,
                         status=422, code="invalid_content", error=error, dead_at=T0)
    dead = store.event(rows[0].seq)
    assert dead is not None
    assert (dead.state, dead.dead_status, dead.dead_code, dead.dead) == (
        "dead", 422, "invalid_content", error)
    assert dead.as_dict()["error"]["message"] == "external.id is rejected"
    assert store.outbox_summary(T0)["dead"] == 2
    assert store.retry_dead(rows[2].seq) == []  # pending, not dead: untouched
    assert store.retry_dead(rows[0].seq) == [rows[0].seq]
    again = store.event(rows[0].seq)
    assert again is not None
    assert (again.state, again.generation, again.body, again.dead_code, again.next_attempt_at) == (
        "pending", 1, None, None, 0.0)
    assert again.last_error == "retried after: 422 invalid_content"
    assert store.retry_dead() == [rows[1].seq]
    assert store.retry_dead() == []


def test_send_history_is_pruned_to_the_windows(store: Store) -> None:
    for t in (T0, T0 + 50, T0 + 130, T0 + 200):
        store.record_send(t)
    assert store.send_history(0) == [T0 + 130, T0 + 200]  # older than 120 s: gone
    assert store.send_history(T0 + 150) == [T0 + 200]


def test_hooks_see_committed_events_and_refused_ones(store: Store) -> None:
    added: list[int] = []
    failed: list[tuple[str, int]] = []
    store.on_events_added = added.append
    store.on_write_failed = lambda exc, n: failed.append((type(exc).__name__, n))
    with store.transaction() as tx:
        tx.add_event(record(1))
        tx.add_event(record(1))  # the same id: not added twice
        tx.add_event(record(2))
    with store.transaction() as tx:
        tx.set_meta("k", "v")  # no event: no wake
    assert added == [2]
    store.close()
    with pytest.raises(StoreError):  # noqa: SIM117 - the error comes from the open
        with store.transaction() as tx:
            tx.add_event(record(3))
    assert failed == [("StoreError", 0)]


def test_count_pending_of_a_damaged_file_is_best_effort(db: Path, populated: bytes) -> None:
    assert Store.count_pending(db) == 300
    db.write_bytes(bytes(len(populated)))  # zero-filled: nothing readable
    assert Store.count_pending(db) is None
    db.write_bytes(overwrite_pages(populated, 1))
    counted = Store.count_pending(db)
    assert counted is None or 0 <= counted <= 300
    assert Store.count_pending(db.with_name("missing.db")) is None
    assert not db.with_name("missing.db").exists()  # read-only: nothing created


def test_disk_full_refuses_events_loudly_and_counts_them(tiny_fs: Path) -> None:
    db = tiny_fs / "gateway.db"
    filler = tiny_fs / "filler"
    filler.write_bytes(os.urandom(64 * 1024))
    failures: list[tuple[type[Exception], int]] = []
    with Store(db) as s:
        s.on_write_failed = lambda exc, n: failures.append((type(exc), n))
        accepted = 0
        for i in range(10_000):
            try:
                with s.transaction() as tx:
                    tx.add_event(record(i, detail="x" * 400))
                    tx.add_event(record(f"{i}b", detail="x" * 400))
            except StoreFull:
                break
            accepted += 2
        assert failures == [(StoreFull, 2)]
        assert s.events_refused == 2
        assert s.event_count() == accepted  # refused, not accepted-then-lost
        filler.unlink()
        with s.transaction() as tx:
            tx.add_event(record("after"))
        assert s.events_refused == 2
    assert integrity(db) == ["ok"]


def test_the_last_delivery_time_is_read_through_an_index(tmp_path: Path) -> None:
    """status() asks every telemetry interval; the delivered events only grow."""
    with Store(tmp_path / "g.db") as store:
        assert store.last_delivered_at() is None
        plan = store._conn.execute(
            "EXPLAIN QUERY PLAN SELECT max(delivered_at) FROM events "
            "WHERE state = 'delivered'").fetchall()
    assert "COVERING INDEX events_state_delivered_at" in str(plan)


# --------------------------------------------------------------------------- retention


def test_prune_keeps_what_dedupe_and_delivery_need_and_drops_the_rest(store: Store) -> None:
    """Found in review: the commands and delivered events tables grew for ever on the SD
    card.  What dedupe or delivery still needs (queued and executing commands, pending
    events, anything newer than the cut) is never touched."""
    day = 86_400.0
    with store.transaction() as tx:
        for n, (status, age) in enumerate([("done", 9), ("rejected", 9), ("unknown", 9),
                                           ("done", 1), ("queued", 9), ("executing", 9)]):
            jti = f"c{n}-{status}"
            if status == "queued":
                assert tx.queue_command(jti, "unlock", "unit_abc", T0 - age * day, b"t")
                continue
            assert tx.claim_command(jti, "unlock", "unit_abc", T0 - age * day)
            if status != "executing":
                tx.finish_command(jti, status, None, {"jti": jti})
        for n in range(6):
            assert tx.add_event(record(n))
    seqs = [e.seq for e in store.events()]
    with store.transaction() as tx:
        tx.mark_delivered(seqs[0], generation=0, attempts=1, delivered_at=T0 - 40 * day,
                          stora_event_id="aevt_1")
        tx.mark_delivered(seqs[1], generation=0, attempts=1, delivered_at=T0 - 2 * day,
                          stora_event_id="aevt_2")
        tx.mark_dead(seqs[2], generation=0, unanswered_since=None, attempts=1, status=422,
                     code="invalid", error={}, dead_at=T0 - 100 * day)
        tx.mark_dead(seqs[3], generation=0, unanswered_since=None, attempts=1, status=422,
                     code="invalid", error={}, dead_at=T0 - 10 * day)
    with store.transaction() as tx:
        gone = tx.prune(commands_before=T0 - 7 * day, delivered_before=T0 - 30 * day,
                        dead_before=T0 - 90 * day)
    assert gone == {"commands": 3, "delivered": 1, "dead": 1}
    left = {jti: store.command(jti) for jti in
            ("c0-done", "c1-rejected", "c2-unknown", "c3-done", "c4-queued", "c5-executing")}
    assert [jti for jti, row in left.items() if row is not None] == [
        "c3-done", "c4-queued", "c5-executing"]
    assert [e.seq for e in store.events()] == [seqs[1], *seqs[3:]]
    assert store.event_count("pending") == 2
    with store.transaction() as tx:  # idempotent
        assert tx.prune(commands_before=T0 - 7 * day, delivered_before=T0 - 30 * day,
                        dead_before=T0 - 90 * day) == {"commands": 0, "delivered": 0,
                                                       "dead": 0}


def test_command_dedupe_window_covers_every_copy_that_could_still_pass() -> None:
    from gateway.store import command_dedupe_s

    # Received at r, a token's exp is at most r + skew + lifetime; it is refused once the
    # trusted wall time passes exp + skew.
    assert command_dedupe_s(300, 30) >= 300 + 2 * 30
    assert command_dedupe_s(86_400 * 10, 30) >= 86_400 * 10 + 2 * 30


def test_prune_goes_in_batches_oldest_first(store: Store) -> None:
    with store.transaction() as tx:
        for n in range(5):
            assert tx.claim_command(f"c{n}", "unlock", "unit_abc", T0 - 1000 + n)
            tx.finish_command(f"c{n}", "done", None, {"jti": f"c{n}"})
    with store.transaction() as tx:
        assert tx.prune(commands_before=T0, delivered_before=0, dead_before=0,
                        limit=2)["commands"] == 2
    assert [store.command(f"c{n}") is None for n in range(5)] == [True, True, False, False,
                                                                  False]


def test_the_write_probe_never_follows_a_planted_link(tmp_path: Path) -> None:
    """Found in review: the read-only probe opened a predictable name with O_TRUNC, so a
    symlink planted there truncated the file it pointed to."""
    from gateway import store as store_module

    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    for pid_name in (f".stora-gateway-probe-{os.getpid()}",):
        (tmp_path / pid_name).symlink_to(victim)
    assert store_module._refuses_writes(tmp_path) is False
    assert victim.read_bytes() == b"keep me"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".stora-gateway-probe-")
                and not p.is_symlink()]
