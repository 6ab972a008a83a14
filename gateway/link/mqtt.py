"""The agent's link to the MQTT broker (paho-mqtt 2.x, MQTT 5): :class:`MqttLink`.

One link owns one broker connection for the life of the agent.  It connects in the
background, forever, and hands the agent whole messages on a thread of its own
(``mqtt-link`` owns the paho client, ``mqtt-inbound`` runs the agent's code).  The
network side is :class:`gateway.link.core.LinkCore`; the paho fast path is
:mod:`gateway.link.wire`.  See docs/design/mqtt-link.md.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
import traceback
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from drivers.mqtt.backoff import Backoff
from gateway.errors import one_line
from gateway.link.core import LinkCore
from gateway.link.inbox import Inbound, Online
from gateway.link.message import FALLBACK_BIRTH, OFFLINE_PAYLOAD
from gateway.link.timing import SESSION_EXPIRY_S
from gateway.link.tls import read_password
from gateway.link.wire import publish_packet_size

__all__ = ["MqttLink"]

LOGGER = logging.getLogger(__name__)


def _frames(exc: BaseException) -> str:
    """The traceback of ``exc`` without its message, which may quote a payload."""
    return "".join(traceback.format_tb(exc.__traceback__)).rstrip()


class MqttLink(LinkCore):
    """The agent's connection to its broker; see docs/design/mqtt-link.md for guarantees.

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
        :data:`~gateway.link.message.OVERSIZE_LOG_INTERVAL_S`, never queued, when the
        whole packet would exceed ``mqtt.max_packet_bytes``: the broker would end the
        connection over it, and a QoS 1 message is sent again after every reconnect, so
        one oversize alarm or birth would keep the site off the broker.
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
        due = self._oversize_log.due(topic, now)
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
        snapshot = self._stats.snapshot()
        snapshot["connected"] = self.connected
        snapshot["inbound_queued"] = len(self._inbox)
        snapshot["inbound_queued_peak"] = self._inbox.peak
        snapshot["liveness_topic"] = self._liveness_topic
        return snapshot

    # ----------------------------------------------------------------- connection thread

    def _run_connection(self) -> None:
        """Connect, run, and after each loss sleep a full-jitter backoff; until stop()."""
        # The first connect is immediate.  Each delay after that doubles the ceiling of
        # the one before (initial, 2 × initial, … up to the cap); a connection that
        # stayed up stable_after_s starts the series again at the initial ceiling.
        backoff = Backoff(self._timings.backoff_initial_s, self._timings.backoff_max_s,
                          self._rng)
        first = True
        try:
            while not self._stopping.is_set():
                if not first:
                    delay = backoff.next_delay()
                    self._stats.add_delay(delay)
                    LOGGER.debug("reconnecting in %.2fs", delay)
                    if self._stopping.wait(delay):
                        break
                first = False
                up_for = self._connection()
                if up_for is not None and up_for >= self._timings.stable_after_s:
                    backoff.reset()
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
            password = read_password(self._cfg)
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

    # ----------------------------------------------------------------- worker thread

    def _run_worker(self) -> None:
        """Run the agent's callbacks, one at a time, until the inbox is closed."""
        while True:
            item = self._inbox.get()
            if item is None:
                return
            try:
                if isinstance(item, Online):
                    self._announce(item)
                else:
                    self._deliver(item)
            except Exception:
                # The agent's exceptions are caught closer to it; this is the link's own
                # bug, and the worker must survive even that (fault matrix #36).
                LOGGER.exception("internal error in the MQTT worker; carrying on")

    def _announce(self, event: Online) -> None:
        """Birth, then on_connected, for a connection that is still the current one."""
        if event.generation != self._live_generation or not self._ready.is_set():
            return  # that connection is already gone; its successor will announce
        try:
            payload = self._birth()
        except Exception as exc:  # noqa: BLE001 -- the agent's code is contained (#36)
            self._handler_failed("birth()", exc, "; publishing a minimal online status")
            payload = FALLBACK_BIRTH
        if not self._fits(self._status_topic, payload, 1):
            payload = FALLBACK_BIRTH  # the link is up, whatever else is unknown
        if not self.publish(self._status_topic, payload, qos=1, retain=True):
            LOGGER.warning("could not publish the online status; the connection dropped")
            return
        if self._on_connected_cb is None:
            return
        try:
            self._on_connected_cb(event.session_present)
        except Exception as exc:  # noqa: BLE001 -- the agent's code is contained (#36)
            self._handler_failed("on_connected", exc)

    def _deliver(self, item: Inbound) -> None:
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

