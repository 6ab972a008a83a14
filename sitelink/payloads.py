"""The JSON payloads the gateway publishes (contract §4), and their one time format.

Each builder returns a ``dict`` whose keys are in the order the gateway has always
published them (the relay and the dashboards read them by key, people read them in
that order); instants are given as seconds since the epoch and written by
:func:`rfc3339`.  Encoding (``json.dumps(..., separators=(",", ":"))``) is the
publisher's.

============================  =========================================================
topic                         payload
============================  =========================================================
``P/S/cmd/result``            :func:`result_payload`
``P/S/mgmt/result``           :func:`mgmt_result_payload`
``P/S/units/<unit>``          :func:`unit_state_payload`
``P/S/alarm``                 :func:`alarm_payload`
``P/S/status`` (will, stop)   :func:`offline_status_payload`
============================  =========================================================
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sitelink.codes import Reason, Status

__all__ = [
    "alarm_payload",
    "mgmt_result_payload",
    "offline_status_payload",
    "result_payload",
    "rfc3339",
    "unit_state_payload",
]


def rfc3339(ts: float | None, *, timespec: str = "milliseconds") -> str | None:
    """``ts`` (seconds since the epoch) as RFC 3339 UTC with a ``Z``, or ``None``.

    ``2026-01-01T00:00:00.000Z`` by default; ``timespec`` as for
    :meth:`datetime.isoformat` (``"seconds"`` drops the fraction).  A value no calendar
    can show (an injected clock gone wild, ``nan``) is rendered as its ``repr`` rather
    than raising: this feeds status output and results that must never fail.
    """
    if ts is None:
        return None
    try:
        text = datetime.fromtimestamp(ts, UTC).isoformat(timespec=timespec)
    except (OverflowError, ValueError, OSError):
        return repr(ts)
    return text.replace("+00:00", "Z")


def result_payload(
    jti: str | None,
    cmd: str | None,
    unit: str | None,
    status: Status | str,
    reason: Reason | str | None,
    *,
    duplicate: bool,
    state: dict[str, Any] | None,
    at: float,
) -> dict[str, Any]:
    """``P/S/cmd/result``: ``{"jti","cmd","unit","status","reason","duplicate","state","at"}``.

    ``state`` is the unit's state (:func:`unit_state_payload`) when the command reached
    the unit, else ``None``; ``jti``, ``cmd`` and ``unit`` are ``None`` in the rejection
    of a token whose signature did not verify (its claims are the sender's word).
    """
    return {
        "jti": jti,
        "cmd": cmd,
        "unit": unit,
        "status": status,
        "reason": reason,
        "duplicate": duplicate,
        "state": state,
        "at": rfc3339(at),
    }


def mgmt_result_payload(
    jti: str | None,
    cmd: str | None,
    status: Status | str,
    reason: Reason | str | None,
    result: Any,
    *,
    duplicate: bool,
    at: float,
) -> dict[str, Any]:
    """``P/S/mgmt/result``: ``{"jti","cmd","status","result","reason","duplicate","at"}``."""
    return {"jti": jti, "cmd": cmd, "status": status, "result": result, "reason": reason,
            "duplicate": duplicate, "at": rfc3339(at)}


def unit_state_payload(
    unit: str,
    reference: str,
    *,
    locked: bool | None,
    lockout: bool,
    door: str,
    relock_at: float | None,
    confirmed: bool,
    updated_at: float | None,
) -> dict[str, Any]:
    """``P/S/units/<unit>`` (retained): ``{"unit","reference","locked","lockout","door",
    "relock_at","confirmed","updated_at"}``.

    ``locked`` is ``None`` when unknown (never guessed); ``door`` is ``"open"``,
    ``"closed"`` or ``"unknown"``; ``relock_at`` is ``None`` unless an unlock is running.
    """
    return {
        "unit": unit,
        "reference": reference,
        "locked": locked,
        "lockout": lockout,
        "door": door,
        "relock_at": rfc3339(relock_at),
        "confirmed": confirmed,
        "updated_at": rfc3339(updated_at),
    }


def alarm_payload(kind: str, unit: str | None, detail: str, *, at: float) -> dict[str, Any]:
    """``P/S/alarm``: ``{"kind","unit","detail","at"}`` (door forced, door held open,
    controller offline, jam, …; ``unit`` ``None`` for the site as a whole)."""
    return {"kind": kind, "unit": unit, "detail": detail, "at": rfc3339(at)}


def offline_status_payload() -> dict[str, Any]:
    """``P/S/status`` when the agent is gone: its last will and its clean shutdown."""
    return {"online": False}
