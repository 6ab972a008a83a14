"""A simulated site for agent tests and benchmarks: simulators on ptys, a config, a
signer, the agent.

The simulators live in the test process; the agent runs either in-process (``Agent``) or
as a real subprocess (``AgentProcess``) that the tests can ``kill -9`` and restart while
the doors (the simulators) and the broker keep their state.  ``AgentProcess`` is
``stora-gateway run``, or ``python -m devkit.agent`` when a test hook is asked for (a
fault, a shorter restart guard: devkit/agent.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from devkit.broker_client import Client
from devkit.mosquitto import Broker
from devkit.signer import CommandSigner, generate_keypair
from devkit.sims.lockboard import LockboardSim, start_lockboard_sim
from devkit.sims.modbus import ModbusSimBus

SITE = "site_test"
PREFIX = f"stora-gw/{SITE}"
ROOT = Path(__file__).resolve().parents[1]

#: unit id -> (reference, controller, channel, door input)
MODBUS_UNITS = {
    "unit_a101": ("A-101", 0, 0),
    "unit_a102": ("A-102", 1, 1),
    "unit_a103": ("A-103", 2, 2),
}
LOCKBOARD_UNITS = {"unit_b201": ("B-201", 0), "unit_b202": ("B-202", 1)}


@dataclass
class SimSite:
    """Everything around the agent."""

    directory: Path
    broker: Broker
    modbus: ModbusSimBus
    lockers: LockboardSim
    signer: CommandSigner
    config_path: Path
    socket_path: Path
    extra: dict[str, Any] = field(default_factory=dict)

    def close(self) -> None:
        """Stop the simulators (the broker belongs to the caller)."""
        self.modbus.close()
        self.lockers.close()

    def client(self) -> Client:
        """A test MQTT client subscribed to the agent's outputs."""
        client = Client(self.broker)
        for suffix in ("cmd/result", "status", "alarm", "units/#"):
            client.subscribe(f"{PREFIX}/{suffix}")
        return client

    def coil(self, unit: str) -> bool:
        """Whether the relay of a Modbus unit is energized (unlocked) right now."""
        return self.modbus.board(1).coil(MODBUS_UNITS[unit][1])


#: The static token the agent's ``[stora]`` uses (a Sandbox accepts it with
#: ``static_tokens={STORA_TOKEN}``).
STORA_TOKEN = "test-token"  # noqa: S105 (a test's, on 127.0.0.1)
#: A ``base_url`` where nothing listens: events stay queued (connection refused).
NO_STORA_URL = "http://127.0.0.1:9/2025-09"


def write_agent_config(directory: Path, broker: Broker, modbus_port: Path, lockboard_port: Path,
                       public_key: str, *, pulse: bool = False, stora_url: str = NO_STORA_URL,
                       stora_limits: tuple[int, int] = (10, 60)) -> tuple[Path, Path]:
    """The agent's config for the simulated site; returns (config, control socket).

    ``stora_url`` is ``[stora] base_url`` (a sandbox's ``api_url``), with the static
    token :data:`STORA_TOKEN`; ``stora_limits`` are ``max_per_second`` and
    ``max_per_minute``.
    """
    token = directory / "token"
    token.write_text(f"{STORA_TOKEN}\n")
    token.chmod(0o600)
    socket_path = directory / "run" / "control.sock"
    locks = "".join(
        f'[[locks]]\nunit = "{unit}"\nreference = "{ref}"\ncontroller = "bus1"\n'
        f"channel = {ch}\ndoor_input = {door}\nunlock_seconds = 2\n\n"
        for unit, (ref, ch, door) in MODBUS_UNITS.items()
    ) + "".join(
        f'[[locks]]\nunit = "{unit}"\nreference = "{ref}"\ncontroller = "lockers"\n'
        f"channel = {ch}\n\n"
        for unit, (ref, ch) in LOCKBOARD_UNITS.items()
    )
    config = directory / "gateway.toml"
    config.write_text(f"""\
[site]
id = "{SITE}"
app_name = "TestGate"

[mqtt]
host = "{broker.host}"
port = {broker.port}
client_id = "agent-under-test"
keepalive_s = 5

[commands]
trusted_keys = {{ test-2026 = "{public_key}" }}
clock = "system"

[stora]
base_url = "{stora_url}"
auth = "static"
token_file = "{token}"
timeline_source_id = "tsrc_test"
max_per_second = {stora_limits[0]}
max_per_minute = {stora_limits[1]}

[storage]
path = "{directory / 'state' / 'gateway.db'}"

[control]
socket = "{socket_path}"

[[controllers]]
name = "bus1"
driver = "modbus"
port = "{modbus_port}"
address = 1
pulse = {"true" if pulse else "false"}
channels = 4
inputs = 4
timeout_ms = 100

[[controllers]]
name = "lockers"
driver = "lockboard"
port = "{lockboard_port}"
address = 0
channels = 8
timeout_ms = 100

{locks}""")
    return config, socket_path


def make_site(directory: Path, broker: Broker, *, pulse: bool = False,
              hold_s: float = 1.0, stora_url: str = NO_STORA_URL,
              stora_limits: tuple[int, int] = (10, 60)) -> SimSite:
    """Simulators, signer and config in ``directory`` (``[stora]`` at ``stora_url``)."""
    modbus = ModbusSimBus(directory / "ttyMB", slaves=(1,), coils=4, inputs=4)
    lockers = start_lockboard_sim(directory / "ttyLB", (0,), 8, hold_s=hold_s)
    private, public = generate_keypair()
    signer = CommandSigner(private, "test-2026", SITE)
    config, socket_path = write_agent_config(directory, broker, modbus.path, lockers.port.path,
                                             public, pulse=pulse, stora_url=stora_url,
                                             stora_limits=stora_limits)
    return SimSite(directory, broker, modbus, lockers, signer, config, socket_path)


class AgentSite(Protocol):
    """What :class:`AgentProcess` needs of a site (a :class:`SimSite`, a bench's site)."""

    @property
    def directory(self) -> Path:
        """Where the agent's log goes."""
        ...

    @property
    def config_path(self) -> Path:
        """The agent's config file."""
        ...

    @property
    def socket_path(self) -> Path:
        """The agent's control socket (``[control] socket``)."""
        ...


class AgentProcess:
    """``stora-gateway run`` as a real subprocess.

    ``fault`` (``NAME[@SECONDS]``, devkit/faults.py) and ``restart_min_uptime_s`` run it
    through ``python -m devkit.agent`` with those hooks instead.
    """

    def __init__(self, site: AgentSite, *, env: dict[str, str] | None = None,
                 fault: str | None = None, restart_min_uptime_s: float | None = None) -> None:
        self.site = site
        self.env = dict(env or {})
        self.argv = ["-m", "gateway.cli", "run"]
        if fault is not None or restart_min_uptime_s is not None:
            self.argv = ["-m", "devkit.agent"]
            if fault is not None:
                self.argv += ["--fault", fault]
            if restart_min_uptime_s is not None:
                self.argv += ["--restart-min-uptime", str(restart_min_uptime_s)]
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = site.directory / "agent.log"
        self.starts = 0

    def start(self, *, wait: bool = True, timeout: float = 20.0) -> float:
        """Start the agent; with ``wait``, until its control socket says the broker is up.

        Returns the monotonic time at which it was ready.
        """
        env = {**os.environ, "PYTHONPATH": str(ROOT), **self.env}
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(  # noqa: S603 (this interpreter, our own module)
            [sys.executable, *self.argv, "--config", str(self.site.config_path)],
            stdout=log, stderr=log, env=env, cwd=ROOT,
        )
        log.close()
        self.starts += 1
        return self.wait_ready(timeout) if wait else time.monotonic()

    def wait_ready(self, timeout: float = 20.0) -> float:
        """Wait until the agent answers ``status`` with the broker connected."""
        from gateway.ops.control import AgentUnavailable, ControlClient

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"agent exited {self.proc.returncode}:\n{self.log()}")
            try:
                status = ControlClient(self.site.socket_path, timeout=2).call("status")
            except (AgentUnavailable, OSError):
                time.sleep(0.05)
                continue
            if status.get("broker", {}).get("connected"):
                return time.monotonic()
            time.sleep(0.05)
        raise AssertionError(f"agent not ready within {timeout}s:\n{self.log()}")

    def kill(self) -> None:
        """kill -9."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> int:
        """SIGTERM and wait; the exit status."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode or 0)

    def log(self) -> str:
        """The agent's stderr so far (for failure messages)."""
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except FileNotFoundError:
            return ""


def results(client: Client) -> list[dict[str, Any]]:
    """Every command result received so far, decoded."""
    return [json.loads(m.payload) for m in client.messages(f"{PREFIX}/cmd/result")]


class RunningAgent:
    """An in-process agent on a thread (``with RunningAgent(config_path) as agent``)."""

    def __init__(self, config_path: Path, **kwargs: Any) -> None:
        from gateway.agent import Agent
        from gateway.config import load_config

        self.agent = Agent(load_config(config_path), **kwargs)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.started = threading.Event()

    def _run(self) -> None:
        self.agent.start()
        self.started.set()
        self.agent.run_forever()

    def __enter__(self) -> Any:
        self.thread.start()
        assert self.started.wait(20), "Agent.start() did not return"
        assert self.agent.link.wait_connected(10)
        return self.agent

    def __exit__(self, *exc: object) -> None:
        self.agent.stop_event.set()
        self.thread.join(timeout=10)
        self.agent.stop()
