"""Timeline Event records: what the gateway tells Stora it did (contract §6).

Stora requires a partner to write a Timeline Event for every action it takes on an
operator's behalf, worded "<action> via <product>" (stora-api §3.1).  This module is pure:
it builds the record of an action (:func:`make_event`), the stable id that makes the
record idempotent (:func:`external_id_for`) and, at delivery time, the
``POST /timeline/events`` body (:func:`event_body`, stora-api §3.2).  The outbox stores
records (``gateway/store/``); the drainer posts the bodies.

Rules decided here:

* ``description`` is one line: newlines, tabs and other control characters in a detail
  (which may quote a command's ``actor`` or ``reason``) become spaces, so the staff view
  and the logs cannot be split or forged.  It is at most :data:`MAX_DESCRIPTION` characters,
  cut with ``…``; the ``<action> via <app>`` prefix is never cut.
* A record's ``external_id`` is also the ``Idempotency-Key`` of its POST, so it is
  restricted to printable ASCII without spaces, at most 64 characters.
* An event delivered more than :data:`LATE_AFTER_S` after it happened says when it
  happened, in the description (as the contract's ``— detail``) and in the variables,
  because Stora stamps an event with its arrival time (back-dating is undocumented).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

from sitelink.payloads import rfc3339

__all__ = [
    "DETAIL_SEPARATOR",
    "EXTERNAL_ID_MAX",
    "KINDS",
    "LATE_AFTER_S",
    "MAX_DESCRIPTION",
    "EventRecord",
    "event_body",
    "external_id_for",
    "make_event",
]

#: The contract §6 wording of each kind; ``{app}`` is ``site.app_name``.
KINDS: Final[Mapping[str, str]] = MappingProxyType({
    "unlocked": "Unit unlocked via {app}",
    "locked": "Unit locked via {app}",
    "overlocked": "Unit overlocked via {app}",
    "overlock_removed": "Overlock removed via {app}",
    "unlock_refused": "Unlock refused via {app}",
    # Not an action on a unit (``unit`` and ``reference`` are ""): a signed config.set
    # changed the gateway's settings; staff see it beside the unlocks they govern.
    "config_changed": "Gateway configuration changed via {app}",
})

#: Between the wording and the detail (contract §6: "followed, optionally, by ` — `").
DETAIL_SEPARATOR: Final = " — "
#: Stora documents no maximum length (stora-api §3.2 [ND]); 500 characters keeps a staff
#: timeline readable and far below any plausible server limit.
MAX_DESCRIPTION: Final = 500
#: An ``actor`` is "short text" (contract §5); longer is cut, not refused.
MAX_ACTOR: Final = 100
#: Delivered this long after it happened, an event says when it happened.
LATE_AFTER_S: Final = 60.0
#: ``external.id`` and ``Idempotency-Key``: "sgw-" + 60 hex digits of SHA-256 (240 bits).
EXTERNAL_ID_MAX: Final = 64
_EXTERNAL_ID_PREFIX: Final = "sgw-"
_EXTERNAL_ID_RE: Final = re.compile(r"[!-~]{1,64}")  # printable ASCII, no space
_CONTROL_RUN: Final = re.compile(r"[\s\x00-\x1f\x7f-\x9f\u2028\u2029]+")


@dataclass(frozen=True, slots=True)
class EventRecord:
    """One action to report to Stora, as the outbox keeps it.

    ``occurred_at`` is wall-clock seconds since the epoch when the action happened;
    ``contact`` is a Stora contact id when the command named one; ``actor`` is the
    command's short audit text.
    """

    external_id: str
    kind: str
    unit: str
    reference: str
    site_id: str
    description: str
    contact: str | None
    actor: str | None
    occurred_at: float


def _one_line(text: str) -> str:
    """Runs of whitespace and control characters become one space; ends trimmed."""
    return _CONTROL_RUN.sub(" ", text).strip()


def _cut(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, ending in ``…`` when cut."""
    if len(text) <= limit:
        return text
    return text[: max(limit - 1, 0)].rstrip() + "…"


def _compose(head: str, detail: str, note: str = "") -> str:
    """``head — detail; note`` within :data:`MAX_DESCRIPTION`.

    Only the detail is cut: the head (the contract's wording) and the note (when a late
    event happened) are what staff must see.  A head longer than the limit on its own (an
    absurd ``app_name``) is cut too, keeping its "<action> via" start.
    """
    head = _cut(head, MAX_DESCRIPTION)
    room = MAX_DESCRIPTION - len(head) - len(DETAIL_SEPARATOR)
    if note:
        room -= len(note) + 2  # "; "
        tail = f"{_cut(detail, room)}; {note}" if detail and room > 1 else note
    else:
        tail = _cut(detail, room) if room > 1 else ""
    if not tail:
        return head
    return _cut(head + DETAIL_SEPARATOR + tail, MAX_DESCRIPTION)


def make_event(
    kind: str,
    *,
    app_name: str,
    site_id: str,
    unit: str,
    reference: str,
    external_id: str,
    occurred_at: float,
    contact: str | None = None,
    actor: str | None = None,
    detail: str | None = None,
) -> EventRecord:
    """The record of one action: ``KINDS[kind]`` worded for ``app_name``, then ``detail``.

    ``detail`` is free text from the caller (the unit's reference, the actor, a duration,
    an override reason); it is made single-line and cut so the description stays within
    :data:`MAX_DESCRIPTION`.  Raises ``ValueError`` for an unknown kind, an external id
    that cannot be an ``Idempotency-Key`` (see :func:`external_id_for`) or a non-finite
    time: these are programming errors, not bad input from outside.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown Timeline Event kind {kind!r}; expected one of {sorted(KINDS)}")
    if not _EXTERNAL_ID_RE.fullmatch(external_id):
        raise ValueError(
            f"external id {external_id!r} must be 1–{EXTERNAL_ID_MAX} printable ASCII "
            "characters without spaces (it is also the Idempotency-Key)"
        )
    if not math.isfinite(occurred_at):
        raise ValueError(f"occurred_at must be a finite time, not {occurred_at!r}")
    head = KINDS[kind].format(app=_one_line(app_name))
    actor_text = _cut(_one_line(actor), MAX_ACTOR) if actor else ""
    return EventRecord(
        external_id=external_id,
        kind=kind,
        unit=unit,
        reference=reference,
        site_id=site_id,
        description=_compose(head, _one_line(detail or "")),
        contact=contact or None,
        actor=actor_text or None,
        occurred_at=float(occurred_at),
    )


def event_body(
    record: EventRecord,
    *,
    source_id: str,
    template_id: str | None,
    delivered_at: float | None = None,
) -> dict[str, Any]:
    """The ``POST /timeline/events`` body for ``record`` (stora-api §3.2, contract §6).

    ``template`` is sent only when ``template_id`` is set (the config's ``""`` means
    none) and ``contact`` only when the record has one.  ``variables`` carries ``unit``,
    ``reference``, ``action`` (the kind), ``occurred_at`` and, when known, ``actor``.  When
    ``delivered_at`` is more than :data:`LATE_AFTER_S` after ``occurred_at``, the
    description gains "happened at <time>" and the variables ``delivered_late: true``.

    The body depends on ``delivered_at``; a retry under the same ``Idempotency-Key`` must
    send the body of the first attempt (Stora's handling of a reused key with a different
    body is undocumented), so the drainer builds it once and keeps it.
    """
    description = record.description
    variables: dict[str, Any] = {
        "unit": record.unit,
        "reference": record.reference,
        "action": record.kind,
        "occurred_at": rfc3339(record.occurred_at, timespec="seconds"),
    }
    if record.actor:
        variables["actor"] = record.actor
    if delivered_at is not None and delivered_at - record.occurred_at > LATE_AFTER_S:
        note = f"happened at {rfc3339(record.occurred_at, timespec='seconds')}"
        # The record keeps the composed description; split it again at the first
        # separator (the wording never contains one, unless an app name does).
        head, _, detail = description.partition(DETAIL_SEPARATOR)
        description = _compose(head, detail, note)
        variables["delivered_late"] = True
    body: dict[str, Any] = {
        "source": {"id": source_id},
        "site": {"id": record.site_id},
        "external": {"id": record.external_id},
        "description": description,
        "variables": variables,
    }
    if template_id:
        body["template"] = {"id": template_id}
    if record.contact:
        body["contact"] = {"id": record.contact}
    return body


def external_id_for(*parts: str) -> str:
    """A stable id for one action: the same parts always give the same id.

    ``"sgw-"`` and 60 hex digits of SHA-256 over the parts (64 characters, the
    ``Idempotency-Key`` too).  The parts are hashed as a JSON array, so ``("a", "bc")``
    and ``("ab", "c")`` differ.  Callers pass what identifies the action, e.g. the site,
    the command's ``jti`` and the kind.
    """
    if not parts:
        raise ValueError("external_id_for needs at least one part")
    encoded = json.dumps(list(parts), ensure_ascii=False, separators=(",", ":"))
    digest = hashlib.sha256(encoded.encode("utf-8")).hexdigest()
    return _EXTERNAL_ID_PREFIX + digest[: EXTERNAL_ID_MAX - len(_EXTERNAL_ID_PREFIX)]
