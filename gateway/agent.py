"""``stora-gateway run``: the agent.

Threads, and why each exists:

* paho's network loop (inside ``MqttLink``): only moves bytes and enqueues messages, so
  keepalive never waits on serial I/O or SQLite;
* the link's worker: verifies each command (signature, audience, freshness, size — all
  before anything touches hardware) and hands verified ones to ``UnitManager``;
* the unit pool: one operation at a time per unit, in arrival order;
* the outbox drainer (gateway/outbox.py): posts Timeline Events to Stora, woken when a
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
lockouts are driven even when their record cannot be written (gateway/units.py).

Rejections are published with their reason code through a token bucket, so a flood of
garbage cannot make the agent amplify it onto the broker.

Load shedding
-------------
One Ed25519 verification costs more than everything else a message costs the agent
(about 170 µs on this project's x86 test machine, more on a Pi), so a flood of tokens
that each need one would outrun a core.  Two cheap steps come before it:

* **Refused before.**  A payload refused for a reason that cannot change
  (:data:`LASTING_REASONS`) is remembered by its BLAKE2b-128 hash, the last
  :data:`REFUSED_CACHE_MAX` of them; a repeat gets the same rejection without parsing.
  Replaying captured traffic, the cheapest flood there is, costs a hash per message.
* **Claims first while results are throttled.**  When the rejection bucket is empty no
  result would be published, so the exact reason no longer matters: a token whose
  claims could never be accepted (expired, another site, unknown unit, bad shape…) is
  dropped before its signature is checked (``CommandVerifier.screen``) and counted as
  ``shed``.  A token that passes still gets the full check, so nothing that could be
  accepted is ever shed here; a late duplicate of a command this agent answered still
  gets its original result.

What remains is a flood of *distinct* forgeries whose claims are all plausible (right
site, fresh, a configured unit): each needs a full check, and the agent is then bound by
the curve.  The defence for that is the broker's ACL on ``P/S/cmd`` (README, "Broker"),
which stops foreign publishers before they cost the agent anything.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
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
from collections import OrderedDict, deque
from collections.abc import Mapping
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Final

from gateway import __version__
from gateway.commands import MAX_COMMAND_BYTES, Command, CommandVerifier, Rejection
from gateway.config import Config, LockConfig
from gateway.hardware import Site, build_site
from gateway.units import Outcome, UnitManager, rfc3339

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
#: Refused payloads remembered (by a 16-byte hash) to refuse a repeat without parsing it.
REFUSED_CACHE_MAX = 4096
#: Rejection reasons that no later moment can change for the same bytes under the same
#: configuration.  Not ``not_yet_valid`` or ``clock_untrusted`` (time cures those) and not
#: ``retained`` (the same bytes may come live).  ``expired`` is final: the clock is
#: trusted only at or above its floor, which follows trusted time forward.
LASTING_REASONS = frozenset({"malformed", "bad_signature", "unknown_key", "wrong_site",
                             "expired", "lifetime_too_long", "unknown_unit"})
#: Marks a payload whose claims were refused while its signature was not checked.
_SHED: Final = object()
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


class TokenBucket:
    """A token bucket on the monotonic clock."""

    def __init__(self, rate: float, burst: int, clock: Any = time.monotonic) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self._clock = clock
        self._at = clock()
        self._lock = threading.Lock()
        self.dropped = 0

    def ready(self) -> bool:
        """True if :meth:`take` would succeed now (takes nothing)."""
        with self._lock:
            now = self._clock()
            tokens: float = min(self.burst, self.tokens + (now - self._at) * self.rate)
            return tokens >= 1

    def take(self) -> bool:
        """True if a token was available."""
        with self._lock:
            now = self._clock()
            self.tokens = min(self.burst, self.tokens + (now - self._at) * self.rate)
            self._at = now
            if self.tokens >= 1:
                self.tokens -= 1
                return True
            self.dropped += 1
            return False


class RecentIds:
    """The last ``size`` command ids, as their 64-bit hashes: "was this id seen lately?".

    Only hashes are kept (about 60 bytes an id instead of about 230 for the strings in an
    ordered dict: 1.7 MB less at 10,000, on a Pi).  A collision can only make an unseen
    id look recent, which costs a database lookup or a full signature check, never a
    wrong answer: the database decides.  Not thread-safe (the link's worker owns it).
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._set: set[int] = set()
        self._order: deque[int] = deque()

    def add(self, jti: str) -> None:
        """Remember ``jti`` (the oldest is forgotten beyond ``size``)."""
        key = hash(jti)
        if key in self._set:
            return
        self._set.add(key)
        self._order.append(key)
        if len(self._order) > self._size:
            self._set.discard(self._order.popleft())

    def __contains__(self, jti: object) -> bool:
        return isinstance(jti, str) and hash(jti) in self._set

    def __len__(self) -> int:
        return len(self._order)


class Agent:
    """The running gateway: wires config, hardware, store, broker and control socket."""

    def __init__(self, config: Config, *, site: Site | None = None,
                 clock_synced: Any = None,
                 reject_rate: tuple[float, int] = (REJECT_RATE_PER_S, REJECT_BURST),
                 job_intervals: Mapping[str, float] | None = None) -> None:
        from gateway.clock import TrustedClock, kernel_synchronized

        self.config = config
        self.prefix = f"{config.mqtt.topic_prefix}/{config.site.id}"
        self.started_at = time.time()
        self.stop_event = threading.Event()
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
        floor = self.store.meta("last_trusted_time")
        if floor:
            self.clock.raise_floor(float(floor))
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
        from gateway.mqtt import LinkTimings, MqttLink

        # The liveness check scales with the keepalive the site chose: half of it to
        # send the echo, half to wait for it, so a wedged link is noticed within about
        # one keepalive (paho's own keepalive needs up to 1.5).
        half = max(1.0, config.mqtt.keepalive_s / 2)
        self.link = MqttLink(
            config.mqtt,
            status_topic=f"{self.prefix}/status",
            birth=self._birth,
            will=json.dumps({"online": False}).encode(),
            subscriptions=[(f"{self.prefix}/cmd", 1), (f"{self.prefix}/mgmt", 1)],
            on_message=self.on_message,
            on_connected=self.on_connected,
            timings=LinkTimings(liveness_interval_s=half, liveness_timeout_s=half,
                                backoff_max_s=30.0),
        )
        self.control: Any = None
        self.rejected_by_reason: dict[str, int] = {}
        # Bounded FIFOs.  OrderedDict, not dict: popping a dict's oldest key scans the
        # slots its earlier deletions left behind, which a flood turns quadratic.
        self._recent_jtis = RecentIds(RECENT_JTIS_MAX)
        # BLAKE2b-128 of refused payloads -> their rejection, or _SHED when only the
        # claims were judged (the reason is then unknown); insertion-ordered, bounded.
        self._refused: OrderedDict[bytes, Rejection | object] = OrderedDict()
        self._restart_results: deque[Outcome] = deque(maxlen=UNSENT_RESULTS_MAX)
        from gateway.mgmt import Management

        self._mgmt_topic = f"{self.prefix}/mgmt"
        self.mgmt = Management(self)
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
    def _publish(self, suffix: str, payload: Mapping[str, Any], *, retain: bool = False) -> None:
        data = json.dumps(payload, separators=(",", ":")).encode()
        self.link.publish(f"{self.prefix}/{suffix}", data, qos=1, retain=retain)

    def _publish_unit(self, unit: str, state: dict[str, Any]) -> None:
        self._publish(f"units/{unit}", state, retain=True)

    def alarm(self, kind: str, unit: str | None, detail: str) -> None:
        """Publish an alarm (door forced, door held open, controller offline, jam, …)."""
        LOGGER.warning("alarm %s %s: %s", kind, unit or "-", detail)
        self._publish("alarm", {"kind": kind, "unit": unit, "detail": detail,
                                "at": rfc3339(time.time())})

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
            self.alarm(kind, None,
                       f"{exc}; {self.store.events_refused} Timeline Event(s) refused so far "
                       f"({refused} just now); lock control continues")
        except Exception:  # the hook must never turn a storage failure into a crash
            LOGGER.exception("raising the storage alarm failed")

    def _result(self, outcome: Outcome) -> None:
        data = json.dumps(outcome.payload(), separators=(",", ":")).encode()
        if not self.link.publish(f"{self.prefix}/cmd/result", data, qos=1):
            # Not connected: kept (bounded) and sent on the next connect, so a result
            # is not lost to a broker outage; the sender can also re-send the command
            # and get it as a duplicate.
            self._restart_results.append(outcome)

    def status(self) -> dict[str, Any]:
        """Everything ``status`` shows; also the retained ``P/S/status`` payload.

        ``online`` and ``version`` come first (contract §4).  A part that cannot be read
        (the database failing) says so under ``error`` instead of failing the report.
        """
        from gateway.store import StoreError
        from gateway.telemetry import host_status

        trusted, why = self.clock.trusted()
        controllers = []
        now = time.monotonic()
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
        return {
            "online": True,
            "version": __version__,
            "site": self.config.site.id,
            "started_at": rfc3339(self.started_at),
            "uptime_s": round(time.time() - self.started_at),
            "clock": {"trusted": trusted, "why": why, **self.clock.status()},
            "broker": {"connected": self.link.connected, **self.link.stats()},
            "controllers": controllers,
            "outbox": outbox,
            "commands": {**self.counters, "rejected_by_reason": dict(self.rejected_by_reason)},
            "management": dict(self.mgmt.counters),
            "schedule": self.scheduler.stats() if self.scheduler is not None else None,
            "host": host_status(self.config.storage.path),
        }

    def _outbox_status(self) -> dict[str, Any]:
        """Depth, oldest pending age, dead letters, drain state, events refused, and when
        Stora last accepted an event (``last_post_at``, from the database: survives a
        restart)."""
        from gateway.telemetry import last_delivered_at

        now = time.time()
        summary = self.store.outbox_summary(now)
        drain = self.outbox.status() if self.outbox is not None else {"drain": "not started"}
        last = last_delivered_at(self.store)
        return {**summary, **drain, "events_refused": self.store.events_refused,
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
        self.link.publish(f"{self.prefix}/status", payload, qos=1, retain=True)
        textfile = self.config.telemetry.prometheus_textfile
        if textfile is None:
            return
        from gateway.telemetry import render_prometheus, write_textfile

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
        for alarm in self._pending_alarms:
            self.alarm(*alarm)
        self._pending_alarms = []

    # -- commands -------------------------------------------------------------------------
    def on_message(self, message: Any) -> None:
        """A message on ``P/S/cmd`` or ``P/S/mgmt`` (the link's worker thread)."""
        with self._intake:
            if message.topic == self._mgmt_topic:
                self.mgmt.on_message(message)
            else:
                self._on_command(message)

    def _on_command(self, message: Any) -> None:
        """A message on ``P/S/cmd``: verify, then queue on the unit (or reject).

        Under a flood most of the cost is the Ed25519 check, so two cheap steps come
        first (see "Load shedding" in the module docstring): a repeat of a payload
        already refused for a lasting reason gets that same rejection back without any
        parsing, and while rejections cannot be published anyway a payload whose claims
        could never be accepted is dropped before its signature is checked.
        """
        self.counters["received"] += 1
        payload: bytes = message.payload
        # Oversized payloads fail on their length alone; hashing them would cost more.
        digest = (hashlib.blake2b(payload, digest_size=16).digest()
                  if not message.retain and len(payload) <= MAX_COMMAND_BYTES else None)
        known = self._refused.get(digest) if digest is not None else None
        if isinstance(known, Rejection):
            self.counters["refused_again"] += 1
            self._rejected(known)
            return
        throttled = not self.rejections.ready()
        if throttled and known is _SHED:
            self.counters["shed"] += 1
            self.rejections.take()  # counted as a result not published
            return
        command = self._check(payload, message.retain, digest, throttled=throttled)
        if command is None:
            return
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
            if command.cmd in ("lock", "lockout") and command.unit is not None:
                # Locking is safe to repeat and must never wait for the disk: the door
                # is locked anyway; the command is still answered "failed" (not kept).
                self.units.lock_unrecorded(command.unit, f"{command.cmd} {command.jti}")
            self._result(Outcome(command.jti, command.cmd, command.unit, "failed",
                                 "hardware_error", None, time.time()))
            return
        if first is not None:
            # Seen before: answered from the first outcome, behind the first command's
            # unit, whatever unit this copy names (a reused jti never moves a lock).
            future = self.units.answer_duplicate(command, first.unit)
            future.add_done_callback(functools.partial(self._done, command))
            return
        self._submit(command)

    def _check(self, payload: bytes, retained: bool, digest: bytes | None, *,
               throttled: bool) -> Command | None:
        """Verify; ``None`` when refused (answered, shed or remembered as needed)."""
        try:
            if throttled:  # no result could be published: claims first, one parse
                return self.verifier.verify_claims_first(payload, retained=retained)
            return self.verifier.verify(payload, retained=retained)
        except Rejection as exc:
            rejection = exc
        if rejection.screened:
            if rejection.jti is not None and rejection.jti in self._recent_jtis:
                # Maybe a late duplicate of a command run here: it gets its original
                # result, which takes the signature check.
                return self._check(payload, retained, digest, throttled=False)
            self.counters["shed"] += 1
            self.rejections.take()  # counted as a result not published
            if rejection.reason in LASTING_REASONS:  # not_yet_valid may pass later
                self._remember(digest, _SHED)
            return None
        if rejection.reason in LASTING_REASONS:
            self._remember(digest, rejection)
        self._rejected(rejection)
        return None

    def _remember(self, digest: bytes | None, verdict: Rejection | object) -> None:
        if digest is None:
            return
        if isinstance(verdict, Rejection):
            # Kept for long: drop what would keep the verifier's frames (and with them
            # the payload and parsed JSON) alive, the traceback of the exception that
            # was being handled when it was raised included.
            verdict.__context__ = verdict.__cause__ = None
            verdict.__traceback__ = None
        refused = self._refused
        refused.pop(digest, None)  # re-inserted last: a precise verdict replaces _SHED
        refused[digest] = verdict
        if len(refused) > REFUSED_CACHE_MAX:
            refused.popitem(last=False)

    def _rejected(self, rejection: Rejection) -> None:
        self.counters["rejected"] += 1
        # Debug only: a flood would otherwise write thousands of lines a second; the
        # counts per reason are in `status`.
        LOGGER.debug("command rejected: %s (%s)", rejection.reason, rejection.detail)
        self.rejected_by_reason[rejection.reason] = (
            self.rejected_by_reason.get(rejection.reason, 0) + 1)
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
        if self.rejections.take():
            self._result(Outcome(rejection.jti or "", rejection.cmd or "", rejection.unit,
                                 "rejected", rejection.reason, None, time.time()))

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
            outcome = Outcome(command.jti, command.cmd, command.unit, "unknown", None, None,
                              time.time())
            try:
                with self.store.transaction() as tx:
                    row = tx.command(command.jti)
                    if row is not None and row.status in ("queued", "executing"):
                        tx.finish_command(command.jti, "unknown", None, outcome.record())
            except Exception:  # the store itself may be what failed
                LOGGER.exception("could not record %s as unknown", command.jti)
        with self._counters_lock:  # this runs on the unit threads, several at once
            self.counters["duplicates" if outcome.duplicate else "executed"] += 1
        self._result(outcome)

    # -- control socket -------------------------------------------------------------------
    def handle(self, method: str, params: Mapping[str, Any], peer: Any) -> dict[str, Any]:
        """Requests from the local CLI (gateway/control.py)."""
        from gateway.control import ControlError

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
            if outcome.reason == "overlocked":
                raise ControlError(
                    f"{lock.reference} is in lockout (overlocked): use --force --reason TEXT", 1)
            entry = self._outcome_row(lock, method, outcome, time.monotonic() - started)
            self._result(outcome)
            return {"outcomes": [entry]} if method == "unlock" else {"outcome": entry}
        if method == "test":
            return self._test(params, actor)
        if method == "outbox.list":
            return self._outbox_list(params)
        if method == "outbox.retry":
            return self._outbox_retry(params, actor)
        raise ControlError(f"unknown request {method!r}", 2)

    def _outbox_list(self, params: Mapping[str, Any]) -> dict[str, Any]:
        from gateway.control import ControlError

        limit = params.get("limit", OUTBOX_LIST_MAX)
        if not isinstance(limit, int) or isinstance(limit, bool) or not 0 < limit <= 10_000:
            raise ControlError("limit must be an integer from 1 to 10000", 2)
        dead_only = bool(params.get("dead"))
        rows = self.store.events(state="dead", limit=limit)
        if not dead_only:
            rows = self.store.events(state="pending", limit=limit) + rows
        return {"summary": self._outbox_status(), "events": [r.as_dict() for r in rows]}

    def _outbox_retry(self, params: Mapping[str, Any], actor: str) -> dict[str, Any]:
        from gateway.control import ControlError

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
        from gateway.control import ControlError

        lock = self.config.lock_by_id(text)
        if lock is None:
            raise ControlError(f"unknown unit {text!r}", 2)
        return lock

    @staticmethod
    def _outcome_row(lock: LockConfig, action: str, outcome: Outcome,
                     elapsed: float) -> dict[str, Any]:
        state = outcome.state or {}
        locked = state.get("locked")
        status = "done" if outcome.status == "done" else (outcome.reason or outcome.status)
        return {
            "unit": lock.unit, "reference": lock.reference, "action": action,
            "status": status, "detail": outcome.reason or "confirmed by read-back",
            "elapsed_ms": round(elapsed * 1000, 1),
            "state": "unknown" if locked is None else ("locked" if locked else "unlocked"),
            "door": state.get("door", "unknown"),
        }

    def _locks_rows(self) -> list[dict[str, Any]]:
        from gateway.technician import read_locks

        rows = read_locks(self.site, self.config.locks)
        return [{"unit": r.unit, "reference": r.reference, "controller": r.controller,
                 "locked": r.locked, "door": r.door,
                 "lockout": self.store.unit(r.unit).lockout, "error": r.error} for r in rows]

    def _test(self, params: Mapping[str, Any], actor: str) -> dict[str, Any]:

        if params.get("all"):
            locks = list(self.config.locks)
        else:
            locks = [self._find(str(u)) for u in params.get("units", [])]
        seconds = float(params.get("seconds") or 1.0)
        relock_timeout = float(params.get("relock_timeout") or 10.0)
        results = []
        for lock in locks:
            # On the unit's queue: a lockout queued ahead of the test is seen, and no
            # command runs in the middle of the cycle.
            future = self.units.run_exclusive(
                lock.unit, functools.partial(self._test_one, lock, seconds, relock_timeout,
                                             actor))
            try:
                results.append(future.result(timeout=CONTROL_WAIT_S + seconds +
                                             relock_timeout))
            except FutureTimeout:
                future.cancel()
                results.append({"unit": lock.unit, "reference": lock.reference,
                                "passed": False, "unlock_ms": None, "relock_ms": None,
                                "detail": "the unit stayed busy; not tested"})
        return {"passed": all(r["passed"] for r in results), "results": results}

    def _test_one(self, lock: LockConfig, seconds: float, relock_timeout: float,
                  actor: str) -> dict[str, Any]:
        """One technician test cycle, refused in lockout, audited like any unlock."""
        from gateway.technician import run_test_cycle
        from gateway.timeline import external_id_for, make_event

        if self.store.unit(lock.unit).lockout:
            return {"unit": lock.unit, "reference": lock.reference, "passed": False,
                    "unlock_ms": None, "relock_ms": None,
                    "detail": "in lockout: not tested (clear the lockout first)"}
        # Driven outside the unit manager: a read-back taken during the cycle must not be
        # applied after it (a false "drift" and an extra lock, found in review).
        self.units.mark_acted(lock.unit)
        try:
            r = run_test_cycle(self.site, lock, seconds, relock_timeout_s=relock_timeout)
        finally:
            self.units.mark_acted(lock.unit)
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
        LOGGER.info("test of %s by %s: %s", lock.reference, actor, "pass" if r.passed else "FAIL")
        return {"unit": r.unit, "reference": r.reference, "passed": r.passed,
                "unlock_ms": r.unlock_ms, "relock_ms": r.relock_ms, "detail": r.detail}

    # -- remote management (gateway/mgmt.py) ----------------------------------------------
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
            self.units.config = new  # the same locks; its late-command skew may change
            self.mgmt.reconfigure()
            self._refused.clear()  # verdicts under the old keys and rules
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
        from gateway.mgmt import MGMT_PREFIX

        for row in self.store.recover_interrupted(time.time(), self.units.audit_interrupted):
            LOGGER.warning("command %s was interrupted by a restart: outcome unknown", row.jti)
            if row.cmd.startswith(MGMT_PREFIX):
                continue  # a re-send gets `unknown` from the store; never re-run
            self._restart_results.append(Outcome.from_result(row.result, duplicate=False))
        self._run_queued()

    def _run_queued(self) -> None:
        """Commands received but never started: verified again and run if still fresh."""
        for row, payload in self.store.queued_commands():
            try:
                command = self.verifier.verify(payload, retained=False)
            except Rejection as rejection:
                LOGGER.warning("queued command %s dropped at restart: %s", row.jti,
                               rejection.reason)
                outcome = Outcome(row.jti, row.cmd, row.unit, "rejected", rejection.reason,
                                  None, time.time())
                if rejection.reason == "clock_untrusted":
                    continue  # not final: it is tried again once the clock is trusted
                with self.store.transaction() as tx:
                    tx.finish_command(row.jti, "rejected", rejection.reason, outcome.record())
                self._restart_results.append(outcome)
                continue
            LOGGER.info("running command %s received before the restart", row.jti)
            self._submit(command)

    def start(self) -> None:
        """Start everything, the periodic jobs and the watchdog's checks last; returns
        at once."""
        from gateway.control import ControlServer

        # The control socket first: it also refuses to start when another agent already
        # serves this site, before this one touches the broker or the hardware.
        self.control = ControlServer(self.config.control.socket, self)
        self.control.start()
        self.units.start()
        self.recover()
        self.link.start()
        from gateway.outbox import build_drainer

        self.outbox = build_drainer(self.config, self.store, self.alarm)
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
            TEST_FAULT_ENV,
            PoolProbe,
            SiteScheduler,
            Watchdog,
            arm_test_fault,
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
            if self.outbox is not None:  # its waits are computed from wall-clock times
                self.outbox.wake()

        self.scheduler = SiteScheduler(
            {
                "units.reconcile": lambda: self._guarded(
                    "reconciliation", self.units.reconcile),
                "telemetry.publish": functools.partial(
                    self._guarded, "telemetry", self.publish_telemetry),
                "clock.persist": functools.partial(
                    self._guarded, "saving the trusted time", self._persist_trusted_time),
                "outbox.wake": lambda: self.outbox.wake() if self.outbox is not None else None,
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
        fault = os.environ.get(TEST_FAULT_ENV)
        if fault:  # test-only (gateway/schedule.py docstring)
            def wedge_units() -> None:
                for n in range(64):  # more keys than any pool has workers
                    self.units.run_exclusive(f"~wedge-{n}", self.stop_event.wait)

            arm_test_fault(fault, {"wedge-units": wedge_units, "stop-link": self.link.stop,
                                   "stop-scheduler": scheduler.shutdown_for_test})

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
        trusted, _ = self.clock.trusted()
        if trusted:
            self.store.set_meta("last_trusted_time", repr(self.clock.now()))

    def stop(self) -> None:
        """Clean shutdown, each step best effort: no new requests, running work finished
        (and its results published), pending relocks done, offline status, ports closed."""
        self.stop_event.set()
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


def run_agent(config: Config, *, debug: bool = False) -> int:
    """Run the agent in the foreground until SIGTERM/SIGINT; the exit status."""
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
    agent = Agent(config)

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
