"""The demo's broker: Mosquitto (1.6+) when installed, else the embedded one.

:class:`MosquittoBroker` runs the real thing on a free port with a throw-away config;
:func:`start_broker` picks one (``demo --broker``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import re
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Final, Protocol

from devkit.embedded_broker import STOP_TIMEOUT_S, EmbeddedBroker
from devkit.mosquitto import BrokerMissingError
from devkit.mosquitto import find_mosquitto as mosquitto_path

LOGGER = logging.getLogger(__name__)

#: ``demo --broker``: "auto" is Mosquitto when installed, else the embedded broker.
BROKER_KINDS: Final = ("auto", "mosquitto", "embedded")
#: The agent speaks MQTT 5, which Mosquitto supports from 1.6.
_MOSQUITTO_MIN: Final = (1, 6)
#: Mosquitto binds within ~20 ms here; this covers a loaded Raspberry Pi.
_START_TIMEOUT_S: Final = 10.0


# -- Mosquitto --------------------------------------------------------------------------
def find_mosquitto() -> tuple[str, str] | None:
    """``(path, "mosquitto version X.Y.Z")`` of a Mosquitto that speaks MQTT 5 (1.6+),
    looked for as the tests do (:func:`devkit.mosquitto.find_mosquitto`: ``$MOSQUITTO``,
    PATH, /usr/sbin and friends); None when there is none."""
    try:
        found = mosquitto_path()
    except BrokerMissingError:
        return None
    try:
        # `mosquitto -h` prints "mosquitto version 2.0.11" and exits non-zero.
        shown = subprocess.run([found, "-h"], capture_output=True, text=True,  # noqa: S603
                               timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"mosquitto version (\d+)\.(\d+)[.\d]*", shown.stdout + shown.stderr)
    if match is None or (int(match[1]), int(match[2])) < _MOSQUITTO_MIN:
        LOGGER.info("%s is not Mosquitto 1.6 or later; using the embedded broker", found)
        return None
    return found, match[0]


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


class MosquittoBroker:
    """``mosquitto -c`` on a free port of 127.0.0.1 with a config in ``directory``.

    It runs in a session of its own, so a Ctrl-C at the terminal reaches only the demo,
    which then stops the agent before the broker (the agent's clean "offline" status
    still gets out).  On Linux it is also told to exit if the demo dies unannounced.
    """

    kind = "mosquitto"

    def __init__(self, binary: str, directory: Path, *, version: str = "mosquitto",
                 host: str = "127.0.0.1") -> None:
        self.binary = binary
        self.directory = directory
        self.host = host
        self.port = 0
        self.version = version
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def description(self) -> str:
        """What runs where, for the demo's header."""
        return f"{self.version} on {self.host}:{self.port}"

    def start(self) -> MosquittoBroker:
        """Start it and return once its port accepts connections."""
        for _attempt in range(3):  # the free port may be taken between probe and bind
            self.port = _free_port(self.host)
            conf = self.directory / "mosquitto.conf"
            log = self.directory / "mosquitto.log"
            conf.write_text("\n".join([
                # As root Mosquitto drops to user "mosquitto", who cannot read this
                # directory; as anyone else this line is ignored.
                f"user {pwd.getpwuid(os.geteuid()).pw_name}",
                f"listener {self.port} {self.host}",
                "allow_anonymous true",
                "persistence false",
                "set_tcp_nodelay true",
                f"log_dest file {log}",
            ]) + "\n")
            self._proc = subprocess.Popen(  # noqa: S603 (our own binary and config)
                [self.binary, "-c", str(conf)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, start_new_session=True,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 (only calls prctl)
            )
            if self._wait_listening():
                LOGGER.info("mosquitto on %s:%d", self.host, self.port)
                return self
        text = ""
        with contextlib.suppress(OSError):
            text = (self.directory / "mosquitto.log").read_text(errors="replace")[-2000:]
        self.stop()
        raise OSError(f"mosquitto did not start: {text.strip() or 'no log'}")

    def _wait_listening(self) -> bool:
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                return False
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return True
            except OSError:
                time.sleep(0.02)
        return False

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it lingers; reaped either way.  Idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    @property
    def pid(self) -> int | None:
        """The broker's process id while it runs."""
        return self._proc.pid if self._proc is not None else None

    def __enter__(self) -> MosquittoBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the demo's process dies (Linux only)."""
    with contextlib.suppress(Exception):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGTERM)


class DemoBroker(Protocol):
    """What the demo needs of either broker."""

    kind: str
    host: str
    port: int

    @property
    def description(self) -> str:
        """What runs where."""

    def stop(self) -> None:
        """Stop it; nothing of it remains."""


def start_broker(kind: str, directory: Path) -> DemoBroker:
    """A running broker of ``kind`` (:data:`BROKER_KINDS`); ``directory`` for its files.

    Raises OSError when ``kind`` is "mosquitto" and none (1.6+) is installed, or when
    the broker cannot listen.
    """
    if kind not in BROKER_KINDS:
        raise ValueError(f"broker kind {kind!r} is not one of {', '.join(BROKER_KINDS)}")
    found = find_mosquitto() if kind != "embedded" else None
    if kind == "mosquitto" and found is None:
        raise OSError("mosquitto 1.6 or later is not installed (apt-get install mosquitto); "
                      "use --broker embedded")
    if found is not None:
        return MosquittoBroker(found[0], directory, version=found[1]).start()
    return EmbeddedBroker().start()
