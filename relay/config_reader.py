"""The reader behind ``relay/config.py``: one TOML table at a time, through checks.

A :class:`Table` reads its keys through *checks* (a function of the raw value and the
config's directory that returns the typed value or calls :func:`bad`), records one
problem line per mistake and suggests the closest known name for an unknown one.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any, Final, NoReturn
from urllib.parse import urlsplit

from relay.crypto import Keyring, read_secret_file
from relay.errors import ConfigError, SecretFileError, problem_line
from relay.errors import describe as show

_SCOPE = re.compile(r"public\.[a-z][a-z0-9_]*:(?:read|write)")
_HOST = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?")

# --------------------------------------------------------------------------- the reader

REQUIRED: Final = object()


class BadValueError(ValueError):
    """A value's problem (its message); the table records it against the key read."""


def bad(reason: str) -> NoReturn:
    raise BadValueError(reason)


#: A check takes the raw value and the config's directory (for paths) and returns the
#: typed value or raises :class:`BadValueError`.
Check = Callable[[object, Path], Any]


class Table:
    """One TOML table of the file: reads its keys through checks, records each problem."""

    def __init__(self, data: Mapping[str, Any], file: str, prefix: str, base_dir: Path,
                 problems: list[str]) -> None:
        self.data, self.file, self.prefix = data, file, prefix
        self.base_dir, self.problems = base_dir, problems
        self.bad: set[str] = set()

    def error(self, name: str, reason: str) -> None:
        self.bad.add(name)
        key = f"{self.prefix}.{name}" if self.prefix else name
        line = problem_line(self.file, key, reason)
        if line not in self.problems:
            self.problems.append(line)

    def ok(self, *names: str) -> bool:
        return self.bad.isdisjoint(names)

    def check_keys(self, allowed: Collection[str], *, section: bool = False) -> None:
        for name in map(str, self.data):
            if name not in allowed:
                near = difflib.get_close_matches(name, list(allowed), n=1)
                hint = (f"[{near[0]}]" if section else f"'{near[0]}'") if near else ""
                self.error(name, (f"unknown section [{name}]" if section else "unknown key")
                           + (f"; did you mean {hint}?" if hint else ""))

    def read(self, spec: Mapping[str, tuple[Check, object]]) -> dict[str, Any]:
        """Each key of ``spec`` (``name: (check, default)``) through its check; a key
        with a problem is recorded, marked bad and left out of the result."""
        values: dict[str, Any] = {}
        for name, (check, default) in spec.items():
            value = self.data.get(name, default)
            if value is REQUIRED:
                self.error(name, "required key is missing")
                continue
            try:
                values[name] = check(value, self.base_dir)
            except BadValueError as exc:
                self.error(name, str(exc))
        return values

    def section(self, name: str, keys: Collection[str], *, required: bool) -> Table:
        """``[name]`` with its unknown keys recorded; when it is missing or not a table,
        that is recorded and an empty table whose own problems go nowhere returned."""
        value = self.data.get(name)
        if isinstance(value, Mapping):
            table = Table(value, self.file, name, self.base_dir, self.problems)
            table.check_keys(keys)
            return table
        if value is not None:
            self.error(name, f"expected a table, found {show(value)}")
        elif required:
            self.error(name, f"missing required section [{name}]")
        return Table({}, self.file, name, self.base_dir, [])


# --------------------------------------------------------------------------- checks
# Each takes the raw value and the config's directory (used by the path checks only).


def plain_text(value: object, _: Path) -> str:
    if not isinstance(value, str):
        bad(f"expected a string, found {show(value)}")
    return value


def filled(value: object, base_dir: Path) -> str:
    if not plain_text(value, base_dir).strip():
        bad("must not be empty")
    return str(value)


def flag(value: object, _: Path) -> bool:
    if not isinstance(value, bool):
        bad(f"expected a boolean (true or false), found {show(value)}")
    return value


def integer(lo: int, hi: int | None = None) -> Check:
    def check(value: object, _: Path) -> int:
        # bool is an int to Python, but "port = true" is a mistake, not the number 1.
        if isinstance(value, bool) or not isinstance(value, int):
            bad(f"expected an integer, found {show(value)}")
        if value < lo or (hi is not None and value > hi):
            span = f"at least {lo}" if hi is None else f"between {lo} and {hi}"
            bad(f"must be {span}, found {show(value).removeprefix('integer ')}")
        return value
    return check


def optional(check: Check) -> Check:
    """``check`` for a value that may be left empty (``""``: not used, ``None``)."""
    return lambda value, base_dir: None if value == "" else check(value, base_dir)


def parse_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def url(value: object, base_dir: Path) -> str:
    """An absolute https URL (http only for a loopback host), no query nor fragment."""
    text = filled(value, base_dir)
    try:
        parts = urlsplit(text)
        valid = parts.scheme in ("http", "https") and bool(parts.hostname)
        _ = parts.port  # a port that is not a number raises ValueError here
    except ValueError:
        valid = False
    if not valid:
        bad(f"must be an https:// URL, found {show(text)}")
    if parts.username is not None or parts.password is not None:
        bad("must not hold a user name or password (secrets go in *_file keys)")
    if parts.query or parts.fragment or text.endswith(("?", "#")):
        bad(f"must not have a query (?…) or fragment (#…), found {show(text)}")
    host = parts.hostname or ""
    ip = parse_ip(host)
    if parts.scheme == "http" and host.rstrip(".") != "localhost" and not (
            ip and ip.is_loopback):
        bad(f"must be an https:// URL: http:// would send tokens and secrets in the clear "
             f"(it is accepted only for a loopback host such as 127.0.0.1), found "
             f"{show(text)}")
    return text


def url_stripped(value: object, base_dir: Path) -> str:
    """:func:`url` without one trailing slash: paths are appended to it."""
    return url(value, base_dir).removesuffix("/")


def listen(value: object, base_dir: Path) -> tuple[str, int]:
    """``host:port``, an IPv6 address in brackets: ``[::1]:8080``."""
    text = filled(value, base_dir)
    usage = f"must be host:port such as 127.0.0.1:8080 or [::1]:8080, found {show(text)}"
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not isinstance(parse_ip(host), ipaddress.IPv6Address):
            bad(usage)
    else:
        host, sep, port = text.rpartition(":")
        if ":" in host:
            bad(f"write an IPv6 address in brackets, e.g. [::1]:8080, found {show(text)}")
        if not _HOST.fullmatch(host):
            bad(usage)
    if not sep or not re.fullmatch(r"[0-9]{1,5}", port) or not 1 <= int(port) <= 65535:
        bad(usage)
    return host, int(port)


def topic(value: object, base_dir: Path) -> str:
    text = filled(value, base_dir)
    if any(ch in "+#\0" for ch in text):
        bad(f"must not contain MQTT wildcards '+' or '#', found {show(text)}")
    if text.startswith(("/", "$")) or text.endswith("/"):
        bad(f"must not start with '/' or '$' nor end with '/', found {show(text)}")
    return text


def scopes(value: object, _: Path) -> tuple[str, ...]:
    if not isinstance(value, list):
        bad(f"expected an array of strings, found {show(value)}")
    if not value:
        bad("must name at least one scope")
    for index, item in enumerate(value):
        if not isinstance(item, str) or not _SCOPE.fullmatch(item):
            bad(f"item {index} ({show(item)}) is not a Stora scope of the form "
                 f"public.<resource>:read or :write")
    twice = sorted({item for item in value if value.count(item) > 1})
    if twice:
        bad(f"names {twice[0]!r} more than once")
    return tuple(value)


def source_id(value: object, base_dir: Path) -> str:
    text = plain_text(value, base_dir)
    if text and (not text.startswith("tsrc_") or text == "tsrc_"):
        bad(f"must be a Stora timeline source id starting with 'tsrc_', found {show(text)}")
    return text


def database_url(value: object, base_dir: Path) -> str:
    """``sqlite:///path`` (a relative path made absolute) or ``postgresql[+psycopg]://``."""
    text = filled(value, base_dir)
    scheme, sep, rest = text.partition("://")
    if sep and scheme == "sqlite":
        path, mark, query = rest.removeprefix("/").partition("?")
        if not rest.startswith("/") or not path or "\0" in path:
            bad(f"a SQLite URL is sqlite:///relative/path.db or sqlite:////absolute/path.db, "
                 f"found {show(text)}")
        if path != ":memory:":
            path = str(base_dir / path)  # base_dir is absolute; an absolute path stays
        return f"sqlite:///{path}{mark}{query}"
    if sep and scheme in ("postgresql", "postgresql+psycopg") and rest:
        try:
            password = urlsplit(text).password
        except ValueError:
            raise BadValueError("is not a valid postgresql:// URL") from None
        if password is not None:
            bad("must not hold the database password (secrets are never inline, contract "
                 "§3): put it in ~/.pgpass or name a file with ?passfile=…")
        return text
    shown = "a URL with credentials" if "@" in text else show(text)  # never echo them
    bad(f"must be a sqlite:/// or postgresql:// (psycopg 3) URL, found {shown}")


def file_path(value: object, base_dir: Path) -> Path:
    text = filled(value, base_dir)
    if "\0" in text:
        bad(f"a path must not contain a NUL character, found {show(text)}")
    return base_dir / text


def plain_file(value: object, base_dir: Path) -> Path:
    """A file that must exist (a CA, a certificate)."""
    path = file_path(value, base_dir)
    if not path.exists():
        bad(f"file {path} does not exist")
    if not path.is_file():
        bad(f"file {path} is not a regular file")
    return path


def secret_text(value: object, base_dir: Path) -> str:
    """A secret file's stripped text (:func:`relay.crypto.read_secret_file`)."""
    try:
        return read_secret_file(file_path(value, base_dir))
    except SecretFileError as exc:
        raise BadValueError(exc.reason) from None


def secret_path(value: object, base_dir: Path) -> Path:
    """A secret file read by someone else (a TLS private key): checked, not kept."""
    secret_text(value, base_dir)
    return file_path(value, base_dir)


def key_file(value: object, base_dir: Path) -> Path:
    path = file_path(value, base_dir)
    try:
        Keyring.from_file(path)
    except ConfigError as exc:  # its single line names the file and the reason
        raise BadValueError(exc.problems[0]) from None
    return path
