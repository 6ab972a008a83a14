"""A small synchronous MQTT client for tests, so that a test reads like a script:
``client.publish(topic, payload)`` returns once the broker has the message and
``client.expect(topic)`` waits for what the gateway sends."""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from devkit.mosquitto import Broker, BrokerError
from devkit.tls_files import TlsFiles
from drivers.mqtt.client import PahoClient
from gateway.link.message import Message

__all__ = ["Client"]

_client_ids = itertools.count(1)


# --------------------------------------------------------------------------- client


class Client:
    """A synchronous MQTT 3.1.1 test client: publish, then ``expect`` what comes back.

    Every message on a subscribed filter is kept, in order, as a
    :class:`gateway.link.Message`; :meth:`expect` waits for them.
    """

    def __init__(
        self,
        broker: Broker,
        client_id: str | None = None,
        *,
        clean_session: bool = True,
        username: str | None = None,
        password: str | None = None,
        tls: TlsFiles | None = None,
        host: str | None = None,
        timeout: float = 5.0,
        unix: bool = False,
    ) -> None:
        self.client_id = client_id or f"test-client-{os.getpid()}-{next(_client_ids)}"
        #: Connections lost since it connected (paho reconnects by itself): a client
        #: another one took the id of is disconnected over and over.
        self.disconnects = 0
        if unix and broker.socket_path is None:
            raise BrokerError("Client(unix=True) needs a Broker(unix_socket=True)")
        self._cond = threading.Condition()
        self._messages: list[Message] = []
        self._subscribed: set[str] = set()
        self._suback: dict[int, list[ReasonCode]] = {}
        self._connected = threading.Event()
        # PahoClient: paho's own leaks a unix socket at each failed reconnect.
        self._paho = PahoClient(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=clean_session,
            protocol=paho.MQTTv311,
            transport="unix" if unix else "tcp",
        )
        if username is not None:
            self._paho.username_pw_set(username, password)
        if tls is not None:
            self._paho.tls_set(ca_certs=str(tls.ca))
        self._paho.on_connect = self._on_connect
        self._paho.on_message = self._on_message
        self._paho.on_subscribe = self._on_subscribe
        self._paho.on_disconnect = self._on_disconnect
        where = str(broker.socket_path) if unix else (host or broker.host)
        self._paho.connect(where, broker.port, keepalive=30)
        sock: Any = self._paho.socket()
        if sock is not None and not unix:  # paho leaves Nagle on; see gateway/link/
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._paho.loop_start()
        if not self._connected.wait(timeout):
            self.close()
            raise BrokerError(f"test client {self.client_id} did not connect")

    def _on_connect(self, client: paho.Client, userdata: object, flags: paho.ConnectFlags,
                    reason_code: ReasonCode, properties: Properties | None) -> None:
        if not reason_code.is_failure:
            self._connected.set()

    def _on_disconnect(self, client: paho.Client, userdata: object,
                       flags: paho.DisconnectFlags, reason_code: ReasonCode,
                       properties: Properties | None) -> None:
        with self._cond:
            self.disconnects += 1
            self._cond.notify_all()

    @property
    def connected(self) -> bool:
        """True while paho's connection is up."""
        return self._paho.is_connected()

    def _on_message(self, client: paho.Client, userdata: object,
                    msg: paho.MQTTMessage) -> None:
        message = Message(topic=msg.topic, payload=bytes(msg.payload), qos=msg.qos,
                          retain=bool(msg.retain), dup=bool(msg.dup),
                          received_at=time.monotonic())
        with self._cond:
            self._messages.append(message)
            self._cond.notify_all()

    def _on_subscribe(self, client: paho.Client, userdata: object, mid: int,
                      reason_codes: list[ReasonCode], properties: Properties | None) -> None:
        with self._cond:
            self._suback[mid] = reason_codes
            self._cond.notify_all()

    def subscribe(self, topic: str, qos: int = 1, timeout: float = 5.0) -> None:
        """Subscribe and wait for the SUBACK (retained messages follow it at once)."""
        rc, mid = self._paho.subscribe(topic, qos)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            raise BrokerError(f"subscribe {topic}: {paho.error_string(rc)}")
        with self._cond:
            if not self._cond.wait_for(lambda: mid in self._suback, timeout):
                raise BrokerError(f"no SUBACK for {topic}")
            codes = self._suback.pop(mid)
        if any(code.is_failure for code in codes):
            raise BrokerError(f"broker refused subscription to {topic}: {codes}")
        self._subscribed.add(topic)

    def publish(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False,
                timeout: float = 5.0) -> None:
        """Publish and, for QoS > 0, wait until the broker acknowledged it."""
        info = self._paho.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise BrokerError(f"publish {topic}: {paho.error_string(info.rc)}")
        if qos > 0:
            info.wait_for_publish(timeout)
            if not info.is_published():
                raise BrokerError(f"publish {topic}: no acknowledgement in {timeout}s")

    def publish_many(self, topic: str, payloads: Sequence[bytes], qos: int = 0,
                     timeout: float = 30.0) -> None:
        """Publish a burst as fast as paho can queue it, then wait until all are sent."""
        infos = [self._paho.publish(topic, p, qos=qos) for p in payloads]
        deadline = time.monotonic() + timeout
        for info in infos:
            info.wait_for_publish(max(0.0, deadline - time.monotonic()))
            if not info.is_published():
                raise BrokerError(f"burst on {topic}: not all sent in {timeout}s")

    def messages(self, topic: str = "#") -> list[Message]:
        """Every message received so far whose topic matches the filter ``topic``."""
        with self._cond:
            return [m for m in self._messages if paho.topic_matches_sub(topic, m.topic)]

    def expect(
        self,
        topic: str,
        timeout: float = 5.0,
        *,
        count: int = 1,
        where: Callable[[Message], bool] | None = None,
    ) -> list[Message]:
        """Wait until ``count`` messages matching ``topic`` (and ``where``) arrived.

        Subscribes to ``topic`` first if needed.  Returns every matching message so far;
        raises AssertionError naming what did arrive when the time runs out.
        """
        if topic not in self._subscribed:
            self.subscribe(topic)

        def matching() -> list[Message]:
            return [m for m in self._messages
                    if paho.topic_matches_sub(topic, m.topic) and (where is None or where(m))]

        with self._cond:
            if self._cond.wait_for(lambda: len(matching()) >= count, timeout):
                return matching()
            got = [(m.topic, m.payload[:80]) for m in self._messages]
        raise AssertionError(f"expected {count} message(s) on {topic} within {timeout}s; "
                             f"received {got}")

    def clear(self) -> None:
        """Forget the messages received so far."""
        with self._cond:
            self._messages.clear()

    def close(self) -> None:
        """Disconnect cleanly and stop paho's thread."""
        with contextlib.suppress(Exception):
            self._paho.disconnect()
        self._paho.loop_stop()
        # Closes paho's wake-up socket pair now rather than in a garbage-collected cycle.
        self._paho.reinitialise()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
