"""Mint signed commands (contract §5) for the tests, the demo and, later, the relay.

A command is a JWS compact serialization signed with Ed25519 (``alg`` ``EdDSA``)::

    base64url(header JSON) "." base64url(claims JSON) "." base64url(64-byte signature)

with unpadded base64url (RFC 7515 §2) and the default header
``{"alg": "EdDSA", "typ": "JWT", "kid": <kid>}``.  The token is assembled here rather
than by ``jwt.encode`` because the tests need to sign exactly what they are given (a
lying ``alg`` header, claims of the wrong type, duplicate keys, raw bytes), which
PyJWT's encoder rightly refuses or rewrites; ``tests/test_commands.py`` checks that
tokens made by ``jwt.encode`` verify the same way, so the format is the standard one.

The public key goes into ``[commands] trusted_keys`` as base64url of its raw 32 bytes
(:func:`public_key_text`), or as PEM.
"""

from __future__ import annotations

import base64
import json
import math
import stat
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from gateway.errors import ConfigError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

__all__ = [
    "CommandSigner",
    "generate_keypair",
    "load_private_key",
    "public_key_text",
]

_MAX_KEY_FILE_BYTES: Final = 64 * 1024  # a PEM key is a few hundred bytes


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def _json(value: Any) -> bytes:
    # Compact and ASCII-only: the smallest token, and no encoding surprises for any
    # consumer.  NaN is let through on purpose (sign() signs claims "as given").
    return json.dumps(value, separators=(",", ":")).encode("ascii")


def public_key_text(private_key: Ed25519PrivateKey) -> str:
    """The public half of ``private_key`` as base64url of its raw 32 bytes, no padding."""
    from cryptography.hazmat.primitives import serialization

    raw = private_key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return _b64(raw).decode("ascii")


def generate_keypair() -> tuple[Ed25519PrivateKey, str]:
    """A new Ed25519 key and its public key text for ``commands.trusted_keys``."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    return key, public_key_text(key)


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """The Ed25519 private key in the unencrypted PEM (PKCS#8) file at ``path``.

    Like every secret file of the gateway (contract §3) the file must be a regular file
    that group and others cannot access.  Raises :class:`~gateway.errors.ConfigError`
    naming the file for every problem: a person has to fix the file.
    """
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    file = str(path)
    try:
        st = Path(path).stat()
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(file, "", "the private key is not a regular file")
        if st.st_mode & 0o077:
            mode = stat.S_IMODE(st.st_mode)
            raise ConfigError(file, "", f"private key file has mode {mode:04o} and is open to "
                                        f"group or others; run: chmod 600 {file}")
        with open(path, "rb") as fp:
            data = fp.read(_MAX_KEY_FILE_BYTES + 1)
    except FileNotFoundError as exc:
        raise ConfigError(file, "", "private key file does not exist") from exc
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        raise ConfigError(file, "", f"cannot read the private key file: {exc}") from exc
    if len(data) > _MAX_KEY_FILE_BYTES:
        raise ConfigError(file, "", "file is too large to be a PEM private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        # The message of cryptography may quote the file; name only the exception type.
        raise ConfigError(file, "", "not an unencrypted PEM private key "
                                    f"({type(exc).__name__})") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(file, "", f"the key is {type(key).__name__}, not Ed25519")
    return key


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
        signing_input = _b64(header) + b"." + _b64(payload)
        return signing_input + b"." + _b64(self._key.sign(signing_input))

    def sign(self, claims: Mapping[str, Any], *, headers: Mapping[str, Any] | None = None) -> bytes:
        """A token over ``claims`` exactly as given (nothing added or checked).

        ``headers`` are merged over the default header; a header given as ``None`` is
        left out (``headers={"kid": None}`` makes a token without ``kid``).
        """
        header: dict[str, Any] = {"alg": "EdDSA", "typ": "JWT", "kid": self.kid}
        for name, value in (headers or {}).items():
            if value is None:
                header.pop(name, None)
            else:
                header[name] = value
        return self.sign_raw(_json(header), _json(dict(claims)))

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
