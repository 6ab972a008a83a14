"""A technician's request, checked before anything runs: the lock a text names, and the
bounds of a test's timings.

Every way in needs these on every request (the control socket's ``unlock`` finds its
lock here; a ``locks.test`` management request has its timings checked here), so they
live apart from what runs a test or a scan (``gateway/ops/technician.py``,
``gateway/ops/runs.py``), which the agent loads only when a technician first asks for
one (the lazy seam of ``gateway/ops/service.py``).  ``difflib`` too is imported only
when a unit is not found: it costs the agent about 160 KB to keep.
"""

from __future__ import annotations

from typing import Final

from gateway.config import Config, LockConfig
from gateway.ops.control_wire import ControlError

__all__ = [
    "CONTROL_WAIT_S",
    "NEAR_MATCHES",
    "NEAR_MATCH_CUTOFF",
    "TEST_RELOCK_TIMEOUT",
    "TEST_SECONDS",
    "check_test_timing",
    "find_lock",
    "near_matches",
    "unknown_unit_message",
]

#: How long a control-socket request waits for its unit's queue.
CONTROL_WAIT_S = 120.0
#: A test cycle's unlock time and its wait for the relock, in seconds: the bounds every
#: way in shares (the control socket, the ``locks.test`` management request).  Past them
#: a test would hold the unit's queue, and every command for that door, for hours.
TEST_SECONDS: Final = (0.2, 30.0)
TEST_RELOCK_TIMEOUT: Final = (1.0, 60.0)
#: How many near matches ``unknown unit`` suggests, and how alike they must be
#: (``difflib`` ratio: 0.6 lets one typo or a missing dash through in a short label).
NEAR_MATCHES: Final = 3
NEAR_MATCH_CUTOFF: Final = 0.6


def check_test_timing(name: str, value: object, bounds: tuple[float, float]) -> float | None:
    """``value`` of the test parameter ``name`` as seconds within ``bounds``, or ``None``
    when not given; ``ValueError`` naming the bounds otherwise (NaN, ±infinity, a
    negative or huge number, a bool, text)."""
    if value is None:
        return None
    lo, hi = bounds
    if (not isinstance(value, int | float) or isinstance(value, bool)
            or not lo <= value <= hi):  # also false for NaN
        raise ValueError(f"{name} must be a number from {lo:g} to {hi:g}")
    return float(value)


def near_matches(config: Config, text: str) -> list[LockConfig]:
    """Locks whose unit id or reference looks like ``text`` (a typo), best first."""
    import difflib  # only for a unit not found (see the module docstring)

    by_key: dict[str, LockConfig] = {}
    for lock in config.locks:
        by_key.setdefault(lock.unit.casefold(), lock)
        by_key.setdefault(lock.reference.casefold(), lock)
    found: list[LockConfig] = []
    for key in difflib.get_close_matches(text.strip().casefold(), list(by_key),
                                         n=NEAR_MATCHES * 2, cutoff=NEAR_MATCH_CUTOFF):
        if by_key[key] not in found:
            found.append(by_key[key])
    return found[:NEAR_MATCHES]


def unknown_unit_message(config: Config, text: str) -> str:
    """One sentence for a ``UNIT`` that names no lock, with the near matches if any."""
    near = near_matches(config, text)
    where = f"no lock in {config.path} has that unit id or reference"
    if near:
        names = ", ".join(f"{lock.reference} ({lock.unit})" for lock in near)
        return f"unknown unit {text!r}: {where}; did you mean {names}?"
    return f"unknown unit {text!r}: {where} (see `stora-gateway locks`)"


def find_lock(config: Config, text: str) -> LockConfig:
    """The lock ``text`` names (unit id or reference); :class:`ControlError` (status 2,
    with near matches) when none does."""
    lock = config.lock_by_id(text)
    if lock is None:
        raise ControlError(unknown_unit_message(config, text), 2)
    return lock
