"""The network side of the agent's MQTT link: the paho client, how it is built, and
what runs on the connection thread inside ``client.loop()`` (:class:`LinkCore`).

:class:`gateway.link.mqtt.MqttLink` adds the public API, the two threads' loops and the
worker on top.  See docs/design/mqtt-link.md.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Final

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from gateway.config import MqttConfig
from gateway.errors import ConfigError
from gateway.link.inbox import Inbound, Inbox, Online
from gateway.link.message import Message, OversizeLog
from gateway.link.stats import LinkStats
from gateway.link.timing import LinkTimings
from gateway.link.tls import TlsContext, broker_tls_context, read_password
from gateway.link.wire import ReadAheadClient, publish_packet_size
from sitelink.topics import liveness_topic

__all__ = ["LinkCore"]

LOGGER = logging.getLogger(__name__)

#: Upper bound on one network-loop wait.  The loop wakes at once for outgoing packets
#: (paho's socket pair) and for incoming bytes; this only bounds how late a timer
#: (liveness, connect deadline, stop) is noticed.
_TICK_MAX_S: Final = 0.25
#: Outgoing QoS>0 messages paho may hold while the broker has not acknowledged them
#: (a frozen broker).  Beyond it publish() returns False instead of growing memory.
_OUTBOUND_MAX: Final = 1000
#: At most one "inbound queue full" / "has room again" pair of log lines per this long.
_SHED_LOG_INTERVAL_S: Final = 10.0
#: Frozen, so one shared default is safe.
_DEFAULT_TIMINGS: Final = LinkTimings()


class LinkCore:
    """The state of one link and its paho client; the callbacks paho runs on the
    connection thread.  Built by :class:`gateway.link.mqtt.MqttLink`, whose docstring
    says what the arguments mean."""

    def __init__(
        self,
        cfg: MqttConfig,
        *,
        status_topic: str,
        birth: Callable[[], bytes],
        will: bytes,
        subscriptions: Sequence[tuple[str, int]],
        on_message: Callable[[Message], None],
        on_connected: Callable[[bool], None] | None = None,
        timings: LinkTimings = _DEFAULT_TIMINGS,
        inbound_max: int = 1000,
        rng: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if inbound_max < 1:
            raise ValueError(f"inbound_max must be at least 1, got {inbound_max}")
        for topic, qos in subscriptions:
            if not topic or qos not in (0, 1, 2):
                raise ValueError(f"invalid subscription {topic!r} with QoS {qos}")
        self._cfg = cfg
        self._status_topic = status_topic
        self._birth = birth
        self._on_message_cb = on_message
        self._on_connected_cb = on_connected
        self._timings = timings
        self._rng = rng
        self._clock = clock
        self._liveness_topic = liveness_topic(status_topic, cfg.client_id)
        self._subscriptions = [*subscriptions, (self._liveness_topic, 0)]
        self._tick = max(0.01, min(_TICK_MAX_S, timings.liveness_interval_s / 5,
                                   timings.liveness_timeout_s / 5))
        self._inbox = Inbox(inbound_max)

        if cfg.password_file is not None:
            # Fail at construction rather than in a retry loop; it is read again on each
            # connection attempt, so a rotated password needs no restart.
            try:
                read_password(cfg)
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(str(cfg.password_file), "mqtt.password_file",
                                  f"cannot read the broker password: {exc}") from exc
            if not cfg.username:
                LOGGER.warning("mqtt.password_file is set but mqtt.username is empty; "
                               "MQTT sends a password only with a user name, so "
                               "none is sent")

        # MQTT 5, for one reason above all: "retain as published".  Under 3.1.1 a broker
        # clears the RETAIN flag when it forwards a live publish to an existing
        # subscriber, so a command someone published *retained* would look like any
        # other, execute, and then replay on every reconnect.  With v5 the flag
        # survives and the verifier rejects it (contract §5: `retained`).
        client = ReadAheadClient(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=cfg.client_id,
            protocol=paho.MQTTv5,
            # A host that is a path is the broker's unix socket (config.MqttConfig).
            transport="unix" if cfg.unix_socket else "tcp",
            reconnect_on_failure=False,  # reconnecting is this module's job
            manual_ack=True,
        )
        client.connect_timeout = timings.connect_timeout_s
        client.max_queued_messages_set(_OUTBOUND_MAX)
        client.max_packet_bytes = cfg.max_packet_bytes
        if publish_packet_size(status_topic, len(will), 1) > cfg.max_packet_bytes:
            raise ValueError(f"the last will ({len(will)} bytes) is over "
                             f"mqtt.max_packet_bytes ({cfg.max_packet_bytes})")
        client.will_set(status_topic, will, qos=1, retain=True)
        self._tls: TlsContext | None = None
        if cfg.tls:
            self._tls = broker_tls_context(cfg)
            client.tls_set_context(self._tls)
        client.enable_logger(LOGGER.getChild("paho"))
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.set_publish_handler(self._on_publish)
        client.on_disconnect = self._on_disconnect
        # With no callback here, paho writes a packet published from another thread
        # straight to the socket from that thread, racing the network thread's writes.
        # With one, it only queues the packet and wakes our select() via its socket
        # pair, so the network thread alone writes and publish() never touches the
        # network.
        client.on_socket_register_write = self._on_register_write
        self._client = client

        # State shared with publish()/ack callers; held around paho calls that queue
        # packets so none lands between reconnect()'s queue reset and its CONNECT.
        self._state_lock = threading.Lock()
        self._generation = 0  # one per connection attempt
        self._live_generation = 0  # the attempt whose CONNACK was accepted, else 0
        self._ready = threading.Event()  # CONNACK + SUBACK: publish() works
        self._stopping = threading.Event()
        self._started = False
        self._threads: list[threading.Thread] = []
        self._offline_by = 0.0  # time.monotonic() by which stop() wants to be offline

        # Per-connection state, touched only on the network thread.
        self._sub_mid: int | None = None
        self._session_present = False
        self._loss_reason: str | None = None
        self._liveness_on = True
        self._ping_token: bytes | None = None
        self._ping_sent_at = 0.0
        self._next_ping_at = 0.0
        self._ping_seq = 0
        self._alive_at = 0.0  # last proof the round trip works
        self._ready_at: float | None = None

        self._stats = LinkStats()
        self._oversize_log = OversizeLog()
        self._shedding = False
        self._shed_log_at = 0.0

    # ----------------------------------------------------------------- stats helpers

    def _count(self, key: str, n: int = 1) -> None:
        self._stats.count(key, n)

    def _set(self, **values: Any) -> None:
        self._stats.set(**values)

    def _abort_socket(self) -> None:
        """Close the socket now, without DISCONNECT, so the broker sends our will."""
        sock = self._client.socket()
        if sock is not None:
            try:
                sock.close()
            except OSError:
                LOGGER.debug("closing the broker socket failed", exc_info=True)

    def _connect_failed(self, reason: str) -> None:
        self._count("connect_failures")
        first = self._stats.swap("last_connect_error", reason) != reason
        # A broker down for an hour must not fill the journal: say it once per reason.
        level = logging.WARNING if first else logging.DEBUG
        LOGGER.log(level, "cannot connect to MQTT broker %s: %s", self._cfg.where, reason)

    def _lost(self, reason: str) -> float | None:
        """Bookkeeping after a connection ended; how long it had been usable."""
        with self._state_lock:
            was_ready = self._ready.is_set()
            connected = self._live_generation != 0
            self._ready.clear()
            self._live_generation = 0
        self._abort_socket()
        now = self._clock()
        up_for = None if self._ready_at is None else now - self._ready_at
        if connected:
            self._count("disconnects")
            self._set(last_disconnect_at=now)
            repeated = self._stats.swap("last_disconnect_reason", reason) == reason
            if reason != "stopped":
                # A broker that drops every connection the same way (a hostile one, an
                # oversize packet) must not fill the journal: once per reason, as connect
                # errors are; the counters keep the tally.
                LOGGER.log(logging.DEBUG if repeated else logging.WARNING,
                           "MQTT connection lost (%s) after %.1fs%s; reconnecting",
                           reason, up_for or 0.0, "" if was_ready else " (not ready)")
        elif reason != "stopped":
            self._connect_failed(reason)
        return up_for

    # ----------------------------------------------------------------- paho callbacks
    # These run inside client.loop() on the connection thread.  They must not raise
    # (paho re-raises into loop()) and must not block.

    def _on_register_write(self, client: paho.Client, userdata: object,
                           sock: paho.SocketLike) -> None:
        """Nothing to do: see the comment where it is installed."""

    def _on_connect(self, client: paho.Client, userdata: object, flags: paho.ConnectFlags,
                    reason_code: ReasonCode, properties: Properties | None) -> None:
        if reason_code.is_failure:
            # paho ends the connection after this; the password is never part of it.
            self._loss_reason = f"broker refused the connection: {reason_code}"
            return
        try:
            now = self._clock()
            with self._state_lock:
                self._live_generation = self._generation
            self._session_present = bool(flags.session_present)
            self._count("connects")
            self._set(last_connect_at=now, session_present=self._session_present,
                      last_connect_error=None)
            # Always, whatever session_present says: a broker restarted without
            # persistence, or with an old database, may not have them.
            rc, mid = client.subscribe([
                (topic, SubscribeOptions(qos=qos, retainAsPublished=True))
                for topic, qos in self._subscriptions
            ])
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                self._loss_reason = f"subscribe failed: {paho.error_string(rc)}"
                self._abort_socket()
                return
            self._sub_mid = mid
            LOGGER.info("connected to MQTT broker %s (session present: %s)",
                        self._cfg.where, self._session_present)
        except Exception:
            LOGGER.exception("internal error handling CONNACK; dropping the connection")
            self._loss_reason = "internal error on CONNACK"
            self._abort_socket()

    def _on_subscribe(self, client: paho.Client, userdata: object, mid: int,
                      reason_codes: list[ReasonCode], properties: Properties | None) -> None:
        if mid != self._sub_mid:
            return
        try:
            refused = [topic for (topic, _), code in zip(self._subscriptions, reason_codes,
                                                          strict=False) if code.is_failure]
            if refused:
                self._count("subscribe_failures", len(refused))
                LOGGER.error("broker refused subscription to %s (check its ACL)",
                             ", ".join(refused))
                if self._liveness_topic in refused:
                    # Without the echo, liveness would fail every time; fall back on
                    # paho's keepalive rather than reconnect forever.
                    self._liveness_on = False
            now = self._clock()
            self._ready_at = now
            self._alive_at = now
            self._next_ping_at = now + self._timings.liveness_interval_s
            with self._state_lock:
                generation = self._generation
                self._ready.set()
            self._inbox.put_online(Online(generation, self._session_present))
        except Exception:
            LOGGER.exception("internal error handling SUBACK; dropping the connection")
            self._loss_reason = "internal error on SUBACK"
            self._abort_socket()

    def _on_message(self, client: paho.Client, userdata: object,
                    msg: paho.MQTTMessage) -> None:
        try:
            self._receive(msg)
        except Exception:
            # The payload stays out of the log; the traceback says where it broke.
            LOGGER.exception("internal error receiving a message; it is dropped")
            self._count("inbound_invalid")

    def _receive(self, msg: paho.MQTTMessage) -> None:
        self._take(msg._topic, bytes(msg.payload), msg.qos, bool(msg.retain), bool(msg.dup),
                   msg.mid)

    def _on_publish(self, raw_topic: bytes, payload: bytes, qos: int,  # noqa: PLR0917
                    retain: bool, dup: bool, mid: int) -> None:
        """paho's lean PUBLISH path (``ReadAheadClient``): positional, no object made."""
        try:
            self._take(raw_topic, payload, qos, retain, dup, mid)
        except Exception:
            # The payload stays out of the log; the traceback says where it broke.
            LOGGER.exception("internal error receiving a message; it is dropped")
            self._count("inbound_invalid")

    def _take(self, raw_topic: bytes, payload: bytes, qos: int,  # noqa: PLR0917
              retain: bool, dup: bool, mid: int) -> None:
        try:
            topic = raw_topic.decode("utf-8")
        except UnicodeDecodeError:
            self._count("inbound_invalid")
            LOGGER.warning("dropped a message whose topic is not UTF-8")
            self._ack(mid, qos, self._generation)
            return
        if topic == self._liveness_topic:
            self._on_echo(payload)
            return
        message = Message(topic=topic, payload=payload, qos=qos, retain=retain, dup=dup,
                          received_at=self._clock())
        if self._inbox.closed:
            return  # stop() is under way: left unacknowledged, the session keeps it
        if self._inbox.put(Inbound(message, mid, self._generation)):
            if self._inbox.evicted:
                self._count("inbound_dropped", len(self._inbox.evicted))
                self._inbox.evicted.clear()  # QoS 0: nothing to acknowledge
            if self._shedding and message.received_at >= self._shed_log_at:
                # Under a flood the queue fills and drains many times a second: one line
                # per transition would be a flood of its own, so at most one per window.
                self._shedding = False
                LOGGER.info("inbound queue has room again; %d message(s) dropped so far",
                            self._stats.get("inbound_dropped"))
            return
        self._count("inbound_dropped")
        if not self._shedding:
            self._shedding = True
            self._shed_log_at = message.received_at + _SHED_LOG_INTERVAL_S
            LOGGER.warning("inbound queue full (%d messages): dropping new messages until "
                           "the handler catches up", self._inbox.peak)
        # Acknowledge the shed message: unacknowledged, it would hold one of the
        # broker's in-flight slots until the next reconnect.
        self._ack(mid, qos, self._generation)

    def _on_echo(self, payload: bytes) -> None:
        if self._ping_token is None or payload != self._ping_token:
            return  # an echo from an earlier connection, or a stranger's
        now = self._clock()
        self._set(liveness_rtt_s=now - self._ping_sent_at)
        self._alive_at = now
        self._ping_token = None
        self._next_ping_at = self._ping_sent_at + self._timings.liveness_interval_s

    def _on_disconnect(self, client: paho.Client, userdata: object,
                       flags: paho.DisconnectFlags, reason_code: ReasonCode,
                       properties: Properties | None) -> None:
        # Only note why: paho may call this while holding its own locks, and the
        # connection thread does the bookkeeping when loop() returns.
        if self._loss_reason is None:
            self._loss_reason = str(reason_code)

    def _ack(self, mid: int, qos: int, generation: int) -> None:
        """PUBACK/PUBCOMP ``mid`` if it belongs to the connection that is still up.

        A packet id from an earlier connection may now name a different message; the
        broker redelivers the old one anyway, so it is left alone.
        """
        if qos == 0:
            return
        with self._state_lock:
            if generation != self._live_generation:
                return
            rc = self._client.ack(mid, qos)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            LOGGER.debug("ack of message %d failed: %s", mid, paho.error_string(rc))
