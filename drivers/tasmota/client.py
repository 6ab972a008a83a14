"""The link to the broker the Tasmota devices talk to: one connection, many devices.

One :class:`TasmotaClient` per broker carries every device (Tasmota ``%topic%``) attached
to it.  It is the drivers' one transport (:class:`drivers.mqtt.transport.MqttTransport`:
connects in the background and forever, full-jitter reconnect from
``backoff_initial_s`` up to ``backoff_max_s``, clean shutdown), and every connection
subscribes ``stat/<topic>/+`` and ``tele/<topic>/+`` of each device again.

What it hears is kept per device in a :class:`DeviceView`, each report with the sequence
number of the message that carried it.  A caller that wants the answer to a command takes
the sequence number when publishing (:meth:`TasmotaClient.publish` returns it) and waits
for a report with a higher one: only a report received *after* the command counts.

* **Commands are QoS 0.**  paho keeps a QoS 1 message published while the link is down
  and sends it after the reconnect, seconds or hours late; an unlock must never arrive
  late.  A lost command is harmless: it is not confirmed, and the driver says so.
* **Retained state reports are ignored** (``PowerRetain`` on the device retains
  ``stat/<topic>/POWER<n>``): a retained message describes some past moment, not the
  answer to anything.  The last will (``tele/<topic>/LWT``) is retained by design and used.
* **Epochs.**  A device's epoch grows when the link drops and when its LWT changes; a
  report from an older epoch may be stale (the device rebooted, a change was missed),
  so callers use cached values only from the current epoch.

This module never imports ``gateway``: it is given a :class:`BrokerSettings`.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, Generic, TypeVar

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode

from drivers.base import Clock
from drivers.errors import LinkDownError
from drivers.mqtt.settings import BrokerSettings
from drivers.mqtt.transport import MqttTransport
from drivers.tasmota.messages import (
    STAT,
    TELE,
    Availability,
    Command,
    MessageError,
    PowerReport,
    PulseReport,
    SettingReport,
    SwitchReport,
    check_topic,
    decode,
    split_topic,
)

LOGGER = logging.getLogger(__name__)

T = TypeVar("T")

#: Longest single wait on the condition: only bounds how late a stop is noticed.
_WAIT_SLICE_S: Final = 1.0


@dataclass(frozen=True, slots=True)
class ClientTiming:
    """Reconnect backoff (full jitter, :mod:`drivers.mqtt.backoff`: the ceiling doubles
    from initial to max; a connection that stayed up resets it).

    A broker on the site's LAN comes back in seconds; 30 s caps the wait after a long
    outage.  ``connect_wait_s``: how long an action waits for a link still connecting.
    These override the settings' ``backoff_initial_s`` / ``backoff_max_s``.
    """

    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    connect_wait_s: float = 5.0


@dataclass(frozen=True, slots=True)
class Observation(Generic[T]):
    """A value heard from a device: in message ``seq``, in ``epoch``, at monotonic ``at``."""

    value: T
    seq: int
    epoch: int
    at: float


@dataclass
class DeviceView:
    """What the client has heard from one device; read under :attr:`TasmotaClient.cond`."""

    topic: str
    #: ``tele/<topic>/LWT``: True Online, False Offline, None not heard (or link down).
    online: bool | None = None
    epoch: int = 0
    power: dict[int, Observation[bool]] = field(default_factory=dict)
    pulse: dict[int, Observation[PulseReport]] = field(default_factory=dict)
    switch: dict[int, Observation[bool]] = field(default_factory=dict)
    settings: dict[str, Observation[str]] = field(default_factory=dict)
    #: Sequence number of the last ``stat/<topic>/STATUS10`` (the answer to ``Status 10``).
    status_seq: int = 0
    bad_messages: int = 0
    users: int = 0


class TasmotaClient:
    """One broker connection shared by the Tasmota devices on it (thread-safe)."""

    def __init__(self, settings: BrokerSettings, *, timing: ClientTiming | None = None,
                 clock: Clock = time.monotonic) -> None:
        self.settings = settings
        self.timing = timing or ClientTiming()
        self._clock = clock
        #: Guards every view and the sequence counter; notified on every message.
        self.cond = threading.Condition()
        self._views: dict[str, DeviceView] = {}
        self._seq = 0
        self._connected = False
        self._started = False
        self._transport = MqttTransport(
            dataclasses.replace(settings, backoff_initial_s=self.timing.backoff_initial_s,
                                backoff_max_s=self.timing.backoff_max_s),
            name="tasmota", subscriptions=self._topics, on_message=self._on_message,
            on_up=self._on_up, on_down=self._on_down, clock=clock)

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        """Connect in the background (the transport retries until :meth:`stop`)."""
        with self.cond:
            if self._started:
                return
            self._started = True
        LOGGER.debug("tasmota link: connecting to %s as %s", self._where(),
                     self.settings.client_id)
        self._transport.start()

    def stop(self) -> None:
        """Disconnect and stop the link thread."""
        with self.cond:
            if not self._started:
                return
            self._started = False
        self._transport.close()
        with self.cond:
            self._set_disconnected()

    def attach(self, topic: str) -> DeviceView:
        """Start listening to device ``topic`` (and connecting, if not yet); its view."""
        check_topic(topic)
        with self.cond:
            view = self._views.get(topic)
            if view is None:
                view = self._views[topic] = DeviceView(topic)
                self._transport.subscribe(self._filters(topic))
            view.users += 1
        self.start()
        return view

    def detach(self, topic: str) -> None:
        """Stop listening to ``topic``; the last device to leave stops the client."""
        with self.cond:
            view = self._views.get(topic)
            if view is None:
                return
            view.users -= 1
            if view.users <= 0:
                del self._views[topic]
                self._transport.unsubscribe([f"{STAT}/{topic}/+", f"{TELE}/{topic}/+"])
            empty = not self._views
        if empty:
            self.stop()

    # -- state -----------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        """True while a connection is up and subscribed."""
        with self.cond:
            return self._connected

    @property
    def last_error(self) -> str | None:
        """Why the last connection failed or ended, if it did."""
        return self._transport.last_error

    @property
    def connects(self) -> int:
        """Connections made so far."""
        return self._transport.connects

    def wait_connected(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the link; True when it is up."""
        return self.wait_for(lambda: self._connected, timeout)

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait until ``predicate()`` (called with :attr:`cond` held) is true, or timeout."""
        deadline = self._clock() + timeout
        with self.cond:
            while not predicate():
                remaining = deadline - self._clock()
                if remaining <= 0:
                    return False
                self.cond.wait(min(remaining, _WAIT_SLICE_S))
            return True

    # -- publishing --------------------------------------------------------------------------
    def publish(self, topic: str, command: Command) -> int:
        """Send ``command`` to device ``topic`` (QoS 0); the sequence number before it.

        Raises :class:`LinkDownError` when the link is down: nothing is queued for later.
        """
        with self.cond:
            if not self._connected:
                raise LinkDownError(self._down_text())
            mark = self._seq
        # Not under the condition: paho takes its own locks, and its thread takes ours.
        rc = self._transport.publish(command.topic(topic), command.encode())
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise LinkDownError(f"MQTT publish to {command.topic(topic)} failed: "
                                f"{paho.error_string(rc)}")
        LOGGER.debug("tasmota link: > %s %r", command.topic(topic), command.payload)
        return mark

    def _where(self) -> str:
        """``host:port``, or the socket path, for messages."""
        return self.settings.where

    def _down_text(self) -> str:
        where = self._where()
        error = self.last_error
        reason = f" ({error})" if error else ""
        return f"no connection to the MQTT broker at {where}{reason}"

    # -- the transport's hooks (link thread) ------------------------------------------------
    @staticmethod
    def _filters(topic: str) -> list[tuple[str, int]]:
        return [(f"{STAT}/{topic}/+", 0), (f"{TELE}/{topic}/+", 0)]

    def _topics(self) -> list[tuple[str, int]]:
        with self.cond:
            return [pair for topic in self._views for pair in self._filters(topic)]

    def _on_up(self) -> None:
        with self.cond:
            self._connected = True
            self.cond.notify_all()
        LOGGER.info("tasmota link: connected to %s", self._where())

    def _on_down(self) -> None:
        with self.cond:
            was = self._connected and self._started
            self._set_disconnected()
        if was:
            LOGGER.warning("tasmota link: disconnected from %s (%s); reconnecting",
                           self._where(), self.last_error)

    def _set_disconnected(self) -> None:
        """Called with :attr:`cond` held: nothing heard before is current any more."""
        self._connected = False
        for view in self._views.values():
            view.online = None
            view.epoch += 1
        self.cond.notify_all()

    def _on_message(self, full_topic: str, payload: bytes, retained: bool) -> None:
        parts = split_topic(full_topic)
        if parts is None:
            return
        prefix, topic, name = parts
        LOGGER.debug("tasmota link: < %s %r%s", full_topic, payload[:200],
                     " (retained)" if retained else "")
        try:
            reports = decode(prefix, name, payload)
        except MessageError as exc:
            with self.cond:
                if topic in self._views:
                    self._views[topic].bad_messages += 1
            LOGGER.warning("tasmota link: ignored %s: %s", full_topic, exc)
            return
        now = self._clock()
        with self.cond:
            view = self._views.get(topic)
            if view is None:
                return
            self._seq += 1
            seq = self._seq
            if name.startswith("STATUS"):
                view.status_seq = seq
            for report in reports:
                self._apply(view, report, seq, now, retained=retained)
            self.cond.notify_all()

    @staticmethod
    def _apply(view: DeviceView, report: object, seq: int, now: float, *,
               retained: bool) -> None:
        if isinstance(report, Availability):
            if report.online != view.online:
                view.epoch += 1
                LOGGER.info("tasmota device %s: %s", view.topic,
                            "Online" if report.online else "Offline (LWT)")
            view.online = report.online
            return
        if retained:
            return  # a retained state report says nothing about now
        if isinstance(report, PowerReport):
            view.power[report.relay] = Observation(report.on, seq, view.epoch, now)
        elif isinstance(report, PulseReport):
            view.pulse[report.relay] = Observation(report, seq, view.epoch, now)
        elif isinstance(report, SwitchReport):
            view.switch[report.switch] = Observation(report.on, seq, view.epoch, now)
        elif isinstance(report, SettingReport):
            view.settings[report.name] = Observation(report.value, seq, view.epoch, now)
