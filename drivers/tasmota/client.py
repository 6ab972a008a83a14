"""The link to the broker the Tasmota devices talk to: one paho-mqtt 2 client, many devices.

One :class:`TasmotaClient` per broker carries every device (Tasmota ``%topic%``) attached
to it.  It connects in the background and forever: paho's network thread reconnects with
exponential backoff (``backoff_initial_s`` doubling to ``backoff_max_s``), and every
connection subscribes ``stat/<topic>/+`` and ``tele/<topic>/+`` of each device again.

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

import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, Generic, TypeVar

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from drivers.base import Clock
from drivers.errors import LinkDownError
from drivers.mqtt_client import DRIVER_MAX_PACKET_BYTES, PahoClient, is_socket_path
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
class BrokerSettings:
    """Where the devices' broker is and how to log in.

    ``client_id`` must differ from every other client of that broker (the agent's own
    link included), or the broker disconnects one of the two; on a broker that binds
    client ids to accounts, so must ``username``.  A ``host`` that starts with ``/`` is
    the path of the broker's unix socket (``port`` is then unused).  ``tls`` is a ready
    client context (the caller loads the CA and checks the hostname), None for plain TCP.
    """

    host: str
    port: int
    client_id: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: ssl.SSLContext | None = None
    keepalive_s: int = 30


@dataclass(frozen=True, slots=True)
class ClientTiming:
    """Reconnect backoff (paho's: doubling from initial to max, reset by a CONNACK).

    A broker on the site's LAN comes back in seconds; 30 s caps the wait after a long
    outage.  ``connect_wait_s``: how long an action waits for a link still connecting.
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
        self._last_error: str | None = None
        self.connects = 0
        self._paho = self._make_paho()

    # -- lifecycle -----------------------------------------------------------------------
    def _make_paho(self) -> paho.Client:
        s = self.settings
        client = PahoClient(callback_api_version=CallbackAPIVersion.VERSION2,
                            client_id=s.client_id, clean_session=True,
                            protocol=paho.MQTTv311,
                            transport="unix" if is_socket_path(s.host) else "tcp",
                            max_packet_bytes=DRIVER_MAX_PACKET_BYTES)
        if s.username:
            client.username_pw_set(s.username, s.password)
        if s.tls is not None:
            client.tls_set_context(s.tls)
        # Typed int, but paho only compares and doubles them: floats work.
        first, cap = self.timing.backoff_initial_s, self.timing.backoff_max_s
        client.reconnect_delay_set(first, cap)  # type: ignore[arg-type]
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_connect_fail = self._on_connect_fail
        return client

    def start(self) -> None:
        """Connect in the background (paho's thread retries until :meth:`stop`)."""
        with self.cond:
            if self._started:
                return
            self._started = True
        LOGGER.debug("tasmota link: connecting to %s as %s", self._where(),
                     self.settings.client_id)
        self._paho.connect_async(self.settings.host, self.settings.port,
                                 keepalive=self.settings.keepalive_s)
        self._paho.loop_start()

    def stop(self) -> None:
        """Disconnect and stop paho's thread."""
        with self.cond:
            if not self._started:
                return
            self._started = False
        self._paho.disconnect()
        self._paho.loop_stop()
        with self.cond:
            self._set_disconnected("stopped")

    def attach(self, topic: str) -> DeviceView:
        """Start listening to device ``topic`` (and connecting, if not yet); its view."""
        check_topic(topic)
        with self.cond:
            view = self._views.get(topic)
            if view is None:
                view = self._views[topic] = DeviceView(topic)
                if self._connected:
                    self._subscribe(topic)
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
                if self._connected:
                    self._paho.unsubscribe([f"{STAT}/{topic}/+", f"{TELE}/{topic}/+"])
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
        with self.cond:
            return self._last_error

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
        info = self._paho.publish(command.topic(topic), command.encode(), qos=0)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise LinkDownError(f"MQTT publish to {command.topic(topic)} failed: "
                                f"{paho.error_string(info.rc)}")
        LOGGER.debug("tasmota link: > %s %r", command.topic(topic), command.payload)
        return mark

    def _where(self) -> str:
        """``host:port``, or the socket path, for messages."""
        s = self.settings
        return s.host if is_socket_path(s.host) else f"{s.host}:{s.port}"

    def _down_text(self) -> str:
        where = self._where()
        reason = f" ({self._last_error})" if self._last_error else ""
        return f"no connection to the MQTT broker at {where}{reason}"

    # -- paho callbacks (paho's thread) -----------------------------------------------------
    def _subscribe(self, topic: str) -> None:
        self._paho.subscribe([(f"{STAT}/{topic}/+", 0), (f"{TELE}/{topic}/+", 0)])

    def _on_connect(self, client: paho.Client, userdata: object, flags: paho.ConnectFlags,
                    reason_code: ReasonCode, properties: Properties | None) -> None:
        if reason_code.is_failure:
            with self.cond:
                self._last_error = f"broker refused the connection: {reason_code}"
            LOGGER.warning("tasmota link: %s", self._last_error)
            return
        sock: Any = client.socket()
        # paho leaves Nagle on: +40 ms per round trip.  A unix socket has no Nagle and
        # refuses the option.
        if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET,
                                                               socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.cond:
            for topic in self._views:
                self._subscribe(topic)
            self._connected = True
            self._last_error = None
            self.connects += 1
            self.cond.notify_all()
        LOGGER.info("tasmota link: connected to %s", self._where())

    def _on_connect_fail(self, client: paho.Client, userdata: object) -> None:
        with self.cond:
            self._last_error = "connection failed"

    def _on_disconnect(self, client: paho.Client, userdata: object,
                       flags: paho.DisconnectFlags, reason_code: ReasonCode,
                       properties: Properties | None) -> None:
        with self.cond:
            was = self._connected and self._started
            self._set_disconnected(str(reason_code))
        if was:
            LOGGER.warning("tasmota link: disconnected from %s (%s); reconnecting",
                           self._where(), reason_code)

    def _set_disconnected(self, reason: str) -> None:
        """Called with :attr:`cond` held: nothing heard before is current any more."""
        if self._connected:
            self._last_error = f"disconnected: {reason}"
        self._connected = False
        for view in self._views.values():
            view.online = None
            view.epoch += 1
        self.cond.notify_all()

    def _on_message(self, client: paho.Client, userdata: object,
                    msg: paho.MQTTMessage) -> None:
        parts = split_topic(msg.topic)
        if parts is None:
            return
        prefix, topic, name = parts
        payload = bytes(msg.payload)
        LOGGER.debug("tasmota link: < %s %r%s", msg.topic, payload[:200],
                     " (retained)" if msg.retain else "")
        try:
            reports = decode(prefix, name, payload)
        except MessageError as exc:
            with self.cond:
                if topic in self._views:
                    self._views[topic].bad_messages += 1
            LOGGER.warning("tasmota link: ignored %s: %s", msg.topic, exc)
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
                self._apply(view, report, seq, now, retained=bool(msg.retain))
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
