"""The live view: one readable line per thing that happens at a site.

Shared by ``stora-gateway watch`` (a site's broker, wall-clock times) and the demo
(seconds since its start).  It turns the agent's MQTT payloads (contract §4) into words
and writes whole lines from any thread.  It is product code: the demo (dev kit) imports
it, never the other way round.

Text from the broker is the sender's word: every value is shown on one line with
non-printable characters escaped (:func:`gateway.errors.one_line`), so a payload cannot
forge a second line.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

from gateway.errors import cap_text

__all__ = [
    "LiveView",
    "describe_alarm",
    "describe_online",
    "describe_result",
    "describe_state",
    "describe_state_change",
    "state_key",
]

#: Longest value quoted from a payload (a unit id is ≤ 64 characters, an alarm detail
#: a few hundred): enough to read, short enough to keep one event on one line.
MAX_VALUE_CHARS = 300


def _text(value: object) -> str:
    return cap_text(str(value), MAX_VALUE_CHARS)


class LiveView:
    """Readable lines, written whole from any thread.

    Each line starts with ``stamp()``: by default the seconds since the view was made
    (``"  12.3s"``, the demo's); ``watch`` passes the local wall-clock time.
    """

    def __init__(self, out: TextIO, stamp: Callable[[], str] | None = None) -> None:
        self.out = out
        self.started = time.monotonic()
        self._stamp = stamp or self._elapsed
        self._lock = threading.Lock()

    def _elapsed(self) -> str:
        return f"{time.monotonic() - self.started:6.1f}s"

    def write(self, text: str) -> None:
        """Write ``text`` as it is (headers, tables)."""
        with self._lock:
            self.out.write(text)
            self.out.flush()

    def line(self, tag: str, text: str) -> None:
        """``<stamp>  tag     text``."""
        self.write(f"{self._stamp()}  {tag:<7} {text}\n")


def describe_state(state: Mapping[str, Any]) -> str:
    """A unit's retained state in words: "A-101 unlocked, door closed, in lockout"."""
    locked = state.get("locked")
    words = [_text(state.get("reference") or state.get("unit")),
             "unknown" if locked is None else "locked" if locked else "unlocked"]
    if state.get("door") not in (None, "unknown"):
        words[-1] += ","
        words.append(f"door {_text(state['door'])}")
    if state.get("lockout"):
        words[-1] += ","
        words.append("in lockout")
    return " ".join(words)


def state_key(state: Mapping[str, Any]) -> tuple[Any, ...]:
    """What makes a published state worth a line: lock, lockout and door."""
    return state.get("locked"), state.get("lockout"), state.get("door")


def describe_state_change(previous: Mapping[str, Any] | None,
                          state: Mapping[str, Any]) -> str | None:
    """The line for a newly published unit state, or ``None`` when nothing a person
    cares about changed since ``previous`` (a re-publication, a timestamp)."""
    if previous is not None and state_key(previous) == state_key(state):
        return None
    note = ""
    relock_at = state.get("relock_at")
    if relock_at and state.get("locked") is False:
        note = f" (relocks at {_text(relock_at)[11:19]} UTC)"
    elif previous is not None and previous.get("lockout") and not state.get("lockout"):
        note = ", lockout cleared"
    return describe_state(state) + note


def _unit_name(unit: object, references: Mapping[str, str]) -> object:
    return references.get(str(unit), unit)


def describe_result(doc: Mapping[str, Any], references: Mapping[str, str]) -> str:
    """A command result in words: "done: unlock A-101", "rejected (overlocked): …".

    ``references`` maps unit ids to the labels on the doors.
    """
    status = _text(doc.get("status"))
    if doc.get("reason"):
        status += f" ({_text(doc['reason'])})"
    what = " ".join(_text(p) for p in (doc.get("cmd"), _unit_name(doc.get("unit"), references))
                    if p)
    text = f"{status}: {what or 'a token whose signature did not verify (no id echoed)'}"
    if doc.get("duplicate"):
        text += " [duplicate: the original result again; not run twice]"
    return text


def describe_alarm(doc: Mapping[str, Any], references: Mapping[str, str]) -> str:
    """An alarm in words: "door_forced at A-101: …"."""
    unit = doc.get("unit")
    where = _unit_name(unit, references) if unit else "site"
    return f"{_text(doc.get('kind'))} at {_text(where)}: {_text(doc.get('detail'))}"


def describe_online(doc: Mapping[str, Any]) -> str:
    """The agent's retained status in words: "online (stora-gateway 0.1.0)" or "offline"."""
    if not doc.get("online"):
        return "offline"
    version = f" (stora-gateway {_text(doc['version'])})" if doc.get("version") else ""
    return "online" + version
