"""The operations service: what the running gateway does, for whoever asks.

One :class:`Operations` per agent, built by the agent (the composition root,
gateway/agent.py) over its parts, and used by both ways in: the local control socket
(gateway/ops/routes.py) and remote management (gateway/intake/mgmt.py, through its
``ManagementHost`` interface).  Neither imports the agent.  See docs/design/agent.md.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import math
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

from gateway import __version__
from gateway.clock import SERVER_TIME_PROBE_S, TrustedClock
from gateway.config import Config
from gateway.intake.mgmt import Management, RequestError
from gateway.intake.screen import TokenBucket
from gateway.link.message import Message
from gateway.link.mqtt import MqttLink
from gateway.ops.command_path import CommandPath
from gateway.ops.control_wire import ControlError
from gateway.ops.health import assess
from gateway.ops.lookup import TEST_RELOCK_TIMEOUT, TEST_SECONDS, check_test_timing
from gateway.ops.storage import Alarm, prune_store
from gateway.ops.telemetry import (
    broker_status,
    host_status,
    last_delivered_at,
    newest_dead_letter,
    render_prometheus,
    schedule_status,
    write_textfile,
)
from gateway.outbox.drainer import Drainer
from gateway.schedule import SiteScheduler
from gateway.store import Store, StoreError
from gateway.units.hardware import Site
from gateway.units.manager import UnitManager
from sitelink.codes import Reason, Status
from sitelink.payloads import rfc3339
from sitelink.topics import Topics

if TYPE_CHECKING:
    from gateway.ops.runs import TechnicianRuns

__all__ = ["OUTBOX_LIST_MAX", "TECHNICIAN_RUNS", "Operations"]

LOGGER = logging.getLogger(__name__)

#: ``outbox.list`` returns at most this many rows of each state by default.
OUTBOX_LIST_MAX: Final = 100

#: **The operations service's lazy seam.**  What only a technician's request runs
#: (``test``, ``scan``, ``locks``: gateway/ops/runs.py and the test cycle of
#: gateway/ops/technician.py) is named here as ``"module:attribute"`` and imported by
#: :attr:`Operations.runs` on the first such request, not when the agent starts: an agent
#: that is never asked keeps neither module (about 130 KB; bench/agent_footprint.py).
#: The module behind it imports everything at its top as usual, so mypy sees it, and
#: tests/gateway/ops/test_lazy_runs.py checks that this names the class it says.
TECHNICIAN_RUNS: Final = "gateway.ops.runs:TechnicianRuns"


class Operations:
    """Status, locks, tests, scans, the outbox, the configuration and the command path
    of one running gateway.

    ``config`` is the live configuration (a ``config.set`` replaces it); ``outbox`` and
    ``scheduler`` are set by the agent when it starts them.
    """

    def __init__(self, config: Config, *, topics: Topics, store: Store,
                 clock: TrustedClock, site: Site, units: UnitManager, link: MqttLink,
                 alarm: Alarm, stopping: threading.Event, started_at: float,
                 rejections: TokenBucket) -> None:
        self.config = config
        self.topics = topics
        self.store = store
        self.clock = clock
        self.site = site
        self.units = units
        self.link = link
        self.stop_event = stopping
        self.started_at = started_at
        self.rejections = rejections
        self._alarm = alarm
        self.outbox: Drainer | None = None
        self.scheduler: SiteScheduler | None = None
        self.mgmt: Management | None = None
        #: Set (with the reason) when the agent must stop and be started again, e.g. a
        #: config.set that changed [mqtt]; run_agent exits with RESTART_EXIT_STATUS.
        self.restart_reason: str | None = None
        self.commands = CommandPath(config, clock=clock, store=store, units=units,
                                    link=link, topics=topics, rejections=rejections,
                                    stopping=stopping)
        self._runs: TechnicianRuns | None = None  # on the first technician request
        self._runs_made = threading.Lock()
        # Held by every message while it is handled and by apply_config while it swaps
        # parts: a message waits in the link's inbox (unacknowledged) during a swap.
        self._intake = threading.Lock()
        self._server_time_asked_at = -math.inf  # monotonic; see _confirm_clock

    @property
    def runs(self) -> TechnicianRuns:
        """A technician's ``test``, ``scan`` and ``locks``, made (and their module
        imported, :data:`TECHNICIAN_RUNS`) on first use."""
        with self._runs_made:
            if self._runs is None:
                module, _, name = TECHNICIAN_RUNS.partition(":")
                make: type[TechnicianRuns] = getattr(importlib.import_module(module), name)
                self._runs = make(config=lambda: self.config, store=self.store,
                                  units=self.units, site=self.site, clock=self.clock,
                                  stopping=self.stop_event)
            return self._runs

    def cancel_runs(self) -> None:
        """The agent is stopping: cancel every running technician request (none when
        none was ever made)."""
        with self._runs_made:
            runs = self._runs
        if runs is not None:
            runs.cancel_all()

    def alarm(self, kind: str, unit: str | None, detail: str) -> None:
        """Publish an alarm (the agent's ``alarm``)."""
        self._alarm(kind, unit, detail)

    # -- the way in from the broker ---------------------------------------------------------
    def on_message(self, message: Message) -> None:
        """A message on ``P/S/cmd`` or ``P/S/mgmt`` (the link's worker thread)."""
        with self._intake:
            if message.topic != self.topics.mgmt:
                self.commands.on_command(message)
            elif self.mgmt is not None:  # never a request to the command verifier
                self.mgmt.on_message(message)

    def recover(self) -> None:
        """After a crash: see :meth:`CommandPath.recover`."""
        self.commands.recover()

    def retry_held(self) -> None:
        """Run the commands held at start for an untrusted clock, once it is trusted (a
        periodic job; cheap when there are none)."""
        if self.commands.held and self.clock.trusted()[0]:
            with self._intake:  # not beside a live copy of the same command
                self.commands.run_held()

    # -- status and telemetry ---------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """Everything ``status`` shows; also the retained ``P/S/status`` payload.

        ``online`` and ``version`` come first (contract §4), then the site's ``verdict``
        and its ``reasons`` (gateway/ops/health.py).  A part that cannot be read (the
        database failing) says so under ``error`` instead of failing the report.  Every
        instant is RFC 3339 UTC; numbers are counts, sizes or durations named ``*_s``
        (a monotonic instant means nothing outside this process).
        """
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
        commands = self.commands
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
            "commands": {**commands.counters,
                         "rejected_by_reason": dict(commands.rejected_by_reason),
                         "trusted_keys": sorted(self.config.commands.trusted_keys)},
            "management": dict(self.mgmt.counters) if self.mgmt is not None else {},
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

    def birth(self) -> bytes:
        """The status as the link's birth message (a minimal one if a probe fails)."""
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
        payload = self.birth()
        self.link.publish(self.topics.status, payload, qos=1, retain=True)
        textfile = self.config.telemetry.prometheus_textfile
        if textfile is None:
            return
        try:
            write_textfile(textfile, render_prometheus(json.loads(payload)))
        except (OSError, ValueError) as exc:
            LOGGER.warning("cannot write the Prometheus textfile %s: %s", textfile, exc)

    def republish_state(self) -> None:
        """Every unit's retained state and the status, published again."""
        self.units.republish()
        self.publish_telemetry()

    # -- technician requests ----------------------------------------------------------------
    def locks(self) -> list[dict[str, Any]]:
        """Every lock's read-back state and lockout (``locks``)."""
        rows = self.runs.locks()
        return [{"unit": r.unit, "reference": r.reference, "controller": r.controller,
                 "locked": r.locked, "door": r.door,
                 "lockout": self.store.unit(r.unit).lockout, "error": r.error} for r in rows]

    def test(self, params: Mapping[str, Any], actor: str) -> dict[str, Any]:
        """The technician's test (gateway/ops/runs.py); :class:`ControlError` if refused."""
        return self.runs.test(params, actor)

    def scan(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """``scan`` on the agent's own bus (gateway/ops/runs.py)."""
        return self.runs.scan(params)

    def outbox_list(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The outbox's summary and its pending and dead events (``outbox``)."""
        limit = params.get("limit", OUTBOX_LIST_MAX)
        if not isinstance(limit, int) or isinstance(limit, bool) or not 0 < limit <= 10_000:
            raise ControlError("limit must be an integer from 1 to 10000", 2)
        dead_only = bool(params.get("dead"))
        rows = self.store.events(state="dead", limit=limit)
        if not dead_only:
            rows = self.store.events(state="pending", limit=limit) + rows
        return {"summary": self._outbox_status(), "events": [r.as_dict() for r in rows]}

    def outbox_retry(self, params: Mapping[str, Any], actor: str) -> dict[str, Any]:
        """Dead-lettered events sent again: ``seq`` or ``all_dead``."""
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

    # -- the same, for a management request (gateway/intake/mgmt.py) -------------------------
    def remote_locks_test(self, params: Mapping[str, Any], actor: str) -> dict[str, Any]:
        """``locks.test``: :meth:`test`.  Timings out of bounds are ``malformed``; a
        refusal of the test itself (a unit that is not configured) ``unknown_unit``."""
        try:
            for name, bounds in (("seconds", TEST_SECONDS),
                                 ("relock_timeout", TEST_RELOCK_TIMEOUT)):
                check_test_timing(name, params.get(name), bounds)
        except ValueError as exc:
            raise RequestError(Status.REJECTED, Reason.MALFORMED, str(exc)) from None
        try:
            return self.test(params, actor)
        except ControlError as exc:
            raise RequestError(Status.REJECTED, Reason.UNKNOWN_UNIT, str(exc)) from None

    def remote_outbox_retry(self, params: Mapping[str, Any], actor: str) -> dict[str, Any]:
        """``outbox.retry``: :meth:`outbox_retry`, a refusal being ``malformed``."""
        try:
            return self.outbox_retry(params, actor)
        except ControlError as exc:
            raise RequestError(Status.REJECTED, Reason.MALFORMED, str(exc)) from None

    # -- the clock and the store ------------------------------------------------------------
    def persist_trusted_time(self) -> None:
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
        (gateway/clock/ ``TrustedClock.reset_floor``)."""
        return self.clock.reset_floor(actor)

    def prune_store(self) -> dict[str, int] | None:
        """The ``store.prune`` job (gateway/ops/storage.py :func:`prune_store`)."""
        return prune_store(self.store, self.clock, self.config.commands, self.stop_event)

    # -- configuration ----------------------------------------------------------------------
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
            self.commands.reconfigure(new)  # verdicts under the old keys and rules go
            self.units.config = new  # the same locks; its late-command skew may change
            if self.mgmt is not None:
                self.mgmt.reconfigure()
        if ("telemetry" in changed and self.scheduler is not None
                and old.telemetry.interval_s != new.telemetry.interval_s):
            self.scheduler.reschedule("telemetry.publish", float(new.telemetry.interval_s))
        LOGGER.warning("configuration applied live: %s changed", ", ".join(changed))
        return changed, "live"

    def _changed_sections(self, new: Config) -> list[str]:
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
