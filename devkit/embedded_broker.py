"""The demo's embedded MQTT broker: a small one in pure Python, for machines without Mosquitto.

``stora-gateway demo`` must run on a fresh machine with nothing but Python, so when no
``mosquitto`` (1.6 or later: the agent needs MQTT 5) is on PATH or in /usr/sbin, the
demo runs :class:`EmbeddedBroker` instead.  It is a demo broker, not a site broker: one
asyncio loop on one thread, 127.0.0.1, anonymous, state in memory, no TLS, no ACL.  It
speaks what paho-mqtt 2 and ``gateway.link.MqttLink`` use, in MQTT 3.1.1 and 5:

* CONNECT / CONNACK, with sessions kept in memory: ``clean_start=False`` (v5) or
  ``clean_session=False`` (3.1.1) resumes subscriptions, QoS 1 messages queued while
  away and unacknowledged ones (sent again with DUP); a v5 session with a non-zero
  expiry is kept until the broker stops (a demo lasts a minute), one with none ends with
  its connection; a second connection with the same client id takes the session over;
* SUBSCRIBE / UNSUBSCRIBE with ``+`` and ``#`` (``$``-topics are not matched by a
  leading wildcard), granted QoS at most 1; v5 options No Local, Retain As Published
  and Retain Handling;
* PUBLISH QoS 0 and 1 (PUBACK), QoS 2 in (PUBREC / PUBREL / PUBCOMP, delivered once)
  and forwarded at QoS 1; retained messages (an empty payload clears one); v5
  properties forwarded except topic aliases (none are allowed: Topic Alias Maximum 0);
* the last will on any end but a clean DISCONNECT (v5 reason 0x04 keeps it), and on a
  keepalive missed for 1.5 × its interval; PINGREQ / PINGRESP.

Not supported, refused or ignored: MQTT 3.1 (CONNACK "unacceptable protocol version"),
shared subscriptions (SUBACK failure), subscription identifiers, AUTH, will delay,
message expiry, flow control (Receive Maximum).  :class:`MosquittoBroker` runs the real
thing on a free port with a throw-away config; :func:`start_broker` picks one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Final

from devkit.mqtt_codec import (
    ASSIGNED_CLIENT_ID,
    CONNACK,
    CONNECT,
    DISCONNECT,
    PINGREQ,
    PINGRESP,
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBREC,
    PUBREL,
    SESSION_EXPIRY,
    SHARED_SUB_AVAILABLE,
    SUB_ID_AVAILABLE,
    SUBACK,
    SUBSCRIBE,
    SUBSCRIPTION_ID,
    TOPIC_ALIAS,
    UNSUBACK,
    UNSUBSCRIBE,
    ProtocolError,
    Reader,
    encode_properties,
    encode_string,
    packet,
    topic_matches,
    valid_filter,
)

LOGGER = logging.getLogger(__name__)

#: How long a clean stop may take (the broker's tasks here; SIGTERM to Mosquitto).
STOP_TIMEOUT_S: Final = 5.0
#: Largest packet the embedded broker accepts (commands are at most 4 KiB).
MAX_PACKET: Final = 1 << 20
#: QoS 1 messages kept for a session while its client is away (Mosquitto's default).
MAX_QUEUED: Final = 1000
#: MQTT 3.1.1 §3.1.2.10 / MQTT 5 §3.1.2.10: no packet for 1.5 keepalives ends a client.
KEEPALIVE_GRACE: Final = 1.5


# -- broker state -----------------------------------------------------------------------
@dataclass(slots=True)
class _Message:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    props: list[tuple[int, bytes]]


@dataclass(slots=True)
class _Subscription:
    qos: int
    no_local: bool = False
    retain_as_published: bool = False


@dataclass(slots=True)
class _Session:
    client_id: str
    subscriptions: dict[str, _Subscription] = field(default_factory=dict)
    #: QoS 1 messages waiting for the client (it is away, or they wait their turn).
    queued: deque[tuple[_Message, int, bool]] = field(default_factory=deque)
    #: packet id -> (message, qos, retain) sent and not yet acknowledged.
    inflight: dict[int, tuple[_Message, int, bool]] = field(default_factory=dict)
    #: QoS 2 packet ids received and delivered, until their PUBREL.
    qos2_received: set[int] = field(default_factory=set)
    next_id: int = 0
    #: Seconds the session outlives its connection; None is "until the broker stops".
    expiry_s: float | None = 0.0
    connection: _Connection | None = None

    def packet_id(self) -> int:
        """The next free packet identifier (1–65535)."""
        for _ in range(65535):
            self.next_id = self.next_id % 65535 + 1
            if self.next_id not in self.inflight:
                return self.next_id
        raise ProtocolError("no free packet identifier")  # 65535 unacknowledged messages


class _Connection:
    """One client's TCP connection."""

    def __init__(self, broker: EmbeddedBroker, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.broker = broker
        self.reader = reader
        self.writer = writer
        self.version = 4
        self.session: _Session | None = None
        self.will: _Message | None = None
        self.keepalive_s = 0
        self.closed = False

    def send(self, data: bytes) -> None:
        """Queue bytes for the client (the loop writes them)."""
        if not self.closed:
            self.writer.write(data)

    def close(self) -> None:
        """Close the socket; the reading task then ends."""
        if not self.closed:
            self.closed = True
            self.writer.close()


class EmbeddedBroker:
    """An MQTT 3.1.1 / 5 broker on one asyncio thread (see the module docstring).

    ``start()`` returns once it listens (:attr:`port` is then the real port);
    ``stop()`` closes every connection and joins the thread.  Also a context manager.
    """

    kind = "embedded"

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self._sessions: dict[str, _Session] = {}
        self._retained: dict[str, _Message] = {}
        self._connections: set[_Connection] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def description(self) -> str:
        """What runs where, for the demo's header."""
        return f"embedded MQTT broker (pure Python) on {self.host}:{self.port}"

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> EmbeddedBroker:
        """Listen and serve on a thread of its own."""
        if self._thread is not None:
            raise RuntimeError("the broker is already running")
        self._thread = threading.Thread(target=self._run, name="demo-broker", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            self._thread = None
            raise OSError(f"the embedded broker cannot listen: {self._error}")
        LOGGER.info("embedded broker on %s:%d", self.host, self.port)
        return self

    def stop(self) -> None:
        """Close every connection and the listener; wait for the thread.  Idempotent."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        loop, stop = self._loop, self._stop_event
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                loop.call_soon_threadsafe(stop.set)
        thread.join()

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported to start(), or logged
            if not self._ready.is_set():
                self._error = exc
                self._ready.set()
            else:
                LOGGER.exception("the embedded broker failed")

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        tasks = self._tasks
        try:
            await self._stop_event.wait()
        finally:
            server.close()
            for connection in list(self._connections):
                connection.close()  # each task then reads end-of-stream and ends
            if tasks:
                _, stuck = await asyncio.wait(list(tasks), timeout=STOP_TIMEOUT_S)
                for task in stuck:
                    task.cancel()
            await server.wait_closed()

    # -- one connection -----------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        sock = writer.get_extra_info("socket")
        if sock is not None:  # a PUBACK must not wait for a delayed ACK (~40 ms)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        connection = _Connection(self, reader, writer)
        self._connections.add(connection)
        clean = False
        try:
            clean = await self._converse(connection)
        except (ProtocolError, asyncio.IncompleteReadError, ConnectionError, TimeoutError) as exc:
            LOGGER.debug("connection ended: %s", exc or type(exc).__name__)
        finally:
            self._connections.discard(connection)
            connection.close()
            self._ended(connection, clean)
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            if task is not None:
                self._tasks.discard(task)

    async def _read_packet(self, connection: _Connection) -> tuple[int, int, bytes]:
        reader = connection.reader
        timeout = connection.keepalive_s * KEEPALIVE_GRACE or None
        async with asyncio.timeout(timeout):
            first = (await reader.readexactly(1))[0]
            length = 0
            for shift in range(0, 28, 7):
                digit = (await reader.readexactly(1))[0]
                length |= (digit & 0x7F) << shift
                if not digit & 0x80:
                    break
            else:
                raise ProtocolError("remaining length longer than 4 bytes")
            if length > MAX_PACKET:
                raise ProtocolError(f"packet of {length} bytes is over {MAX_PACKET}")
            body = await reader.readexactly(length)
        return first >> 4, first & 0x0F, body

    async def _converse(self, connection: _Connection) -> bool:
        """Serve one connection; True when it ended with a clean DISCONNECT."""
        kind, flags, body = await asyncio.wait_for(self._read_packet(connection), 30)
        if kind != CONNECT:
            raise ProtocolError("the first packet is not CONNECT")
        if not self._connect(connection, body):
            await connection.writer.drain()
            return True  # refused: no session, no will
        while not connection.closed:
            kind, flags, body = await self._read_packet(connection)
            if kind == PUBLISH:
                self._publish_in(connection, flags, body)
            elif kind == PUBACK:
                self._acked(connection, body)
            elif kind == PUBREL:
                pid = Reader(body).int2()
                if connection.session is not None:
                    connection.session.qos2_received.discard(pid)
                connection.send(packet(PUBCOMP, 0, pid.to_bytes(2, "big")))
            elif kind == SUBSCRIBE:
                self._subscribe(connection, body)
            elif kind == UNSUBSCRIBE:
                self._unsubscribe(connection, body)
            elif kind == PINGREQ:
                connection.send(packet(PINGRESP, 0, b""))
            elif kind == DISCONNECT:
                return self._disconnect(connection, body)
            else:  # CONNECT again, AUTH, PUBREC/PUBCOMP (it never sends QoS 2), ...
                raise ProtocolError(f"unexpected packet type {kind}")
            await connection.writer.drain()
        return False

    def _connect(self, connection: _Connection, body: bytes) -> bool:
        r = Reader(body)
        name, level = r.string(), r.byte()
        if name != "MQTT" or level not in (4, 5):
            # 3.1.1 §3.1.2.2: 0x01 "unacceptable protocol level"; a v5 client reads it too.
            connection.send(packet(CONNACK, 0, bytes([0, 1])))
            LOGGER.debug("refused protocol %r level %d", name, level)
            return False
        connection.version = level
        flags = r.byte()
        if flags & 0x01:
            raise ProtocolError("reserved CONNECT flag set")
        connection.keepalive_s = r.int2()
        props = r.properties() if level == 5 else []
        client_id = r.string()
        clean = bool(flags & 0x02)
        assigned = not client_id
        if assigned and level == 4 and not clean:
            connection.send(packet(CONNACK, 0, bytes([0, 2])))  # identifier rejected
            return False
        client_id = client_id or f"auto-{uuid.uuid4().hex}"
        if flags & 0x04:
            will_props = r.properties() if level == 5 else []
            topic, payload = r.string(), r.binary()
            if not topic or "+" in topic or "#" in topic:
                raise ProtocolError("bad will topic")
            connection.will = _Message(topic, payload, min((flags >> 3) & 3, 1),
                                       bool(flags & 0x20), _forwardable(will_props))
        if flags & 0x80:
            r.string()  # user name: the demo broker is anonymous
        if flags & 0x40:
            r.binary()  # password
        expiry: float | None
        if level == 5:
            raw = dict(props).get(SESSION_EXPIRY)
            seconds = int.from_bytes(raw, "big") if raw else 0
            expiry = None if seconds == 0xFFFFFFFF else float(seconds)
        else:
            expiry = 0.0 if clean else None
        session = self._sessions.get(client_id)
        if session is not None and session.connection is not None:
            old = session.connection
            if old.version == 5:
                old.send(packet(DISCONNECT, 0, bytes([0x8E, 0])))  # session taken over
            old.close()  # its task publishes its will
            session.connection = None
        present = session is not None and not clean
        if session is None or clean:
            session = _Session(client_id)
            self._sessions[client_id] = session
        session.expiry_s = expiry
        session.connection = connection
        connection.session = session
        if level == 5:
            ack_props: list[tuple[int, bytes]] = [(SUB_ID_AVAILABLE, b"\0"),
                                                  (SHARED_SUB_AVAILABLE, b"\0")]
            if assigned:
                ack_props.append((ASSIGNED_CLIENT_ID, encode_string(client_id)))
            connection.send(packet(CONNACK, 0, bytes([int(present), 0])
                                   + encode_properties(ack_props)))
        else:
            connection.send(packet(CONNACK, 0, bytes([int(present), 0])))
        LOGGER.debug("client %s connected (MQTT %s, session present %s)", client_id,
                     "5" if level == 5 else "3.1.1", present)
        # A resumed session: unacknowledged messages again (DUP), then what was queued.
        for pid, (message, qos, retain) in list(session.inflight.items()):
            connection.send(self._publish_packet(connection, message, qos, retain, pid, dup=True))
        self._flush(session)
        return True

    def _disconnect(self, connection: _Connection, body: bytes) -> bool:
        if connection.version == 5 and body:
            r = Reader(body)
            reason = r.byte()
            props = dict(r.properties()) if r.at < len(body) else {}
            raw = props.get(SESSION_EXPIRY)
            if raw is not None and connection.session is not None:
                connection.session.expiry_s = float(int.from_bytes(raw, "big"))
            if reason == 0x04:  # "disconnect with will message"
                return False
        return True

    def _ended(self, connection: _Connection, clean: bool) -> None:
        session = connection.session
        if session is None:
            return
        if session.connection is connection:
            session.connection = None
            if session.expiry_s == 0:
                self._sessions.pop(session.client_id, None)
        if not clean and connection.will is not None:
            LOGGER.debug("publishing the will of %s", session.client_id)
            self._accept(connection.will, None)  # a retained will is kept, as any
        connection.will = None

    # -- publish ---------------------------------------------------------------------------
    def _publish_in(self, connection: _Connection, flags: int, body: bytes) -> None:
        qos, retain = (flags >> 1) & 3, bool(flags & 1)
        if qos == 3:
            raise ProtocolError("PUBLISH with QoS 3")
        r = Reader(body)
        topic = r.string()
        pid = r.int2() if qos else 0
        props = r.properties() if connection.version == 5 else []
        if any(ident == TOPIC_ALIAS for ident, _ in props):
            raise ProtocolError("topic alias used, but Topic Alias Maximum is 0")
        if not topic or "+" in topic or "#" in topic:
            raise ProtocolError(f"invalid topic {topic!r}")
        message = _Message(topic, r.rest(), min(qos, 1), retain, _forwardable(props))
        session = connection.session
        if qos == 2 and session is not None:
            if pid not in session.qos2_received:  # a repeat before PUBREL is not new
                session.qos2_received.add(pid)
                self._accept(message, session)
            connection.send(packet(PUBREC, 0, pid.to_bytes(2, "big")))
            return
        self._accept(message, session)
        if qos == 1:
            connection.send(packet(PUBACK, 0, pid.to_bytes(2, "big")))

    def _accept(self, message: _Message, sender: _Session | None) -> None:
        if message.retain:
            if message.payload:
                self._retained[message.topic] = message
            else:
                self._retained.pop(message.topic, None)
        self._route(message, sender)

    def _route(self, message: _Message, sender: _Session | None) -> None:
        for session in list(self._sessions.values()):
            best: _Subscription | None = None
            rap = False
            for topic_filter, sub in session.subscriptions.items():
                if not topic_matches(topic_filter, message.topic):
                    continue
                if sub.no_local and session is sender:
                    continue
                rap = rap or sub.retain_as_published
                if best is None or sub.qos > best.qos:
                    best = sub
            if best is None:
                continue
            self._deliver(session, message, min(best.qos, message.qos),
                          message.retain and rap)

    def _deliver(self, session: _Session, message: _Message, qos: int, retain: bool) -> None:
        connection = session.connection
        if qos == 0:
            if connection is not None:
                connection.send(self._publish_packet(connection, message, 0, retain, 0))
            return  # QoS 0 is not queued for an absent client (as Mosquitto)
        if len(session.queued) >= MAX_QUEUED:
            LOGGER.warning("queue of %s full: message on %s dropped", session.client_id,
                           message.topic)
            return
        session.queued.append((message, qos, retain))
        self._flush(session)

    def _flush(self, session: _Session) -> None:
        connection = session.connection
        while connection is not None and session.queued:
            message, qos, retain = session.queued.popleft()
            pid = session.packet_id()
            session.inflight[pid] = (message, qos, retain)
            connection.send(self._publish_packet(connection, message, qos, retain, pid))

    def _publish_packet(self, connection: _Connection, message: _Message, qos: int,
                        retain: bool, pid: int, *, dup: bool = False) -> bytes:
        body = encode_string(message.topic)
        if qos:
            body += pid.to_bytes(2, "big")
        if connection.version == 5:
            body += encode_properties(message.props)
        flags = (0x08 if dup else 0) | qos << 1 | int(retain)
        return packet(PUBLISH, flags, body + message.payload)

    def _acked(self, connection: _Connection, body: bytes) -> None:
        pid = Reader(body).int2()
        if connection.session is not None:
            connection.session.inflight.pop(pid, None)

    # -- subscriptions ---------------------------------------------------------------------
    def _subscribe(self, connection: _Connection, body: bytes) -> None:
        session = connection.session
        assert session is not None  # set by CONNECT, which came first
        r = Reader(body)
        pid = r.int2()
        if connection.version == 5:
            r.properties()  # a subscription identifier is refused below by the filter check
        codes = bytearray()
        retained: list[tuple[str, _Subscription]] = []
        while r.at < len(body):
            topic_filter, options = r.string(), r.byte()
            qos = options & 3
            if connection.version == 4 and options & 0xFC:
                raise ProtocolError("reserved subscription option bits set")
            if qos == 3 or not valid_filter(topic_filter) or topic_filter.startswith("$share/"):
                codes.append(0x80 if connection.version == 4 else 0x9E
                             if topic_filter.startswith("$share/") else 0x8F)
                continue
            existed = topic_filter in session.subscriptions
            sub = _Subscription(min(qos, 1), bool(options & 0x04), bool(options & 0x08))
            if connection.version == 4:
                sub = _Subscription(min(qos, 1))
            session.subscriptions[topic_filter] = sub
            codes.append(sub.qos)
            handling = (options >> 4) & 3 if connection.version == 5 else 0
            if handling == 0 or (handling == 1 and not existed):
                retained.append((topic_filter, sub))
        if not codes:
            raise ProtocolError("SUBSCRIBE without a topic filter")
        props = encode_properties([]) if connection.version == 5 else b""
        connection.send(packet(SUBACK, 0, pid.to_bytes(2, "big") + props + bytes(codes)))
        for topic_filter, sub in retained:
            for message in list(self._retained.values()):
                if topic_matches(topic_filter, message.topic):
                    self._deliver(session, message, min(sub.qos, message.qos), True)

    def _unsubscribe(self, connection: _Connection, body: bytes) -> None:
        session = connection.session
        assert session is not None  # set by CONNECT, which came first
        r = Reader(body)
        pid = r.int2()
        if connection.version == 5:
            r.properties()
        codes = bytearray()
        while r.at < len(body):
            found = session.subscriptions.pop(r.string(), None)
            codes.append(0x00 if found is not None else 0x11)
        if connection.version == 5:
            connection.send(packet(UNSUBACK, 0, pid.to_bytes(2, "big")
                                   + encode_properties([]) + bytes(codes)))
        else:
            connection.send(packet(UNSUBACK, 0, pid.to_bytes(2, "big")))


def _forwardable(props: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
    """The properties a subscriber may receive: all but alias and subscription id."""
    return [(i, raw) for i, raw in props if i not in (TOPIC_ALIAS, SUBSCRIPTION_ID)]


