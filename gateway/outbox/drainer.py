"""The outbox drainer: posts the Timeline Events waiting in SQLite to Stora, exactly once.

Units write an event record in the same transaction as the state change it reports
(gateway/units/manager.py); this module delivers them.  One :class:`Drainer` thread per agent
takes the oldest due ``pending`` event, posts it with :meth:`StoraClient.post_event`
(gateway/stora/ decides what one attempt proved) and persists the outcome before the
next attempt.  No retry policy is written twice: *how long* to wait and *which key* to
use come from the client's outcome; this module decides *what to hold up*.

Per event
---------
1. **Body.**  At the first attempt the POST body is built (``event_body`` with
   ``delivered_at`` = now, so a late event says when it happened) and frozen in the row
   (``body_json``) in a transaction of its own, *before* it is sent: every attempt under
   one ``Idempotency-Key`` sends the same bytes, across restarts too.
2. **Key.**  The key is ``IdempotencyKey(external_id, generation, unanswered_since)`` read
   from the row.  After every outcome the key it carries (same, marked unanswered, or
   rotated) is written together with ``attempts``, ``next_attempt_at`` and
   ``last_error``, in one transaction, before anything else is sent.  A crash between
   the answer and that write costs one replayed answer under the old key, never a
   duplicate (stora.py: generations are deterministic).
3. **In flight.**  Before each attempt the event's ``seq``, key generation and the wall
   time are written to ``meta`` (:data:`IN_FLIGHT_KEY`; in the same transaction as the
   frozen body at the first attempt), and cleared in the transaction that persists the
   outcome.  A marker found at start is the attempt a crash interrupted: it may have
   reached Stora, so its key is marked unanswered since that time (and the attempt
   counted) before anything is sent, exactly as for a connection dropped mid-request.
   Without it the restarted drainer would take a "409: a request with this key is in
   progress" (the dead process's request still running) for a refusal and dead-letter
   an event that is being created, and the 24-hour replay window would not apply.
4. **Send times.**  The rate limiter's ``on_record`` writes each send's wall time to
   ``send_history`` *before* the request goes out; at start the limiter is rebuilt from
   it, so a restart (or a crash loop) never exceeds ``max_per_second`` /
   ``max_per_minute``.  The drainer asks the limiter first and waits on its own event
   instead of sleeping inside the client, so a stop is never blocked by the limiter.

Outcomes
--------
=====================  ===================================================================
``Delivered``          ``delivered`` with Stora's event id; the queue moves on.
``Retry``              ``next_attempt_at`` = now + the outcome's delay (full-jitter
                       backoff growing with ``attempts``, capped in stora.py; 429s wait
                       for the reset).  If the cause is the *connection* (no answer, not
                       sent, a proxy's 5xx, 429, no token) the whole drain holds for that
                       delay ("backing off"): one probe per backoff step during an outage,
                       not one per queued event.  If the cause is *this event* (a stored
                       5xx escaped by rotating the key, a request still in progress) only
                       this event waits and the others flow.
``Dead``               ``dead`` with status, code, message, details, request id and key;
                       alarm ``timeline_dead_letter``; the queue moves on.  A person
                       retries it (``stora-gateway outbox retry``), which rotates the key.
``Dead`` 403 / 404     A missing scope or a wrong or moved ``base_url`` (a redirect is
``invalid_endpoint``   never followed: it would carry the token elsewhere): every event
/ 3xx                  would get it, so this is the configuration, not the event.  Not
                       dead-lettered:
                       alarm ``timeline_config`` once, the drain pauses ("paused:
                       config") and retries slowly (60 s doubling to 15 min).  The key is
                       rotated when every attempt under it was answered (nothing was
                       created under it, and a stored 403 would be replayed for a day),
                       else kept (stora.py's 401 reasoning).
``AuthFailed``         The credential is refused: posting stops ("paused: auth"), alarm
                       ``timeline_auth`` once, retried after ``retry_after_s`` (60 s
                       doubling to 15 min): no tight loop.  Events keep buffering.
=====================  ===================================================================

Token refreshes
---------------
A ``client_credentials`` refresh that fails for a passing reason (network, 5xx, an
answer over its size cap or its deadline) is a ``Retry`` ("backing off") while no valid
token is left, and invisible to delivery while one is.  Either way ``status`` shows it
(``token``: ``refreshing`` with how long, or ``failing`` with since when and why), and
once refreshes have been failing for :data:`TOKEN_ALARM_AFTER_S` the alarm
``timeline_token`` is raised, once per episode; a hold is cut short so the alarm is not
late.  A refresh in flight ends within ``stora.TOKEN_DEADLINE_S``.

What Stora says is quoted, never trusted: each string is capped where it is parsed
(stora.py), and every ``last_error``, alarm detail and status line built here is one line
of at most :data:`MAX_NOTE_CHARS`.

A :class:`~gateway.store.StoreError` while draining (disk full, read-only filesystem)
is logged, raises alarm ``timeline_outbox_storage`` once per episode and backs off (1 s
doubling to 60 s); the drainer never crashes the agent, and the lock control around it
never waits on it.

Known limits
------------
* The body is frozen at the first attempt, so an event whose first attempt went out
  just before an outage does not say "happened at …" when it is finally delivered:
  its key may already hold a stored reply, and changing the bytes under it is unsafe.
* Order: the oldest due event goes first, but one waiting on its own backoff (a stored
  5xx escaped by rotating its key) is overtaken by later ones.  Stora orders a
  timeline by arrival, and each description says when it happened when it is late.

Waiting
-------
The thread waits on an ``Event`` with a timeout until the next due time (the limiter's
free slot, a hold, or the earliest ``next_attempt_at``), at most :data:`IDLE_WAIT_S`; it
is woken at once when a transaction adds events (``Store.on_events_added``) and after a
``outbox.retry``.  Nothing polls in a tight loop.  Times in SQLite are wall-clock; a
clock stepped far ahead makes waits due early (harmless); one stepped back would make
them late by the step, so anything scheduled more than :data:`MAX_SCHEDULE_S` ahead
(nothing is, normally) is taken as due now.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Final

from gateway.outbox.timeline import event_body
from gateway.stora import (
    TOKEN_DEADLINE_S,
    AuthFailed,
    Dead,
    Delivered,
    IdempotencyKey,
    PostOutcome,
    Retry,
    StoraClient,
    credential_retry_delay,
)
from gateway.stora.http import MAX_TEXT_CHARS, cap_text
from gateway.store import SEND_HISTORY_KEEP_S, EventRow, Store, StoreError

__all__ = [
    "DRAIN_STATES",
    "IDLE_WAIT_S",
    "IN_FLIGHT_KEY",
    "MAX_NOTE_CHARS",
    "NEWEST_DEAD_KEY",
    "TOKEN_ALARM_AFTER_S",
    "Drainer",
    "build_drainer",
    "is_config_problem",
    "refusal_text",
]

LOGGER = logging.getLogger(__name__)

#: The longest the thread sleeps without a reason (a safety net: adds wake it anyway).
IDLE_WAIT_S: Final = 60.0
#: A scheduled attempt never lies further ahead than this (a wall clock stepped back
#: must not silence an event for days); above the longest wait stora.py asks for.
MAX_SCHEDULE_S: Final = 1_800.0
#: Storage failures while draining: wait 1 s doubling to 60 s before trying again.
STORE_RETRY_BASE_S: Final = 1.0
STORE_RETRY_CAP_S: Final = 60.0
#: How long :meth:`Drainer.stop` waits for the thread (an attempt in flight ends within
#: the client's deadline; the thread is a daemon either way).
STOP_JOIN_S: Final = 5.0
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
#: alarm.  Two of ``stora.TOKEN_DEADLINE_S``: a refresh in flight when the alarm falls due
#: ends by its deadline, so even a stuck endpoint alarms within 45 s (the issue: a minute).
TOKEN_ALARM_AFTER_S: Final = 2 * TOKEN_DEADLINE_S

Alarm = Callable[[str, str | None, str], None]
WallClock = Callable[[], float]


def is_config_problem(outcome: Dead) -> bool:
    """A refusal every event would get: a missing scope (403), a wrong ``base_url`` (404
    ``invalid_endpoint``) or a moved one (any 3xx: redirects are never followed)."""
    status = outcome.status
    return (status == 403 or (status == 404 and outcome.code == "invalid_endpoint")
            or (status is not None and 300 <= status < 400))


def _note(text: str) -> str:
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
    return _note(text)


def _no_alarm(kind: str, unit: str | None, detail: str) -> None:
    LOGGER.warning("alarm %s %s: %s", kind, unit or "-", detail)


class Drainer:
    """Delivers the outbox; see the module docstring for the policy.

    ``step`` is the whole algorithm and may be driven directly (tests compress time
    with a fake ``clock`` shared with the client and the sandbox, see
    :meth:`run_until_idle`); :meth:`start` runs it on a daemon thread.
    """

    def __init__(
        self,
        store: Store,
        client: StoraClient,
        *,
        source_id: str,
        template_id: str | None,
        alarm: Alarm | None = None,
        clock: WallClock = time.time,
        token_alarm_after_s: float = TOKEN_ALARM_AFTER_S,
    ) -> None:
        self.store = store
        self.client = client
        self.source_id = source_id
        self.template_id = template_id or None
        self._alarm = alarm or _no_alarm
        self._clock = clock
        self._lock = threading.Lock()
        self._state = "ok"
        self._hold_until = -math.inf
        self._config_pauses = 0
        self._store_failures = 0
        self._last_error: str | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._recovered = False
        self._token_alarm_after_s = token_alarm_after_s
        self._token_alarmed = False
        #: Counts since start: attempts sent, delivered, dead-lettered.
        self.counters = {"attempts": 0, "delivered": 0, "dead_lettered": 0}

    # -- thread ---------------------------------------------------------------------------
    def start(self) -> None:
        """Run the drain on a daemon thread until :meth:`stop`."""
        if self._thread is not None:
            raise RuntimeError("the drainer is already running")
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="outbox", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread: at once when idle, after the attempt in flight otherwise."""
        self._stop.set()
        self._wake.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=STOP_JOIN_S)
            if thread.is_alive():
                LOGGER.warning("the outbox drainer did not stop within %.0f s", STOP_JOIN_S)
                return  # an attempt is in flight; the daemon thread ends with the process
        self.client.close()  # the connection pool, when the client made it
        with self._lock:
            self._state = "stopped"

    def wake(self, *, resume: bool = False) -> None:
        """Look at the outbox now (new events); ``resume`` also ends a hold (a retry)."""
        if resume:
            with self._lock:
                self._hold_until = -math.inf
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            delay = self.guarded_step()
            if self._stop.is_set():
                break
            if delay > 0:
                self._wake.wait(min(delay, IDLE_WAIT_S))
                self._wake.clear()

    # -- the algorithm --------------------------------------------------------------------
    def guarded_step(self) -> float:
        """:meth:`step`, with any failure turned into an alarm and a backoff."""
        try:
            delay = self.step()
        except StoreError as exc:
            return self._failed(exc, "paused: storage", "timeline_outbox_storage")
        except Exception as exc:  # a bug must not end the drain, let alone the agent
            LOGGER.exception("outbox drain failed")
            return self._failed(exc, "paused: storage", "timeline_outbox_error")
        if self._store_failures:
            LOGGER.info("outbox storage works again; draining")
            self._store_failures = 0
            with self._lock:
                if self._state == "paused: storage":
                    self._state = "ok"
        return delay

    def _failed(self, exc: Exception, state: str, kind: str) -> float:
        self._store_failures += 1
        delay = min(STORE_RETRY_CAP_S, STORE_RETRY_BASE_S * 2.0 ** (self._store_failures - 1))
        LOGGER.error("outbox: %s; retrying in %.0f s", exc, delay)
        with self._lock:
            self._state = state
            self._last_error = _note(f"{type(exc).__name__}: {exc}")
        if self._store_failures == 1:
            self._alarm(kind, None, _note(f"Timeline Event delivery paused: {exc}"))
        return delay

    def step(self) -> float:
        """At most one attempt; the seconds until there may be more to do (``inf``: none).

        ``0.0`` means "call again now".  Raises :class:`StoreError` when the database
        fails (the outcome of an attempt already sent is then lost, which costs one
        replayed answer under the same key at the next attempt, never a duplicate).
        """
        if not self._recovered:
            self._recover_in_flight()
            self._recovered = True
        now = self._clock()
        with self._lock:
            if self._hold_until - now > MAX_SCHEDULE_S:  # the wall clock went back
                self._hold_until = now
            hold = self._hold_until - now
        if hold > 0:
            return hold
        wait = self.client.limiter.delay()
        if wait > 0:
            return wait
        row = self.store.due_event(now)
        if row is None:
            due = self.store.next_due_at()
            if due is not None and due - now > MAX_SCHEDULE_S:
                # Nothing here schedules that far ahead: the wall clock went back.
                with self.store.transaction() as tx:
                    moved = tx.pull_forward(now + MAX_SCHEDULE_S, now)
                LOGGER.warning("outbox: %d event(s) scheduled beyond %.0f s from now (wall "
                               "clock stepped back?) are due now", moved, MAX_SCHEDULE_S)
                return 0.0
            return math.inf if due is None else max(due - now, 0.0)
        body = row.body
        in_flight = json.dumps({"seq": row.seq, "generation": row.generation, "at": now})
        with self.store.transaction() as tx:
            if body is None:
                body = tx.freeze_body(row.seq, event_body(
                    row.record(), source_id=self.source_id, template_id=self.template_id,
                    delivered_at=now))
            tx.set_meta(IN_FLIGHT_KEY, in_flight)
        key = IdempotencyKey(row.external_id, row.generation, row.unanswered_since)
        outcome = self.client.post_event(body, key, attempt=row.attempts)
        self._settle(row, outcome)
        self._check_token()
        return 0.0

    def _recover_in_flight(self) -> None:
        """Mark the key of an attempt a crash interrupted as unanswered (module docstring)."""
        marker = self.store.meta(IN_FLIGHT_KEY)
        if not marker:
            return
        try:
            seq, generation, at = (json.loads(marker)[k] for k in ("seq", "generation", "at"))
            row = self.store.event(int(seq))
        except (ValueError, TypeError, KeyError):
            LOGGER.warning("outbox: unreadable in-flight marker %r ignored", marker)
            row = None
        with self.store.transaction() as tx:
            if (row is not None and row.state == "pending" and row.generation == generation
                    and row.unanswered_since is None):
                LOGGER.warning("outbox: event %d was being posted when the gateway stopped; "
                               "its key is kept as unanswered", row.seq)
                tx.record_attempt(row.seq, generation=row.generation, unanswered_since=float(at),
                                  next_attempt_at=row.next_attempt_at,
                                  attempts=row.attempts + 1,
                                  last_error="no answer: the gateway stopped mid-attempt")
            tx.set_meta(IN_FLIGHT_KEY, "")

    def _settle(self, row: EventRow, outcome: PostOutcome) -> None:
        """Persist ``outcome`` of an attempt at ``row`` (one transaction), then react."""
        now = self._clock()
        sent = not (isinstance(outcome, Retry) and not outcome.sent)
        attempts = row.attempts + (1 if sent else 0)
        if sent:
            self.counters["attempts"] += 1
        key = outcome.key
        if isinstance(outcome, Delivered):
            with self.store.transaction() as tx:
                tx.mark_delivered(row.seq, generation=key.generation, attempts=attempts,
                                  delivered_at=now, stora_event_id=outcome.event_id)
                tx.set_meta(IN_FLIGHT_KEY, "")
            self.counters["delivered"] += 1
            with self._lock:
                if self._state != "ok":
                    LOGGER.info("Stora accepts events again (was %s)", self._state)
                self._state, self._last_error = "ok", None
                self._config_pauses = 0
            return
        if isinstance(outcome, Dead) and not is_config_problem(outcome):
            error = outcome.as_record()
            with self.store.transaction() as tx:
                tx.mark_dead(row.seq, generation=key.generation,
                             unanswered_since=key.unanswered_since, attempts=attempts,
                             status=outcome.status, code=outcome.code, error=error,
                             dead_at=now)
                tx.set_meta(IN_FLIGHT_KEY, "")
                tx.set_meta(NEWEST_DEAD_KEY, str(row.seq))
            self.counters["dead_lettered"] += 1
            # Our words first, Stora's last: the note is capped, and what gets cut must
            # be the tail of Stora's text, not the hint where to look.  The details are
            # what names the field at fault ("the request body is invalid" alone does not).
            self._alarm("timeline_dead_letter", row.unit, _note(
                f"event {row.seq} ({row.kind}, {row.reference}) refused by Stora and kept "
                f"as a dead letter (stora-gateway outbox --dead): {refusal_text(error)}"))
            return
        if isinstance(outcome, Dead):  # the configuration: pause, keep the event
            if key.unanswered_since is None:
                key = key.rotated()  # nothing was created under it; a stored 403 replays
            delay = credential_retry_delay(self._config_pauses)
            self._config_pauses += 1
            why = _note(f"{outcome.status} {outcome.code}: {outcome.message}")
            self._record(row, key, now + delay, attempts, why)
            self._pause("paused: config", now + delay, "timeline_config", row.unit,
                        f"Stora refuses every event ({why}); check [stora] base_url and the "
                        f"scope; delivery paused, retrying in {delay:.0f} s")
            return
        if isinstance(outcome, AuthFailed):
            delay = outcome.retry_after_s
            self._record(row, key, now + delay, attempts, _note(f"auth: {outcome.reason}"))
            self._pause("paused: auth", now + delay, "timeline_auth", None,
                        f"Stora credential refused ({outcome.reason}); events keep "
                        f"buffering; retrying in {delay:.0f} s")
            return
        assert isinstance(outcome, Retry)
        delay = max(0.0, outcome.delay_s)
        why = _note(outcome.reason + (f" {outcome.status}" if outcome.status else "")
                    + (f": {outcome.detail}" if outcome.detail else ""))
        if sent or key != IdempotencyKey(row.external_id, row.generation, row.unanswered_since):
            self._record(row, key, now + delay, attempts, why)
        else:  # nothing reached Stora and nothing changed: only the marker goes
            self.store.set_meta(IN_FLIGHT_KEY, "")
        if outcome.reason in CONNECTION_REASONS:
            until = now + delay
            due = self._token_alarm_due() if outcome.reason == "token_unavailable" else None
            if due is not None:  # come back when the alarm is due, not later
                until = min(until, now + due)
            with self._lock:
                self._hold_until = max(self._hold_until, until)
                if self._state == "ok":
                    self._state = "backing off"
                self._last_error = why

    def _record(self, row: EventRow, key: IdempotencyKey, at: float, attempts: int,
                why: str) -> None:
        with self.store.transaction() as tx:
            tx.record_attempt(row.seq, generation=key.generation,
                              unanswered_since=key.unanswered_since,
                              next_attempt_at=at, attempts=attempts, last_error=why)
            tx.set_meta(IN_FLIGHT_KEY, "")

    def _token_alarm_due(self) -> float | None:
        """Seconds until failing refreshes call for the alarm (0: now); ``None``: they do not."""
        failing = self.client.tokens.health().failing_for_s
        if failing is None or self._token_alarmed:
            return None
        return max(0.0, self._token_alarm_after_s - failing)

    def _check_token(self) -> None:
        """Alarm ``timeline_token`` once refreshes have failed too long; note a recovery."""
        health = self.client.tokens.health()
        if health.failing_for_s is None:
            if self._token_alarmed:
                LOGGER.info("Stora token refreshes work again")
                self._token_alarmed = False
            return
        if (self._token_alarmed or health.failing_for_s < self._token_alarm_after_s
                or self.state == "paused: auth"):  # a refusal has its own alarm
            return
        self._token_alarmed = True
        self._alarm("timeline_token", None, _note(
            f"Stora token refresh failing for {health.failing_for_s:.0f} s "
            f"({health.last_error}); Timeline Events wait while no valid token is left; "
            "check [stora] token_url and the network"))

    def _pause(self, state: str, until: float, kind: str, unit: str | None,
               detail: str) -> None:
        detail = _note(detail)
        with self._lock:
            first = self._state != state
            self._state = state
            self._hold_until = max(self._hold_until, until)
            self._last_error = detail
        if first:
            self._alarm(kind, unit, detail)
        else:
            LOGGER.warning("%s", detail)

    # -- reporting and driving --------------------------------------------------------------
    @property
    def state(self) -> str:
        """One of :data:`DRAIN_STATES`."""
        with self._lock:
            return self._state

    def status(self) -> dict[str, Any]:
        """The drain's part of ``status`` and ``outbox``: state, hold, last error, counts,
        and the token source's health (a refresh in flight or failing, and why)."""
        now = self._clock()
        token = self.client.tokens.health().as_dict()  # never waits on a refresh
        with self._lock:
            hold = self._hold_until - now
            return {
                "drain": self._state,
                "resumes_in_s": round(hold, 1) if hold > 0 else None,
                "last_error": self._last_error,
                "token": token,
                **self.counters,
            }

    def run_until_idle(self, sleep: Callable[[float], None], *, max_steps: int = 100_000,
                       stop_when: Callable[[], bool] | None = None) -> int:
        """Step until nothing is pending (or ``stop_when()``), sleeping with ``sleep``.

        For tests and benchmarks that compress time: ``sleep`` advances the fake clock
        shared by this drainer, its client's limiter and the sandbox.  Returns the number
        of steps; raises ``RuntimeError`` after ``max_steps``.
        """
        for steps in range(1, max_steps + 1):
            if stop_when is not None and stop_when():
                return steps - 1
            delay = self.guarded_step()
            if math.isinf(delay):
                return steps
            if delay > 0:
                sleep(delay)
        raise RuntimeError(f"the outbox was not drained within {max_steps} steps")


def build_drainer(config: Any, store: Store, alarm: Alarm | None = None,
                  on_server_date: Callable[[float], None] | None = None) -> Drainer:
    """The drainer ``[stora]`` describes, its limiter loaded from the persisted history.

    ``config`` is the whole :class:`~gateway.config.Config`.  The config loader has
    already refused missing secret files and ones open to group or others (contract §3);
    a token file that disappears later is a refused credential ("paused: auth").
    ``on_server_date`` gets the ``Date`` of Stora's trusted answers (StoraClient).
    """
    history = store.send_history(time.time() - SEND_HISTORY_KEEP_S)
    client = StoraClient.from_config(config.stora, history=history,
                                     on_record=store.record_send,
                                     on_server_date=on_server_date)
    return Drainer(store, client, source_id=config.stora.timeline_source_id,
                   template_id=config.stora.timeline_template_id, alarm=alarm)
