"""``stora-gateway run``: the agent.

Threads, and why each exists:

* paho's network loop (inside ``MqttLink``): only moves bytes and enqueues messages, so
  keepalive never waits on serial I/O or SQLite;
* the link's worker: verifies each command (signature, audience, freshness, size — all
  before anything touches hardware) and hands verified ones to ``UnitManager``;
* the unit pool: one operation at a time per unit, in arrival order;
* the outbox drainer (gateway/outbox/drainer.py): posts Timeline Events to Stora, woken when a
  transaction adds events; its waits and failures never touch lock control;
* the relock timer (monotonic deadlines) and the control socket;
* the scheduler (gateway/schedule.py): APScheduler's thread and a pool of up to three,
  running every periodic job of one table (reconciliation, telemetry, persisting the
  last trusted time, outbox wake, token refresh, the watchdog heartbeat), safe against
  wall-clock jumps;
* this main thread, which waits for a signal and pings the systemd watchdog while the
  parts above are alive (``Agent.start`` lists what "alive" means).

Storage that fails (fault matrix #23-25) never stops lock control: a corrupt database is
moved aside with an alarm counting the undelivered events it held; a read-only or full
one at start gives an in-memory database with an alarm; a write failing while running
raises a rate-limited alarm counting the Timeline Events refused, and relocks and
lockouts are driven even when their record cannot be written (gateway/units/manager.py).

Rejections are published with their reason code through a token bucket, so a flood of
garbage cannot make the agent amplify it onto the broker.

Load shedding
-------------
A flood on ``P/S/cmd`` or ``P/S/mgmt`` is screened before the Ed25519 check costs
anything (gateway/intake/screen.py: a repeat of a payload refused for a lasting reason, and,
while rejection results are throttled, a token whose claims could never pass); the
defence against distinct well-formed forgeries is the broker's ACL.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import pwd
import signal
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING, Any, Final

from gateway import __version__
from gateway.config import Config, LockConfig
from gateway.errors import cap_text
from gateway.intake.commands import MAX_COMMAND_BYTES, Command, CommandVerifier, Rejection
from gateway.intake.screen import RecentIds, Screen, TokenBucket
from gateway.units.hardware import Site, build_site
from gateway.units.manager import Outcome, UnitManager
from sitelink.codes import Cmd, Reason, Status
from sitelink.payloads import alarm_payload, offline_status_payload, rfc3339
from sitelink.topics import Topics

if TYPE_CHECKING:
    from gateway.ops.control_stream import Call

LOGGER = logging.getLogger(__name__)

#: The periodic jobs and their intervals are one table: gateway/schedule.py ``JOBS``.
#: How long a vital part may make no progress before the watchdog stops pinging, when
#: systemd sets no ``WatchdogSec`` (with one, that period is used).
VITAL_STALE_S = 30.0
#: Reconciliation is vital too, but may take a while on a bus whose boards are offline
#: (every read times out): stale after this many of its intervals, or two watchdog
#: periods, whichever is longer.
RECONCILE_STALE_PASSES = 6
#: The main thread's wait when systemd asks for no watchdog pings (it wakes on a signal).
MAIN_WAIT_S = 60.0
#: Rejection results: sustained rate and burst (a flood must not be amplified).
REJECT_RATE_PER_S = 20.0
REJECT_BURST = 50
#: How long a control-socket request waits for its unit's queue.
CONTROL_WAIT_S = 120.0
#: The interpreter's thread switch interval while the agent runs (default 5 ms).
SWITCH_INTERVAL_S = 0.001
#: Longest alarm ``detail`` published (characters): room for a storage error with its
#: paths or Stora's capped reason (gateway/outbox/drainer.py keeps its notes to the same 1200),
#: far below any broker's packet limit.
ALARM_DETAIL_MAX: Final = 1200
#: Rows deleted per transaction by the prune job: the first run after an upgrade may
#: find months of history, and a command waits for the store's lock meanwhile.
PRUNE_BATCH: Final = 2000
#: Command ids remembered in memory to answer a late duplicate without a query.
RECENT_JTIS_MAX = 10_000
#: Results kept while the broker is unreachable (the oldest go first beyond this).
UNSENT_RESULTS_MAX = 1000
#: A storage alarm of one kind (disk full, read-only) at most this often.
STORAGE_ALARM_INTERVAL_S = 60.0
#: ``run`` exits with this after a clean stop for a restart (a ``config.set`` that needs a
#: new process); the systemd unit restarts it (``RestartForceExitStatus=``).  75 is
#: EX_TEMPFAIL: "try again".
RESTART_EXIT_STATUS: Final = 75
#: ``outbox.list`` returns at most this many rows of each state by default.
OUTBOX_LIST_MAX = 100
#: Longest wait per address of a ``scan`` run on the agent's bus: each probe holds the
#: bus, so a door command waits at most this long behind one (a board that needs more
#: than a second to answer one read is not one to drive doors with).
SCAN_TIMEOUT_MAX_MS: Final = 1000

#: A hook run once at the end of :meth:`Agent.start`, given the started agent.  The dev
#: kit's test faults (devkit/faults.py) break a vital part through it on purpose; the
#: product passes none and reads no test-only setting of its own.
StartHook = Callable[["Agent"], None]


class Agent:
    """The running gateway: wires config, hardware, store, broker and control socket.

    ``faults`` (a :data:`StartHook`) and ``restart_min_uptime_s`` (instead of
    ``gateway.intake.mgmt.RESTART_MIN_UPTIME_S``) are for tests, given by the dev kit.
    """

    def __init__(self, config: Config, *, site: Site | None = None,
                 clock_synced: Any = None,
                 reject_rate: tuple[float, int] = (REJECT_RATE_PER_S, REJECT_BURST),
                 job_intervals: Mapping[str, float] | None = None,
                 faults: StartHook | None = None,
                 restart_min_uptime_s: float | None = None) -> None:
        from gateway.clock import TrustedClock, kernel_synchronized

        self.config = config
        self._faults = faults
        self.topics = Topics(config.mqtt.topic_prefix, config.site.id)
        self.prefix = self.topics.base
        self.started_at = time.time()
        self.stop_event = threading.Event()
        # The cancels of long technician requests running now: stop() runs them
        # (see _cancelled_on_stop).
        self._on_stopping: list[Callable[[], object]] = []
        self._on_stopping_mutex = threading.Lock()
        self._pending_alarms: list[tuple[str, str | None, str]] = []
        self.store = self._open_store(config.storage.path)
        self.store.on_events_added = self._events_added
        self.store.on_write_failed = self._write_failed
        self._storage_alarmed_at: dict[str, float] = {}
        self.outbox: Any = None
        self.clock = TrustedClock(
            "system" if config.commands.clock == "system" else "ntp",
            synced=clock_synced or kernel_synchronized,
        )

        def clock_alarm(kind: str, detail: str) -> None:
            # The clock stepped or its floor moved: an `expired` verdict may no longer
            # be final, so the screens forget theirs (gateway/intake/screen.py).
            for screen in (getattr(self, "screen", None),
                           getattr(getattr(self, "mgmt", None), "screen", None)):
                if screen is not None:
                    screen.forget()
            # Before the first connection (a step or a reset at start) nothing can be
            # published: kept for on_connected like the storage alarms.
            link = getattr(self, "link", None)
            if link is not None and link.connected:
                self.alarm(kind, None, detail)
            else:
                self._pending_alarms.append((kind, None, detail))

        # The saved floor, bounded by the proven run time (gateway/clock.py): a floor that
        # is invalid, or was reset while the agent was stopped, is an alarm at connect.
        self._pending_alarms.extend(
            (kind, None, detail) for kind, detail in self.clock.load_floor(self.store))
        self.clock.on_alarm = clock_alarm
        self._server_time_asked_at = -math.inf  # monotonic; see _confirm_clock
        self.site = site or build_site(config)
        self.verifier = CommandVerifier(config, self.clock)
        self.units = UnitManager(
            config, self.site, self.store, now=self.clock.now,
            publish_unit=self._publish_unit, alarm=self.alarm,
        )
        self.rejections = TokenBucket(*reject_rate)
        self._counters_lock = threading.Lock()
        self.counters = {"received": 0, "rejected": 0, "executed": 0, "duplicates": 0,
                         "refused_again": 0, "shed": 0}
        from gateway.link import LinkTimings, MqttLink

        # The liveness check scales with the keepalive the site chose: half of it to
        # send the echo, half to wait for it, so a wedged link is noticed within about
        # one keepalive (paho's own keepalive needs up to 1.5).
        half = max(1.0, config.mqtt.keepalive_s / 2)
        self.link = MqttLink(
            config.mqtt,
            status_topic=self.topics.status,
            birth=self._birth,
            will=json.dumps(offline_status_payload()).encode(),
            subscriptions=[(self.topics.cmd, 1), (self.topics.mgmt, 1)],
            on_message=self.on_message,
            on_connected=self.on_connected,
            timings=LinkTimings(liveness_interval_s=half, liveness_timeout_s=half,
                                backoff_max_s=30.0),
        )
        self.control: Any = None
        self.rejected_by_reason: dict[str, int] = {}
        self._recent_jtis = RecentIds(RECENT_JTIS_MAX)
        self.screen = Screen(self.verifier, self.rejections, max_bytes=MAX_COMMAND_BYTES,
                             counters=self.counters, recent=self._recent_jtis)
        self._restart_results: deque[Outcome] = deque(maxlen=UNSENT_RESULTS_MAX)
        #: Queued before a restart, held while the clock was untrusted (_run_queued).
        self._held: set[str] = set()
        from gateway.intake.mgmt import Management

        self._mgmt_topic = self.topics.mgmt
        self.mgmt = Management(self, restart_min_uptime_s=restart_min_uptime_s)
        # Held by every message while it is handled and by apply_config while it swaps
        # parts: a message waits in the link's inbox (unacknowledged) during a swap.
        self._intake = threading.Lock()
        #: Set (with the reason) when the agent must stop and be started again, e.g. a
        #: config.set that changed [mqtt]; run_agent exits with RESTART_EXIT_STATUS.
        self.restart_reason: str | None = None
        #: Interval overrides for the periodic jobs (gateway/schedule.py JOBS), by id:
        #: tests shrink them.
        self._job_intervals = dict(job_intervals or {})
        self.scheduler: Any = None
        self.watchdog: Any = None
        self.vitals: list[tuple[str, Any]] = []

    # -- publishing -----------------------------------------------------------------------
    def _publish(self, topic: str, payload: Mapping[str, Any], *, retain: bool = False) -> None:
        data = json.dumps(payload, separators=(",", ":")).encode()
        self.link.publish(topic, data, qos=1, retain=retain)

    def _publish_unit(self, unit: str, state: dict[str, Any]) -> None:
        self._publish(self.topics.unit(unit), state, retain=True)

    def alarm(self, kind: str, unit: str | None, detail: str) -> None:
        """Publish an alarm (door forced, door held open, controller offline, jam, …).

        ``detail`` is made one line and cut to :data:`ALARM_DETAIL_MAX` characters: it
        may quote text from outside (Stora's error message, a device's report), and an
        alarm too large for the broker's packet limit would get the agent disconnected
        on every reconnect while the QoS 1 alarm is re-sent (found in review).
        """
        detail = cap_text(detail, ALARM_DETAIL_MAX)
        LOGGER.warning("alarm %s %s: %s", kind, unit or "-", detail)
        self._publish(self.topics.alarm, alarm_payload(kind, unit, detail, at=time.time()))

    # -- storage and outbox hooks ---------------------------------------------------------
    def _open_store(self, path: Any) -> Any:
        """The state database; never a crash loop over a broken disk (fault matrix #23-25).

        A corrupt file is moved aside (the alarm says how many undelivered events it
        held) and a fresh one started.  A file or directory that cannot be written
        (read-only filesystem, full disk, a corrupt file that cannot be moved) gives an
        in-memory database instead, with an alarm: locks keep working, and nothing is
        kept across a restart until the storage is fixed.  Anything else (a schema
        newer than this version) stops the start with a clear error.
        """
        from gateway.store import Store, StoreCorrupt, StoreError, StoreFull, StoreReadOnly

        def ephemeral(why: str) -> Store:
            detail = (f"{why}; running on a temporary in-memory database: commands and "
                      "Timeline Events are NOT kept across a restart until the storage "
                      "is fixed")
            LOGGER.error("%s", detail)
            self._pending_alarms.append(("storage_unavailable", None, detail))
            return Store(path, ephemeral=True)

        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            return ephemeral(f"cannot create {path.parent}: {exc.strerror or exc}")
        try:
            return Store(path)
        except StoreCorrupt as exc:
            # What was lost, counted before the move (best effort, read-only): the
            # alarm must tell staff how many actions Stora will never hear about.
            lost = Store.count_pending(path)
            lost_text = "an unknown number of" if lost is None else str(lost)
            try:
                moved = Store.quarantine(path)
                store = Store(path)
            except StoreError as again:
                return ephemeral(f"{exc}; {lost_text} undelivered Timeline Event(s) in it; "
                                 f"it cannot be replaced: {again}")
            detail = (f"{exc}; moved to {moved}; {lost_text} undelivered Timeline Event(s) "
                      "lost with it; starting with an empty database")
            LOGGER.error("%s", detail)  # noqa: TRY400 - no traceback wanted
            self._pending_alarms.append(("storage_corrupt", None, detail))
            return store
        except (StoreReadOnly, StoreFull) as exc:
            return ephemeral(str(exc))

    def _events_added(self, count: int) -> None:
        """A transaction committed ``count`` new Timeline Events: wake the drainer."""
        del count
        if self.outbox is not None:
            self.outbox.wake()

    def _write_failed(self, exc: Exception, refused: int) -> None:
        """A transaction failed (disk full, read-only, …): a clear alarm, rate limited.

        Lock control goes on (units drive the hardware outside transactions, and a
        relock or lockout is driven even when its record cannot be written); what is
        refused is the record, and Timeline Events refused are counted and reported.
        """
        try:
            kind = {"StoreFull": "storage_full", "StoreReadOnly": "storage_read_only",
                    "StoreBusy": "storage_busy"}.get(type(exc).__name__, "storage")
            now = time.monotonic()
            if now - self._storage_alarmed_at.get(kind, -math.inf) < STORAGE_ALARM_INTERVAL_S:
                return
            self._storage_alarmed_at[kind] = now
            # The counts first: the alarm's detail is capped, the store's message is long.
            self.alarm(kind, None,
                       f"{self.store.events_refused} Timeline Event(s) refused so far "
                       f"({refused} just now); lock control continues; {exc}")
        except Exception:  # the hook must never turn a storage failure into a crash
            LOGGER.exception("raising the storage alarm failed")

    def _result(self, outcome: Outcome) -> None:
        data = json.dumps(outcome.payload(), separators=(",", ":")).encode()
        if not self.link.publish(self.topics.cmd_result, data, qos=1):
            # Not connected: kept (bounded) and sent on the next connect, so a result
            # is not lost to a broker outage; the sender can also re-send the command
            # and get it as a duplicate.
            self._restart_results.append(outcome)

    def status(self) -> dict[str, Any]:
        """Everything ``status`` shows; also the retained ``P/S/status`` payload.

        ``online`` and ``version`` come first (contract §4), then the site's ``verdict``
        and its ``reasons`` (gateway/ops/health.py).  A part that cannot be read (the
        database failing) says so under ``error`` instead of failing the report.  Every
        instant is RFC 3339 UTC; numbers are counts, sizes or durations named ``*_s``
        (a monotonic instant means nothing outside this process).
        """
        from gateway.ops.health import assess
        from gateway.ops.telemetry import broker_status, host_status, schedule_status
        from gateway.store import StoreError

        trusted, why = self.clock.trusted()
        controllers = []
        now = time.monotonic()
        wall = time.time()
        for name, controller in self.site.controllers.items():
            health = controller.health()
            # Drivers stamp last_ok_at on the monotonic clock (drivers/link.py): an age,
            # not a date, is what it can honestly say.
            ok_at = health.last_ok_at
            controllers.append({
                "name": name, "online": health.online, "detail": health.detail,
                "last_error": health.last_error,
                "last_ok_age_s": None if ok_at is None else round(max(0.0, now - ok_at), 1),
                "consecutive_failures": health.consecutive_failures,
            })
        try:
            outbox = self._outbox_status()
        except StoreError as exc:
            outbox = {"error": str(exc), "events_refused": self.store.events_refused}
        status: dict[str, Any] = {
            "online": True,
            "version": __version__,
            "site": self.config.site.id,
            "started_at": rfc3339(self.started_at),
            "uptime_s": round(wall - self.started_at),
            "clock": {"trusted": trusted, "why": why, **self.clock.status()},
            "broker": broker_status({"connected": self.link.connected, **self.link.stats()},
                                    mono_now=now, wall_now=wall),
            "controllers": controllers,
            "outbox": outbox,
            "storage": {"path": str(self.config.storage.path),
                        "ephemeral": self.store.ephemeral, "read_only": self.store.read_only},
            # The key ids only (never a key): health flags the self-test's if it is listed.
            "commands": {**self.counters, "rejected_by_reason": dict(self.rejected_by_reason),
                         "trusted_keys": sorted(self.config.commands.trusted_keys)},
            "management": dict(self.mgmt.counters),
            "schedule": schedule_status(
                self.scheduler.stats() if self.scheduler is not None else None, wall_now=wall),
            "host": host_status(self.config.storage.path),
        }
        # Judged on the finished report, so the verdict can never contradict it.
        return {"online": True, "version": __version__, **assess(status).as_dict(), **status}

    def _outbox_status(self) -> dict[str, Any]:
        """Depth, oldest pending age, dead letters, drain state, events refused, and when
        Stora last accepted an event (``last_post_at``, from the database: survives a
        restart), and the newest dead letter with Stora's reason."""
        from gateway.ops.telemetry import last_delivered_at, newest_dead_letter

        now = time.time()
        summary = self.store.outbox_summary(now)
        drain = self.outbox.status() if self.outbox is not None else {"drain": "not started"}
        last = last_delivered_at(self.store)
        return {**summary,
                # Only looked up while some are held: the usual report costs no query.
                "newest_dead": newest_dead_letter(self.store) if summary["dead"] else None,
                **drain, "events_refused": self.store.events_refused,
                "last_post_at": None if last is None else rfc3339(last),
                "last_post_age_s": None if last is None else round(max(0.0, now - last), 1)}

    def _birth(self) -> bytes:
        try:
            payload = self.status()
        except Exception:  # the birth must go out even if a probe fails
            LOGGER.exception("status failed; publishing a minimal birth")
            payload = {"online": True, "version": __version__}
        return json.dumps(payload, separators=(",", ":"), default=str).encode()

    def publish_telemetry(self) -> None:
        """The periodic health report (every ``[telemetry] interval_s``): the status
        retained (QoS 1) on ``P/S/status``, and the Prometheus textfile when configured.

        The textfile is rendered from the very payload published, and written even while
        the broker is unreachable (a scraping site sees the outage); failing to write it
        is logged, never raised, so it can neither stop the MQTT report nor become an
        alarm every interval.
        """
        payload = self._birth()
        self.link.publish(self.topics.status, payload, qos=1, retain=True)
        textfile = self.config.telemetry.prometheus_textfile
        if textfile is None:
            return
        from gateway.ops.telemetry import render_prometheus, write_textfile

        try:
            write_textfile(textfile, render_prometheus(json.loads(payload)))
        except (OSError, ValueError) as exc:
            LOGGER.warning("cannot write the Prometheus textfile %s: %s", textfile, exc)

    def on_connected(self, session_present: bool) -> None:
        """After every (re)connect: retained unit state again, then pending alarms."""
        LOGGER.info("broker connected (session present: %s)", session_present)
        self.units.republish()
        while self._restart_results:
            outcome = self._restart_results.popleft()
            self._result(outcome)
            if not self.link.connected:
                break
        # Popped one by one: another thread (a clock alarm) may append meanwhile.
        while self._pending_alarms:
            self.alarm(*self._pending_alarms.pop(0))

    # -- commands -------------------------------------------------------------------------
    def on_message(self, message: Any) -> None:
        """A message on ``P/S/cmd`` or ``P/S/mgmt`` (the link's worker thread)."""
        with self._intake:
            if message.topic == self._mgmt_topic:
                self.mgmt.on_message(message)
            else:
                self._on_command(message)

    def _on_command(self, message: Any) -> None:
        """A message on ``P/S/cmd``: screen and verify, then queue on the unit (or
        reject).  See "Load shedding" above for what the screen sheds."""
        self.counters["received"] += 1
        verdict = self.screen.check(message.payload, retained=bool(message.retain))
        if verdict is None:
            return
        if isinstance(verdict, Rejection):
            self._rejected(verdict)
            return
        command = verdict
        # Durable before this returns, so before the link acknowledges the delivery: a
        # crash up to here means the broker delivers again; after it, the row remains.
        from gateway.store import StoreError

        try:
            with self.store.transaction() as tx:
                fresh = tx.queue_command(command.jti, command.cmd, command.unit, time.time(),
                                         message.payload)
                first = None if fresh else tx.command(command.jti)
            self._recent_jtis.add(command.jti)
        except StoreError as exc:
            # Without a durable inbox, at-most-once cannot be promised: refuse, loudly.
            # The store's hook has raised the (rate-limited) storage alarm already; one
            # alarm per refused command would flood the broker while the disk is bad.
            LOGGER.error("command %s refused: %s", command.jti, exc)  # noqa: TRY400
            if command.cmd in (Cmd.LOCK, Cmd.LOCKOUT) and command.unit is not None:
                # Locking is safe to repeat and must never wait for the disk: the door
                # is locked anyway; the command is still answered "failed" (not kept).
                self.units.lock_unrecorded(command.unit, f"{command.cmd} {command.jti}")
            self._result(Outcome(command.jti, command.cmd, command.unit, Status.FAILED,
                                 Reason.HARDWARE_ERROR, None, time.time()))
            return
        if (first is not None and first.status == "queued" and command.jti in self._held
                and (first.cmd, first.unit) == (command.cmd, command.unit)):
            # Received before a restart and held there for an untrusted clock: this copy
            # verified now, so it runs (found in review: it was answered as a duplicate
            # and never ran).  Only the same action on the same unit: a reused jti never
            # moves another lock.  The store's queued -> executing step still lets only
            # one copy execute.
            self._held.discard(command.jti)
            self._submit(command)
            return
        if first is not None:
            # Seen before: answered from the first outcome, behind the first command's
            # unit, whatever unit this copy names (a reused jti never moves a lock).
            future = self.units.answer_duplicate(command, first.unit)
            future.add_done_callback(functools.partial(self._done, command))
            return
        self._submit(command)

    def _rejected(self, rejection: Rejection) -> None:
        self.counters["rejected"] += 1
        # Debug only: a flood would otherwise write thousands of lines a second; the
        # counts per reason are in `status`.
        LOGGER.debug("command rejected: %s (%s)", rejection.reason, rejection.detail)
        self.rejected_by_reason[rejection.reason] = (
            self.rejected_by_reason.get(rejection.reason, 0) + 1)
        if not self.rejections.take():
            return  # a flood is not amplified onto the broker, duplicates included
        # Only a jti this agent answered recently can be a late duplicate; anything
        # else (a flood of replayed tokens) costs no database lookup.
        stored = (self.store.command(rejection.jti)
                  if rejection.claims_verified and rejection.jti is not None
                  and rejection.jti in self._recent_jtis else None)
        if stored is not None and stored.result:
            # A genuine command we already answered, redelivered after it expired:
            # the original result, as a duplicate (contract §4).
            self._result(Outcome.from_result(stored.result, duplicate=True))
            return
        self._result(rejection_outcome(rejection))

    def _submit(self, command: Command) -> None:
        # A duplicate is queued behind its original on the unit's queue, so it answers
        # with the original's final result.
        try:
            future = self.units.submit(command)
        except RuntimeError:
            if not self.stop_event.is_set():
                raise
            # Stopping: the unit workers are gone.  The command is already `queued` in
            # SQLite, so the next start verifies it again and runs it if still fresh.
            LOGGER.info("stopping: command %s stays queued for the next start", command.jti)
            return
        future.add_done_callback(functools.partial(self._done, command))

    def _done(self, command: Command, future: Any) -> None:
        if future.cancelled():
            return  # shutting down: still `queued` in SQLite, run at the next start
        try:
            outcome = future.result()
        except Exception:
            # A bug or a storage failure, possibly after the door moved: the honest
            # answer is `unknown`, and the row says so too, so it is never run again.
            LOGGER.exception("command %s failed inside the agent", command.jti)
            outcome = Outcome(command.jti, command.cmd, command.unit, Status.UNKNOWN, None, None,
                              time.time())
            try:
                with self.store.transaction() as tx:
                    row = tx.command(command.jti)
                    if row is not None and row.status in ("queued", "executing"):
                        tx.finish_command(command.jti, Status.UNKNOWN, None, outcome.record())
            except Exception:  # the store itself may be what failed
                LOGGER.exception("could not record %s as unknown", command.jti)
        with self._counters_lock:  # this runs on the unit threads, several at once
            self.counters["duplicates" if outcome.duplicate else "executed"] += 1
        self._result(outcome)

    # -- control socket -------------------------------------------------------------------
    def handle(self, method: str, params: Mapping[str, Any], peer: Any) -> dict[str, Any]:
        """Requests from the local CLI (gateway/ops/control.py)."""
        from gateway.ops.control import ControlError

        # The kernel says who is calling (SO_PEERCRED); the CLI's own "actor" is only a
        # claim, so it is taken as is only from root (e.g. a sudo wrapper naming the human).
        actor = str(peer.actor)
        if getattr(peer, "uid", None) == 0 and params.get("actor"):
            actor = str(params["actor"])
        if method == "status":
            return self.status()
        if method == "locks":
            return {"locks": self._locks_rows()}
        if method in ("unlock", "lock"):
            lock = self._find(str(params.get("unit", "")))
            seconds = params.get("seconds")
            if method == "unlock" and seconds is not None and not (
                    isinstance(seconds, (int, float)) and 0 < seconds <= 3600):
                raise ControlError("seconds must be between 1 and 3600", 2)
            if params.get("force") and not str(params.get("reason") or "").strip():
                raise ControlError("--force needs --reason TEXT (it is audited)", 2)
            now = int(self.clock.now())
            cmd = Command(
                jti=f"local-{uuid.uuid4().hex}", cmd=method, unit=lock.unit, kid="local",
                # Valid while the technician waits for the unit's queue, not after.
                iat=now, exp=now + int(CONTROL_WAIT_S),
                # Whole seconds on the wire (contract §5); never round an unlock down to 0.
                dur=max(1, math.ceil(float(params["seconds"])))
                if method == "unlock" and params.get("seconds") else None,
                override=bool(params.get("force")), reason=params.get("reason") or None,
                actor=actor,
            )
            started = time.monotonic()
            future = self.units.submit(cmd)
            try:
                outcome = future.result(timeout=CONTROL_WAIT_S)
            except FutureTimeout:
                if future.cancel():  # never ran: a retry cannot make it run twice
                    raise ControlError("the unit is busy; nothing was done; try again",
                                       1) from None
                raise ControlError("the unit is busy and the action is still running; "
                                   "check with `locks`", 1) from None
            if outcome.reason == Reason.OVERLOCKED:
                raise ControlError(
                    f"{lock.reference} is in lockout (overlocked): use --force --reason TEXT", 1)
            entry = self._outcome_row(lock, method, outcome, time.monotonic() - started)
            self._result(outcome)
            return {"outcomes": [entry]} if method == "unlock" else {"outcome": entry}
        if method == "test":
            return self._test(params, actor)
        if method == "scan":
            return self._scan(params)
        if method == "outbox.list":
            return self._outbox_list(params)
        if method == "outbox.retry":
            return self._outbox_retry(params, actor)
        if method == "clock.reset_floor":
            return self.reset_clock_floor(actor)
        raise ControlError(f"unknown request {method!r}", 2)

    def _outbox_list(self, params: Mapping[str, Any]) -> dict[str, Any]:
        from gateway.ops.control import ControlError

        limit = params.get("limit", OUTBOX_LIST_MAX)
        if not isinstance(limit, int) or isinstance(limit, bool) or not 0 < limit <= 10_000:
            raise ControlError("limit must be an integer from 1 to 10000", 2)
        dead_only = bool(params.get("dead"))
        rows = self.store.events(state="dead", limit=limit)
        if not dead_only:
            rows = self.store.events(state="pending", limit=limit) + rows
        return {"summary": self._outbox_status(), "events": [r.as_dict() for r in rows]}

    def _outbox_retry(self, params: Mapping[str, Any], actor: str) -> dict[str, Any]:
        from gateway.ops.control import ControlError

        seq = params.get("seq")
        if params.get("all_dead"):
            if seq is not None:
                raise ControlError("give an event id or --all-dead, not both", 2)
            retried = self.store.retry_dead(None)
        elif isinstance(seq, int) and not isinstance(seq, bool):
            retried = self.store.retry_dead(seq)
            if not retried:
                raise ControlError(f"no dead-lettered event {seq} (see `outbox --dead`)", 1)
        else:
            raise ControlError("outbox.retry needs an event id (seq) or all_dead", 2)
        LOGGER.info("outbox: %s retried dead-lettered event(s) %s", actor, retried)
        if self.outbox is not None and retried:
            self.outbox.wake(resume=True)
        return {"retried": retried}

    def _find(self, text: str) -> LockConfig:
        from gateway.ops.control import ControlError

        lock = self.config.lock_by_id(text)
        if lock is None:
            from gateway.ops.technician import unknown_unit_message

            raise ControlError(unknown_unit_message(self.config, text), 2)
        return lock

    @staticmethod
    def _outcome_row(lock: LockConfig, action: str, outcome: Outcome,
                     elapsed: float) -> dict[str, Any]:
        state = outcome.state or {}
        locked = state.get("locked")
        status = Status.DONE if outcome.status == Status.DONE else (outcome.reason
                                                                   or outcome.status)
        return {
            "unit": lock.unit, "reference": lock.reference, "action": action,
            "status": status, "detail": outcome.reason or "confirmed by read-back",
            "elapsed_ms": round(elapsed * 1000, 1),
            "state": "unknown" if locked is None else ("locked" if locked else "unlocked"),
            "door": state.get("door", "unknown"),
        }

    def _locks_rows(self) -> list[dict[str, Any]]:
        from gateway.ops.technician import read_locks

        rows = read_locks(self.site, self.config.locks)
        return [{"unit": r.unit, "reference": r.reference, "controller": r.controller,
                 "locked": r.locked, "door": r.door,
                 "lockout": self.store.unit(r.unit).lockout, "error": r.error} for r in rows]

    def _test(self, params: Mapping[str, Any], actor: str) -> dict[str, Any]:
        """The technician's test of some or all locks, one at a time on each unit's queue.

        Through the control socket the CLI sees each row as it finishes (a progress
        line) and stops the run by hanging up (Ctrl-C): the lock under test is relocked
        at once, the ones not yet started are cancelled and listed as such, and no door
        is opened after that (gateway/ops/control_stream.py).  The agent stopping does the
        same, also to a ``locks.test`` management request, which no client can cancel.
        """
        from concurrent.futures import CancelledError

        from gateway.ops.control import ControlError
        from gateway.ops.control_stream import current_call
        from gateway.ops.technician import TEST_RELOCK_TIMEOUT, TEST_SECONDS, check_test_timing

        try:  # found in review: NaN, infinity or 1e9 held the unit's queue for decades
            seconds = check_test_timing("seconds", params.get("seconds"), TEST_SECONDS) or 1.0
            relock_timeout = check_test_timing("relock_timeout", params.get("relock_timeout"),
                                         TEST_RELOCK_TIMEOUT) or 10.0
        except ValueError as exc:
            raise ControlError(str(exc), 2) from None
        if params.get("all"):
            locks = list(self.config.locks)
        else:
            locks = [self._find(str(u)) for u in params.get("units", [])]
        call = current_call()
        results: list[dict[str, Any]] = []
        cancelled: list[dict[str, Any]] = []
        with self._cancelled_on_stop(call), call.watch() as stop:
            for lock in locks:
                row: dict[str, Any] | None = None
                if not stop.is_set():
                    # On the unit's queue: a lockout queued ahead of the test is seen, and
                    # no command runs in the middle of the cycle.
                    future = self.units.run_exclusive(
                        lock.unit, functools.partial(self._test_one, lock, seconds,
                                                     relock_timeout, actor, stop))
                    call.on_cancel(future.cancel)  # one still queued never starts
                    try:
                        row = future.result(timeout=CONTROL_WAIT_S + seconds + relock_timeout)
                    except CancelledError:
                        row = None
                    except FutureTimeout:
                        future.cancel()
                        row = {"unit": lock.unit, "reference": lock.reference,
                               "passed": False, "unlock_ms": None, "held_ms": None,
                               "relock_ms": None, "detail": "the unit stayed busy; not tested"}
                if row is None:
                    cancelled.append({"unit": lock.unit, "reference": lock.reference})
                else:
                    results.append(row)
                call.progress({"done": len(results) + len(cancelled), "total": len(locks),
                               **({"result": row} if row is not None else
                                  {"cancelled": cancelled[-1]})})
        interrupted = stop.is_set()
        if interrupted:
            LOGGER.warning("test by %s interrupted%s: %d lock(s) tested, %d cancelled before "
                           "they started (%s)", actor,
                           " (the agent is stopping)" if self.stop_event.is_set() else "",
                           len(results), len(cancelled),
                           ", ".join(c["reference"] for c in cancelled) or "none")
        return {"passed": not interrupted and all(r["passed"] for r in results),
                "interrupted": interrupted, "results": results, "cancelled": cancelled}

    def _test_one(self, lock: LockConfig, seconds: float, relock_timeout: float,
                  actor: str, stop: threading.Event | None = None) -> dict[str, Any] | None:
        """One technician test cycle, refused in lockout, audited like any unlock.

        ``None`` when the technician stopped the run before this lock's turn came: no
        door is opened after a Ctrl-C.
        """
        from gateway.ops.technician import run_test_cycle
        from gateway.outbox.timeline import external_id_for, make_event

        if stop is not None and stop.is_set():
            return None
        if self.store.unit(lock.unit).lockout:
            return {"unit": lock.unit, "reference": lock.reference, "passed": False,
                    "unlock_ms": None, "held_ms": None, "relock_ms": None,
                    "detail": "in lockout: not tested (clear the lockout first)"}
        # Driven outside the unit manager: a read-back taken during the cycle must not be
        # applied after it (a false "drift" and an extra lock, found in review).
        self.units.mark_acted(lock.unit)
        try:
            r = run_test_cycle(self.site, lock, seconds, relock_timeout_s=relock_timeout,
                               cancel=stop)
        finally:
            self.units.mark_acted(lock.unit)
        if r is None:  # stopped after the check above: nothing was driven
            return None
        if r.unlock_ms is not None:  # the door was driven: audit both halves
            key = uuid.uuid4().hex
            with self.store.transaction() as tx:
                for kind, detail in (("unlocked", "technician test"),
                                     ("locked", "technician test: relocked" if r.passed
                                      else f"technician test failed: {r.detail}")):
                    tx.add_event(make_event(
                        kind, app_name=self.config.site.app_name, site_id=self.config.site.id,
                        unit=lock.unit, reference=lock.reference,
                        external_id=external_id_for(self.config.site.id, "test", key, kind),
                        occurred_at=self.clock.now(), actor=actor,
                        detail=f"{detail}; unit {lock.reference}; by {actor}"))
        LOGGER.info("test of %s by %s: %s (%s)", lock.reference, actor,
                    "pass" if r.passed else "FAIL", r.detail)
        return r.as_dict()

    def _scan(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """``scan`` on the agent's own bus (it owns the port), between its transactions.

        Each address is one transaction, so commands and reconciliation wait at most one
        probe; a progress line per address; the CLI's Ctrl-C stops it.
        """
        from drivers.errors import DriverError
        from gateway.ops.control import ControlError
        from gateway.ops.control_stream import current_call
        from gateway.units.hardware import HardwareUnavailableError, scan_site_bus

        name = str(params.get("controller", ""))
        addresses = params.get("addresses")
        timeout_ms = params.get("timeout_ms")
        if addresses is not None and not (
                isinstance(addresses, list) and all(
                    isinstance(a, int) and not isinstance(a, bool) and 0 <= a <= 255
                    for a in addresses)):
            raise ControlError("addresses must be a list of integers from 0 to 255", 2)
        if timeout_ms is not None and not (
                isinstance(timeout_ms, int) and not isinstance(timeout_ms, bool)
                and 1 <= timeout_ms <= SCAN_TIMEOUT_MAX_MS):
            raise ControlError(f"--timeout-ms must be from 1 to {SCAN_TIMEOUT_MAX_MS} while "
                               "the agent runs (each probe holds its bus)", 2)
        call = current_call()
        with self._cancelled_on_stop(call), call.watch() as stop:
            try:
                report = scan_site_bus(
                    self.site, name, addresses,
                    timeout_s=None if timeout_ms is None else timeout_ms / 1000,
                    on_address=lambda done, total, address, found: call.progress(
                        {"done": done, "total": total, "address": address,
                         "found": None if found is None else
                         {"address": found.address, "description": found.description}}),
                    stop=stop)
            except HardwareUnavailableError as exc:
                raise ControlError(str(exc), 2) from None
            except DriverError as exc:  # the port itself failed: no bus to scan
                raise ControlError(f"scan of {name} stopped: {exc}", 1) from None
        return report.as_dict()

    @contextlib.contextmanager
    def _cancelled_on_stop(self, call: Call) -> Iterator[None]:
        """While the block runs, the agent stopping cancels ``call`` as a client hanging
        up would: the lock under test is relocked at once and no other is started.

        A ``locks.test`` management request runs on a detached call that no client can
        cancel; without this, stopping the agent waited out every lock's hold (up to
        30 s each), past systemd's stop timeout, whose SIGKILL could land mid-hold and
        leave a relay energized (found in review).
        """
        with self._on_stopping_mutex:
            stopping = self.stop_event.is_set()
            if not stopping:
                self._on_stopping.append(call.cancel)
        if stopping:  # a signal came first: start nothing
            call.cancel()
        try:
            yield
        finally:
            with self._on_stopping_mutex, contextlib.suppress(ValueError):
                self._on_stopping.remove(call.cancel)

    # -- remote management (gateway/intake/mgmt.py) ----------------------------------------------
    def apply_config(self, new: Config) -> tuple[list[str], str]:
        """Apply a validated configuration; the changed sections and ``"live"`` or
        ``"restart"``.

        Live only where nothing is rebuilt: ``[commands]`` (a new verifier, swapped while
        the link holds incoming messages unacknowledged in its inbox) and
        ``[telemetry]`` (the interval rescheduled; the textfile path is read each time).
        Anything else (the site's name, Stora settings, controllers, locks, the broker
        link's keepalive) is applied by a new process: the agent stops cleanly (running
        commands finish, waiting ones stay queued in SQLite, doors waiting for their
        relock are locked) and exits with ``RESTART_EXIT_STATUS``, which the systemd unit
        restarts (``RestartForceExitStatus``).  Nothing is dropped meanwhile: the broker
        keeps the session's QoS 1 commands and the next start runs the queued ones.
        Rebuilding hardware and workers inside a running agent raced with the periodic
        jobs and the control socket (found in review); a restart is the one path that is
        already tested for every kind of interruption.
        """
        old = self.config
        changed = self._changed_sections(new)
        if not changed:
            return changed, "live"
        if self.needs_restart(new):
            return changed, "restart"
        with self._intake:
            self.config = new
            self.verifier = CommandVerifier(new, self.clock)
            self.screen.reset(self.verifier)  # verdicts under the old keys and rules go
            self.units.config = new  # the same locks; its late-command skew may change
            self.mgmt.reconfigure()
        if ("telemetry" in changed and self.scheduler is not None
                and old.telemetry.interval_s != new.telemetry.interval_s):
            self.scheduler.reschedule("telemetry.publish", float(new.telemetry.interval_s))
        LOGGER.warning("configuration applied live: %s changed", ", ".join(changed))
        return changed, "live"

    def _changed_sections(self, new: Config) -> list[str]:
        import dataclasses

        return [f.name for f in dataclasses.fields(self.config)
                if f.name != "path" and getattr(self.config, f.name) != getattr(new, f.name)]

    def needs_restart(self, new: Config) -> bool:
        """Whether applying ``new`` takes a new process (see :meth:`apply_config`)."""
        changed = set(self._changed_sections(new))
        return bool(changed - {"commands", "telemetry"}) or (
            self.config.commands.clock != new.commands.clock)

    def request_restart(self, why: str) -> None:
        """Stop cleanly and exit for a restart (see :meth:`apply_config`)."""
        LOGGER.warning("restarting: %s", why)
        self.restart_reason = why
        self.stop_event.set()

    # -- lifecycle ------------------------------------------------------------------------
    def recover(self) -> None:
        """After a crash: interrupted commands become ``unknown`` (never re-run); commands
        received but never started are verified again and run if still fresh.

        Runs before the link starts, so nothing of this run is mistaken for last run's;
        the results go out once the broker is connected (``on_connected``).
        """
        from gateway.intake.mgmt import MGMT_PREFIX

        for row in self.store.recover_interrupted(time.time(), self.units.audit_interrupted):
            LOGGER.warning("command %s was interrupted by a restart: outcome unknown", row.jti)
            if row.cmd.startswith(MGMT_PREFIX):
                continue  # a re-send gets `unknown` from the store; never re-run
            self._restart_results.append(Outcome.from_result(row.result, duplicate=False))
        self._run_queued()

    def _run_queued(self, only: set[str] | None = None) -> None:
        """Commands received but never started: verified again and run if still fresh.

        One the clock cannot judge yet (``clock_untrusted``) stays queued and its id is
        kept in ``_held``; :meth:`retry_held` tries those again once the clock is
        trusted, and answers them ``expired`` if that came too late.  Found in review:
        they were left queued for good.  ``only`` limits the pass to those ids, so a
        command queued live meanwhile is never submitted twice.
        """
        for row, payload in self.store.queued_commands():
            if only is not None and row.jti not in only:
                continue
            self._held.discard(row.jti)
            try:
                command = self.verifier.verify(payload, retained=False)
            except Rejection as rejection:
                if rejection.reason == Reason.CLOCK_UNTRUSTED:
                    self._held.add(row.jti)  # not final: tried again when it is trusted
                    continue
                LOGGER.warning("queued command %s dropped at restart: %s", row.jti,
                               rejection.reason)
                outcome = Outcome(row.jti, row.cmd, row.unit, Status.REJECTED, rejection.reason,
                                  None, time.time())
                with self.store.transaction() as tx:
                    tx.finish_command(row.jti, Status.REJECTED, rejection.reason,
                                      outcome.record())
                self._result(outcome)
                continue
            LOGGER.info("running command %s received before the restart", row.jti)
            self._submit(command)
        if self._held:
            LOGGER.warning("%d command(s) received before the restart wait for a trusted "
                           "clock", len(self._held))

    def prune_store(self) -> dict[str, int] | None:
        """Delete what no guarantee needs any more (the ``store.prune`` job); how many
        rows went, or ``None`` when skipped because the wall clock is not trusted.

        Times are measured from the trusted-time floor, not the wall clock: a command's
        ``jti`` goes only once it arrived :func:`~gateway.store.command_dedupe_s` before
        the floor, so no clock the agent can trust would take a replay of it as fresh,
        and a forged step forward (which the floor does not follow) deletes nothing
        early.  Found in review: measured from the wall clock, a trusted forward step
        deleted ids that dedupe still needed.
        """
        from gateway.store import (
            COMMAND_KEEP_MIN_S,
            DEAD_KEEP_S,
            DELIVERED_KEEP_S,
            command_dedupe_s,
        )

        if not self.clock.trusted()[0]:
            return None
        base = min(self.clock.now(), self.clock.floor)
        commands = self.config.commands
        gone = {"commands": 0, "delivered": 0, "dead": 0}
        while True:  # in batches: commands wait for the store's lock meanwhile
            with self.store.transaction() as tx:
                batch: dict[str, int] = tx.prune(
                    commands_before=min(base - COMMAND_KEEP_MIN_S, base - command_dedupe_s(
                        commands.max_lifetime_s, commands.clock_skew_s)),
                    delivered_before=base - DELIVERED_KEEP_S, dead_before=base - DEAD_KEEP_S,
                    limit=PRUNE_BATCH)
            for key, count in batch.items():
                gone[key] += count
            if max(batch.values()) < PRUNE_BATCH or self.stop_event.is_set():
                break
        if any(gone.values()):
            LOGGER.info("database pruned: %d ended commands, %d delivered and %d dead "
                        "Timeline Events", gone["commands"], gone["delivered"], gone["dead"])
        return gone

    def _reconcile_job(self) -> None:
        """The periodic reconciliation pass, after any held commands got their turn."""
        self._guarded("held commands", self.retry_held)
        # Through self.units at each call: a config.set may rebuild the unit manager.
        self._guarded("reconciliation", self.units.reconcile)

    def retry_held(self) -> None:
        """Run the commands :meth:`_run_queued` held for an untrusted clock, once it is
        trusted (a periodic job; cheap when there are none)."""
        if self._held and self.clock.trusted()[0]:
            with self._intake:  # not beside a live copy of the same command
                held, self._held = self._held, set()
                # Only those still queued: one a re-send ran meanwhile is not run again.
                self._run_queued(only=held)

    def start(self) -> None:
        """Start everything, the periodic jobs and the watchdog's checks last; returns
        at once."""
        from gateway.ops.control import ControlServer

        # The control socket first: it also refuses to start when another agent already
        # serves this site, before this one touches the broker or the hardware.
        self.control = ControlServer(self.config.control.socket, self)
        self.control.start()
        self.units.start()
        self.recover()
        self.link.start()
        from gateway.outbox.drainer import build_drainer

        plain = [url for url in (self.config.stora.base_url, self.config.stora.token_url)
                 if url.startswith("http://")]
        if plain:  # only loopback passes check-config; say it is not for a real site
            LOGGER.warning("[stora] uses plain http:// (%s): any local user who binds "
                           "that port while its server is down gets the credential and "
                           "can answer with any Date; fine for a sandbox, not for a site",
                           ", ".join(plain))

        # Every trusted Stora answer's Date is a second source for the clock's floor.
        self.outbox = build_drainer(self.config, self.store, self.alarm,
                                    on_server_date=self.clock.observe_server_time)
        self.outbox.start()
        self._guarded("reconciliation", self.units.reconcile)

        # The periodic jobs (gateway/schedule.py JOBS) and the watchdog's vitals.
        # "Alive", concretely: each check below passes, i.e. each part showed progress
        # within one watchdog period (``stale``):
        # * MQTT link: its network and worker threads are running, and the worker is not
        #   sitting on queued messages without handling any;
        # * unit workers: a no-op probe, queued on its own key by the heartbeat, gets a
        #   worker (a lock operation takes seconds; all workers held that long is stuck);
        # * relock timer: its thread is running;
        # * scheduler: its thread is running and the heartbeat job ran (so its pool runs
        #   jobs);
        # * reconciliation: a pass ended within RECONCILE_STALE_PASSES intervals or two
        #   periods, whichever is longer.
        from gateway.schedule import (
            JOBS,
            PROBE_KEY,
            PoolProbe,
            SiteScheduler,
            Watchdog,
            inbound_progress,
            threads_alive,
            watchdog_period,
        )
        from gateway.stora import StoraError

        period = watchdog_period()
        stale = period if period is not None else VITAL_STALE_S
        spec = {job.id: job for job in JOBS}
        heartbeat_s = min(spec["watchdog.heartbeat"].interval_s, stale / 3)
        reconcile_stale = max(RECONCILE_STALE_PASSES * spec["units.reconcile"].interval_s,
                              2 * stale)
        # Through self.units at each call: a config.set may rebuild the unit manager.
        probe = PoolProbe(lambda fn: self.units.run_exclusive(PROBE_KEY, fn), stale)

        def refresh_token() -> None:
            if self.outbox is None:
                return
            try:  # refreshes only when due; a failure is the drainer's to report
                self.outbox.client.tokens.token()
            except StoraError as exc:
                LOGGER.debug("token refresh ahead of expiry: %s", exc)

        def on_jump(step: float) -> None:
            del step
            # The clock looks at once (a large step forward is an alarm), not only at the
            # next command or status.
            self.clock.now()
            if self.outbox is not None:  # its waits are computed from wall-clock times
                self.outbox.wake()

        self.scheduler = SiteScheduler(
            {
                "units.reconcile": self._reconcile_job,
                "telemetry.publish": functools.partial(
                    self._guarded, "telemetry", self.publish_telemetry),
                "clock.persist": functools.partial(
                    self._guarded, "saving the trusted time", self._persist_trusted_time),
                "outbox.wake": lambda: self.outbox.wake() if self.outbox is not None else None,
                "store.prune": functools.partial(self._guarded, "pruning the database",
                                                 self.prune_store),
                "stora.token_refresh": refresh_token,
                "watchdog.heartbeat": probe.probe,
            },
            intervals={"watchdog.heartbeat": heartbeat_s,
                       "telemetry.publish": float(self.config.telemetry.interval_s),
                       **self._job_intervals},
            on_jump=on_jump,
        )
        scheduler = self.scheduler
        self.vitals = [
            ("mqtt link", threads_alive(self.link.threads)),
            ("mqtt inbound", inbound_progress(self.link.stats, stale)),
            ("unit workers", probe.check),
            ("relock timer", threads_alive(lambda: [self.units.timer_thread()])),
            ("scheduler", lambda: scheduler.stalled("watchdog.heartbeat", stale)),
            ("reconciliation", lambda: scheduler.stalled("units.reconcile", reconcile_stale)),
        ]
        self.watchdog = (Watchdog(period, self.vitals, _sd_notify) if period is not None
                         else None)
        scheduler.start()
        if self._faults is not None:  # tests only (StartHook)
            self._faults(self)

    def run_forever(self) -> None:
        """Until ``stop_event``.  The periodic jobs run on the scheduler (started by
        :meth:`start`); this thread pings the systemd watchdog while the agent is alive."""
        watchdog = self.watchdog
        while True:
            if watchdog is not None:
                watchdog.tick()
            if self.stop_event.wait(watchdog.interval_s if watchdog is not None
                                    else MAIN_WAIT_S):
                return

    def _guarded(self, what: str, job: Any) -> None:
        """Run a periodic job; a failure is an alarm, never the end of the agent."""
        try:
            job()
        except Exception as exc:  # a full disk, a driver bug: keep the locks going
            LOGGER.exception("%s failed", what)
            self.alarm("agent_error", None, f"{what} failed: {type(exc).__name__}: {exc}")

    def _persist_trusted_time(self) -> None:
        """The ``clock.persist`` job (and shutdown): save the proven time and the bounded
        floor, then, while running, ask Stora's clock when the floor holds the clock back."""
        self.clock.save_floor()
        if not self.stop_event.is_set():
            self._confirm_clock()

    def _confirm_clock(self) -> None:
        """While the wall clock reads before the floor, ask Stora for its ``Date`` (at most
        every ``SERVER_TIME_PROBE_S``): a gateway with nothing to post still recovers once
        a second source confirms the clock.  The answer reaches the clock through the
        client's ``on_server_date`` hook."""
        from gateway.clock import SERVER_TIME_PROBE_S

        now = time.monotonic()
        if now - self._server_time_asked_at < SERVER_TIME_PROBE_S or not self.clock.below_floor():
            return
        probe = getattr(getattr(self.outbox, "client", None), "probe_server_time", None)
        if probe is None:
            return
        self._server_time_asked_at = now
        probe()

    def reset_clock_floor(self, actor: str) -> dict[str, Any]:
        """Set the trusted-time floor back to the build date (``clock --reset-floor``, the
        management request ``clock.reset_floor``): saved, logged and alarmed with
        ``actor``.  Returns ``previous``, ``floor``, ``actor``, ``saved`` and ``clock``
        (gateway/clock.py ``TrustedClock.reset_floor``)."""
        return self.clock.reset_floor(actor)

    def stop(self) -> None:
        """Clean shutdown, each step best effort: no new requests, running work finished
        (and its results published), pending relocks done, offline status, ports closed.

        Long technician requests (``test``, ``scan``) are cancelled first, so the
        management and control threads are not waited on for a test's whole run."""
        self.stop_event.set()
        with self._on_stopping_mutex:  # after the set: _cancelled_on_stop sees one or other
            cancels, self._on_stopping = self._on_stopping, []
        for cancel in cancels:
            cancel()  # Call.cancel: never raises (its callbacks are guarded)
        scheduler = self.scheduler
        steps: list[tuple[str, Any]] = [
            # First: no reconciliation pass may queue work behind the units' shutdown.
            # A job running now ends first (a bus read, a token request: bounded).
            ("scheduler", scheduler.stop if scheduler is not None else None),
            ("control socket", self.control.stop if self.control is not None else None),
            ("management", self.mgmt.stop),
            ("units", self.units.stop),
            ("outbox", self.outbox.stop if self.outbox is not None else None),
            ("saving the trusted time", self._persist_trusted_time),
            ("broker link", self.link.stop),
            ("hardware", self.site.close),
            ("store", self.store.close),
        ]
        for what, step in steps:
            if step is None:
                continue
            try:
                step()
            except Exception:
                LOGGER.exception("stopping %s failed", what)


def rejection_outcome(rejection: Rejection) -> Outcome:
    """The published result of a rejected token.

    The ids of a token whose signature did not verify are the sender's word: echoing
    them would let a forger publish a "rejected" result under the ``jti`` of a genuine
    command still on its way, and the relay would take it for that command's answer
    (found in review).  They are published as ``null``; only verified claims are echoed.
    """
    if rejection.claims_verified:
        return Outcome(rejection.jti, rejection.cmd, rejection.unit, Status.REJECTED,
                       rejection.reason, None, time.time())
    return Outcome(None, None, None, Status.REJECTED, rejection.reason, None, time.time())


def _sd_notify(message: str) -> None:
    """Send one sd_notify message (READY=1, WATCHDOG=1, …) when systemd is listening.

    Raises OSError when the socket is named but refuses it (the watchdog logs that).
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    import socket

    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.connect(address)
        sock.sendall(message.encode())


def run_agent(config: Config, *, debug: bool = False, faults: StartHook | None = None,
              restart_min_uptime_s: float | None = None) -> int:
    """Run the agent in the foreground until SIGTERM/SIGINT; the exit status.

    ``faults`` and ``restart_min_uptime_s`` are :class:`Agent`'s test hooks
    (``python -m devkit.agent``); ``stora-gateway run`` gives neither.
    """
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not debug:
        logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
        # APScheduler logs every run of every job at INFO; its warnings (a run missed,
        # one skipped because the last is still running) stay.
        logging.getLogger("apscheduler").setLevel(logging.WARNING)
    # Threads hand the GIL over every 5 ms by default.  The worker's signature checks
    # release it (inside OpenSSL) and must then wait for the network thread to give it
    # back, which a flood keeps busy: up to one interval per command.  1 ms keeps that
    # wait short at a small cost in switches (bench/agent_flood.py --forgeries).
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    agent = Agent(config, faults=faults, restart_min_uptime_s=restart_min_uptime_s)

    def on_signal(signum: int, frame: object) -> None:
        del frame
        LOGGER.info("signal %d: stopping", signum)
        agent.stop_event.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    LOGGER.info("stora-gateway %s starting for site %s as %s", __version__, config.site.id,
                pwd.getpwuid(os.getuid()).pw_name)
    agent.start()
    try:
        _sd_notify("READY=1")
    except OSError as exc:  # systemd would time the start out; say why
        LOGGER.error("could not tell systemd we are ready (NOTIFY_SOCKET): %s", exc)  # noqa: TRY400
    try:
        agent.run_forever()
    finally:
        with contextlib.suppress(OSError):
            _sd_notify("STOPPING=1")
        agent.stop()
    if agent.restart_reason is not None:
        LOGGER.warning("exiting with status %d to be started again: %s", RESTART_EXIT_STATUS,
                       agent.restart_reason)
        return RESTART_EXIT_STATUS
    return 0
