"""The JWS compact serialization (RFC 7515) as this protocol writes and reads it.

A command is::

    base64url(header JSON) "." base64url(claims JSON) "." base64url(64-byte signature)

with unpadded base64url (RFC 7515 §2), header ``{"alg": "EdDSA", "typ": "JWT", "kid":
<kid>}`` and an Ed25519 signature over the first two segments exactly as sent.  This
module holds the pieces both sides share: canonical base64url, the strict JSON reader,
the compact JSON writer, the signing primitive and the key helpers.  No I/O, no clock.

``cryptography`` is imported inside the functions that need it: it costs a Pi noticeable
start-up time, and a CLI command that never signs or verifies should not pay it.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from typing import TYPE_CHECKING, Any, Final, NoReturn

from sitelink.errors import ClaimError, show

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

__all__ = [
    "ALGORITHM",
    "COMPACT_JWS",
    "ED25519_SIGNATURE_CHARS",
    "FORBIDDEN_HEADERS",
    "MAX_DEPTH",
    "b64decode",
    "b64encode",
    "compact_json",
    "generate_keypair",
    "private_key_from_pem",
    "public_key_text",
    "sign_compact",
    "strict_json",
]

#: The one algorithm accepted and written (RFC 8037 Ed25519).
ALGORITHM: Final = "EdDSA"
#: Header parameters that would let the token pick its own key (jku, jwk, x5u, x5c) or
#: demand extensions we do not implement (crit, and b64 = RFC 7797 unencoded payloads).
FORBIDDEN_HEADERS: Final = ("crit", "jku", "jwk", "x5u", "x5c", "b64")
#: 64 signature bytes in unpadded base64url.
ED25519_SIGNATURE_CHARS: Final = 86
#: The whole token in one pass: only base64url characters, exactly two dots.  The header
#: must not be empty; payload and signature may be, and are judged by the later rules.
COMPACT_JWS: Final = re.compile(rb"([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]*)\.([A-Za-z0-9_-]*)")
#: Containers nested in a header or the claims (the claims object is level 1).  Real
#: commands use two or three; the limit only exists to make the outcome deterministic.
MAX_DEPTH: Final = 32


# ------------------------------------------------------------------------ base64url


def b64encode(data: bytes) -> bytes:
    """Unpadded base64url (RFC 7515 §2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def b64decode(segment: bytes) -> bytes | None:
    """Canonical unpadded base64url (the caller has checked the alphabet), else None.

    Non-canonical encodings (stray low bits in the last character) are refused, so one
    token has one spelling and a flipped bit can never be silently ignored.
    """
    if len(segment) % 4 == 1:
        return None
    try:
        raw = base64.urlsafe_b64decode(segment + b"=" * (-len(segment) % 4))
    except (binascii.Error, ValueError):
        return None
    if base64.urlsafe_b64encode(raw).rstrip(b"=") != segment:
        return None
    return raw


# ------------------------------------------------------------------------ JSON


def compact_json(value: Any) -> bytes:
    """The JSON a signer writes: compact and ASCII-only (the smallest token, and no
    encoding surprises for any consumer).  NaN is let through on purpose: a test signer
    signs claims "as given", and the verifier refuses it."""
    return json.dumps(value, separators=(",", ":")).encode("ascii")


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Duplicate keys are where two JSON parsers disagree (first wins or last wins); a
    # signed token must mean one thing, so they are refused outright.
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ClaimError(f"duplicate key {show(key)}")
            seen.add(key)
    return obj


def _no_constant(name: str) -> NoReturn:
    raise ClaimError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ClaimError(f"number {show(text)} is out of range")
    return value


def strict_json(data: bytes) -> Any:
    """Parse UTF-8 JSON refusing duplicate keys, NaN/Infinity, overflowing floats and
    nesting deeper than :data:`MAX_DEPTH`; raises :class:`~sitelink.errors.ClaimError`.
    """
    try:
        text = data.decode("utf-8")
        value = json.loads(text, object_pairs_hook=_unique_object, parse_constant=_no_constant,
                           parse_float=_finite_float)
    except ClaimError:
        raise
    except UnicodeDecodeError as exc:
        raise ClaimError(f"not UTF-8 (bad byte at offset {exc.start})") from None
    except RecursionError:
        raise ClaimError(f"JSON nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:  # JSONDecodeError, and int strings over 4300 digits
        raise ClaimError(f"not valid JSON ({type(exc).__name__})") from None
    if not _shallow(value):
        raise ClaimError(f"JSON nested deeper than {MAX_DEPTH} levels")
    return value


def _shallow(value: Any) -> bool:
    """True when no container in ``value`` sits deeper than :data:`MAX_DEPTH`.

    json only stops at the interpreter's recursion limit, which moves (hypothesis and
    other tools raise it); an explicit limit makes the outcome the same everywhere, and
    it is checked without recursion.
    """
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > MAX_DEPTH:
            return False
        stack.extend((child, depth + 1) for child in children)
    return True


# ------------------------------------------------------------------------ keys and signing


def sign_compact(private_key: Ed25519PrivateKey, header: bytes, payload: bytes) -> bytes:
    """A token over exactly these header and payload bytes (base64url-encoded here)."""
    signing_input = b64encode(header) + b"." + b64encode(payload)
    return signing_input + b"." + b64encode(private_key.sign(signing_input))


def public_key_text(private_key: Ed25519PrivateKey) -> str:
    """The public half of ``private_key`` as base64url of its raw 32 bytes, no padding:
    the form of ``[commands] trusted_keys``."""
    from cryptography.hazmat.primitives import serialization

    raw = private_key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return b64encode(raw).decode("ascii")


def generate_keypair() -> tuple[Ed25519PrivateKey, str]:
    """A new Ed25519 key and its public key text for ``commands.trusted_keys``."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    return key, public_key_text(key)


def private_key_from_pem(data: bytes) -> Ed25519PrivateKey:
    """The Ed25519 private key in unencrypted PEM (PKCS#8) ``data``.

    Raises ``ValueError`` naming only the kind of problem (never the key material):
    ``not an unencrypted PEM private key (…)`` or ``the key is …, not Ed25519``.
    """
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        # The message of cryptography may quote the file; name only the exception type.
        raise ValueError(f"not an unencrypted PEM private key ({type(exc).__name__})") from exc
    if isinstance(key, Ed25519PrivateKey):
        return key
    # The bytes hold another kind of key: bad data, not a wrong argument type.
    raise ValueError(f"the key is {type(key).__name__}, not Ed25519")
