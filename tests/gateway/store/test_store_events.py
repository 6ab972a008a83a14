"""The state database (gateway/store/): events, transactions, the outbox rows and retention;
guarantees, not calls.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gateway.store import MIGRATIONS, Store, StoreBusy, StoreError, StoreFull, UnitRow, migrate
from tests.support.store import T0, integrity, overwrite_pages, raw, record

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
    from gateway.store import faults as store_module

    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    for pid_name in (f".stora-gateway-probe-{os.getpid()}",):
        (tmp_path / pid_name).symlink_to(victim)
    assert store_module._refuses_writes(tmp_path) is False
    assert victim.read_bytes() == b"keep me"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".stora-gateway-probe-")
                and not p.is_symlink()]
