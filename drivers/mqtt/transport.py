"""The drivers' one MQTT transport: a connection kept up in the background (paho-mqtt 2).

:class:`MqttTransport` (clean session, QoS 0 publish refused while down, re-subscribe on
every connect, full-jitter reconnect, clean shutdown) is what each MQTT driver's link
builds on, one per broker.  See docs/design/mqtt-link.md, "The drivers' transport".
"""

from __future__ import annotations

import contextlib
import logging
import random
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from drivers.base import Clock
from drivers.mqtt.backoff import Backoff
from drivers.mqtt.client import DRIVER_MAX_PACKET_BYTES, PahoClient
from drivers.mqtt.settings import BrokerSettings

__all__ = ["MessageSink", "MqttTransport"]

LOGGER = logging.getLogger(__name__)

MessageSink = Callable[[str, bytes, bool], None]
"""``sink(topic, payload, retained)``, called on the link thread; must not block."""

#: Upper bound on one network-loop wait: how late a stop or a connect deadline is seen.
_TICK_S: Final = 0.5


def _nothing() -> None:
    """The default hook: nothing to do."""


class MqttTransport:
    """One MQTT connection, kept up in the background by its own thread.

    ``subscriptions()`` names the ``(topic filter, qos)`` pairs to subscribe on every
    connect; ``on_message`` takes every message; ``on_up()`` runs once a connection is
    subscribed and ``on_down()`` once it is lost (both on the link thread).  ``name``
    labels the thread and the log lines.  ``clock`` and ``rng`` are injectable.
    """

    def __init__(
        self,
        settings: BrokerSettings,
        *,
        name: str,
        subscriptions: Callable[[], Sequence[tuple[str, int]]],
        on_message: MessageSink,
        on_up: Callable[[], None] = _nothing,
        on_down: Callable[[], None] = _nothing,
        clock: Clock = time.monotonic,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.settings = settings
        self.name = name
        self._subscriptions = subscriptions
        self._on_message_cb = on_message
        self._on_up_cb = on_up
        self._on_down_cb = on_down
        self._clock = clock
        self._backoff = Backoff(settings.backoff_initial_s, settings.backoff_max_s, rng)
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._stop = threading.Event()
        self._sub_mid: int | None = None
        self._suback = threading.Condition(self._lock)
        self._acked: set[int] = set()
        self._thread: threading.Thread | None = None
        #: Whether this connection's failure is already recorded (one per drop).
        self._recorded = False
        self.last_error: str | None = None
        self.last_ok_at: float | None = None
        self.failures = 0
        self.connects = 0
        self._paho = PahoClient(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=settings.client_id,
            clean_session=True,
            protocol=paho.MQTTv311,
            transport="unix" if settings.unix_socket else "tcp",
            max_packet_bytes=DRIVER_MAX_PACKET_BYTES,
        )
        if settings.username:
            self._paho.username_pw_set(settings.username, settings.password)
        if settings.tls is not None:
            self._paho.tls_set_context(settings.tls)
        self._paho.connect_timeout = settings.connect_timeout_s
        self._paho.on_connect = self._on_connect
        self._paho.on_disconnect = self._on_disconnect
        self._paho.on_subscribe = self._on_subscribe
        self._paho.on_message = self._on_message
        # Only the link thread writes to the socket: with a hook set, paho's publish and
        # subscribe from a controller's thread queue the packet and wake the loop instead
        # of writing themselves (two writers could interleave their bytes).
        self._paho.on_socket_register_write = _no_write_hook

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        """Start the link thread unless it runs; it connects and reconnects until
        :meth:`close`."""
        with self._lock:
            thread = self._thread
            if thread is not None and thread.is_alive() and not self._stop.is_set():
                return
        if thread is not None and thread is not threading.current_thread():
            # A close() is ending it: let it finish (bounded: it ends within a connect
            # timeout), then start afresh.  Callers must not hold a lock the link
            # thread's hooks take.
            thread.join(timeout=self.settings.connect_timeout_s + 1)
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                LOGGER.warning("MQTT %s (%s): the previous link thread has not ended; "
                               "not started", self.settings.where, self.name)
                return
            self._stop.clear()
            self._thread = threading.Thread(
                target=self._run, name=f"{self.name}-link-{self.settings.where}",
                daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Disconnect and stop the thread (idempotent)."""
        self._stop.set()
        with contextlib.suppress(Exception):  # paho on a socket that is already gone
            self._paho.disconnect()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)
        self._connected.clear()

    @property
    def connected(self) -> bool:
        """True while connected and subscribed."""
        return self._connected.is_set()

    @property
    def thread(self) -> threading.Thread | None:
        """The link thread, once started (it may have ended since)."""
        return self._thread

    @property
    def session_open(self) -> bool:
        """True once the broker accepted the connection (CONNACK), before the SUBACK."""
        return bool(self._paho.is_connected())

    def wait_connected(self, timeout: float) -> bool:
        """Wait until connected and subscribed; False on timeout."""
        return self._connected.wait(timeout)

    # -- traffic ------------------------------------------------------------------------
    def subscribe(self, topics: Iterable[tuple[str, int]],
                  timeout: float | None = None) -> None:
        """Subscribe now if the session is open (otherwise at the next connect, through
        ``subscriptions()``); with ``timeout``, wait that long for the SUBACK."""
        wanted = list(topics)
        if not wanted or not self.session_open:
            return
        rc, mid = self._paho.subscribe(wanted)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None or timeout is None:
            return
        with self._suback:
            self._suback.wait_for(lambda: mid in self._acked, timeout)
            self._acked.discard(mid)

    def unsubscribe(self, topics: Sequence[str]) -> None:
        """Unsubscribe ``topics`` if the session is open (a new one forgets them anyway)."""
        if self.session_open:
            self._paho.unsubscribe(list(topics))

    def publish(self, topic: str, payload: bytes) -> MQTTErrorCode:
        """Publish QoS 0 now (never queued for a later connection); paho's result."""
        if not self.connected:
            return MQTTErrorCode.MQTT_ERR_NO_CONN
        info = self._paho.publish(topic, payload, qos=0)
        return info.rc

    # -- the link thread ----------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            started = self._clock()
            self._connect_and_loop()
            if self._stop.is_set():
                break
            if self.last_ok_at is not None and self.last_ok_at >= started and (
                    self._clock() - started >= self.settings.stable_after_s):
                self._backoff.reset()
            delay = self._backoff.next_delay()
            LOGGER.info("MQTT %s (%s): %s; reconnecting in %.2f s",
                        self.settings.where, self.name, self.last_error, delay)
            self._stop.wait(delay)
        with contextlib.suppress(Exception):
            self._paho.disconnect()
            self._paho.loop(timeout=0.0)
        # paho's wake-up socket pair (made by loop()) is closed only by its __del__,
        # which the GC may reach after the sockets themselves: an unclosed-socket
        # ResourceWarning at exit.  Closed here, when the link thread ends.
        reset = getattr(self._paho, "_reset_sockets", None)
        if callable(reset):
            with contextlib.suppress(Exception):
                reset()

    def _connect_and_loop(self) -> None:
        """One connection: connect, wait for CONNACK and SUBACK, loop until it drops."""
        self._recorded = False
        try:
            self._paho.connect(self.settings.host, self.settings.port,
                               keepalive=self.settings.keepalive_s)
        except (OSError, ValueError) as exc:  # ssl.SSLError and socket errors are OSError
            self._failed(f"cannot connect: {exc}")
            # paho leaves a socket whose TLS handshake failed open; a context that keeps
            # it (drivers.mqtt.tls.TlsContext) can close it now rather than at GC.
            close_failed = getattr(self.settings.tls, "close_failed", None)
            if callable(close_failed):
                close_failed(None)
            return
        sock: Any = self._paho.socket()
        if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET,
                                                               socket.AF_INET6):
            # paho leaves Nagle on: with delayed ACKs a command would wait ~40 ms.
            # (A unix socket has no Nagle, and refuses the option.)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        deadline = self._clock() + self.settings.connect_timeout_s
        while not self._stop.is_set():
            rc = self._paho.loop(timeout=_TICK_S)
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                if not self._recorded:
                    self._failed(f"connection lost: {paho.error_string(rc)}")
                break
            if not self.connected and self._clock() > deadline:
                self._failed(f"no CONNACK/SUBACK within {self.settings.connect_timeout_s} s")
                break
        self._lost()
        with contextlib.suppress(Exception):
            self._paho.disconnect()
            self._paho.loop(timeout=0.0)

    def _failed(self, reason: str) -> None:
        self._recorded = True
        self.failures += 1
        self.last_error = reason

    def _lost(self) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        if was:
            try:
                self._on_down_cb()
            except Exception:  # a handler bug must not stop the link
                LOGGER.exception("%s disconnect hook failed", self.name)

    # -- paho callbacks (link thread) ---------------------------------------------------
    def _on_connect(self, client: paho.Client, userdata: object, flags: paho.ConnectFlags,
                    reason_code: ReasonCode, properties: Properties | None) -> None:
        if reason_code.is_failure:
            self._failed(f"broker refused the connection: {reason_code}")
            LOGGER.warning("MQTT %s (%s): broker refused the connection: %s",
                           self.settings.where, self.name, reason_code)
            client.disconnect()
            return
        topics = list(self._subscriptions())
        if not topics:
            self._up()
            return
        rc, mid = client.subscribe(topics)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._failed(f"subscribe failed: {paho.error_string(rc)}")
            client.disconnect()
            return
        self._sub_mid = mid

    def _on_subscribe(self, client: paho.Client, userdata: object, mid: int,
                      reason_codes: list[ReasonCode], properties: Properties | None) -> None:
        if any(code.is_failure for code in reason_codes):
            LOGGER.warning("MQTT %s refused a %s subscription (ACL?): %s",
                           self.settings.where, self.name, reason_codes)
        with self._suback:
            self._acked.add(mid)
            self._suback.notify_all()
        if mid == self._sub_mid:
            self._sub_mid = None
            self._up()

    def _up(self) -> None:
        self.connects += 1
        self.last_ok_at = self._clock()
        self.last_error = None
        self.failures = 0
        self._connected.set()
        LOGGER.info("MQTT %s (%s): connected", self.settings.where, self.name)
        try:
            self._on_up_cb()
        except Exception:  # a handler bug must not stop the link
            LOGGER.exception("%s connect hook failed", self.name)

    def _on_disconnect(self, client: paho.Client, userdata: object,
                       flags: paho.DisconnectFlags, reason_code: ReasonCode,
                       properties: Properties | None) -> None:
        if self.connected and not self._stop.is_set():
            self._failed(f"disconnected: {reason_code}")

    def _on_message(self, client: paho.Client, userdata: object,
                    msg: paho.MQTTMessage) -> None:
        self.last_ok_at = self._clock()
        try:
            self._on_message_cb(msg.topic, bytes(msg.payload), bool(msg.retain))
        except Exception:  # a bad message must not stop the link
            LOGGER.exception("%s: handling %s failed", self.name, msg.topic)


def _no_write_hook(client: paho.Client, userdata: object, sock: object) -> None:
    """paho's ``on_socket_register_write``: nothing to do (see the constructor)."""
