"""Reconciliation (contract §7.3) against the sandbox: units whose webhooks never came
are recorded, and their lockouts queued, once; a second pass changes nothing."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from relay.db.engine import Database
from relay.db.models import Command, Operator, UnitState
from relay.jobs import Jobs
from relay.leases import Lease, Leases
from relay.reconcile import Reconciler, Reconciliation
from relay.services import Services
from tests.support.relay_stack import Stack, relay_stack


class StoredToken:
    """The operator's stored access token, as is (the 6-s-token tests are elsewhere)."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.calls = 0

    def call(self, operator_id: str, fn: Callable[[str], Any]) -> Any:
        self.calls += 1
        token = self.services.operators.access_token(operator_id)
        assert token is not None
        return fn(token)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    with relay_stack(tmp_path / "relay") as s:
        yield s


def test_missed_webhooks_are_made_good_once(stack: Stack) -> None:
    stack.connect()
    op = stack.services.operators.list()[0].id
    stack.services.sites.add("site_acme1", op)
    endpoint = stack.sandbox.operator_state("acme")["endpoints"][0]["id"]
    stack.sandbox.disable_endpoint(endpoint)  # Stora stops delivering
    stack.sandbox.set_unit_status("unit_acme1", "overlocked")
    stack.sandbox.set_unit_status("unit_acme_s1", "repossessed")  # an unregistered site
    tokens = StoredToken(stack.services)
    sleeps: list[float] = []
    reconciler = Reconciler(stack.services.db, stack.services.stora, tokens,
                            stack.services.commands, sleep=sleeps.append)
    first = reconciler.reconcile(op)
    assert (first.units, first.commands, first.error) == (6, 1, None)
    with stack.services.db.session() as s:
        states = {u.unit_id: u for u in s.scalars(select(UnitState)).all()}
        commands = s.scalars(select(Command)).all()
        row = s.get(Operator, op)
        assert row is not None
        assert row.reconciled_at is not None
    assert len(states) == 6
    assert states["unit_acme1"].lockout
    assert states["unit_acme_s1"].lockout
    assert not states["unit_acme2"].lockout
    assert [(c.unit_id, c.cmd, c.origin) for c in commands] == [
        ("unit_acme1", "lockout", "reconcile")]
    again = reconciler.reconcile(op)
    assert (again.units, again.updated, again.commands) == (6, 0, 0)


def test_pages_are_paced_and_each_costs_one_call(stack: Stack) -> None:
    for i in range(150):
        stack.sandbox.add_unit("acme", "site_acme2", {"reference_id": f"B-{i}"})
    stack.connect()
    op = stack.services.operators.list()[0].id
    tokens = StoredToken(stack.services)
    sleeps: list[float] = []
    result = Reconciler(stack.services.db, stack.services.stora, tokens,
                        stack.services.commands, pace_s=0.5,
                        sleep=sleeps.append).reconcile(op)
    assert result.units == 156
    assert tokens.calls == 2
    assert sleeps == [0.5]


def test_a_pass_that_lost_its_lease_to_another_replica_writes_no_more_pages(
        stack: Stack) -> None:
    """Page 1 is written; then the pass stalls past its lease and another replica takes
    it over: page 2 is fetched but its writes are rolled back, and the pass says why."""
    for i in range(150):
        stack.sandbox.add_unit("acme", "site_acme2", {"reference_id": f"B-{i}"})
    stack.connect()
    op = stack.services.operators.list()[0].id
    other_db = Database(stack.services.db.url)
    name = f"reconcile:{op}"
    lease = Leases(stack.services.db).acquire(name, 0.2)
    assert lease is not None
    taken: list[int] = []

    def stall(_seconds: float) -> None:
        time.sleep(0.4)
        other = Leases(other_db).acquire(name, 60)
        assert other is not None
        taken.append(other.fence)

    try:
        result = Reconciler(stack.services.db, stack.services.stora,
                            StoredToken(stack.services), stack.services.commands,
                            sleep=stall).reconcile(op, lease=lease)
    finally:
        other_db.close()
    assert taken == [lease.fence + 1]
    assert result.error is not None
    assert "taken over" in result.error
    assert result.units == 100  # page 1 only
    with stack.services.db.read() as s:
        assert len(s.scalars(select(UnitState)).all()) == 100
        assert s.scalar(select(Operator.reconciled_at).where(Operator.id == op)) is None


def test_a_replica_skips_an_operator_whose_pass_another_replica_is_running(
        stack: Stack) -> None:
    stack.connect()
    op = stack.services.operators.list()[0].id
    services = stack.services
    reconciler = Reconciler(services.db, services.stora, StoredToken(services),
                            services.commands, sleep=lambda _s: None)
    jobs = Jobs(reconciler, services.connector, Leases(services.db))
    held = Leases(services.db).acquire(f"reconcile:{op}", 60)  # another replica's pass
    assert held is not None
    jobs.reconcile_now(op)
    assert (jobs.passes, jobs.skipped) == (0, 1)
    Leases(services.db).release(held)
    jobs.reconcile_now(op)
    assert (jobs.passes, jobs.skipped) == (1, 1)
    with services.db.read() as s:
        assert s.scalar(select(Operator.reconciled_at).where(Operator.id == op)) is not None
    # The timer's next pass leaves out what any replica reconciled in the last half
    # interval.
    assert reconciler.connected_operators(reconciled_before=time.time() - 450) == []
    assert reconciler.connected_operators() == [op]


def test_a_pass_that_raises_does_not_end_the_jobs_loop(stack: Stack) -> None:
    """A database error in one pass (here: the first pass raises) is logged; the next
    request is served by the same loop."""
    stack.connect()
    op = stack.services.operators.list()[0].id
    services = stack.services

    class Flaky(Reconciler):
        calls = 0

        def reconcile(self, operator_id: str, *, lease: Lease | None = None
                      ) -> Reconciliation:
            Flaky.calls += 1
            if Flaky.calls == 1:
                raise OperationalError("SELECT 1", {}, Exception("connection lost"))
            return super().reconcile(operator_id, lease=lease)

    reconciler = Flaky(services.db, services.stora, StoredToken(services), services.commands,
                       sleep=lambda _s: None)
    jobs = Jobs(reconciler, services.connector, Leases(services.db), interval_s=3600)

    async def scenario() -> None:
        loop = asyncio.create_task(jobs.run())
        try:
            for _ in range(200):
                if Flaky.calls >= 1:
                    break
                await asyncio.sleep(0.02)
            jobs.request(op)
            for _ in range(500):
                if jobs.passes >= 1:
                    break
                await asyncio.sleep(0.02)
        finally:
            loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loop

    asyncio.run(scenario())
    assert Flaky.calls >= 2
    assert jobs.passes >= 1  # served by the loop that the first pass's error did not end
