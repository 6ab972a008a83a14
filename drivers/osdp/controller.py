"""The ``osdp`` driver: one OSDP peripheral (PD) driven by libosdp's control panel (CP).

One output per lock, one input per door contact; every unlock is a PD-timed output, so
the PD relocks by itself.  Lock and door state come only from the PD's status reports;
Secure Channel is required unless ``allow_insecure``; tamper and power reports become
``notices()``.

See docs/design/osdp-driver.md.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from drivers.base import (
    ActionResult,
    Clock,
    Controller,
    DoorState,
    Health,
    LockPoint,
    LockState,
    Notice,
    Reading,
)
from drivers.errors import LinkDownError, TechnicianError, UnsupportedError
from drivers.health import HealthTracker
from drivers.link import SerialFactory, open_serial
from drivers.osdp.channel import SerialChannel
from drivers.osdp.settings import (
    MAX_ADDRESS,
    SCBK_D,
    OsdpSettings,
    OsdpTiming,
    ScbkError,
    load_scbk,
)
from drivers.settings import BuildContext, BuildRefusedError, ControllerSettings

LOGGER = logging.getLogger(__name__)

#: OSDP output timers count 100 ms units (OSDP 2.2 §6.7).
TIMER_UNIT_S = 0.1
#: The longest timer libosdp 3.2.9's Python binding can send: it truncates
#: ``timer_count`` to 8 bits (the wire field has 16).  Longer unlocks are renewed.
MAX_TIMER_UNITS = 255
# OSDP 2.2 §6.7 output control codes.
PERM_OFF_ABORT = 1
PERM_ON_ABORT = 2
PERM_OFF_ALLOW_TIMED = 3
PERM_ON_ALLOW_TIMED = 4
TEMP_ON = 5
TEMP_OFF = 6


@dataclass(slots=True)
class _Renewal:
    """A timed output longer than one timer: re-sent until ``end_at``."""

    output: int
    code: int
    end_at: float
    window_end: float


class OsdpController(Controller):
    """One OSDP peripheral on its own serial port, driven by a libosdp control panel."""

    def __init__(  # noqa: PLR0917 - same order as the other drivers
        self,
        name: str,
        url: str,
        baudrate: int,
        address: int,
        channels: int = 4,
        inputs: int = 4,
        *,
        scbk: bytes | None = None,
        scbk_error: str | None = None,
        allow_insecure: bool = False,
        timing: OsdpTiming | None = None,
        factory: SerialFactory = open_serial,
        clock: Clock = time.monotonic,
        channel: Any = None,
    ) -> None:
        if not 0 <= address <= MAX_ADDRESS:
            raise ValueError(f"{name}: OSDP address must be 0-{MAX_ADDRESS}, got {address}")
        self.name = name
        self.address = address
        self.channels = channels
        self.inputs = inputs
        self.allow_insecure = allow_insecure
        self.timing = timing or OsdpTiming()
        self._clock = clock
        self.channel = channel or SerialChannel(url, baudrate, factory=factory, clock=clock)
        self._scbk: bytes | None = None
        #: Why this PD is refused before any byte is sent (None: not refused by config).
        self.refusal: str | None = None
        if allow_insecure:
            if scbk is not None or scbk_error is not None:
                LOGGER.warning(
                    "%s: allow_insecure = true: the PD is driven without Secure Channel "
                    "and scbk_file is not used", name)
        elif scbk_error is not None:
            self.refusal = f"refused: {scbk_error}"
        elif scbk is None:
            self.refusal = ("refused: Secure Channel is required and no scbk_file is set "
                            "(or set allow_insecure = true, not recommended)")
        elif scbk == SCBK_D:
            self.refusal = ("refused: scbk_file holds the default install key SCBK-D, "
                            "which is public; provision a random key (hardware.md, osdp)")
        else:
            self._scbk = scbk
        if self.refusal:
            LOGGER.error("%s: %s", name, self.refusal)
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._cp: Any = None
        self._osdp: Any = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        # What the PD last reported (None: nothing since it came online).
        self._outputs: list[bool] | None = None
        self._inputs: list[bool] | None = None
        self._out_seq = 0
        self._in_seq = 0
        self.tamper: bool | None = None
        self.power_failure: bool | None = None
        self._online = False
        self._sc_active = False
        self._health = HealthTracker(clock)
        self._retry_s = self.timing.retry_initial_s
        self._next_retry_at = 0.0
        self._opens_seen = 0
        self._reenable = False
        self._link_lost = False
        self._renewals: dict[int, _Renewal] = {}
        self._notices: list[Notice] = []
        self._attempt_until = 0.0
        self._online_since = 0.0
        self._attempt_failed = False
        #: Commands this driver submitted while Secure Channel was not active.
        self.commands_sent_clear = 0
        self.commands_sent = 0

    # -- lifecycle -----------------------------------------------------------------------
    def _ensure_started(self) -> None:
        """Create the CP and its refresh thread on first use (never for a refused PD)."""
        with self._lock:  # the agent's reconciliation and a command may race here
            if self.refusal is None and self._cp is None and not self._stop.is_set():
                self._start()

    def _start(self) -> None:
        import osdp  # lazy: only sites with OSDP readers load libosdp
        import osdp_sys

        self._osdp = osdp
        flags = [osdp.LibFlag.EnableNotification]
        if not self.allow_insecure:
            flags.append(osdp.LibFlag.EnforceSecure)
        info = osdp.PDInfo(self.address, self.channel, scbk=self._scbk, flags=flags,
                           name=self.name)
        level = osdp.LogLevel.Debug if LOGGER.isEnabledFor(logging.DEBUG) else \
            osdp.LogLevel.Error
        osdp_sys.set_loglevel(level)
        # The C object, not the osdp.ControlPanel wrapper: the wrapper queues every
        # event forever for get_event() and runs a non-daemon thread.
        cp = osdp_sys.ControlPanel([info.get()])
        cp.set_event_callback(self._on_event)
        self._cp = cp
        self._begin_attempt()
        self._next_retry_at = self._clock() + self.timing.retry_initial_s
        self._thread = threading.Thread(target=self._run, name=f"osdp-{self.name}",
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop polling and release the port (the PD ends any timed unlock itself)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2)
        with self._lock:
            self._cp = None
        self.channel.close()

    # -- the refresh thread --------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with self._lock:
                    if self._cp is None:
                        return
                    self._cp.refresh()
                    self._after_refresh()
            except Exception:  # the thread must outlive a bug in one round
                LOGGER.exception("%s: OSDP refresh failed", self.name)
            self._stop.wait(self.timing.refresh_s)

    def _after_refresh(self) -> None:
        cp = self._cp
        online = bool(cp.status() & 1)
        sc_active = bool(cp.sc_status() & 1)
        now = self._clock()
        if online != self._online or sc_active != self._sc_active:
            self._state_changed(online, sc_active, now)
        if self._reenable:
            # libosdp acts on disable_pd() in its next refresh; enabling in the same one
            # is a no-op that leaves the PD disabled.
            self._reenable = False
            cp.enable_pd(0)
            self._begin_attempt()
            return
        if self._watch_port(now):
            return
        if online:
            self._health.last_ok_at = now
            self._renew(now)
        elif now >= self._next_retry_at:
            # libosdp would wait 300 s after a failed session; start a new one sooner.
            self._new_session(now)

    def _watch_port(self, now: float) -> bool:
        """Follow the port: lost means unknown at once; back means a new session."""
        if self.channel.last_error is not None and not self.channel.reopen_if_due():
            if not self._link_lost:
                # libosdp would notice only after ~8 s of unanswered polls.
                self._link_lost = True
                self._health.failed(self.channel.last_error)
                self._forget()
                self._changed.notify_all()
            return True
        opens = self.channel.opens
        if opens != self._opens_seen:
            reopened = self._opens_seen > 0
            self._opens_seen = opens
            if reopened or self._link_lost:
                # The PD may have changed meanwhile and will not report it: a new
                # session makes it report everything (and re-keys Secure Channel).
                self._link_lost = False
                self._retry_s = self.timing.retry_initial_s
                self._new_session(now)
                return True
        return False

    def _new_session(self, now: float) -> None:
        self._cp.disable_pd(0)
        self._reenable = True
        self._next_retry_at = now + self._retry_s
        self._retry_s = min(self._retry_s * 2, self.timing.retry_max_s)

    def _forget(self) -> None:
        """Drop what the PD reported: it says nothing about the door any more."""
        self._outputs = self._inputs = None
        self.tamper = self.power_failure = None
        self._renewals.clear()

    def _begin_attempt(self) -> None:
        self._attempt_until = self._clock() + self.timing.attempt_s
        self._attempt_failed = False

    def _connecting(self) -> bool:
        """True while a session attempt is under way (not online, not failed yet)."""
        return (self._cp is not None and not self._online and not self._attempt_failed
                and self._clock() < self._attempt_until)

    def _state_changed(self, online: bool, sc_active: bool, now: float) -> None:
        if online and not self._online:
            self._online_since = now
            LOGGER.info("%s: PD online %s Secure Channel", self.name,
                        "with" if sc_active else "WITHOUT")
            self._retry_s = self.timing.retry_initial_s
            self._health.cleared()
        elif self._online and not online:
            LOGGER.warning("%s: PD offline", self.name)
            self._health.failed(self._offline_reason())
        if not online:
            self._forget()
        self._online = online
        self._sc_active = sc_active
        self._changed.notify_all()

    def _on_event(self, pd: int, event: dict[str, Any]) -> int:
        """libosdp's event callback (inside ``refresh()``, so under ``_lock``)."""
        del pd
        try:
            kind = event.get("event")
            if kind == self._osdp.Event.Status:
                self._on_status(int(event["type"]), bytes(event.get("report", b"")))
            elif (kind == self._osdp.Event.Notification
                  and event.get("type") == self._osdp.EventNotification.PeripheralDeviceStatus
                  and not event.get("arg0")):
                # libosdp gave up on this session (refused, or no reply).
                self._attempt_failed = True
                self._changed.notify_all()
        except Exception:  # never let an exception into libosdp's C code
            LOGGER.exception("%s: bad OSDP event %r", self.name, event)
        return 0

    def _on_status(self, kind: int, report: bytes) -> None:
        types = self._osdp.StatusReportType
        bits = [b != 0 for b in report]
        if kind == types.Output:
            self._outputs = bits
            self._out_seq += 1
        elif kind == types.Input:
            self._inputs = bits
            self._in_seq += 1
        elif kind == types.Local and len(bits) >= 2:
            if bits[0] and not self.tamper:
                LOGGER.warning("%s: PD reports tamper", self.name)
                self._notices.append(Notice("tamper", "the PD reports its tamper switch open"))
            if bits[1] and not self.power_failure:
                LOGGER.warning("%s: PD reports a power failure", self.name)
                self._notices.append(Notice("power_failure", "the PD reports a power failure"))
            self.tamper, self.power_failure = bits[0], bits[1]
        LOGGER.debug("%s: status report type %d: %s", self.name, kind, report.hex())
        self._changed.notify_all()

    def _renew(self, now: float) -> None:
        for output, r in list(self._renewals.items()):
            if now >= r.end_at:
                del self._renewals[output]
            elif r.window_end - now <= self.timing.renew_lead_s:
                units = _timer_units(r.end_at - now)
                if self._submit(output, r.code, units):
                    r.window_end = now + units * TIMER_UNIT_S
                    if r.window_end >= r.end_at - TIMER_UNIT_S:
                        del self._renewals[output]

    # -- commands ------------------------------------------------------------------------
    def _usable(self) -> bool:
        return (self._online and not self._link_lost
                and (self._sc_active or self.allow_insecure))

    def _check_usable(self) -> None:
        if self.refusal is not None:
            raise TechnicianError(f"{self.name}: {self.refusal}")
        if self._connecting():
            self._changed.wait_for(lambda: self._usable() or not self._connecting(),
                                   max(0.0, self._attempt_until - self._clock()))
        if not self._usable():
            reason = self._offline_reason()
            if reason.startswith("refused"):  # a person must fix the PD or its key
                raise TechnicianError(f"{self.name}: {reason}")
            raise LinkDownError(f"{self.name}: {reason}")
        first_report_by = self._online_since + self.timing.attempt_s
        if self._outputs is None and self._clock() < first_report_by:
            # A new session: the PD's first reports follow within a few polls.
            self._changed.wait_for(lambda: self._outputs is not None or not self._usable(),
                                   max(0.0, first_report_by - self._clock()))

    def _submit(self, output: int, code: int, units: int = 0) -> bool:
        if not self._sc_active:
            if not self.allow_insecure:  # never reached: _check_usable guards it
                raise TechnicianError(f"{self.name}: refusing to send in the clear")
            self.commands_sent_clear += 1
        self.commands_sent += 1
        ok = bool(self._cp.submit_command(0, {
            "command": self._osdp.Command.Output, "output_no": output,
            "control_code": code, "timer_count": units}))
        LOGGER.debug("%s: output %d code %d timer %d: %s", self.name, output, code, units,
                     "queued" if ok else "refused by libosdp")
        return ok

    def _act(self, point: LockPoint, codes: list[tuple[int, int]], want_on: bool,
             ) -> tuple[bool, Reading]:
        """Send ``codes`` to the point's output; wait for a report showing ``want_on``."""
        ch = point.channel
        seq0 = self._out_seq
        for code, units in codes:
            if not self._submit(ch, code, units):
                raise LinkDownError(f"{self.name}: libosdp refused the command "
                                    "(PD offline or command queue full)")
        deadline = self._clock() + self.timing.confirm_s

        def reported() -> bool:
            outs = self._outputs
            return (not self._usable() or (self._out_seq > seq0 and outs is not None
                                           and len(outs) > ch and outs[ch] == want_on))

        while not reported():
            remaining = deadline - self._clock()
            if remaining <= 0:
                break
            self._changed.wait(remaining)
        confirmed = self._usable() and reported()
        if not confirmed and self._cp is not None:
            # Never let a late command open a door after we said it failed.
            self._cp.flush_commands(0)
        return confirmed, self._reading(point)

    def unlock(self, point: LockPoint, seconds: float) -> ActionResult:
        """Unlock for ``seconds`` with a PD-timed output; the PD relocks by itself."""
        self._check_point(point)
        if not seconds > 0:
            raise ValueError(f"unlock time must be positive, got {seconds!r} s")
        self._ensure_started()
        with self._lock:
            self._check_usable()
            units = _timer_units(seconds)
            fail_secure = point.energize_to == "unlock"
            perm, temp = ((PERM_OFF_ALLOW_TIMED, TEMP_ON) if fail_secure
                          else (PERM_ON_ALLOW_TIMED, TEMP_OFF))
            # The PD starts its timer a poll or two after this; counting from here keeps
            # renewals early rather than late.
            now = self._clock()
            confirmed, reading = self._act(point, [(perm, 0), (temp, units)],
                                           want_on=fail_secure)
            window = units * TIMER_UNIT_S
            detail = f"PD-timed output for {window:.1f} s; the PD relocks"
            if seconds > window + TIMER_UNIT_S / 2:
                self._renewals[point.channel] = _Renewal(point.channel, temp,
                                                         now + seconds, now + window)
                detail += (f" (renewed every {window:.1f} s up to {seconds:g} s; if the "
                           f"gateway stops, within {window:.1f} s)")
            if not confirmed:
                self._renewals.pop(point.channel, None)
                detail += "; no status report from the PD confirmed it"
                self._health.failed(detail)
            else:
                self._health.succeeded()
        return ActionResult(confirmed, reading, detail, True, 1)

    def lock(self, point: LockPoint) -> ActionResult:
        """Lock now: the permanent locked state, aborting any timer."""
        self._check_point(point)
        self._ensure_started()
        with self._lock:
            self._check_usable()
            self._renewals.pop(point.channel, None)
            fail_secure = point.energize_to == "unlock"
            code = PERM_OFF_ABORT if fail_secure else PERM_ON_ABORT
            confirmed, reading = self._act(point, [(code, 0)], want_on=not fail_secure)
            detail = "output set" if confirmed else "no status report from the PD confirmed it"
            if confirmed:
                self._health.succeeded()
            else:
                self._health.failed(detail)
        return ActionResult(confirmed, reading, detail, False, 1)

    # -- reading -------------------------------------------------------------------------
    def read(self, point: LockPoint) -> Reading:
        """The point's state as the PD last reported it in this session."""
        self._check_point(point)
        self._ensure_started()
        with self._lock:
            self._check_usable()
            return self._reading(point)

    def _reading(self, point: LockPoint) -> Reading:
        at = self._clock()
        if not self._usable():
            return Reading(LockState.UNKNOWN, DoorState.UNKNOWN, at)
        outs, ins = self._outputs, self._inputs
        lock = LockState.UNKNOWN
        if outs is not None and point.channel < len(outs):
            unlocked = outs[point.channel] == (point.energize_to == "unlock")
            lock = LockState.UNLOCKED if unlocked else LockState.LOCKED
        door = DoorState.UNKNOWN
        if point.door_input is not None and ins is not None and point.door_input < len(ins):
            door = DoorState.OPEN if ins[point.door_input] else DoorState.CLOSED
        return Reading(lock, door, at)

    def _check_point(self, point: LockPoint) -> None:
        if not 0 <= point.channel < self.channels:
            raise UnsupportedError(
                f"{self.name}: channel {point.channel} is not an output of this PD "
                f"({self.channels} outputs, 0-based)")
        if point.door_input is not None and not 0 <= point.door_input < self.inputs:
            raise UnsupportedError(
                f"{self.name}: door_input {point.door_input} is not an input of this PD "
                f"({self.inputs} inputs, 0-based)")
        if point.status_input is not None:
            raise UnsupportedError(f"{self.name}: the osdp driver has no status_input")

    # -- health --------------------------------------------------------------------------
    def _offline_reason(self) -> str:
        if self.refusal is not None:
            return self.refusal
        if self.channel.last_error:
            return str(self.channel.last_error)
        if self._online and not self._sc_active and not self.allow_insecure:
            return "refused: online without Secure Channel"
        heard = self.channel.last_rx_at
        recent = heard is not None and self._clock() - heard < 2.0
        if self._cp is None:
            return "not yet contacted"
        if self._connecting():
            return "connecting to the PD"
        if not recent:
            return (f"no reply from the PD at address {self.address}: check the address, "
                    "A/B polarity, baud rate")
        if self.allow_insecure:
            return "the PD answers but does not come online"
        level, _ = self._cp.check_capability(0, self._osdp.Capability.CommunicationSecurity)
        if level == 0:
            return ("refused: the PD offers no Secure Channel (allow_insecure = true "
                    "would accept it, in the clear)")
        return ("refused: the Secure Channel handshake failed: the PD does not hold the "
                "key in scbk_file (a PD still in install mode knows only SCBK-D)")

    def health(self) -> Health:
        """The PD's health as last observed (no I/O)."""
        with self._lock:
            h = self._health
            online = self.refusal is None and self._usable()
            if online:
                detail = "ok, Secure Channel active" if self._sc_active else \
                    "ok, WITHOUT Secure Channel (allow_insecure = true)"
                if h.last_error:
                    detail += f"; {h.last_error}"
            else:
                detail = self._offline_reason()
            if self.tamper:
                detail += "; PD reports TAMPER"
            if self.power_failure:
                detail += "; PD reports POWER FAILURE"
            last_error = None if online and not h.last_error else (h.last_error or detail)
            return Health(online, detail, last_error, h.last_ok_at, h.failures)

    def probe(self) -> Health:
        """Start talking to the PD if needed; wait briefly for it to come online."""
        self._ensure_started()
        if self.refusal is None:
            with self._lock:
                # Online, and the PD's first report in (it follows within a few polls).
                self._changed.wait_for(lambda: self._usable() and self._outputs is not None,
                                       self.timing.probe_s)
        return self.health()

    def notices(self) -> list[Notice]:
        """Tamper and power-failure reports of the PD since the last call."""
        with self._lock:
            notices, self._notices = self._notices, []
        return notices

    @property
    def self_relocking(self) -> bool:
        """True: every unlock is a PD-timed output."""
        return True

    def wait_online(self, timeout: float) -> bool:
        """Start if needed and wait until the PD can be driven (for tests and the CLI)."""
        self._ensure_started()
        with self._lock:
            return self._changed.wait_for(self._usable, timeout)


def _timer_units(seconds: float) -> int:
    """``seconds`` in 100 ms timer units, at least 1, at most what libosdp can send."""
    return max(1, min(MAX_TIMER_UNITS, round(seconds / TIMER_UNIT_S)))



def build(settings: ControllerSettings, ctx: BuildContext) -> Controller:
    """A PD on its port (:mod:`drivers.registry`): libosdp's control panel, one PD a port.

    The key file is read here (the config only checks its permissions); a bad one gives
    a controller that refuses to drive the PD and says why in its health.  libosdp owns
    the wire, so the OSDP channel opens the port itself (``ctx.bus`` is not used).
    """
    assert isinstance(settings, OsdpSettings)
    if ("osdp", settings.port) in ctx.shared:
        raise BuildRefusedError(
            f"controller {ctx.name!r}: port {settings.port} already has an OSDP peripheral; "
            "this version drives one PD per port")
    ctx.shared[("osdp", settings.port)] = ctx.name
    scbk, error = None, None
    if settings.scbk_file is not None and not settings.allow_insecure:
        try:
            scbk = load_scbk(settings.scbk_file)
        except ScbkError as exc:
            error = str(exc)
    return OsdpController(ctx.name, settings.port, settings.baudrate, settings.address,
                          channels=settings.channels, inputs=settings.inputs, scbk=scbk,
                          scbk_error=error, allow_insecure=settings.allow_insecure)
