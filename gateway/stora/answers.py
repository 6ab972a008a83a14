"""What one delivery attempt came to, and Stora's error envelope (stora-api §6).

The outcomes :class:`Delivered`, :class:`Retry`, :class:`Dead` and :class:`AuthFailed`
(together :data:`PostOutcome`) each carry the :class:`IdempotencyKey` the next attempt
must use.  :func:`parse_error_envelope` reads a §6 error, every string capped and made
one line as it is parsed.  See docs/design/idempotency.md ("What comes back").
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, ClassVar, Final

from gateway.stora.idempotency import IdempotencyKey
from gateway.stora.limits import cap_text

__all__ = [
    "MAX_DETAILS",
    "AuthFailed",
    "Dead",
    "Delivered",
    "ErrorDetail",
    "ErrorEnvelope",
    "PostOutcome",
    "Retry",
    "json_or_none",
    "parse_error_envelope",
]

#: At most this many ``details`` of an error are kept (each capped like every string):
#: enough to say what was wrong, small enough for a dead-letter row and ``outbox --dead``.
MAX_DETAILS: Final = 5


@dataclass(frozen=True, slots=True)
class ErrorDetail:
    """One ``details`` entry of a stora-api §6 error."""

    message: str
    pointer: str


@dataclass(frozen=True, slots=True)
class Delivered:
    """Stora has the event (a fresh 2xx, or the replay of an earlier one)."""

    key: IdempotencyKey
    status: int
    event_id: str | None
    kind: ClassVar[str] = "delivered"


@dataclass(frozen=True, slots=True)
class Retry:
    """Try again after ``delay_s`` with ``key`` (rotated when ``rotate_key``).

    ``sent`` is False when nothing went out (waiting for the limiter or a token);
    ``status`` is the HTTP status when there was an answer; ``reason`` is a short code
    for logs and the outbox: ``rate_limited``, ``local_rate_limit``, ``no_answer``,
    ``not_sent``, ``server_error``, ``gateway_error``, ``in_progress``,
    ``token_unavailable``; ``detail`` (one capped line, or ``None``) says more, e.g.
    why no token could be had.
    """

    key: IdempotencyKey
    delay_s: float
    rotate_key: bool
    reason: str
    status: int | None = None
    sent: bool = True
    detail: str | None = None
    kind: ClassVar[str] = "retry"


@dataclass(frozen=True, slots=True)
class Dead:
    """Stora refused this event for good: dead-letter it with what Stora said."""

    key: IdempotencyKey
    status: int | None
    code: str
    message: str
    details: tuple[ErrorDetail, ...] = ()
    request_id: str | None = None
    kind: ClassVar[str] = "dead"

    def as_record(self) -> dict[str, Any]:
        """JSON-ready data for the dead-letter row and ``stora-gateway outbox --dead``."""
        return {
            "status": self.status,
            "code": self.code,
            "message": self.message,
            "details": [{"message": d.message, "pointer": d.pointer} for d in self.details],
            "request_id": self.request_id,
            "idempotency_key": self.key.value,
        }


@dataclass(frozen=True, slots=True)
class AuthFailed:
    """The credential is refused: stop posting, alarm, try again after ``retry_after_s``."""

    key: IdempotencyKey
    reason: str
    retry_after_s: float
    kind: ClassVar[str] = "auth"


PostOutcome = Delivered | Retry | Dead | AuthFailed


@dataclass(frozen=True, slots=True)
class ErrorEnvelope:
    """A stora-api §6 error, every string capped."""

    code: str
    type: str
    message: str
    request_id: str | None
    details: tuple[ErrorDetail, ...]


def json_or_none(data: bytes) -> object:
    """``data`` parsed as JSON, or ``None`` when it is empty or not JSON."""
    try:
        return json.loads(data) if data else None
    except (ValueError, RecursionError):  # 10 000 nested brackets are no error envelope
        return None


def parse_error_envelope(data: bytes) -> ErrorEnvelope | None:
    """The stora-api §6 error in ``data``, or ``None`` when it is not one (a proxy's page)."""
    doc = json_or_none(data)
    err = doc.get("error") if isinstance(doc, dict) else None
    if not isinstance(err, dict) or not isinstance(err.get("code"), str):
        return None
    raw = err.get("details")
    given = [d for d in raw if isinstance(d, dict)] if isinstance(raw, list) else []
    details = [
        ErrorDetail(cap_text(d.get("message", "")), cap_text(d.get("pointer", "")))
        for d in given[:MAX_DETAILS]
    ]
    if len(given) > MAX_DETAILS:
        details.append(ErrorDetail(f"…(+{len(given) - MAX_DETAILS} more details)", ""))
    rid = err.get("request_id")
    return ErrorEnvelope(
        code=cap_text(err["code"]),
        type=cap_text(err.get("type", "")),
        message=cap_text(err.get("message", "")),
        request_id=cap_text(rid) if isinstance(rid, str) else None,
        details=tuple(details),
    )
