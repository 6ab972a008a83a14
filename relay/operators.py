"""Connected operators: who they are, their tokens (encrypted) and their status.

Stora gives a partner no operator id ([ND]: the token answer names none and there is no
"who am I" call), so the relay keeps its own (``op_…``) and recognises an operator who
connects again by the sites Stora lists for the new token: any site in common is the same
operator.  Statuses (contract §7.1): ``connected``; ``reauth_required`` after a refresh
was refused (``invalid_grant``: calls for it stop until it connects again);
``disconnected`` (reserved for an operator removed by staff).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sqlalchemy import select

from relay.crypto import Keyring
from relay.db.engine import Database
from relay.db.models import Operator, OperatorSite, Site
from relay.stora import TokenSet

__all__ = ["CONNECTED", "DISCONNECTED", "REAUTH_REQUIRED", "OperatorInfo", "Operators",
           "StoraSite", "token_aad"]

CONNECTED = "connected"
REAUTH_REQUIRED = "reauth_required"
DISCONNECTED = "disconnected"


def token_aad(operator_id: str, column: str) -> bytes:
    """What an operator's encrypted value is bound to: a copy in another row fails."""
    return f"operators.{column}:{operator_id}".encode()


@dataclass(frozen=True)
class StoraSite:
    """A site as Stora listed it on connect."""

    id: str
    name: str


@dataclass(frozen=True)
class OperatorInfo:
    """An operator as ``operators list`` and the operator's page show it."""

    id: str
    name: str
    status: str
    sites: tuple[str, ...]
    registered_sites: tuple[str, ...]
    last_webhook_at: float | None
    last_refresh_at: float | None
    token_expires_at: float | None
    webhook_endpoint_id: str | None


def _name(sites: Sequence[StoraSite]) -> str:
    names = sorted(s.name or s.id for s in sites)
    if not names:
        return "(no sites)"
    others = len(names) - 1
    return names[0] if not others else (
        f"{names[0]} and {others} other site{'s' if others > 1 else ''}")


class Operators:
    """The operators in the database."""

    def __init__(self, db: Database, keyring: Keyring, *,
                 clock: Callable[[], float] = time.time) -> None:
        self._db = db
        self._keyring = keyring
        self._clock = clock

    def connect(self, tokens: TokenSet, sites: Sequence[StoraSite]) -> str:
        """Record a (re)connected operator with its tokens and sites; returns its id."""
        now = self._clock()
        ids = [s.id for s in sites]
        with self._db.session() as s:
            known = s.scalars(select(OperatorSite.operator_id)
                              .where(OperatorSite.site_id.in_(ids))).first() if ids else None
            row = s.get(Operator, known) if known else None
            if row is None:
                row = Operator(id="op_" + secrets.token_hex(6), name=_name(sites),
                               status=CONNECTED, scopes="", refreshes=0,
                               webhook_key=secrets.token_urlsafe(18), connected_at=now,
                               updated_at=now)
                s.add(row)
            row.name = _name(sites)
            row.status = CONNECTED
            row.connected_at = now
            self._store_tokens(row, tokens, now)
            for site in sites:
                seen = s.get(OperatorSite, site.id)
                if seen is None:
                    s.add(OperatorSite(site_id=site.id, operator_id=row.id, name=site.name,
                                       seen_at=now))
                else:
                    seen.operator_id, seen.name, seen.seen_at = row.id, site.name, now
            return row.id

    def _store_tokens(self, row: Operator, tokens: TokenSet, now: float) -> None:
        row.access_token_enc = self._keyring.encrypt(
            tokens.access_token.encode(), aad=token_aad(row.id, "access_token"))
        if tokens.refresh_token is not None:  # always keep the newest one (rotation)
            row.refresh_token_enc = self._keyring.encrypt(
                tokens.refresh_token.encode(), aad=token_aad(row.id, "refresh_token"))
        row.token_lifetime_s = tokens.expires_in
        row.token_expires_at = now + tokens.expires_in
        if tokens.scope:
            row.scopes = tokens.scope
        row.updated_at = now

    def set_webhook(self, operator_id: str, endpoint_id: str, secret: str | None) -> None:
        """Keep the operator's webhook endpoint (and its secret, when one was created)."""
        with self._db.session() as s:
            row = s.get(Operator, operator_id)
            if row is None:
                return
            row.webhook_endpoint_id = endpoint_id
            if secret is not None:
                row.webhook_secret_enc = self._keyring.encrypt(
                    secret.encode(), aad=token_aad(operator_id, "webhook_secret"))
            row.updated_at = self._clock()

    def has_webhook_secret(self, operator_id: str) -> bool:
        """Whether the operator's webhook signing secret is stored."""
        with self._db.read() as s:
            row = s.get(Operator, operator_id)
            return row is not None and row.webhook_secret_enc is not None

    def webhook_key(self, operator_id: str) -> str:
        """The path key of the operator's webhook URL."""
        with self._db.read() as s:
            row = s.get(Operator, operator_id)
            if row is None:
                raise KeyError(operator_id)
            return row.webhook_key

    def access_token(self, operator_id: str) -> str | None:
        """The stored access token (``None``: none, or the operator must reconnect)."""
        with self._db.read() as s:
            row = s.get(Operator, operator_id)
            if row is None or row.access_token_enc is None or row.status != CONNECTED:
                return None
            enc = row.access_token_enc
        return self._keyring.decrypt(enc, aad=token_aad(operator_id, "access_token")).decode()

    def site_names(self, operator_id: str) -> list[tuple[str, str]]:
        """``(site id, name)`` of the operator's sites as Stora listed them."""
        with self._db.read() as s:
            rows = s.execute(select(OperatorSite.site_id, OperatorSite.name)
                             .where(OperatorSite.operator_id == operator_id)
                             .order_by(OperatorSite.site_id)).all()
            return [(r[0], r[1]) for r in rows]

    def get(self, operator_id: str) -> OperatorInfo | None:
        """One operator."""
        found = [o for o in self.list() if o.id == operator_id]
        return found[0] if found else None

    def list(self) -> list[OperatorInfo]:
        """Every operator, by id."""
        with self._db.read() as s:
            rows = s.scalars(select(Operator).order_by(Operator.id)).all()
            sites = s.execute(select(OperatorSite.operator_id, OperatorSite.site_id)
                              .order_by(OperatorSite.site_id)).all()
            registered = s.execute(select(Site.operator_id, Site.site_id)
                                   .where(Site.revoked_at.is_(None))
                                   .order_by(Site.site_id)).all()
            return [OperatorInfo(
                r.id, r.name, r.status,
                tuple(site for op, site in sites if op == r.id),
                tuple(site for op, site in registered if op == r.id),
                r.last_webhook_at, r.last_refresh_at, r.token_expires_at,
                r.webhook_endpoint_id) for r in rows]
