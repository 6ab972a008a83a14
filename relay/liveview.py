"""The operator's live view (issue 15): what the connected page shows, read in one
transaction with bounded queries, so that an operator with 1,000 sites gets a page as
fast as one with three.

* the operator's token state (connected or ``reauth_required``, when the access token
  expires, the last refresh) and when Stora last sent a change and the units were last
  reconciled;
* its sites, :data:`SITES_PER_PAGE` a page, each with its gateway's health (from the
  retained ``P/S/status``: online, offline, never seen; last heard), the Timeline Events
  its gateway holds (``outbox.pending``) or gave up (``outbox.dead``), and its units in
  lockout; the totals of every site above the table;
* the units in lockout (newest first), each confirmed by its gateway or not yet;
* the newest commands with their results and reasons;
* Timeline delivery: sent on to Stora, answered 429 by the relay itself (a 429 from
  Stora avoided), and the last minute's use of the operator's budget.

Everything here reads the database the replicas share, so every replica shows the same.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from sqlalchemy import and_, func, select
from sqlalchemy.orm import Session

from relay.db.engine import Database
from relay.db.models import Command, Operator, OperatorSite, Site, StoraSend, UnitState
from relay.ratelimit import TIMELINE_PURPOSE, database_now

__all__ = ["COMMANDS_SHOWN", "LOCKOUTS_SHOWN", "OPERATORS_PER_PAGE", "SITES_PER_PAGE", "LiveView",
           "OperatorRow", "live_view", "operators_overview"]

SITES_PER_PAGE: Final = 50
LOCKOUTS_SHOWN: Final = 100
COMMANDS_SHOWN: Final = 25


@dataclass(frozen=True)
class SiteRow:
    """One site of the page."""

    id: str
    name: str
    registered: bool
    online: bool | None
    heard_at: float | None
    queued: int | None
    dead: int | None
    lockouts: int

    @property
    def health(self) -> str:
        """``online``, ``offline``, ``never seen`` or ``no gateway``."""
        if not self.registered:
            return "no gateway"
        if self.online is None:
            return "never seen"
        return "online" if self.online else "offline"


@dataclass(frozen=True)
class LockoutRow:
    """A unit the relay keeps locked out."""

    unit_id: str
    site_id: str
    status: str
    since: float
    confirmed: bool


@dataclass(frozen=True)
class CommandRow:
    """A command and its result."""

    jti: str
    created_at: float
    site_id: str
    unit_id: str
    cmd: str
    origin: str
    status: str
    reason: str | None
    actor: str | None


@dataclass(frozen=True)
class LiveView:
    """Everything the operator's page shows."""

    operator_id: str
    name: str
    status: str
    token_expires_at: float | None
    last_refresh_at: float | None
    refreshes: int
    last_webhook_at: float | None
    reconciled_at: float | None
    sites: Sequence[SiteRow]
    page: int
    pages: int
    site_count: int
    registered: int
    online: int
    offline: int
    lockout_count: int
    lockouts: Sequence[LockoutRow]
    commands: Sequence[CommandRow]
    queued: int
    dead: int
    timeline_sent: int
    timeline_throttled: int
    last_minute: int


def _outbox(status_json: str | None) -> tuple[int | None, int | None]:
    """``(pending, dead)`` of a gateway's retained status, ``None`` where it says none."""
    if not status_json:
        return None, None
    try:
        doc: Any = json.loads(status_json)
    except ValueError:
        return None, None
    outbox = doc.get("outbox") if isinstance(doc, dict) else None
    if not isinstance(outbox, dict):
        return None, None
    pending, dead = outbox.get("pending"), outbox.get("dead")
    return (pending if isinstance(pending, int) else None,
            dead if isinstance(dead, int) else None)


def _site_page(s: Session, operator_id: str, page: int) -> tuple[list[SiteRow], int, int]:
    """The sites of ``page`` (by name), the number of pages, and of sites."""
    total = s.scalar(select(func.count()).select_from(OperatorSite)
                     .where(OperatorSite.operator_id == operator_id)) or 0
    pages = max(1, math.ceil(total / SITES_PER_PAGE))
    page = min(max(1, page), pages)
    live = and_(Site.site_id == OperatorSite.site_id, Site.operator_id == operator_id,
                Site.revoked_at.is_(None))
    rows = s.execute(
        select(OperatorSite.site_id, OperatorSite.name, Site.site_id, Site.online,
               Site.status_at, Site.status_json)
        .outerjoin(Site, live).where(OperatorSite.operator_id == operator_id)
        .order_by(OperatorSite.name, OperatorSite.site_id)
        .limit(SITES_PER_PAGE).offset((page - 1) * SITES_PER_PAGE)).all()
    ids = [r[0] for r in rows]
    locked = {site_id: int(n) for site_id, n in s.execute(
        select(UnitState.site_id, func.count()).where(
            UnitState.operator_id == operator_id, UnitState.lockout.is_(True),
            UnitState.site_id.in_(ids)).group_by(UnitState.site_id)).all()}
    out = []
    for site_id, name, registered, online, heard_at, status_json in rows:
        queued, dead = _outbox(status_json)
        out.append(SiteRow(site_id, name or site_id, registered is not None, online,
                           heard_at, queued, dead, locked.get(site_id, 0)))
    return out, pages, total


def live_view(db: Database, operator_id: str, *, page: int = 1) -> LiveView | None:
    """The operator's page ``page`` of sites, or ``None`` for an unknown operator."""
    with db.read() as s:
        op = s.get(Operator, operator_id)
        if op is None:
            return None
        sites, pages, total = _site_page(s, operator_id, page)
        health = {online: int(n) for online, n in s.execute(
            select(Site.online, func.count()).where(
                Site.operator_id == operator_id, Site.revoked_at.is_(None))
            .group_by(Site.online)).all()}
        queued = dead = 0
        for status_json in s.scalars(select(Site.status_json).where(
                Site.operator_id == operator_id, Site.revoked_at.is_(None),
                Site.status_json.is_not(None))):
            pending, gave_up = _outbox(status_json)
            queued += pending or 0
            dead += gave_up or 0
        lockout_count = s.scalar(select(func.count()).select_from(UnitState).where(
            UnitState.operator_id == operator_id, UnitState.lockout.is_(True))) or 0
        lockouts = [LockoutRow(u.unit_id, u.site_id, u.status, u.updated_at,
                               (u.confirmed_ver or 0) >= u.ver)
                    for u in s.scalars(select(UnitState).where(
                        UnitState.operator_id == operator_id, UnitState.lockout.is_(True))
                        .order_by(UnitState.updated_at.desc()).limit(LOCKOUTS_SHOWN))]
        commands = [CommandRow(c.jti, c.created_at, c.site_id, c.unit_id, c.cmd, c.origin,
                               c.status, c.reason, c.actor)
                    for c in s.scalars(select(Command).where(
                        Command.operator_id == operator_id)
                        .order_by(Command.created_at.desc()).limit(COMMANDS_SHOWN))]
        now = database_now(s)
        last_minute = s.scalar(select(func.count()).select_from(StoraSend).where(
            StoraSend.operator_id == operator_id, StoraSend.purpose == TIMELINE_PURPOSE,
            StoraSend.sent_at > now - 60)) or 0
        return LiveView(
            operator_id=op.id, name=op.name, status=op.status,
            token_expires_at=op.token_expires_at, last_refresh_at=op.last_refresh_at,
            refreshes=op.refreshes, last_webhook_at=op.last_webhook_at,
            reconciled_at=op.reconciled_at, sites=sites, page=min(max(1, page), pages),
            pages=pages, site_count=total,
            registered=sum(health.values()), online=int(health.get(True, 0)),
            offline=int(health.get(False, 0)), lockout_count=lockout_count,
            lockouts=lockouts, commands=commands, queued=queued, dead=dead,
            timeline_sent=op.timeline_sent, timeline_throttled=op.timeline_throttled,
            last_minute=last_minute)



OPERATORS_PER_PAGE: Final = 50


@dataclass(frozen=True)
class OperatorRow:
    """One operator on the staff pages."""

    id: str
    name: str
    status: str
    sites: int
    registered: int
    online: int
    offline: int
    lockouts: int
    last_webhook_at: float | None
    token_expires_at: float | None


def operators_overview(db: Database, *, page: int = 1
                       ) -> tuple[list[OperatorRow], int, int, int]:
    """Every operator for the staff pages, :data:`OPERATORS_PER_PAGE` a page by name:
    the rows, the page shown, the number of pages and of operators."""
    with db.read() as s:
        total = s.scalar(select(func.count()).select_from(Operator)) or 0
        pages = max(1, math.ceil(total / OPERATORS_PER_PAGE))
        page = min(max(1, page), pages)
        ops = list(s.scalars(select(Operator).order_by(Operator.name, Operator.id)
                             .limit(OPERATORS_PER_PAGE)
                             .offset((page - 1) * OPERATORS_PER_PAGE)))
        ids = [o.id for o in ops]
        listed = {op: int(n) for op, n in s.execute(
            select(OperatorSite.operator_id, func.count())
            .where(OperatorSite.operator_id.in_(ids))
            .group_by(OperatorSite.operator_id)).all()}
        health: dict[tuple[str, bool | None], int] = {
            (op, online): int(n) for op, online, n in s.execute(
                select(Site.operator_id, Site.online, func.count())
                .where(Site.operator_id.in_(ids), Site.revoked_at.is_(None))
                .group_by(Site.operator_id, Site.online)).all()}
        locked = {op: int(n) for op, n in s.execute(
            select(UnitState.operator_id, func.count())
            .where(UnitState.operator_id.in_(ids), UnitState.lockout.is_(True))
            .group_by(UnitState.operator_id)).all()}
    rows = [OperatorRow(
        o.id, o.name, o.status, listed.get(o.id, 0),
        sum(n for (op, _), n in health.items() if op == o.id),
        health.get((o.id, True), 0), health.get((o.id, False), 0), locked.get(o.id, 0),
        o.last_webhook_at, o.token_expires_at) for o in ops]
    return rows, page, pages, total
