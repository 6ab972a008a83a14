"""Reconciliation (contract §7.3) against the sandbox: units whose webhooks never came
are recorded, and their lockouts queued, once; a second pass changes nothing."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from relay.db.models import Command, Operator, UnitState
from relay.reconcile import Reconciler
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
