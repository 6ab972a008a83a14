"""The command verifier (sitelink/verify.py): time boundaries (fault matrix #41) and
robustness (arbitrary bytes and signed JSON only ever give a command or a rejection).

The guarantee under test: nothing reaches the hardware unless it is a fresh, well-formed
command for this site, signed by a trusted Ed25519 key, for a configured unit; and every
refusal carries the one contract §4 reason the module docstring's order gives it
(fault matrix #9–#15, #41).  Pure protocol: no gateway configuration, no broker, no pty.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sitelink.claims import Command
from sitelink.codes import COMMANDS, MGMT_COMMANDS
from sitelink.errors import Rejection
from sitelink.sign import CommandSigner
from tests.support.sitelink_verifier import (
    KEY_A,
    LIFETIME,
    MGMT,
    NOW,
    SIGNER_A,
    SIGNER_B,
    SITE,
    SKEW,
    VERIFIER,
    FakeClock,
    make_verifier,
    reject,
    short_text,
    valid_claims,
)

# --------------------------------------------------------------------------- time boundaries
#
# Signer clock offset against the gateway's (fault matrix #41), skew 30 s, ttl 60 s:
# accepted while iat <= now + 30 and now < exp + 30, i.e. offsets -89 … +30.

BOUNDARY_TABLE = [
    # (signer offset s, expected)  — the rows of the fault-matrix #41 table
    (-600, "expired"),
    (-91, "expired"),
    (-90, "expired"),        # exp + skew == now: the upper bound is exclusive
    (-89, None),             # exp + skew == now + 1
    (-60, None),
    (-5, None),
    (0, None),
    (5, None),
    (29, None),
    (30, None),              # iat == now + skew: inclusive
    (31, "not_yet_valid"),
    (60, "not_yet_valid"),
    (600, "not_yet_valid"),
]


@pytest.mark.parametrize(("offset", "expected"), BOUNDARY_TABLE,
                         ids=[f"{o:+d}s-{e or 'accepted'}" for o, e in BOUNDARY_TABLE])
def test_signer_clock_offset_table(offset: int, expected: str | None) -> None:
    signer = CommandSigner(KEY_A, "relay-a", SITE, clock=lambda: NOW + offset)
    _, token = signer.command("unlock", "unit_abc", ttl=60)
    if expected is None:
        assert VERIFIER.verify(token, retained=False).iat == NOW + offset
    else:
        assert reject(VERIFIER, token).reason == expected


@pytest.mark.parametrize(("now", "expected"), [
    (NOW + 60 + SKEW - 1, None),
    (NOW + 60 + SKEW - 0.001, None),
    (NOW + 60 + SKEW, "expired"),
    (NOW + 60 + SKEW + 1, "expired"),
    (NOW - SKEW + 1, None),
    (NOW - SKEW, None),                 # iat == now + skew
    (NOW - SKEW - 0.001, "not_yet_valid"),
    (NOW - SKEW - 1, "not_yet_valid"),
])
def test_gateway_clock_at_the_edges(now: float, expected: str | None) -> None:
    verifier = make_verifier(FakeClock(now))
    _, token = SIGNER_A.command("lock", "unit_abc", iat=NOW, ttl=60)
    if expected is None:
        verifier.verify(token, retained=False)
    else:
        assert reject(verifier, token).reason == expected


@pytest.mark.parametrize(("lifetime", "expected"), [
    (LIFETIME - 1, None), (LIFETIME, None), (LIFETIME + 1, "lifetime_too_long"),
    (0, None),
])
def test_lifetime_at_the_edge(lifetime: int, expected: str | None) -> None:
    _, token = SIGNER_A.command("lock", "unit_abc", iat=NOW - 10, ttl=lifetime)
    if expected is None:
        VERIFIER.verify(token, retained=False)
    else:
        assert reject(VERIFIER, token).reason == expected


@pytest.mark.parametrize(("nbf", "expected"), [
    (NOW + SKEW - 1, None), (NOW + SKEW, None), (NOW + SKEW + 1, "not_yet_valid"),
])
def test_nbf_at_the_edge(nbf: int, expected: str | None) -> None:
    _, token = SIGNER_A.command("lock", "unit_abc", nbf=nbf)
    if expected is None:
        VERIFIER.verify(token, retained=False)
    else:
        assert reject(VERIFIER, token).reason == expected


@pytest.mark.parametrize("skew", [0, 5, 600])
def test_skew_is_a_setting(skew: int) -> None:
    """(tests/gateway/intake/test_commands.py checks that the gateway takes it from its config.)"""
    verifier = make_verifier(skew=skew)
    _, on_edge = SIGNER_A.command("lock", "unit_abc", iat=NOW + skew)
    verifier.verify(on_edge, retained=False)
    _, beyond = SIGNER_A.command("lock", "unit_abc", iat=NOW + skew + 1)
    assert reject(verifier, beyond).reason == "not_yet_valid"
    _, dead = SIGNER_A.command("lock", "unit_abc", iat=NOW - 60 - skew, ttl=60)
    assert reject(verifier, dead).reason == "expired"


# --------------------------------------------------------------------------- robustness


@settings(max_examples=500, derandomize=True, database=None, deadline=None)
@given(data=st.one_of(
    st.binary(max_size=5000),
    st.lists(st.text(alphabet="ABCabc0189-_=+/.", max_size=200), min_size=1, max_size=5)
    .map(lambda parts: ".".join(parts).encode()),
    st.text(max_size=300).map(lambda t: t.encode("utf-8", "surrogatepass")),
), retained=st.booleans())
def test_arbitrary_bytes_only_ever_raise_rejection(data: bytes, retained: bool) -> None:
    for verifier in (VERIFIER, MGMT):
        with pytest.raises(Rejection) as info:
            verifier.verify(data, retained=retained)
        assert (info.value.reason == "retained") is retained


json_values = st.recursive(
    st.none() | st.booleans() | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False) | short_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(short_text, inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=400, derandomize=True, database=None, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(header=st.dictionaries(st.sampled_from(["alg", "kid", "typ", "crit", "x"]), json_values,
                              max_size=4),
       claims=st.dictionaries(
           st.sampled_from(["jti", "aud", "iat", "exp", "nbf", "cmd", "unit", "dur", "ver",
                            "override", "reason", "contact", "actor", "args", "x"]),
           json_values, max_size=10),
       base=valid_claims(), use_base=st.booleans())
def test_arbitrary_signed_json_returns_a_command_or_a_rejection(
    header: dict[str, Any], claims: dict[str, Any], base: dict[str, Any], use_base: bool
) -> None:
    """Signed with a trusted key, any JSON at all: a Command or a Rejection, nothing else."""
    body = {**base, **claims} if use_base else claims
    for headers in (header, {}):
        token = SIGNER_A.sign(body, headers=headers)
        for verifier in (VERIFIER, MGMT):
            try:
                command = verifier.verify(token, retained=False)
            except Rejection:
                continue
            assert command.cmd in (COMMANDS | MGMT_COMMANDS)
            assert type(command.iat) is int
            assert type(command.exp) is int


@settings(max_examples=200, derandomize=True, database=None, deadline=None)
@given(claims=valid_claims(), signer=st.sampled_from([SIGNER_A, SIGNER_B]))
def test_valid_commands_verify_to_their_claims(claims: dict[str, Any],
                                               signer: CommandSigner) -> None:
    command = VERIFIER.verify(signer.sign(claims), retained=False)
    assert command == Command(
        jti=claims["jti"], cmd=claims["cmd"], unit=claims["unit"], kid=signer.kid,
        iat=claims["iat"], exp=claims["exp"], dur=claims.get("dur"), ver=claims.get("ver"),
        override=claims.get("override", False), reason=claims.get("reason"),
        contact=claims.get("contact"), actor=claims.get("actor"))


@settings(max_examples=100, derandomize=True, database=None, deadline=None)
@given(claims=valid_claims(kind="mgmt"), args=st.dictionaries(short_text, json_values,
                                                             max_size=4))
def test_valid_mgmt_requests_verify_with_their_args(claims: dict[str, Any],
                                                    args: dict[str, Any]) -> None:
    claims["args"] = args
    command = MGMT.verify(SIGNER_A.sign(claims), retained=False)
    assert json.loads(json.dumps(command.args, default=dict)) == json.loads(json.dumps(args))
