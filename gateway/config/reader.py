"""Reading one parsed TOML config: typed getters that name the key, and every problem kept.

:mod:`gateway.config` knows the sections and builds the dataclasses; this module is how it
reads them.  A :class:`Table` is one TOML table at a dotted position of one file.  Its
getters check type and range; when a value is wrong they record a
:class:`~gateway.errors.ConfigError` naming the file, the key and the reason in the
file's :class:`~gateway.config.problems.Problems`, mark the key bad, and return a
fallback of the right type, so that checking goes on.  ``check-config`` thereby reports
every mistake of a file in one run, not one per run (issue 12: an installer needed eleven
rounds for one board).  The drivers read their controller tables through it too
(:class:`drivers.settings.SettingsReader`).

How a section parser uses it:

* :meth:`Table.error` records a problem and returns: for a problem no later check of the
  table depends on.
* :meth:`Table.fail` raises: for a problem that makes the rest of *that* table
  meaningless (an unknown driver has no keys to check).
  :func:`~gateway.config.problems.guarded` records it and the parser goes on with the
  next table.
* A check that combines keys runs only when :meth:`Table.ok` says each of them was read
  without a problem, so one mistake is reported once, never again as the consequence of
  its fallback value.
* What is built while problems exist is thrown away: the loader raises
  :class:`~gateway.config.problems.ConfigErrors` at the end, and no
  :class:`~gateway.config.Config` escapes.

Problems that make every later check meaningless (a file that is not UTF-8 or not TOML)
are raised at once by the loader, as a single ConfigError.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final, NoReturn, TypeVar
from urllib.parse import urlsplit

from gateway.config.problems import MissingFileError, Problems
from gateway.errors import ConfigError

__all__ = [
    "Table",
    "check_stora_id",
    "check_topic_segment",
    "is_loopback",
    "os_reason",
    "show",
    "show_int",
]

_T = TypeVar("_T")

_TOPIC_FORBIDDEN: Final = frozenset("+#\0")


# --------------------------------------------------------------------------- the reader


class Table:
    """One TOML table being read.

    It knows its file, its dotted position, the config's directory and the file's
    :class:`Problems`, so every typed getter can check the value and record a ConfigError
    naming the exact key.  A getter whose ``default`` is ``None`` treats the key as
    required.  ``bad`` holds the names of this table's keys that had a problem; ``index``
    is the position of an ``[[array]]`` item (``None`` for a plain table).
    """

    __slots__ = ("bad", "base_dir", "data", "file", "index", "prefix", "problems")

    def __init__(self, data: Mapping[str, Any], file: str, prefix: str, base_dir: Path,
                 problems: Problems, *, index: int | None = None) -> None:
        self.data = data
        self.file = file
        self.prefix = prefix
        self.base_dir = base_dir
        self.problems = problems
        self.index = index
        self.bad: set[str] = set()

    def key(self, name: str) -> str:
        """The dotted key of ``name`` in this table."""
        return f"{self.prefix}.{name}" if self.prefix else name

    def fail(self, name: str, reason: str) -> NoReturn:
        """Raise the ConfigError for key ``name``: the rest of this table is not checked."""
        self.bad.add(name)
        raise ConfigError(self.file, self.key(name), reason)

    def error(self, name: str, reason: str) -> None:
        """Record the ConfigError for key ``name`` and go on checking."""
        self.bad.add(name)
        self.problems.add(ConfigError(self.file, self.key(name), reason))

    def ok(self, *names: str) -> bool:
        """True when none of ``names`` had a problem (checks that combine them may run)."""
        return not any(name in self.bad for name in names)

    @property
    def clean(self) -> bool:
        """True when no key of this table had a problem."""
        return not self.bad

    @contextmanager
    def checking(self, name: str) -> Iterator[None]:
        """Run a block whose ``fail`` is recorded against ``name`` instead of raised."""
        try:
            yield
        except ConfigError as exc:
            self.bad.add(name)
            self.problems.add(exc)

    def has(self, name: str) -> bool:
        """True when ``name`` is present in the table."""
        return name in self.data

    def check_keys(
        self,
        allowed: Collection[str],
        *,
        section: bool = False,
        driver: str | None = None,
        other_drivers_keys: Collection[str] = (),
    ) -> None:
        """Record every key not in ``allowed``, suggesting the closest allowed one.

        With ``driver``, a key that some other driver accepts is reported as "not valid
        for driver X": the usual mistake is a key copied from another controller.
        """
        for raw_name in self.data:
            if raw_name in allowed:
                continue
            name = str(raw_name)
            if driver is not None and name in other_drivers_keys:
                self.error(name, f"key not valid for driver {driver} (its keys are: "
                                 f"{', '.join(sorted(allowed))})")
                continue
            import difflib  # only on a mistake: the agent need not keep it (~160 KB)

            close = difflib.get_close_matches(name, list(allowed), n=1)
            if section:
                hint = f"; did you mean [{close[0]}]?" if close else ""
                self.error(name, f"unknown section [{name}]{hint}")
            else:
                hint = f"; did you mean '{close[0]}'?" if close else ""
                self.error(name, f"unknown key{hint}")

    def _soft(self, name: str, read: Callable[[], _T], fallback: _T) -> _T:
        """``read()``, or ``fallback`` with the problem recorded and ``name`` marked bad."""
        try:
            return read()
        except ConfigError as exc:
            self.bad.add(name)
            self.problems.add(exc)
            return fallback

    def _raw(self, name: str, default: object) -> object:
        if name in self.data:
            return self.data[name]
        if default is None:
            self.fail(name, "required key is missing")
        return default

    # -- typed getters: each records its problem and returns a fallback ------------------
    def get_str(self, name: str, default: str | None = None, *, nonempty: bool = False) -> str:
        """A string; with ``nonempty``, blank text is refused too."""
        return self._soft(name, lambda: self._str(name, default, nonempty),
                          "" if default is None else default)

    def _str(self, name: str, default: str | None, nonempty: bool) -> str:
        value = self._raw(name, default)
        if not isinstance(value, str):
            self.fail(name, _expected("a string", value))
        if nonempty and not value.strip():
            self.fail(name, "must not be empty")
        return value

    def get_int(
        self, name: str, default: int | None = None, lo: int | None = None, hi: int | None = None
    ) -> int:
        """An integer (never a bool or a float) within ``lo``..``hi`` when given."""
        fallback = default if default is not None else (lo if lo is not None else 0)
        return self._soft(name, lambda: self._int(name, default, lo, hi), fallback)

    def _int(self, name: str, default: int | None, lo: int | None, hi: int | None) -> int:
        value = self._raw(name, default)
        # bool is a subclass of int in Python; "pulse = true" where a number is meant is a
        # mistake, not the number 1.
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(name, _expected("an integer", value))
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            if hi is None:
                self.fail(name, f"must be at least {lo}, found {show_int(value)}")
            self.fail(name, f"must be between {lo} and {hi}, found {show_int(value)}")
        return value

    def get_opt_int(self, name: str) -> int | None:
        """An integer, or ``None`` when absent or wrong (range checks are the caller's)."""
        if name not in self.data:
            return None
        return self._soft(name, lambda: self._int(name, None, None, None), None)

    def get_bool(self, name: str, default: bool) -> bool:
        """A TOML boolean (``true``/``false``, not 0/1 nor "yes")."""

        def read() -> bool:
            value = self._raw(name, default)
            if not isinstance(value, bool):
                self.fail(name, _expected("a boolean (true or false)", value))
            return value

        return self._soft(name, read, default)

    def get_choice(self, name: str, default: str, choices: Mapping[str, _T]) -> _T:
        """One of the string keys of ``choices``, returned as its (typed) value."""

        def read() -> _T:
            value = self._str(name, default, False)
            if value not in choices:
                listed = ", ".join(f"'{c}'" for c in choices)
                self.fail(name, f"must be one of {listed}, found {show(value)}")
            return choices[value]

        return self._soft(name, read, choices[default])

    def get_url(self, name: str, default: str) -> str:
        """An absolute https URL, without a trailing slash (paths are appended to it).

        ``http://`` is accepted only for a loopback host (``127.0.0.0/8``, ``::1``,
        ``localhost``): a relay or sandbox on the same box, and tests.  Anywhere else it
        would send the credential and every event in the clear, so it is refused rather
        than accepted silently (found in review).
        """

        def read() -> str:
            value = self._str(name, default, True)
            try:
                parts = urlsplit(value)
                ok = parts.scheme in ("http", "https") and bool(parts.hostname)
            except ValueError:  # e.g. an invalid IPv6 literal or port
                ok = False
            if not ok:
                self.fail(name, f"must be an https:// URL, found {show(value)}")
            if parts.scheme == "http" and not is_loopback(parts.hostname or ""):
                self.fail(name, f"must be an https:// URL: http:// would send the token and "
                                f"events in the clear (it is accepted only for a loopback "
                                f"host such as 127.0.0.1), found {show(value)}")
            return value.rstrip("/")

        return self._soft(name, read, default.rstrip("/"))

    def get_topic(self, name: str, default: str | None = None) -> str:
        """A non-empty MQTT topic (or prefix) without wildcards or empty levels at the ends."""

        def read() -> str:
            value = self._str(name, default, True)
            if _TOPIC_FORBIDDEN & set(value):
                self.fail(name, f"must not contain MQTT wildcards '+' or '#', found "
                                f"{show(value)}")
            if value.startswith(("/", "$")) or value.endswith("/"):
                self.fail(name, f"must not start with '/' or '$' nor end with '/', found "
                                f"{show(value)}")
            return value

        return self._soft(name, read, default or "")

    def get_path(self, name: str, default: str) -> Path:
        """A non-empty path, made absolute against the config's directory."""
        return self._soft(name, lambda: self._join(name, self._str(name, default, True)),
                          self.base_dir / default)

    def get_opt_path(self, name: str) -> Path | None:
        """A path made absolute against the config's directory, ``None`` when blank."""
        return self._soft(name, lambda: self._opt_path(name), None)

    def _opt_path(self, name: str) -> Path | None:
        text = self._str(name, "", False)
        return self._join(name, text) if text.strip() else None

    def _join(self, name: str, text: str) -> Path:
        # No OS call accepts a NUL byte; catch it here rather than when the agent starts.
        if "\0" in text:
            self.fail(name, f"a path must not contain a NUL character, found {show(text)}")
        return self.base_dir / text

    def get_file(self, name: str) -> Path | None:
        """An optional path to a file that must exist (e.g. a CA certificate)."""

        def read() -> Path | None:
            path = self._opt_path(name)
            if path is not None:
                st = self._stat(name, path, "file")
                if not stat.S_ISREG(st.st_mode):
                    self.fail(name, f"file {path} is not a regular file")
            return path

        return self._soft(name, read, None)

    def get_secret_file(self, name: str) -> Path | None:
        """An optional path to a secret: a regular file no one but its owner may access.

        The file is only stat-ed, never read: the agent reads it when it needs it, and
        the Config stays free of secrets.
        """

        def read() -> Path | None:
            path = self._opt_path(name)
            if path is None:
                return None
            st = self._stat(name, path, "secret file")
            if not stat.S_ISREG(st.st_mode):
                self.fail(name, f"secret file {path} is not a regular file")
            if st.st_mode & 0o077:
                mode = stat.S_IMODE(st.st_mode)
                self.fail(name, f"secret file {path} has mode {mode:04o} and is open to group "
                                f"or others; run: chmod 600 {path}")
            return path

        return self._soft(name, read, None)

    def _stat(self, name: str, path: Path, what: str) -> os.stat_result:
        try:
            return path.stat()
        except FileNotFoundError:
            self.bad.add(name)
            raise MissingFileError(self.file, self.key(name),
                                   f"{what} {path} does not exist") from None
        except (OSError, ValueError) as exc:  # ValueError: NUL byte or unencodable name
            self.fail(name, f"cannot check {what} {path}: {os_reason(exc)}")

    # -- sub-tables ------------------------------------------------------------------
    def table(self, name: str, *, required: bool = False) -> Table | None:
        """The sub-table ``name``: an empty one when absent and optional, ``None`` (with
        the problem recorded) when absent and required or not a table."""
        if name not in self.data:
            if required:
                self.error(name, f"missing required section [{self.key(name)}]")
                return None
            value: object = {}
        else:
            value = self.data[name]
        if not isinstance(value, Mapping):
            self.error(name, _expected("a table", value))
            return None
        return Table(value, self.file, self.key(name), self.base_dir, self.problems)

    def tables(self, name: str) -> list[Table]:
        """The array of tables ``[[name]]``, each named ``name[i]`` in messages.

        An item that is not a table is recorded and left out; the others keep their
        ``index``, so messages name the item as it stands in the file.
        """
        value = self.data.get(name, [])
        if not isinstance(value, list | tuple):
            self.error(name, _expected(f"an array of tables (write [[{name}]])", value))
            return []
        items: list[Table] = []
        for index, item in enumerate(value):
            key = f"{self.key(name)}[{index}]"
            if not isinstance(item, Mapping):
                self.bad.add(name)
                self.problems.add(ConfigError(self.file, key, _expected("a table", item)))
                continue
            items.append(Table(item, self.file, key, self.base_dir, self.problems, index=index))
        return items


# --------------------------------------------------------------------------- shared checks


def check_topic_segment(table: Table, name: str, value: str) -> bool:
    """Record a problem unless ``value`` can be one MQTT topic level (contract §4:
    ``site.id`` and unit ids are levels of the topics); True when it can."""
    if not value:
        table.error(name, "must not be empty")
        return False
    if any(ch in "/+#\0" or ch.isspace() for ch in value):
        table.error(name, f"must not contain '/', '+', '#' or whitespace (it is an MQTT "
                          f"topic level), found {show(value)}")
        return False
    return True


def check_stora_id(table: Table, name: str, value: str, prefix: str, what: str) -> bool:
    """Record a problem unless ``value`` has the shape of a Stora id: ``prefix`` then more.

    Stora's ids are opaque strings with a type prefix (stora-api §1); it refuses an
    event whose ``source.id`` or ``site.id`` has the wrong one, so a config that would
    have every Timeline Event dead-lettered is refused here instead (issue 12).
    """
    if value.startswith(prefix) and value != prefix:
        return True
    table.error(name, f"must be a Stora {what} starting with '{prefix}', found {show(value)}")
    return False


# --------------------------------------------------------------------------- text helpers


def show(value: object) -> str:
    """A short description of a value for a message: its TOML type and, if small, itself."""
    if isinstance(value, bool):
        return f"boolean {'true' if value else 'false'}"
    if isinstance(value, int):
        return f"integer {show_int(value)}"
    if isinstance(value, float):
        return f"float {value!r}"
    if isinstance(value, str):
        text = value if len(value) <= 60 else value[:57] + "..."
        return f"string {text!r}"
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list | tuple):
        return "an array"
    if value is None:
        return "nothing (None)"
    # TOML dates and times, or whatever an in-memory caller passed.
    return f"a {type(value).__name__}"


def show_int(value: int) -> str:
    """``str(value)``, except for numbers too long to print (Python ≥ 3.11 refuses them)."""
    return str(value) if abs(value) < 10**18 else "(a very large number)"


def _expected(what: str, value: object) -> str:
    return f"expected {what}, found {show(value)}"


def os_reason(exc: BaseException) -> str:
    """The short reason of an OS error (``strerror``), for a message."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def is_loopback(host: str) -> bool:
    """Whether ``host`` (from a URL) names this machine: ``localhost`` or a loopback IP."""
    import ipaddress

    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
