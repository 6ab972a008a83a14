"""The command signing keys (contract §7.1 ``keys list`` / ``keys rotate``).

Ed25519 keys, stored encrypted at rest (:class:`relay.crypto.Keyring`).  The newest key
not retired signs; older ones stay listed so gateways keep trusting them until an
operator retires them (``keys retire KID``), which is how a key rotates without a
command in flight failing: rotate, update every gateway's ``trusted_keys``, then retire.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import select
from sqlalchemy.orm import Session

from relay.crypto import Keyring
from relay.db.engine import Database
from relay.db.models import SigningKey
from relay.errors import RelayError
from sitelink.jws import public_key_text

__all__ = ["KeyInfo", "SigningKeys", "signing_key_aad", "trusted_keys_line"]

_AAD = b"stora-relay signing key "


def signing_key_aad(kid: str) -> bytes:
    """What a signing key's encrypted private half is bound to."""
    return _AAD + kid.encode()


@dataclass(frozen=True)
class KeyInfo:
    """A signing key as ``keys list`` shows it (never the private half)."""

    kid: str
    public_key: str
    created_at: float
    retired_at: float | None


def trusted_keys_line(keys: list[KeyInfo]) -> str:
    """The gateway's ``[commands] trusted_keys`` line for the keys not retired."""
    live = [k for k in keys if k.retired_at is None]
    inner = ", ".join(f'{k.kid} = "{k.public_key}"' for k in live)
    return f"trusted_keys = {{ {inner} }}"


class SigningKeys:
    """The signing keys in the database."""

    def __init__(self, db: Database, keyring: Keyring, *,
                 clock: Callable[[], float] = time.time) -> None:
        self._db = db
        self._keyring = keyring
        self._clock = clock

    def list(self) -> list[KeyInfo]:
        """Every key, oldest first."""
        with self._db.session() as s:
            rows = s.scalars(select(SigningKey).order_by(SigningKey.created_at)).all()
            return [KeyInfo(r.kid, r.public_key, r.created_at, r.retired_at) for r in rows]

    def _new_row(self) -> SigningKey:
        key = Ed25519PrivateKey.generate()
        now = self._clock()
        kid = "relay-" + time.strftime("%Y%m%d", time.gmtime(now)) + "-" + secrets.token_hex(3)
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        enc = self._keyring.encrypt(pem, aad=signing_key_aad(kid))
        return SigningKey(kid=kid, private_key_enc=enc, public_key=public_key_text(key),
                          created_at=now, retired_at=None)

    def rotate(self) -> KeyInfo:
        """Add a key that signs from now on; the others stay published."""
        row = self._new_row()
        with self._db.session() as s:
            s.add(row)
        return KeyInfo(row.kid, row.public_key, row.created_at, None)

    def retire(self, kid: str) -> KeyInfo:
        """Stop publishing ``kid`` (gateways should drop it); the current key cannot go."""
        with self._db.session() as s:
            row = s.get(SigningKey, kid)
            if row is None:
                raise RelayError(f"no signing key {kid!r}")
            live = s.scalars(select(SigningKey).where(SigningKey.retired_at.is_(None))
                             .order_by(SigningKey.created_at)).all()
            if live and live[-1].kid == kid:
                raise RelayError(f"{kid} is the key that signs now: rotate first")
            if row.retired_at is None:
                row.retired_at = self._clock()
            return KeyInfo(row.kid, row.public_key, row.created_at, row.retired_at)

    def current(self, session: Session | None = None) -> tuple[str, Ed25519PrivateKey]:
        """The key that signs now: ``(kid, private key)``; made on first use.

        Inside a transaction pass its ``session``: a second one would wait for the first's
        write lock on SQLite.
        """
        if session is None:
            with self._db.session() as s:
                return self.current(s)
        row = session.scalars(select(SigningKey).where(SigningKey.retired_at.is_(None))
                              .order_by(SigningKey.created_at.desc()).limit(1)).first()
        if row is None:
            row = self._new_row()
            session.add(row)
        pem = self._keyring.decrypt(row.private_key_enc, aad=signing_key_aad(row.kid))
        key = serialization.load_pem_private_key(pem, password=None)
        if not isinstance(key, Ed25519PrivateKey):  # pragma: no cover (we wrote it)
            raise RelayError(f"signing key {row.kid} is not Ed25519")
        return row.kid, key
