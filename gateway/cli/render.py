"""Rendering for the CLI: JSON for machines, tables and ``key  value`` sections for
people (colour and plurals: ``gateway/term.py``).

Standard library and ``gateway.term`` only: every command's output goes through here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Final, TextIO

from gateway.term import table as term_table

__all__ = [
    "STATUS_SECTIONS",
    "age",
    "field",
    "format_bytes",
    "ms",
    "print_json",
    "render_status",
    "table",
    "value_text",
    "yes_no",
]

#: The order of ``status`` sections; any other section the agent sends follows them.
STATUS_SECTIONS: Final = ("agent", "broker", "outbox", "controllers", "clock", "host",
                          "commands")


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain text table, columns sized to fit; PASS/FAIL, verdicts and lock states
    coloured on a terminal (gateway/term.py)."""
    return term_table(headers, rows)


def print_json(obj: object, out: TextIO) -> None:
    """``obj`` as indented JSON, keys in their order, and a newline."""
    out.write(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def ms(value: float | None) -> str:
    """Milliseconds for a table cell (``-`` when unknown)."""
    return "-" if value is None else f"{value:.0f} ms"


def yes_no(value: object) -> str:
    """``yes``, ``no``, or ``?`` when unknown."""
    return "?" if value is None else ("yes" if value else "no")


def age(seconds: object) -> str:
    """An age for people: ``42 s``, ``12 min``, ``3 h 5 min`` (``-`` when unknown)."""
    if not isinstance(seconds, int | float):
        return "-"
    s = int(seconds)
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    return f"{s // 3600} h {s % 3600 // 60} min"


def value_text(value: object) -> str:
    """A value for people: ``yes``/``no``, ``-`` for none, lists and objects inline."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if value is None:
        return "-"
    if isinstance(value, list | tuple):
        return ", ".join(value_text(v) for v in value) or "-"
    if isinstance(value, dict):
        return ", ".join(f"{k}={value_text(v)}" for k, v in value.items()) or "-"
    return str(value)


def format_bytes(n: int) -> str:
    """A size in B, KiB, MiB or GiB."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError  # not reached


def field(key: object, value: object) -> str:
    """A status value for people: sizes in KiB/MiB/GiB, ages in s/min/h, °C."""
    name = str(key)
    if isinstance(value, str):  # an error text from a device: keep the table's rows whole
        return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return value_text(value)
    if name.endswith("_bytes"):
        return format_bytes(int(value))
    if name == "uptime_s" or name.endswith("_age_s"):
        return age(value)
    if name == "cpu_temp_c":
        return f"{value:.1f} °C"
    return value_text(value)


def render_status(status: Mapping[str, Any]) -> str:
    """``status`` for people: one section per part, ``key  value`` lines, tables for lists.

    The agent's answer is free-form; top-level plain values go under "agent".
    """
    sections: dict[str, Any] = {}
    loose = {k: v for k, v in status.items() if not isinstance(v, dict | list)}
    agent = status.get("agent")
    sections["agent"] = {**loose, **agent} if isinstance(agent, dict) else loose
    for key, value in status.items():
        if key != "agent" and isinstance(value, dict | list):
            sections[key] = value
    order: list[str] = [k for k in STATUS_SECTIONS if k in sections]
    order += [k for k in sections if k not in STATUS_SECTIONS]
    parts = []
    for name in order:
        body = sections[name]
        if isinstance(body, dict):
            if not body:
                continue
            width = max(len(str(k)) for k in body)
            lines = [f"  {str(k).ljust(width)}  {field(k, v)}" for k, v in body.items()]
        elif body and all(isinstance(item, dict) for item in body):
            headers = list(dict.fromkeys(k for item in body for k in item))
            rendered = table(headers, [[field(h, item.get(h)) for h in headers]
                                       for item in body])
            lines = ["  " + line for line in rendered.splitlines()]
        else:
            lines = [f"  {value_text(body)}"]
        parts.append("\n".join([name, *lines]))
    return "\n\n".join(parts) + "\n"
