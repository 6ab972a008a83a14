"""The signer (sitelink/sign.py, sitelink/jws.py) and the verifier's ``screen()`` and
claims-first checks (sitelink/verify.py).

The guarantee under test: nothing reaches the hardware unless it is a fresh, well-formed
command for this site, signed by a trusted Ed25519 key, for a configured unit; and every
refusal carries the one contract §4 reason the module docstring's order gives it
(fault matrix #9–#15, #41).  Pure protocol: no gateway configuration, no broker, no pty.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sitelink.claims import MAX_COMMAND_BYTES
from sitelink.codes import COMMANDS
from sitelink.errors import Rejection
from sitelink.jws import generate_keypair, private_key_from_pem, public_key_text
from sitelink.sign import CommandSigner
from tests.support.sitelink_verifier import (
    FORGER,
    KEY_A,
    LIFETIME,
    NOW,
    PUBLIC_A,
    SIGNER_A,
    SITE,
    UNITS,
    VERIFIER,
    base_claims,
    make_verifier,
    raw_public,
    reject,
    split,
    unb64,
)

# --------------------------------------------------------------------------- signer


def test_generate_keypair_gives_the_config_form_of_the_public_key() -> None:
    key, public = generate_keypair()
    assert "=" not in public
    assert unb64(public.encode()) == raw_public(key)
    assert public_key_text(key) == public
    signer = CommandSigner(key, "fresh", SITE, clock=lambda: NOW)
    verifier = make_verifier(keys={"fresh": unb64(public.encode())})
    _, token = signer.command("lock", "unit_abc")
    assert verifier.verify(token, retained=False).kid == "fresh"


def test_private_key_from_pem_round_trip_and_refusals() -> None:
    pem = KEY_A.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption())
    assert raw_public(private_key_from_pem(pem)) == PUBLIC_A
    ec_pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    for data, message in ((b"hello", "not an unencrypted PEM private key"),
                          (ec_pem, "not Ed25519")):
        with pytest.raises(ValueError, match=message) as info:
            private_key_from_pem(data)
        assert b"PRIVATE" not in str(info.value).encode()  # never the key material


def test_signer_command_defaults_and_omissions() -> None:
    signer = CommandSigner(KEY_A, "relay-a", SITE, clock=lambda: NOW + 0.999)
    jti, token = signer.command("unlock", "unit_abc", dur=None, ttl=30, aud=None)
    claims = json.loads(unb64(split(token)[1]))
    assert claims == {"jti": jti, "iat": NOW, "exp": NOW + 30, "cmd": "unlock",
                      "unit": "unit_abc"}
    header = json.loads(unb64(split(signer.sign({}, headers={"kid": None, "x": 1}))[0]))
    assert header == {"alg": "EdDSA", "typ": "JWT", "x": 1}
    assert signer.command("lock", "unit_abc")[0] != signer.command("lock", "unit_abc")[0]


def test_signer_refuses_a_wrong_key_or_empty_kid() -> None:
    with pytest.raises(TypeError):
        CommandSigner(ec.generate_private_key(ec.SECP256R1()), "k", SITE)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="kid"):
        CommandSigner(KEY_A, "", SITE)


def test_nan_in_claims_is_signed_as_given_and_refused() -> None:
    token = SIGNER_A.sign(base_claims(dur=math.nan))
    assert b"NaN" in unb64(split(token)[1])
    assert reject(VERIFIER, token).reason == "malformed"


# --------------------------------------------------------------------------- screen()


def test_screen_passes_what_verify_accepts_and_forged_fresh_tokens() -> None:
    for signer in (SIGNER_A, FORGER):
        _, token = signer.command("unlock", "unit_abc", dur=5)
        assert VERIFIER.screen(token, retained=False) is None
    _, token = SIGNER_A.command("lockout", "unit_def", ver=7)
    VERIFIER.verify(token, retained=False)
    assert VERIFIER.screen(token, retained=False) is None


@pytest.mark.parametrize(("claims", "reason"), [
    ({"iat": NOW - 1000, "exp": NOW - 900}, "expired"),
    ({"aud": "site_elsewhere"}, "wrong_site"),
    ({"unit": "unit_nowhere"}, "unknown_unit"),
    ({"iat": NOW, "exp": NOW + LIFETIME + 1}, "lifetime_too_long"),
    ({"iat": NOW + 600, "exp": NOW + 660}, "not_yet_valid"),
    ({"dur": "five"}, "malformed"),
])
def test_screen_judges_the_claims_without_checking_the_signature(
    claims: dict[str, Any], reason: str
) -> None:
    # A forged token: verify() must say bad_signature whatever the claims, while
    # screen() refuses it on the claims alone and never calls it verified.
    token = FORGER.sign(base_claims(**claims))
    assert reject(VERIFIER, token).reason == "bad_signature"
    screened = VERIFIER.screen(token, retained=False)
    assert screened is not None
    assert (screened.reason, screened.claims_verified) == (reason, False)
    # The same claims honestly signed get the same reason from verify().
    assert reject(VERIFIER, SIGNER_A.sign(base_claims(**claims))).reason == reason


def test_screen_refuses_what_fails_before_the_signature() -> None:
    assert VERIFIER.screen(b"x" * (MAX_COMMAND_BYTES + 1), retained=False) is not None
    assert VERIFIER.screen(b"not a token", retained=False) is not None
    _, token = SIGNER_A.command("lock", "unit_abc")
    screened = VERIFIER.screen(token, retained=True)
    assert screened is not None
    assert screened.reason == "retained"
    truncated = token[:-3]
    screened = VERIFIER.screen(truncated, retained=False)
    assert screened is not None
    assert screened.reason == "bad_signature"


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(cmd=st.sampled_from(sorted(COMMANDS)), unit=st.sampled_from((*UNITS, "unit_x")),
       iat_offset=st.integers(-700, 700), ttl=st.integers(0, 400),
       aud=st.sampled_from([SITE, "site_other"]), ver=st.integers(0, 5))
def test_screen_never_refuses_what_verify_accepts(
    cmd: str, unit: str, iat_offset: int, ttl: int, aud: str, ver: int
) -> None:
    extra: dict[str, Any] = {"ver": ver} if cmd in ("lockout", "clear_lockout") else {}
    _, token = SIGNER_A.command(cmd, unit, iat=NOW + iat_offset, ttl=ttl, aud=aud, **extra)
    try:
        VERIFIER.verify(token, retained=False)
    except Rejection as rejection:
        verdict: str | None = rejection.reason
    else:
        verdict = None
    screened = VERIFIER.screen(token, retained=False)
    # Honestly signed: the claims decide, so both give the same reason (or none).
    assert (screened.reason if screened is not None else None) == verdict
    try:
        VERIFIER.verify_claims_first(token, retained=False)
    except Rejection as rejection:
        first: tuple[str, bool] | None = (rejection.reason, rejection.screened)
    else:
        first = None
    assert first == (None if verdict is None else (verdict, True))


def test_claims_first_refuses_a_forgery_by_its_claims_or_else_by_its_signature() -> None:
    stale = FORGER.sign(base_claims(iat=NOW - 1000, exp=NOW - 900))
    with pytest.raises(Rejection) as info:
        VERIFIER.verify_claims_first(stale, retained=False)
    assert (info.value.reason, info.value.screened, info.value.claims_verified) == (
        "expired", True, False)
    _, fresh = FORGER.command("unlock", "unit_abc")
    with pytest.raises(Rejection) as info:
        VERIFIER.verify_claims_first(fresh, retained=False)
    assert (info.value.reason, info.value.screened) == ("bad_signature", False)
    _, good = SIGNER_A.command("unlock", "unit_abc", dur=5)
    assert VERIFIER.verify_claims_first(good, retained=False) == VERIFIER.verify(
        good, retained=False)
    assert reject(VERIFIER, stale).screened is False  # verify() never screens
