"""A tool's own connection to the site's broker: ``watch`` and ``selftest`` use it.

The shipped brokers bind client ids to accounts (``use_username_as_clientid``,
``deploy/README.md`` "Broker accounts"): one account has one connection, so a tool that
logged in with the agent's account (or a controller link's) would disconnect it.
:func:`resolve_account` picks the tool's own account (an option, then an environment
variable, then the tool's default account on a broker with accounts) and refuses the
agent's and the links'; :class:`SiteClient` connects with it by the ``[mqtt]``
transport (TCP, TLS or the unix socket), subscribes, and publishes when the tool may.

Over TLS the same holds for the client certificate: a broker with
``use_identity_as_username`` takes the certificate's name for the account, so a tool
presenting the agent's ``cert_file`` would log in as the agent (and the agent's key is
readable by the agent alone anyway).  :func:`tls_context` trusts ``[mqtt] ca_file``
and presents no certificate, or the tool's own (:func:`client_certificate`: an option,
then an environment variable), never the agent's files or a certificate naming the
agent's subject.

A lost connection is tried again after the one reconnect policy of every MQTT connection
of ours (:mod:`drivers.mqtt.backoff`, full jitter), from the client's own network thread.

Errors are :class:`SiteLinkError`, whose ``status`` is the CLI's exit status.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import stat
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from drivers.mqtt.backoff import Backoff
from drivers.mqtt.client import PahoClient
from gateway.errors import ConfigError, GatewayError
from gateway.link.tls import broker_tls_context, read_secret_file

if TYPE_CHECKING:
    import ssl

    from gateway.config import Config, MqttConfig

__all__ = [
    "BrokerAccount",
    "ClientCertificate",
    "Handler",
    "SiteClient",
    "SiteLinkError",
    "client_certificate",
    "read_password_file",
    "resolve_account",
    "tls_context",
]

#: The CONNACK and every SUBACK must come within this: a LAN broker answers in
#: milliseconds; this covers a loaded Pi and a TLS handshake.
CONNECT_TIMEOUT_S: Final = 10.0
#: Reconnect delays (full jitter, :mod:`drivers.mqtt.backoff`): the ceiling starts low (a
#: broker restart takes a second or two) and doubles to a cap that still notices a broker
#: back within half a minute.
RECONNECT_MIN_S: Final = 1.0
RECONNECT_MAX_S: Final = 30.0
#: A connection that stayed up this long starts the delays again at the first ceiling; a
#: broker that accepts and then drops every connection meets growing ones.
STABLE_AFTER_S: Final = 10.0
#: One wait of the network loop at most (paho's ``loop_forever`` default); a packet to
#: send wakes it at once.
_TICK_S: Final = 1.0
#: Incoming packets over this end the connection (``drivers.mqtt.client``): the agent's
#: status is the largest payload, a few KiB.
MAX_PACKET_BYTES: Final = 256 * 1024
#: MQTT 5 reason codes at or above this are failures (SUBACK, PUBACK, CONNACK).
_FAILURE: Final = 0x80


class SiteLinkError(GatewayError):
    """The site's broker could not be reached or used; ``status`` is the exit status
    (1: unreachable or lost, 2: refused credentials or permissions, a usage problem)."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


# -- the account ----------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class BrokerAccount:
    """Who a tool logs in as.  ``password`` is the secret itself, never shown."""

    username: str | None
    password: str | None = None

    def __repr__(self) -> str:
        return f"BrokerAccount(username={self.username!r})"

    @property
    def label(self) -> str:
        """For messages: the user name, or "anonymously"."""
        return f"as {self.username}" if self.username else "anonymously"


def resolve_account(config: Config, username: str | None, password_file: str | None, *,
                    default_user: str, user_env: str, password_env: str,
                    environ: Mapping[str, str] = os.environ) -> BrokerAccount:
    """The account a tool (watch, the self-test) uses on the ``[mqtt]`` broker.

    ``username``/``password_file`` (options) win over the environment variables
    ``user_env``/``password_env``; without either, a broker with accounts gets
    ``default_user`` and one without is used anonymously.  Raises
    :class:`SiteLinkError` (status 2) for the agent's or a controller link's account
    and for a password file that cannot be used.
    """
    mqtt = config.mqtt
    user = username or environ.get(user_env) or (default_user if mqtt.username else None)
    if user and user == mqtt.username:
        raise SiteLinkError(
            f"{user!r} is the agent's broker account (mqtt.username): the broker gives one "
            "account one connection, so this would disconnect the agent; use an account "
            f"of its own, such as {default_user} (deploy/README.md, \"Broker accounts\")", 2)
    links = {c.broker_username for c in config.controllers if c.broker_username}
    if user in links:
        raise SiteLinkError(
            f"{user!r} is a controller link's broker account: the broker gives one account "
            f"one connection, so this would disconnect that link; use an account of its "
            f"own, such as {default_user} (deploy/README.md, \"Broker accounts\")", 2)
    path = password_file or environ.get(password_env) or None
    return BrokerAccount(user, read_password_file(Path(path)) if path else None)


def read_password_file(path: Path) -> str:
    """The password in ``path``, which others may not read (as the agent's, contract §3)."""
    try:
        mode = path.stat().st_mode
        if not stat.S_ISREG(mode):
            raise SiteLinkError(f"{path} is not a regular file; give a file holding the "
                                "broker password", 2)
        if mode & 0o007:
            raise SiteLinkError(f"{path} can be read by others (mode "
                                f"{stat.S_IMODE(mode):04o}); run: chmod 600 {path}", 2)
        text = read_secret_file(path)
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise SiteLinkError(f"cannot read the password file {path}: {reason}", 2) from exc
    return text or ""


# -- the TLS identity ----------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ClientCertificate:
    """A tool's own TLS client certificate and its key (PEM files), never the agent's."""

    cert_file: Path
    key_file: Path


def client_certificate(config: Config, cert_file: str | None, key_file: str | None, *,
                       cert_env: str, key_env: str,
                       environ: Mapping[str, str] = os.environ) -> ClientCertificate | None:
    """The certificate a tool presents over TLS, or ``None`` (the CA alone).

    ``cert_file``/``key_file`` (options) win over the environment variables
    ``cert_env``/``key_env``.  Raises :class:`SiteLinkError` (status 2) for one without
    the other, a certificate without ``[mqtt] tls``, a key file others may read, and for
    the agent's own ``[mqtt] cert_file`` or ``key_file`` (the same file by any path or
    link) or a certificate with the agent's subject: with ``use_identity_as_username``
    the broker would take the tool for the agent and disconnect the agent.
    """
    mqtt = config.mqtt
    cert = cert_file or environ.get(cert_env) or None
    key = key_file or environ.get(key_env) or None
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        missing = f"its key (${key_env})" if key is None else f"the certificate (${cert_env})"
        raise SiteLinkError(f"a client certificate goes with its key: give {missing} too", 2)
    if not mqtt.tls:
        raise SiteLinkError(f"a client certificate is for TLS, and [mqtt] in {config.path} "
                            "has tls = false: leave it out", 2)
    chosen = ClientCertificate(Path(cert), Path(key))
    for given in (chosen.cert_file, chosen.key_file):
        for name, agents in (("cert_file", mqtt.cert_file), ("key_file", mqtt.key_file)):
            if agents is not None and _same_file(given, agents):
                raise SiteLinkError(_AGENT_IDENTITY.format(
                    what=f"{given} is the agent's [mqtt] {name}"), 2)
    _check_key_file(chosen.key_file)
    if mqtt.cert_file is not None:
        own, theirs = _names(chosen.cert_file), _names(mqtt.cert_file)
        # Mosquitto's use_identity_as_username takes the common name, and
        # use_subject_as_username the whole subject: either one the agent's is its account.
        same = own & theirs
        if same:
            raise SiteLinkError(_AGENT_IDENTITY.format(
                what=f"{chosen.cert_file} names the agent ({min(same, key=len)})"), 2)
    return chosen


_AGENT_IDENTITY: Final = (
    "{what}: a broker that takes the certificate's name for the account "
    "(use_identity_as_username) would log this tool in as the agent and disconnect it; "
    "give it a certificate of its own, or none (deploy/README.md, \"Broker accounts\")")


def _same_file(a: Path, b: Path) -> bool:
    """One file by any path: a symlink, a hard link, ``..`` (else, unreadable: the path)."""
    try:
        return a.samefile(b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def _check_key_file(path: Path) -> None:
    """A private key is a secret: a regular file others may not read (as a password)."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise SiteLinkError(f"cannot read the key file {path}: {exc.strerror or exc}",
                            2) from exc
    if not stat.S_ISREG(mode):
        raise SiteLinkError(f"{path} is not a regular file; give the certificate's key", 2)
    if mode & 0o007:
        raise SiteLinkError(f"{path} can be read by others (mode {stat.S_IMODE(mode):04o}); "
                            f"run: chmod 600 {path}", 2)


def _names(path: Path) -> set[str]:
    """The names a broker may take for the account from the PEM certificate at
    ``path``: its subject and each common name (``CN=…``); none when it cannot be read
    (the agent's may be unreadable here; a bad one of the tool's fails when loaded)."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        subject = x509.load_pem_x509_certificate(path.read_bytes()).subject
    except (OSError, ValueError):
        return set()
    return {subject.rfc4514_string(),
            *(f"CN={a.value!s}" for a in subject.get_attributes_for_oid(NameOID.COMMON_NAME))}


def tls_context(mqtt: MqttConfig, certificate: ClientCertificate | None) -> ssl.SSLContext:
    """The agent's TLS settings (``[mqtt] ca_file``, TLS 1.2 at least, the hostname
    checked) without its client certificate: none, or the tool's ``certificate``.

    Raises :class:`SiteLinkError` (status 2) when a file cannot be loaded.
    """
    try:
        # The agent's own builder, so the checks can never drift apart; without its
        # cert_file and key_file, which are the agent's identity (module docstring).
        context = broker_tls_context(dataclasses.replace(mqtt, cert_file=None, key_file=None))
    except ConfigError as exc:
        raise SiteLinkError(str(exc), 2) from exc
    if certificate is not None:
        try:
            context.load_cert_chain(str(certificate.cert_file), str(certificate.key_file))
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise SiteLinkError(f"cannot load the client certificate {certificate.cert_file} "
                                f"with the key {certificate.key_file}: {reason}", 2) from exc
    return context


# -- the broker connection --------------------------------------------------------------
Handler = Callable[[str, bytes, bool], None]


class SiteClient:
    """One MQTT 5 connection to the site's broker, with the ``[mqtt]`` transport (TCP,
    TLS, or the unix socket) and a tool's own account.

    MQTT 5 because its PUBACK and SUBACK carry reason codes: Mosquitto answers a publish
    its ACL forbids with "not authorized" (3.1.1 acknowledges and drops it); some brokers
    also refuse a subscription in the SUBACK, though Mosquitto grants it and then delivers
    only what the account may read.  ``on_message(topic, payload, retained)`` and
    ``on_connection(connected, reason)`` run on the client's network thread.  After
    :meth:`start` has succeeded that thread reconnects by itself after a full-jitter delay
    (also after a refused reconnect: a password being rotated); subscriptions are made
    again on each connect.  ``rng`` (the delays' random source) and ``clock`` (monotonic,
    for :data:`STABLE_AFTER_S`) are injectable.
    """

    def __init__(self, mqtt: MqttConfig, account: BrokerAccount, *, client_name: str,
                 subscriptions: Sequence[str], on_message: Handler,
                 on_connection: Callable[[bool, str | None], None] | None = None,
                 certificate: ClientCertificate | None = None,
                 rng: Callable[[], float] = random.random,
                 clock: Callable[[], float] = time.monotonic) -> None:
        # First: a file that cannot be loaded must fail before paho opens its sockets.
        context = tls_context(mqtt, certificate) if mqtt.tls else None
        self.mqtt = mqtt
        self.account = account
        self.certificate = certificate
        self.subscriptions = list(subscriptions)
        self._on_message_cb = on_message
        self._on_connection_cb = on_connection
        self._cond = threading.Condition()
        self._ready = False
        self._failure: SiteLinkError | None = None
        self._closing = False
        self._published: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._backoff = Backoff(RECONNECT_MIN_S, RECONNECT_MAX_S, rng)
        self._clock = clock
        self._up_since: float | None = None  # when the broker accepted this connection
        # A broker that binds client ids to accounts replaces this with the user name;
        # one that does not must not see two tools (or a tool and the agent) share one.
        client_id = self._client_id = f"{client_name}-{os.getpid()}"
        self._client = PahoClient(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id,
            protocol=paho.MQTTv5, transport="unix" if mqtt.unix_socket else "tcp",
            max_packet_bytes=MAX_PACKET_BYTES)
        if account.username:
            self._client.username_pw_set(account.username, account.password)
        if context is not None:
            self._client.tls_set_context(context)
        self._client.connect_timeout = CONNECT_TIMEOUT_S
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        self._client.on_disconnect = self._on_disconnect
        self._client.on_publish = self._on_publish
        # With a callback here, paho only queues a packet published from another thread
        # and wakes the network thread's select() (its socket pair), as with loop_start():
        # the network thread alone writes to the socket.
        self._client.on_socket_register_write = self._on_register_write

    @property
    def where(self) -> str:
        """The broker's address for messages."""
        return self.mqtt.where

    @property
    def _certificate_hint(self) -> str:
        """Said when a connection fails over TLS without a certificate of the tool's own
        while the agent shows one: this broker may insist on a certificate."""
        if not self.mqtt.tls or self.certificate is not None or self.mqtt.cert_file is None:
            return ""
        return ("; if the broker requires a client certificate, give this tool one of its "
                "own, never the agent's")

    def start(self, timeout: float = CONNECT_TIMEOUT_S) -> None:
        """Connect and subscribe; :class:`SiteLinkError` if that does not happen."""
        try:
            self._client.connect(self.mqtt.host, self.mqtt.port,
                                 keepalive=self.mqtt.keepalive_s)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            self.close()
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise SiteLinkError(f"cannot reach the broker at {self.where}: "
                                f"{reason}{self._certificate_hint}") from exc
        self._thread = threading.Thread(target=self._run, name=f"{self._client_id}-mqtt",
                                        daemon=True)
        self._thread.start()
        with self._cond:
            self._cond.wait_for(lambda: self._ready or self._failure is not None, timeout)
            failure, ready = self._failure, self._ready
        if failure is not None or not ready:
            self.close()
            raise failure or SiteLinkError(
                f"the broker at {self.where} did not accept the connection and "
                f"subscriptions within {timeout:.0f} s")

    def publish(self, topic: str, payload: bytes, timeout: float = CONNECT_TIMEOUT_S) -> None:
        """Publish QoS 1 (never retained) and wait for the broker's PUBACK; a refusal
        (an ACL that does not let this account write there) is :class:`SiteLinkError`."""
        # Not under self._cond: paho calls on_publish holding its own outgoing-message
        # lock, which publish() takes too; the PUBACK's code is kept by mid meanwhile.
        info = self._client.publish(topic, payload, qos=1, retain=False)
        mid = info.mid
        with self._cond:
            done = self._cond.wait_for(lambda: mid in self._published, timeout)
            code = self._published.pop(mid, None)
        if not done:
            raise SiteLinkError(f"the broker at {self.where} did not acknowledge the "
                                f"message on {topic} within {timeout:.0f} s")
        if code is not None and code >= _FAILURE:
            raise SiteLinkError(
                f"the broker refused to let {self.account.username or 'an anonymous client'}"
                f" publish on {topic} (reason code 0x{code:02x}): add that account's "
                "lines to the broker's ACL (deploy/README.md, \"Broker accounts\")", 2)

    def close(self) -> None:
        """Disconnect and stop the network thread (idempotent)."""
        with self._cond:
            self._closing = True  # the disconnect below is not a lost connection
        with contextlib.suppress(Exception):
            self._client.disconnect()
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            # A reconnect in progress ends within its connect timeout; a broker that
            # stops reading must not hang the tool on exit.
            thread.join(timeout=CONNECT_TIMEOUT_S + 1)
        # paho's wake-up socket pair is closed only by its __del__ otherwise: an
        # unclosed-socket warning at exit (as devkit/demo.py does).
        with contextlib.suppress(Exception):
            self._client.reinitialise()

    # -- the network thread --------------------------------------------------------------
    def _run(self) -> None:
        """paho's network loop until :meth:`close`, what ``loop_start()`` ran, with the
        reconnects after the one policy (:mod:`drivers.mqtt.backoff`) rather than paho's."""
        while True:
            up = self._client.loop(timeout=_TICK_S) == MQTTErrorCode.MQTT_ERR_SUCCESS
            if self._stop.is_set():  # closing: on until the DISCONNECT is written
                if not up or not self._client.want_write():
                    return
            elif not up:
                self._reconnect()

    def _reconnect(self) -> None:
        """Wait the next delay after a lost or refused connection, then connect again."""
        up_since, self._up_since = self._up_since, None
        if up_since is not None and self._clock() - up_since >= STABLE_AFTER_S:
            self._backoff.reset()
        if self._stop.wait(self._backoff.next_delay()):
            return
        with contextlib.suppress(OSError):  # ssl.SSLError and socket errors are OSError
            self._client.reconnect()

    def _on_register_write(self, client: paho.Client, userdata: object,
                           sock: paho.SocketLike) -> None:
        """Nothing to do: see the comment where it is installed."""

    # -- paho callbacks (the network thread) -----------------------------------------------
    def _fail(self, failure: SiteLinkError) -> None:
        with self._cond:
            if not self._ready and self._failure is None:
                self._failure = failure
            self._cond.notify_all()

    def _on_connect(self, client: Any, userdata: object, flags: Any, reason: Any,
                    properties: object) -> None:
        if reason.is_failure:
            with self._cond:
                ready = self._ready
            if ready:  # a reconnect refused: say so; tried again after the next delay
                if self._on_connection_cb is not None:
                    self._on_connection_cb(False, f"the broker refused: {reason}")
                return
            # 0x85 client id refused, 0x86 bad user name or password, 0x87 not
            # authorized, 0x8C bad authentication method: the account is the user's to fix.
            status = 2 if int(reason.value) in (0x85, 0x86, 0x87, 0x8C) else 1
            self._fail(SiteLinkError(
                f"the broker at {self.where} refused to connect {self.account.label}: "
                f"{reason}", status))
            return
        self._up_since = self._clock()
        client.subscribe([(topic, 1) for topic in self.subscriptions])

    def _on_subscribe(self, client: Any, userdata: object, mid: int, reasons: Any,
                      properties: object) -> None:
        refused = [topic for topic, code in zip(self.subscriptions, reasons, strict=False)
                   if int(getattr(code, "value", code)) >= _FAILURE]
        if refused:
            failure = SiteLinkError(
                f"the broker does not let {self.account.username or 'anonymous clients'} "
                f"read {', '.join(refused)}: add that account's lines to the broker's ACL "
                "(deploy/README.md, \"Broker accounts\")", 2)
            self._fail(failure)
            if self._ready and self._on_connection_cb is not None:
                self._on_connection_cb(False, str(failure))
            return
        first = False
        with self._cond:
            if not self._ready:
                self._ready = first = True
            self._cond.notify_all()
        if self._on_connection_cb is not None:
            self._on_connection_cb(True, None if first else "reconnected")

    def _on_message(self, client: Any, userdata: object, msg: Any) -> None:
        self._on_message_cb(str(msg.topic), bytes(msg.payload), bool(msg.retain))

    def _on_publish(self, client: Any, userdata: object, mid: int, reason: Any,
                    properties: object) -> None:
        with self._cond:
            self._published[mid] = int(getattr(reason, "value", reason) or 0)
            self._cond.notify_all()

    def _on_disconnect(self, client: Any, userdata: object, flags: Any, reason: Any,
                       properties: object) -> None:
        with self._cond:
            report = self._ready and not self._closing
            first = not self._ready and not self._closing
        if first:
            # Closed before the CONNACK: over TLS, typically a broker that wants a
            # client certificate (the handshake only fails on its side); else
            # start() would wait out its whole timeout.
            self._fail(SiteLinkError(f"the broker at {self.where} closed the connection "
                                     f"before accepting it ({reason}){self._certificate_hint}"))
        if report and self._on_connection_cb is not None:
            self._on_connection_cb(False, str(reason))
