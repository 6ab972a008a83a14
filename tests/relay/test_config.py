"""The relay's config loader: a valid file, and the mistakes an operator makes.

Every mistake must come back as a ConfigError line naming the file, the exact dotted key
and the reason (``check-config`` shows nothing else); a file with several independent
mistakes reports each of them in one pass, and one mistake is reported once.
"""

from __future__ import annotations

import base64
import os
import pickle
import re
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest

from relay.config import (
    CONFIG_ENV_VAR,
    DEFAULT_CONFIG_PATH,
    DEFAULT_SCOPES,
    KNOWN_KEYS,
    RelayConfig,
    default_config_path,
    example_config,
    load_config,
)
from relay.errors import ConfigError, RelayError

#: No database here.
pytestmark = pytest.mark.backends("sqlite")

KEY_A = base64.b64encode(bytes(range(32))).decode()

VALID_TOML = """\
[relay]
public_url = "https://relay.example.com/"
listen = "0.0.0.0:8080"
app_name = "YourApp"

[database]
url = "sqlite:///data/relay.db"

[stora]
base_url = "https://public-api.stora.co/2025-09"
authorize_url = "https://public-api.stora.co/oauth2/authorize"
client_id = "cid"
client_secret_file = "secrets/client-secret"
scopes = ["public.site:read", "public.timeline_event:write"]
timeline_source_id = "tsrc_1"
max_per_second = 10
max_per_minute = 60
webhook_tolerance_s = 300

[mqtt]
host = "broker.example.com"
port = 8883
topic_prefix = "stora-gw"
client_id = "relay-1"
username = "relay"
password_file = "secrets/mqtt-password"
tls = true
ca_file = "ca.pem"
cert_file = "client.pem"
key_file = "secrets/client.key"

[secrets]
data_key_file = "secrets/data.key"
"""

#: The files VALID_TOML names, relative to the config's directory, and their content.
FILES = {
    "secrets/client-secret": "  the-client-secret\n",
    "secrets/mqtt-password": "mqtt-pass\n",
    "secrets/client.key": "-----BEGIN PRIVATE KEY-----\n",
    "secrets/data.key": f"# current\n{KEY_A}\n",
    "ca.pem": "-----BEGIN CERTIFICATE-----\n",
    "client.pem": "-----BEGIN CERTIFICATE-----\n",
}


def write_config(directory: Path, text: str = VALID_TOML) -> Path:
    """The config and every file it names, secrets with mode 0600."""
    for name, content in FILES.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
        path.chmod(0o600 if name.startswith("secrets/") else 0o644)
    path = directory / "relay.toml"
    path.write_text(text)
    return path


def load_error(path: Path) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value


def parse_line(line: str) -> tuple[str, str, str]:
    """``(file, key, reason)`` of a problem line (``key`` empty for the whole file)."""
    file, _, rest = line.partition(".toml: ")
    key, sep, reason = rest.partition(": ")
    if not sep or " " in key:
        return file + ".toml", "", rest
    return file + ".toml", key, reason


# --------------------------------------------------------------------------- mistakes

Mutation = Callable[[Path, str], str]


def sub(old: str, new: str) -> Mutation:
    """Replace ``old`` (which must occur exactly once) by ``new``."""

    def mutate(_: Path, text: str) -> str:
        assert text.count(old) == 1, old
        return text.replace(old, new)

    return mutate


def append(extra: str) -> Mutation:
    return lambda _, text: text + "\n" + extra


def prepend(extra: str) -> Mutation:
    return lambda _, text: extra + "\n" + text


def then(*mutations: Mutation) -> Mutation:
    def mutate(directory: Path, text: str) -> str:
        for one in mutations:
            text = one(directory, text)
        return text

    return mutate


def chmod(name: str, mode: int) -> Mutation:
    def mutate(directory: Path, text: str) -> str:
        (directory / name).chmod(mode)
        return text

    return mutate


def rewrite(name: str, content: str | bytes) -> Mutation:
    def mutate(directory: Path, text: str) -> str:
        path = directory / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        return text

    return mutate


def remove(name: str) -> Mutation:
    def mutate(directory: Path, text: str) -> str:
        (directory / name).unlink()
        return text

    return mutate


SECRET = "stora.client_secret_file"

# (id, mutation, exact dotted key, reason fragment)
MISTAKES: list[tuple[str, Mutation, str, str]] = [
    ("toml-syntax", append("oops = \n"), "", "TOML syntax error at line"),
    ("unknown-section", append("[mqqt]\nhost = 'x'\n"), "mqqt", "did you mean [mqtt]?"),
    ("unknown-key", sub('listen = "0.0.0.0:8080"', 'listn = "0.0.0.0:8080"'), "relay.listn",
     "unknown key; did you mean 'listen'?"),
    ("section-not-a-table", then(sub('[database]\nurl = "sqlite:///data/relay.db"\n', ""),
                                 prepend('database = "sqlite:///x.db"')), "database",
     "expected a table, found string"),
    ("missing-section", sub('[secrets]\ndata_key_file = "secrets/data.key"\n', ""),
     "secrets", "missing required section [secrets]"),
    ("missing-required", sub('app_name = "YourApp"', ""), "relay.app_name",
     "required key is missing"),
    ("missing-authorize-url",
     sub('authorize_url = "https://public-api.stora.co/oauth2/authorize"\n', ""),
     "stora.authorize_url", "required key is missing"),
    ("empty-client-id", sub('client_id = "cid"', 'client_id = ""'), "stora.client_id",
     "must not be empty"),
    ("wrong-type", sub("port = 8883", 'port = "8883"'), "mqtt.port",
     "expected an integer, found string '8883'"),
    ("float-for-int", sub("max_per_second = 10", "max_per_second = 10.0"),
     "stora.max_per_second", "expected an integer, found float 10.0"),
    ("bool-for-int", sub("webhook_tolerance_s = 300", "webhook_tolerance_s = true"),
     "stora.webhook_tolerance_s", "expected an integer, found boolean true"),
    ("int-for-string", sub('app_name = "YourApp"', "app_name = 7"), "relay.app_name",
     "expected a string, found integer 7"),
    ("string-for-bool", sub("tls = true", 'tls = "yes"'), "mqtt.tls",
     "expected a boolean (true or false), found string 'yes'"),
    ("public-url-not-http", sub('"https://relay.example.com/"', '"ftp://relay.example.com"'),
     "relay.public_url", "must be an https:// URL, found string 'ftp://relay.example.com'"),
    ("public-url-plain-http",
     sub('"https://relay.example.com/"', '"http://relay.example.com"'), "relay.public_url",
     "http:// would send tokens and secrets in the clear"),
    ("public-url-query", sub('"https://relay.example.com/"', '"https://relay.example.com/?a=1"'),
     "relay.public_url", "must not have a query (?…) or fragment (#…)"),
    ("public-url-fragment", sub('"https://relay.example.com/"', '"https://relay.example.com#x"'),
     "relay.public_url", "must not have a query"),
    ("base-url-plain-http", sub('base_url = "https://', 'base_url = "http://'),
     "stora.base_url", "http:// would send tokens and secrets in the clear"),
    ("token-url-plain-http",
     sub("[stora]\n", '[stora]\ntoken_url = "http://10.0.0.2/oauth2/token"\n'),
     "stora.token_url", "must be an https:// URL"),
    ("authorize-url-credentials", sub("https://public-api.stora.co/oauth2/authorize",
                                      "https://u:p@public-api.stora.co/oauth2/authorize"),
     "stora.authorize_url", "must not hold a user name or password"),
    ("url-bad-port", sub("https://public-api.stora.co/2025-09", "https://x:99999/2025-09"),
     "stora.base_url", "must be an https:// URL"),
    ("listen-no-port", sub('"0.0.0.0:8080"', '"0.0.0.0"'), "relay.listen",
     "must be host:port such as 127.0.0.1:8080 or [::1]:8080, found string '0.0.0.0'"),
    ("listen-bare-ipv6", sub('"0.0.0.0:8080"', '"::1:8080"'), "relay.listen",
     "write an IPv6 address in brackets"),
    ("listen-bad-ipv6", sub('"0.0.0.0:8080"', '"[::g]:8080"'), "relay.listen",
     "must be host:port"),
    ("listen-port-range", sub('"0.0.0.0:8080"', '"0.0.0.0:70000"'), "relay.listen",
     "must be host:port"),
    ("database-mysql", sub('"sqlite:///data/relay.db"', '"mysql://h/db"'), "database.url",
     "must be a sqlite:/// or postgresql:// (psycopg 3) URL, found string 'mysql://h/db'"),
    ("database-psycopg2", sub('"sqlite:///data/relay.db"', '"postgresql+psycopg2://h/db"'),
     "database.url", "must be a sqlite:/// or postgresql://"),
    ("database-password", sub('"sqlite:///data/relay.db"', '"postgresql://u:hunter2@h/db"'),
     "database.url", "must not hold the database password"),
    ("database-sqlite-no-path", sub('"sqlite:///data/relay.db"', '"sqlite://"'),
     "database.url", "a SQLite URL is sqlite:///relative/path.db"),
    ("scopes-not-a-list", sub('scopes = ["public.site:read", "public.timeline_event:write"]',
                              'scopes = "public.site:read"'),
     "stora.scopes", "expected an array of strings, found string"),
    ("scopes-bad-item", sub('"public.site:read", ', '"public.site:read", "site:read", '),
     "stora.scopes", "item 1 (string 'site:read') is not a Stora scope"),
    ("scopes-bad-verb", sub('"public.site:read", ', '"public.site:delete", '),
     "stora.scopes", "item 0 (string 'public.site:delete')"),
    ("scopes-empty-string", sub('"public.site:read", ', '"", '), "stora.scopes",
     "item 0 (string '')"),
    ("scopes-empty", sub('scopes = ["public.site:read", "public.timeline_event:write"]',
                         "scopes = []"), "stora.scopes", "must name at least one scope"),
    ("scopes-twice", sub('"public.site:read", ', '"public.site:read", "public.site:read", '),
     "stora.scopes", "names 'public.site:read' more than once"),
    ("max-per-second-0", sub("max_per_second = 10", "max_per_second = 0"),
     "stora.max_per_second", "must be at least 1, found 0"),
    ("max-per-minute-below-second", sub("max_per_minute = 60", "max_per_minute = 5"),
     "stora.max_per_minute", "must be at least max_per_second (10), found 5"),
    ("tolerance-0", sub("webhook_tolerance_s = 300", "webhook_tolerance_s = 0"),
     "stora.webhook_tolerance_s", "must be between 1 and 86400, found 0"),
    ("tolerance-too-long", sub("webhook_tolerance_s = 300", "webhook_tolerance_s = 86401"),
     "stora.webhook_tolerance_s", "must be between 1 and 86400, found 86401"),
    ("timeline-source-prefix", sub('"tsrc_1"', '"src_1"'), "stora.timeline_source_id",
     "must be a Stora timeline source id starting with 'tsrc_', found string 'src_1'"),
    ("secret-mode-0644", chmod("secrets/client-secret", 0o644), SECRET,
     "has mode 0644 and is open to group or others; run: chmod 600"),
    ("secret-mode-0640", chmod("secrets/client-secret", 0o640), SECRET, "has mode 0640"),
    ("secret-mode-0602", chmod("secrets/client-secret", 0o602), SECRET, "has mode 0602"),
    ("secret-missing", remove("secrets/client-secret"), SECRET, "does not exist"),
    ("secret-empty", rewrite("secrets/client-secret", " \n\t\n"), SECRET, "is empty"),
    ("secret-too-large", rewrite("secrets/client-secret", "x" * (64 * 1024 + 1)), SECRET,
     "is larger than 64 KiB"),
    ("secret-not-utf8", rewrite("secrets/client-secret", b"\xff\xfe"), SECRET, "not UTF-8"),
    ("secret-is-a-directory", sub('"secrets/client-secret"', '"secrets"'), SECRET,
     "is not a regular file"),
    ("secret-empty-path", sub('"secrets/client-secret"', '""'), SECRET, "must not be empty"),
    ("secret-path-nul", sub('"secrets/client-secret"', '"secrets/\\u0000x"'), SECRET,
     "must not contain a NUL character"),
    ("mqtt-password-mode", chmod("secrets/mqtt-password", 0o604), "mqtt.password_file",
     "has mode 0604"),
    ("mqtt-key-mode", chmod("secrets/client.key", 0o644), "mqtt.key_file", "run: chmod 600"),
    ("password-without-username", sub('username = "relay"', 'username = ""'),
     "mqtt.password_file", "a password needs mqtt.username"),
    ("ca-file-missing", remove("ca.pem"), "mqtt.ca_file", "does not exist"),
    ("cert-without-key", sub('key_file = "secrets/client.key"', ""), "mqtt.key_file",
     "mqtt.cert_file and mqtt.key_file go together"),
    ("mqtt-port-range", sub("port = 8883", "port = 0"), "mqtt.port",
     "must be between 1 and 65535, found 0"),
    ("topic-prefix-wildcard", sub('"stora-gw"', '"gw/#"'), "mqtt.topic_prefix", "wildcards"),
    ("topic-prefix-slash", sub('"stora-gw"', '"gw/"'), "mqtt.topic_prefix", "end with '/'"),
    ("mqtt-host-empty", sub('"broker.example.com"', '""'), "mqtt.host", "must not be empty"),
    ("mqtt-client-id-type", sub('"relay-1"', "1"), "mqtt.client_id", "expected a string"),
    ("data-key-mode", chmod("secrets/data.key", 0o644), "secrets.data_key_file",
     "has mode 0644 and is open to group or others; run: chmod 600"),
    ("data-key-missing", remove("secrets/data.key"), "secrets.data_key_file",
     "does not exist"),
    ("data-key-not-base64", rewrite("secrets/data.key", "not a key!\n"),
     "secrets.data_key_file", "line 1: not base64"),
    ("data-key-short", rewrite("secrets/data.key", base64.b64encode(b"k" * 16).decode()),
     "secrets.data_key_file", "the key is 16 bytes, not 32"),
    ("data-key-only-comments", rewrite("secrets/data.key", "# nothing yet\n"),
     "secrets.data_key_file", "holds no key"),
]

#: Mistakes whose consequence is more true problems: tls off leaves three files unused.
CONSEQUENCES = {"tls-off": ["mqtt.cert_file", "mqtt.key_file"]}
MISTAKES.append(("tls-off", sub("tls = true", "tls = false"), "mqtt.ca_file",
                 "is only used when mqtt.tls = true"))


def write_mistake(directory: Path, mutate: Mutation) -> Path:
    path = write_config(directory)
    path.write_text(mutate(directory, VALID_TOML))
    return path


@pytest.mark.parametrize(("mutate", "key", "fragment"),
                         [pytest.param(m, k, f, id=i) for i, m, k, f in MISTAKES])
def test_mistake_is_one_line_naming_file_key_and_reason(
        tmp_path: Path, mutate: Mutation, key: str, fragment: str) -> None:
    path = write_mistake(tmp_path, mutate)
    err = load_error(path)
    line = err.problems[0]
    assert len(line.splitlines()) == 1
    assert line.startswith(f"{path}: {key}: " if key else f"{path}: ")
    assert parse_line(line) == (str(path), key, parse_line(line)[2])
    assert fragment in line


@pytest.mark.parametrize(("name", "mutate", "key"),
                         [pytest.param(i, m, k, id=i) for i, m, k, _ in MISTAKES])
def test_one_mistake_is_reported_once(tmp_path: Path, name: str, mutate: Mutation,
                                      key: str) -> None:
    path = write_mistake(tmp_path, mutate)
    err = load_error(path)
    assert [parse_line(line)[1] for line in err.problems] == [key, *CONSEQUENCES.get(name, [])]
    assert str(err) == "\n".join(err.problems)


def test_there_are_many_distinct_mistakes() -> None:
    assert len({i for i, *_ in MISTAKES}) == len(MISTAKES) >= 40


def test_independent_mistakes_are_all_reported_in_one_pass(tmp_path: Path) -> None:
    text = (VALID_TOML.replace('app_name = "YourApp"', 'app_name = ""\nbogus = 1')
            .replace("max_per_minute = 60", "max_per_minute = 5")
            .replace("port = 8883", "port = 70000")
            .replace('url = "sqlite:///data/relay.db"', 'url = "mysql://x"'))
    path = write_config(tmp_path, text)
    (tmp_path / "secrets/data.key").chmod(0o640)
    err = load_error(path)
    assert [parse_line(line)[1] for line in err.problems] == [
        "relay.bogus", "relay.app_name", "database.url", "stora.max_per_minute",
        "mqtt.port", "secrets.data_key_file"]
    assert all(line.startswith(f"{path}: ") for line in err.problems)
    assert str(err).count("\n") == 5


def test_the_database_password_is_never_echoed(tmp_path: Path) -> None:
    for url in ("postgresql://u:hunter2@h/db", "mysql://u:hunter2@h/db"):
        path = write_config(tmp_path, VALID_TOML.replace("sqlite:///data/relay.db", url))
        assert "hunter2" not in str(load_error(path))


# --------------------------------------------------------------------------- valid files


def test_a_valid_config_loads(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    config = load_config(path)
    assert isinstance(config, RelayConfig)
    assert config.path == path
    assert config.relay.public_url == "https://relay.example.com"  # one slash stripped
    assert (config.relay.listen_host, config.relay.listen_port) == ("0.0.0.0", 8080)
    assert config.database.url == f"sqlite:///{tmp_path}/data/relay.db"
    assert config.database.is_sqlite
    assert config.stora.client_secret == "the-client-secret"
    assert config.stora.scopes == ("public.site:read", "public.timeline_event:write")
    assert config.mqtt.password == "mqtt-pass"
    assert config.mqtt.client_id == "relay-1"
    assert config.mqtt.ca_file == tmp_path / "ca.pem"
    assert config.mqtt.key_file == tmp_path / "secrets/client.key"
    assert config.secrets.data_key_file == tmp_path / "secrets/data.key"


def test_secrets_stay_out_of_repr(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path))
    text = repr(config)
    assert "the-client-secret" not in text
    assert "mqtt-pass" not in text
    assert "client_id='cid'" in text  # the rest is shown


MINIMAL = """\
[relay]
public_url = "https://relay.example.com"
app_name = "YourApp"
[stora]
authorize_url = "https://stora.example/oauth2/authorize"
client_id = "cid"
client_secret_file = "secrets/client-secret"
[secrets]
data_key_file = "secrets/data.key"
"""


def test_defaults_are_the_contracts(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, MINIMAL))
    assert (config.relay.listen_host, config.relay.listen_port) == ("127.0.0.1", 8080)
    assert config.database.url == "sqlite:////var/lib/stora-relay/relay.db"
    stora = config.stora
    assert stora.base_url == "https://public-api.stora.co/2025-09"
    assert stora.token_url == "https://public-api.stora.co/oauth2/token"
    assert stora.scopes == DEFAULT_SCOPES
    assert (stora.timeline_source_id, stora.max_per_second, stora.max_per_minute,
            stora.webhook_tolerance_s) == ("", 10, 60, 300)
    mqtt = config.mqtt
    assert (mqtt.host, mqtt.port, mqtt.topic_prefix, mqtt.username, mqtt.password,
            mqtt.tls, mqtt.ca_file, mqtt.cert_file, mqtt.key_file) == (
        "127.0.0.1", 1883, "stora-gw", "", None, False, None, None, None)
    assert re.fullmatch(r"stora-relay-[0-9a-f]{8}", mqtt.client_id)


def test_an_empty_client_id_is_made_once_per_load(tmp_path: Path) -> None:
    path = write_config(tmp_path, MINIMAL)
    ids = {load_config(path).mqtt.client_id for _ in range(5)}
    assert len(ids) == 5


@pytest.mark.parametrize(("listen", "host", "port"), [
    ("[::1]:8080", "::1", 8080), ("[::]:1", "::", 1), ("localhost:65535", "localhost", 65535),
    ("relay.internal:80", "relay.internal", 80),
])
def test_listen_forms(tmp_path: Path, listen: str, host: str, port: int) -> None:
    text = MINIMAL.replace("[stora]", f'listen = "{listen}"\n[stora]')
    config = load_config(write_config(tmp_path, text))
    assert (config.relay.listen_host, config.relay.listen_port) == (host, port)


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:8080", "http://localhost/", "http://[::1]:8080", "http://127.1.2.3",
    "https://relay.example.com/base/",
])
def test_plain_http_is_kept_for_loopback(tmp_path: Path, url: str) -> None:
    text = MINIMAL.replace('"https://relay.example.com"', f'"{url}"')
    assert load_config(write_config(tmp_path, text)).relay.public_url == url.removesuffix("/")


@pytest.mark.parametrize(("url", "sqlite"), [
    ("postgresql://relay@db.internal/relay", False),
    ("postgresql+psycopg://relay@db.internal:5432/relay?sslmode=require", False),
    ("postgresql:///relay?host=/run/postgresql", False),
    ("sqlite:////srv/relay.db", True),
    ("sqlite:///:memory:", True),
])
def test_database_urls_accepted(tmp_path: Path, url: str, sqlite: bool) -> None:
    text = MINIMAL + f'[database]\nurl = "{url}"\n'
    database = load_config(write_config(tmp_path, text)).database
    assert database.url == url
    assert database.is_sqlite is sqlite


def test_a_relative_sqlite_path_is_taken_from_the_config_directory(tmp_path: Path) -> None:
    text = MINIMAL + '[database]\nurl = "sqlite:///relay.db?timeout=5"\n'
    config = load_config(write_config(tmp_path, text))
    assert config.database.url == f"sqlite:///{tmp_path}/relay.db?timeout=5"


def test_default_config_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CONFIG_ENV_VAR, raising=False)
    assert default_config_path() == DEFAULT_CONFIG_PATH == Path("/etc/stora-relay/relay.toml")
    monkeypatch.setenv(CONFIG_ENV_VAR, "")
    assert default_config_path() == DEFAULT_CONFIG_PATH
    monkeypatch.setenv(CONFIG_ENV_VAR, "/tmp/r.toml")
    assert default_config_path() == Path("/tmp/r.toml")


# --------------------------------------------------------------------------- the file


def test_syntax_error_reports_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text('[relay]\nlisten = "x"\napp_name = \n')
    assert load_error(path).problems == (
        f"{path}: TOML syntax error at line 3, column 12: invalid value",)


def test_missing_file_directory_and_bad_utf8(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    assert str(load_error(missing)) == f"{missing}: config file does not exist"
    assert str(load_error(tmp_path)) == f"{tmp_path}: cannot read the config file: Is a directory"
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b'[relay]\napp_name = "\xff"\n')
    assert "not UTF-8 text (bad byte at offset 20)" in str(load_error(bad))


def test_a_file_over_one_mebibyte_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "big.toml"
    path.write_text(VALID_TOML + "#" * (1024 * 1024))
    assert str(load_error(path)) == f"{path}: file is larger than 1 MiB; not a relay config"


def test_config_error_lines_and_pickling() -> None:
    err = ConfigError(["f.toml: a: one", "f.toml: b: two\nforged"])
    assert err.problems == ("f.toml: a: one", "f.toml: b: two\\nforged")
    assert str(err) == "f.toml: a: one\nf.toml: b: two\\nforged"
    assert isinstance(err, RelayError)
    again = pickle.loads(pickle.dumps(err))
    assert again.problems == err.problems
    assert str(ConfigError.at("f.toml", "", "gone")) == "f.toml: gone"
    with pytest.raises(ValueError, match="at least one"):
        ConfigError([])


# --------------------------------------------------------------------------- the example


def example_in(directory: Path) -> Path:
    """The example config with its secret files pointed at files in ``directory``."""
    write_config(directory)
    text = (example_config()
            .replace("/etc/stora-relay/stora-client-secret", "secrets/client-secret")
            .replace("/etc/stora-relay/data.key", "secrets/data.key"))
    path = directory / "example.toml"
    path.write_text(text)
    return path


def test_the_example_config_loads(tmp_path: Path) -> None:
    config = load_config(example_in(tmp_path))
    assert config.relay.app_name == "YourApp"
    assert config.stora.scopes == DEFAULT_SCOPES
    assert config.database.url == "sqlite:////var/lib/stora-relay/relay.db"


def test_the_example_has_every_key_the_loader_accepts() -> None:
    data = tomllib.loads(example_config())
    assert {section: frozenset(keys) for section, keys in data.items()} == KNOWN_KEYS


def test_the_example_explains_each_key() -> None:
    """Each section and the keys that need it carry a comment."""
    text = example_config()
    for key in ("public_url", "listen", "client_id", "max_per_second", "webhook_tolerance_s",
                "ca_file", "cert_file", "key_file", "password_file"):
        line = next(line for line in text.splitlines() if line.startswith(f"{key} ="))
        assert "#" in line, key
    assert "chmod 600" in text
    assert "first line encrypts" in text


def test_the_example_is_refused_without_its_secret_files(tmp_path: Path) -> None:
    path = tmp_path / "example.toml"
    path.write_text(example_config())
    if os.path.exists("/etc/stora-relay"):  # pragma: no cover - an installed box
        pytest.skip("/etc/stora-relay exists here")
    keys = [parse_line(line)[1] for line in load_error(path).problems]
    assert keys == ["stora.client_secret_file", "secrets.data_key_file"]
