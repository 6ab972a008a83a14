"""The drain's policy in pure pieces: its states, its ``meta`` keys, and what it says.

Which retry reasons hold the whole drain (:data:`CONNECTION_REASONS`), which refusals
are the configuration rather than the event (:func:`is_config_problem`), and the one
capped line every ``last_error``, alarm and status quotes (:func:`note`,
:func:`refusal_text`).  No I/O.  See docs/design/outbox.md.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final

from gateway.stora.answers import Dead
from gateway.stora.limits import MAX_TEXT_CHARS, TOKEN_DEADLINE_S, cap_text

__all__ = [
    "CONNECTION_REASONS",
    "DRAIN_STATES",
    "IN_FLIGHT_KEY",
    "MAX_NOTE_CHARS",
    "NEWEST_DEAD_KEY",
    "TOKEN_ALARM_AFTER_S",
    "Alarm",
    "is_config_problem",
    "note",
    "refusal_text",
]

#: Retry reasons that are about the connection to Stora, not the event: hold the drain.
CONNECTION_REASONS: Final = frozenset({
    "not_sent", "no_answer", "gateway_error", "rate_limited", "local_rate_limit",
    "token_unavailable",
})
#: What ``status`` shows as the drain state.
DRAIN_STATES: Final = ("ok", "backing off", "paused: auth", "paused: config",
                       "paused: storage", "stopped")

#: ``meta`` key of the attempt in flight: ``{"seq", "generation", "at"}`` as JSON, or "".
IN_FLIGHT_KEY: Final = "outbox.in_flight"
#: ``meta`` key of the event dead-lettered last (its ``seq``), so ``status`` can quote the
#: newest refusal with one lookup however many dead letters are held.
NEWEST_DEAD_KEY: Final = "outbox.newest_dead"
#: A ``last_error``, alarm detail or status line quotes at most a code and a message from
#: Stora (each capped at ``MAX_TEXT_CHARS``) in a sentence of ours; it never exceeds this,
#: so an alarm and the retained status stay far below the broker's 64 KiB packet limit.
MAX_NOTE_CHARS: Final = 4 * MAX_TEXT_CHARS
#: Token refreshes failing this long (from the start of the first failed one) are no blip:
#: alarm.  Two of ``TOKEN_DEADLINE_S`` (gateway/stora/tokens.py): a refresh in flight
#: when the alarm falls due ends by its deadline, so even a stuck endpoint alarms within
#: 45 s (the issue: a minute).
TOKEN_ALARM_AFTER_S: Final = 2 * TOKEN_DEADLINE_S

Alarm = Callable[[str, str | None, str], None]


def is_config_problem(outcome: Dead) -> bool:
    """A refusal every event would get: a missing scope (403), a wrong ``base_url`` (404
    ``invalid_endpoint``) or a moved one (any 3xx: redirects are never followed)."""
    status = outcome.status
    return (status == 403 or (status == 404 and outcome.code == "invalid_endpoint")
            or (status is not None and 300 <= status < 400))


def note(text: str) -> str:
    """One line of at most :data:`MAX_NOTE_CHARS`: what is stored, alarmed and shown."""
    return cap_text(text, MAX_NOTE_CHARS)


def refusal_text(error: Mapping[str, Any]) -> str:
    """Stora's refusal as one line: status, code, message, each detail with its pointer,
    and the request id (for Stora's support), from a dead letter's record
    (``Dead.as_record`` or ``EventRow.as_dict()["error"]``); capped like every note."""
    text = f"{error.get('status') or '-'} {error.get('code') or '?'}: {error.get('message')}"
    details = [f"{d.get('pointer') or '-'}: {d.get('message')}"
               for d in error.get("details") or () if isinstance(d, Mapping)]
    if details:
        text += f" ({'; '.join(details)})"
    if error.get("request_id"):
        text += f" [request {error['request_id']}]"
    return note(text)
