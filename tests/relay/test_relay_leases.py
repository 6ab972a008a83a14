"""Job leases (relay/leases.py): one holder at a time across replicas, fenced, on the
database's clock; a holder that lost its lease writes nothing more."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from relay.db.engine import Database
from relay.db.models import JobLease, Operator
from relay.leases import LeaseLostError, Leases
from relay.operators import Operators, StoraSite
from relay.stora import TokenSet
from tests.support.relay import RelayOnDisk, relay_on_disk


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[RelayOnDisk]:
    on_disk = relay_on_disk(tmp_path / "relay")
    yield on_disk
    on_disk.db.close()


@pytest.fixture
def other_db(relay: RelayOnDisk) -> Iterator[Database]:
    """Another replica's engine on the same database."""
    db = Database(relay.db.url)
    yield db
    db.close()


def test_one_holder_at_a_time_and_each_new_holder_a_higher_fence(
        relay: RelayOnDisk, other_db: Database) -> None:
    a, b = Leases(relay.db), Leases(other_db)
    first = a.acquire("reconcile:op_1", 60)
    assert first is not None
    assert first.fence == 1
    assert b.acquire("reconcile:op_1", 60) is None
    assert b.acquire("reconcile:op_2", 60) is not None  # another job is another lease
    again = a.acquire("reconcile:op_1", 60)  # its own: taken again, fenced anew
    assert again is not None
    assert again.fence == 2
    a.release(again)
    taken = b.acquire("reconcile:op_1", 60)
    assert taken is not None
    assert taken.fence == 3
    with relay.db.read() as s:
        row = s.get(JobLease, "reconcile:op_1")
        assert row is not None
        assert (row.owner, row.fence) == (b.owner, 3)


def test_an_expired_lease_goes_to_the_next_and_the_old_holder_writes_nothing(
        relay: RelayOnDisk, other_db: Database) -> None:
    op = Operators(relay.db, relay.keyring).connect(TokenSet("at", "rt", 7200, "", 0),
                                                    [StoraSite("site_x", "X")])
    a, b = Leases(relay.db), Leases(other_db)
    stalled = a.acquire("reconcile", 0.2)
    assert stalled is not None
    with relay.db.session() as s:
        stalled.check(s)  # still its own: extended by 0.2 s
    assert b.acquire("reconcile", 60) is None
    time.sleep(0.5)
    fresh = b.acquire("reconcile", 60)
    assert fresh is not None
    assert fresh.fence == stalled.fence + 1

    def stalled_write() -> None:
        with relay.db.session() as s:
            row = s.get(Operator, op)
            assert row is not None
            row.reconciled_at = 123.0  # the stalled holder's write...
            stalled.check(s)  # ...is rolled back with its transaction

    with pytest.raises(LeaseLostError):
        stalled_write()
    with relay.db.read() as s:
        assert s.scalar(select(Operator.reconciled_at).where(Operator.id == op)) is None
    a.release(stalled)  # a stale release does not free the new holder's lease
    assert a.acquire("reconcile", 60) is None
