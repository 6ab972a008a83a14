"""The configuration loader: the mistakes a technician makes.

Every mistake must come back as a ConfigError whose single-line message names the file,
the exact dotted key and the reason, because that line is all ``check-config`` shows;
a file with several independent mistakes reports each of them in one pass, and a single
mistake is reported once (nothing that depends on it is judged again).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.config import (
    ConfigErrors,
    MissingFileError,
    config_problems,
    load_config,
)
from gateway.errors import ConfigError, GatewayError
from tests.support.config import (
    PEM_TEXT,
    RAW_KEY_B64,
    VALID_TOML,
    write_config,
)

# --------------------------------------------------------------------------- mistakes

Mutation = Callable[[Path, str], str]


def sub(old: str, new: str) -> Mutation:
    """Replace ``old`` (which must occur exactly once) by ``new`` in the config text."""

    def mutate(_: Path, text: str) -> str:
        assert text.count(old) == 1, old
        return text.replace(old, new)

    return mutate


def append(extra: str) -> Mutation:
    """Add TOML at the end of the config text."""
    return lambda _, text: text + "\n" + extra


def append_to_stora(line: str) -> Mutation:
    """Add ``line`` at the top of the ``[stora]`` table."""
    return sub("[stora]\n", f"[stora]\n{line}\n")


def chmod(name: str, mode: int) -> Mutation:
    """Change the mode of one of the files the config names."""

    def mutate(directory: Path, text: str) -> str:
        (directory / name).chmod(mode)
        return text

    return mutate


def remove(name: str) -> Mutation:
    """Delete one of the files the config names."""

    def mutate(directory: Path, text: str) -> str:
        (directory / name).unlink()
        return text

    return mutate


ZIGBEE = '[[controllers]]\nname = "zb"\ndriver = "zigbee2mqtt"\nusername = "gw-z2m"\n'

THIRD_MODBUS = '[[controllers]]\nname = "bus2"\ndriver = "modbus"\nport = "/dev/ttyUSB0"\n'

EC_PEM = (
    ec.generate_private_key(ec.SECP256R1())
    .public_key()
    .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    .decode()
)


# (id, mutation, exact dotted key, reason fragment)
MISTAKES: list[tuple[str, Mutation, str, str]] = [
    ("toml-syntax", append("oops = \n"), "", "TOML syntax error at line"),
    ("unknown-section", append("[mqqt]\nhost = 'x'\n"), "mqqt", "did you mean [mqtt]?"),
    ("unknown-key", sub("keepalive_s = 60", "keepalive = 60"), "mqtt.keepalive",
     "unknown key; did you mean 'keepalive_s'?"),
    ("wrong-type", sub("port = 8883", 'port = "8883"'), "mqtt.port",
     "expected an integer, found string '8883'"),
    ("int-for-string", sub('reference = "A-101"', "reference = 101"), "locks[0].reference",
     "expected a string, found integer 101"),
    ("float-for-int", sub("keepalive_s = 60", "keepalive_s = 60.0"), "mqtt.keepalive_s",
     "expected an integer, found float 60.0"),
    ("bool-for-int", sub("unlock_seconds = 5", "unlock_seconds = true"),
     "locks[1].unlock_seconds", "expected an integer, found boolean true"),
    ("missing-required", sub('app_name = "YourApp"', ""), "site.app_name",
     "required key is missing"),
    ("missing-section", sub('[site]\nid = "site_123"\napp_name = "YourApp"\n', ""), "site",
     "missing required section [site]"),
    ("duplicate-unit", sub('unit = "unit_def"', 'unit = "unit_abc"'), "locks[1].unit",
     "duplicate unit id 'unit_abc' (also locks[0])"),
    ("duplicate-reference", sub('reference = "A-102"', 'reference = "a-101"'),
     "locks[1].reference", "duplicate reference 'a-101' (also locks[0])"),
    ("reference-is-a-unit-id", sub('reference = "B-201"', 'reference = "unit_abc"'),
     "locks[2].reference", "is also the unit id of locks[0]"),
    ("unit-prefix", sub('unit = "unit_ghi"', 'unit = "ghi"'), "locks[2].unit",
     "starting with 'unit_'"),
    ("missing-controller", sub('controller = "boards"', 'controller = "bus9"'),
     "locks[2].controller", "no controller named 'bus9' (known: 'bus1', 'boards')"),
    ("channel-out-of-range", sub("channel = 0\n", "channel = 9\n"), "locks[0].channel",
     "channel 9 is out of range for controller 'bus1' (0–7)"),
    ("lockboard-channel-out-of-range", sub("channel = 15", "channel = 16"), "locks[2].channel",
     "out of range for controller 'boards' (0–15)"),
    ("channel-missing", sub("channel = 15", ""), "locks[2].channel", "required key is missing"),
    ("channel-used-twice", sub("channel = 1\n", "channel = 0\n"), "locks[1].channel",
     "channel 0 of controller 'bus1' is already used by locks[0]"),
    ("door-input-out-of-range", sub("door_input = 0", "door_input = 8"), "locks[0].door_input",
     "input 8 is out of range for controller 'bus1' (0–7)"),
    ("door-input-used-twice", sub("door_input = 1", "door_input = 0"), "locks[1].door_input",
     "already used as locks[0].door_input"),
    ("door-input-on-lockboard", sub("channel = 15", "channel = 15\ndoor_input = 0"),
     "locks[2].door_input", "reports each lock's door state itself"),
    ("status-input-on-lockboard", sub("channel = 15", "channel = 15\nstatus_input = 0"),
     "locks[2].status_input", "modbus boards only"),
    ("secret-mode-0644", chmod("secrets/mqtt-password", 0o644), "mqtt.password_file",
     "has mode 0644 and is open to group or others; run: chmod 600"),
    ("secret-mode-0640", chmod("secrets/stora-client-secret", 0o640),
     "stora.client_secret_file", "has mode 0640"),
    ("secret-missing", remove("secrets/mqtt-password"), "mqtt.password_file",
     "secret file"),  # "… does not exist" is checked below
    ("secret-is-a-directory", sub('"secrets/mqtt-password"', '"secrets"'), "mqtt.password_file",
     "is not a regular file"),
    ("ca-file-missing", remove("ca.pem"), "mqtt.ca_file", "does not exist"),
    ("path-with-nul", sub('path = "data/gateway.db"', 'path = "data/\\u0000.db"'),
     "storage.path", "must not contain a NUL character"),
    ("unknown-driver", sub('driver = "modbus"', 'driver = "modbuss"'), "controllers[0].driver",
     "unknown driver 'modbuss' (did you mean 'modbus'?); known drivers: lockboard, "
     "modbus, osdp, tasmota, zigbee2mqtt"),
    ("key-not-for-driver", sub("pulse = true", 'pulse = true\nbase_topic = "z"'),
     "controllers[0].base_topic", "key not valid for driver modbus"),
    ("bad-clock-mode", sub("max_lifetime_s", 'clock = "rtc"\nmax_lifetime_s'),
     "commands.clock", "must be one of"),
    ("bad-pulse-style", sub("pulse = true", 'pulse = true\npulse_style = "flash"'),
     "controllers[0].pulse_style", "must be one of"),
    ("pulse-base-range", sub("pulse = true", "pulse = true\npulse_base = 70000"),
     "controllers[0].pulse_base", "70000"),
    ("pulse-on-lockboard", sub("address = 2", "address = 2\npulse = true"),
     "controllers[1].pulse", "key not valid for driver lockboard"),
    ("unknown-controller-key", sub("pulse = true", "pulse = true\nadress = 4"),
     "controllers[0].adress", "did you mean 'address'?"),
    ("bad-baudrate", sub("baudrate = 19200", "baudrate = 19201"), "controllers[0].baudrate",
     "19201 is not supported"),
    ("modbus-address-0", sub("address = 3", "address = 0"), "controllers[0].address",
     "must be between 1 and 247, found 0"),
    ("lockboard-address-32", sub("address = 2", "address = 32"), "controllers[1].address",
     "must be between 0 and 31"),
    ("energize-to-invalid", sub('energize_to = "lock"', 'energize_to = "open"'),
     "locks[1].energize_to", "must be one of 'unlock', 'lock', found string 'open'"),
    ("unlock-seconds-0", sub("unlock_seconds = 5", "unlock_seconds = 0"),
     "locks[1].unlock_seconds", "must be between 1 and 3600, found 0"),
    ("bus-different-baudrate", append(THIRD_MODBUS + "address = 4\n"), "controllers[2].baudrate",
     "differs from 19200 of controller 'bus1' on the same port /dev/ttyUSB0"),
    ("bus-same-address", append(THIRD_MODBUS + "address = 3\nbaudrate = 19200\n"),
     "controllers[2].address", "address 3 is already used by controller 'bus1'"),
    ("bus-different-driver", sub('port = "/dev/ttyUSB1"', 'port = "/dev/ttyUSB0"'),
     "controllers[1].driver", "already a modbus bus"),
    ("duplicate-controller-name", sub('name = "boards"', 'name = "bus1"'),
     "controllers[1].name", "duplicate controller name 'bus1' (also controllers[0])"),
    ("empty-controller-name", sub('name = "boards"', 'name = ""'), "controllers[1].name",
     "must not be empty"),
    ("bad-trusted-key", sub(f'"{RAW_KEY_B64}"', f'"{RAW_KEY_B64[:-4]}"'),
     "commands.trusted_keys.relay-2026", "not 32"),
    ("trusted-key-not-ed25519", sub(PEM_TEXT, EC_PEM), "commands.trusted_keys.relay-pem",
     "not Ed25519"),
    ("trusted-key-garbage", sub(f'"{RAW_KEY_B64}"', '"not a key!"'),
     "commands.trusted_keys.relay-2026", "expected an Ed25519 public key"),
    ("no-trusted-keys", sub(f'relay-2026 = "{RAW_KEY_B64}"\nrelay-pem = """\n{PEM_TEXT}"""',
                            ""), "commands.trusted_keys", "at least one key"),
    ("site-id-slash", sub('id = "site_123"', 'id = "site_1/23"'), "site.id",
     "must not contain '/', '+', '#' or whitespace"),
    ("topic-prefix-wildcard", sub('topic_prefix = "stora-gw"', 'topic_prefix = "gw/#"'),
     "mqtt.topic_prefix", "wildcards"),
    ("mqtt-port-range", sub("port = 8883", "port = 70000"), "mqtt.port",
     "must be between 1 and 65535, found 70000"),
    ("tls-without-ca", sub('ca_file = "ca.pem"', ""), "mqtt.ca_file",
     "required when mqtt.tls = true"),
    ("cert-without-key", sub('ca_file = "ca.pem"', 'ca_file = "ca.pem"\ncert_file = "ca.pem"'),
     "mqtt.key_file", "go together"),
    ("max-per-minute-below-second", sub("max_per_minute = 100", "max_per_minute = 4"),
     "stora.max_per_minute", "must be at least max_per_second (5), found 4"),
    ("base-url-not-http", sub('base_url = "https://public-api.stora.co/2025-09/"',
                              'base_url = "ftp://x"'), "stora.base_url", "must be an https:// URL"),
    # Found in review: plain http:// to a remote host was accepted silently, sending the
    # token and every event in the clear; it is kept for loopback (a local relay, tests).
    ("base-url-plain-http", sub('base_url = "https://public-api.stora.co/2025-09/"',
                                'base_url = "http://public-api.stora.co/2025-09/"'),
     "stora.base_url", "http:// would send the token and events in the clear"),
    ("token-url-plain-http", append_to_stora('token_url = "http://10.0.0.2/oauth2/token"'),
     "stora.token_url", "must be an https:// URL"),
    ("auth-static-without-token", sub('auth = "client_credentials"', 'auth = "static"'),
     "stora.token_file", 'required when stora.auth = "static"'),
    ("auth-unknown", sub('auth = "client_credentials"', 'auth = "oauth"'), "stora.auth",
     "must be one of 'client_credentials', 'static', 'broker'"),
    ("zigbee-lock-without-device",
     append(ZIGBEE + '[[locks]]\nunit = "unit_z"\nreference = "Z"\ncontroller = "zb"\n'),
     "locks[3].device", "required for a lock on zigbee2mqtt controller 'zb'"),
    ("zigbee-lock-with-channel",
     append(ZIGBEE + '[[locks]]\nunit = "unit_z"\nreference = "Z"\ncontroller = "zb"\n'
                     'channel = 0\ndevice = "d"\n'),
     "locks[3].channel", "key not valid for driver zigbee2mqtt"),
    ("device-on-modbus", sub("channel = 0\n", 'channel = 0\ndevice = "x"\n'), "locks[0].device",
     "key not valid for driver modbus"),
    ("tasmota-topic-wildcard",
     append('[[controllers]]\nname = "t"\ndriver = "tasmota"\ntopic = "a/+"\n'
            'username = "gw-t"\n'),
     "controllers[2].topic", "wildcards"),
    ("telemetry-misspelt", append("[telemetri]\ninterval_s = 30\n"), "telemetri",
     "did you mean [telemetry]?"),
    ("telemetry-unknown-key", append("[telemetry]\ninterval = 30\n"), "telemetry.interval",
     "unknown key; did you mean 'interval_s'?"),
    ("telemetry-interval-too-short", append("[telemetry]\ninterval_s = 4\n"),
     "telemetry.interval_s", "must be between 5 and 3600, found 4"),
    ("telemetry-interval-too-long", append("[telemetry]\ninterval_s = 3601\n"),
     "telemetry.interval_s", "must be between 5 and 3600, found 3601"),
    ("telemetry-interval-float", append("[telemetry]\ninterval_s = 30.0\n"),
     "telemetry.interval_s", "expected an integer"),
    ("telemetry-textfile-not-prom",
     append('[telemetry]\nprometheus_textfile = "metrics/gateway.txt"\n'),
     "telemetry.prometheus_textfile",
     "must name a *.prom file (node_exporter's textfile collector reads no other), "
     "found string 'metrics/gateway.txt'"),
    ("telemetry-textfile-bare-suffix", append('[telemetry]\nprometheus_textfile = "m/.prom"\n'),
     "telemetry.prometheus_textfile", "must name a *.prom file"),
    ("telemetry-textfile-not-string", append("[telemetry]\nprometheus_textfile = true\n"),
     "telemetry.prometheus_textfile", "expected a string"),
    # Issue 12: ids Stora would refuse, and credentials every event would be refused with,
    # are refused here rather than dead-lettering every Timeline Event on site.
    ("site-id-prefix", sub('id = "site_123"', 'id = "123"'), "site.id",
     "must be a Stora site id starting with 'site_', found string '123'"),
    ("timeline-source-prefix", sub('timeline_source_id = "tsrc_1"',
                                   'timeline_source_id = "src_1"'),
     "stora.timeline_source_id",
     "must be a Stora timeline source id starting with 'tsrc_', found string 'src_1'"),
    ("timeline-source-bare-prefix", sub('timeline_source_id = "tsrc_1"',
                                        'timeline_source_id = "tsrc_"'),
     "stora.timeline_source_id", "starting with 'tsrc_'"),
    ("timeline-template-prefix", append_to_stora('timeline_template_id = "tpl_1"'),
     "stora.timeline_template_id",
     "must be a Stora timeline template id starting with 'aetpl_', found string 'tpl_1'"),
    ("scope-without-event-write", append_to_stora('scope = "public.site:read"'),
     "stora.scope", "must include public.timeline_event:write"),
    ("scope-not-a-scope", append_to_stora('scope = "timeline_event:write"'), "stora.scope",
     "string 'timeline_event:write' is not a Stora scope"),
    ("osdp-without-key",
     append('[[controllers]]\nname = "pd"\ndriver = "osdp"\nport = "/dev/ttyUSB7"\n'),
     "controllers[2].scbk_file", "required for an osdp controller"),
]


def write_mistake(directory: Path, mutate: Mutation) -> Path:
    """The valid config written to ``directory`` with one mistake made by ``mutate``."""
    path = write_config(directory)
    path.write_text(mutate(directory, VALID_TOML), encoding="utf-8")
    return path


def load_error(path: Path) -> ConfigError:
    """The error loading ``path`` raises (the test fails if it loads)."""
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value


#: Mistakes whose consequence is a second, true problem: the lock that named the
#: renamed controller now names none.
CONSEQUENCES = {"duplicate-controller-name": ["locks[2].controller"]}


@pytest.mark.parametrize(
    ("mutate", "key", "fragment"),
    [pytest.param(m, k, f, id=i) for i, m, k, f in MISTAKES],
)
def test_mistake_is_one_line_naming_file_key_and_reason(
    tmp_path: Path, mutate: Mutation, key: str, fragment: str
) -> None:
    path = write_mistake(tmp_path, mutate)
    err = load_error(path)
    message = str(err)
    assert len(message.splitlines()) == 1
    assert err.file == str(path)
    assert err.key == key
    assert message.startswith(f"{path}: {key}: " if key else f"{path}: ")
    assert fragment in err.reason


@pytest.mark.parametrize(
    ("name", "mutate", "key"), [pytest.param(i, m, k, id=i) for i, m, k, _ in MISTAKES])
def test_one_mistake_is_reported_once(tmp_path: Path, name: str, mutate: Mutation,
                                      key: str) -> None:
    """Checking goes on after a problem, but never reports the consequences of a fallback
    value: one mistake is one line (found writing the collector: a missing secret file
    also said "required when stora.auth = ...")."""
    path = write_mistake(tmp_path, mutate)
    err = load_error(path)
    keys = [p.key for p in config_problems(err)]
    assert keys == [key, *CONSEQUENCES.get(name, [])]


def test_independent_mistakes_are_all_reported_in_one_pass(tmp_path: Path) -> None:
    """Issue 12: an installer needed eleven check-config rounds for one board.  Three
    mistakes in three places (a section, a controller, a lock) come back together, in
    file order, each one line; str() stays one line and says how many more there are."""
    text = (VALID_TOML.replace('timeline_source_id = "tsrc_1"', 'timeline_source_id = "x1"')
            .replace("baudrate = 19200", "baudrate = 19201")
            .replace("channel = 15", "channel = 16"))
    path = write_config(tmp_path, text)
    with pytest.raises(ConfigErrors) as info:
        load_config(path)
    problems = info.value.errors
    assert [(p.key, p.file) for p in problems] == [
        ("stora.timeline_source_id", str(path)), ("controllers[0].baudrate", str(path)),
        ("locks[2].channel", str(path))]
    assert isinstance(info.value, ConfigError)  # callers catching ConfigError still do
    assert (info.value.key, info.value.reason) == (problems[0].key, problems[0].reason)
    message = str(info.value)
    assert len(message.splitlines()) == 1
    assert message == f"{problems[0]} (and 2 more problems; `stora-gateway check-config` " \
                      "lists them all)"


def test_a_bad_value_in_one_lock_does_not_stop_checking_the_others(tmp_path: Path) -> None:
    extra = "".join(
        f'[[locks]]\nunit = "{unit}"\nreference = "C-{i}"\ncontroller = "bus1"\n'
        f"channel = {channel}\n\n"
        for i, (unit, channel) in enumerate([("c1", 4), ("unit_c2", 5), ("unit_c3", 99)]))
    path = write_config(tmp_path, VALID_TOML + "\n" + extra)
    err = load_error(path)
    assert [(p.key, p.reason) for p in config_problems(err)] == [
        ("locks[3].unit", "must be a Stora unit id starting with 'unit_', found string 'c1'"),
        ("locks[5].channel", "channel 99 is out of range for controller 'bus1' (0–7)"),
    ]


def test_several_mistakes_in_one_table_are_each_reported(tmp_path: Path) -> None:
    text = (VALID_TOML.replace('id = "site_123"', 'id = "123"')
            .replace('app_name = "YourApp"', 'app_name = ""\nbogus = 1'))
    path = write_config(tmp_path, text)
    err = load_error(path)
    assert [p.key for p in config_problems(err)] == [
        "site.bogus", "site.id", "site.app_name"]


def test_a_syntax_error_stops_at_once(tmp_path: Path) -> None:
    """After a TOML syntax error nothing else can be judged: one plain ConfigError."""
    text = VALID_TOML.replace('id = "site_123"', 'id = "123"') + "oops = \n"
    path = write_config(tmp_path, text)
    err = load_error(path)
    assert config_problems(err) == (err,)
    assert err.reason.startswith("TOML syntax error at line")


def test_a_missing_file_is_told_apart_from_a_wrong_value(tmp_path: Path) -> None:
    """``init`` writes a config whose only problems are secret files still to put in
    place; the loader marks those with their own type."""
    path = write_config(tmp_path, VALID_TOML.replace("baudrate = 19200", "baudrate = 1"))
    (tmp_path / "secrets/stora-client-secret").unlink()
    err = load_error(path)
    kinds = [(p.key, isinstance(p, MissingFileError)) for p in config_problems(err)]
    assert kinds == [("stora.client_secret_file", True), ("controllers[0].baudrate", False)]


def test_config_errors_pickle_with_every_problem() -> None:
    import pickle

    errors = ConfigErrors([ConfigError("f.toml", "a", "one"), ConfigError("f.toml", "b", "two")])
    again = pickle.loads(pickle.dumps(errors))
    assert str(again) == str(errors)
    assert [str(e) for e in again.errors] == ["f.toml: a: one", "f.toml: b: two"]
    with pytest.raises(ValueError, match="at least one"):
        ConfigErrors([])


def test_there_are_at_least_twenty_distinct_mistakes() -> None:
    assert len({i for i, *_ in MISTAKES}) == len(MISTAKES) >= 20


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    err = load_error(path)
    assert str(err) == f"{path}: config file does not exist"
    assert err.key == ""


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)


def test_missing_secret_file_says_it_does_not_exist(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    (tmp_path / "secrets/mqtt-password").unlink()
    err = load_error(path)
    assert err.reason == (
        f"secret file {tmp_path / 'secrets/mqtt-password'} does not exist"
    )


def test_syntax_error_reports_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "gw.toml"
    path.write_text('[site]\nid = "x"\napp_name = \n')
    err = load_error(path)
    assert err.reason == "TOML syntax error at line 3, column 12: invalid value"


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "gw.toml"
    path.write_bytes(b'[site]\nid = "\xff"\n')
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load_config(path)


def test_message_never_spans_lines() -> None:
    err = ConfigError("a\nb.toml", "site.\u2028id", "bad value 'x\r\ny'")
    assert str(err) == "a\\nb.toml: site.\\u2028id: bad value 'x\\r\\ny'"
    assert isinstance(err, GatewayError)
    assert not err.retryable
    assert str(ConfigError("f.toml", "", "gone")) == "f.toml: gone"


def test_newlines_in_values_and_keys_stay_escaped_on_one_line(tmp_path: Path) -> None:
    path = write_config(tmp_path, VALID_TOML.replace('driver = "modbus"', 'driver = "a\\nb"'))
    err = load_error(path)
    assert len(str(err).splitlines()) == 1
    assert "'a\\nb'" in str(err)
    path.write_text(VALID_TOML.replace("[mqtt]", '[mqtt]\n"bad\\nkey" = 1'))
    err = load_error(path)
    assert err.key == "mqtt.bad\\nkey"
    assert len(str(err).splitlines()) == 1
