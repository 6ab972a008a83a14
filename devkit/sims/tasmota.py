"""A simulated Tasmota device on a real MQTT broker, built from the driver's message code.

:class:`TasmotaDevice` is the device model (relays, pulse timers, switches, settings)
and answers commands the way Tasmota's firmware does (``support_command.ino``,
``support_tasmota.ino``):

* ``POWER<n> ON|OFF|TOGGLE`` switches relay *n* and reports it on ``stat/<t>/RESULT``
  (``{"POWER<n>":"ON"}``) and ``stat/<t>/POWER<n>`` (``ON``); an empty payload only
  reports.  Switching a relay on, from any source (a command, the button, a switch),
  (re)starts its pulse when ``PulseTime<n>`` is set; switching it off stops the pulse.
* ``PulseTime<n> <v>`` stores the pulse and (re)starts a running one from now, like
  ``SetPulseTimer``; the answer is ``{"PulseTime<n>":{"Set":v,"Remaining":r}}``.
* ``Status 10`` answers ``stat/<t>/STATUS10`` ``{"StatusSNS":{"Time":…,"Switch1":"ON"}}``.
* ``PowerOnState``, ``SetOption114``, ``SwitchMode<n>`` answer their value; anything else
  ``{"Command":"Unknown"}``.
* A switch change publishes ``{"Switch<n>":{"Action":"ON"}}`` with ``SetOption114 1``,
  ``tele/<t>/SENSOR`` with ``SwitchMode 15``, and otherwise toggles the relay of the
  same number, Tasmota's default (and why the driver refuses such a door input).

:class:`TasmotaSim` puts a device on a broker: last will ``tele/<t>/LWT`` = ``Offline``
(retained), ``Online`` retained once connected, all relay states published at "boot".
Fault switches (change them while it runs): ``silent`` (connected, hears nothing),
``drop_commands`` (``POWER`` changes are lost; queries still answered),
``report_delay_s`` (every publication that late, in order), and :meth:`set_offline`
(the session ends with its will, as when the device loses Wi-Fi or power).
``loop_sleep_s`` models Tasmota's main loop (``Sleep 50``: a command waits a random
0-50 ms before it runs); 0 in unit tests, 0.05 in the conformance harness and benches.

Timers are ``threading.Timer`` objects; nothing polls.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from drivers.tasmota import messages as m

LOGGER = logging.getLogger(__name__)

_sim_ids = itertools.count(1)

#: (prefix, name, payload, retain) of one publication.
Publication = tuple[str, str, bytes, bool]


@dataclass
class RelayLog:
    """When a relay went on and off (monotonic), for tests that measure unlocked time."""

    changes: list[tuple[float, bool, str]] = field(default_factory=list)

    def last_on_period(self) -> tuple[float, float | None] | None:
        """(on_at, off_at) of the last ON period (``off_at`` None while still on)."""
        on_at: float | None = None
        period: tuple[float, float | None] | None = None
        for at, on, _source in self.changes:
            if on and on_at is None:
                on_at = at
                period = (at, None)
            elif not on and on_at is not None:
                period = (on_at, at)
                on_at = None
        return period


class TasmotaDevice:
    """The device model.  Thread-safe; ``publish`` receives what the firmware publishes."""

    def __init__(
        self,
        relays: int = 2,
        switches: int = 0,
        *,
        publish: Callable[[Publication], None] = lambda p: None,
        clock: Callable[[], float] = time.monotonic,
        power_on_state: int = 0,
        set_option_114: bool = True,
        switch_modes: Sequence[int] | None = None,
        index_always: bool = False,
    ) -> None:
        self.relay_count = relays
        self.relays = [False] * relays
        self.pulse = [0] * relays
        self.switches = [True] * switches  # circuit closed: door shut on its NC reed
        self.power_on_state = power_on_state
        self.set_option_114 = set_option_114
        self.switch_modes = list(switch_modes) if switch_modes else [1] * switches
        self.index_always = index_always
        self.logs = [RelayLog() for _ in range(relays)]
        self.commands: list[tuple[str, str]] = []
        self._publish = publish
        self._clock = clock
        self._lock = threading.RLock()
        self._timers: list[threading.Timer | None] = [None] * relays
        self._deadline: list[float | None] = [None] * relays

    # -- commands ----------------------------------------------------------------------------
    def command(self, name: str, payload: str) -> None:
        """Execute ``cmnd/<t>/<name>`` with ``payload`` (case-insensitive, like Tasmota)."""
        payload = payload.strip()
        with self._lock:
            self.commands.append((name, payload))
            upper = name.upper()
            number = "".join(ch for ch in name if ch.isdigit())
            index = int(number) if number else 1
            if upper.rstrip("0123456789") == "POWER":
                self._power_command(index, payload)
            elif upper.rstrip("0123456789") == "PULSETIME":
                self._pulse_command(index, payload)
            elif upper == "STATUS" and payload in ("8", "10"):
                self._status(payload)
            elif upper == "POWERONSTATE":
                if payload.isdigit() and 0 <= int(payload) <= 5:
                    self.power_on_state = int(payload)
                self._result({"PowerOnState": self.power_on_state})
            elif upper == "SETOPTION114":
                if payload.upper() in ("0", "1", "ON", "OFF"):
                    self.set_option_114 = payload.upper() in ("1", "ON")
                self._result({"SetOption114": m.ON if self.set_option_114 else m.OFF})
            elif upper.rstrip("0123456789") == "SWITCHMODE" and 1 <= index <= len(
                    self.switch_modes):
                if payload.isdigit():
                    self.switch_modes[index - 1] = int(payload)
                self._result({f"SwitchMode{index}": self.switch_modes[index - 1]})
            else:
                self._result({"Command": "Unknown"})

    def _power_command(self, index: int, payload: str) -> None:
        if not 1 <= index <= self.relay_count:
            self._result({"Command": "Unknown"})
            return
        word = payload.upper()
        if word in ("", "?"):
            self._report_power(index)
        elif word in ("1", "ON", "TRUE"):
            self._set_relay(index, True, "command")
        elif word in ("0", "OFF", "FALSE"):
            self._set_relay(index, False, "command")
        elif word in ("2", "TOGGLE"):
            self._set_relay(index, not self.relays[index - 1], "command")
        else:
            self._result({"Command": "Error"})

    def _pulse_command(self, index: int, payload: str) -> None:
        if not 1 <= index <= self.relay_count:
            self._result({"Command": "Unknown"})
            return
        if payload:
            try:
                value = int(payload)
            except ValueError:
                value = 0 if payload.upper() == "OFF" else -1
            if 0 <= value < 65536:
                self.pulse[index - 1] = value
                self._start_pulse(index, value)  # SetPulseTimer(index, payload)
        self._result({f"PulseTime{index}": {"Set": self.pulse[index - 1],
                                            "Remaining": self._remaining(index)}})

    def _status(self, which: str) -> None:
        sns: dict[str, object] = {"Time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        for i, closed in enumerate(self.switches):
            sns[f"Switch{i + 1}"] = m.ON if closed else m.OFF
        self._emit(m.STAT, f"STATUS{which}", m.encode_result({"StatusSNS": sns}))

    # -- the relays ------------------------------------------------------------------------
    def _set_relay(self, index: int, on: bool, source: str) -> None:
        """``ExecuteCommandPower``: switch, restart or stop the pulse, report."""
        i = index - 1
        if self.relays[i] != on:
            self.logs[i].changes.append((self._clock(), on, source))
        self.relays[i] = on
        self._start_pulse(index, self.pulse[i] if on else 0)
        self._report_power(index)

    def _start_pulse(self, index: int, value: int) -> None:
        i = index - 1
        timer = self._timers[i]
        if timer is not None:
            timer.cancel()
            self._timers[i] = None
        self._deadline[i] = None
        if value <= 0:
            return
        seconds = m.pulse_seconds(value)
        self._deadline[i] = self._clock() + seconds
        timer = threading.Timer(seconds, self._pulse_ended, (index, self._deadline[i]))
        timer.daemon = True
        self._timers[i] = timer
        timer.start()

    def _pulse_ended(self, index: int, deadline: float) -> None:
        with self._lock:
            if self._deadline[index - 1] != deadline:
                return  # restarted or stopped meanwhile
            self._deadline[index - 1] = None
            self._timers[index - 1] = None
            self._set_relay(index, False, "pulse")

    def _remaining(self, index: int) -> int:
        deadline = self._deadline[index - 1]
        if deadline is None:
            return 0
        left = max(0.0, deadline - self._clock())
        return int(left) + 100 if left > 11.1 else int(left * 10)

    def _report_power(self, index: int) -> None:
        name = m.power_name(index, self.relay_count, index_always=self.index_always)
        on = self.relays[index - 1]
        self._result({name: m.ON if on else m.OFF})
        self._emit(m.STAT, name, m.encode_state(on))

    def report_all(self) -> None:
        """Publish every relay's state (what Tasmota does once after boot)."""
        with self._lock:
            for index in range(1, self.relay_count + 1):
                self._report_power(index)

    # -- the outside world -------------------------------------------------------------------
    def press(self, index: int, on: bool) -> None:
        """Someone (the button, a local rule) switches relay ``index`` (1-based)."""
        with self._lock:
            self._set_relay(index, on, "button")

    def set_switch(self, index: int, closed: bool) -> None:
        """Input ``index`` (1-based) changes: a door contact closes (door shut) or opens."""
        with self._lock:
            if self.switches[index - 1] == closed:
                return
            self.switches[index - 1] = closed
            word = m.ON if closed else m.OFF
            mode = self.switch_modes[index - 1]
            if mode in (15, 16):
                word = word if mode == 15 else (m.OFF if closed else m.ON)
                self._emit(m.TELE, "SENSOR", m.encode_result(
                    {"Time": time.strftime("%Y-%m-%dT%H:%M:%S"), f"Switch{index}": word}))
            elif self.set_option_114:
                self._result({f"Switch{index}": {"Action": word}})
            elif index <= self.relay_count:  # SwitchMode 0: toggles the relay (default!)
                self._set_relay(index, not self.relays[index - 1], "switch")

    def relay(self, index: int) -> bool:
        """Whether relay ``index`` (1-based) is on."""
        with self._lock:
            return self.relays[index - 1]

    def close(self) -> None:
        """Cancel the pulse timers."""
        with self._lock:
            for timer in self._timers:
                if timer is not None:
                    timer.cancel()
            self._timers = [None] * self.relay_count
            self._deadline = [None] * self.relay_count

    def _result(self, doc: dict[str, object]) -> None:
        self._emit(m.STAT, "RESULT", m.encode_result(doc))

    def _emit(self, prefix: str, name: str, payload: bytes, retain: bool = False) -> None:
        self._publish((prefix, name, payload, retain))


class TasmotaSim:
    """A :class:`TasmotaDevice` on a broker at ``host:port`` under Tasmota topic ``topic``."""

    def __init__(
        self,
        host: str,
        port: int,
        topic: str,
        *,
        relays: int = 2,
        switches: int = 0,
        power_on_state: int = 0,
        set_option_114: bool = True,
        index_always: bool = False,
        loop_sleep_s: float = 0.0,
        connect_timeout_s: float = 5.0,
        seed: int = 0,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self.host = host
        self.port = port
        # A broker with accounts (``stora-gateway simulate`` on a site's): the shipped ACL
        # names each device's account after its Topic.
        self._credentials = (username, password) if username else None
        self.topic = m.check_topic(topic)
        self.silent = False
        self.drop_commands = False
        self.report_delay_s = 0.0
        self.loop_sleep_s = loop_sleep_s
        self.connect_timeout_s = connect_timeout_s
        self.device = TasmotaDevice(relays, switches, publish=self._enqueue,
                                    power_on_state=power_on_state,
                                    set_option_114=set_option_114, index_always=index_always)
        self._client_id = f"tasmota-sim-{topic}-{next(_sim_ids)}"
        self._paho: paho.Client | None = None
        self._connected = threading.Event()
        self._cond = threading.Condition()
        #: The device's main loop: commands to run and publications to send, in order,
        #: each no earlier than its due time.
        self._queue: deque[tuple[float, Callable[[], None]]] = deque()
        self._rng = random.Random(seed)
        self._stop = False
        self._booted = False
        self._worker = threading.Thread(target=self._publisher, name=f"sim-{topic}",
                                        daemon=True)

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> TasmotaSim:
        """Connect (boot): LWT Online, then every relay's state."""
        self._worker.start()
        self._connect()
        return self

    def _connect(self) -> None:
        client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                             client_id=self._client_id, protocol=paho.MQTTv5)
        client.will_set(self._topic(m.TELE, "LWT"), m.OFFLINE, qos=1, retain=True)
        if self._credentials is not None:
            client.username_pw_set(*self._credentials)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        self._connected.clear()
        self._paho = client
        client.connect(self.host, self.port, keepalive=30)
        client.loop_start()
        if not self._connected.wait(self.connect_timeout_s):
            raise RuntimeError(f"simulated Tasmota {self.topic} could not connect")

    def _on_connect(self, client: paho.Client, userdata: object, flags: paho.ConnectFlags,
                    reason_code: ReasonCode, properties: Properties | None) -> None:
        if reason_code.is_failure:
            return
        client.publish(self._topic(m.TELE, "LWT"), m.ONLINE, qos=1, retain=True)
        client.subscribe(f"{m.CMND}/{self.topic}/#", qos=0)
        self._connected.set()
        if not self._booted:  # MqttConnected(): states once after boot, not on reconnects
            self._booted = True
            self.device.report_all()

    def _on_disconnect(self, client: paho.Client, userdata: object,
                       flags: paho.DisconnectFlags, reason_code: ReasonCode,
                       properties: Properties | None) -> None:
        self._connected.clear()  # paho reconnects by itself, as Tasmota does

    def set_offline(self, offline: bool) -> None:
        """Drop off the broker with the will (Wi-Fi or power lost), or come back."""
        if offline:
            client, self._paho = self._paho, None
            if client is not None:
                self._connected.clear()
                # MQTT 5 "disconnect with will message" (0x04): the broker publishes the
                # retained Offline as it would after a missed keepalive, only sooner.
                client.disconnect(reasoncode=ReasonCode(PacketTypes.DISCONNECT,
                                                        "Disconnect with will message"))
                client.loop_stop()
        elif self._paho is None:
            self._connect()

    @property
    def online(self) -> bool:
        """True while connected to the broker."""
        return self._connected.is_set()

    def close(self) -> None:
        """Leave the broker as a dying device would (will published) and stop."""
        self.set_offline(True)
        self.device.close()
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._worker.is_alive():
            self._worker.join(timeout=2)

    def __enter__(self) -> TasmotaSim:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- messages ----------------------------------------------------------------------------
    def _topic(self, prefix: str, name: str) -> str:
        return f"{prefix}/{self.topic}/{name}"

    def _on_message(self, client: paho.Client, userdata: object,
                    msg: paho.MQTTMessage) -> None:
        if self.silent:
            return
        name = msg.topic.rsplit("/", 1)[-1]
        try:
            payload = bytes(msg.payload).decode()
        except UnicodeDecodeError:
            return
        if self.drop_commands and name.upper().startswith("POWER") and payload.strip():
            return
        # Tasmota polls MQTT from its main loop, which sleeps ``Sleep`` ms (50 by default)
        # each turn: a command waits up to that long before it runs.
        delay = self._rng.uniform(0.0, self.loop_sleep_s) if self.loop_sleep_s > 0 else 0.0
        self._schedule(delay, lambda: self.device.command(name, payload))

    def _enqueue(self, publication: Publication) -> None:
        self._schedule(self.report_delay_s, lambda: self._send(publication))

    def _schedule(self, delay: float, action: Callable[[], None]) -> None:
        with self._cond:
            self._queue.append((time.monotonic() + delay, action))
            self._cond.notify_all()

    def _send(self, publication: Publication) -> None:
        prefix, name, payload, retain = publication
        client = self._paho if self._connected.is_set() else None
        if client is not None:  # a device off the broker publishes nothing
            with contextlib.suppress(Exception):
                client.publish(self._topic(prefix, name), payload, qos=0, retain=retain)

    def _publisher(self) -> None:
        """The device's loop: run each queued action in order, no earlier than it is due."""
        while True:
            with self._cond:
                while not self._stop and not self._queue:
                    self._cond.wait()
                if self._stop:
                    return
                due, action = self._queue[0]
                wait = due - time.monotonic()
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                self._queue.popleft()
            try:
                action()
            except Exception:  # a simulator bug must not stop the device silently
                LOGGER.exception("simulated Tasmota %s: action failed", self.topic)
