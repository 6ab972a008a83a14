"""The rows of the state database as typed values: :class:`CommandRow` (the inbox),
:class:`UnitRow` (a unit's state) and :class:`EventRow` (the outbox), with the literal
``SELECT`` statements and the decoders that build them.

See docs/design/store-durability.md.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from typing import Any, Final

from gateway.outbox.timeline import EventRecord
from sitelink.codes import Status
from sitelink.payloads import result_payload, rfc3339

__all__ = ["CommandRow", "EventRow", "UnitRow"]

@dataclass(frozen=True, slots=True)
class CommandRow:
    """One inbox row.  ``result`` is ``{}`` until the command is finished."""

    jti: str
    cmd: str
    unit: str | None
    status: str
    reason: str | None
    result: dict[str, Any]
    received_at: float
    finished_at: float | None


@dataclass(frozen=True, slots=True)
class UnitRow:
    """A unit's desired and last known state.

    ``lockout_ver`` is ``-1`` until a lockout command has been applied (contract
    ``ver`` values are integers that only grow, so any real one is newer).  ``locked`` is
    ``None`` while unknown, never guessed; ``relock_at`` is a wall-clock deadline.
    """

    unit: str
    lockout: bool
    lockout_ver: int
    relock_at: float | None
    locked: bool | None
    door: str
    confirmed: bool
    updated_at: float

    @classmethod
    def unseen(cls, unit: str) -> UnitRow:
        """The row of a unit never recorded: no lockout, nothing known, ``updated_at`` 0."""
        return cls(unit=unit, lockout=False, lockout_ver=-1, relock_at=None, locked=None,
                   door="unknown", confirmed=False, updated_at=0.0)


@dataclass(frozen=True, slots=True)
class EventRow:
    """One outbox row: the record plus its delivery bookkeeping."""

    seq: int
    external_id: str
    kind: str
    unit: str
    reference: str
    site_id: str
    description: str
    contact: str | None
    actor: str | None
    occurred_at: float
    body: dict[str, Any] | None
    state: str
    attempts: int
    last_error: str | None
    created_at: float
    generation: int = 0
    unanswered_since: float | None = None
    next_attempt_at: float = 0.0
    delivered_at: float | None = None
    stora_event_id: str | None = None
    dead_status: int | None = None
    dead_code: str | None = None
    dead: dict[str, Any] | None = None
    dead_at: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready data for ``stora-gateway outbox --json`` and the control socket."""
        return {
            "seq": self.seq, "external_id": self.external_id, "kind": self.kind,
            "unit": self.unit, "reference": self.reference,
            "description": self.description, "state": self.state,
            "occurred_at": rfc3339(self.occurred_at), "created_at": rfc3339(self.created_at),
            "attempts": self.attempts, "last_error": self.last_error,
            "generation": self.generation,
            "next_attempt_at": rfc3339(self.next_attempt_at) if self.next_attempt_at else None,
            "delivered_at": rfc3339(self.delivered_at) if self.delivered_at else None,
            "stora_event_id": self.stora_event_id,
            "error": None if self.state != "dead" else {
                "status": self.dead_status, "code": self.dead_code, **(self.dead or {}),
                "dead_at": rfc3339(self.dead_at) if self.dead_at else None,
            },
        }

    def record(self) -> EventRecord:
        """The :class:`EventRecord` this row was added from."""
        return EventRecord(
            external_id=self.external_id, kind=self.kind, unit=self.unit,
            reference=self.reference, site_id=self.site_id, description=self.description,
            contact=self.contact, actor=self.actor, occurred_at=self.occurred_at,
        )


# Whole literal statements, in the column order the _*_row functions read.
_SELECT_COMMANDS: Final = (
    "SELECT jti, cmd, unit, status, reason, result_json, received_at, finished_at "
    "FROM commands"
)
_SELECT_UNITS: Final = (
    "SELECT unit, lockout, lockout_ver, relock_at, locked, door, confirmed, updated_at "
    "FROM units"
)
_SELECT_EVENTS: Final = (
    "SELECT seq, external_id, kind, unit, reference, site_id, description, contact, actor, "
    "occurred_at, body_json, state, attempts, last_error, created_at, generation, "
    "unanswered_since, next_attempt_at, delivered_at, stora_event_id, dead_status, "
    "dead_code, dead_json, dead_at FROM events"
)


def _command_row(r: sqlite3.Row | tuple[Any, ...]) -> CommandRow:
    return CommandRow(jti=r[0], cmd=r[1], unit=r[2], status=r[3], reason=r[4],
                      result=json.loads(r[5]) if r[5] else {}, received_at=r[6],
                      finished_at=r[7])


def _unit_row(r: sqlite3.Row | tuple[Any, ...]) -> UnitRow:
    return UnitRow(unit=r[0], lockout=bool(r[1]), lockout_ver=int(r[2]), relock_at=r[3],
                   locked=None if r[4] is None else bool(r[4]), door=r[5],
                   confirmed=bool(r[6]), updated_at=r[7])


def _event_row(r: sqlite3.Row | tuple[Any, ...]) -> EventRow:
    return EventRow(seq=r[0], external_id=r[1], kind=r[2], unit=r[3], reference=r[4],
                    site_id=r[5], description=r[6], contact=r[7], actor=r[8],
                    occurred_at=r[9], body=json.loads(r[10]) if r[10] else None,
                    state=r[11], attempts=r[12], last_error=r[13], created_at=r[14],
                    generation=r[15], unanswered_since=r[16], next_attempt_at=r[17],
                    delivered_at=r[18], stora_event_id=r[19], dead_status=r[20],
                    dead_code=r[21], dead=json.loads(r[22]) if r[22] else None,
                    dead_at=r[23])


def _dumps(value: dict[str, Any]) -> str:
    # allow_nan=False: the stored result is re-published as JSON, where NaN is invalid.
    return json.dumps(value, separators=(",", ":"), sort_keys=True, allow_nan=False)


def _unknown_result(row: CommandRow, now: float) -> dict[str, Any]:
    """The result of an interrupted command, shaped like every other stored result.

    The fields are those of a ``P/S/cmd/result`` payload (contract §4) plus ``at_epoch``,
    so a duplicate of the ``jti`` re-publishes "unknown" like any finished command.
    """
    return {**result_payload(row.jti, row.cmd, row.unit, Status.UNKNOWN, None,
                             duplicate=False, state=None, at=now),
            "at_epoch": now}
