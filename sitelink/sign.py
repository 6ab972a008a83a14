"""Mint signed commands (contract §5): the relay's side, and the tests' and dev kit's.

The token is assembled here (:func:`sitelink.jws.sign_compact`) rather than by
``jwt.encode`` because tests need to sign exactly what they are given (a lying ``alg``
header, claims of the wrong type, duplicate keys, raw bytes), which PyJWT's encoder
rightly refuses or rewrites; ``tests/sitelink/test_verifier.py`` checks that tokens made
by ``jwt.encode`` verify the same way, so the format is the standard one.  Ed25519 is
deterministic, so the same key, header and claims always give the same token
(``sitelink/vectors/commands.json`` holds some, for a signer written elsewhere).

The public key goes into ``[commands] trusted_keys`` as base64url of its raw 32 bytes
(:func:`~sitelink.jws.public_key_text`), or as PEM.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from sitelink.claims import Claims
from sitelink.jws import ALGORITHM, compact_json, sign_compact

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

__all__ = ["CommandSigner"]


class CommandSigner:
    """Signs commands for one site with one key.

    ``clock`` gives wall-clock seconds and only sets the default ``iat``; tests pass a
    clock offset from the gateway's to model signer skew (fault matrix #41).
    """

    def __init__(
        self,
        private_key: Ed25519PrivateKey,
        kid: str,
        site_id: str,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        if not isinstance(private_key, Ed25519PrivateKey):
            raise TypeError(f"an Ed25519 private key is needed, not {type(private_key).__name__}")
        if not kid:
            raise ValueError("kid must not be empty")
        self._key = private_key
        self._clock = clock
        self.kid = kid
        self.site_id = site_id

    def sign_raw(self, header: bytes, payload: bytes) -> bytes:
        """A token over exactly these header and payload bytes (base64url-encoded here).

        For tests that need bytes no JSON encoder writes: duplicate keys, invalid UTF-8.
        """
        return sign_compact(self._key, header, payload)

    def sign(self, claims: Mapping[str, Any] | Claims, *,
             headers: Mapping[str, Any] | None = None) -> bytes:
        """A token over ``claims`` exactly as given (nothing added or checked; a
        :class:`~sitelink.claims.Claims` is written by its ``as_dict``).

        ``headers`` are merged over the default header; a header given as ``None`` is
        left out (``headers={"kid": None}`` makes a token without ``kid``).
        """
        header: dict[str, Any] = {"alg": ALGORITHM, "typ": "JWT", "kid": self.kid}
        for name, value in (headers or {}).items():
            if value is None:
                header.pop(name, None)
            else:
                header[name] = value
        body = claims.as_dict() if isinstance(claims, Claims) else dict(claims)
        return self.sign_raw(compact_json(header), compact_json(body))

    def command(
        self,
        cmd: str,
        unit: str | None = None,
        *,
        jti: str | None = None,
        ttl: int = 60,
        iat: int | None = None,
        **claims: Any,
    ) -> tuple[str, bytes]:
        """``(jti, token)`` for one command: ``aud`` is the site, ``exp`` = ``iat + ttl``.

        ``jti`` defaults to a random UUID (hex), ``iat`` to the clock rounded down.  Extra
        ``claims`` are added (``dur=5``, ``ver=3``, ``override=True, reason="…"``) or
        replace the defaults (``aud="other"``, ``exp=…``); one given as ``None`` is left
        out, so ``dur=None`` means the lock's default and tests can drop a required claim.
        """
        jti = uuid.uuid4().hex if jti is None else jti
        issued = math.floor(self._clock()) if iat is None else iat
        body: dict[str, Any] = {"jti": jti, "aud": self.site_id, "iat": issued,
                                "exp": issued + ttl, "cmd": cmd}
        if unit is not None:
            body["unit"] = unit
        for name, value in claims.items():
            if value is None:
                body.pop(name, None)
            else:
                body[name] = value
        return jti, self.sign(body)
