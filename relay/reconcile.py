"""Reconciliation (contract §7.3): re-list each operator's units and re-apply what
webhooks missed.

Stora has no event replay and may lose, delay or reorder deliveries (stora-api §4.4), so
the relay lists every unit of a connected operator, page by page, and records each one
exactly as a ``unit.updated`` would (:func:`relay.webhooks.apply_unit`): a newer
``updated_at`` than the one recorded updates the unit and, when its lockout changes,
queues the lockout or clear; an older or equal one changes nothing.  It runs after a
connect, when the relay starts (after downtime), and every ``interval_s``.

It spends a small share of the operator's rate budget: one page of up to 100 units per
request, each request taking a slot of the operator's limiter like every other call,
and ``pace_s`` between pages so webhooks' and gateways' traffic keeps the rest.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import or_, select

from relay.commands import Commands
from relay.db.engine import Database
from relay.db.models import Operator
from relay.errors import RelayError
from relay.leases import Lease
from relay.ratelimit import RateLimiter
from relay.stora import StoraApi, StoraError
from relay.webhooks import apply_unit

__all__ = ["Reconciler", "Reconciliation", "TokenSource"]

LOGGER = logging.getLogger(__name__)
PAGE_LIMIT = 100


class TokenSource(Protocol):
    """Runs a call to Stora with an operator's current access token (refreshed, retried
    once after a 401, paced by the operator's rate limit)."""

    def call(self, operator_id: str, fn: Callable[[str], Any]) -> Any:
        """``fn(access_token)``'s result."""


@dataclass(frozen=True)
class Reconciliation:
    """What one pass over an operator's units did."""

    operator_id: str
    units: int
    updated: int
    commands: int
    error: str | None = None


class Reconciler:
    """Re-lists units and re-applies their state."""

    def __init__(self, db: Database, stora: StoraApi, tokens: TokenSource,
                 commands: Commands, *, limiter: RateLimiter | None = None,
                 pace_s: float = 1.0,
                 clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self._db = db
        self._stora = stora
        self._tokens = tokens
        self._commands = commands
        self._limiter = limiter
        self._pace = pace_s
        self._clock = clock
        self._sleep = sleep

    def _page(self, operator_id: str, page: int) -> dict[str, Any]:
        def fetch(token: str) -> Any:
            if self._limiter is not None:
                self._limiter.acquire(operator_id, "reconcile")
            return self._stora.request("GET", "units", token,
                                       params={"page": page, "limit": PAGE_LIMIT})

        doc = self._tokens.call(operator_id, fetch)
        if not isinstance(doc, dict) or not isinstance(doc.get("units"), list):
            raise StoraError(200, "invalid_response", "units answered without 'units'")
        return doc

    def connected_operators(self, *, reconciled_before: float | None = None) -> list[str]:
        """The operators a pass may call (connected; not those waiting to reconnect);
        with ``reconciled_before``, only those no replica reconciled since then."""
        query = select(Operator.id).where(Operator.status == "connected")
        if reconciled_before is not None:
            query = query.where(or_(Operator.reconciled_at.is_(None),
                                    Operator.reconciled_at < reconciled_before))
        with self._db.read() as s:
            return list(s.scalars(query.order_by(Operator.id)).all())

    def reconcile(self, operator_id: str, *, lease: Lease | None = None) -> Reconciliation:
        """One pass over every unit of ``operator_id``; with ``lease`` (replicas), each
        page's writes only while the lease is still this pass's (:meth:`Lease.check`)."""
        seen = updated = queued = 0
        page = 1
        try:
            while True:
                doc = self._page(operator_id, page)
                now = self._clock()
                with self._db.session() as s:
                    if lease is not None:
                        lease.check(s)
                    for unit in doc["units"]:
                        if not isinstance(unit, dict):
                            continue
                        seen += 1
                        verdict = apply_unit(s, self._commands, operator_id, unit, now=now,
                                             origin="reconcile")
                        updated += verdict.outcome not in ("older", "malformed_unit")
                        queued += verdict.command is not None
                meta = doc.get("meta")
                pagination = meta.get("pagination") if isinstance(meta, dict) else None
                pages = pagination.get("pages") if isinstance(pagination, dict) else None
                if not isinstance(pages, int) or page >= pages or not doc["units"]:
                    break
                page += 1
                self._sleep(self._pace)
        except RelayError as exc:  # Stora's refusal, no token, no rate-limit slot
            LOGGER.warning("reconciliation of %s stopped at page %d: %s", operator_id, page,
                           exc)
            return Reconciliation(operator_id, seen, updated, queued, str(exc))
        try:
            with self._db.session() as s:
                if lease is not None:
                    lease.check(s)
                row = s.get(Operator, operator_id)
                if row is not None:
                    row.reconciled_at = self._clock()
        except RelayError as exc:  # the lease was taken over: the other pass records it
            LOGGER.warning("reconciliation of %s not recorded: %s", operator_id, exc)
            return Reconciliation(operator_id, seen, updated, queued, str(exc))
        LOGGER.info("reconciled %s: %d units, %d updated, %d commands queued", operator_id,
                    seen, updated, queued)
        return Reconciliation(operator_id, seen, updated, queued)
