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

Its TLS material is made by :mod:`devkit.tls_files`; the test client is
:mod:`devkit.broker_client`.  A missing ``mosquitto`` raises :class:`BrokerMissingError`,
so the tests that need one fail loudly instead of being skipped.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

from devkit.tls_files import TlsFiles

__all__ = [
    "Broker",
    "BrokerError",
    "BrokerMissingError",
    "find_mosquitto",
    "free_port",
]

#: Where Debian puts the broker; /usr/sbin is not on an ordinary user's PATH.
_MOSQUITTO_DIRS = ("/usr/sbin", "/usr/local/sbin", "/usr/bin")
#: Mosquitto binds and answers within ~20 ms here; 10 s covers a loaded CI box.
_START_TIMEOUT_S = 10.0


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


