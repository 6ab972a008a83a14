"""Errors raised by the relay package.

The type tells the caller what to do next::

    RelayError            base of every error the relay raises on purpose
    ├── ConfigError       the configuration (or a file it names) is wrong: a person must
    │                     fix it; ``problems`` holds one line per mistake, all of them
    │                     found in one pass (``check-config`` prints them, exit status 2)
    ├── SecretFileError   a secret file cannot be used (missing, open to others, empty,
    │                     too large); the config loader and the keyring turn it into a
    │                     ConfigError line naming the key
    └── DecryptError      a value encrypted at rest cannot be decrypted: unknown key id,
                          bad format, or altered (relay/crypto.py); never retryable

Foreign exceptions (``OSError``, ``tomllib.TOMLDecodeError``, ``InvalidTag``) are
translated where they are caught, with ``raise … from exc``.  Every problem line is a
single line: values from files are shown with control characters escaped
(:func:`sitelink.errors.one_line`), so a newline in a value cannot split or forge a line.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from sitelink.errors import one_line

__all__ = [
    "ConfigError",
    "DecryptError",
    "RelayError",
    "SecretFileError",
    "describe",
    "problem_line",
]


def describe(value: object) -> str:
    """A value from a file as a message shows it: its TOML type and, when short, itself
    (``"integer 70000"``, ``"string 'x'"``, ``"an array"``)."""
    match value:
        case bool():
            return "boolean " + str(value).lower()
        case int():
            # Python >= 3.11 refuses to print integers of thousands of digits.
            return f"integer {value}" if abs(value) < 10**18 else "a very large integer"
        case float():
            return f"float {value!r}"
        case str():
            return "string " + repr(value if len(value) <= 60 else value[:57] + "...")
        case Mapping():
            return "a table"
        case list() | tuple():
            return "an array"
    return f"a {type(value).__name__}"


def problem_line(file: str, key: str, reason: str) -> str:
    """One problem as ``check-config`` prints it: ``"<file>: <dotted.key>: <reason>"``,
    or ``"<file>: <reason>"`` when the problem is the file as a whole (``key`` empty)."""
    parts = [one_line(file), one_line(key), one_line(reason)]
    return ": ".join(part for part in parts if part)


class RelayError(Exception):
    """Base of every error the relay raises on purpose.

    ``retryable`` says whether the same operation may succeed if tried again unchanged.
    """

    retryable: bool = False


class ConfigError(RelayError):
    """Every problem found in a configuration: ``problems``, one line each.

    Each line is ``"<file>: <dotted.key>: <reason>"`` (:func:`problem_line`).  ``str()``
    is the lines joined by newlines, in the order the checks found them; a caller that
    wants a single sentence takes ``problems[0]`` and says how many more there are.
    """

    def __init__(self, problems: str | Iterable[str]) -> None:
        lines = (problems,) if isinstance(problems, str) else tuple(problems)
        if not lines:
            raise ValueError("ConfigError needs at least one problem")
        self.problems: tuple[str, ...] = tuple(one_line(line) for line in lines)
        super().__init__(*self.problems)

    @classmethod
    def at(cls, file: str, key: str, reason: str) -> ConfigError:
        """A ConfigError holding the single problem ``reason`` of ``key`` in ``file``."""
        return cls(problem_line(file, key, reason))

    def __str__(self) -> str:
        return "\n".join(self.problems)

    def __reduce__(self) -> tuple[Any, ...]:
        # Built from its list, not from *args: keep pickling (multiprocessing) faithful.
        return (type(self), (self.problems,))


class SecretFileError(RelayError):
    """A secret file cannot be used; ``reason`` names the file and what to do."""

    def __init__(self, reason: str) -> None:
        self.reason = one_line(reason)
        super().__init__(self.reason)


class DecryptError(RelayError):
    """A value encrypted at rest could not be decrypted.

    The message names the key id (``kid``) when the token carries one, never the
    plaintext nor the key.
    """
