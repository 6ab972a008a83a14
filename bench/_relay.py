"""What the relay benchmarks share: a relay on disk, run as its own process, and the MQTT
clients around it.

``RelayBench`` is a context manager that starts a real Mosquitto (``devkit/mosquitto.py``),
writes a relay config beside a migrated SQLite database (the default: WAL,
``synchronous=FULL``), and sets the relay up **directly in that database**, as the
connect flow and the CLI would have: one connected operator (``Operators.connect`` with
a ``TokenSet`` good for two hours), its webhook endpoint with a secret chosen here
(``set_webhook``), the registered sites (``SiteRegistry.add``), a staff API key
(``ApiKeys.create``), a ``UnitState`` row for each unit the benchmark uses (the unlock
API answers 404 for a unit it has never heard of) and the signing key (made now, so a
gateway's ``trusted_keys`` can name it).  Then it starts ``stora-relay run --config …``
as a subprocess (its own interpreter and GIL, as in service; its log in
``relay.log``) and waits until ``/healthz`` answers and the log says the MQTT link is
up.  On exit: SIGTERM (SIGKILL after 15 s), the broker, the directory.

Stora is not needed here: ``[stora]`` points at ``127.0.0.1:9``, where nothing listens.
The only call the relay makes to it on its own is the reconciliation pass at start
(again after 15 minutes, longer than any run), which fails once with "unreachable",
is logged as a warning and changes nothing; the webhook and unlock paths never call
Stora.  (A ``devkit.sandbox.Sandbox`` whose units match would make that pass succeed,
but it would then also rewrite the seeded units' state under the benchmark.)

``Gateway`` stands in for a site's gateway: a paho client on ``P/S/cmd`` of its sites
that timestamps each command's arrival (``time.perf_counter``) and answers ``done``
at once on ``P/S/cmd/result`` (like ``tests/support/relay_gateway.FakeGateway``, with
no signature check: the relay's signer is tested elsewhere).  ``Echo`` answers every
message on one topic with the same payload on another: the plain MQTT round trip the
relay's path is compared with.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import paho.mqtt.client as paho
from _site import SITE, Recorder, Unit, write_config
from paho.mqtt.enums import CallbackAPIVersion

from devkit.broker_client import Client
from devkit.mosquitto import Broker
from devkit.relay_site import write_relay_config
from devkit.sims.modbus import ModbusSimBus
from devkit.site import AgentProcess
from relay.config import load_config
from relay.crypto import Keyring
from relay.db.engine import Database
from relay.db.migrate import upgrade
from relay.db.models import UnitState
from relay.operators import StoraSite
from relay.services import Services
from relay.stora import TokenSet
from relay.webhooks import sign
from sitelink.jws import b64decode, public_key_text
from sitelink.payloads import result_payload, rfc3339

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "stora-gw"
#: The site a fake ``Gateway`` answers for.
FAKE_SITE = "site_fake"
#: The real agent's site (``_site.SITE``, which its config names).
AGENT_SITE = SITE
#: The real agent's units on its one simulated Modbus board (``_site.write_config``).
AGENT_COILS = 8
AGENT_UNITS = tuple(f"unit_1{coil:02d}" for coil in range(AGENT_COILS))
#: Nothing listens here: the relay's one reconciliation pass at start fails, harmlessly.
NO_STORA_URL = "http://127.0.0.1:9"
#: ``stora-relay run`` is up within ~2 s here; a loaded machine gets more.
START_TIMEOUT_S = 30.0


def cmd_topic(site: str) -> str:
    """``P/S/cmd``."""
    return f"{PREFIX}/{site}/cmd"


def claims_of(token: bytes) -> dict[str, Any]:
    """The claims of a compact JWS, unchecked."""
    body = b64decode(token.split(b".")[1])
    if body is None:
        raise ValueError("not a compact JWS")
    claims: dict[str, Any] = json.loads(body)
    return claims


def _nodelay(client: paho.Client) -> None:
    """paho leaves Nagle on; the gateway's own transport turns it off, so do we."""
    sock = client.socket()
    if isinstance(sock, socket.socket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _paho(broker: Broker, name: str) -> paho.Client:
    return paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                       client_id=f"bench-{name}-{os.getpid()}-{time.monotonic_ns()}",
                       clean_session=True, protocol=paho.MQTTv311)


@dataclass(frozen=True, slots=True)
class Arrival:
    """A command as it reached the gateway: when (``time.perf_counter`` and wall
    ``time.time``) and its claims."""

    at: float
    wall: float
    claims: dict[str, Any]


class Gateway:
    """A fast fake gateway for ``sites``: timestamps each command, answers ``done``."""

    def __init__(self, broker: Broker, sites: Sequence[str], *, answer: bool = True) -> None:
        self.answer = answer
        self._cond = threading.Condition()
        self.by_jti: dict[str, Arrival] = {}
        self.by_ver: dict[tuple[str, int], Arrival] = {}
        self.count = 0
        self.answered_at: dict[str, float] = {}
        self._subscribed = threading.Event()
        self._paho = _paho(broker, "gateway")
        self._paho.on_message = self._on_message
        self._paho.on_subscribe = lambda *_: self._subscribed.set()
        self._paho.connect(broker.host, broker.port, keepalive=60)
        _nodelay(self._paho)
        self._paho.loop_start()
        self._paho.subscribe([(cmd_topic(site), 1) for site in sites])
        if not self._subscribed.wait(10):
            self.close()
            raise RuntimeError("the fake gateway got no SUBACK")

    def _on_message(self, client: paho.Client, userdata: object,
                    msg: paho.MQTTMessage) -> None:
        at, wall = time.perf_counter(), time.time()
        claims = claims_of(bytes(msg.payload))
        arrival = Arrival(at, wall, claims)
        jti = str(claims["jti"])
        with self._cond:
            self.count += 1
            first = jti not in self.by_jti
            self.by_jti.setdefault(jti, arrival)
            if isinstance(claims.get("ver"), int):
                self.by_ver.setdefault((str(claims["unit"]), claims["ver"]), arrival)
            self._cond.notify_all()
        if self.answer:
            result = result_payload(jti, claims["cmd"], claims["unit"], "done", None,
                                    duplicate=not first, state=None, at=time.time())
            site = msg.topic[len(PREFIX) + 1:-len("/cmd")]
            client.publish(f"{PREFIX}/{site}/cmd/result", json.dumps(result), qos=1)
            with self._cond:
                self.answered_at.setdefault(jti, time.time())

    def wait_ver(self, unit: str, ver: int, timeout: float) -> Arrival | None:
        """The first command for ``unit`` with ``ver`` (a lockout or a clear)."""
        with self._cond:
            self._cond.wait_for(lambda: (unit, ver) in self.by_ver, timeout)
            return self.by_ver.get((unit, ver))

    def close(self) -> None:
        """Disconnect and stop paho's thread."""
        with contextlib.suppress(Exception):
            self._paho.disconnect()
        self._paho.loop_stop()


class Echo:
    """Answers each message on ``ping`` with its payload on ``pong`` (QoS 1 both ways)."""

    def __init__(self, broker: Broker, ping: str, pong: str) -> None:
        self._subscribed = threading.Event()
        self._paho = _paho(broker, "echo")

        def echo(client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
            client.publish(pong, bytes(msg.payload), qos=1)

        self._paho.on_message = echo
        self._paho.on_subscribe = lambda *_: self._subscribed.set()
        self._paho.connect(broker.host, broker.port, keepalive=60)
        _nodelay(self._paho)
        self._paho.loop_start()
        self._paho.subscribe(ping, 1)
        if not self._subscribed.wait(10):
            self.close()
            raise RuntimeError("the echo client got no SUBACK")

    def close(self) -> None:
        """Disconnect and stop paho's thread."""
        with contextlib.suppress(Exception):
            self._paho.disconnect()
        self._paho.loop_stop()


class RoundTrip:
    """The plain MQTT round trip: a publisher (QoS 1, ``devkit.broker_client.Client``)
    sends on ``P/bench/ping``, an ``Echo`` sends it back on ``P/bench/pong``, where a
    ``_site.Recorder`` timestamps its arrival (``time.perf_counter``)."""

    ping = f"{PREFIX}/bench/ping"
    pong = f"{PREFIX}/bench/pong"

    def __init__(self, broker: Broker) -> None:
        self._echo = Echo(broker, self.ping, self.pong)
        self._recorder = Recorder(broker.host, broker.port, [self.pong], "pinger")
        self._client = Client(broker)
        self._n = 0

    def sample(self) -> float:
        """One round trip, in seconds."""
        self._n += 1
        payload = f"rtt-{self._n}".encode()
        sent = time.perf_counter()
        self._client.publish(self.ping, payload, qos=1)
        back = self._recorder.wait_other(self.pong, payload, timeout=10)
        if back is None:
            raise RuntimeError(f"round trip {self._n} never came back")
        return back - sent

    def close(self) -> None:
        """Disconnect all three clients."""
        self._client.close()
        self._recorder.close()
        self._echo.close()


@dataclass
class AgentSite:
    """The real gateway agent (``stora-gateway run``, a subprocess) on one simulated
    Modbus board of :data:`AGENT_COILS` locks (a pty in this process), site
    ``_site.SITE``, on the relay's broker, trusting the relay's signing key.

    Its config is ``_site.write_config``'s, whose ``trusted_keys`` names the bench's own
    key id: the relay's ``kid`` is put in its place.
    """

    directory: Path
    config_path: Path
    socket_path: Path
    sim: ModbusSimBus
    units: list[Unit]
    agent: AgentProcess = field(init=False)

    def close(self) -> None:
        """Stop the agent (SIGTERM, then SIGKILL) and the simulator."""
        self.agent.stop()
        self.agent.kill()
        self.sim.close()


def start_agent(directory: Path, broker: Broker, kid: str, public_key: str) -> AgentSite:
    """Simulator, config and agent subprocess; returns once the agent is connected."""
    directory.mkdir(parents=True, exist_ok=True)
    sim = ModbusSimBus(directory / "ttyMB", slaves=(1,), coils=AGENT_COILS, inputs=AGENT_COILS)
    try:
        site = _agent_site(directory, broker, sim, kid, public_key)
        site.agent.start()
    except BaseException:
        sim.close()
        raise
    return site


def _agent_site(directory: Path, broker: Broker, sim: ModbusSimBus, kid: str,
                public_key: str) -> AgentSite:
    config, socket_path, units = write_config(
        directory, broker.host, broker.port, sim.path, public_key, boards=1,
        coils=AGENT_COILS, inputs=AGENT_COILS)
    if tuple(u.unit for u in units) != AGENT_UNITS:
        raise RuntimeError(f"the agent's units are {units}, not {AGENT_UNITS}")
    text = config.read_text()
    config.write_text(text.replace(f'bench-2026 = "{public_key}"', f'{kid} = "{public_key}"'))
    site = AgentSite(directory, config, socket_path, sim, units)
    site.agent = AgentProcess(site)
    return site


def webhook_body(unit: str, status: str, site: str, ver_ms: int, event_id: str) -> bytes:
    """A ``unit.updated`` delivery as Stora sends it (``updated_at`` = ``ver_ms``)."""
    return json.dumps({"event": {
        "id": event_id, "type": "unit.updated",
        "data": {"unit": {"id": unit, "status": status, "site": {"id": site},
                          "updated_at": rfc3339(ver_ms / 1000)}}}}).encode()


@dataclass
class RelayBench:
    """Broker, relay on disk, relay subprocess; a context manager (module docstring).

    ``units`` are ``(site, unit)`` pairs seeded as ``occupied``, no lockout.
    ``probes`` (diagnostic runs only) start the relay through this module's
    ``bench/_relay_trace.py`` with those options instead of the console script.
    """

    sites: Sequence[str] = (FAKE_SITE,)
    units: Sequence[tuple[str, str]] = ()
    debug: bool = False
    probes: Sequence[str] | None = None
    #: Diagnostics: run with the ``--trace`` probe into :attr:`trace_path` (read it with
    #: :func:`_relay_trace.read_trace` after :meth:`stop`).
    trace: bool = False
    parent: Path | None = None
    directory: Path = field(init=False)
    broker: Broker = field(init=False)
    config_path: Path = field(init=False)
    url: str = field(init=False)
    operator_id: str = field(init=False)
    api_key: str = field(init=False)
    webhook_key: str = field(init=False)
    webhook_secret: str = field(init=False)
    kid: str = field(init=False)
    public_key: str = field(init=False)
    db: Database = field(init=False)
    proc: subprocess.Popen[bytes] | None = field(init=False, default=None)
    _stack: contextlib.ExitStack = field(init=False, default_factory=contextlib.ExitStack)

    def __enter__(self) -> RelayBench:
        try:
            self._start()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stack.close()

    @property
    def log_path(self) -> Path:
        """The relay's stderr."""
        return self.directory / "relay.log"

    @property
    def trace_path(self) -> Path:
        """Where the ``--trace`` probe writes (:attr:`trace`)."""
        return self.directory / "trace.json"

    def log(self) -> str:
        """The end of the relay's log (for error messages)."""
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except FileNotFoundError:
            return ""

    @property
    def pid(self) -> int:
        """The relay's process id."""
        assert self.proc is not None  # started in __enter__
        return int(self.proc.pid)

    def _start(self) -> None:
        stack = self._stack
        self.directory = Path(tempfile.mkdtemp(prefix="stora-relay-bench-",
                                               dir=self.parent))
        stack.callback(shutil.rmtree, self.directory, ignore_errors=True)
        self.broker = Broker(self.directory / "broker")
        self.broker.start()
        stack.callback(self.broker.close)
        self.config_path = write_relay_config(
            self.directory / "relay", stora_url=NO_STORA_URL, client_id="relay-bench",
            client_secret="relay-bench-secret", mqtt_port=self.broker.port,
            app_name="BenchEntry", timeline_source_id="tsrc_bench")
        self._set_up()
        self._launch()

    def _set_up(self) -> None:
        """The operator, its webhook secret, sites, key, units and signing key."""
        config = load_config(self.config_path)
        self.url = f"http://{config.relay.listen_host}:{config.relay.listen_port}"
        self.db = Database(config.database.url)
        self._stack.callback(self.db.close)
        upgrade(self.db)
        services = Services.build(config, Keyring.from_file(config.secrets.data_key_file),
                                  db=self.db)
        self.operator_id = services.operators.connect(
            TokenSet("bench-access", "bench-refresh", 7200, "", 0),
            [StoraSite(site, site) for site in self.sites])
        self.webhook_secret = "bench-" + os.urandom(16).hex()
        services.operators.set_webhook(self.operator_id, "we_bench", self.webhook_secret)
        self.webhook_key = services.operators.webhook_key(self.operator_id)
        for site in self.sites:
            services.sites.add(site, self.operator_id)
        _, self.api_key = services.api_keys.create(self.operator_id, "bench staff", "staff")
        self.kid, key = services.signing_keys.current()
        self.public_key = public_key_text(key)
        now = time.time()
        with self.db.session() as s:
            for site, unit in self.units:
                s.add(UnitState(operator_id=self.operator_id, unit_id=unit, site_id=site,
                                status="occupied", ver=0, lockout=False, confirmed_ver=None,
                                updated_at=now))
        services.stora.close()  # the database stays open for the benchmark's reads

    def _launch(self) -> None:
        argv = ["run", "--config", str(self.config_path)] + (["--debug"] if self.debug else [])
        probes = list(self.probes or [])
        if self.trace:
            probes += ["--trace", str(self.trace_path)]
        if not probes:
            command = [str(Path(sys.executable).with_name("stora-relay")), *argv]
        else:
            command = [sys.executable, str(Path(__file__).with_name("_relay_trace.py")), *probes,
                       "--", *argv]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                command, stdout=log, stderr=log, cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT)})
        self._stack.callback(self.stop)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"stora-relay exited {self.proc.returncode}:\n{self.log()}")
            if "MQTT link up" in self.log() and self._healthy():
                return
            time.sleep(0.05)
        raise RuntimeError(f"stora-relay not ready within {START_TIMEOUT_S} s:\n{self.log()}")

    def _healthy(self) -> bool:
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(self.url + "/healthz", timeout=2).status_code == 200
        return False

    def stop(self) -> None:
        """SIGTERM (what systemd sends), SIGKILL after 15 s."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def gateway(self, sites: Sequence[str] = (FAKE_SITE,), *, answer: bool = True) -> Gateway:
        """A fake ``Gateway`` on this broker, closed with the bench."""
        gateway = Gateway(self.broker, sites, answer=answer)
        self._stack.callback(gateway.close)
        return gateway

    def agent_site(self) -> AgentSite:
        """The real agent on a simulated board (:func:`start_agent`), stopped with the
        bench; ``_site.SITE`` must be one of :attr:`sites`."""
        site = start_agent(self.directory / "agent", self.broker, self.kid, self.public_key)
        self._stack.callback(site.close)
        return site

    def round_trip(self) -> RoundTrip:
        """A ``RoundTrip`` on this broker, closed with the bench."""
        rtt = RoundTrip(self.broker)
        self._stack.callback(rtt.close)
        return rtt

    def sign(self, body: bytes) -> str:
        """The ``X-Stora-Signature`` of ``body`` with the operator's secret, ``t`` now."""
        return sign(self.webhook_secret, int(time.time()), body)

    def webhook_path(self) -> str:
        """The operator's webhook URL path."""
        return f"/webhooks/stora/{self.webhook_key}"
