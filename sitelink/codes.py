"""The names of the protocol (contract §4, §5): commands, requests, reasons, statuses.

Each is a :class:`~enum.StrEnum`: a member *is* its contract string (``Reason.EXPIRED ==
"expired"``, the same hash, ``json.dumps`` writes ``"expired"``, SQLite stores the text),
so enums and the strings read back from JSON or the database mix freely.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final

__all__ = [
    "COMMANDS",
    "MGMT_COMMANDS",
    "VERIFIER_REASONS",
    "Cmd",
    "MgmtCmd",
    "Reason",
    "Status",
]


class Cmd(StrEnum):
    """The ``cmd`` of a command on ``P/S/cmd`` (contract §5)."""

    UNLOCK = "unlock"
    LOCK = "lock"
    LOCKOUT = "lockout"
    CLEAR_LOCKOUT = "clear_lockout"


class MgmtCmd(StrEnum):
    """The ``cmd`` of a management request on ``P/S/mgmt`` (contract §5).

    ``clock.reset_floor`` is the gateway's addition to the contract's list (the remote
    twin of the technician's ``clock --reset-floor``).
    """

    STATUS = "status"
    CONFIG_GET = "config.get"
    CONFIG_SET = "config.set"
    LOCKS_TEST = "locks.test"
    OUTBOX_RETRY = "outbox.retry"
    STATE_REPUBLISH = "state.republish"
    LOG_LEVEL = "log.level"
    CLOCK_RESET_FLOOR = "clock.reset_floor"


class Reason(StrEnum):
    """The ``reason`` of a result that is not ``done`` (contract §4)."""

    MALFORMED = "malformed"
    BAD_SIGNATURE = "bad_signature"
    UNKNOWN_KEY = "unknown_key"
    WRONG_SITE = "wrong_site"
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    LIFETIME_TOO_LONG = "lifetime_too_long"
    RETAINED = "retained"
    UNKNOWN_UNIT = "unknown_unit"
    OVERLOCKED = "overlocked"
    STALE_VERSION = "stale_version"
    CLOCK_UNTRUSTED = "clock_untrusted"
    HARDWARE_ERROR = "hardware_error"
    NOT_CONFIRMED = "not_confirmed"


class Status(StrEnum):
    """The ``status`` of a result (contract §4).

    ``unknown``: the outcome could not be established; such a command is never run again.
    """

    DONE = "done"
    REJECTED = "rejected"
    FAILED = "failed"
    UNKNOWN = "unknown"


#: The command names as plain strings, for membership tests on untrusted claims.
COMMANDS: Final = frozenset(c.value for c in Cmd)
#: The management request names as plain strings.
MGMT_COMMANDS: Final = frozenset(c.value for c in MgmtCmd)
#: The reasons the verifier itself gives (the others come from executing a command).
VERIFIER_REASONS: Final = frozenset({
    Reason.MALFORMED, Reason.BAD_SIGNATURE, Reason.UNKNOWN_KEY, Reason.WRONG_SITE,
    Reason.EXPIRED, Reason.NOT_YET_VALID, Reason.LIFETIME_TOO_LONG, Reason.RETAINED,
    Reason.UNKNOWN_UNIT, Reason.CLOCK_UNTRUSTED,
})
