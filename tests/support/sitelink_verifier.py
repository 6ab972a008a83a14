"""What the command verifier tests share (tests/sitelink/test_sitelink_verifier_*.py): the
site, the keys, a fake clock, verifiers and signers, and small token helpers.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import strategies as st

from sitelink.claims import Kind
from sitelink.codes import COMMANDS, MGMT_COMMANDS
from sitelink.errors import Rejection
from sitelink.sign import CommandSigner
from sitelink.verify import TrustedClockLike, Verifier

SITE = "site_123"

NOW = 1_767_225_600  # 2026-01-01T00:00:00Z: a fixed "now" so nothing waits on wall time

SKEW = 30

LIFETIME = 300

UNITS = ("unit_abc", "unit_def")

KEY_A = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))

KEY_B = Ed25519PrivateKey.from_private_bytes(bytes(range(32, 64)))

KEY_STRANGER = Ed25519PrivateKey.from_private_bytes(bytes(range(64, 96)))


def raw_public(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw,
                                         serialization.PublicFormat.Raw)


PUBLIC_A = raw_public(KEY_A)

TRUSTED = {"relay-a": PUBLIC_A, "relay-b": raw_public(KEY_B)}


class FakeClock:
    """A TrustedClockLike whose time and trust the test sets."""

    def __init__(self, now: float = NOW, *, trusted: bool = True, why: str = "") -> None:
        self.t = now
        self.ok = trusted
        self.why = why

    def now(self) -> float:
        return self.t

    def trusted(self) -> tuple[bool, str]:
        return self.ok, self.why


def make_verifier(clock: TrustedClockLike | None = None, *, skew: int = SKEW,
                  lifetime: int = LIFETIME, keys: Mapping[str, bytes] | None = None,
                  kind: Kind = "cmd") -> Verifier:
    """A verifier of SITE: the settings a gateway takes from its config."""
    return Verifier(site_id=SITE, trusted_keys=dict(keys or TRUSTED), clock=clock or CLOCK,
                    clock_skew_s=skew, max_lifetime_s=lifetime, units=UNITS, kind=kind)


CLOCK = FakeClock()

VERIFIER = make_verifier()

MGMT = make_verifier(kind="mgmt")

UNTRUSTED = make_verifier(FakeClock(trusted=False, why="not synchronized"))

SIGNER_A = CommandSigner(KEY_A, "relay-a", SITE, clock=lambda: NOW)

SIGNER_B = CommandSigner(KEY_B, "relay-b", SITE, clock=lambda: NOW)


# A key nobody trusts, under a kid that is trusted: a forger who knows the kid.
FORGER = CommandSigner(KEY_STRANGER, "relay-a", SITE, clock=lambda: NOW)


def unb64(segment: bytes) -> bytes:
    return base64.urlsafe_b64decode(segment + b"=" * (-len(segment) % 4))


def base_claims(cmd: str = "unlock", unit: str | None = "unit_abc", **extra: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {"jti": "j-1", "aud": SITE, "iat": NOW, "exp": NOW + 60, "cmd": cmd}
    if unit is not None:
        claims["unit"] = unit
    if cmd in ("lockout", "clear_lockout"):
        claims["ver"] = 1
    claims.update(extra)
    return claims


def reject(verifier: Verifier, token: bytes, *, retained: bool = False) -> Rejection:
    with pytest.raises(Rejection) as info:
        verifier.verify(token, retained=retained)
    return info.value


short_text = st.text(max_size=24)


printable_id = st.text(
    alphabet=st.characters(codec="utf-8", categories=["L", "N", "P", "S"]),
    min_size=1, max_size=40)


@st.composite
def valid_claims(draw: st.DrawFn, *, kind: str = "cmd") -> dict[str, Any]:
    """Claims the verifier accepts at NOW (with any signer offset inside the skew)."""
    if kind == "mgmt":
        cmd = draw(st.sampled_from(sorted(MGMT_COMMANDS)))
    else:
        cmd = draw(st.sampled_from(sorted(COMMANDS)))
    iat = NOW + draw(st.integers(-SKEW, SKEW))
    ttl = draw(st.integers(max(0, NOW - iat - SKEW + 1), LIFETIME))
    claims: dict[str, Any] = {"jti": draw(printable_id), "aud": SITE, "iat": iat,
                              "exp": iat + ttl, "cmd": cmd}
    if kind == "cmd":
        claims["unit"] = draw(st.sampled_from(UNITS))
    if cmd == "unlock":
        if draw(st.booleans()):
            claims["dur"] = draw(st.integers(1, 3600))
        if draw(st.booleans()):
            claims["override"] = True
            claims["reason"] = draw(printable_id)
    if cmd in ("lockout", "clear_lockout"):
        claims["ver"] = draw(st.integers(0, 2**63 - 1))
    if draw(st.booleans()):
        claims["contact"] = draw(printable_id)
    if draw(st.booleans()):
        claims["actor"] = draw(printable_id)
    return claims


def split(token: bytes) -> tuple[bytes, bytes, bytes]:
    header, payload, signature = token.split(b".")
    return header, payload, signature
