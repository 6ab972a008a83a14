"""The driver's own MQTT connection to the broker Zigbee2MQTT talks to (paho-mqtt 2).

The bridge may sit on another broker than the cloud link (a LAN Mosquitto next to the
Zigbee coordinator), and a lock must keep working when the cloud link is down, so the
driver never borrows the agent's connection.  One :class:`BridgeLink` per broker is
shared by every zigbee2mqtt controller on it.

Threads::

    z2m-link-<host>:<port>   owns the paho client: connect, network loop, backoff.
                             paho's callbacks run here; they hand each message to the
                             handler registered for its exact topic, which only records
                             it and wakes waiters (no I/O, no waiting).
    callers                  publish() and wait on their own conditions.

Decisions:

* **Commands are QoS 0 and refused while disconnected.**  paho would keep a QoS 1
  publish and send it after a reconnect, possibly long after the command was answered
  ``not_confirmed``: an unlock must never happen late.  A lost command is caught by the
  read-back like a lost radio frame.
* **Clean session.**  State reports missed while away are useless (the controller
  forgets its cache on a disconnect and reads again); retained availability messages
  come back with every subscription.
* **Every (re)connect re-subscribes** every registered topic (one SUBSCRIBE) and counts
  as connected only after the SUBACK, so no report is lost between the two.
* **Backoff** with full jitter, ``uniform(0, min(max, initial * 2**n))``, ``n`` counting
  failed or short-lived connections, as the agent's link does.  No busy loop: waits are
  on events.
* Foreign exceptions (``OSError``, ``ssl.SSLError``, paho error codes) are translated
  here, once, into :mod:`drivers.errors`.

This module never imports ``gateway``: the caller passes :class:`BrokerSettings`.
"""

from __future__ import annotations

import contextlib
import logging
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from drivers.base import Clock, Health
from drivers.errors import LinkDownError
from drivers.mqtt_client import DRIVER_MAX_PACKET_BYTES, PahoClient, is_socket_path

LOGGER = logging.getLogger(__name__)

Handler = Callable[[str, bytes, bool], None]
"""``handler(topic, payload, retained)``, called on the link thread; must not block."""

#: Upper bound on one network-loop wait: how late a stop or a connect deadline is seen.
_TICK_S: Final = 0.5


@dataclass(frozen=True, slots=True)
class BrokerSettings:
    """Where and how to connect.  ``password`` is the secret itself, never logged.

    A ``host`` that starts with ``/`` is the path of the broker's unix socket (``port``
    is then unused), as for the agent's own link.  ``username`` is the link's own broker
    account: a broker that binds client ids to accounts gives an account one connection.
    ``tls`` is a ready client context (chain and hostname checked) or ``None``.
    Timings: ``connect_timeout_s`` bounds TCP connect, TLS handshake, CONNACK and the
    first SUBACK together; ``backoff_initial_s`` / ``backoff_max_s`` are the reconnect
    delays (a LAN broker restarts in seconds; the cap keeps a dead one tried every 30 s);
    a connection that stayed up ``stable_after_s`` resets the backoff.
    """

    host: str
    port: int
    client_id: str
    username: str | None = None
    password: str | None = None
    tls: ssl.SSLContext | None = None
    keepalive_s: int = 30
    connect_timeout_s: float = 5.0
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    stable_after_s: float = 10.0

    def __repr__(self) -> str:  # the password stays out of logs and tracebacks
        return (f"BrokerSettings(host={self.host!r}, port={self.port}, "
                f"client_id={self.client_id!r}, username={self.username!r}, "
                f"tls={self.tls is not None})")

    @property
    def unix_socket(self) -> bool:
        """True when ``host`` is a unix socket path."""
        return is_socket_path(self.host)

    @property
    def where(self) -> str:
        """``host:port`` (or the socket path), for messages."""
        return self.host if self.unix_socket else f"{self.host}:{self.port}"


class BridgeLink:
    """One MQTT connection, kept up in the background, with per-topic handlers."""

    def __init__(
        self,
        settings: BrokerSettings,
        *,
        clock: Clock = time.monotonic,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.settings = settings
        self._clock = clock
        self._rng = rng
        self._lock = threading.Lock()
        self._handlers: dict[str, list[Handler]] = {}
        self._disconnect_hooks: list[Callable[[], None]] = []
        self._connected = threading.Event()
        self._stop = threading.Event()
        self._sub_mid: int | None = None
        self._suback = threading.Condition(self._lock)
        self._acked: set[int] = set()
        self._users = 0
        self._thread: threading.Thread | None = None
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

    # -- lifecycle ----------------------------------------------------------------------
    def acquire(self) -> BridgeLink:
        """Count one more user and start the link thread on first use."""
        with self._lock:
            self._users += 1
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name=f"z2m-link-{self.settings.where}", daemon=True)
                self._thread.start()
        return self

    def release(self) -> None:
        """One user less; the last one stops the link."""
        with self._lock:
            self._users -= 1
            last = self._users <= 0
        if last:
            self.close()

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

    def wait_connected(self, timeout: float) -> bool:
        """Wait until connected and subscribed; False on timeout."""
        return self._connected.wait(timeout)

    # -- topics -------------------------------------------------------------------------
    def add_handler(self, topics: Iterable[str], handler: Handler,
                    timeout: float | None = None) -> None:
        """Route ``topics`` to ``handler`` (as well as to earlier handlers of a topic);
        subscribe now when connected.

        With ``timeout`` and a connected link, wait (that long) for the SUBACK so a reply
        to a command published next cannot be missed.
        """
        new: list[str] = []
        with self._lock:
            for topic in topics:
                if topic not in self._handlers:
                    new.append(topic)
                    self._handlers[topic] = []
                if handler not in self._handlers[topic]:
                    self._handlers[topic] = [*self._handlers[topic], handler]
        if not new or not self._paho.is_connected():
            return  # subscribed with the others at the next connect (_on_connect)
        rc, mid = self._paho.subscribe([(t, 1) for t in new])
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None or timeout is None:
            return
        with self._suback:
            self._suback.wait_for(lambda: mid in self._acked, timeout)
            self._acked.discard(mid)

    def on_disconnect(self, hook: Callable[[], None]) -> None:
        """Call ``hook()`` (on the link thread) whenever the connection is lost."""
        self._disconnect_hooks.append(hook)

    def publish(self, topic: str, payload: bytes) -> None:
        """Publish QoS 0 now; ``LinkDownError`` when not connected (never queued)."""
        if not self.connected:
            raise LinkDownError(self._down_reason())
        info = self._paho.publish(topic, payload, qos=0)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise LinkDownError(f"MQTT {self.settings.where}: publish failed: "
                                f"{paho.error_string(info.rc)}")
        LOGGER.debug("tx %s %r", topic, payload)

    def _down_reason(self) -> str:
        reason = self.last_error or "not connected yet"
        return f"MQTT broker {self.settings.where} of the Zigbee2MQTT bridge: {reason}"

    def health(self) -> Health:
        """The connection's health as last observed."""
        if self.connected:
            return Health(True, "ok", None, self.last_ok_at, 0)
        return Health(False, self._down_reason(), self.last_error, self.last_ok_at,
                      self.failures)

    # -- the link thread ----------------------------------------------------------------
    def _run(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            started = self._clock()
            self._connect_and_loop()
            if self._stop.is_set():
                break
            if self.last_ok_at is not None and self.last_ok_at >= started and (
                    self._clock() - started >= self.settings.stable_after_s):
                attempt = 0
            ceiling = min(self.settings.backoff_max_s,
                          self.settings.backoff_initial_s * 2.0 ** min(attempt, 30))
            delay = self._rng() * ceiling
            attempt += 1
            LOGGER.info("MQTT %s (zigbee2mqtt): %s; reconnecting in %.2f s",
                        self.settings.where, self.last_error, delay)
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
        try:
            self._paho.connect(self.settings.host, self.settings.port,
                               keepalive=self.settings.keepalive_s)
        except (OSError, ValueError) as exc:  # ssl.SSLError and socket errors are OSError
            self._failed(f"cannot connect: {exc}")
            # paho leaves a socket whose TLS handshake failed open; a context that keeps
            # it (the agent's, gateway/link/) can close it now rather than at GC.
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
                if self.connected or self.last_error is None:
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
        self.failures += 1
        self.last_error = reason

    def _lost(self) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        if was:
            for hook in self._disconnect_hooks:
                try:
                    hook()
                except Exception:  # a handler bug must not stop the link
                    LOGGER.exception("zigbee2mqtt disconnect hook failed")

    # -- paho callbacks (link thread) ---------------------------------------------------
    def _on_connect(self, client: paho.Client, userdata: object, flags: Any,
                    reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            self._failed(f"broker refused the connection: {reason_code}")
            client.disconnect()
            return
        with self._lock:
            topics = list(self._handlers)
        if not topics:
            self._up()
            return
        rc, mid = client.subscribe([(t, 1) for t in topics])
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._failed(f"subscribe failed: {paho.error_string(rc)}")
            client.disconnect()
            return
        self._sub_mid = mid

    def _on_subscribe(self, client: paho.Client, userdata: object, mid: int,
                      reason_codes: Any, properties: Any) -> None:
        if any(code.is_failure for code in reason_codes):
            LOGGER.warning("MQTT %s refused a zigbee2mqtt subscription (ACL?): %s",
                           self.settings.where, reason_codes)
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
        LOGGER.info("MQTT %s (zigbee2mqtt): connected", self.settings.where)

    def _on_disconnect(self, client: paho.Client, userdata: object, flags: Any,
                       reason_code: Any, properties: Any) -> None:
        if self.connected and not self._stop.is_set():
            self._failed(f"disconnected: {reason_code}")

    def _on_message(self, client: paho.Client, userdata: object,
                    msg: paho.MQTTMessage) -> None:
        handlers = self._handlers.get(msg.topic, ())
        self.last_ok_at = self._clock()
        LOGGER.debug("rx %s %r", msg.topic, msg.payload)
        for handler in handlers:
            try:
                handler(msg.topic, bytes(msg.payload), bool(msg.retain))
            except Exception:  # a bad message must not stop the link
                LOGGER.exception("zigbee2mqtt: handling %s failed", msg.topic)
