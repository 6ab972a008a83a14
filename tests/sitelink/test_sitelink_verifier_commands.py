"""The command verifier (sitelink/verify.py): valid commands and rejections.

The guarantee under test: nothing reaches the hardware unless it is a fresh, well-formed
command for this site, signed by a trusted Ed25519 key, for a configured unit; and every
refusal carries the one contract §4 reason the module docstring's order gives it
(fault matrix #9–#15, #41).  Pure protocol: no gateway configuration, no broker, no pty.

The gateway's adapter (building the verifier from ``Config``, its ``Rejection`` in the
gateway's error tree, reading key files) is tested in
tests/gateway/intake/test_commands.py; the frozen golden vectors in
tests/sitelink/test_golden_vectors.py.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import FrozenInstanceError
from typing import Any

import jwt
import pytest

from sitelink.claims import MAX_COMMAND_BYTES, Command
from sitelink.codes import MGMT_COMMANDS
from sitelink.errors import Rejection, SitelinkError
from sitelink.sign import CommandSigner
from sitelink.verify import TrustedClockLike
from tests.support.sitelink_verifier import (
    FORGER,
    KEY_A,
    KEY_B,
    MGMT,
    NOW,
    SIGNER_A,
    SIGNER_B,
    SITE,
    UNTRUSTED,
    VERIFIER,
    FakeClock,
    base_claims,
    make_verifier,
    raw_public,
    reject,
    split,
    unb64,
)

# --------------------------------------------------------------------------- valid commands


def test_fake_clock_is_a_trusted_clock() -> None:
    clock: TrustedClockLike = FakeClock()
    assert clock.trusted() == (True, "")
    assert clock.now() == NOW


def test_unlock_with_default_duration() -> None:
    jti, token = SIGNER_A.command("unlock", "unit_abc", jti="c-1")
    assert VERIFIER.verify(token, retained=False) == Command(
        jti="c-1", cmd="unlock", unit="unit_abc", kid="relay-a", iat=NOW, exp=NOW + 60)
    assert jti == "c-1"


def test_unlock_with_duration_contact_and_actor() -> None:
    _, token = SIGNER_A.command("unlock", "unit_def", jti="c-2", dur=3600, contact="cont_1",
                                actor="tenant app")
    command = VERIFIER.verify(token, retained=False)
    assert (command.dur, command.contact, command.actor) == (3600, "cont_1", "tenant app")
    assert (command.override, command.reason, command.ver) == (False, None, None)


def test_unlock_override_with_reason() -> None:
    _, token = SIGNER_A.command("unlock", "unit_abc", override=True, reason="tenant locked in")
    command = VERIFIER.verify(token, retained=False)
    assert command.override is True
    assert command.reason == "tenant locked in"


@pytest.mark.parametrize("cmd", ["lockout", "clear_lockout"])
@pytest.mark.parametrize("ver", [0, 7, 2**63 - 1])
def test_versioned_commands(cmd: str, ver: int) -> None:
    _, token = SIGNER_B.command(cmd, "unit_abc", ver=ver, actor="operator dashboard")
    command = VERIFIER.verify(token, retained=False)
    assert (command.cmd, command.ver, command.kid, command.dur) == (cmd, ver, "relay-b", None)


def test_lock() -> None:
    jti, token = SIGNER_A.command("lock", "unit_abc")
    command = VERIFIER.verify(token, retained=False)
    assert (command.jti, command.cmd, command.unit) == (jti, "lock", "unit_abc")
    assert len(jti) == 32  # uuid4 hex by default


def test_mgmt_request_with_args_is_read_only() -> None:
    _, token = SIGNER_A.command("config.set", jti="m-1",
                                args={"key": "log", "value": {"level": "debug", "to": [1, 2]}})
    command = MGMT.verify(token, retained=False)
    assert (command.cmd, command.unit) == ("config.set", None)
    assert command.args["value"]["level"] == "debug"
    assert command.args["value"]["to"] == (1, 2)
    with pytest.raises(TypeError):
        command.args["key"] = "x"  # type: ignore[index]
    with pytest.raises(TypeError):
        command.args["value"]["level"] = "x"
    # As documented: serializable with default=dict.
    assert json.loads(json.dumps(command.args, default=dict)) == {
        "key": "log", "value": {"level": "debug", "to": [1, 2]}}
    hash(command)  # args is left out of the hash, so a Command stays hashable


def test_mgmt_request_naming_a_unit_is_not_looked_up() -> None:
    _, token = SIGNER_A.command("locks.test", "unit_elsewhere")
    command = MGMT.verify(token, retained=False)
    assert (command.unit, dict(command.args)) == ("unit_elsewhere", {})


@pytest.mark.parametrize("cmd", sorted(MGMT_COMMANDS))
def test_every_mgmt_command(cmd: str) -> None:
    _, token = SIGNER_A.command(cmd)
    assert MGMT.verify(token, retained=False).cmd == cmd


def test_command_is_frozen() -> None:
    _, token = SIGNER_A.command("lock", "unit_abc")
    command = VERIFIER.verify(token, retained=False)
    with pytest.raises(FrozenInstanceError):
        command.unit = "unit_def"  # type: ignore[misc]


def test_unknown_claims_are_ignored_and_nbf_in_the_past_is_fine() -> None:
    _, token = SIGNER_A.command("lock", "unit_abc", nbf=NOW - 5, x_future={"a": [1, 2.5]},
                                sub="someone")
    assert VERIFIER.verify(token, retained=False).cmd == "lock"


def test_nesting_up_to_the_limit_is_accepted() -> None:
    deep: Any = 1
    for _ in range(31):  # the claims object is level 1, so 31 more make 32
        deep = [deep]
    _, token = SIGNER_A.command("lock", "unit_abc", x=deep)
    assert VERIFIER.verify(token, retained=False).cmd == "lock"
    _, token = SIGNER_A.command("lock", "unit_abc", x=[deep])
    assert reject(VERIFIER, token).reason == "malformed"


def test_key_rotation_both_kids_verify_and_a_third_is_unknown() -> None:
    for signer in (SIGNER_A, SIGNER_B):
        _, token = signer.command("lock", "unit_abc")
        assert VERIFIER.verify(token, retained=False).kid == signer.kid
    retired = make_verifier(keys={"relay-b": raw_public(KEY_B)})
    _, token = SIGNER_A.command("lock", "unit_abc")
    assert reject(retired, token).reason == "unknown_key"
    _, token = CommandSigner(KEY_A, "relay-c", SITE, clock=lambda: NOW).command("lock", "unit_abc")
    assert reject(VERIFIER, token).reason == "unknown_key"


def test_tokens_from_pyjwt_verify_and_ours_verify_with_pyjwt() -> None:
    """Interop: the signer writes standard JWS, and a standard library's tokens pass."""
    claims = base_claims("lock", jti="interop")
    token = jwt.encode(claims, KEY_A, algorithm="EdDSA", headers={"kid": "relay-a"})
    assert VERIFIER.verify(token.encode(), retained=False).jti == "interop"
    ours = SIGNER_A.sign(claims)
    decoded = jwt.decode(ours, KEY_A.public_key(), algorithms=["EdDSA"], audience=SITE,
                         options={"verify_exp": False, "verify_iat": False})
    assert decoded == claims
    assert jwt.get_unverified_header(ours) == {"alg": "EdDSA", "typ": "JWT", "kid": "relay-a"}


def test_unit_must_be_the_exact_unit_id() -> None:
    for unit in ("A-101", "a-101", "UNIT_ABC", " unit_abc", "unit_abc ", "unit_ab"):
        _, token = SIGNER_A.command("unlock", unit)
        rejection = reject(VERIFIER, token)
        assert rejection.reason == "unknown_unit", unit
        assert (rejection.unit, rejection.claims_verified) == (unit, True)


def test_kind_must_be_cmd_or_mgmt() -> None:
    with pytest.raises(ValueError, match="kind"):
        make_verifier(kind="other")  # type: ignore[arg-type]


def test_command_kinds_do_not_mix() -> None:
    _, token = SIGNER_A.command("status")
    assert reject(VERIFIER, token).reason == "malformed"
    _, token = SIGNER_A.command("unlock", "unit_abc")
    assert reject(MGMT, token).reason == "malformed"
    _, token = SIGNER_A.command("lock", "unit_abc", args={})
    assert reject(VERIFIER, token).reason == "malformed"
    _, token = SIGNER_A.command("status", args=[1])
    assert reject(MGMT, token).reason == "malformed"


# --------------------------------------------------------------------------- rejections


def test_rejection_is_a_one_line_error_that_pickles() -> None:
    """The gateway's own form (a GatewayError too) is tested in
    tests/gateway/intake/test_commands.py."""
    _, token = SIGNER_A.command("lock", "unit\nabc")
    rejection = reject(VERIFIER, token)
    assert isinstance(rejection, SitelinkError)
    assert type(rejection) is Rejection
    assert rejection.reason == "malformed"
    assert "\n" not in str(rejection)
    assert str(rejection).startswith("malformed: ")
    copy = pickle.loads(pickle.dumps(rejection))
    assert (copy.reason, copy.detail, copy.jti, copy.cmd, copy.unit, copy.claims_verified) == (
        rejection.reason, rejection.detail, rejection.jti, rejection.cmd, rejection.unit,
        rejection.claims_verified)
    assert copy.unit is None  # a control character is not a sane correlation value


def test_correlation_fields_of_forged_and_retained_commands_are_unverified() -> None:
    _, token = FORGER.command("unlock", "unit_abc", jti="forged-1")
    rejection = reject(VERIFIER, token)
    assert (rejection.reason, rejection.jti, rejection.cmd, rejection.unit) == (
        "bad_signature", "forged-1", "unlock", "unit_abc")
    assert rejection.claims_verified is False
    _, token = SIGNER_A.command("lock", "unit_abc", jti="kept")
    rejection = reject(VERIFIER, token, retained=True)
    assert (rejection.reason, rejection.jti, rejection.claims_verified) == ("retained", "kept",
                                                                           False)


def test_correlation_fields_of_verified_rejections() -> None:
    _, token = SIGNER_A.command("lock", "unit_abc", jti="late", iat=NOW - 1000)
    rejection = reject(VERIFIER, token)
    assert (rejection.reason, rejection.jti, rejection.cmd, rejection.unit) == (
        "expired", "late", "lock", "unit_abc")
    assert rejection.claims_verified is True
    assert rejection.retryable is False


def test_correlation_fields_are_none_when_insane_or_unreadable() -> None:
    _, token = SIGNER_A.command("lock", "unit_abc", jti="j" * 65)
    assert reject(VERIFIER, token).jti is None
    huge = SIGNER_A.sign(base_claims("lock", pad="x" * MAX_COMMAND_BYTES))
    for retained in (False, True):
        rejection = reject(VERIFIER, huge, retained=retained)
        assert (rejection.jti, rejection.cmd, rejection.unit) == (None, None, None)
    assert reject(VERIFIER, b"\xff\x00garbage").jti is None


def test_clock_untrusted_is_retryable_and_says_why() -> None:
    _, token = SIGNER_A.command("unlock", "unit_abc")
    rejection = reject(UNTRUSTED, token)
    assert rejection.reason == "clock_untrusted"
    assert rejection.retryable is True
    assert "not synchronized" in rejection.detail


def test_the_order_of_reasons() -> None:
    """Where several rules fail, the earliest in the documented order wins."""
    # retained beats everything, even garbage and oversize
    assert reject(VERIFIER, b"x" * 10_000, retained=True).reason == "retained"
    # oversize beats structure
    assert reject(VERIFIER, b"." * (MAX_COMMAND_BYTES + 1)).reason == "malformed"
    # alg beats kid
    token = SIGNER_A.sign(base_claims(), headers={"alg": "HS256", "kid": "nobody"})
    assert reject(VERIFIER, token).reason == "bad_signature"
    # kid beats signature
    token = FORGER.sign(base_claims(), headers={"kid": "nobody"})
    assert reject(VERIFIER, token).reason == "unknown_key"
    # signature beats claims: a forged token with garbage claims is bad_signature
    token = FORGER.sign({"jti": 5})
    assert reject(VERIFIER, token).reason == "bad_signature"
    # claims beat site
    token = SIGNER_A.sign(base_claims(aud="other", dur=0))
    assert reject(VERIFIER, token).reason == "malformed"
    # site beats clock
    token = SIGNER_A.sign(base_claims(aud="other"))
    assert reject(UNTRUSTED, token).reason == "wrong_site"
    # clock beats freshness
    token = SIGNER_A.sign(base_claims(iat=NOW - 10_000, exp=NOW - 9_000))
    assert reject(UNTRUSTED, token).reason == "clock_untrusted"
    # lifetime beats expiry
    assert reject(VERIFIER, token).reason == "lifetime_too_long"
    # freshness beats unit
    token = SIGNER_A.sign(base_claims(unit="unit_nowhere", iat=NOW - 100, exp=NOW - 50))
    assert reject(VERIFIER, token).reason == "expired"


B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def noncanonical(segment: bytes) -> bytes:
    """The same bytes spelt differently: set an unused low bit of the last character."""
    assert len(segment) % 4 in (2, 3)
    last = B64_ALPHABET.index(segment[-1:]) ^ 1
    return segment[:-1] + B64_ALPHABET[last:last + 1]


def test_only_canonical_unpadded_base64url_is_accepted() -> None:
    token = next(t for n in range(4)
                 if len(split(t := SIGNER_A.sign(base_claims(jti="j" * (n + 1))))[1]) % 4)
    header, payload, signature = split(token)
    for segment in (header, payload, signature):
        assert unb64(noncanonical(segment)) == unb64(segment)
    VERIFIER.verify(token, retained=False)
    assert reject(VERIFIER, b".".join((noncanonical(header), payload, signature))
                  ).reason == "malformed"
    assert reject(VERIFIER, b".".join((header, noncanonical(payload), signature))
                  ).reason == "malformed"
    assert reject(VERIFIER, b".".join((header, payload, noncanonical(signature)))
                  ).reason == "bad_signature"
    padded = b".".join((header + b"=" * (-len(header) % 4), payload, signature))
    assert reject(VERIFIER, padded).reason == "malformed"
    for junk in (b" ", b"\n", b"+", b"/", b"\xc3\xa9"):
        assert reject(VERIFIER, token + junk).reason == "malformed"
        assert reject(VERIFIER, junk + token).reason == "malformed"
    for shape in (b"", b".", b"..", header, header + b"." + payload,
                  token + b"." + signature, b"." + payload + b"." + signature):
        assert reject(VERIFIER, shape).reason == "malformed"


def test_detail_never_holds_the_token() -> None:
    _, token = FORGER.command("unlock", "unit_abc")
    header, payload, signature = token.split(b".")
    for rejection in (reject(VERIFIER, token), reject(VERIFIER, token, retained=True)):
        for part in (header, payload, signature, token):
            assert part.decode() not in rejection.detail
            assert part.decode() not in str(rejection)
