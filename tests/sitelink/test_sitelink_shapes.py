"""The protocol's names, topics and payload shapes (sitelink/codes.py, topics.py,
payloads.py, claims.py): exactly the strings, keys and key order of contract §4–§5 that
the gateway has always published."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sitelink.claims import DUR_MAX, JTI_MAX, Claims
from sitelink.codes import COMMANDS, MGMT_COMMANDS, VERIFIER_REASONS, Cmd, MgmtCmd, Reason, Status
from sitelink.errors import ClaimError
from sitelink.golden import FixedClock
from sitelink.jws import b64decode, public_key_text
from sitelink.payloads import (
    alarm_payload,
    mgmt_result_payload,
    offline_status_payload,
    result_payload,
    rfc3339,
    unit_state_payload,
)
from sitelink.sign import CommandSigner
from sitelink.topics import Topics, liveness_topic
from sitelink.verify import Verifier

NOW = 1_767_225_600.0  # 2026-01-01T00:00:00Z


def compact(payload: dict[str, Any]) -> str:
    """As the agent publishes it."""
    return json.dumps(payload, separators=(",", ":"))


# --------------------------------------------------------------------------- names


def test_the_names_are_the_contracts_strings() -> None:
    assert [c.value for c in Cmd] == ["unlock", "lock", "lockout", "clear_lockout"]
    assert {c.value for c in MgmtCmd} >= {"status", "config.get", "config.set", "locks.test",
                                          "outbox.retry", "state.republish", "log.level"}
    assert [r.value for r in Reason] == [
        "malformed", "bad_signature", "unknown_key", "wrong_site", "expired", "not_yet_valid",
        "lifetime_too_long", "retained", "unknown_unit", "overlocked", "stale_version",
        "clock_untrusted", "hardware_error", "not_confirmed"]
    assert [s.value for s in Status] == ["done", "rejected", "failed", "unknown"]
    assert {"unlock", "lock", "lockout", "clear_lockout"} == COMMANDS
    assert all(type(c) is str for c in COMMANDS | MGMT_COMMANDS)
    assert set(Reason) > VERIFIER_REASONS


def test_a_member_is_its_string() -> None:
    """Mixed freely with strings read back from JSON or SQLite: equal, same hash, and
    written as the bare string."""
    assert Reason.EXPIRED == "expired"
    assert {"expired": 1}[Reason.EXPIRED] == 1
    assert f"{Status.DONE}" == "done"
    assert str(MgmtCmd.CONFIG_GET) == "config.get"
    assert json.dumps({Reason.WRONG_SITE: Status.REJECTED}) == '{"wrong_site": "rejected"}'


# --------------------------------------------------------------------------- topics


def test_every_topic_of_contract_section_4() -> None:
    t = Topics("stora-gw", "site_123")
    assert t.base == "stora-gw/site_123"
    assert (t.cmd, t.cmd_result, t.status, t.alarm, t.mgmt, t.mgmt_result) == (
        "stora-gw/site_123/cmd", "stora-gw/site_123/cmd/result", "stora-gw/site_123/status",
        "stora-gw/site_123/alarm", "stora-gw/site_123/mgmt", "stora-gw/site_123/mgmt/result")
    assert t.unit("unit_a101") == "stora-gw/site_123/units/unit_a101"
    assert t.units_filter == "stora-gw/site_123/units/+"
    assert t.liveness("stora-gw-site_123") == "stora-gw/site_123/status/liveness/stora-gw-site_123"
    assert t.bridge == "stora-gw/site_123/status/bridge"


def test_liveness_topic_is_one_safe_level() -> None:
    assert liveness_topic("p/s/status", "a/b+c#") == "p/s/status/liveness/a_b_c_"
    assert liveness_topic("p/s/status", "") == "p/s/status/liveness/_"


# --------------------------------------------------------------------------- payloads


def test_result_payload_keys_order_and_values() -> None:
    state = unit_state_payload("unit_a101", "A-101", locked=True, lockout=False,
                               door="closed", relock_at=None, confirmed=True,
                               updated_at=NOW)
    assert compact(result_payload("j-1", Cmd.UNLOCK, "unit_a101", Status.FAILED,
                                  Reason.NOT_CONFIRMED, duplicate=True, state=state,
                                  at=NOW + 0.25)) == (
        '{"jti":"j-1","cmd":"unlock","unit":"unit_a101","status":"failed",'
        '"reason":"not_confirmed","duplicate":true,"state":{"unit":"unit_a101",'
        '"reference":"A-101","locked":true,"lockout":false,"door":"closed","relock_at":null,'
        '"confirmed":true,"updated_at":"2026-01-01T00:00:00.000Z"},'
        '"at":"2026-01-01T00:00:00.250Z"}')
    assert compact(result_payload(None, None, None, Status.REJECTED, Reason.BAD_SIGNATURE,
                                  duplicate=False, state=None, at=NOW)) == (
        '{"jti":null,"cmd":null,"unit":null,"status":"rejected","reason":"bad_signature",'
        '"duplicate":false,"state":null,"at":"2026-01-01T00:00:00.000Z"}')


def test_unit_state_payload_with_a_relock_pending_and_unknown_lock() -> None:
    assert list(unit_state_payload("u", "R", locked=None, lockout=True, door="unknown",
                                   relock_at=NOW + 8, confirmed=False,
                                   updated_at=NOW).items()) == [
        ("unit", "u"), ("reference", "R"), ("locked", None), ("lockout", True),
        ("door", "unknown"), ("relock_at", "2026-01-01T00:00:08.000Z"), ("confirmed", False),
        ("updated_at", "2026-01-01T00:00:00.000Z")]


def test_mgmt_result_alarm_and_offline_payloads() -> None:
    assert compact(mgmt_result_payload("m-1", MgmtCmd.LOG_LEVEL, Status.DONE, None,
                                       {"level": "DEBUG"}, duplicate=False, at=NOW)) == (
        '{"jti":"m-1","cmd":"log.level","status":"done","result":{"level":"DEBUG"},'
        '"reason":null,"duplicate":false,"at":"2026-01-01T00:00:00.000Z"}')
    assert compact(alarm_payload("jam", "unit_a101", "lock did not confirm", at=NOW)) == (
        '{"kind":"jam","unit":"unit_a101","detail":"lock did not confirm",'
        '"at":"2026-01-01T00:00:00.000Z"}')
    assert json.dumps(offline_status_payload()) == '{"online": false}'  # the last will


@pytest.mark.parametrize(("ts", "kwargs", "text"), [
    (NOW, {}, "2026-01-01T00:00:00.000Z"),
    (NOW + 0.0015, {}, "2026-01-01T00:00:00.001Z"),
    (NOW + 59.9, {"timespec": "seconds"}, "2026-01-01T00:00:59Z"),
    (None, {}, None),
    (math.nan, {}, "nan"),  # never raises: status output must not fail
    (1e20, {}, "1e+20"),
])
def test_rfc3339(ts: float | None, kwargs: dict[str, str], text: str | None) -> None:
    assert rfc3339(ts, **kwargs) == text


# --------------------------------------------------------------------------- claims


def test_claims_are_written_in_order_without_absent_ones() -> None:
    claims = Claims(jti="j", aud="site_123", iat=1, exp=61, cmd=Cmd.UNLOCK, unit="u",
                    dur=5, contact="cont_1")
    assert list(claims.as_dict()) == ["jti", "aud", "iat", "exp", "cmd", "unit", "dur",
                                      "contact"]
    override = Claims(jti="j", aud="s", iat=1, exp=2, cmd="unlock", unit="u", override=True,
                      reason="tenant locked in", actor="staff")
    assert override.as_dict()["override"] is True
    request = Claims(jti="m", aud="s", iat=1, exp=2, cmd=MgmtCmd.CONFIG_GET, args={"offset": 0})
    assert request.as_dict() == {"jti": "m", "aud": "s", "iat": 1, "exp": 2,
                                 "cmd": "config.get", "args": {"offset": 0}}


def test_claims_check_applies_the_verifiers_claim_rules() -> None:
    Claims(jti="j" * JTI_MAX, aud="s", iat=1, exp=2, cmd="unlock", unit="u", dur=DUR_MAX).check()
    Claims(jti="m", aud="s", iat=1, exp=2, cmd="status").check("mgmt")
    for bad, message in (
        (Claims(jti="j", aud="s", iat=1, exp=2, cmd="unlock", unit="u", dur=DUR_MAX + 1), "dur"),
        (Claims(jti="j" * (JTI_MAX + 1), aud="s", iat=1, exp=2, cmd="lock", unit="u"), "jti"),
        (Claims(jti="j", aud="s", iat=1, exp=2, cmd="lockout", unit="u"), "ver"),
        (Claims(jti="j", aud="s", iat=1, exp=2, cmd="unlock", unit="u", override=True),
         "reason"),
        (Claims(jti="j", aud="s", iat=5, exp=2, cmd="lock", unit="u"), "before iat"),
    ):
        with pytest.raises(ClaimError, match=message):
            bad.check()


def test_signed_claims_verify_to_the_same_command() -> None:
    key = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    signer = CommandSigner(key, "relay-a", "site_123")
    claims = Claims(jti="j-9", aud="site_123", iat=int(NOW), exp=int(NOW) + 300,
                    cmd=Cmd.LOCKOUT, unit="unit_a101", ver=3, actor="webhook")
    claims.check()
    public = b64decode(public_key_text(key).encode())
    assert public is not None
    verifier = Verifier(site_id="site_123", trusted_keys={"relay-a": public},
                        clock=FixedClock(NOW), clock_skew_s=30, max_lifetime_s=300,
                        units=["unit_a101"])
    command = verifier.verify(signer.sign(claims), retained=False)
    assert (command.jti, command.cmd, command.unit, command.ver, command.actor) == (
        "j-9", "lockout", "unit_a101", 3, "webhook")
