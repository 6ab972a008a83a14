"""A real Mosquitto per test, and a small synchronous client to talk to it.

Style guide: "MQTT against a real broker on a free local port".  :class:`Broker` writes a
``mosquitto.conf`` into a temporary directory, starts ``mosquitto -c`` on a free
127.0.0.1 port and waits until the port accepts connections.  The fault switches are
signals, the cheapest faithful way to break a broker on one machine:

* :meth:`Broker.kill` is ``kill -9`` (nothing saved at exit, no goodbye to clients);
* :meth:`Broker.stop` / :meth:`Broker.cont` are ``SIGSTOP`` / ``SIGCONT``: the process
  freezes but the kernel keeps its sockets open and even completes new TCP handshakes
  into the listen backlog, which is exactly a half-open, wedged broker (fault matrix #3);
* :meth:`Broker.restart` comes back on the same port with the same persistence file.

``Broker(..., unix_socket=True)`` adds a unix-socket listener at :attr:`Broker.socket_path`
(in a short directory of its own: a socket path is limited to 107 bytes, which pytest's
temporary directories exceed); ``Client(broker, unix=True)`` connects through it.

:class:`Client` wraps paho's threaded client so a test reads like a script:
``client.publish(topic, payload)`` returns once the broker has the message and
``client.expect(topic)`` waits for what the gateway sends.

A missing ``mosquitto`` raises :class:`BrokerMissingError`, so the tests that need one
fail loudly instead of being skipped.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import itertools
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from drivers.mqtt_client import PahoClient
from gateway.link import Message

__all__ = [
    "Broker",
    "BrokerError",
    "BrokerMissingError",
    "Client",
    "TlsFiles",
    "find_mosquitto",
    "make_tls_files",
]

#: Where Debian puts the broker; /usr/sbin is not on an ordinary user's PATH.
_MOSQUITTO_DIRS = ("/usr/sbin", "/usr/local/sbin", "/usr/bin")
#: Mosquitto binds and answers within ~20 ms here; 10 s covers a loaded CI box.
_START_TIMEOUT_S = 10.0
_client_ids = itertools.count(1)


class BrokerError(RuntimeError):
    """The test broker did not start or stop as asked (its log is in the message)."""


class BrokerMissingError(BrokerError):
    """``mosquitto`` is not installed: the MQTT tests cannot run (and must not pass)."""


def find_mosquitto() -> str:
    """The path of the ``mosquitto`` binary: ``$MOSQUITTO``, then PATH, then /usr/sbin."""
    explicit = os.environ.get("MOSQUITTO")
    if explicit:
        return explicit
    found = shutil.which("mosquitto") or shutil.which(
        "mosquitto", path=os.pathsep.join(_MOSQUITTO_DIRS)
    )
    if found is None:
        raise BrokerMissingError(
            "mosquitto not found on PATH or in /usr/sbin; install it (apt-get install "
            "mosquitto) or set MOSQUITTO=/path/to/mosquitto"
        )
    return found


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# --------------------------------------------------------------------------- TLS material


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """A throw-away CA, a broker certificate for ``hostname`` and a client certificate."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    hostname: str


def make_tls_files(directory: Path, hostname: str = "localhost") -> TlsFiles:
    """Write a CA, a server certificate (SAN: ``hostname`` only) and a client certificate.

    The server certificate names ``hostname`` and no IP address, so connecting to
    ``127.0.0.1`` fails the hostname check: the tests use that to prove the check is on.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    def write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
        path.write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ))
        path.chmod(0o600)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(name("stora-gateway test CA"))
        .issuer_name(name("stora-gateway test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False,
                          key_agreement=False, key_cert_sign=True, crl_sign=True,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(common: str, usage: x509.ObjectIdentifier,
             san: x509.SubjectAlternativeName | None) -> tuple[x509.Certificate,
                                                               ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(common))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if san is not None:
            builder = builder.add_extension(san, critical=False)
        return builder.sign(ca_key, hashes.SHA256()), key

    try:
        ipaddress.ip_address(hostname)
        general: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(hostname))
    except ValueError:
        general = x509.DNSName(hostname)
    server_cert, server_key = leaf(hostname, ExtendedKeyUsageOID.SERVER_AUTH,
                                   x509.SubjectAlternativeName([general]))
    client_cert, client_key = leaf("stora-gw-test", ExtendedKeyUsageOID.CLIENT_AUTH, None)

    files = TlsFiles(
        ca=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
        client_cert=directory / "client.pem",
        client_key=directory / "client.key",
        hostname=hostname,
    )
    files.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    files.client_cert.write_bytes(client_cert.public_bytes(serialization.Encoding.PEM))
    write_key(server_key, files.server_key)
    write_key(client_key, files.client_key)
    return files


# --------------------------------------------------------------------------- broker


class Broker:
    """One ``mosquitto`` process on a free 127.0.0.1 port, owned by one test.

    ``persistence`` keeps sessions and queued messages in ``<directory>/persist/``, saved
    after every change, so they survive :meth:`kill` (give the broker a few ms).
    ``users`` (name → password) turns anonymous access off.  ``tls`` makes the listener
    TLS-only (TLS 1.2 minimum); ``require_client_cert`` asks for a client certificate.
    ``extra_conf`` lines are appended verbatim (``max_inflight_messages 5`` …).
    """

    host = "127.0.0.1"

    def __init__(
        self,
        directory: Path,
        *,
        persistence: bool = False,
        users: Mapping[str, str] | None = None,
        max_packet_size: int | None = None,
        tls: TlsFiles | None = None,
        require_client_cert: bool = False,
        extra_conf: Sequence[str] = (),
        port: int | None = None,
        unix_socket: bool = False,
    ) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        #: The unix socket listener's path (``unix_socket=True``), else ``None``.  A test
        #: that rewrites :attr:`conf_path` with only this listener keeps the path: then
        #: :meth:`wait_ready` watches it.
        self.socket_path: Path | None = None
        if unix_socket:
            self.socket_path = Path(tempfile.mkdtemp(prefix="mq-")) / "mqtt.sock"
        self.persistence = persistence
        self.tls = tls
        self.port = port if port is not None else free_port()
        self.conf_path = directory / "mosquitto.conf"
        self.log_path = directory / "mosquitto.log"
        self.persist_dir = directory / "persist"
        self._binary = find_mosquitto()
        self._proc: subprocess.Popen[bytes] | None = None
        self._frozen = False
        self._write_conf(users, max_packet_size, require_client_cert, extra_conf)

    # ----------------------------------------------------------------- config

    def _write_conf(self, users: Mapping[str, str] | None, max_packet_size: int | None,
                    require_client_cert: bool, extra_conf: Sequence[str]) -> None:
        lines = [
            # Mosquitto started as root drops to user "mosquitto", which could not
            # write our temporary directory; as anyone else this line is ignored.
            f"user {pwd.getpwuid(os.geteuid()).pw_name}",
            f"listener {self.port} {self.host}",
            *([f"listener 0 {self.socket_path}"] if self.socket_path is not None else []),
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            "log_timestamp_format %H:%M:%S",
            # Mosquitto leaves Nagle on by default: with delayed ACKs that adds ~40 ms
            # to a command's round trip.  A site broker should set it too (deploy/).
            "set_tcp_nodelay true",
        ]
        if self.tls is not None:
            lines += [
                f"cafile {self.tls.ca}",
                f"certfile {self.tls.server_cert}",
                f"keyfile {self.tls.server_key}",
                "tls_version tlsv1.2",
                f"require_certificate {'true' if require_client_cert else 'false'}",
            ]
        if users:
            password_file = self.directory / "passwd"
            password_file.write_text("".join(f"{u}:{p}\n" for u, p in users.items()))
            password_file.chmod(0o600)
            passwd_tool = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
            # -U hashes a plain "user:password" file in place.
            subprocess.run([passwd_tool, "-U", str(password_file)], check=True,  # noqa: S603
                           capture_output=True)
            lines += ["allow_anonymous false", f"password_file {password_file}"]
        else:
            lines.append("allow_anonymous true")
        if self.persistence:
            self.persist_dir.mkdir(exist_ok=True)
            lines += [
                "persistence true",
                f"persistence_location {self.persist_dir}/",
                # Save after every change (of subscriptions, sessions or messages), so
                # what a test did before kill -9 is on disk.  A timed autosave would
                # need over two seconds: mosquitto compares whole seconds with "<".
                "autosave_on_changes true",
                "autosave_interval 1",
            ]
        else:
            lines.append("persistence false")
        if max_packet_size is not None:
            lines.append(f"max_packet_size {max_packet_size}")
        lines += list(extra_conf)
        self.conf_path.write_text("\n".join(lines) + "\n")

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Start mosquitto (again) and return once its port accepts connections."""
        if self.running:
            raise BrokerError("broker is already running")
        with self.log_path.open("ab") as log:
            log.write(f"---- start {time.strftime('%H:%M:%S')}\n".encode())
        # The child keeps its own copy of the descriptor; ours is closed at once.
        with (self.directory / "stderr.log").open("ab") as stderr:
            self._proc = subprocess.Popen(  # noqa: S603 (the broker and our own config)
                [self._binary, "-c", str(self.conf_path)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        self._frozen = False
        self.wait_ready()

    def wait_ready(self, timeout: float = _START_TIMEOUT_S) -> None:
        """Wait until the listener accepts a TCP connection."""
        deadline = time.monotonic() + timeout
        while True:
            if self._proc is None or self._proc.poll() is not None:
                raise BrokerError(f"mosquitto exited at start:\n{self.log_text()}")
            try:
                if self.socket_path is not None:
                    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                        probe.settimeout(0.5)
                        probe.connect(str(self.socket_path))
                    return
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise BrokerError(
                        f"mosquitto did not listen on {self.socket_path or self.port} "
                        f"within {timeout}s:\n"
                        f"{self.log_text()}"
                    ) from None
                time.sleep(0.01)

    @property
    def running(self) -> bool:
        """True while the process exists (frozen or not)."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int:
        """The broker's process id."""
        if self._proc is None:
            raise BrokerError("broker is not running")
        return self._proc.pid

    def kill(self) -> None:
        """``kill -9`` the broker and reap it."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGKILL)
            self._proc.wait(timeout=10)
        self._frozen = False

    def terminate(self) -> None:
        """A clean shutdown (SIGTERM): mosquitto saves persistence and closes sessions."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            if self._frozen:
                self._proc.send_signal(signal.SIGCONT)
            self._proc.wait(timeout=10)
        self._frozen = False

    def stop(self) -> None:
        """Freeze the broker (SIGSTOP): its sockets stay open but nothing answers."""
        self._proc_or_fail().send_signal(signal.SIGSTOP)
        self._frozen = True

    def cont(self) -> None:
        """Thaw a frozen broker (SIGCONT)."""
        self._proc_or_fail().send_signal(signal.SIGCONT)
        self._frozen = False

    def restart(self, *, clean: bool = False) -> None:
        """Stop (``kill -9``, or SIGTERM when ``clean``) and start on the same port."""
        if clean:
            self.terminate()
        else:
            self.kill()
        self.start()

    def close(self) -> None:
        """Kill the broker if it runs; safe to call twice."""
        self.kill()
        self._proc = None
        if self.socket_path is not None:
            shutil.rmtree(self.socket_path.parent, ignore_errors=True)

    def _proc_or_fail(self) -> subprocess.Popen[bytes]:
        if self._proc is None or self._proc.poll() is not None:
            raise BrokerError("broker is not running")
        return self._proc

    def log_text(self) -> str:
        """The broker's log so far (for assertion messages)."""
        parts = []
        for path in (self.log_path, self.directory / "stderr.log"):
            with contextlib.suppress(OSError):
                parts.append(path.read_text(errors="replace"))
        return "".join(parts)

    def __enter__(self) -> Broker:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


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

