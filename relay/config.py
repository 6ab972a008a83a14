"""The relay's configuration: ``relay.toml`` (contract §7.1) read into frozen dataclasses.

Added to the contract: ``[mqtt] ca_file``, ``cert_file``, ``key_file`` for a TLS broker
with a private CA or client certificates.  The rules are the gateway's (contract §3):
every problem is found in one pass and raised as one :class:`~relay.errors.ConfigError`,
a line ``"<file>: <dotted.key>: <reason>"`` each, one line per mistake (a check combining
keys runs only when each was read cleanly); unknown names get a "did you mean"; secrets
are ``*_file`` keys naming files closed to group and others; relative paths, a relative
SQLite database included, are taken from the config file's directory.  The table reader
and the checks of single values are ``relay/config_reader.py``.
"""

from __future__ import annotations

import functools
import os
import re
import secrets
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from relay.config_reader import (
    REQUIRED,
    Check,
    Table,
    database_url,
    filled,
    flag,
    integer,
    key_file,
    listen,
    optional,
    plain_file,
    plain_text,
    scopes,
    secret_path,
    secret_text,
    source_id,
    topic,
    url,
    url_stripped,
)
from relay.errors import ConfigError

__all__ = [
    "CONFIG_ENV_VAR", "DEFAULT_CONFIG_PATH", "DEFAULT_DATABASE_URL", "DEFAULT_SCOPES",
    "KNOWN_KEYS", "DatabaseSection", "MqttSection", "RelayConfig", "RelaySection",
    "SecretsSection", "StoraSection", "default_config_path", "example_config", "load_config",
]

CONFIG_ENV_VAR: Final = "STORA_RELAY_CONFIG"
DEFAULT_CONFIG_PATH: Final = Path("/etc/stora-relay/relay.toml")
DEFAULT_DATABASE_URL: Final = "sqlite:////var/lib/stora-relay/relay.db"
#: What the relay asks an operator for (contract §7.1).
DEFAULT_SCOPES: Final = (
    "public.site:read", "public.unit:read", "public.unit_allocation:read",
    "public.tenancy:read", "public.contact:read", "public.timeline_event:write",
    "public.webhook_endpoint:read", "public.webhook_endpoint:write",
)
#: A config is a few kilobytes; a wrong --config (a log, /dev/zero) must not fill memory.
_MAX_FILE_BYTES: Final = 1024 * 1024
#: Upper bound of ``webhook_tolerance_s``: more than a day of clock skew is a mistake.
_MAX_TOLERANCE_S: Final = 86_400


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True, slots=True)
class RelaySection:
    """``[relay]``: where the relay is reached (no trailing slash) and listens."""

    public_url: str
    listen_host: str  # an IPv6 address without its brackets
    listen_port: int
    app_name: str


@dataclass(frozen=True, slots=True)
class DatabaseSection:
    """``[database]``: a SQLAlchemy URL; a relative SQLite path is made absolute."""

    url: str = DEFAULT_DATABASE_URL

    @property
    def is_sqlite(self) -> bool:
        """True for SQLite (a single replica), False for PostgreSQL."""
        return self.url.startswith("sqlite:")


@dataclass(frozen=True, slots=True)
class StoraSection:
    """``[stora]``: the partner application's credentials and how hard to call Stora."""

    base_url: str
    authorize_url: str
    token_url: str
    client_id: str
    client_secret: str = field(repr=False)
    scopes: tuple[str, ...]
    timeline_source_id: str
    max_per_second: int
    max_per_minute: int
    webhook_tolerance_s: int


@dataclass(frozen=True, slots=True)
class MqttSection:
    """``[mqtt]``: the cloud broker the site gateways bridge to."""

    host: str
    port: int
    topic_prefix: str
    client_id: str  # "stora-relay-<8 hex>", made once per load, when the file leaves it ""
    username: str
    password: str | None = field(repr=False)
    tls: bool
    ca_file: Path | None
    cert_file: Path | None
    key_file: Path | None


@dataclass(frozen=True, slots=True)
class SecretsSection:
    """``[secrets]``: the key file of encryption at rest (:class:`relay.crypto.Keyring`)."""

    data_key_file: Path


@dataclass(frozen=True, slots=True)
class RelayConfig:
    """A checked ``relay.toml``."""

    path: Path
    relay: RelaySection
    database: DatabaseSection
    stora: StoraSection
    mqtt: MqttSection
    secrets: SecretsSection


# --------------------------------------------------------------------------- loading


def default_config_path() -> Path:
    """``$STORA_RELAY_CONFIG`` when set and not empty, else :data:`DEFAULT_CONFIG_PATH`."""
    return Path(os.environ.get(CONFIG_ENV_VAR) or DEFAULT_CONFIG_PATH)


def load_config(path: Path) -> RelayConfig:
    """Read and check the relay's config file; :class:`ConfigError`, and nothing else, on
    problems.  What stops everything (a missing file, bad UTF-8, TOML syntax, a file over
    1 MiB) is a single line; otherwise every problem of the file is listed."""
    file = os.fspath(path)
    try:
        with open(file, "rb") as fp:
            raw = fp.read(_MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError.at(file, "", "config file does not exist") from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError.at(file, "", f"cannot read the config file: {why}") from exc
    if len(raw) > _MAX_FILE_BYTES:
        raise ConfigError.at(file, "", "file is larger than 1 MiB; not a relay config")
    try:
        text = raw.decode("utf-8-sig")  # -sig: the byte-order mark of Windows editors
    except UnicodeDecodeError as exc:
        raise ConfigError.at(file, "", f"not UTF-8 text (bad byte at offset {exc.start}); "
                                       f"save it as UTF-8") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError.at(file, "", _syntax_reason(exc)) from exc
    except (RecursionError, ValueError) as exc:  # arrays nested too deep, huge integers
        raise ConfigError.at(file, "", f"TOML syntax error: {exc}") from exc
    return _build(data, file, Path(file).absolute().parent)


def _syntax_reason(exc: tomllib.TOMLDecodeError) -> str:
    # Python 3.11-3.13 end the message with the position, "Invalid value (at line 3,
    # column 12)"; it becomes "TOML syntax error at line 3, column 12: invalid value".
    found = re.fullmatch(r"(?s)(.*?)\s*\((at line \d+, column \d+|at end of document)\)",
                         str(exc))
    what, where = (found.group(1), found.group(2)) if found else (str(exc), "")
    what = what[:1].lower() + what[1:]
    return f"TOML syntax error {where}: {what}" if where else f"TOML syntax error: {what}"


def _build(data: Mapping[str, Any], file: str, base_dir: Path) -> RelayConfig:
    """Every key of every section read through its check (:data:`_SPEC`), then the rules
    that combine keys; the dataclasses are built only from a file without problems."""
    problems: list[str] = []
    root = Table(data, file, "", base_dir, problems)
    root.check_keys(_SPEC, section=True)
    v: dict[str, dict[str, Any]] = {}
    for name, spec in _SPEC.items():
        table = root.section(name, spec, required=name in _REQUIRED_SECTIONS)
        v[name] = table.read(spec)
        if name in _COMBINED:
            _COMBINED[name](table, v[name])
    if problems:
        raise ConfigError(problems)
    relay, stora, mqtt = v["relay"], v["stora"], v["mqtt"]
    host, port = relay.pop("listen")
    return RelayConfig(
        path=Path(file),
        relay=RelaySection(listen_host=host, listen_port=port, **relay),
        database=DatabaseSection(**v["database"]),
        stora=StoraSection(client_secret=stora.pop("client_secret_file"), **stora),
        mqtt=MqttSection(password=mqtt.pop("password_file"),
                         client_id=mqtt.pop("client_id") or
                         f"stora-relay-{secrets.token_hex(4)}", **mqtt),
        secrets=SecretsSection(**v["secrets"]),
    )


def _combined_stora(t: Table, v: Mapping[str, Any]) -> None:
    if t.ok("max_per_second", "max_per_minute") and \
            v["max_per_minute"] < v["max_per_second"]:
        t.error("max_per_minute", f"must be at least max_per_second "
                                  f"({v['max_per_second']}), found {v['max_per_minute']}")


def _combined_mqtt(t: Table, v: Mapping[str, Any]) -> None:
    if t.ok("password_file", "username") and v["password_file"] and not v["username"]:
        t.error("password_file", "a password needs mqtt.username")
    named = [name for name in ("ca_file", "cert_file", "key_file")
             if t.ok(name) and v[name] is not None]
    if t.ok("tls") and not v["tls"]:
        for name in named:
            t.error(name, "is only used when mqtt.tls = true")
    elif t.ok("cert_file", "key_file") and len({"cert_file", "key_file"} & set(named)) == 1:
        t.error("key_file" if "cert_file" in named else "cert_file",
                "mqtt.cert_file and mqtt.key_file go together: name both")


_COMBINED: Final[Mapping[str, Callable[[Table, Mapping[str, Any]], None]]] = {
    "stora": _combined_stora, "mqtt": _combined_mqtt}


# --------------------------------------------------------------------------- the keys

_REQUIRED_SECTIONS: Final = frozenset({"relay", "stora", "secrets"})
#: Each section's keys: ``name: (check, default)``, ``REQUIRED`` for no default.  The
#: order is the order problems are listed in.
_SPEC: Final[Mapping[str, Mapping[str, tuple[Check, object]]]] = {
    "relay": {"public_url": (url_stripped, REQUIRED),
              "listen": (listen, "127.0.0.1:8080"),
              "app_name": (filled, REQUIRED)},
    "database": {"url": (database_url, DEFAULT_DATABASE_URL)},
    "stora": {"base_url": (url_stripped, "https://public-api.stora.co/2025-09"),
              "authorize_url": (url, REQUIRED),
              "token_url": (url, "https://public-api.stora.co/oauth2/token"),
              "client_id": (filled, REQUIRED),
              "client_secret_file": (secret_text, REQUIRED),
              "scopes": (scopes, list(DEFAULT_SCOPES)),
              "timeline_source_id": (source_id, ""),
              "max_per_second": (integer(1), 10),
              "max_per_minute": (integer(1), 60),
              "webhook_tolerance_s": (integer(1, _MAX_TOLERANCE_S), 300)},
    "mqtt": {"host": (filled, "127.0.0.1"),
             "port": (integer(1, 65535), 1883),
             "topic_prefix": (topic, "stora-gw"),
             "client_id": (plain_text, ""),
             "username": (plain_text, ""),
             "password_file": (optional(secret_text), ""),
             "tls": (flag, False),
             "ca_file": (optional(plain_file), ""),
             "cert_file": (optional(plain_file), ""),
             "key_file": (optional(secret_path), "")},
    "secrets": {"data_key_file": (key_file, REQUIRED)},
}
#: Every key the loader accepts, by section (the example config is checked against it).
KNOWN_KEYS: Final[Mapping[str, frozenset[str]]] = {
    section: frozenset(keys) for section, keys in _SPEC.items()}


# --------------------------------------------------------------------------- example


@functools.cache
def example_config() -> str:
    """A complete, commented ``relay.toml`` (contract §7.1): what ``check-config`` and the
    docs show.  Every key the loader accepts is in it (a test checks)."""
    return _EXAMPLE


_EXAMPLE: Final = '''\
# stora-relay configuration.  Relative paths are taken from the
# directory of this file.  Secrets are never written here: each *_file key names a file
# readable only by the relay's user (chmod 600), or the relay refuses to start.

[relay]
public_url = "https://relay.example.com"   # base of the OAuth redirect URI and webhook URLs
listen = "127.0.0.1:8080"                  # host:port; IPv6 in brackets: "[::1]:8080"
app_name = "YourApp"                       # Timeline Events say "Unit locked via YourApp"

[database]
# SQLite for one replica (sqlite:///relative/path.db or sqlite:////absolute/path.db), or
# "postgresql://user@host/relay" (psycopg 3) for several; the password goes in ~/.pgpass.
url = "sqlite:////var/lib/stora-relay/relay.db"

[stora]
base_url = "https://public-api.stora.co/2025-09"
authorize_url = "https://public-api.stora.co/oauth2/authorize"  # use the one Stora gives
token_url = "https://public-api.stora.co/oauth2/token"
client_id = "your-client-id"                # the partner application's credentials
client_secret_file = "/etc/stora-relay/stora-client-secret"
# What operators are asked to grant; each is explained on the connect page.
scopes = ["public.site:read", "public.unit:read", "public.unit_allocation:read",
          "public.tenancy:read", "public.contact:read", "public.timeline_event:write",
          "public.webhook_endpoint:read", "public.webhook_endpoint:write"]
timeline_source_id = ""                     # "tsrc_…" for the relay's own Timeline Events
max_per_second = 10                         # per operator, shared by every replica
max_per_minute = 60                         # at least max_per_second
webhook_tolerance_s = 300                   # accepted clock skew of signed webhooks (1-86400)

[mqtt]                                      # the cloud broker the site gateways bridge to
host = "127.0.0.1"
port = 1883                                 # usually 8883 with tls = true
topic_prefix = "stora-gw"                   # the gateways' mqtt.topic_prefix
client_id = ""                              # default: "stora-relay-<random>" per process
username = ""
password_file = ""                          # needs username
tls = false
ca_file = ""                                # with tls: a private CA (default: system CAs)
cert_file = ""                              # with tls: a client certificate ...
key_file = ""                               # ... and its private key (a secret file)

[secrets]
# Keys that encrypt tokens and secrets at rest: one per line, 32 random bytes in base64
# (`openssl rand -base64 32`).  The first line encrypts; lines below it only decrypt, so
# to rotate put a new key on top, keep the old one until nothing uses it, then delete it.
data_key_file = "/etc/stora-relay/data.key"
'''
