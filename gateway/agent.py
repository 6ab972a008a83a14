"""``stora-gateway run``: the agent, the composition root of the gateway.

:class:`Agent` builds the parts from the config, starts them, waits, and stops them;
what the running gateway does is the operations service's (gateway/ops/service.py).
See docs/design/agent.md.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import pwd
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Final

from gateway import __version__
from gateway.clock import TrustedClock, kernel_synchronized
from gateway.config import Config
from gateway.errors import cap_text
from gateway.intake.commands import CommandVerifier
from gateway.intake.mgmt import Management
from gateway.intake.screen import TokenBucket
from gateway.link.message import Message
from gateway.link.mqtt import MqttLink
from gateway.link.timing import LinkTimings
from gateway.ops.control import ControlServer
from gateway.ops.routes import ControlRoutes
from gateway.ops.service import Operations
from gateway.ops.storage import PendingAlarm, StorageAlarm, open_store
from gateway.outbox.drainer import Drainer, build_drainer
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
from gateway.stora.errors import StoraError
from gateway.units.hardware import Site, build_site
from gateway.units.manager import UnitManager
from sitelink.payloads import alarm_payload, offline_status_payload
from sitelink.topics import Topics

LOGGER = logging.getLogger(__name__)

#: The periodic jobs and their intervals are one table: gateway/schedule/ ``JOBS``.
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
#: The interpreter's thread switch interval while the agent runs (default 5 ms).
SWITCH_INTERVAL_S = 0.001
#: Longest alarm ``detail`` published (characters): room for a storage error with its
#: paths or Stora's capped reason (gateway/outbox/drainer.py keeps its notes to the same 1200),
#: far below any broker's packet limit.
ALARM_DETAIL_MAX: Final = 1200
#: ``run`` exits with this after a clean stop for a restart (a ``config.set`` that needs a
#: new process); the systemd unit restarts it (``RestartForceExitStatus=``).  75 is
#: EX_TEMPFAIL: "try again".
RESTART_EXIT_STATUS: Final = 75

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
                 clock_synced: Callable[[], bool] | None = None,
                 reject_rate: tuple[float, int] = (REJECT_RATE_PER_S, REJECT_BURST),
                 job_intervals: Mapping[str, float] | None = None,
                 faults: StartHook | None = None,
                 restart_min_uptime_s: float | None = None) -> None:
        started_at = time.time()
        self._faults = faults
        self.topics = Topics(config.mqtt.topic_prefix, config.site.id)
        self.prefix = self.topics.base
        self.stop_event = threading.Event()
        self._pending_alarms: list[PendingAlarm] = []
        self.store = open_store(config.storage.path, self._pending_alarms)
        self.store.on_events_added = self._events_added
        self.store.on_write_failed = StorageAlarm(self.store, self.alarm)
        self.clock = TrustedClock(
            "system" if config.commands.clock == "system" else "ntp",
            synced=clock_synced or kernel_synchronized,
        )
        # The saved floor, bounded by the proven run time (gateway/clock/): a floor that
        # is invalid, or was reset while the agent was stopped, is an alarm at connect.
        self._pending_alarms.extend(
            (kind, None, detail) for kind, detail in self.clock.load_floor(self.store))
        self.clock.on_alarm = self._clock_alarm
        self.site = site or build_site(config)
        self.units = UnitManager(
            config, self.site, self.store, now=self.clock.now,
            publish_unit=self._publish_unit, alarm=self.alarm,
        )
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
        self.ops = Operations(
            config, topics=self.topics, store=self.store, clock=self.clock, site=self.site,
            units=self.units, link=self.link, alarm=self.alarm, stopping=self.stop_event,
            started_at=started_at, rejections=TokenBucket(*reject_rate))
        self.mgmt = Management(self.ops, restart_min_uptime_s=restart_min_uptime_s)
        self.ops.mgmt = self.mgmt
        self.control: ControlServer | None = None
        #: Interval overrides for the periodic jobs (gateway/schedule/ JOBS): tests'.
        self._job_intervals = dict(job_intervals or {})
        self.watchdog: Watchdog | None = None
        self.vitals: list[tuple[str, Callable[[], str | None]]] = []

    # -- the parts the operations service holds (tests and the dev kit read them) -------
    @property
    def config(self) -> Config:
        """The live configuration (a ``config.set`` may replace it)."""
        return self.ops.config

    @config.setter
    def config(self, config: Config) -> None:
        self.ops.config = config

    @property
    def started_at(self) -> float:
        """When the agent started (wall clock; tests move it back)."""
        return self.ops.started_at

    @started_at.setter
    def started_at(self, when: float) -> None:
        self.ops.started_at = when

    @property
    def outbox(self) -> Drainer | None:
        """The outbox drainer, once started."""
        return self.ops.outbox

    @property
    def scheduler(self) -> SiteScheduler:
        """The periodic jobs (built by :meth:`start`; an error before it)."""
        if self.ops.scheduler is None:
            raise RuntimeError("the agent's scheduler is built by start()")
        return self.ops.scheduler

    @property
    def restart_reason(self) -> str | None:
        """Why the agent stopped to be started again (``None``: it did not)."""
        return self.ops.restart_reason

    @property
    def counters(self) -> dict[str, int]:
        """The command path's counters (``status``)."""
        return self.ops.commands.counters

    @property
    def verifier(self) -> CommandVerifier:
        """The verifier of commands (the agent's keys and site)."""
        return self.ops.commands.verifier

    @property
    def _held(self) -> set[str]:  # the commands held for an untrusted clock (tests)
        return self.ops.commands.held

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

    def _clock_alarm(self, kind: str, detail: str) -> None:
        # The clock stepped or its floor moved: an `expired` verdict may no longer
        # be final, so the screens forget theirs (gateway/intake/screen.py).
        ops, mgmt = getattr(self, "ops", None), getattr(self, "mgmt", None)
        for screen in (ops.commands.screen if ops is not None else None,
                       mgmt.screen if mgmt is not None else None):
            if screen is not None:
                screen.forget()
        # Before the first connection (a step or a reset at start) nothing can be
        # published: kept for on_connected like the storage alarms.
        link = getattr(self, "link", None)
        if link is not None and link.connected:
            self.alarm(kind, None, detail)
        else:
            self._pending_alarms.append((kind, None, detail))

    def _events_added(self, count: int) -> None:
        """A transaction committed ``count`` new Timeline Events: wake the drainer."""
        outbox = self.ops.outbox if count and hasattr(self, "ops") else None
        if outbox is not None:
            outbox.wake()

    # -- the broker link's callbacks ------------------------------------------------------
    def _birth(self) -> bytes:  # the status, as the link's birth message
        return self.ops.birth()

    def on_message(self, message: Message) -> None:
        """A message on ``P/S/cmd`` or ``P/S/mgmt`` (the link's worker thread)."""
        self.ops.on_message(message)

    def on_connected(self, session_present: bool) -> None:
        """After every (re)connect: retained unit state again, then pending alarms."""
        LOGGER.info("broker connected (session present: %s)", session_present)
        self.units.republish()
        self.ops.commands.flush_unsent()
        # Popped one by one: another thread (a clock alarm) may append meanwhile.
        while self._pending_alarms:
            self.alarm(*self._pending_alarms.pop(0))

    def status(self) -> dict[str, Any]:
        """Everything ``status`` shows (:meth:`Operations.status`)."""
        return self.ops.status()

    def publish_telemetry(self) -> None:
        """The periodic health report (:meth:`Operations.publish_telemetry`)."""
        self.ops.publish_telemetry()

    def prune_store(self) -> dict[str, int] | None:
        """The ``store.prune`` job (:meth:`Operations.prune_store`)."""
        return self.ops.prune_store()

    def reset_clock_floor(self, actor: str) -> dict[str, Any]:
        """The trusted-time floor back to the build date (:meth:`Operations.reset_clock_floor`)."""
        return self.ops.reset_clock_floor(actor)

    # -- lifecycle ------------------------------------------------------------------------
    def _reconcile_job(self) -> None:
        """The periodic reconciliation pass, after any held commands got their turn."""
        self._guarded("held commands", self.ops.retry_held)
        # Through self.units at each call: a config.set may rebuild the unit manager.
        self._guarded("reconciliation", self.units.reconcile)

    def start(self) -> None:
        """Start everything, the periodic jobs and the watchdog's checks last; returns
        at once."""
        # The control socket first: it also refuses to start when another agent already
        # serves this site, before this one touches the broker or the hardware.
        self.control = ControlServer(self.config.control.socket, ControlRoutes(self.ops))
        self.control.start()
        self.units.start()
        self.ops.recover()
        self.link.start()

        plain = [url for url in (self.config.stora.base_url, self.config.stora.token_url)
                 if url.startswith("http://")]
        if plain:  # only loopback passes check-config; say it is not for a real site
            LOGGER.warning("[stora] uses plain http:// (%s): any local user who binds "
                           "that port while its server is down gets the credential and "
                           "can answer with any Date; fine for a sandbox, not for a site",
                           ", ".join(plain))

        # Every trusted Stora answer's Date is a second source for the clock's floor.
        outbox = build_drainer(self.config, self.store, self.alarm,
                               on_server_date=self.clock.observe_server_time)
        self.ops.outbox = outbox
        outbox.start()
        self._guarded("reconciliation", self.units.reconcile)

        # The periodic jobs (gateway/schedule/jobs.py JOBS) and the watchdog's vitals.
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
        period = watchdog_period()
        stale = period if period is not None else VITAL_STALE_S
        spec = {job.id: job for job in JOBS}
        heartbeat_s = min(spec["watchdog.heartbeat"].interval_s, stale / 3)
        reconcile_stale = max(RECONCILE_STALE_PASSES * spec["units.reconcile"].interval_s,
                              2 * stale)
        # Through self.units at each call: a config.set may rebuild the unit manager.
        probe = PoolProbe(lambda fn: self.units.run_exclusive(PROBE_KEY, fn), stale)

        def refresh_token() -> None:
            try:  # refreshes only when due; a failure is the drainer's to report
                outbox.client.tokens.token()
            except StoraError as exc:
                LOGGER.debug("token refresh ahead of expiry: %s", exc)

        def on_jump(step: float) -> None:
            del step
            # The clock looks at once (a large step forward is an alarm), not only at the
            # next command or status.
            self.clock.now()
            outbox.wake()  # its waits are computed from wall-clock times

        scheduler = SiteScheduler(
            {
                "units.reconcile": self._reconcile_job,
                "telemetry.publish": functools.partial(
                    self._guarded, "telemetry", self.ops.publish_telemetry),
                "clock.persist": functools.partial(
                    self._guarded, "saving the trusted time", self._persist_trusted_time),
                "outbox.wake": outbox.wake,
                "store.prune": functools.partial(self._guarded, "pruning the database",
                                                 self.ops.prune_store),
                "stora.token_refresh": refresh_token,
                "watchdog.heartbeat": probe.probe,
            },
            intervals={"watchdog.heartbeat": heartbeat_s,
                       "telemetry.publish": float(self.config.telemetry.interval_s),
                       **self._job_intervals},
            on_jump=on_jump,
        )
        self.ops.scheduler = scheduler
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

    def _guarded(self, what: str, job: Callable[[], object]) -> None:
        """Run a periodic job; a failure is an alarm, never the end of the agent."""
        try:
            job()
        except Exception as exc:  # a full disk, a driver bug: keep the locks going
            LOGGER.exception("%s failed", what)
            self.alarm("agent_error", None, f"{what} failed: {type(exc).__name__}: {exc}")

    def _persist_trusted_time(self) -> None:
        """The ``clock.persist`` job (and shutdown): :meth:`Operations.persist_trusted_time`."""
        self.ops.persist_trusted_time()

    def stop(self) -> None:
        """Clean shutdown, each step best effort: no new requests, running work finished
        (and its results published), pending relocks done, offline status, ports closed.

        Long technician requests (``test``, ``scan``) are cancelled first: no waiting on
        a test's whole run."""
        self.stop_event.set()
        self.ops.cancel_runs()
        scheduler, control, outbox = self.ops.scheduler, self.control, self.outbox
        steps: list[tuple[str, Callable[[], object] | None]] = [
            # First: no reconciliation pass may queue work behind the units' shutdown.
            # A job running now ends first (a bus read, a token request: bounded).
            ("scheduler", scheduler.stop if scheduler is not None else None),
            ("control socket", control.stop if control is not None else None),
            ("management", self.mgmt.stop),
            ("units", self.units.stop),
            ("outbox", outbox.stop if outbox is not None else None),
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
