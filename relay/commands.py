"""Commands to sites (contract §7.3, §5): recorded, signed, and matched to their results.

A command is a row of ``commands`` written in the same transaction as what caused it (a
webhook's effect, an unlock call): the MQTT outbox (:mod:`relay.outbox`) publishes rows
not yet published, and publishes again after a restart what no result answered (the
same token, so the same ``jti``: the gateway runs it at most once).  Results are matched
by ``jti``; a late one still updates the record.

Lockout and clear are *intents* kept per unit (:class:`relay.db.models.UnitState`): a
sent command that expires unanswered is followed by a new one with a new ``jti`` and the
same ``ver``, until the gateway confirms that ``ver`` (``done``, or ``stale_version``: it
already holds a newer one).  An unlock is never sent again under a new ``jti``.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any, Final

from sqlalchemy import select
from sqlalchemy.orm import Session

from relay.db.models import Command, UnitState
from relay.keys import SigningKeys
from relay.metrics import COMMANDS_CREATED, bounded
from sitelink.codes import Cmd, Reason, Status
from sitelink.sign import CommandSigner

__all__ = ["LOCKOUT_TTL_S", "RESULT_STATUSES", "UNLOCK_TTL_S", "Commands", "apply_result"]

#: ``exp - iat`` (contract §7.3): unlock/lock ≤ 60 s, lockout/clear ≤ 300 s.
UNLOCK_TTL_S = 60
LOCKOUT_TTL_S = 300
RESULT_STATUSES = frozenset(s.value for s in Status)
#: How long a signing key read from the database is used before it is read again (a
#: ``keys rotate`` in another process takes effect within this).
KEY_CACHE_S = 30.0
#: Where commands come from (metrics labels).
ORIGINS: Final = frozenset({"webhook", "api", "reconcile", "resend"})


class Commands:
    """Makes signed command rows with the current signing key."""

    def __init__(self, keys: SigningKeys, *, clock: Callable[[], float] = time.time) -> None:
        self._keys = keys
        self._clock = clock
        self._cached: tuple[float, str, Any] | None = None

    def _signer(self, session: Session, site_id: str) -> CommandSigner:
        now = time.monotonic()
        if self._cached is None or now - self._cached[0] > KEY_CACHE_S:
            kid, key = self._keys.current(session)
            self._cached = (now, kid, key)
        _, kid, key = self._cached
        return CommandSigner(key, kid, site_id, clock=self._clock)

    def new(self, session: Session, *, operator_id: str, site_id: str, unit_id: str,
            cmd: Cmd, origin: str, ver: int | None = None, dur: int | None = None,
            actor: str | None = None, override: bool = False, reason: str | None = None,
            api_key_id: str | None = None, idempotency_key: str | None = None) -> Command:
        """A signed command, added to ``session`` (published once that commits)."""
        ttl = LOCKOUT_TTL_S if cmd in (Cmd.LOCKOUT, Cmd.CLEAR_LOCKOUT) else UNLOCK_TTL_S
        now = self._clock()
        iat = math.floor(now)
        jti, token = self._signer(session, site_id).command(
            cmd.value, unit_id, jti=uuid.uuid4().hex, ttl=ttl, iat=iat, ver=ver, dur=dur,
            actor=actor, override=True if override else None, reason=reason)
        row = Command(jti=jti, operator_id=operator_id, site_id=site_id, unit_id=unit_id,
                      cmd=cmd.value, ver=ver, token=token.decode("ascii"),
                      status="pending", reason=None, duplicate=False, state_json=None,
                      origin=origin, actor=actor, api_key_id=api_key_id,
                      idempotency_key=idempotency_key, created_at=now,
                      expires_at=iat + ttl, published_at=None, result_at=None)
        session.add(row)
        COMMANDS_CREATED.labels(cmd.value, bounded(origin, ORIGINS)).inc()
        return row


def apply_result(session: Session, site_id: str, payload: Mapping[str, Any],
                 now: float) -> Command | None:
    """Record a gateway's result on its command; ``None`` when it answers none of ours.

    A result is taken only from the site the command went to.  A lockout or clear that
    the gateway ``done`` or refused ``stale_version`` confirms its ``ver`` for the unit.
    """
    jti = payload.get("jti")
    status = payload.get("status")
    if not isinstance(jti, str) or status not in RESULT_STATUSES:
        return None
    row = session.get(Command, jti)
    if row is None or row.site_id != site_id:
        return None
    reason = payload.get("reason")
    row.status = str(status)
    row.reason = reason if isinstance(reason, str) and len(reason) <= 40 else None
    row.duplicate = payload.get("duplicate") is True
    state = payload.get("state")
    row.state_json = json.dumps(state)[:4096] if isinstance(state, dict) else None
    row.result_at = now
    confirmed = status == Status.DONE or reason == Reason.STALE_VERSION
    if row.cmd in (Cmd.LOCKOUT, Cmd.CLEAR_LOCKOUT) and confirmed and row.ver is not None:
        unit = session.scalars(select(UnitState).where(
            UnitState.operator_id == row.operator_id,
            UnitState.unit_id == row.unit_id)).first()
        if unit is not None and (unit.confirmed_ver or 0) < row.ver:
            unit.confirmed_ver = row.ver
    return row
