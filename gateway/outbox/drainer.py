"""The outbox drainer: posts the Timeline Events waiting in SQLite to Stora, exactly once.

Units write an event record in the same transaction as the state change it reports;
one :class:`Drainer` thread per agent takes the oldest due ``pending`` event, posts it
with :meth:`StoraClient.post_event` (which decides what one attempt proved and which key
comes next) and persists the outcome before the next attempt; this module decides
*what to hold up*.  :func:`build_drainer` makes the drainer ``[stora]`` describes.
See docs/design/outbox.md.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any, Final

from gateway.config import Config
from gateway.outbox.policy import (
    CONNECTION_REASONS,
    IN_FLIGHT_KEY,
    NEWEST_DEAD_KEY,
    TOKEN_ALARM_AFTER_S,
    Alarm,
    is_config_problem,
    note,
    refusal_text,
)
from gateway.outbox.timeline import event_body
from gateway.stora.answers import AuthFailed, Dead, Delivered, PostOutcome, Retry
from gateway.stora.client import StoraClient
from gateway.stora.idempotency import IdempotencyKey
from gateway.stora.ratelimit import credential_retry_delay
from gateway.store import SEND_HISTORY_KEEP_S, EventRow, Store, StoreError

__all__ = ["IDLE_WAIT_S", "MAX_SCHEDULE_S", "Drainer", "build_drainer"]

LOGGER = logging.getLogger(__name__)

#: The longest the thread sleeps without a reason (a safety net: adds wake it anyway).
IDLE_WAIT_S: Final = 60.0
#: A scheduled attempt never lies further ahead than this (a wall clock stepped back
#: must not silence an event for days); above the longest wait the Stora client asks for.
MAX_SCHEDULE_S: Final = 1_800.0
#: Storage failures while draining: wait 1 s doubling to 60 s before trying again.
STORE_RETRY_BASE_S: Final = 1.0
STORE_RETRY_CAP_S: Final = 60.0
#: How long :meth:`Drainer.stop` waits for the thread (an attempt in flight ends within
#: the client's deadline; the thread is a daemon either way).
STOP_JOIN_S: Final = 5.0

WallClock = Callable[[], float]


def _no_alarm(kind: str, unit: str | None, detail: str) -> None:
    LOGGER.warning("alarm %s %s: %s", kind, unit or "-", detail)


class Drainer:
    """Delivers the outbox; see docs/design/outbox.md for the policy.

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
            self._last_error = note(f"{type(exc).__name__}: {exc}")
        if self._store_failures == 1:
            self._alarm(kind, None, note(f"Timeline Event delivery paused: {exc}"))
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
        """Mark the key of an attempt a crash interrupted as unanswered (docs/design/outbox.md)."""
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
            self._alarm("timeline_dead_letter", row.unit, note(
                f"event {row.seq} ({row.kind}, {row.reference}) refused by Stora and kept "
                f"as a dead letter (stora-gateway outbox --dead): {refusal_text(error)}"))
            return
        if isinstance(outcome, Dead):  # the configuration: pause, keep the event
            if key.unanswered_since is None:
                key = key.rotated()  # nothing was created under it; a stored 403 replays
            delay = credential_retry_delay(self._config_pauses)
            self._config_pauses += 1
            why = note(f"{outcome.status} {outcome.code}: {outcome.message}")
            self._record(row, key, now + delay, attempts, why)
            self._pause("paused: config", now + delay, "timeline_config", row.unit,
                        f"Stora refuses every event ({why}); check [stora] base_url and the "
                        f"scope; delivery paused, retrying in {delay:.0f} s")
            return
        if isinstance(outcome, AuthFailed):
            delay = outcome.retry_after_s
            self._record(row, key, now + delay, attempts, note(f"auth: {outcome.reason}"))
            self._pause("paused: auth", now + delay, "timeline_auth", None,
                        f"Stora credential refused ({outcome.reason}); events keep "
                        f"buffering; retrying in {delay:.0f} s")
            return
        assert isinstance(outcome, Retry)
        delay = max(0.0, outcome.delay_s)
        why = note(outcome.reason + (f" {outcome.status}" if outcome.status else "")
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
        self._alarm("timeline_token", None, note(
            f"Stora token refresh failing for {health.failing_for_s:.0f} s "
            f"({health.last_error}); Timeline Events wait while no valid token is left; "
            "check [stora] token_url and the network"))

    def _pause(self, state: str, until: float, kind: str, unit: str | None,
               detail: str) -> None:
        detail = note(detail)
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


def build_drainer(config: Config, store: Store, alarm: Alarm | None = None,
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
