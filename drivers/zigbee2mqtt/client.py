"""The driver's own MQTT connection to the broker Zigbee2MQTT talks to.

One :class:`BridgeLink` per broker is shared by every zigbee2mqtt controller on it.  It
is the drivers' one transport (:class:`drivers.mqtt.transport.MqttTransport`: clean
session, QoS 0 commands refused while disconnected, re-subscribe on every connect,
full-jitter reconnect, clean shutdown) with what this driver adds on top:

* **Per-topic handlers.**  Each message goes to the handlers registered for its exact
  topic, on the link thread; they only record it and wake waiters (no I/O, no waiting).
  Subscriptions are QoS 1.
* **Users.**  Controllers :meth:`~BridgeLink.acquire` and :meth:`~BridgeLink.release`
  it; the first starts the connection and the last stops it.
* Foreign failures (paho error codes, a connection down) are translated here, once,
  into :class:`~drivers.errors.LinkDownError`.

This module never imports ``gateway``: the caller passes :class:`BrokerSettings`.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterable

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode

from drivers.base import Clock, Health
from drivers.errors import LinkDownError
from drivers.mqtt.settings import BrokerSettings
from drivers.mqtt.transport import MqttTransport

__all__ = ["BridgeLink", "Handler"]

LOGGER = logging.getLogger(__name__)

Handler = Callable[[str, bytes, bool], None]
"""``handler(topic, payload, retained)``, called on the link thread; must not block."""


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
        self._lock = threading.Lock()
        self._handlers: dict[str, list[Handler]] = {}
        self._disconnect_hooks: list[Callable[[], None]] = []
        self._users = 0
        self._transport = MqttTransport(
            settings, name="zigbee2mqtt", subscriptions=self._topics,
            on_message=self._on_message, on_down=self._on_down, clock=clock, rng=rng)

    # -- lifecycle ----------------------------------------------------------------------
    def acquire(self) -> BridgeLink:
        """Count one more user and start the link thread on first use."""
        with self._lock:
            self._users += 1
        # Outside the lock: the link thread's hooks (_topics) take it.
        self._transport.start()
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
        self._transport.close()

    @property
    def connected(self) -> bool:
        """True while connected and subscribed."""
        return self._transport.connected

    def wait_connected(self, timeout: float) -> bool:
        """Wait until connected and subscribed; False on timeout."""
        return self._transport.wait_connected(timeout)

    @property
    def last_error(self) -> str | None:
        """Why the last connection failed or ended, if it did."""
        return self._transport.last_error

    @property
    def last_ok_at(self) -> float | None:
        """When the broker was last heard from (the link's clock)."""
        return self._transport.last_ok_at

    @property
    def failures(self) -> int:
        """Consecutive failed connection attempts."""
        return self._transport.failures

    @property
    def connects(self) -> int:
        """Connections made so far."""
        return self._transport.connects

    @property
    def _thread(self) -> threading.Thread | None:
        """The link thread, if it was started (tests check that it ended)."""
        return self._transport.thread

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
        # Not connected: subscribed with the others at the next connect (_topics).
        self._transport.subscribe([(t, 1) for t in new], timeout)

    def on_disconnect(self, hook: Callable[[], None]) -> None:
        """Call ``hook()`` (on the link thread) whenever the connection is lost."""
        self._disconnect_hooks.append(hook)

    def publish(self, topic: str, payload: bytes) -> None:
        """Publish QoS 0 now; ``LinkDownError`` when not connected (never queued)."""
        if not self.connected:
            raise LinkDownError(self._down_reason())
        rc = self._transport.publish(topic, payload)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise LinkDownError(f"MQTT {self.settings.where}: publish failed: "
                                f"{paho.error_string(rc)}")
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

    # -- the transport's hooks (link thread) --------------------------------------------
    def _topics(self) -> list[tuple[str, int]]:
        with self._lock:
            return [(topic, 1) for topic in self._handlers]

    def _on_down(self) -> None:
        for hook in self._disconnect_hooks:
            try:
                hook()
            except Exception:  # a handler bug must not stop the link
                LOGGER.exception("zigbee2mqtt disconnect hook failed")

    def _on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        handlers = self._handlers.get(topic, ())
        LOGGER.debug("rx %s %r", topic, payload)
        for handler in handlers:
            try:
                handler(topic, payload, retained)
            except Exception:  # a bad message must not stop the link
                LOGGER.exception("zigbee2mqtt: handling %s failed", topic)
