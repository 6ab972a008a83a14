"""The stored floor of the trusted clock: the last wall time known good and the proven time,
as kept in the store's ``meta`` table, read back and judged at start, and reset by a
technician with the agent stopped (:func:`stored_floor`, :func:`reset_stored_floor`).
See docs/design/clock.md.
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Any, Final, Protocol

from gateway.errors import one_line
from sitelink.payloads import rfc3339  # the one time format of the gateway (contract §4)

#: The logger of the module this one was split from (gateway/clock.py):
#: log lines keep their name, and what reads them (a journal filter) still matches.
LOGGER = logging.getLogger("gateway.clock")

#: 2026-11-01T00:00:00Z.  No correct clock reads earlier than this release was built, so
#: a clock that does (1970 at boot, a flat RTC battery) is certainly wrong.  Raise it
#: with each release; the persisted last trusted time raises it further at run time.
BUILD_FLOOR: Final = 1_793_491_200.0

#: How far the saved floor may lie ahead of the proven time (docs/design/clock.md).  A floor
#: this version saves never needs it (both are written together, the proven time first),
#: so it is a tolerance, and the longest a forged step forward can still hold commands
#: back once the real time returns, on a box that has run without a break since its
#: release was built (time spent switched off only widens the gap).  Ten minutes: short
#: for an outage, far above float rounding and a crystal's drift between two saves.
FLOOR_MARGIN_S: Final = 600.0

#: Store keys (the ``meta`` table): the floor (its name predates the bound), the proven
#: time, and a reset done with the agent stopped, reported as an alarm at the next start.
FLOOR_KEY: Final = "last_trusted_time"
PROVEN_KEY: Final = "clock_proven_time"
RESET_NOTE_KEY: Final = "clock_floor_reset"

#: How much of an unreadable stored value an alarm quotes (alarms must stay small).
_QUOTE_MAX: Final = 40


class MetaStore(Protocol):
    """The part of :class:`gateway.store.Store` the floor is kept in."""

    def meta(self, key: str) -> str | None:
        """The value stored under ``key``, or ``None``."""

    def set_meta(self, key: str, value: str) -> None:
        """Store ``value`` under ``key``."""


def _span(seconds: float) -> str:
    """A duration for people: ``3650 days``, ``5 h``, ``42 s``."""
    if not math.isfinite(seconds):
        return repr(seconds)
    size = abs(seconds)
    if size >= 2 * 86_400:
        return f"{seconds / 86_400:.0f} days"
    if size >= 2 * 3_600:
        return f"{seconds / 3_600:.0f} h"
    return f"{seconds:.0f} s"


def _at(ts: float | None) -> str:
    """``ts`` as RFC 3339 to the second, for messages (``None`` as ``unknown``)."""
    return rfc3339(ts, timespec="seconds") or "unknown"


def _quote(text: str) -> str:
    """A stored value quoted in a message: one line, cut short (alarms stay small)."""
    short = text if len(text) <= _QUOTE_MAX else text[:_QUOTE_MAX] + "…"
    return repr(one_line(short))


def _read_time(store: MetaStore, key: str) -> tuple[float | None, str | None]:
    """Epoch seconds stored under ``key``: ``(value, None)``; ``(None, None)`` when absent;
    ``(None, text)`` when unreadable (not a number, ``nan``, infinite, negative)."""
    text = store.meta(key)
    if text is None or not text.strip():
        return None, None
    try:
        value = float(text)
    except ValueError:
        return None, text
    if not math.isfinite(value) or value < 0:
        return None, text
    return value, None


def _proven_base(stored: float | None, build_floor: float) -> float:
    """The proven time a run starts from: the last run's, or the build date when later."""
    return build_floor if stored is None else max(build_floor, stored)


def _judge_floor(floor: float | None, garbage: str | None,
                 proven: float) -> tuple[float | None, str | None]:
    """The floor to use at start and, when the stored one is invalid, why (one sentence).

    ``None`` as the floor means "nothing stored": the build date alone applies.
    """
    if garbage is not None:
        return proven, (f"the saved trusted-time floor {_quote(garbage)} is unreadable; using "
                        f"the time this box's run time proves ({_at(proven)}) instead")
    if floor is not None and floor > proven + FLOOR_MARGIN_S:
        return proven, (f"the saved trusted-time floor {_at(floor)} lies {_span(floor - proven)} "
                        f"beyond what this box's run time proves ({_at(proven)}): saved by a "
                        "version that did not bound it, or after a forged clock step; using "
                        f"{_at(proven)} instead")
    return floor, None


def _describe_reset_note(text: str) -> str:
    """The alarm detail for a reset done while the agent was stopped (JSON note)."""
    try:
        note = json.loads(text)
    except ValueError:
        note = None
    if not isinstance(note, dict):
        return f"the trusted-time floor was reset while the agent was stopped ({_quote(text)})"
    at, previous = note.get("at"), note.get("previous")
    actor = one_line(str(note.get("actor") or "someone"))[:_QUOTE_MAX * 2]
    return (f"the trusted-time floor was reset to {_at(BUILD_FLOOR)} by {actor} at "
            f"{_at(at) if isinstance(at, int | float) else 'an unknown time'} while the agent "
            f"was stopped (it was "
            f"{_at(previous) if isinstance(previous, int | float) else 'unset'})")


def stored_floor(store: MetaStore | None, *, now: float | None = None) -> dict[str, Any]:
    """The floor as saved, and what the next start makes of it (``clock`` while the agent
    is stopped); ``None`` for a store that does not exist yet.  ``now`` replaces the wall
    clock in tests."""
    wall = time.time() if now is None else now
    floor, garbage = (None, None) if store is None else _read_time(store, FLOOR_KEY)
    stored_proven, _ = (None, None) if store is None else _read_time(store, PROVEN_KEY)
    proven = _proven_base(stored_proven, BUILD_FLOOR)
    effective, problem = _judge_floor(floor, garbage, proven)
    at_start = BUILD_FLOOR if effective is None else max(BUILD_FLOOR, effective)
    return {
        "agent": "not running",
        "now": _at(wall),
        "floor": _at(at_start),
        "floor_ok": wall >= at_start,
        "stored_floor": _at(floor) if garbage is None else _quote(garbage),
        "stored_floor_invalid": problem,
        "proven": _at(proven),
        "build_floor": _at(BUILD_FLOOR),
        "reset_pending": store is not None and bool(store.meta(RESET_NOTE_KEY)),
    }


def reset_stored_floor(store: MetaStore, actor: str, *, now: float | None = None
                       ) -> dict[str, Any]:
    """Set the saved floor back to :data:`BUILD_FLOOR` with the agent stopped (the
    technician's fix that used to mean editing SQLite).  The next start reports it as a
    ``clock_floor_reset`` alarm naming ``actor``.  Store errors propagate."""
    wall = time.time() if now is None else now
    floor, _ = _read_time(store, FLOOR_KEY)
    store.set_meta(FLOOR_KEY, repr(BUILD_FLOOR))
    store.set_meta(RESET_NOTE_KEY, json.dumps({"actor": actor, "at": wall, "previous": floor}))
    LOGGER.warning("the trusted-time floor was reset from %s to %s by %s (agent stopped)",
                   _at(floor), _at(BUILD_FLOOR), actor)
    return {"previous": None if floor is None else _at(floor), "floor": _at(BUILD_FLOOR),
            "actor": actor, "saved": True, "through_agent": False}
