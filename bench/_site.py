"""What the agent benchmarks share: a simulated site around a real agent subprocess.

``BenchSite`` is a context manager that starts a real Mosquitto (``devkit/mosquitto.py``),
one simulated Modbus RTU bus of ``boards`` relay boards on a pty in *this* process, a
config with one lock per coil, and the agent as a real subprocess (``AgentProcess`` of
``devkit/site.py``: ``stora-gateway run``).  On exit everything is stopped and
removed: the agent (SIGTERM, then SIGKILL), the pty, the broker, the directory.

The simulator runs in the benchmark's process, so the moment it receives a coil write
(``CoilWatch``: taken when the bytes reach ``ModbusSimulator.feed``) and the moment the
benchmark published a command are read from one clock, ``time.perf_counter``.

With ``acl=True`` the broker requires a password and an ACL lets only the agent's and
the relay's accounts near the site's topics (``relay`` alone may publish on ``P/S/cmd``);
a third account, ``intruder``, may connect and publish but reaches nothing.  Only
bench/agent_flood.py ``--acl`` uses it, to show the deployment fix for the flood.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from devkit.broker_client import Client
from devkit.mosquitto import Broker
from devkit.signer import CommandSigner, generate_keypair
from devkit.sims.modbus import ModbusSimBus
from devkit.site import AgentProcess
from drivers.modbus.frames import COIL_ON, WriteCoilPDU

ROOT = Path(__file__).resolve().parents[1]
SITE = "site_bench"
PREFIX = f"stora-gw/{SITE}"
CMD_TOPIC = f"{PREFIX}/cmd"
RESULT_TOPIC = f"{PREFIX}/cmd/result"


@dataclass(frozen=True, slots=True)
class Unit:
    """One configured lock: its unit id and the coil that drives it."""

    unit: str
    slave: int
    coil: int


#: Broker accounts of ``BenchSite(acl=True)``: name -> password.
ACCOUNTS = {"agent": "agent-pw", "relay": "relay-pw", "intruder": "intruder-pw"}


def write_acl(path: Path) -> Path:
    """The site's ACL: the agent owns ``P/S/#``, the relay commands and reads it."""
    path.write_text(f"""\
user agent
topic readwrite {PREFIX}/#

user relay
topic write {CMD_TOPIC}
topic read {PREFIX}/#
topic read $SYS/#

user intruder
""")
    return path


def write_config(directory: Path, host: str, port: int, bus_path: Path, public_key: str,
                 *, boards: int, coils: int, inputs: int,
                 account: str | None = None) -> tuple[Path, Path, list[Unit]]:
    """An agent config with ``boards`` Modbus boards (slave ids 1…) on one bus and one lock
    per coil (door contact on the input of the same number when there is one).

    Modelled on ``devkit.site.write_agent_config``.  With ``account`` the agent
    logs in to the broker as that user of :data:`ACCOUNTS`.  Returns (config, control
    socket, units).
    """
    login = ""
    if account is not None:
        password = directory / "mqtt-password"
        password.write_text(ACCOUNTS[account] + "\n")
        password.chmod(0o600)
        login = f'username = "{account}"\npassword_file = "{password}"\n'

    token = directory / "token"
    token.write_text("bench-token\n")
    token.chmod(0o600)
    socket_path = directory / "run" / "control.sock"
    units: list[Unit] = []
    controllers: list[str] = []
    locks: list[str] = []
    for board in range(boards):
        slave = board + 1
        controllers.append(
            f'[[controllers]]\nname = "board{slave}"\ndriver = "modbus"\nport = "{bus_path}"\n'
            f"address = {slave}\npulse = false\nchannels = {coils}\ninputs = {inputs}\n"
            "timeout_ms = 100\n\n")
        for coil in range(coils):
            unit = Unit(f"unit_{slave}{coil:02d}", slave, coil)
            units.append(unit)
            door = f"door_input = {coil}\n" if coil < inputs else ""
            locks.append(
                f'[[locks]]\nunit = "{unit.unit}"\nreference = "B{slave}-{coil:02d}"\n'
                f'controller = "board{slave}"\nchannel = {coil}\n{door}unlock_seconds = 5\n\n')
    config = directory / "gateway.toml"
    config.write_text(f"""\
[site]
id = "{SITE}"
app_name = "BenchGate"

[mqtt]
host = "{host}"
port = {port}
client_id = "agent-under-bench"
keepalive_s = 30
{login}
[commands]
trusted_keys = {{ bench-2026 = "{public_key}" }}
clock = "system"

[stora]
base_url = "http://127.0.0.1:9/2025-09"
auth = "static"
token_file = "{token}"
timeline_source_id = "tsrc_bench"

[storage]
path = "{directory / 'state' / 'gateway.db'}"

[control]
socket = "{socket_path}"

{"".join(controllers)}{"".join(locks)}""")
    return config, socket_path, units


class CoilWatch:
    """Timestamps every coil write the simulated bus receives (``time.perf_counter``).

    The time is taken when the request's bytes reach ``ModbusSimulator.feed`` (before
    they are decoded), so it is when the write arrived, not when it was answered.
    """

    def __init__(self, sim: ModbusSimBus) -> None:
        self._cond = threading.Condition()
        self._writes: dict[tuple[int, int], list[tuple[float, bool]]] = {}
        self._fed_at = 0.0
        self.count = 0
        simulator = sim.simulator
        feed = simulator.feed

        def timed_feed(data: bytes) -> list[bytes]:
            self._fed_at = time.perf_counter()
            return feed(data)

        simulator.feed = timed_feed  # type: ignore[method-assign]
        for board in simulator.boards.values():
            handle = board.handle

            def watched(request: Any, slave: int = board.slave_id,
                        handle: Callable[[Any], Any] = handle) -> Any:
                if isinstance(request, WriteCoilPDU):
                    self._record(slave, int(request.address), request.value == COIL_ON)
                return handle(request)

            board.handle = watched  # type: ignore[method-assign]

    def _record(self, slave: int, coil: int, on: bool) -> None:
        with self._cond:
            self._writes.setdefault((slave, coil), []).append((self._fed_at, on))
            self.count += 1
            self._cond.notify_all()

    def first(self, unit: Unit, on: bool, after: float) -> float | None:
        """When the first write of ``on`` to ``unit``'s coil at or after ``after`` came."""
        with self._cond:
            for at, value in self._writes.get((unit.slave, unit.coil), ()):
                if at >= after and value == on:
                    return at
        return None

    def wait(self, unit: Unit, on: bool, after: float, timeout: float) -> float | None:
        """Wait for such a write; its time, or None after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = self.first(unit, on, after)
                left = deadline - time.monotonic()
                if found is not None or left <= 0:
                    return found
                self._cond.wait(left)


class Recorder:
    """An MQTT subscriber that timestamps what it receives (``time.perf_counter``).

    Results on ``P/S/cmd/result`` are kept by ``jti`` (the first one of each); any other
    topic keeps (time, payload) in arrival order.
    """

    def __init__(self, host: str, port: int, topics: Sequence[str], name: str,
                 account: str | None = None) -> None:
        self._cond = threading.Condition()
        self.results: dict[str, tuple[float, dict[str, Any]]] = {}
        self.result_count = 0
        self.other: dict[str, list[tuple[float, bytes]]] = {}
        self._subscribed = threading.Event()
        self._paho = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                                 client_id=f"bench-{name}-{os.getpid()}",
                                 protocol=paho.MQTTv311)
        if account is not None:
            self._paho.username_pw_set(account, ACCOUNTS[account])
        self._paho.on_message = self._on_message
        self._paho.on_subscribe = lambda *_: self._subscribed.set()
        self._paho.connect(host, port, keepalive=60)
        sock = self._paho.socket()
        if isinstance(sock, socket.socket):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._paho.loop_start()
        self._paho.subscribe([(topic, 1) for topic in topics])
        if not self._subscribed.wait(10):
            self.close()
            raise RuntimeError(f"recorder {name}: no SUBACK")

    def _on_message(self, client: paho.Client, userdata: object,
                    msg: paho.MQTTMessage) -> None:
        at = time.perf_counter()
        payload = bytes(msg.payload)
        with self._cond:
            if msg.topic == RESULT_TOPIC:
                self.result_count += 1
                result = json.loads(payload)
                self.results.setdefault(str(result.get("jti")), (at, result))
            else:
                self.other.setdefault(msg.topic, []).append((at, payload))
            self._cond.notify_all()

    def wait_result(self, jti: str, timeout: float) -> dict[str, Any] | None:
        """The first result for ``jti``, waiting up to ``timeout``."""
        with self._cond:
            self._cond.wait_for(lambda: jti in self.results, timeout)
            found = self.results.get(jti)
        return None if found is None else found[1]

    def wait_other(self, topic: str, payload: bytes, timeout: float) -> float | None:
        """When ``payload`` arrived on ``topic`` (waiting up to ``timeout``)."""

        def seen() -> float | None:
            for at, got in reversed(self.other.get(topic, [])):
                if got == payload:
                    return at
            return None

        with self._cond:
            self._cond.wait_for(lambda: seen() is not None, timeout)
            return seen()

    def count(self, prefix: str) -> int:
        """How many messages arrived on topics starting with ``prefix`` (results aside)."""
        with self._cond:
            return sum(len(v) for k, v in self.other.items() if k.startswith(prefix))

    def wait_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait (on arrivals) until ``predicate()`` holds; whether it does."""
        with self._cond:
            return self._cond.wait_for(predicate, timeout)

    def close(self) -> None:
        """Disconnect and stop paho's thread."""
        with contextlib.suppress(Exception):
            self._paho.disconnect()
        self._paho.loop_stop()
        self._paho.reinitialise()


@dataclass
class BenchSite:
    """Broker, simulated bus, config and agent subprocess; a context manager.

    ``AgentProcess`` (devkit/site.py) only needs ``directory``, ``config_path``
    and ``socket_path`` of its site, which this provides.
    """

    boards: int = 1
    coils: int = 8
    inputs: int = 8
    broker_conf: Sequence[str] = ()
    acl: bool = False
    directory: Path = field(init=False)
    broker: Broker = field(init=False)
    sim: ModbusSimBus = field(init=False)
    watch: CoilWatch = field(init=False)
    signer: CommandSigner = field(init=False)
    config_path: Path = field(init=False)
    socket_path: Path = field(init=False)
    units: list[Unit] = field(init=False)
    agent: AgentProcess = field(init=False)
    _clients: list[Client | Recorder] = field(init=False, default_factory=list)
    _stack: contextlib.ExitStack = field(init=False, default_factory=contextlib.ExitStack)

    def __enter__(self) -> BenchSite:
        try:
            self._start()
        except BaseException:
            self._stack.close()
            raise
        return self

    def _start(self) -> None:
        stack = self._stack
        self.directory = Path(tempfile.mkdtemp(prefix="stora-bench-"))
        stack.callback(shutil.rmtree, self.directory, ignore_errors=True)
        conf = list(self.broker_conf)
        users = None
        if self.acl:
            users = ACCOUNTS
            conf.append(f"acl_file {write_acl(self.directory / 'acl')}")
        self.broker = Broker(self.directory / "broker", users=users, extra_conf=conf)
        self.broker.start()
        stack.callback(self.broker.close)
        slaves = tuple(range(1, self.boards + 1))
        self.sim = ModbusSimBus(self.directory / "ttyMB", slaves=slaves, coils=self.coils,
                                inputs=self.inputs)
        stack.callback(self.sim.close)
        self.watch = CoilWatch(self.sim)
        private, public = generate_keypair()
        self.signer = CommandSigner(private, "bench-2026", SITE)
        self.config_path, self.socket_path, self.units = write_config(
            self.directory, self.broker.host, self.broker.port, self.sim.path, public,
            boards=self.boards, coils=self.coils, inputs=self.inputs,
            account="agent" if self.acl else None)
        self.agent = AgentProcess(self)
        stack.callback(self._stop_agent)
        self.agent.start()
        stack.callback(self._close_clients)

    def _stop_agent(self) -> None:
        self.agent.stop()  # SIGTERM, then SIGKILL after 15 s
        self.agent.kill()

    def _close_clients(self) -> None:
        for client in reversed(self._clients):
            client.close()

    @property
    def pid(self) -> int:
        """The agent's process id."""
        assert self.agent.proc is not None  # started in __enter__
        return int(self.agent.proc.pid)

    def publisher(self) -> Client:
        """A ``devkit.mosquitto.Client`` (its ``publish`` waits for the PUBACK); the
        relay's account under ``acl``."""
        client = (Client(self.broker, username="relay", password=ACCOUNTS["relay"])
                  if self.acl else Client(self.broker))
        self._clients.append(client)
        return client

    def recorder(self, topics: Iterable[str], name: str) -> Recorder:
        """A ``Recorder`` on this broker, closed with the site."""
        recorder = Recorder(self.broker.host, self.broker.port, list(topics), name,
                            "relay" if self.acl else None)
        self._clients.append(recorder)
        return recorder

    def status(self) -> dict[str, Any]:
        """The agent's ``status`` through its control socket."""
        from gateway.ops.control import ControlClient

        result: dict[str, Any] = ControlClient(self.socket_path, timeout=30).call("status")
        return result

    def agent_log(self) -> str:
        """The end of the agent's log (for error messages)."""
        return str(self.agent.log())

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stack.close()


# --------------------------------------------------------------------------- /proc


def proc_status(pid: int) -> dict[str, int]:
    """The kB figures of /proc/<pid>/status (VmRSS, VmHWM, …)."""
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if len(parts) == 2 and parts[1] == "kB":
            values[name] = int(parts[0])
    return values


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all its threads), in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    # After "pid (comm) ", field 3 (state) is fields[0]; utime and stime are 14 and 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def threads_of(pid: int) -> int:
    """How many threads the process has."""
    return len(os.listdir(f"/proc/{pid}/task"))


# --------------------------------------------------------------------------- statistics


def percentile(samples: Sequence[float], p: float) -> float:
    """The nearest-rank ``p``-th percentile (0 < p <= 100) of ``samples``."""
    ordered = sorted(samples)
    rank = max(1, -(-len(ordered) * p // 100))
    return ordered[int(rank) - 1]


def ms(seconds: float) -> str:
    """Seconds as milliseconds, for the tables."""
    return f"{seconds * 1e3:7.2f} ms"
