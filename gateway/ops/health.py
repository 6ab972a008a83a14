"""The site's verdict: ``ok``, ``degraded`` or ``down``, and why, from the ``status`` dict.

One pure function, :func:`assess`, over what ``Agent.status`` reports, so the retained
``P/S/status``, ``stora-gateway status`` (its first line and exit status) and the
Prometheus textfile can never disagree.

``down``
    Commands cannot be executed: the clock is not trusted (every command is refused
    ``clock_untrusted``), the MQTT broker is not connected (no command can arrive), every
    controller is offline (no lock can be driven), or no agent runs at all (the CLI says
    so itself: :func:`agent_not_running`).
``degraded``
    Doors work, but something a person must look at is wrong: Stora refuses the
    gateway's events (delivery paused for the credential or the configuration, token
    refreshes failing), dead-lettered Timeline Events are held, some controllers are
    offline,
    the state database fails or is a temporary one, events have waited longer than
    :data:`OUTBOX_STALE_S`, messages too large for the broker were dropped, the disk
    is nearly full, or the site self-test's key is still trusted (:data:`SELFTEST_KID`:
    a commissioning tool whose key file opens every door).
``ok``
    None of the above.

Each reason is ``{"severity", "code", "text"}``: ``code`` is stable, for tools and
alerts; ``text`` is one short sentence for people, with outside text capped
(:data:`REASON_MAX_CHARS`) so the retained status stays far below the broker's packet
limit however many things are wrong.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from gateway.errors import cap_text
from gateway.term import plural

__all__ = [
    "DISK_LOW_BYTES",
    "OUTBOX_STALE_S",
    "REASON_MAX_CHARS",
    "SELFTEST_KID",
    "VERDICTS",
    "Reason",
    "Verdict",
    "agent_not_running",
    "assess",
]

#: The three verdicts, best first.
VERDICTS: Final = ("ok", "degraded", "down")
#: Longest ``text`` of one reason (characters).  A dead letter's reason quotes Stora;
#: the whole of it stays in ``outbox.newest_dead`` and ``outbox --dead``.
REASON_MAX_CHARS: Final = 300
#: Offline controllers named in one reason; the rest are counted ("and 3 more").
NAMES_SHOWN: Final = 5
#: Timeline Events waiting longer than this are worth a look even while the drain only
#: backs off (Stora or the network down): 15 minutes is longer than any backoff step
#: of gateway/stora/ratelimit.py (capped at a few minutes) and than a routine Stora deploy.
OUTBOX_STALE_S: Final = 900.0
#: Free space below this on the database's filesystem is an alarm waiting to happen:
#: SQLite needs room for its WAL and a checkpoint, and a full SD card is the usual way
#: a gateway stops keeping its outbox (gateway/ops/telemetry.py).  100 MiB holds weeks of
#: events at the configured rate limits many times over.
DISK_LOW_BYTES: Final = 100 * 1024 * 1024
#: The key id the site self-test signs with (``stora-gateway selftest``, dev kit; it is
#: defined here because the product never imports the dev kit).  While ``[commands]
#: trusted_keys`` lists it, whoever holds the self-test's key file can open every door:
#: meant for commissioning only, so the verdict says so until it is removed.
SELFTEST_KID: Final = "selftest"


@dataclass(frozen=True, slots=True)
class Reason:
    """One thing wrong: ``severity`` (``down`` or ``degraded``), stable ``code``, ``text``."""

    severity: str
    code: str
    text: str

    def as_dict(self) -> dict[str, str]:
        """JSON-ready: ``{"severity", "code", "text"}``."""
        return {"severity": self.severity, "code": self.code, "text": self.text}


@dataclass(frozen=True, slots=True)
class Verdict:
    """The verdict and its reasons, the ``down`` ones first."""

    verdict: str
    reasons: tuple[Reason, ...] = field(default=())

    @property
    def headline(self) -> str:
        """``OK``, ``DEGRADED: <reasons>`` or ``DOWN: <reasons>``, on one line."""
        if not self.reasons:
            return self.verdict.upper()
        return f"{self.verdict.upper()}: " + "; ".join(r.text for r in self.reasons)

    def as_dict(self) -> dict[str, Any]:
        """``{"verdict", "reasons"}`` for ``status`` and ``P/S/status``."""
        return {"verdict": self.verdict, "reasons": [r.as_dict() for r in self.reasons]}


def _section(status: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = status.get(name)
    return value if isinstance(value, Mapping) else {}


def _cap(text: object) -> str:
    return cap_text(str(text), REASON_MAX_CHARS)


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _clock(status: Mapping[str, Any]) -> list[Reason]:
    clock = _section(status, "clock")
    if clock.get("trusted") is False:
        why = clock.get("why") or "no reason given"
        return [Reason("down", "clock_untrusted",
                       _cap(f"clock untrusted, every command is refused clock_untrusted: {why}"))]
    return []


def _broker(status: Mapping[str, Any]) -> list[Reason]:
    broker = _section(status, "broker")
    if broker.get("connected") is False:
        why = (broker.get("last_connect_error") or broker.get("last_disconnect_reason")
               or "not connected yet")
        return [Reason("down", "broker_disconnected",
                       _cap(f"MQTT broker not connected, no command can arrive: {why}"))]
    if broker.get("publish_oversize"):
        n = int(broker["publish_oversize"])
        return [Reason("degraded", "publish_oversize", _cap(
            f"{plural(n, 'message')} too large for the broker not published "
            "(see [mqtt] max_packet_bytes and the journal)"))]
    return []


def _controllers(status: Mapping[str, Any]) -> list[Reason]:
    listed = status.get("controllers")
    found = [c for c in listed if isinstance(c, Mapping)] if isinstance(listed, list) else []
    offline = [c for c in found if c.get("online") is False]
    if not offline:
        return []
    named = [f"{c.get('name')} ({c.get('last_error') or c.get('detail') or 'no answer'})"
             for c in offline[:NAMES_SHOWN]]
    more = f" and {len(offline) - NAMES_SHOWN} more" if len(offline) > NAMES_SHOWN else ""
    if len(offline) == len(found):  # no lock can be driven: no command can be executed
        return [Reason("down", "controllers_offline", _cap(
            f"every controller offline, no lock can be driven: {', '.join(named)}{more}"))]
    return [Reason("degraded", "controllers_offline", _cap(
        f"{plural(len(offline), 'controller')} offline: {', '.join(named)}{more}"))]


def _outbox(status: Mapping[str, Any]) -> list[Reason]:
    outbox = _section(status, "outbox")
    reasons = []
    if outbox.get("error"):
        reasons.append(Reason("degraded", "storage",
                              _cap(f"the outbox cannot be read: {outbox['error']}")))
    drain = outbox.get("drain")
    if drain in ("paused: auth", "paused: config"):
        reasons.append(Reason("degraded", "stora_refusing", _cap(
            f"Stora refuses the gateway's events, delivery {drain}: "
            f"{outbox.get('last_error') or 'see the journal'}")))
    elif drain == "paused: storage":
        reasons.append(Reason("degraded", "storage", _cap(
            f"event delivery paused by the database: {outbox.get('last_error')}")))
    token = outbox.get("token")
    if isinstance(token, Mapping) and token.get("state") == "failing":
        failing = token.get("failing_for_s")
        since = f" for {failing:.0f} s" if isinstance(failing, int | float) else ""
        reasons.append(Reason("degraded", "token_failing", _cap(
            f"Stora token refresh failing{since}: {token.get('last_error') or '-'}")))
    dead = outbox.get("dead")
    if isinstance(dead, int) and dead > 0:
        newest = outbox.get("newest_dead")
        why = newest.get("reason") if isinstance(newest, Mapping) else None
        reasons.append(Reason("degraded", "dead_letters", _cap(
            f"{plural(dead, 'Timeline Event')} refused by Stora and dead-lettered"
            + (f", newest: {why}" if why else "")
            + " (stora-gateway outbox --dead)")))
    oldest = outbox.get("oldest_age_s")
    if isinstance(oldest, int | float) and oldest > OUTBOX_STALE_S:
        pending = outbox.get("pending")
        waiting = plural(pending, "Timeline Event") if isinstance(pending, int) else "events"
        reasons.append(Reason("degraded", "outbox_stalled", _cap(
            f"{waiting} waiting, the oldest for {_minutes(oldest)}: "
            f"{outbox.get('last_error') or drain or 'not posted yet'}")))
    refused = outbox.get("events_refused")
    if isinstance(refused, int) and refused > 0:
        reasons.append(Reason("degraded", "storage", _cap(
            f"{plural(refused, 'Timeline Event')} lost: the database refused to record "
            "them (see the storage alarms)")))
    return reasons


def _storage(status: Mapping[str, Any]) -> list[Reason]:
    storage = _section(status, "storage")
    reasons = []
    if storage.get("ephemeral"):
        reasons.append(Reason("degraded", "storage", "the state database is a temporary "
                              "in-memory one: nothing is kept across a restart"))
    elif storage.get("read_only"):
        reasons.append(Reason("degraded", "storage",
                              "the state database is read-only: new events cannot be kept"))
    free = _section(status, "host").get("disk_free_bytes")
    if isinstance(free, int) and free < DISK_LOW_BYTES:
        reasons.append(Reason("degraded", "disk_low",
                              f"disk nearly full: {free // (1024 * 1024)} MiB free"))
    return reasons


def _commands(status: Mapping[str, Any]) -> list[Reason]:
    trusted = _section(status, "commands").get("trusted_keys")
    if isinstance(trusted, list) and SELFTEST_KID in trusted:
        return [Reason("degraded", "commissioning_key_trusted",
                       f"the self-test key (kid {SELFTEST_KID}) is trusted; remove it from "
                       "[commands] trusted_keys after commissioning")]
    return []


def assess(status: Mapping[str, Any]) -> Verdict:
    """The verdict ``status`` (``Agent.status``) calls for; see the module docstring.

    Sections that are missing count as fine: a minimal status (a probe failed) is not
    a reason to call a site down.
    """
    reasons = [*_clock(status), *_broker(status), *_controllers(status), *_outbox(status),
               *_storage(status), *_commands(status)]
    if status.get("online") is False:
        reasons.insert(0, Reason("down", "offline", "the agent says it is offline"))
    ordered = tuple(sorted(reasons, key=lambda r: r.severity != "down"))  # stable
    if any(r.severity == "down" for r in ordered):
        return Verdict("down", ordered)
    return Verdict("degraded" if ordered else "ok", ordered)


def agent_not_running(why: str) -> Verdict:
    """The verdict when no agent answers: nothing executes remote commands."""
    return Verdict("down", (Reason("down", "agent_not_running", _cap(
        f"the agent is not running ({why}): remote commands are not executed; start it "
        "with systemctl start stora-gateway (locks, unlock, lock and test work directly)")),))
