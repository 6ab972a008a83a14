"""The agent's link to the MQTT broker (paho-mqtt 2.x, MQTT 5).

One :class:`MqttLink` owns one broker connection for the life of the agent.  It connects
in the background, forever, and hands the agent whole messages on a thread of their own.

Threads, and why there are two::

    mqtt-link     owns the paho client: connect, network loop, liveness, backoff.
                  paho's callbacks run here; they only record and enqueue.
    mqtt-inbound  runs the agent's code: on_message, birth(), on_connected, and the
                  PUBACK of each message once its handler returned.

A handler that is slow (a lock that takes seconds to confirm) or stuck therefore never
delays a PINGREQ or a liveness echo (paho issue #328, fault matrix #37), and a handler
that raises is logged and counted while the link carries on (#14, #36).

Guarantees and decisions:

* **Session.** ``clean_start=False`` and a session expiry (MQTT 5; subscriptions made
  with "retain as published" so a retained command is recognisable) with QoS 1
  subscriptions: while the link is away
  briefly, the broker queues commands for it (mosquitto ``max_queued_messages``, 1000
  by default) and delivers them on reconnect.  Duplicates are possible (a redelivery
  after a lost PUBACK); the agent dedupes by ``jti``.
* **Acknowledged after handling.** A QoS 1 message is acknowledged when ``on_message``
  returned (or raised: a message that crashes its handler would crash it again), not when
  it arrived.  An agent killed between the two gets the message again from its session,
  and a stalled handler holds at most the broker's in-flight window (mosquitto
  ``max_inflight_messages``, 20 by default); the rest of a QoS 1 flood waits in the
  broker's bounded queue.  (Mosquitto 2.0.11 lets that window grow once PUBACKs flow,
  so the bounded inbox below is what bounds this process's memory.)
* **Bounded inbox.** At most ``inbound_max`` messages wait for the worker.  When it is
  full the newest message is dropped, counted and (QoS 1) acknowledged, so it does not
  occupy an in-flight slot forever; the broker would only redeliver an unacknowledged
  message after a reconnect anyway.  A flood sheds load rather than growing memory.
* **Every reconnect** re-subscribes every subscription (whatever ``session_present``
  says: a broker restarted without persistence forgets them), then publishes
  ``birth()`` retained QoS 1 on ``status_topic``, then calls ``on_connected``.  Both
  run on the worker, ahead of queued messages but after a handler already running;
  messages a kept session releases right after CONNACK may reach ``on_message`` first.  The
  last will (``will``, retained QoS 1 on ``status_topic``) covers every unclean end; a
  clean :meth:`MqttLink.stop` publishes ``{"online":false}`` itself.
* **Reconnect** is this module's own loop, not paho's ``reconnect_delay_set`` (which has
  no jitter): capped exponential backoff with full jitter, ``uniform(0, min(max,
  initial * 2**n))``, so a site-wide broker restart does not bring every gateway back in
  the same second (fault matrix #4).  ``n`` counts consecutive failed or short-lived
  connections and starts again after one stayed up ``stable_after_s``.
* **Liveness.** Every ``liveness_interval_s`` the link publishes a token on
  ``<status_topic>/liveness/<client_id>``, a topic it is subscribed to itself.  No echo
  within ``liveness_timeout_s`` means the path through the broker is wedged (a frozen
  broker, a half-open TCP connection behind NAT): the socket is closed and the link
  reconnects.  paho's keepalive alone would take up to 1.5 × keepalive to notice, or
  never, when a frozen broker's kernel keeps acknowledging TCP (fault matrix #3).
  Brokers and ACLs must allow the link to publish and subscribe to that topic.
* **Packet size.**  ``mqtt.max_packet_bytes`` (default the shipped broker's
  ``max_packet_size``, 65536) bounds every packet both ways.  It goes to the broker in
  CONNECT as MQTT 5 "Maximum Packet Size"; a larger incoming packet ends the connection
  as soon as its length is decoded, before any of it is buffered (a broker that sends one
  is hostile: :mod:`gateway.link.wire`), counted as ``inbound_oversize``.  A message to
  publish whose whole packet would exceed it is refused by :meth:`MqttLink.publish`,
  counted as ``publish_oversize``, logged once per topic per ten minutes and never
  queued: the broker would drop the link over it, and a QoS 1 message is sent again at
  every reconnect.  The payload limit is therefore the cap minus the packet's header and
  topic (a few dozen bytes): below the broker's limit, never at it.
* **Transport.**  A ``host`` that starts with ``/`` is the broker's unix socket (paho's
  ``unix`` transport; ``port`` unused): deploy/ ships the site broker that way, so no
  local user can pose as the broker on a TCP port while it restarts.
* **Logs** never contain the password; payloads and topics of messages are logged at
  debug level only.  A connection lost for the same reason as the last one is logged
  at debug level: a broker that drops every connection alike fills no journal.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import socket
import ssl
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from gateway.config import MqttConfig
from gateway.errors import ConfigError, one_line
from gateway.link.wire import ReadAheadClient, publish_packet_size
from sitelink.payloads import offline_status_payload
from sitelink.topics import liveness_topic

#: How long the broker keeps our session (subscriptions and queued QoS 1 commands) after
#: a disconnect.  Longer than any command may live (max_lifetime_s is at most a day, 300 s
#: by default), so nothing still valid is lost in a short outage; queued ones that expired
#: meanwhile are rejected `expired` when they arrive.
SESSION_EXPIRY_S: Final = 86_400

__all__ = [
    "OFFLINE_PAYLOAD",
    "LinkTimings",
    "Message",
    "MqttLink",
    "full_jitter_delay",
    "liveness_topic",
    "read_secret_file",
]

LOGGER = logging.getLogger(__name__)

#: What a clean stop leaves retained on the status topic (contract §4).
OFFLINE_PAYLOAD: Final = json.dumps(offline_status_payload(), separators=(",", ":")).encode()
#: Published when ``birth()`` itself fails: the link is up, whatever else is unknown.
_FALLBACK_BIRTH: Final = b'{"online":true}'
#: Upper bound on one network-loop wait.  The loop wakes at once for outgoing packets
#: (paho's socket pair) and for incoming bytes; this only bounds how late a timer
#: (liveness, connect deadline, stop) is noticed.
_TICK_MAX_S: Final = 0.25
#: Outgoing QoS>0 messages paho may hold while the broker has not acknowledged them
#: (a frozen broker).  Beyond it publish() returns False instead of growing memory.
_OUTBOUND_MAX: Final = 1000
#: How many recent reconnect delays stats() reports.
_DELAYS_KEPT: Final = 32
#: Beyond 2**60 the cap has long won; bounding the exponent avoids float overflow.
_MAX_EXPONENT: Final = 60
#: An outgoing message over ``max_packet_bytes`` is logged at most once per topic per
#: this long: an alarm repeated every reconciliation pass must not flood the journal.
_OVERSIZE_LOG_INTERVAL_S: Final = 600.0
#: Topics remembered for that rate limit; beyond it the memory starts afresh (unit
#: topics are bounded by the config, so this is only a guard).
_OVERSIZE_TOPICS_KEPT: Final = 256


@dataclass(frozen=True, slots=True)
class Message:
    """One message from the broker, as the agent sees it.

    ``received_at`` is the link's monotonic clock when paho decoded the packet, so the
    agent can measure queueing delay.  ``retain`` is true for a retained message
    delivered on subscribe (a command must reject it, contract §5); ``dup`` for a
    redelivery the broker marked as such.
    """

    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool
    received_at: float


@dataclass(frozen=True, slots=True)
class LinkTimings:
    """Every timing of the link, in seconds; tests shrink them rather than sleep.

    ``backoff_initial_s`` / ``backoff_max_s``: reconnect delays, ``uniform(0, min(max,
    initial * 2**n))`` (full jitter, "Exponential Backoff And Jitter", AWS Architecture
    Blog, 2015); the cap keeps a gateway that was offline for an hour trying every
    minute.  ``liveness_interval_s`` / ``liveness_timeout_s``: how often the link proves
    the round trip through the broker, and how long an echo may take on a healthy
    loopback or LAN broker (milliseconds in practice; 10 s tolerates a loaded broker).
    ``connect_timeout_s`` bounds TCP connect, TLS handshake, CONNACK and SUBACK
    together.  ``stable_after_s``: a connection that stayed up this long resets the
    backoff, so a broker that accepts and then drops every connection still meets a
    growing delay.
    """

    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    liveness_interval_s: float = 15.0
    liveness_timeout_s: float = 10.0
    connect_timeout_s: float = 10.0
    stable_after_s: float = 30.0

    def __post_init__(self) -> None:
        for name in ("backoff_initial_s", "backoff_max_s", "liveness_interval_s",
                     "liveness_timeout_s", "connect_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"LinkTimings.{name} must be > 0, got {getattr(self, name)}")
        if self.stable_after_s < 0:
            raise ValueError(f"LinkTimings.stable_after_s must be >= 0, got "
                             f"{self.stable_after_s}")
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError("LinkTimings.backoff_max_s must be >= backoff_initial_s")


def full_jitter_delay(attempt: int, initial: float, cap: float,
                      rng: Callable[[], float]) -> float:
    """The delay before reconnect ``attempt`` (0-based): ``rng() * min(cap, initial * 2**n)``.

    ``rng`` returns a float in ``[0, 1)``; it is injected so tests can pin it.
    """
    ceiling = min(cap, initial * 2.0 ** min(max(attempt, 0), _MAX_EXPONENT))
    return rng() * ceiling


def read_secret_file(path: Path | None) -> str | None:
    """A password kept in the file ``path`` (``None``: none), without one trailing newline.

    Raises OSError or UnicodeDecodeError; the text never appears in either.
    """
    if path is None:
        return None
    text = path.read_text(encoding="utf-8")
    # One newline is what `echo secret > file` adds; more is taken as meant.
    if text.endswith("\r\n"):
        return text[:-2]
    if text.endswith("\n"):
        return text[:-1]
    return text


def _read_password(cfg: MqttConfig) -> str | None:
    """The broker password from ``cfg.password_file`` without one trailing newline."""
    return read_secret_file(cfg.password_file)


class _TlsContext(ssl.SSLContext):
    """An SSLContext that remembers the socket it wrapped last.

    paho 2.2 does not close the TLS socket when the handshake fails (a wrong CA, a
    hostname mismatch): without this, every failed attempt would leak a descriptor
    until the garbage collector found it.
    """

    last_wrapped: ssl.SSLSocket | None = None

    def wrap_socket(self, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        """Wrap as usual and keep a reference for :meth:`close_failed`."""
        sock = super().wrap_socket(*args, **kwargs)
        self.last_wrapped = sock
        return sock

    def close_failed(self, current: object) -> None:
        """Close the last wrapped socket unless it is ``current`` (the one in use)."""
        sock, self.last_wrapped = self.last_wrapped, None
        if sock is not None and sock is not current:
            sock.close()


def _tls_context(cfg: MqttConfig) -> _TlsContext:
    """A client TLS context: the site's CA, TLS ≥ 1.2, hostname checked, optional cert."""
    assert cfg.ca_file is not None  # config.py requires ca_file when tls is on
    # PROTOCOL_TLS_CLIENT verifies the chain and the hostname by default; both are set
    # again below so a later edit cannot quietly weaken them.
    context = _TlsContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cafile=str(cfg.ca_file))
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise ConfigError(str(cfg.ca_file), "mqtt.ca_file",
                          f"cannot load the CA certificate: {exc}") from exc
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cfg.cert_file is not None and cfg.key_file is not None:
        try:
            context.load_cert_chain(str(cfg.cert_file), str(cfg.key_file))
        except (OSError, ValueError) as exc:
            raise ConfigError(str(cfg.cert_file), "mqtt.cert_file",
                              f"cannot load the client certificate and key: {exc}") from exc
    return context


def _frames(exc: BaseException) -> str:
    """The traceback of ``exc`` without its message, which may quote a payload."""
    return "".join(traceback.format_tb(exc.__traceback__)).rstrip()


# --------------------------------------------------------------------------- inbox


@dataclass(frozen=True, slots=True)
class _Inbound:
    """A message waiting for the worker, with what is needed to acknowledge it."""

    message: Message
    mid: int
    generation: int


@dataclass(frozen=True, slots=True)
class _Online:
    """A connection is subscribed: publish birth and call on_connected."""

    generation: int
    session_present: bool


class _Inbox:
    """The bounded hand-over from the network thread to the worker.

    Messages queue in order up to ``maxlen``; the "online" event jumps the queue and only
    the newest one is kept, because birth must not wait behind a thousand commands and
    an event of a connection already gone is worthless.

    QoS 0 messages wait in a lane of their own, served only when no QoS 1 message
    waits, and a QoS 1 message that finds the inbox full takes the place of the newest
    QoS 0 one.  Every inbound topic of the contract is QoS 1, so a QoS 0 publish there
    comes from something other than the relay; under a flood, it is what goes first.
    """

    def __init__(self, maxlen: int) -> None:
        self._maxlen = maxlen
        self._messages: deque[_Inbound] = deque()
        self._best_effort: deque[_Inbound] = deque()  # QoS 0
        self._online: _Online | None = None
        self._closed = False
        self._cond = threading.Condition()
        self.peak = 0
        self.evicted: list[_Inbound] = []  # QoS 0 messages pushed out; the caller counts

    def put(self, item: _Inbound) -> bool:
        """Queue a message; False (and nothing queued) when full or closed."""
        with self._cond:
            if self._closed:
                return False
            size = len(self._messages) + len(self._best_effort)
            if item.message.qos == 0:
                if size >= self._maxlen:
                    return False
                self._best_effort.append(item)
            else:
                if size >= self._maxlen:
                    if not self._best_effort:
                        return False
                    self.evicted.append(self._best_effort.pop())
                    size -= 1
                self._messages.append(item)
            self.peak = max(self.peak, size + 1)
            self._cond.notify()
            return True

    def put_online(self, event: _Online) -> None:
        """Replace any pending online event with ``event``."""
        with self._cond:
            self._online = event
            self._cond.notify()

    def get(self) -> _Inbound | _Online | None:
        """The next item, waiting as long as needed; None once closed."""
        with self._cond:
            while True:
                if self._closed:
                    return None
                if self._online is not None:
                    event, self._online = self._online, None
                    return event
                if self._messages:
                    return self._messages.popleft()
                if self._best_effort:
                    return self._best_effort.popleft()
                self._cond.wait()

    def close(self) -> None:
        """Wake the worker and make it stop; queued messages stay unacknowledged."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        """True once close() was called."""
        return self._closed

    def __len__(self) -> int:
        with self._cond:
            return len(self._messages) + len(self._best_effort)


# --------------------------------------------------------------------------- the link


#: At most one "inbound queue full" / "has room again" pair of log lines per this long.
_SHED_LOG_INTERVAL_S: Final = 10.0


class MqttLink:
    """The agent's connection to its broker; see the module docstring for guarantees.

    ``status_topic`` carries ``birth()`` (retained, on every connect), the last will
    ``will`` and, on a clean stop, ``{"online":false}``.  ``subscriptions`` are
    ``(topic filter, qos)`` pairs made on every connect.  ``on_message`` and
    ``on_connected(session_present)`` run on the link's worker thread, one at a time, in
    arrival order; whatever they raise is logged and counted.

    ``rng`` (``[0, 1)``) and ``clock`` (monotonic seconds) are injectable for tests; the
    link's waits (backoff sleep, network select) use real time.

    Raises :class:`~gateway.errors.ConfigError` when the TLS material or the password
    file cannot be read, and ValueError for an invalid subscription or inbound_max.
    """

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
        timings: LinkTimings = LinkTimings(),  # frozen, so one shared default is safe
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
        self._inbox = _Inbox(inbound_max)

        if cfg.password_file is not None:
            # Fail at construction rather than in a retry loop; it is read again on each
            # connection attempt, so a rotated password needs no restart.
            try:
                _read_password(cfg)
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
        self._tls: _TlsContext | None = None
        if cfg.tls:
            self._tls = _tls_context(cfg)
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

        self._stats_lock = threading.Lock()
        self._stats: dict[str, Any] = {
            "connects": 0,
            "connect_attempts": 0,
            "connect_failures": 0,
            "disconnects": 0,
            "reconnect_delays": deque(maxlen=_DELAYS_KEPT),
            "last_connect_at": None,
            "last_disconnect_at": None,
            "last_disconnect_reason": None,
            "last_connect_error": None,
            "session_present": None,
            "subscribe_failures": 0,
            "liveness_failures": 0,
            "liveness_last_detect_s": None,
            "liveness_rtt_s": None,
            "inbound_dropped": 0,
            "inbound_invalid": 0,
            "handled": 0,
            "handler_errors": 0,
            "published": 0,
            "publish_refused": 0,
            "publish_oversize": 0,
            "inbound_oversize": 0,
        }
        # Outgoing oversize messages: topic -> when it may be logged again (clock).
        self._oversize_logged: dict[str, float] = {}
        self._shedding = False
        self._shed_log_at = 0.0

    # ----------------------------------------------------------------- public API

    def start(self) -> None:
        """Start connecting in the background and return at once; it retries forever."""
        if self._started:
            raise RuntimeError("MqttLink.start() was already called; make a new link")
        self._started = True
        self._threads = [
            threading.Thread(target=self._run_worker, name="mqtt-inbound", daemon=True),
            threading.Thread(target=self._run_connection, name="mqtt-link", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Go offline cleanly within about ``timeout`` seconds.

        The handler running now may finish (so its result is still published), queued
        messages are left unacknowledged (the broker keeps them in the session), then
        ``{"online":false}`` is published retained on the status topic, the connection
        is closed with DISCONNECT (so the will is not sent) and the threads are joined.
        Safe to call twice, or from a handler (the worker then is not joined).
        """
        if not self._started or self._stopping.is_set():
            self._stopping.set()
            return
        deadline = time.monotonic() + timeout
        # Leave a tenth of the budget for joining the thread after its last wait.
        self._offline_by = deadline - timeout / 10
        self._inbox.close()
        worker, connection = self._threads
        if threading.current_thread() is not worker:
            worker.join(max(0.0, timeout / 2))
            if worker.is_alive():
                LOGGER.warning("the message handler did not return within %.1fs; going "
                               "offline without it", timeout / 2)
        self._stopping.set()
        if threading.current_thread() is not connection:
            connection.join(max(0.0, deadline - time.monotonic()))
            if connection.is_alive():
                LOGGER.warning("MQTT link did not close within %.1fs", timeout)

    def publish(self, topic: str, payload: bytes, *, qos: int = 1,
                retain: bool = False) -> bool:
        """Queue ``payload`` for the broker; never waits on the network.

        Returns False when the link is not connected (or paho's outgoing queue is full
        because the broker stopped acknowledging): the caller decides what to do, and
        retained state is republished from ``on_connected``.  True means queued; a QoS 1
        message queued just before a connection loss is resent after the reconnect.

        Also False, counted (``publish_oversize``) and logged once per topic and
        :data:`_OVERSIZE_LOG_INTERVAL_S`, never queued, when the whole packet would
        exceed ``mqtt.max_packet_bytes``: the broker would end the connection over it,
        and a QoS 1 message is sent again after every reconnect, so one oversize alarm
        or birth would keep the site off the broker.
        Raises ValueError for an invalid topic or QoS (a bug, not a network condition).
        """
        if not self._fits(topic, payload, qos):
            return False
        with self._state_lock:
            if not self._ready.is_set() or self._stopping.is_set():
                self._count("publish_refused")
                return False
            info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._count("publish_refused")
            LOGGER.debug("publish to %s refused: %s", topic, paho.error_string(info.rc))
            return False
        self._count("published")
        return True

    def _fits(self, topic: str, payload: bytes, qos: int) -> bool:
        """Whether this message stays within ``max_packet_bytes``; counts and logs if not."""
        size = publish_packet_size(topic, len(payload), qos)
        cap = self._cfg.max_packet_bytes
        if size <= cap:
            return True
        self._count("publish_oversize")
        now = self._clock()
        with self._stats_lock:
            due = self._oversize_logged.get(topic, now) <= now
            if due:
                if len(self._oversize_logged) >= _OVERSIZE_TOPICS_KEPT:
                    self._oversize_logged.clear()
                self._oversize_logged[topic] = now + _OVERSIZE_LOG_INTERVAL_S
        LOGGER.log(logging.WARNING if due else logging.DEBUG,
                   "not publishing a %d-byte message on %s: over mqtt.max_packet_bytes "
                   "(%d), the broker would drop the connection", size, topic, cap)
        return False

    @property
    def connected(self) -> bool:
        """True while connected and subscribed (publish() then queues)."""
        return self._ready.is_set()

    def wait_connected(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for :attr:`connected`; return it."""
        return self._ready.wait(timeout)

    def threads(self) -> list[threading.Thread]:
        """The link's own threads (network and worker), for the watchdog's liveness check;
        empty before :meth:`start`."""
        return list(self._threads)

    def stats(self) -> dict[str, Any]:
        """A snapshot of the link's counters and last events, for ``status`` and tests.

        Times (``*_at``) are the link's clock.  ``liveness_last_detect_s`` is how long
        the broker had been silent (since the last echo) when the last wedge was
        detected; ``reconnect_delays`` are the most recent backoff sleeps, oldest first.
        """
        with self._stats_lock:
            snapshot = dict(self._stats)
            snapshot["reconnect_delays"] = list(self._stats["reconnect_delays"])
        snapshot["connected"] = self.connected
        snapshot["inbound_queued"] = len(self._inbox)
        snapshot["inbound_queued_peak"] = self._inbox.peak
        snapshot["liveness_topic"] = self._liveness_topic
        return snapshot

    # ----------------------------------------------------------------- stats helpers

    def _count(self, key: str, n: int = 1) -> None:
        with self._stats_lock:
            self._stats[key] += n

    def _set(self, **values: Any) -> None:
        with self._stats_lock:
            self._stats.update(values)

    # ----------------------------------------------------------------- connection thread

    def _run_connection(self) -> None:
        """Connect, run, and after each loss sleep a full-jitter backoff; until stop()."""
        # The first connect is immediate.  Each delay after that doubles the ceiling of
        # the one before (initial, 2 × initial, … up to the cap); a connection that
        # stayed up stable_after_s starts the series again at the initial ceiling.
        exponent = 0
        first = True
        try:
            while not self._stopping.is_set():
                if not first:
                    delay = full_jitter_delay(exponent, self._timings.backoff_initial_s,
                                              self._timings.backoff_max_s, self._rng)
                    exponent = min(exponent + 1, _MAX_EXPONENT)
                    with self._stats_lock:
                        self._stats["reconnect_delays"].append(delay)
                    LOGGER.debug("reconnecting in %.2fs", delay)
                    if self._stopping.wait(delay):
                        break
                first = False
                up_for = self._connection()
                if up_for is not None and up_for >= self._timings.stable_after_s:
                    exponent = 0
        except BaseException:
            # Nothing above should raise; if something does, the agent must hear of it
            # rather than sit silently offline.
            LOGGER.critical("MQTT connection thread died; the link is offline",
                            exc_info=True)
            raise
        finally:
            with self._state_lock:
                self._ready.clear()
                self._live_generation = 0
                # paho has no close(): reinitialise() is its public way to close the
                # socket pair it made for loop(), and it drops our callbacks, so no
                # link <-> client cycle leaves descriptors to the garbage collector.
                self._client.reinitialise(client_id=self._cfg.client_id,
                                          clean_session=False)

    def _connection(self) -> float | None:
        """One connection from connect to loss; how long it was usable, None if never."""
        with self._state_lock:
            self._generation += 1
        self._loss_reason = None
        self._sub_mid = None
        self._liveness_on = True
        self._ping_token = None
        self._ready_at = None
        self._count("connect_attempts")
        started = self._clock()
        try:
            self._set_credentials()
            # clean_start=False plus a session expiry: the broker keeps our QoS 1
            # subscriptions and queues commands while we are briefly away (v5's form of
            # 3.1.1's clean_session=False); duplicates are the inbox's to drop.
            connect_props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            connect_props.SessionExpiryInterval = SESSION_EXPIRY_S
            # The broker must not send a larger packet (MQTT 5 §3.1.2.11.4; Mosquitto
            # drops such a message for this client); ReadAheadClient refuses one anyway.
            connect_props.MaximumPacketSize = self._cfg.max_packet_bytes
            self._client.oversize = None
            self._client.connect(self._cfg.host, self._cfg.port,
                                 keepalive=self._cfg.keepalive_s, clean_start=False,
                                 properties=connect_props)
            self._no_delay()
        except (OSError, ValueError) as exc:  # refused, unreachable, TLS, bad CA file
            if self._tls is not None:
                self._tls.close_failed(self._client.socket())
            self._connect_failed(one_line(str(exc)) or type(exc).__name__)
            return None
        deadline = started + self._timings.connect_timeout_s
        reason = self._run_network(deadline)
        oversize = self._client.oversize
        if oversize is not None:
            reason = self._refused_oversize(oversize)
        return self._lost(reason)

    def _refused_oversize(self, size: int) -> str:
        """Count an incoming packet over ``max_packet_bytes``; the reason the connection
        ended (logged by :meth:`_lost`, once while it repeats)."""
        self._count("inbound_oversize")
        return (f"the broker sent a {size}-byte packet, over mqtt.max_packet_bytes "
                f"({self._cfg.max_packet_bytes}); dropped before buffering it")

    def _set_credentials(self) -> None:
        if not self._cfg.username:
            return
        try:
            password = _read_password(self._cfg)
        except (OSError, UnicodeDecodeError) as exc:
            raise OSError(f"cannot read mqtt.password_file: {exc}") from exc
        self._client.username_pw_set(self._cfg.username, password)

    def _no_delay(self) -> None:
        """Turn Nagle's algorithm off: paho leaves it on, and a small PUBLISH/PUBACK then
        waits for the peer's delayed ACK (~40 ms on Linux) — a command's whole latency
        budget.  The packets here are tiny and latency is the point."""
        sock: Any = self._client.socket()
        if sock is None:
            return
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, AttributeError):  # not a TCP socket (e.g. a test double)
            LOGGER.debug("could not set TCP_NODELAY", exc_info=True)

    def _run_network(self, deadline: float) -> str:
        """Drive paho until the connection ends or stop(); the reason it ended."""
        while True:
            if self._stopping.is_set():
                try:
                    self._go_offline()
                except Exception:  # going offline must end, cleanly or not
                    LOGGER.exception("error while going offline; closing the socket")
                    self._abort_socket()
                return "stopped"
            try:
                rc = self._client.loop(timeout=self._tick)
                # paho stops after a packet or two per call; bytes already read ahead
                # would otherwise wait for the next select() to time out.
                while rc == MQTTErrorCode.MQTT_ERR_SUCCESS and self._client.buffered():
                    rc = self._client.loop_read()
            except Exception as exc:  # paho or one of our callbacks: never kill the thread
                LOGGER.exception("MQTT network loop failed; reconnecting")
                return f"network loop error: {type(exc).__name__}"
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or self._client.socket() is None:
                return self._loss_reason or paho.error_string(rc)
            now = self._clock()
            if not self._ready.is_set():
                if now >= deadline:
                    self._abort_socket()
                    phase = "CONNACK" if self._live_generation == 0 else "SUBACK"
                    return (f"no {phase} within {self._timings.connect_timeout_s:g}s "
                            "(broker frozen or overloaded?)")
            elif self._liveness_on:
                wedged = self._check_liveness(now)
                if wedged is not None:
                    return wedged

    def _check_liveness(self, now: float) -> str | None:
        """Send the next token when due; a reason when the last one never came back."""
        timings = self._timings
        if self._ping_token is not None:
            if now - self._ping_sent_at < timings.liveness_timeout_s:
                return None
            silent = now - self._alive_at
            self._count("liveness_failures")
            self._set(liveness_last_detect_s=silent)
            LOGGER.warning("no liveness echo from the broker within %.1fs (silent for "
                           "%.1fs): the connection is wedged; closing it",
                           timings.liveness_timeout_s, silent)
            self._abort_socket()
            return f"liveness echo missing for {timings.liveness_timeout_s:g}s"
        if now >= self._next_ping_at:
            self._ping_seq += 1
            token = f"{self._generation}:{self._ping_seq}".encode()
            info = self._client.publish(self._liveness_topic, token, qos=0, retain=False)
            if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
                self._ping_token = token
                self._ping_sent_at = now
        return None

    def _go_offline(self) -> None:
        """Publish the offline status, DISCONNECT, and wait (bounded) for both to go out."""
        # Real time, not the injected clock: stop() must end even with a frozen clock.
        deadline = self._offline_by
        if self._ready.is_set():
            with self._state_lock:
                self._ready.clear()
                info = self._client.publish(self._status_topic, OFFLINE_PAYLOAD, qos=1,
                                            retain=True)
            while not info.is_published() and time.monotonic() < deadline:
                if self._client.loop(timeout=self._tick) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    break
        self._client.disconnect()
        while self._client.socket() is not None and time.monotonic() < deadline:
            if self._client.loop(timeout=self._tick) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                break
        self._abort_socket()
        # paho's wake-up socket pair (made by loop()) is closed only by its __del__,
        # which the GC may reach after the sockets themselves (an unclosed-socket
        # warning at exit): closed here, as the link ends.
        reset = getattr(self._client, "_reset_sockets", None)
        if callable(reset):
            with contextlib.suppress(Exception):
                reset()
        LOGGER.info("MQTT link stopped")

    def _abort_socket(self) -> None:
        """Close the socket now, without DISCONNECT, so the broker sends our will."""
        sock = self._client.socket()
        if sock is not None:
            try:
                sock.close()
            except OSError:
                LOGGER.debug("closing the broker socket failed", exc_info=True)

    def _connect_failed(self, reason: str) -> None:
        with self._stats_lock:
            self._stats["connect_failures"] += 1
            first = self._stats["last_connect_error"] != reason
            self._stats["last_connect_error"] = reason
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
            with self._stats_lock:
                self._stats["disconnects"] += 1
                self._stats["last_disconnect_at"] = now
                repeated = self._stats["last_disconnect_reason"] == reason
                self._stats["last_disconnect_reason"] = reason
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
            with self._stats_lock:
                self._stats["connects"] += 1
                self._stats["last_connect_at"] = now
                self._stats["session_present"] = self._session_present
                self._stats["last_connect_error"] = None
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
            self._inbox.put_online(_Online(generation, self._session_present))
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
        """paho's lean PUBLISH path (``_ReadAheadClient``): positional, no object made."""
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
        if self._inbox.put(_Inbound(message, mid, self._generation)):
            if self._inbox.evicted:
                self._count("inbound_dropped", len(self._inbox.evicted))
                self._inbox.evicted.clear()  # QoS 0: nothing to acknowledge
            if self._shedding and message.received_at >= self._shed_log_at:
                # Under a flood the queue fills and drains many times a second: one line
                # per transition would be a flood of its own, so at most one per window.
                self._shedding = False
                LOGGER.info("inbound queue has room again; %d message(s) dropped so far",
                            self.stats()["inbound_dropped"])
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

    # ----------------------------------------------------------------- worker thread

    def _run_worker(self) -> None:
        """Run the agent's callbacks, one at a time, until the inbox is closed."""
        while True:
            item = self._inbox.get()
            if item is None:
                return
            try:
                if isinstance(item, _Online):
                    self._announce(item)
                else:
                    self._deliver(item)
            except Exception:
                # The agent's exceptions are caught closer to it; this is the link's own
                # bug, and the worker must survive even that (fault matrix #36).
                LOGGER.exception("internal error in the MQTT worker; carrying on")

    def _announce(self, event: _Online) -> None:
        """Birth, then on_connected, for a connection that is still the current one."""
        if event.generation != self._live_generation or not self._ready.is_set():
            return  # that connection is already gone; its successor will announce
        try:
            payload = self._birth()
        except Exception as exc:  # noqa: BLE001 -- the agent's code is contained (#36)
            self._handler_failed("birth()", exc, "; publishing a minimal online status")
            payload = _FALLBACK_BIRTH
        if not self._fits(self._status_topic, payload, 1):
            payload = _FALLBACK_BIRTH  # the link is up, whatever else is unknown
        if not self.publish(self._status_topic, payload, qos=1, retain=True):
            LOGGER.warning("could not publish the online status; the connection dropped")
            return
        if self._on_connected_cb is None:
            return
        try:
            self._on_connected_cb(event.session_present)
        except Exception as exc:  # noqa: BLE001 -- the agent's code is contained (#36)
            self._handler_failed("on_connected", exc)

    def _deliver(self, item: _Inbound) -> None:
        message = item.message
        try:
            self._on_message_cb(message)
            self._count("handled")
        except Exception as exc:  # noqa: BLE001 -- the agent's code is contained (#36)
            self._handler_failed(
                "on_message", exc, f" for a message (QoS {message.qos}, "
                f"{len(message.payload)} bytes)", topic=message.topic)
        # Acknowledged even when the handler raised: redelivered, it would raise again.
        self._ack(item.mid, message.qos, item.generation)

    def _handler_failed(self, what: str, exc: Exception, context: str = "",
                        topic: str | None = None) -> None:
        """Count and log an exception from the agent's code; the link carries on."""
        self._count("handler_errors")
        # The exception's text may quote the payload (a JSON error shows its input), so
        # the ERROR line has its type and frames; the text and topic go to DEBUG.
        LOGGER.error("%s raised %s%s; the link carries on\n%s",
                     what, type(exc).__name__, context, _frames(exc))
        LOGGER.debug("%s raised %r (topic %s)", what, exc, topic, exc_info=exc)

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
