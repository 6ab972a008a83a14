"""The problems of one config file: recorded as they are found, raised together.

:class:`Problems` collects each :class:`~gateway.errors.ConfigError` once;
:class:`ConfigErrors` carries them all out of the loader; :func:`guarded` lets one
table's stopping problem be recorded while the parser goes on with the next.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from gateway.errors import ConfigError

__all__ = ["ConfigErrors", "MissingFileError", "Problems", "config_problems", "guarded"]

_T = TypeVar("_T")


class MissingFileError(ConfigError):
    """A file the config names does not exist (yet): a secret or certificate to put there.

    A ConfigError like any other; its own type lets ``stora-gateway init`` tell "write
    this secret file next" apart from a value that is wrong.
    """


class ConfigErrors(ConfigError):  # noqa: N818 - a ConfigError holding several
    """Every problem found in one config file, in the order the checks ran (``errors``).

    It is a ConfigError itself, carrying the file, key and reason of the first problem, so
    code that catches ConfigError or reads ``key`` and ``reason`` keeps working.
    ``str()`` stays one line (``gateway.errors``): the first problem and how many more
    there are; ``check-config`` prints them all, one line each.
    """

    def __init__(self, errors: Sequence[ConfigError]) -> None:
        if not errors:
            raise ValueError("ConfigErrors needs at least one error")
        first = errors[0]
        super().__init__(first.file, first.key, first.reason)
        self.errors: tuple[ConfigError, ...] = tuple(errors)

    def __str__(self) -> str:
        text = super().__str__()
        more = len(self.errors) - 1
        if more:
            noun = "problem" if more == 1 else "problems"
            text += f" (and {more} more {noun}; `stora-gateway check-config` lists them all)"
        return text

    def __reduce__(self) -> tuple[Any, ...]:
        # The base class pickles (file, key, reason); this one is built from its list.
        return (ConfigErrors, (self.errors,))


def config_problems(error: ConfigError) -> tuple[ConfigError, ...]:
    """Each problem ``error`` stands for: its list for :class:`ConfigErrors`, else itself."""
    if isinstance(error, ConfigErrors):
        return error.errors
    return (error,)


class Problems:
    """The problems found so far in one file; :meth:`raise_any` ends a parse."""

    def __init__(self) -> None:
        self.errors: list[ConfigError] = []
        self._seen: set[tuple[str, str]] = set()

    def __bool__(self) -> bool:
        return bool(self.errors)

    def add(self, error: ConfigError) -> None:
        """Record ``error``, once: the same key and reason twice is one problem."""
        for one in config_problems(error):
            mark = (one.key, one.reason)
            if mark not in self._seen:
                self._seen.add(mark)
                self.errors.append(one)

    def raise_any(self) -> None:
        """Raise :class:`ConfigErrors` with every problem recorded, if there is one."""
        if self.errors:
            raise ConfigErrors(self.errors)


def guarded(problems: Problems, parse: Callable[[], _T], fallback: Callable[[], _T]) -> _T:
    """``parse()``, or, when it raises a ConfigError, the error recorded and ``fallback()``."""
    try:
        return parse()
    except ConfigError as exc:
        problems.add(exc)
        return fallback()
