"""The ``tasmota`` driver: locks on the relays of Tasmota devices, over MQTT.

One controller is one device (its ``%topic%``); ``point.channel`` 0-based is relay
``POWER<channel+1>``, ``point.door_input`` 0-based is ``Switch<input+1>``.  A strike is
unlocked by a device-timed pulse set before the relay; a maglock's relock is the agent's;
an action is confirmed only by a later ``stat`` report; unsafe device settings refuse
the unlock.

See docs/design/tasmota-driver.md.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, TypeVar

from drivers.base import (
    ActionResult,
    Clock,
    Controller,
    DoorState,
    Health,
    LockPoint,
    LockState,
    Reading,
)
from drivers.errors import (
    DeviceRejectedError,
    DriverError,
    LinkDownError,
    NoReplyError,
    UnsupportedError,
)
from drivers.health import HealthTracker
from drivers.mqtt.settings import BrokerSettings
from drivers.settings import BuildContext, ControllerSettings
from drivers.tasmota import messages as m
from drivers.tasmota.client import DeviceView, Observation, TasmotaClient
from drivers.tasmota.settings import TasmotaSettings

LOGGER = logging.getLogger(__name__)

#: What to check when a Tasmota device does not answer on its topic.
NO_ANSWER_HINT = ("check the controller's topic against the device's Topic setting and "
                  "that the device is connected to this broker")

T = TypeVar("T")

#: ``PowerOnState`` values that are safe for a strike (relays off, or restored with the
#: pulse restarted at boot) and for a maglock (also "on at power-up").
SAFE_POWER_ON_STATES: Final = {"unlock": frozenset({0, 3}), "lock": frozenset({0, 1, 3})}
#: ``SwitchMode`` values that detach a switch from the relays (MQTT messages only).
DETACHED_SWITCH_MODES: Final = frozenset({"15", "16"})


@dataclass(frozen=True, slots=True)
class TasmotaTiming:
    """How long to wait for a device.

    ``reply_timeout_s``: an ESP8266 on Wi-Fi answers a command in tens of milliseconds;
    2 s covers a congested access point and a busy device (a TelePeriod burst), and is
    still short against an unlock of seconds.  ``connect_wait_s``: how long an action
    waits for a broker link that is still being set up.
    """

    reply_timeout_s: float = 2.0
    connect_wait_s: float = 5.0


class TasmotaController(Controller):
    """One Tasmota device (``topic``) with ``channels`` relays and ``inputs`` switches."""

    def __init__(
        self,
        name: str,
        client: TasmotaClient,
        topic: str,
        channels: int = 1,
        inputs: int = 0,
        *,
        timing: TasmotaTiming | None = None,
        clock: Clock = time.monotonic,
        self_relocking: bool = True,
    ) -> None:
        if not 1 <= channels <= m.MAX_RELAYS or not 0 <= inputs <= m.MAX_RELAYS:
            raise ValueError(f"{name}: bad device size ({channels} relays, {inputs} inputs)")
        self.name = name
        self.client = client
        self.topic = m.check_topic(topic)
        self.channels = channels
        self.inputs = inputs
        self.timing = timing or TasmotaTiming()
        self._clock = clock
        self._self_relocking = self_relocking
        self._view: DeviceView = client.attach(topic)
        self._settings_ok: dict[str, int] = {}  # point kind -> epoch its settings passed in
        self._check_lock = threading.Lock()
        self._health = HealthTracker(clock)
        self._closed = False

    @property
    def self_relocking(self) -> bool:
        """True: the device ends an unlock itself (``PulseTime``), strikes only."""
        return self._self_relocking

    # -- actions ---------------------------------------------------------------------------
    def unlock(self, point: LockPoint, seconds: float) -> ActionResult:
        """Unlock for ``seconds``: a device-timed pulse on a strike, relay off on a maglock."""
        self._check_point(point)
        if not seconds > 0:
            raise ValueError(f"unlock time must be positive, got {seconds!r} s")
        relay = point.channel + 1
        with self._health.track():
            self._ready()
            self._check_settings(point)
            if point.energize_to == "unlock":
                try:
                    value = m.pulse_value(seconds)
                except ValueError as exc:
                    raise UnsupportedError(f"{self.name}: {exc}") from exc
                self._set_pulse(relay, value)
                confirmed, reading, attempts, note = self._switch(point, on=True)
                detail = (f"PulseTime{relay} {value} ({m.pulse_seconds(value):g} s): the "
                          f"device relocks by itself{note}")
                return ActionResult(confirmed, reading, detail, True, attempts)
            confirmed, reading, attempts, note = self._switch(point, on=False)
            detail = ("fail-safe lock released by switching its relay off; the agent "
                      f"relocks (a Tasmota pulse can only end an ON){note}")
            return ActionResult(confirmed, reading, detail, False, attempts)

    def lock(self, point: LockPoint) -> ActionResult:
        """Lock now: relay off on a strike (ends a pulse); on a maglock, pulse 0 then ON."""
        self._check_point(point)
        relay = point.channel + 1
        with self._health.track():
            self._ready()
            warning = ""
            if point.energize_to == "lock":
                try:
                    self._set_pulse(relay, 0)
                except DriverError as exc:
                    # Locking is still the right thing to do; but say the device might
                    # release the maglock by itself, and do not call it confirmed.
                    warning = (f"; PulseTime{relay} 0 not confirmed ({exc}): the device may "
                               "release this maglock by itself")
            confirmed, reading, attempts, note = self._switch(
                point, on=point.energize_to == "lock")
            detail = f"POWER{relay} {'ON' if point.energize_to == 'lock' else 'OFF'}{note}"
            return ActionResult(confirmed and not warning, reading, detail + warning, False,
                                attempts)

    def _switch(self, point: LockPoint, *, on: bool) -> tuple[bool, Reading, int, str]:
        """POWER<n> ON/OFF; confirmed by a later stat report (or one query), and why not."""
        relay = point.channel + 1
        view = self._view
        mark = self.client.publish(self.topic, m.power(relay, on))
        heard = self._await(lambda: _after(view.power.get(relay), mark, on))
        attempts = 1
        if heard is None and _after(view.power.get(relay), mark) is None:
            mark = self.client.publish(self.topic, m.power(relay, None))  # ask once
            attempts = 2
            self._await(lambda: _after(view.power.get(relay), mark))
        with self.client.cond:
            obs = _after(view.power.get(relay), mark)
            door = self._cached_door(point)
        if obs is None:
            reading = Reading(LockState.UNKNOWN, door, self._clock())
            return False, reading, attempts, (f"; no report of POWER{relay} from {self.topic} "
                                              "after the command and a query")
        reading = Reading(_lock_state(point, obs.value), door, obs.at)
        confirmed = obs.value == on
        note = "" if confirmed else f"; device reports POWER{relay} {'ON' if obs.value else 'OFF'}"
        return confirmed, reading, attempts, note

    def _set_pulse(self, relay: int, value: int) -> None:
        view = self._view
        mark = self.client.publish(self.topic, m.pulse_time(relay, value))
        obs = self._await(lambda: _after(view.pulse.get(relay), mark))
        if obs is None:
            raise NoReplyError(f"{self.name}: no answer from {self.topic} to PulseTime{relay} "
                               f"{value} within {self.timing.reply_timeout_s:g} s; nothing "
                               f"was switched: {NO_ANSWER_HINT}")
        if obs.value.set != value:
            raise DeviceRejectedError(f"{self.name}: {self.topic} answered PulseTime{relay} "
                                      f"{value} with Set {obs.value.set}; nothing was switched")

    # -- settings that make a lock unsafe ----------------------------------------------------
    def _check_settings(self, point: LockPoint) -> None:
        """Refuse an unlock on a device set up to misbehave.

        Settings that passed are not asked again in the same device session (epoch); a
        refusal is, so a technician's fix counts at the next attempt.
        """
        key = f"{point.energize_to}:{point.door_input}"
        with self._check_lock:
            epoch = self._view.epoch
            if self._settings_ok.get(key) == epoch:
                return
            state = int(self._setting("PowerOnState"))
            if state not in SAFE_POWER_ON_STATES[point.energize_to]:
                what = m.POWER_ON_STATES.get(state, "unknown")
                kind = "strike" if point.energize_to == "unlock" else "maglock"
                want = "0" if point.energize_to == "unlock" else "1"
                raise UnsupportedError(
                    f"{self.name}: {self.topic} has PowerOnState {state} ({what}), unsafe "
                    f"for a {kind}; set PowerOnState {want} on the device (hardware.md)")
            if point.door_input is not None:
                switch = point.door_input + 1
                if self._setting("SetOption114").upper() not in ("ON", "1") and \
                        self._setting(f"SwitchMode{switch}") not in DETACHED_SWITCH_MODES:
                    raise UnsupportedError(
                        f"{self.name}: Switch{switch} (the door contact) on {self.topic} "
                        "still switches a relay: opening the door would toggle a lock. Set "
                        f"SetOption114 1 (or SwitchMode{switch} 15) on the device")
            self._settings_ok[key] = epoch

    def _setting(self, name: str) -> str:
        """Ask the device for one setting (``PowerOnState``, ``SetOption114`` …)."""
        view = self._view
        mark = self.client.publish(self.topic, m.query(name))
        obs = self._await(lambda: _after(view.settings.get(name), mark))
        if obs is None:
            raise NoReplyError(f"{self.name}: no answer from {self.topic} to {name} within "
                               f"{self.timing.reply_timeout_s:g} s: {NO_ANSWER_HINT}")
        return obs.value

    # -- reading -----------------------------------------------------------------------------
    def read(self, point: LockPoint) -> Reading:
        """Query the relay (and the door input) of ``point``."""
        return self.read_many([point])[0]

    def read_many(self, points: Sequence[LockPoint]) -> list[Reading]:
        """Query each relay once and, with door inputs, ``Status 10`` once; all at once."""
        if not points:
            return []
        for point in points:
            self._check_point(point)
        view = self._view
        relays = sorted({p.channel + 1 for p in points})
        doors = any(p.door_input is not None for p in points)
        with self._health.track():
            self._ready()
            marks = {relay: self.client.publish(self.topic, m.power(relay, None))
                     for relay in relays}
            status_mark = self.client.publish(self.topic, m.sensor_status()) if doors else None

            def answered() -> bool:
                return all(_after(view.power.get(r), marks[r]) is not None for r in relays) \
                    and (status_mark is None or view.status_seq > status_mark)

            self._await(lambda: True if answered() else None)
            with self.client.cond:
                missing = [r for r in relays if _after(view.power.get(r), marks[r]) is None]
                if missing:
                    raise NoReplyError(
                        f"{self.name}: no answer from {self.topic} to "
                        f"{', '.join(f'POWER{r}' for r in missing)} within "
                        f"{self.timing.reply_timeout_s:g} s")
                readings = []
                for p in points:
                    obs = view.power[p.channel + 1]
                    door = DoorState.UNKNOWN
                    if p.door_input is not None and status_mark is not None:
                        door = _door(_after(view.switch.get(p.door_input + 1), status_mark))
                    readings.append(Reading(_lock_state(p, obs.value), door, obs.at))
                return readings

    def _cached_door(self, point: LockPoint) -> DoorState:
        """The door as last reported in this device session (called with cond held)."""
        if point.door_input is None:
            return DoorState.UNKNOWN
        obs = self._view.switch.get(point.door_input + 1)
        if obs is None or obs.epoch != self._view.epoch:
            return DoorState.UNKNOWN
        return _door(obs)

    def _await(self, probe: Callable[[], T | None]) -> T | None:
        """Wait up to the reply timeout for ``probe()`` (called under cond) to give a value."""
        found: list[T] = []

        def ready() -> bool:
            value = probe()
            if value is None:
                return False
            found.append(value)
            return True

        self.client.wait_for(ready, self.timing.reply_timeout_s)
        return found[-1] if found else None

    def _ready(self) -> None:
        """Raise unless the broker link is up and the device is not known offline."""
        if self._closed:
            raise LinkDownError(f"{self.name}: controller closed")
        if not self.client.wait_connected(self.timing.connect_wait_s):
            raise LinkDownError(f"{self.name}: {self.client.last_error or 'not connected'}; "
                                f"no connection to the MQTT broker at "
                                f"{self.client.settings.host}:{self.client.settings.port}")
        if self._view.online is False:
            raise LinkDownError(f"{self.name}: device {self.topic} is offline "
                                f"(tele/{self.topic}/LWT = Offline)")

    def _check_point(self, point: LockPoint) -> None:
        if not 0 <= point.channel < self.channels:
            raise UnsupportedError(
                f"{self.name}: channel {point.channel} is not a relay of this "
                f"{self.channels}-relay device (channels are 0-based: POWER1 is channel 0)")
        if point.door_input is not None and not 0 <= point.door_input < self.inputs:
            raise UnsupportedError(
                f"{self.name}: door_input {point.door_input} is not an input of this device "
                f"({self.inputs} inputs, 0-based: Switch1 is input 0)")

    # -- health ------------------------------------------------------------------------------
    def health(self) -> Health:
        """Link, LWT and the last exchange, as last observed (no I/O)."""
        h = self._health
        connected = self.client.connected
        lwt = self._view.online
        online = connected and lwt is not False and h.last_ok_at is not None \
            and h.failures == 0
        if not connected:
            detail = f"broker link down ({self.client.last_error or 'connecting'})"
        elif lwt is False:
            detail = f"device offline (tele/{self.topic}/LWT = Offline)"
        elif h.last_error:
            detail = h.last_error if not online else f"answering; {h.last_error}"
        elif h.last_ok_at is None:
            detail = "not yet contacted"
        else:
            detail = "ok"
        return h.health(online, detail)

    def probe(self) -> Health:
        """Query relay 1 once and return the resulting health."""
        try:
            self.read(LockPoint(channel=0))
        except DriverError as exc:
            LOGGER.debug("%s: probe failed: %s", self.name, exc)
        return self.health()

    def close(self) -> None:
        """Stop listening to this device (the last one stops the shared client)."""
        if not self._closed:
            self._closed = True
            self.client.detach(self.topic)


def _after(obs: Observation[T] | None, mark: int, value: object = None) -> Observation[T] | None:
    """``obs`` if it came after ``mark`` (and holds ``value``, when given)."""
    if obs is None or obs.seq <= mark:
        return None
    if value is not None and obs.value != value:
        return None
    return obs


def _lock_state(point: LockPoint, energized: bool) -> LockState:
    unlocked = energized if point.energize_to == "unlock" else not energized
    return LockState.UNLOCKED if unlocked else LockState.LOCKED


def _door(obs: Observation[bool] | None) -> DoorState:
    if obs is None:
        return DoorState.UNKNOWN
    return DoorState.CLOSED if obs.value else DoorState.OPEN


def build(settings: ControllerSettings, ctx: BuildContext) -> Controller:
    """A device (:mod:`drivers.registry`): one MQTT connection (and account) per broker,
    shared by its devices.

    The device relocks a strike by itself (``PulseTime``), not a maglock:
    ``self_relocking`` says whether any lock on it is a strike.
    """
    assert isinstance(settings, TasmotaSettings)
    broker: BrokerSettings = ctx.broker("tasmota")
    key = ("tasmota", f"{broker.where}:{broker.username or ''}")
    if key not in ctx.shared:
        ctx.shared[key] = TasmotaClient(broker)
    client = ctx.shared[key]
    assert isinstance(client, TasmotaClient)
    return TasmotaController(ctx.name, client, settings.topic or "", settings.channels,
                             settings.inputs, self_relocking=not ctx.points or any(
                                 p.energize_to == "unlock" for p in ctx.points))
