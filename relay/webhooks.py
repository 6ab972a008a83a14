"""Webhook intake (contract §7.3): Stora's ``unit.updated`` becomes a lockout or a clear.

The route hands over the raw body (capped at :data:`MAX_BODY_BYTES`) and the
``X-Stora-Signature`` header; :meth:`WebhookIntake.accept` does the rest:

1. the ``{key}`` of the URL finds the operator; unknown → refused;
2. ``t=…,v1=…``: HMAC-SHA256 of ``t + "." + raw body`` keyed with the endpoint secret's
   UTF-8 bytes (stora-api §4.3; [ND] whether the key is the hex text or its bytes: the
   text is assumed), compared in constant time against every ``v1`` given; ``|now − t|``
   within ``webhook_tolerance_s`` (configurable: Stora may keep the first attempt's ``t``
   on retries, [ND]); the skew of each accepted delivery is logged;
3. in **one transaction**: the ``(operator, event.id)`` dedupe row, the unit's new
   status and ``ver`` (its ``updated_at`` in epoch milliseconds) and, when the lockout
   changes, the command to send; an event whose ``ver`` is not newer than the unit's
   is recorded and has no effect, as is a second delivery of an event id.

Nothing is sent before the transaction commits; the outbox publishes after.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from sqlalchemy import select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from relay.commands import Commands
from relay.crypto import DecryptError, Keyring
from relay.db.engine import Database
from relay.db.models import Command, Operator, Site, UnitState, WebhookEvent
from relay.operators import token_aad
from sitelink.codes import Cmd

__all__ = ["LOCKOUT_STATUSES", "MAX_BODY_BYTES", "OUTCOMES", "Verdict", "WebhookIntake",
           "apply_unit", "sign", "unit_ver"]

LOGGER = logging.getLogger(__name__)
MAX_BODY_BYTES: Final = 256 * 1024
#: Unit statuses that mean "locked out" (stora-api §8.1: ``overlock`` is the spelling of
#: the list filter, ``overlocked`` of the resource; both are taken).
LOCKOUT_STATUSES: Final = frozenset({"overlocked", "overlock", "repossessed"})
#: Every outcome a delivery can have (:class:`Verdict`).
OUTCOMES: Final = frozenset({
    "command", "duplicate", "older", "no_change", "ignored", "unregistered_site",
    "malformed_unit", "unknown_endpoint", "bad_signature", "stale_timestamp", "not_json",
    "no_event_id", "conflict"})
_MAX_SIGNATURE_HEADER = 1024
#: How long a webhook secret read from the database is used before it is read again.
SECRET_CACHE_S = 30.0
MAX_CACHED_SECRETS = 10_000


@dataclass(frozen=True)
class Verdict:
    """What became of a delivery: ``status`` is the HTTP answer."""

    status: int
    outcome: str
    command: str | None = None


def sign(secret: str, t: int, body: bytes) -> str:
    """The ``X-Stora-Signature`` header value Stora would send (for tests and tools)."""
    digest = hmac.new(secret.encode(), str(t).encode() + b"." + body, hashlib.sha256)
    return f"t={t},v1={digest.hexdigest()}"


def _parse_signature(header: str) -> tuple[int, list[str]] | None:
    if not header or len(header) > _MAX_SIGNATURE_HEADER:
        return None
    t: int | None = None
    v1: list[str] = []
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        if name == "t" and value.isdigit() and len(value) <= 12:
            t = int(value)
        elif name == "v1" and value:
            v1.append(value.strip().lower())
    return None if t is None or not v1 else (t, v1)


def _signed(secret: str, t: int, body: bytes, given: list[str]) -> bool:
    expected = hmac.new(secret.encode(), str(t).encode() + b"." + body,
                        hashlib.sha256).hexdigest().encode()
    return any(hmac.compare_digest(expected, v.encode()) for v in given)


def unit_ver(updated_at: object) -> int | None:
    """``updated_at`` (RFC 3339) in epoch milliseconds, or ``None`` when unreadable."""
    if not isinstance(updated_at, str) or len(updated_at) > 40:
        return None
    try:
        moment = datetime.fromisoformat(updated_at.replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        return None
    return int(moment.timestamp() * 1000)


class WebhookIntake:
    """Stora's deliveries for every connected operator."""

    def __init__(self, db: Database, keyring: Keyring, commands: Commands, *,
                 tolerance_s: float, clock: Callable[[], float] = time.time) -> None:
        self._db = db
        self._keyring = keyring
        self._commands = commands
        self._tolerance = tolerance_s
        self._clock = clock
        #: key -> (operator id, secret, when read): a delivery needs no lookup of its own
        #: while the secret is fresh; a signature that fails reads it again at once.
        self._secrets: dict[str, tuple[str, str, float]] = {}

    def _secret(self, key: str, *, fresh: bool = False) -> tuple[str, str] | None:
        """``(operator id, endpoint secret)`` of the webhook URL's ``key``."""
        if not key or len(key) > 64:
            return None
        cached = self._secrets.get(key)
        if cached is not None and not fresh and time.monotonic() - cached[2] < SECRET_CACHE_S:
            return cached[0], cached[1]
        with self._db.read() as s:
            row = s.scalars(select(Operator).where(Operator.webhook_key == key)).first()
            if row is None or row.webhook_secret_enc is None:
                return None
            operator_id, enc = row.id, row.webhook_secret_enc
        try:
            secret = self._keyring.decrypt(enc, aad=token_aad(operator_id, "webhook_secret"))
        except DecryptError:
            LOGGER.exception("webhook secret of %s does not decrypt", operator_id)
            return None
        if len(self._secrets) >= MAX_CACHED_SECRETS:
            self._secrets.clear()
        self._secrets[key] = (operator_id, secret.decode(), time.monotonic())
        return operator_id, secret.decode()

    def accept(self, key: str, body: bytes, signature: str) -> Verdict:
        """Judge and apply one delivery."""
        found = self._secret(key)
        if found is None:
            return Verdict(401, "unknown_endpoint")
        operator_id, secret = found
        parsed = _parse_signature(signature)
        if parsed is None:
            return Verdict(401, "bad_signature")
        t, given = parsed
        if not _signed(secret, t, body, given):
            found = self._secret(key, fresh=True)  # the endpoint may have been replaced
            if found is None or not _signed(found[1], t, body, given):
                return Verdict(401, "bad_signature")
            operator_id = found[0]
        now = self._clock()
        skew = now - t
        if abs(skew) > self._tolerance:
            LOGGER.warning("webhook for %s refused: t is %.0f s off (tolerance %.0f s)",
                           operator_id, skew, self._tolerance)
            return Verdict(401, "stale_timestamp")
        try:
            doc = json.loads(body)
        except ValueError:
            return Verdict(400, "not_json")
        event = doc.get("event") if isinstance(doc, dict) else None
        if not isinstance(event, dict) or not isinstance(event.get("id"), str) \
                or not 0 < len(event["id"]) <= 100:
            return Verdict(400, "no_event_id")
        verdict = self._apply(operator_id, event, skew, now)
        LOGGER.info("webhook %s for %s (%s): %s, t skew %.1f s", event["id"], operator_id,
                    event.get("type"), verdict.outcome, skew)
        return verdict

    def _apply(self, operator_id: str, event: dict[str, Any], skew: float,
               now: float) -> Verdict:
        event_type = str(event.get("type", ""))[:100]
        data = event.get("data")
        unit = data.get("unit") if isinstance(data, dict) else None
        unit_id = unit.get("id") if isinstance(unit, dict) else None
        try:
            with self._db.session() as s:
                record = WebhookEvent(operator_id=operator_id, event_id=event["id"],
                                      type=event_type,
                                      unit_id=unit_id if isinstance(unit_id, str) else None,
                                      outcome="pending", skew_s=skew, received_at=now)
                s.add(record)
                s.flush()  # the dedupe: a second delivery stops here (IntegrityError)
                s.execute(update(Operator).where(Operator.id == operator_id)
                          .values(last_webhook_at=now))
                if event_type != "unit.updated" or not isinstance(unit, dict):
                    record.outcome = "ignored"
                    return Verdict(200, "ignored")
                verdict = apply_unit(s, self._commands, operator_id, unit, now=now)
                record.outcome = verdict.outcome
                return verdict
        except IntegrityError:
            # The event's dedupe row is there: a duplicate.  Any other conflict (on
            # PostgreSQL, two first events of one unit at once) must not pass for one:
            # 500, and Stora delivers it again.
            with self._db.read() as s:
                seen = s.scalar(select(WebhookEvent.seq).where(
                    WebhookEvent.operator_id == operator_id,
                    WebhookEvent.event_id == event["id"]))
            return Verdict(200, "duplicate") if seen is not None else Verdict(500, "conflict")


def apply_unit(s: Session, commands: Commands, operator_id: str, unit: dict[str, Any], *,
               now: float, origin: str = "webhook") -> Verdict:
    """Record a unit as Stora shows it (a webhook's payload or a listed unit): its
    status and ``ver``, and the lockout or clear to send when the lockout changes.  A
    version not newer than the one recorded has no effect (``older``)."""
    unit_id, status = unit.get("id"), unit.get("status")
    site = unit.get("site")
    site_id = site.get("id") if isinstance(site, dict) else None
    ver = unit_ver(unit.get("updated_at"))
    if not (isinstance(unit_id, str) and 0 < len(unit_id) <= 64
            and isinstance(status, str) and isinstance(site_id, str)
            and 0 < len(site_id) <= 64 and ver is not None):
        return Verdict(200, "malformed_unit")
    lockout = status in LOCKOUT_STATUSES
    state = s.get(UnitState, (operator_id, unit_id), with_for_update=True)
    before = False
    if state is None:
        # The unit's first version.  Another replica may be recording another version of
        # it at this moment: the insert waits for that transaction and then does nothing,
        # and this version is judged against what it committed, as any later one is.
        dialect = postgresql if s.get_bind().dialect.name == "postgresql" else sqlite
        inserted = s.execute(dialect.insert(UnitState).values(
            operator_id=operator_id, unit_id=unit_id, site_id=site_id, status=status,
            ver=ver, lockout=lockout, confirmed_ver=None, updated_at=now)
            .on_conflict_do_nothing(index_elements=["operator_id", "unit_id"])
            .returning(UnitState.unit_id)).first()
        if inserted is None:
            state = s.get(UnitState, (operator_id, unit_id), with_for_update=True,
                          populate_existing=True)
    if state is not None:
        if state.ver >= ver:
            return Verdict(200, "older")
        before = state.lockout
        state.site_id, state.status, state.ver = site_id, status, ver
        state.lockout, state.updated_at = lockout, now
    if not lockout and not before:
        return Verdict(200, "no_change")
    registered = s.get(Site, site_id)
    if registered is None or registered.revoked_at is not None \
            or registered.operator_id != operator_id:
        return Verdict(200, "unregistered_site")
    cmd = Cmd.LOCKOUT if lockout else Cmd.CLEAR_LOCKOUT
    # An older lockout or clear of this unit still waiting is superseded.
    s.execute(update(Command).where(
        Command.operator_id == operator_id, Command.unit_id == unit_id,
        Command.cmd.in_((Cmd.LOCKOUT.value, Cmd.CLEAR_LOCKOUT.value)),
        Command.status == "pending").values(status="superseded", result_at=now))
    row = commands.new(s, operator_id=operator_id, site_id=site_id, unit_id=unit_id,
                       cmd=cmd, origin=origin, ver=ver)
    return Verdict(200, "command", row.jti)
