"""``stora-gateway watch``: the site live, one line per thing that happens.

It is the demo's live view pointed at the site's broker (``[mqtt]``), read-only:

* **commands** as they arrive on ``P/S/cmd`` (the token's claims, shown *unverified*:
  only the agent checks signatures, and its verdict is the result that follows);
* **results** on ``P/S/cmd/result``, **lock states** on the retained
  ``P/S/units/<unit>`` (each unit's current state first, then every change), **alarms**
  on ``P/S/alarm`` and the agent going **online/offline** (retained ``P/S/status``);
* **Timeline Events** as the outbox queues, retries, delivers or dead-letters them, read
  from the state database beside the agent (:class:`gateway.store.Store`, opened read-only).

``--json`` prints one JSON object per line for tools: ``at`` (RFC 3339 UTC, when watch
saw it), ``event`` (``broker``, ``agent``, ``command``, ``result``, ``state``,
``alarm``, ``timeline``), ``unit`` and ``reference`` (or null), ``text`` (the line a
person reads) and ``data`` (the payload as published, or the outbox row).

**Its own broker account.**  The shipped brokers bind client ids to accounts
(``use_username_as_clientid``): one account has one connection, so a watch logged in as
the agent would disconnect the agent.  Watch refuses the agent's account and the
controller links' ones, and takes ``--username``/``--password-file``, by default
``$STORA_GATEWAY_WATCH_USERNAME``/``$STORA_GATEWAY_WATCH_PASSWORD_FILE``, else, on a
broker with accounts (``[mqtt] username`` set), the account ``gw-watch`` (read-only in
the ACL: ``deploy/README.md``, "Broker accounts").  A broker without accounts (a
bench, the tests) is used anonymously (:mod:`gateway.link.site_client`, shared with the
site self-test).  Over TLS it trusts ``[mqtt] ca_file`` and presents no client
certificate, or its own (``$STORA_GATEWAY_WATCH_TLS_CERT_FILE`` and
``$STORA_GATEWAY_WATCH_TLS_KEY_FILE``), never the agent's: a broker with
``use_identity_as_username`` would take it for the agent.

It runs until Ctrl-C or SIGTERM (exit 0).  A broker that cannot be reached at the
start is exit 1, refused credentials or a subscription the ACL refuses exit 2; once
connected it reconnects by itself and says so.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Any, Final, TextIO

from gateway.cli.shell import CliError, Context
from gateway.clock import rfc3339
from gateway.errors import cap_text
from gateway.link.site_client import (
    BrokerAccount,
    SiteClient,
    SiteLinkError,
    client_certificate,
    resolve_account,
)
from gateway.ops import liveview
from gateway.outbox.policy import refusal_text
from gateway.store import Store, StoreError
from sitelink.claims import MAX_COMMAND_BYTES as _MAX_COMMAND_BYTES
from sitelink.topics import Topics

if TYPE_CHECKING:
    from gateway.config import Config
    from gateway.store import EventRow

__all__ = ["SiteView", "TimelineFeed", "cmd_watch", "open_outbox", "refusal_of", "run_watch"]

#: Environment variables naming watch's account and password file.
WATCH_USER_ENV: Final = "STORA_GATEWAY_WATCH_USERNAME"
WATCH_PASSWORD_ENV: Final = "STORA_GATEWAY_WATCH_PASSWORD_FILE"  # noqa: S105 (a name)
#: Environment variables naming watch's own TLS client certificate and its key, for a
#: broker that asks for one (never the agent's: gateway/link/site_client.py).
WATCH_CERT_ENV: Final = "STORA_GATEWAY_WATCH_TLS_CERT_FILE"
WATCH_KEY_ENV: Final = "STORA_GATEWAY_WATCH_TLS_KEY_FILE"
#: The account deploy/README.md proposes for watch on a broker with accounts.
WATCH_ACCOUNT: Final = "gw-watch"
#: How often the outbox is read: a delivery shows within a quarter second, and a poll
#: (two indexed reads) costs the Pi nothing measurable.
OUTBOX_POLL_S: Final = 0.25
#: Largest command payload decoded for display (``sitelink.claims.MAX_COMMAND_BYTES``):
#: the agent refuses anything larger (contract §5), so watch only says how big it was.
MAX_COMMAND_BYTES: Final = _MAX_COMMAND_BYTES
#: Pending events followed until delivered, all of them read at each poll (in slices:
#: ``Store.events_in``).  A backlog larger than this (Stora down for hours) is followed
#: from its newest end; older ones are no longer reported.
MAX_TRACKED: Final = 1000
#: After this long connected without the agent's retained status, watch says why that
#: may be.  Retained messages come with the subscription, so silence this long means
#: none is there, or the ACL hides it: Mosquitto grants every subscription and then
#: delivers only what the account may read.
STATUS_HINT_S: Final = 5.0


# -- the Timeline Events ------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class TimelineChange:
    """What happened to one outbox row since the last poll."""

    change: str  # "queued", "attempt", "delivered", "dead"
    row: EventRow


class TimelineFeed:
    """Follows the outbox from its newest row on: each new row, each failed attempt,
    each delivery and dead letter, once.  Call :meth:`poll` periodically."""

    def __init__(self, tail: Store) -> None:
        self.tail = tail
        self.watermark = tail.newest_seq()
        #: seq -> attempts seen, for rows still pending.
        self._pending: dict[int, int] = {}

    def poll(self) -> list[TimelineChange]:
        """The changes since the last call, in ``seq`` order."""
        # Both reads first: one that fails (StoreError) leaves the feed as it was, so
        # the next poll reports everything again, nothing twice.
        known = self.tail.events_in(self._pending)
        new = self.tail.events_after(self.watermark)
        changes: list[TimelineChange] = []
        still: dict[int, int] = {}  # a pruned row is not read back: no longer tracked
        for row in known:
            if row.state == "pending":
                if row.attempts > self._pending[row.seq] and row.last_error:
                    changes.append(TimelineChange("attempt", row))
                still[row.seq] = row.attempts
            else:
                changes.append(TimelineChange(row.state, row))
        self._pending = still
        for row in new:
            self.watermark = row.seq
            changes.append(TimelineChange("queued", row))
            if row.state == "pending":
                self._pending[row.seq] = row.attempts
            else:  # delivered (or refused) before this poll saw it queued
                changes.append(TimelineChange(row.state, row))
        while len(self._pending) > MAX_TRACKED:
            del self._pending[min(self._pending)]
        return changes


# -- the view ------------------------------------------------------------------------------
def _now_rfc3339() -> str:
    return str(rfc3339(time.time()))


def _local_time() -> str:
    return time.strftime("%H:%M:%S")


class Printer:
    """Writes each event as a line for people or a JSON object for tools."""

    def __init__(self, out: TextIO, json_lines: bool, references: Mapping[str, str]) -> None:
        self.json_lines = json_lines
        self.references = references
        self.view = liveview.LiveView(out, stamp=_local_time)
        self.broken = threading.Event()  # the reader went away (``watch | head``)

    def emit(self, event: str, tag: str, text: str, data: Mapping[str, Any] | None = None,
             unit: object = None) -> None:
        """One event: ``tag`` and ``text`` for people, everything for ``--json``."""
        unit_id = None if unit is None else str(unit)
        try:
            if self.json_lines:
                doc = {"at": _now_rfc3339(), "event": event, "unit": unit_id,
                       "reference": self.references.get(unit_id) if unit_id else None,
                       "text": text, "data": dict(data or {})}
                self.view.write(json.dumps(doc, separators=(",", ":"), default=str) + "\n")
            else:
                self.view.line(tag, text)
        except BrokenPipeError:
            self.broken.set()


def decode_command(payload: bytes) -> dict[str, Any] | None:
    """The claims and ``kid`` of a command token, *not verified* (the agent verifies),
    or ``None`` when it is not a readable JWS."""
    if len(payload) > MAX_COMMAND_BYTES:
        return None
    parts = payload.split(b".")
    if len(parts) != 3:  # header.claims.signature
        return None
    try:
        header, claims = (json.loads(base64.urlsafe_b64decode(p + b"=" * (-len(p) % 4)))
                          for p in parts[:2])
    except (ValueError, TypeError):
        return None
    if not isinstance(header, dict) or not isinstance(claims, dict):
        return None
    keep = ("jti", "cmd", "unit", "dur", "ver", "actor", "override", "reason", "iat", "exp")
    return {"kid": header.get("kid"), **{k: claims.get(k) for k in keep if k in claims}}


class SiteView:
    """Turns the agent's topics into events for a :class:`Printer`."""

    def __init__(self, site_topics: Topics, printer: Printer) -> None:
        self.site_topics = site_topics
        self.printer = printer
        self.references = printer.references
        self._states: dict[str, dict[str, Any]] = {}
        self._online: bool | None = None
        self._lock = threading.Lock()

    @property
    def topics(self) -> list[str]:
        """What watch subscribes to (read-only)."""
        t = self.site_topics
        return [t.status, t.cmd, t.cmd_result, t.units_filter, t.alarm]

    def on_connection(self, connected: bool, reason: str | None) -> None:
        """The broker link came up or went down."""
        text = ("connected" + (f" ({reason})" if reason else "")) if connected else \
            f"connection lost ({cap_text(reason or 'unknown', 200)}); reconnecting"
        self.printer.emit("broker", "broker", text, {"connected": connected, "reason": reason})

    def on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        """One message from the agent's topics."""
        t = self.site_topics
        if topic == t.cmd:
            self._command(payload, retained)
            return
        try:
            doc = json.loads(payload)
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            self.printer.emit("mqtt", "mqtt", f"{cap_text(topic, 200)}: not a JSON object "
                              f"({len(payload)} bytes)", {"topic": topic})
            return
        with self._lock:  # paho's thread only, but keep the history consistent anyway
            if topic == t.status:
                self._status(doc, retained)
            elif topic == t.cmd_result:
                self.printer.emit("result", "←", liveview.describe_result(doc, self.references),
                                  doc, doc.get("unit"))
            elif topic.startswith(t.unit("")):
                unit = str(doc.get("unit"))
                line = liveview.describe_state_change(self._states.get(unit), doc)
                self._states[unit] = doc
                if line is not None:
                    self.printer.emit("state", "lock", line, {**doc, "retained": retained},
                                      unit)
            elif topic == t.alarm:
                self.printer.emit("alarm", "alarm", liveview.describe_alarm(doc, self.references),
                                  doc, doc.get("unit"))

    @property
    def agent_seen(self) -> bool:
        """Whether the agent's status (online or offline) has arrived."""
        return self._online is not None

    def _status(self, doc: Mapping[str, Any], retained: bool) -> None:
        online = bool(doc.get("online"))
        if online == self._online:
            return  # the periodic health report: not an event
        self._online = online
        self.printer.emit("agent", "agent", liveview.describe_online(doc),
                          {"online": online, "version": doc.get("version"),
                           "retained": retained})

    def _command(self, payload: bytes, retained: bool) -> None:
        claims = decode_command(payload)
        if claims is None:
            self.printer.emit("command", "→", f"a message of {len(payload)} bytes that is not "
                              "a readable command token (the agent rejects it)",
                              {"size": len(payload), "retained": retained})
            return
        unit = claims.get("unit")
        words = [cap_text(str(claims.get("cmd")), 40)]
        if unit is not None:
            words.append(cap_text(str(self.references.get(str(unit), unit)), 80))
        if claims.get("dur") is not None:
            words.append(f"for {cap_text(str(claims['dur']), 12)} s")
        if claims.get("ver") is not None:
            words.append(f"version {cap_text(str(claims['ver']), 24)}")
        if claims.get("override"):
            words.append(f"OVERRIDE ({cap_text(str(claims.get('reason')), 100)})")
        if claims.get("actor"):
            words.append(f"by {cap_text(str(claims['actor']), 100)}")
        text = (" ".join(words) + f" (jti {cap_text(str(claims.get('jti')), 64)}, key "
                f"{cap_text(str(claims.get('kid')), 64)}; not yet verified)")
        if retained:
            text += " [retained: the agent refuses it]"
        self.printer.emit("command", "→", text,
                          {**claims, "verified": False, "retained": retained}, unit)

    def timeline(self, change: TimelineChange) -> None:
        """One change of an outbox row."""
        row = change.row
        description = cap_text(row.description, 300)
        if change.change == "queued":
            text = f"queued: {description}"
        elif change.change == "attempt":
            text = (f"attempt {row.attempts} failed, will retry: "
                    f"{cap_text(row.last_error or '-', 200)} ({description})")
        elif change.change == "delivered":
            text = f"delivered: {description}"
        else:
            text = (f"REFUSED by Stora, dead-lettered ({refusal_of(row)}): {description}; "
                    f"see `stora-gateway outbox --dead`")
        self.printer.emit("timeline", "Stora", text, {"change": change.change,
                                                      **row.as_dict()}, row.unit)


def refusal_of(row: EventRow) -> str:
    """Stora's full refusal of a dead letter (status, code, message, each detail with its
    pointer, the request id), as the dead-letter alarm and ``status`` quote it
    (``gateway.outbox.policy``'s text)."""
    return refusal_text(row.as_dict()["error"] or {})


# -- running it ----------------------------------------------------------------------------
def cmd_watch(ctx: Context) -> int:
    """``watch``: the site live, one line (or JSON object) per event."""
    a = ctx.args
    try:
        account = resolve_account(ctx.config(), a.username, a.password_file,
                                  default_user=WATCH_ACCOUNT, user_env=WATCH_USER_ENV,
                                  password_env=WATCH_PASSWORD_ENV)
        return run_watch(ctx.config(), account, ctx.out, ctx.err, json_lines=ctx.json,
                         timeline=not a.no_timeline, tls_cert_file=a.tls_cert_file,
                         tls_key_file=a.tls_key_file)
    except SiteLinkError as exc:
        raise CliError(str(exc), exc.status) from exc


class _Stop:
    """SIGINT and SIGTERM set :attr:`event` (main thread only; restored on exit)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event
        self._previous: list[Any] = []

    def __enter__(self) -> _Stop:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous.append((sig, signal.signal(sig, self._handle)))
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.event.set()

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous:
            signal.signal(sig, handler)


def open_outbox(config: Config) -> tuple[Store | None, str | None]:
    """The outbox beside the agent, or ``None`` and why it cannot be read.

    ``watch`` shows each Timeline Event as it is queued, retried, delivered or refused,
    and ``selftest`` reports whether the events of its unlock reached Stora.  Both read
    the agent's state database (``[storage] path``) read-only, beside the running agent:
    SQLite's WAL lets a reader see every committed row without blocking the agent's
    writes, and a read-only connection cannot change anything.  The agent's control
    socket was the other candidate, but it lists only pending and dead events: one
    delivered within milliseconds (the usual case) would never be seen there.

    On an install the database is ``stora-gateway`` 0640 in a 0750 directory
    (``deploy/``): members of the group (technicians) can read it, as they can use the
    control socket; anyone else cannot even look into the directory (an ``OSError``).
    """
    path = config.storage.path
    try:
        return Store(path, read_only=True), None
    except StoreError as exc:
        why = str(exc)
    except OSError as exc:  # Python 3.11's Path.exists() in a directory it may not enter
        why = f"{path}: {exc.strerror or exc}"
    return None, (f"{why} (on the gateway, run this as a member of group stora-gateway, "
                  "which may read it)")


def run_watch(config: Config, account: BrokerAccount, out: TextIO, err: TextIO, *,
              json_lines: bool = False, timeline: bool = True,
              stop: threading.Event | None = None, tls_cert_file: str | None = None,
              tls_key_file: str | None = None) -> int:
    """Watch the site until ``stop`` is set (or SIGINT/SIGTERM in the main thread).

    ``tls_cert_file``/``tls_key_file``: watch's own TLS client certificate (default
    :data:`WATCH_CERT_ENV`/:data:`WATCH_KEY_ENV`; none: the CA alone).  Returns 0;
    raises :class:`SiteLinkError` when the broker cannot be used at the start.
    """
    certificate = client_certificate(config, tls_cert_file, tls_key_file,
                                     cert_env=WATCH_CERT_ENV, key_env=WATCH_KEY_ENV)
    stop = stop or threading.Event()
    references = {lock.unit: lock.reference for lock in config.locks}
    printer = Printer(out, json_lines, references)
    site_topics = Topics(config.mqtt.topic_prefix, config.site.id)
    view = SiteView(site_topics, printer)
    client = SiteClient(config.mqtt, account, client_name="stora-watch",
                        subscriptions=view.topics, on_message=view.on_message,
                        on_connection=view.on_connection, certificate=certificate)
    tail: Store | None = None
    try:
        why_not: str | None = None
        if timeline:
            tail, why_not = open_outbox(config)
        if not json_lines:
            who = account.label + (f" with the certificate {certificate.cert_file}"
                                   if certificate is not None else "")
            printer.view.write(
                f"watching site {config.site.id} on {config.mqtt.where} {who} "
                f"({time.strftime('%Y-%m-%d %Z')}); Ctrl-C to stop\n"
                "  → command (as sent, before the agent checks it)   ← result   lock = unit "
                "state   Stora = Timeline Event\n")
        if why_not is not None:
            err.write(f"stora-gateway: Timeline Events are not shown: {why_not}\n")
        with _Stop(stop):
            feed = TimelineFeed(tail) if tail is not None else None
            client.start()
            _follow(feed, view, stop, printer.broken, err,
                    hint=f"stora-gateway: no status from the agent on {site_topics.status} after "
                    f"{STATUS_HINT_S:.0f} s: it has never connected to this broker, or the "
                    f"broker's ACL does not let {account.username or 'anonymous clients'} "
                    "read the site's topics (deploy/README.md, \"Broker accounts\")\n")
    finally:
        client.close()
        if tail is not None:
            tail.close()
    if printer.broken.is_set() and out is sys.stdout:
        # The reader left (``watch | head``): keep Python's exit flush from failing too.
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
    return 0


def _follow(feed: TimelineFeed | None, view: SiteView, stop: threading.Event,
            broken: threading.Event, err: TextIO, *, hint: str) -> None:
    """Poll the outbox until ``stop`` (or the reader is gone); say ``hint`` once if the
    agent's status has not arrived within :data:`STATUS_HINT_S`."""
    failing = False
    hint_at: float | None = time.monotonic() + STATUS_HINT_S
    while not stop.wait(OUTBOX_POLL_S) and not broken.is_set():
        if hint_at is not None and time.monotonic() >= hint_at:
            hint_at = None
            if not view.agent_seen:
                err.write(hint)
                err.flush()
        if feed is None:
            continue
        try:
            changes = feed.poll()
        except StoreError as exc:  # moved aside, a disk error: say once, keep trying
            if not failing:
                err.write(f"stora-gateway: cannot read the outbox: {exc}\n")
            failing = True
            continue
        failing = False
        for change in changes:
            view.timeline(change)
