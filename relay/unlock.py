"""The unlock API's decisions (contract §7.2): who asks, what is sent, what is answered.

:class:`UnlockService` is synchronous (its callers run it in a worker thread): it checks
the key, the site and the unit, then in one transaction either finds the command this
request already made (the same ``Idempotency-Key`` from the same key; or, for an unlock,
one still pending for the same unit: a double tap) or records a refusal or a new signed
command.  Publishing and waiting for the result are the MQTT link's
(:mod:`relay.link`).

Refused at once with nothing sent (HTTP 200, ``status`` ``rejected``): the site's
retained status says its gateway is offline (``gateway_offline``).  The gateway itself
refuses a unit in lockout unless a staff key asks ``override`` with a ``reason``.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from relay.apikeys import ADMIN, ApiKeyInfo, ApiKeys
from relay.commands import Commands
from relay.db.engine import Database
from relay.db.models import Command, IdempotencyAlias, Site, UnitState
from relay.errors import RelayError
from sitelink.claims import ACTOR_MAX, DUR_MAX, DUR_MIN, REASON_MAX
from sitelink.codes import Cmd
from sitelink.payloads import rfc3339

__all__ = ["ApiError", "UnlockRequest", "UnlockService", "record_json"]

MAX_IDEMPOTENCY_KEY = 200


class ApiError(RelayError):
    """An API error: HTTP ``status``, a ``code`` and a message (contract §7.2)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass(frozen=True)
class UnlockRequest:
    """One unlock or lock call, its body checked."""

    site_id: str
    unit_id: str
    cmd: Cmd
    seconds: int | None = None
    actor: str | None = None
    contact: str | None = None
    override: bool = False
    reason: str | None = None
    idempotency_key: str | None = None

    def __post_init__(self) -> None:
        if self.seconds is not None and not DUR_MIN <= self.seconds <= DUR_MAX:
            raise ApiError(422, "invalid_body", f"seconds must be {DUR_MIN}–{DUR_MAX}")
        for name, value, limit in (("actor", self.actor, ACTOR_MAX),
                                   ("reason", self.reason, REASON_MAX),
                                   ("contact", self.contact, 64)):
            if value is not None and (not value.strip() or len(value) > limit
                                      or not value.isprintable()):
                raise ApiError(422, "invalid_body",
                               f"{name} must be 1–{limit} printable characters")
        if self.override and not self.reason:
            raise ApiError(422, "invalid_body", "override needs a reason (audited)")
        key = self.idempotency_key
        if key is not None and (not key or len(key) > MAX_IDEMPOTENCY_KEY
                                or not key.isprintable()):
            raise ApiError(422, "invalid_idempotency_key",
                           f"Idempotency-Key must be 1–{MAX_IDEMPOTENCY_KEY} printable "
                           "characters")


def record_json(row: Command) -> dict[str, Any]:
    """The command record of contract §7.2."""
    state = json.loads(row.state_json) if row.state_json else None
    return {"id": row.jti, "site": row.site_id, "unit": row.unit_id, "cmd": row.cmd,
            "status": row.status, "reason": row.reason, "duplicate": row.duplicate,
            "created_at": rfc3339(row.created_at), "result_at": rfc3339(row.result_at),
            "state": state}


class UnlockService:
    """Unlock and lock calls, over the database."""

    def __init__(self, db: Database, api_keys: ApiKeys, commands: Commands, *,
                 clock: Callable[[], float] = time.time) -> None:
        self._db = db
        self._keys = api_keys
        self._commands = commands
        self._clock = clock

    def authenticate(self, authorization: str | None) -> ApiKeyInfo:
        """The key of an ``Authorization: Bearer …`` header, or a 401."""
        scheme, _, text = (authorization or "").partition(" ")
        key = self._keys.authenticate(text.strip()) if scheme.lower() == "bearer" else None
        if key is None:
            raise ApiError(401, "unauthorized", "a valid API key is needed: "
                           "Authorization: Bearer <key>")
        return key

    def submit(self, key: ApiKeyInfo, request: UnlockRequest) -> tuple[dict[str, Any], bool]:
        """The command record for ``request`` and whether a new command was made to send."""
        if key.role == ADMIN:
            raise ApiError(403, "forbidden", "an admin key opens the staff pages, not doors")
        if key.role != "staff":
            raise ApiError(403, "forbidden", "only staff keys are served until the access "
                           "rules for app keys are in place")
        with self._db.session() as s:
            self._check_site(s, key, request)
            found = self._existing(s, key, request)
            if found is not None:
                return record_json(found), False
            row = self._new(s, key, request)
            try:
                s.flush()
            except IntegrityError:  # the same Idempotency-Key, raced: the first one wins
                s.rollback()
                return self.submit(key, request)
            return record_json(row), row.status == "pending"

    def _check_site(self, s: Session, key: ApiKeyInfo, request: UnlockRequest) -> None:
        site = s.get(Site, request.site_id)
        if site is None or site.revoked_at is not None:
            raise ApiError(404, "not_found", f"no site {request.site_id}")
        if site.operator_id != key.operator_id:
            raise ApiError(403, "forbidden", f"site {request.site_id} is another operator's")
        # The unit's row lock (PostgreSQL; SQLite's BEGIN IMMEDIATE already serialises):
        # a request for the same unit at another replica waits here until this one
        # commits, then finds its command (a double tap, or the same Idempotency-Key).
        unit = s.get(UnitState, (key.operator_id, request.unit_id), with_for_update=True)
        if unit is None or unit.site_id != request.site_id:
            raise ApiError(404, "not_found",
                           f"no unit {request.unit_id} at site {request.site_id}")

    def _existing(self, s: Session, key: ApiKeyInfo, request: UnlockRequest) -> Command | None:
        if request.idempotency_key is not None:
            row = s.scalars(select(Command).where(
                Command.api_key_id == key.id,
                Command.idempotency_key == request.idempotency_key)).first()
            if row is None:
                alias = s.get(IdempotencyAlias, (key.id, request.idempotency_key))
                row = None if alias is None else s.get(Command, alias.jti)
            if row is not None:
                if (row.site_id, row.unit_id, row.cmd) != (request.site_id, request.unit_id,
                                                           request.cmd.value):
                    raise ApiError(422, "idempotency_key_reused", "this Idempotency-Key was "
                                   "used for another request")
                return row
        if request.cmd != Cmd.UNLOCK or request.override:
            return None
        # A double tap: the unlock already on its way (an override is never one: it is
        # a different request).  With an Idempotency-Key, the key now names that command.
        pending = s.scalars(select(Command).where(
            Command.operator_id == key.operator_id, Command.site_id == request.site_id,
            Command.unit_id == request.unit_id, Command.cmd == Cmd.UNLOCK.value,
            Command.status == "pending", Command.expires_at > self._clock())
            .order_by(Command.created_at.desc())).first()
        if pending is not None and request.idempotency_key is not None:
            s.add(IdempotencyAlias(api_key_id=key.id, idempotency_key=request.idempotency_key,
                                   jti=pending.jti, created_at=self._clock()))
        return pending

    def _new(self, s: Session, key: ApiKeyInfo, request: UnlockRequest) -> Command:
        operator_id = key.operator_id
        if operator_id is None:  # pragma: no cover (submit refuses admin keys first)
            raise ApiError(403, "forbidden", "an admin key opens the staff pages, not doors")
        site = s.get(Site, request.site_id)
        status = json.loads(site.status_json) if site and site.status_json else None
        actor = request.actor or key.name
        if isinstance(status, dict) and status.get("online") is False:
            now = self._clock()
            row = Command(jti=uuid.uuid4().hex, operator_id=operator_id,
                          site_id=request.site_id, unit_id=request.unit_id,
                          cmd=request.cmd.value, ver=None, token=None, status="rejected",
                          reason="gateway_offline", duplicate=False, state_json=None,
                          origin="api", actor=actor, api_key_id=key.id,
                          idempotency_key=request.idempotency_key, created_at=now,
                          expires_at=now, published_at=None, result_at=now)
            s.add(row)
            return row
        return self._commands.new(
            s, operator_id=operator_id, site_id=request.site_id, unit_id=request.unit_id,
            cmd=request.cmd, origin="api", dur=request.seconds, actor=actor,
            override=request.override, reason=request.reason, api_key_id=key.id,
            idempotency_key=request.idempotency_key)

    def record(self, key: ApiKeyInfo, command_id: str) -> dict[str, Any]:
        """``GET /v1/commands/{id}``: a command of the key's operator, or a 404."""
        with self._db.read() as s:
            row = s.get(Command, command_id[:64])
            if row is None or row.operator_id != key.operator_id:
                raise ApiError(404, "not_found", f"no command {command_id[:64]}")
            return record_json(row)
