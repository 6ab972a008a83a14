"""Keys of the unlock API (contract §7.1 ``api-keys``, §7.2): per operator, hashed.

Role ``staff`` may open any unit of its operator; role ``app`` acts for a tenant under
the access rules of contract §7.6, which a later issue builds: until then creating an
``app`` key is refused with that explanation rather than issuing a key that opens
whatever it is asked.  Role ``admin`` belongs to no operator: it opens the partner's
staff pages (``/staff``: every operator's live view), never a door.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import select

from relay.crypto import digest_secret, new_credential, parse_credential, same_digest
from relay.db.engine import Database
from relay.db.models import ApiKey, Operator
from relay.errors import RelayError

__all__ = ["ADMIN", "KEY_PREFIX", "ROLES", "ApiKeyInfo", "ApiKeys"]

#: API keys read ``srk_<id>.<secret>``.
KEY_PREFIX = "srk"
ROLES = ("app", "staff", "admin")
#: The role that belongs to no operator (the staff pages).
ADMIN = "admin"
MAX_NAME = 200


@dataclass(frozen=True)
class ApiKeyInfo:
    """An API key as ``api-keys list`` shows it (never the secret)."""

    id: str
    operator_id: str | None
    name: str
    role: str
    created_at: float
    revoked_at: float | None


def _info(row: ApiKey) -> ApiKeyInfo:
    return ApiKeyInfo(row.id, row.operator_id, row.name, row.role, row.created_at,
                      row.revoked_at)


class ApiKeys:
    """The unlock API's keys in the database."""

    def __init__(self, db: Database, *, clock: Callable[[], float] = time.time) -> None:
        self._db = db
        self._clock = clock

    def create(self, operator_id: str | None, name: str,
               role: str = "app") -> tuple[ApiKeyInfo, str]:
        """A new key; returns it and its text (shown once, stored as a digest).  An
        ``admin`` key has no operator; every other key has one."""
        if role not in ROLES:
            raise RelayError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
        if (role == ADMIN) != (operator_id is None):
            raise RelayError("an admin key belongs to no operator (leave out --operator)"
                             if role == ADMIN else f"a {role} key needs --operator")
        if role == "app":
            raise RelayError(
                "role app is not available yet: app keys act for tenants and need the "
                "access rules of contract §7.6 (who may open which door, when), which this "
                "release does not enforce; create a staff key (--role staff) for staff tools")
        name = name.strip()
        if not name or len(name) > MAX_NAME or not name.isprintable():
            raise RelayError(f"--name must be 1 to {MAX_NAME} printable characters")
        credential = new_credential(KEY_PREFIX)
        with self._db.session() as s:
            if operator_id is not None and s.get(Operator, operator_id) is None:
                raise RelayError(f"no operator {operator_id!r} (see `stora-relay operators "
                                 "list`)")
            row = ApiKey(id=credential.public_id, operator_id=operator_id, name=name,
                         role=role, digest=credential.digest, created_at=self._clock(),
                         revoked_at=None)
            s.add(row)
            s.flush()
            return _info(row), credential.text

    def list(self, operator_id: str | None = None) -> list[ApiKeyInfo]:
        """Every key (of one operator), oldest first."""
        query = select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)
        if operator_id is not None:
            query = query.where(ApiKey.operator_id == operator_id)
        with self._db.session() as s:
            return [_info(r) for r in s.scalars(query).all()]

    def revoke(self, key_id: str) -> ApiKeyInfo:
        """Refuse a key from now on."""
        with self._db.session() as s:
            row = s.get(ApiKey, key_id)
            if row is None:
                raise RelayError(f"no API key {key_id!r}")
            if row.revoked_at is None:
                row.revoked_at = self._clock()
            return _info(row)

    def is_live_admin(self, key_id: str) -> bool:
        """Whether ``key_id`` is an unrevoked admin key (a staff session's check)."""
        with self._db.read() as s:
            row = s.get(ApiKey, key_id[:32])
            return row is not None and row.role == ADMIN and row.revoked_at is None

    def authenticate(self, text: str) -> ApiKeyInfo | None:
        """The live key ``text`` is, or ``None`` (constant-time compare)."""
        parsed = parse_credential(text, KEY_PREFIX)
        if parsed is None:
            return None
        public_id, whole = parsed
        with self._db.read() as s:
            row = s.get(ApiKey, public_id)
            if row is None or row.revoked_at is not None:
                return None
            if not same_digest(digest_secret(whole), row.digest):
                return None
            return _info(row)
