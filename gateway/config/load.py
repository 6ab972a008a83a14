"""Reading a config file: bytes to TOML to a checked :class:`~gateway.config.model.Config`.

Every problem a file has is found in one pass and raised together as
:class:`~gateway.config.reader.ConfigErrors`; only what makes every later check
meaningless (a missing or unreadable file, bad UTF-8, TOML syntax) stops at once, as a
single ConfigError.  See docs/design/configuration.md.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final, TypeVar

from drivers.registry import registry
from gateway.config.controllers import check_mqtt_accounts, parse_controllers
from gateway.config.locks import LOCK_KEYS, parse_locks
from gateway.config.model import (
    CONFIG_ENV_VAR,
    DEFAULT_CONFIG_PATH,
    DEFAULT_DB,
    DEFAULT_SOCKET,
    Config,
    ControlConfig,
    StorageConfig,
    TelemetryConfig,
)
from gateway.config.problems import Problems, guarded
from gateway.config.reader import Table, os_reason, show
from gateway.config.sections import (
    COMMANDS_KEYS,
    MQTT_KEYS,
    SITE_KEYS,
    STORA_KEYS,
    TELEMETRY_KEYS,
    no_commands,
    no_site,
    no_stora,
    parse_commands,
    parse_control,
    parse_mqtt,
    parse_site,
    parse_stora,
    parse_storage,
    parse_telemetry,
)
from gateway.errors import ConfigError

__all__ = [
    "config_path_from_env",
    "known_keys",
    "load_config",
    "parse_config",
    "parse_config_bytes",
]

# A config file is a few kilobytes; refusing anything huge keeps a wrong --config (a log
# file, /dev/zero) from eating the memory of a small box.
_MAX_FILE_BYTES: Final = 1024 * 1024

_T = TypeVar("_T")


def config_path_from_env(explicit: str | None) -> str:
    """The config file to use: ``explicit`` (``--config``), else ``$STORA_GATEWAY_CONFIG``,
    else :data:`DEFAULT_CONFIG_PATH`.  Empty strings count as not given.
    """
    if explicit:
        return explicit
    return os.environ.get(CONFIG_ENV_VAR) or DEFAULT_CONFIG_PATH


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read, parse and validate the TOML file at ``path``.

    Raises :class:`ConfigError`, and nothing else, for every problem: missing or
    unreadable file, bad UTF-8, TOML syntax (with line and column), and every rule of
    :func:`parse_config`.
    """
    file = os.fspath(path)
    try:
        with open(file, "rb") as fp:
            raw = fp.read(_MAX_FILE_BYTES + 1)
    except FileNotFoundError as exc:
        raise ConfigError(file, "", "config file does not exist") from exc
    except IsADirectoryError as exc:
        raise ConfigError(file, "", "is a directory, not a config file") from exc
    except PermissionError as exc:
        raise ConfigError(file, "", "permission denied reading the config file") from exc
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        raise ConfigError(file, "", f"cannot read the config file: {os_reason(exc)}") from exc
    return parse_config_bytes(raw, file, Path(file).absolute().parent)


def parse_config_bytes(raw: bytes, file: str, base_dir: Path) -> Config:
    """Decode, parse and validate the bytes of a config file, as :func:`load_config` does.

    ``file`` names it in errors and becomes ``Config.path``; relative paths resolve
    against ``base_dir``.  A signed ``config.set`` validates the new text with this,
    against the directory the real file is named in, before anything is written.
    """
    if len(raw) > _MAX_FILE_BYTES:
        raise ConfigError(file, "", "file is larger than 1 MiB; not a gateway config")
    try:
        # utf-8-sig: tolerate the byte-order mark some Windows editors add.
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            file, "", f"not UTF-8 text (bad byte at offset {exc.start}); save it as UTF-8"
        ) from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(file, "", _toml_reason(exc)) from exc
    except RecursionError as exc:
        raise ConfigError(file, "", "TOML syntax error: arrays nested too deeply") from exc
    except ValueError as exc:  # e.g. an integer literal with thousands of digits
        raise ConfigError(file, "", f"TOML syntax error: {exc}") from exc
    return parse_config(data, file, base_dir)


def _toml_reason(exc: tomllib.TOMLDecodeError) -> str:
    """``"TOML syntax error at line 3, column 7: invalid value"`` from a TOMLDecodeError.

    Python < 3.14 has no ``lineno``/``colno`` attributes; the position is the
    parenthesised tail of the message ("Invalid value (at line 3, column 7)").
    """
    message = str(exc)
    lineno = getattr(exc, "lineno", None)
    colno = getattr(exc, "colno", None)
    match = re.fullmatch(r"(?s)(.*?)\s*\((at line \d+, column \d+|at end of document)\)", message)
    if match:
        what, where = match.group(1), match.group(2)
    else:
        what, where = message, ""
    if isinstance(lineno, int) and isinstance(colno, int):
        where = f"at line {lineno}, column {colno}"
    what = what[:1].lower() + what[1:]
    return f"TOML syntax error {where}: {what}" if where else f"TOML syntax error: {what}"


def parse_config(data: Mapping[str, Any], file: str, base_dir: Path) -> Config:
    """Validate already-parsed TOML ``data`` and build a :class:`Config`.

    ``file`` is used in error messages and as ``Config.path``; relative paths in the data
    resolve against ``base_dir``.  Raises :class:`ConfigError` only: a
    :class:`ConfigErrors` listing every problem found, or a single ConfigError when the
    top of the document is not a table.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(file, "", f"expected a TOML table at the top, found {show(data)}")
    problems = Problems()
    root = Table(data, file, "", base_dir.absolute(), problems)
    root.check_keys(_SECTIONS, section=True)
    site = _section(root.table("site", required=True), parse_site, no_site)
    mqtt_table = root.table("mqtt")
    mqtt = _section(mqtt_table, lambda t: parse_mqtt(t, site),
                    lambda: parse_mqtt(_scratch(root, "mqtt"), site))
    commands = _section(root.table("commands", required=True), parse_commands, no_commands)
    stora = _section(root.table("stora", required=True), parse_stora, no_stora)
    storage = _section(root.table("storage"), parse_storage,
                       lambda: StorageConfig(path=Path(DEFAULT_DB)))
    control = _section(root.table("control"), parse_control,
                       lambda: ControlConfig(socket=Path(DEFAULT_SOCKET)))
    telemetry = _section(root.table("telemetry"), parse_telemetry, TelemetryConfig)
    parsed = parse_controllers(root.tables("controllers"))
    # With [[controllers]] itself wrong, a lock naming one cannot be judged.
    parsed.unnamed |= not root.ok("controllers")
    # Judging accounts needs the [mqtt] broker and user as they are meant to be.
    if mqtt_table is not None and mqtt_table.ok("host", "port", "username"):
        check_mqtt_accounts(mqtt, parsed)
    locks = parse_locks(root.tables("locks"), parsed)
    problems.raise_any()
    return Config(
        path=Path(file),
        site=site,
        mqtt=mqtt,
        commands=commands,
        stora=stora,
        storage=storage,
        control=control,
        controllers=tuple(c for _, c in parsed.built),
        locks=locks,
        telemetry=telemetry,
    )


_SECTIONS: Final = ("site", "mqtt", "commands", "stora", "storage", "control", "telemetry",
                    "controllers", "locks")


def _section(table: Table | None, parse: Callable[[Table], _T],
             fallback: Callable[[], _T]) -> _T:
    """One section parsed, or ``fallback()`` when it is missing, not a table, or stopped
    by a problem that made the rest of it meaningless (recorded)."""
    if table is None:
        return fallback()
    return guarded(table.problems, lambda: parse(table), fallback)


def _scratch(root: Table, name: str) -> Table:
    """An empty table whose problems go nowhere: parsed, it gives a section's defaults."""
    return Table({}, root.file, name, root.base_dir, Problems())


def known_keys() -> dict[str, frozenset[str]]:
    """Every key the loader accepts, by section.

    ``site``, ``mqtt``, ``commands``, ``stora``, ``storage``, ``control``, ``telemetry``,
    ``locks``, and ``controllers.<driver>`` for each driver (``commands.trusted_keys``
    holds key ids of the operator's choosing, so it has no fixed keys).  The shipped
    example config and the docs are checked against this, so a new key without an
    example fails a test.
    """
    keys: dict[str, frozenset[str]] = {
        "site": SITE_KEYS,
        "mqtt": MQTT_KEYS,
        "commands": COMMANDS_KEYS,
        "stora": STORA_KEYS,
        "storage": frozenset({"path"}),
        "control": frozenset({"socket"}),
        "telemetry": TELEMETRY_KEYS,
        "locks": LOCK_KEYS,
    }
    for driver, spec in registry().items():
        keys[f"controllers.{driver}"] = spec.keys
    return keys
