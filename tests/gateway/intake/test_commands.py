"""The gateway's side of command verification (gateway/intake/commands.py, devkit/signer.py).

The protocol itself (every rule, its order, the corpus, the boundaries, the signer) is
tested in tests/sitelink/; here: that the gateway's verifier is sitelink's, configured
from ``Config``, that what it raises is also a ``GatewayError``, and that key files are
read under the gateway's rules.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from types import MappingProxyType

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import devkit.signer
import sitelink.errors
import sitelink.jws
import sitelink.sign
from devkit.signer import CommandSigner, load_private_key
from gateway.config import (
    CommandsConfig,
    Config,
    ControlConfig,
    ControllerConfig,
    LockConfig,
    MqttConfig,
    SiteConfig,
    StoraConfig,
    StorageConfig,
)
from gateway.errors import ConfigError, GatewayError
from gateway.intake.commands import CommandVerifier, Rejection
from sitelink.golden import FixedClock, GoldenVectors, judge, load

SITE = "site_123"
NOW = 1_767_225_600  # 2026-01-01T00:00:00Z: a fixed "now" so nothing waits on wall time
KEY_A = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))


def raw_public(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw,
                                         serialization.PublicFormat.Raw)


PUBLIC_A = raw_public(KEY_A)
SIGNER_A = CommandSigner(KEY_A, "relay-a", SITE, clock=lambda: NOW)


def make_config(*, site: str = SITE, skew: int = 30, lifetime: int = 300,
                keys: dict[str, bytes] | None = None,
                units: tuple[str, ...] = ("unit_abc", "unit_def")) -> Config:
    """A Config built directly: only site, commands and locks matter to the verifier."""
    controller = ControllerConfig(
        name="bus1", driver="modbus", port="loop://", baudrate=9600, address=1, channels=8,
        inputs=8, pulse=False, pulse_style="flash_coil", pulse_base=None, timeout_ms=200,
        retries=2, base_topic=None, broker_host=None, broker_port=None, topic=None,
        scbk_file=None, allow_insecure=False,
    )
    locks = tuple(
        LockConfig(unit=unit, reference=f"A-{101 + i}", controller="bus1", channel=i,
                   door_input=None, status_input=None, device=None, energize_to="unlock",
                   unlock_seconds=8)
        for i, unit in enumerate(units)
    )
    return Config(
        path=Path("test.toml"),
        site=SiteConfig(id=site, app_name="TestApp"),
        mqtt=MqttConfig(host="127.0.0.1", port=1883, topic_prefix="stora-gw", client_id="c",
                        username="", password_file=None, tls=False, ca_file=None,
                        cert_file=None, key_file=None, keepalive_s=30),
        commands=CommandsConfig(trusted_keys=MappingProxyType(dict(keys or
                                                                   {"relay-a": PUBLIC_A})),
                                clock_skew_s=skew, max_lifetime_s=lifetime),
        stora=StoraConfig(base_url="https://example.invalid", auth="static", token_url="",
                          client_id="", client_secret_file=None, token_file=None, scope="",
                          timeline_source_id="tsrc_1", timeline_template_id="",
                          max_per_second=10, max_per_minute=60),
        storage=StorageConfig(path=Path("/nonexistent/gateway.db")),
        control=ControlConfig(socket=Path("/nonexistent/control.sock")),
        controllers=(controller,),
        locks=locks,
    )


CLOCK = FixedClock(NOW)
VERIFIER = CommandVerifier(make_config(), CLOCK)


def reject(verifier: CommandVerifier, token: bytes, *, retained: bool = False) -> Rejection:
    with pytest.raises(Rejection) as info:
        verifier.verify(token, retained=retained)
    return info.value


def golden_config(golden: GoldenVectors) -> Config:
    """The golden vectors' verifier settings, written as a gateway Config."""
    config = golden.config
    return make_config(site=config["site_id"], skew=config["clock_skew_s"],
                       lifetime=config["max_lifetime_s"], keys=golden.trusted_keys(),
                       units=tuple(config["units"]))


# --------------------------------------------------------------------------- the adapter


def test_the_golden_vectors_hold_for_the_verifier_built_from_config() -> None:
    """Every vector, judged by the verifier the agent builds from its Config, gets its
    frozen verdict; and every rejection is both the protocol's and a GatewayError."""
    golden = load()
    config = golden_config(golden)
    for vector in golden.vectors:
        clock = vector.clock or {}
        verifier = CommandVerifier(config, FixedClock(float(golden.config["now"]),
                                                      bool(clock.get("trusted", True)),
                                                      str(clock.get("why", ""))),
                                   kind=vector.kind)
        assert judge(vector, verifier) == vector.expect, vector.name
        if vector.expect["verdict"] == "rejected":
            rejection = reject(verifier, vector.token, retained=vector.retained)
            assert isinstance(rejection, GatewayError)
            assert isinstance(rejection, sitelink.errors.Rejection)


def test_rejection_is_a_one_line_gateway_error_that_pickles() -> None:
    _, token = SIGNER_A.command("lock", "unit\nabc")
    rejection = reject(VERIFIER, token)
    assert isinstance(rejection, GatewayError)
    assert rejection.reason == "malformed"
    assert "\n" not in str(rejection)
    assert str(rejection).startswith("malformed: ")
    copy = pickle.loads(pickle.dumps(rejection))
    assert type(copy) is Rejection
    assert (copy.reason, copy.detail, copy.jti, copy.cmd, copy.unit, copy.claims_verified) == (
        rejection.reason, rejection.detail, rejection.jti, rejection.cmd, rejection.unit,
        rejection.claims_verified)
    assert copy.unit is None  # a control character is not a sane correlation value


@pytest.mark.parametrize("skew", [0, 5, 600])
def test_skew_is_taken_from_the_config(skew: int) -> None:
    verifier = CommandVerifier(make_config(skew=skew), CLOCK)
    _, on_edge = SIGNER_A.command("lock", "unit_abc", iat=NOW + skew)
    verifier.verify(on_edge, retained=False)
    _, beyond = SIGNER_A.command("lock", "unit_abc", iat=NOW + skew + 1)
    assert reject(verifier, beyond).reason == "not_yet_valid"
    _, dead = SIGNER_A.command("lock", "unit_abc", iat=NOW - 60 - skew, ttl=60)
    assert reject(verifier, dead).reason == "expired"


def test_units_are_the_configured_lock_ids() -> None:
    """unknown_unit is judged against the configured locks' unit ids, exactly."""
    verifier = CommandVerifier(make_config(units=("unit_x",)), CLOCK)
    _, token = SIGNER_A.command("unlock", "unit_x")
    assert verifier.verify(token, retained=False).unit == "unit_x"
    for unit in ("unit_abc", "A-101", "UNIT_X"):
        _, token = SIGNER_A.command("unlock", unit)
        assert reject(verifier, token).reason == "unknown_unit"


def test_gateway_signer_is_sitelinks() -> None:
    """The dev kit and the tests import the signer from devkit.signer: the same objects."""
    assert devkit.signer.CommandSigner is sitelink.sign.CommandSigner
    assert devkit.signer.generate_keypair is sitelink.jws.generate_keypair
    assert devkit.signer.public_key_text is sitelink.jws.public_key_text


# --------------------------------------------------------------------------- key files


def write_key(path: Path, pem: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(pem)
    path.chmod(mode)
    return path


def test_load_private_key_round_trip(tmp_path: Path) -> None:
    pem = KEY_A.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption())
    key = load_private_key(write_key(tmp_path / "k.pem", pem))
    assert raw_public(key) == PUBLIC_A
    assert load_private_key(str(tmp_path / "k.pem")) is not None


def test_load_private_key_refuses_bad_files(tmp_path: Path) -> None:
    pem = KEY_A.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption())
    ec_pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    cases = {
        "open to others": (write_key(tmp_path / "open.pem", pem, 0o644), "chmod 600"),
        "missing": (tmp_path / "missing.pem", "does not exist"),
        "not a key": (write_key(tmp_path / "junk.pem", b"hello"), "not an unencrypted PEM"),
        "EC": (write_key(tmp_path / "ec.pem", ec_pem), "not Ed25519"),
        "directory": (tmp_path, "not a regular file"),
    }
    for path, message in cases.values():
        with pytest.raises(ConfigError, match=message):
            load_private_key(path)
