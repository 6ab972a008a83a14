"""The configuration loader: a full valid file (typed values, defaults, the other drivers) and
the API helpers around it (redacted dump, lock lookup, config path, in-memory parse).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from gateway.config import (
    CONFIG_ENV_VAR,
    DEFAULT_CONFIG_PATH,
    Config,
    config_path_from_env,
    load_config,
    parse_config,
)
from gateway.errors import ConfigError
from tests.support.config import (
    PEM_KEY,
    RAW_KEY_B64,
    RAW_KEY_BYTES,
    SECRET_CONTENT,
    VALID_TOML,
    write_config,
)

PEM_KEY_BYTES = PEM_KEY.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


# --------------------------------------------------------------------------- the valid file


def test_full_config_loads_with_typed_values_and_defaults(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path))

    assert config.path == tmp_path / "gateway.toml"
    assert config.site.id == "site_123"
    assert config.site.app_name == "YourApp"

    mqtt = config.mqtt
    assert (mqtt.host, mqtt.port, mqtt.topic_prefix) == ("broker.local", 8883, "stora-gw")
    assert mqtt.client_id == "stora-gw-site_123"  # default derived from the site id
    assert mqtt.username == "gw"
    assert mqtt.password_file == tmp_path / "secrets/mqtt-password"
    assert mqtt.tls is True
    assert mqtt.ca_file == tmp_path / "ca.pem"
    assert mqtt.cert_file is None
    assert mqtt.key_file is None
    assert mqtt.keepalive_s == 60

    commands = config.commands
    assert dict(commands.trusted_keys) == {"relay-2026": RAW_KEY_BYTES, "relay-pem": PEM_KEY_BYTES}
    assert (commands.clock_skew_s, commands.max_lifetime_s) == (20, 120)

    stora = config.stora
    assert stora.base_url == "https://public-api.stora.co/2025-09"  # trailing slash dropped
    assert stora.auth == "client_credentials"
    assert stora.token_url == "https://public-api.stora.co/oauth2/token"
    assert stora.client_id == "client-1"
    assert stora.client_secret_file == tmp_path / "secrets/stora-client-secret"
    assert stora.token_file is None
    assert stora.scope == "public.timeline_event:write"
    assert stora.timeline_source_id == "tsrc_1"
    assert stora.timeline_template_id == ""
    assert (stora.max_per_second, stora.max_per_minute) == (5, 100)

    assert config.storage.path == tmp_path / "data/gateway.db"  # relative to the file
    assert config.control.socket == Path("/run/stora-gateway/test.sock")

    bus1, boards = config.controllers
    assert (bus1.name, bus1.driver, bus1.port) == ("bus1", "modbus", "/dev/ttyUSB0")
    assert (bus1.baudrate, bus1.address, bus1.pulse) == (19200, 3, True)
    assert (bus1.pulse_style, bus1.pulse_base) == ("flash_coil", None)
    assert (bus1.channels, bus1.inputs, bus1.timeout_ms, bus1.retries) == (8, 8, 200, 2)
    assert bus1.serial
    assert (boards.driver, boards.baudrate, boards.address) == ("lockboard", 9600, 2)
    assert (boards.channels, boards.inputs, boards.pulse) == (16, 0, False)
    assert boards.scbk_file is None
    assert boards.base_topic is None
    assert boards.topic is None

    a101, a102, b201 = config.locks
    assert (a101.unit, a101.reference, a101.controller) == ("unit_abc", "A-101", "bus1")
    assert (a101.channel, a101.door_input, a101.status_input) == (0, 0, None)
    assert (a101.energize_to, a101.unlock_seconds, a101.device) == ("unlock", 8, None)
    assert (a102.channel, a102.door_input, a102.status_input) == (1, 1, 2)
    assert (a102.energize_to, a102.unlock_seconds) == ("lock", 5)
    assert (b201.controller, b201.channel, b201.door_input) == ("boards", 15, None)


def test_config_is_really_frozen(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.site.id = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.commands.trusted_keys["evil"] = b"x" * 32  # type: ignore[index]


def test_minimal_config_takes_the_contract_defaults(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("x")
    (tmp_path / "secret").chmod(0o600)
    path = tmp_path / "gw.toml"
    path.write_text(
        '[site]\nid = "site_1"\napp_name = "App"\n'
        f'[commands]\ntrusted_keys = {{ k1 = "{RAW_KEY_B64}" }}\n'
        '[stora]\nclient_id = "c"\nclient_secret_file = "secret"\ntimeline_source_id = "tsrc_x"\n'
    )
    config = load_config(path)
    assert (config.mqtt.host, config.mqtt.port, config.mqtt.keepalive_s) == ("127.0.0.1", 1883, 30)
    assert config.mqtt.tls is False
    assert config.mqtt.password_file is None
    assert (config.commands.clock_skew_s, config.commands.max_lifetime_s) == (30, 300)
    assert config.stora.base_url == "https://public-api.stora.co/2025-09"
    assert (config.stora.max_per_second, config.stora.max_per_minute) == (10, 60)
    assert config.storage.path == Path("/var/lib/stora-gateway/gateway.db")
    assert config.control.socket == Path("/run/stora-gateway/control.sock")
    assert config.controllers == ()
    assert config.locks == ()
    assert config.telemetry.interval_s == 30
    assert config.telemetry.prometheus_textfile is None


def test_telemetry_section_loads_with_the_textfile_relative_to_the_config(
        tmp_path: Path) -> None:
    path = write_config(tmp_path, VALID_TOML + '\n[telemetry]\ninterval_s = 5\n'
                                               'prometheus_textfile = "prom/gateway.prom"\n')
    config = load_config(path)
    assert config.telemetry.interval_s == 5
    assert config.telemetry.prometheus_textfile == tmp_path / "prom/gateway.prom"
    assert config.redacted()["telemetry"] == {
        "interval_s": 5, "prometheus_textfile": str(tmp_path / "prom/gateway.prom")}
    # An empty path means "off", as every other optional path in the file.
    off = load_config(write_config(tmp_path, VALID_TOML + '\n[telemetry]\n'
                                                          'prometheus_textfile = ""\n'))
    assert off.telemetry.prometheus_textfile is None


def test_relative_config_path_resolves_files_against_its_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_config(tmp_path)
    monkeypatch.chdir(tmp_path.parent)
    config = load_config(Path(tmp_path.name) / "gateway.toml")
    assert config.storage.path == tmp_path / "data/gateway.db"
    assert config.storage.path.is_absolute()


def test_other_drivers_load(tmp_path: Path) -> None:
    (tmp_path / "scbk").write_text("00" * 16)
    (tmp_path / "scbk").chmod(0o600)
    text = VALID_TOML + """
[[controllers]]
name = "zb"
driver = "zigbee2mqtt"
username = "gw-z2m"

[[controllers]]
name = "plug"
driver = "tasmota"
topic = "gate_relay"
host = "10.0.0.9"
port = 1884
channels = 2
inputs = 1

[[controllers]]
name = "reader"
driver = "osdp"
port = "/dev/ttyUSB2"
address = 5
scbk_file = "scbk"

[[locks]]
unit = "unit_zb"
reference = "Z-1"
controller = "zb"
device = "front/door lock"

[[locks]]
unit = "unit_gate"
reference = "GATE"
controller = "plug"
channel = 1
door_input = 0

[[locks]]
unit = "unit_osdp"
reference = "O-1"
controller = "reader"
channel = 3
door_input = 3
"""
    config = load_config(write_config(tmp_path, text))
    zb = config.controller("zb")
    plug = config.controller("plug")
    reader = config.controller("reader")
    assert zb is not None
    assert plug is not None
    assert reader is not None
    assert (zb.base_topic, zb.broker_host, zb.broker_port) == ("zigbee2mqtt", None, None)
    assert zb.port is None
    assert not zb.serial
    assert (plug.topic, plug.broker_host, plug.broker_port) == ("gate_relay", "10.0.0.9", 1884)
    assert (plug.channels, plug.inputs, plug.port) == (2, 1, None)
    assert (reader.address, reader.channels, reader.inputs) == (5, 4, 4)
    assert reader.scbk_file == tmp_path / "scbk"
    assert reader.allow_insecure is False
    lock = config.lock_by_id("unit_zb")
    assert lock is not None
    assert (lock.device, lock.channel) == ("front/door lock", None)


# --------------------------------------------------------------------------- API helpers


def test_redacted_dump_is_json_and_holds_no_secret(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path))
    dumped = json.dumps(config.redacted())
    assert SECRET_CONTENT not in dumped
    again = json.loads(dumped)
    assert again["mqtt"]["password_file"] == str(tmp_path / "secrets/mqtt-password")
    assert again["commands"]["trusted_keys"]["relay-2026"] == RAW_KEY_B64
    assert again["locks"][1]["energize_to"] == "lock"
    assert again["controllers"][0]["name"] == "bus1"


def test_lock_by_id_resolves_unit_id_and_reference(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path))
    by_unit = config.lock_by_id("unit_def")
    by_reference = config.lock_by_id("A-102")
    assert by_unit is not None
    assert by_unit is by_reference
    assert config.lock_by_id(" a-102 ") is by_unit  # a technician's typing
    assert config.lock_by_id("unit_zzz") is None
    controller = config.controller("boards")
    assert controller is not None
    assert controller.driver == "lockboard"
    assert config.controller("nope") is None


def test_config_path_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CONFIG_ENV_VAR, raising=False)
    assert config_path_from_env(None) == DEFAULT_CONFIG_PATH == "/etc/stora-gateway/gateway.toml"
    monkeypatch.setenv(CONFIG_ENV_VAR, "/tmp/from-env.toml")
    assert config_path_from_env(None) == "/tmp/from-env.toml"
    assert config_path_from_env("given.toml") == "given.toml"


def test_parse_config_in_memory(tmp_path: Path) -> None:
    write_config(tmp_path)
    data = tomllib.loads(VALID_TOML)
    config = parse_config(data, "memory.toml", tmp_path)
    assert isinstance(config, Config)
    assert config.path == Path("memory.toml")
    assert config.storage.path == tmp_path / "data/gateway.db"
    data["controllers"] = {"name": "x"}
    with pytest.raises(ConfigError) as info:
        parse_config(data, "memory.toml", tmp_path)
    assert str(info.value) == (
        "memory.toml: controllers: expected an array of tables (write [[controllers]]), "
        "found a table"
    )


def test_group_readable_secret_is_refused_even_for_root(tmp_path: Path) -> None:
    # Tests often run as root, which can read anything: the rule is about the mode bits.
    path = write_config(tmp_path)
    (tmp_path / "secrets/mqtt-password").chmod(0o604)
    with pytest.raises(ConfigError, match="mode 0604"):
        load_config(path)
    assert os.stat(tmp_path / "secrets/mqtt-password").st_mode & 0o777 == 0o604


@pytest.mark.parametrize("url", ["http://127.0.0.1:8080/stora/2025-09", "http://localhost:9/x",
                                 "http://[::1]:8080/x", "http://127.9.9.9/x"])
def test_plain_http_is_accepted_for_a_loopback_relay_or_sandbox(tmp_path: Path,
                                                               url: str) -> None:
    path = write_config(tmp_path, VALID_TOML.replace(
        'base_url = "https://public-api.stora.co/2025-09/"', f'base_url = "{url}"'))
    assert load_config(path).stora.base_url == url.rstrip("/")
