"""Output for people on a terminal: colour (only where it helps), plurals, tables.

Colour follows the conventions every well-behaved CLI follows (https://no-color.org/,
``TERM=dumb``): it is used only when the stream written to is a terminal, ``NO_COLOR``
is unset or empty, and ``TERM`` is not ``dumb``.  Piped output, files, ``--json`` and
journald never see an escape sequence.  The decision is made once per command by
``gateway.cli.main.main`` (:func:`use_colour`) for the stream it prints to; :func:`table`
and :func:`paint` consult it, so a command needs no flag of its own.

Only words with a meaning get a colour: verdicts (``OK``, ``DEGRADED``, ``DOWN``),
test results (``PASS``, ``FAIL``) and lock states (``locked``, ``unlocked``,
``unknown``).  A table cell is coloured when its whole text is one of them, so a
description that merely contains "unknown" stays plain.

Nothing here imports more than the standard library: ``--help`` must stay quick on a Pi.
"""

from __future__ import annotations

import contextvars
import os
import re
from collections.abc import Mapping, Sequence
from typing import Final, TextIO

__all__ = [
    "COLOURS",
    "paint",
    "plural",
    "table",
    "use_colour",
    "visible_len",
    "wants_colour",
]

_RESET: Final = "\033[0m"
#: SGR codes: green for what is well, yellow for what needs a look, red for what is
#: broken.  Bold for the verdict words so the first line of ``status`` stands out.
_GREEN, _YELLOW, _RED = "\033[32m", "\033[33m", "\033[31m"
_BOLD_GREEN, _BOLD_YELLOW, _BOLD_RED = "\033[1;32m", "\033[1;33m", "\033[1;31m"
#: The words that get a colour, and which.  ``unlocked`` is yellow, not red: a door
#: open for a tenant is normal, but worth a glance; ``unknown`` is red because nothing
#: confirms the lock holds.
COLOURS: Final[Mapping[str, str]] = {
    "OK": _BOLD_GREEN, "DEGRADED": _BOLD_YELLOW, "DOWN": _BOLD_RED,
    "PASS": _GREEN, "FAIL": _RED,
    "locked": _GREEN, "unlocked": _YELLOW, "unknown": _RED,
}
_ANSI: Final = re.compile(r"\033\[[0-9;]*m")

#: Whether the current command's output may carry colour (set by ``gateway.cli.main.main``).
#: A context variable, not a module global: a thread or a test calling ``main`` twice
#: with different streams gets its own answer.
_colour: contextvars.ContextVar[bool] = contextvars.ContextVar("colour", default=False)


def wants_colour(stream: TextIO, environ: Mapping[str, str] | None = None) -> bool:
    """Whether output to ``stream`` should be coloured: a terminal, no ``NO_COLOR``, and a
    ``TERM`` that is not ``dumb``."""
    env = os.environ if environ is None else environ
    if env.get("NO_COLOR", ""):  # no-color.org: present and not empty
        return False
    if env.get("TERM", "") == "dumb":
        return False
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a closed or stream-like object
        return False


def use_colour(enabled: bool) -> None:
    """Colour (or not) what :func:`paint` and :func:`table` produce from now on."""
    _colour.set(enabled)


def paint(text: str, word: str | None = None) -> str:
    """``text`` in the colour of ``word`` (default: ``text`` itself) when colour is on and
    the word has one; else ``text`` unchanged."""
    code = COLOURS.get(text if word is None else word)
    if code is None or not _colour.get():
        return text
    return f"{code}{text}{_RESET}"


def visible_len(text: str) -> int:
    """The width of ``text`` on screen: its length without colour escape sequences."""
    return len(_ANSI.sub("", text))


def plural(count: int, singular: str, plural_form: str | None = None) -> str:
    """``"1 controller"``, ``"2 controllers"``, ``"0 entries"`` (given ``plural_form``)."""
    word = singular if count == 1 else (plural_form or singular + "s")
    return f"{count} {word}"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain text table, columns sized to fit; meaningful words coloured (see module).

    Widths count what is visible, so a coloured cell lines up like a plain one.
    """
    cells = [[str(h) for h in headers],
             *[[paint("-" if c is None else str(c)) for c in r] for r in rows]]
    widths = [max(visible_len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(cell + " " * (w - visible_len(cell))
                       for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
