"""Re-encrypting what is stored after the data key rotates (``stora-relay db reencrypt``).

The data key file lists the current key first and older ones after it
(:class:`relay.crypto.Keyring`): new values are encrypted under the first, old ones still
decrypt under theirs.  Before an old key's line can go, every value under it is
decrypted and encrypted again under the current key, each bound to the same row and
column as before.  Session cookies are not stored: one made under a removed key simply
no longer opens the operator's page, which asks to connect again.
"""

from __future__ import annotations

from collections import Counter

from sqlalchemy import select

from relay.connect import verifier_aad
from relay.crypto import Keyring
from relay.db.engine import Database
from relay.db.models import OAuthState, Operator, SigningKey
from relay.keys import signing_key_aad
from relay.operators import token_aad

__all__ = ["reencrypt", "still_under_old_keys"]

#: The encrypted columns of ``operators`` and the name their values are bound to.
_OPERATOR_COLUMNS = (("access_token_enc", "access_token"),
                     ("refresh_token_enc", "refresh_token"),
                     ("webhook_secret_enc", "webhook_secret"))


def _again(keyring: Keyring, value: str | None, aad: bytes, counts: Counter[str],
           what: str) -> str | None:
    if value is None or not keyring.needs_rotation(value):
        return value
    counts[what] += 1
    return keyring.encrypt(keyring.decrypt(value, aad=aad), aad=aad)


def reencrypt(db: Database, keyring: Keyring) -> Counter[str]:
    """Encrypt every stored value under the current key; how many of each kind moved.

    One transaction: a value that does not decrypt (a key missing from the file) stops
    it with a :class:`~relay.crypto.DecryptError` naming the key id, and nothing changes.
    """
    counts: Counter[str] = Counter()
    with db.session() as s:
        for op in s.scalars(select(Operator)).all():
            for column, name in _OPERATOR_COLUMNS:
                setattr(op, column, _again(keyring, getattr(op, column),
                                           token_aad(op.id, name), counts, name))
        for key in s.scalars(select(SigningKey)).all():
            key.private_key_enc = _again(keyring, key.private_key_enc,
                                         signing_key_aad(key.kid), counts,
                                         "signing_key") or key.private_key_enc
        for state in s.scalars(select(OAuthState)).all():
            state.verifier_enc = _again(keyring, state.verifier_enc,
                                        verifier_aad(state.digest), counts,
                                        "oauth_state") or state.verifier_enc
    return counts


def still_under_old_keys(db: Database, keyring: Keyring) -> int:
    """How many stored values an old key still protects (0: its line may go)."""
    with db.read() as s:
        values = [v for op in s.scalars(select(Operator)).all()
                  for v in (op.access_token_enc, op.refresh_token_enc, op.webhook_secret_enc)]
        values += list(s.scalars(select(SigningKey.private_key_enc)).all())
        values += list(s.scalars(select(OAuthState.verifier_enc)).all())
    return sum(1 for v in values if v is not None and keyring.needs_rotation(v))
