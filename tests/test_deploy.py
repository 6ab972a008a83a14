"""deploy/: the broker ACL, the site broker and its bridge, the systemd unit, install.sh.

Every MQTT test runs a real Mosquitto with the files from ``deploy/`` as they ship.
Mosquitto drops a publish the ACL forbids without telling an MQTT 3.1.1 client (the
PUBACK still comes), and a subscription outside the ACL is granted but never delivers;
so each probe asserts on what subscribers *receive*, and ends with a positive control:
a permitted message published after the forbidden ones, which the subscriber must
receive.  Mosquitto delivers one client's messages in order, so once the control has
arrived, a forbidden message that got through would have arrived before it.
``test_the_probes_catch_a_permissive_acl`` runs the same probes against broken ACLs to
prove that they would fail.

Fault matrix rows: #42 (crash loop: the unit's start limit), #49 (least privilege: the
``systemd-analyze security`` score may not regress), #15 (an oversize alarm against the
broker's max_packet_size), #16 (ACL escapes, the controller links' accounts included),
and the README's "Broker requirements" (only the relay sends commands; the RETAIN flag
kept end to end).  Issue 11: client ids bound to accounts on both brokers (another
account using the agent's, the bridge's or the relay's id disturbs nothing, and the
same probes against the old configs show that it did), the agent on the site broker's
unix socket.  install.sh itself runs in tests/test_deploy_install.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from devkit.mosquitto import Broker, BrokerError, Client, TlsFiles, make_tls_files
from devkit.site import PREFIX as AGENT_PREFIX
from devkit.site import SITE as AGENT_SITE
from devkit.site import AgentProcess, SimSite, make_site
from gateway.config import MqttConfig
from gateway.link import LinkTimings, Message, MqttLink
from tests.support.deploy import (
    ACL,
    CLOUD_BROKER_CONF,
    DEPLOY,
    ID_BINDING,
    SITE_BROKER_CONF,
    shipped_broker,
    without_id_binding,
)

ROOT = Path(__file__).resolve().parents[1]
UNIT = DEPLOY / "systemd" / "stora-gateway.service"
INSTALL = DEPLOY / "install.sh"

P = "stora-gw"
#: The exposure score ``systemd-analyze security --offline=true`` gave the unit with
#: systemd 252 (Debian 12) when it was written (deploy/README.md).  Lower is better; a
#: change that raises it must say why here and in the README (fault matrix #49).
EXPOSURE_BASELINE = 1.9

# Every test in this file starts brokers, agents or systemd-analyze: seconds, not minutes.
pytestmark = pytest.mark.timeout(60)


# =========================================================================== the ACL


@dataclass
class Accounts:
    """One connected test client per account, on a broker running the ACL under test."""

    broker: Broker
    passwords: dict[str, str]

    def __post_init__(self) -> None:
        self._clients: dict[str, Client] = {}

    def __getitem__(self, user: str) -> Client:
        if user not in self._clients:
            self._clients[user] = Client(self.broker, f"probe-{user}", username=user,
                                         password=self.passwords[user])
        return self._clients[user]

    def close(self) -> None:
        for client in self._clients.values():
            client.close()


#: Gateways, the relay, someone else; on a site broker, the gateway's links to its lock
#: controllers, Zigbee2MQTT, and a Tasmota device (account named as its Topic).
USERS = ("site_a", "site_b", "relay", "intruder", "gw-zigbee2mqtt", "gw-tasmota",
         "zigbee2mqtt", "gate_relay")


@contextlib.contextmanager
def acl_accounts(directory: Path, acl_text: str) -> Iterator[Accounts]:
    """A running broker with a password for every account in USERS and ``acl_text`` as
    its ACL (the test helper's own settings otherwise: per_listener_settings false)."""
    directory.mkdir(parents=True, exist_ok=True)
    acl = directory / "acl"
    acl.write_text(acl_text)
    users = {user: secrets.token_urlsafe(12) for user in USERS}
    with Broker(directory / "broker", users=users, extra_conf=[f"acl_file {acl}"]) as broker:
        acc = Accounts(broker, users)
        try:
            yield acc
        finally:
            acc.close()


@pytest.fixture
def accounts(tmp_path: Path) -> Iterator[Accounts]:
    """The ACL exactly as deploy/ ships it."""
    with acl_accounts(tmp_path, ACL.read_text()) as acc:
        yield acc


def try_subscribe(client: Client, topic: str) -> bool:
    """Subscribe if the broker lets us; False when the SUBACK refuses it."""
    try:
        client.subscribe(topic)
    except BrokerError:
        return False
    return True


def from_(client: Client, payload: bytes) -> list[str]:
    """The topics on which ``client`` received ``payload``."""
    return [m.topic for m in client.messages() if m.payload == payload]


def echo(client: Client, user: str) -> None:
    """Positive control for ``client`` itself: publish on its own liveness topic (which
    every account may read and write) and wait for the echo; whatever was queued for it
    earlier has arrived by then."""
    topic = f"{P}/{user}/status/liveness/probe"
    marker = secrets.token_bytes(8)
    client.subscribe(topic)
    client.publish(topic, marker)
    client.expect(topic, where=lambda m: m.payload == marker)


def gateway_outputs(site: str) -> list[str]:
    """Every topic a gateway publishes on (contract §4 and the liveness echo)."""
    return [f"{P}/{site}/{suffix}" for suffix in (
        "cmd/result", "mgmt/result", "status", "status/bridge", "units/unit_1", "alarm",
        "status/liveness/stora-gw-" + site)]


def gateway_inputs(site: str) -> list[str]:
    return [f"{P}/{site}/cmd", f"{P}/{site}/mgmt"]


def relay_listens(relay: Client) -> None:
    """The relay subscribes to everything it reads, for every site."""
    for suffix in ("cmd/result", "mgmt/result", "status", "status/bridge", "units/#", "alarm"):
        relay.subscribe(f"{P}/+/{suffix}")


def gateway_listens(gateway: Client, site: str) -> None:
    """A gateway subscribes to its inputs and its liveness echo, as the agent does."""
    for topic in (*gateway_inputs(site), f"{P}/{site}/status/liveness/#"):
        gateway.subscribe(topic)


# ---------------------------------------------------------------- probes: leaks or []


def probe_reading_other_sites(acc: Accounts) -> list[str]:
    """Gateway A subscribes as widely as it can; the relay commands site B, then A."""
    a, b, relay = acc["site_a"], acc["site_b"], acc["relay"]
    refused = [t for t in (*gateway_inputs("site_b"), f"{P}/+/cmd", f"{P}/#", "#")
               if not try_subscribe(a, t)]
    gateway_listens(b, "site_b")
    for_b, mgmt_for_b, for_a = b"command for b", b"mgmt for b", b"command for a"
    relay.publish(f"{P}/site_b/cmd", for_b)
    relay.publish(f"{P}/site_b/mgmt", mgmt_for_b)
    relay.publish(f"{P}/site_a/cmd", for_a)
    # Positive controls: B got its own; A got its own, after B's were published.
    b.expect(f"{P}/site_b/cmd", where=lambda m: m.payload == for_b)
    b.expect(f"{P}/site_b/mgmt", where=lambda m: m.payload == mgmt_for_b)
    a.expect("#", where=lambda m: m.payload == for_a)
    leaks = [f"site_a read {t}" for p in (for_b, mgmt_for_b) for t in from_(a, p)]
    print(f"\nsubscriptions the broker refused outright: {refused or 'none'}")
    return leaks


def probe_writing_other_sites(acc: Accounts) -> list[str]:
    """Gateway A publishes on every topic of site B; B and the relay must see none."""
    a, b, relay = acc["site_a"], acc["site_b"], acc["relay"]
    gateway_listens(b, "site_b")
    relay_listens(relay)
    forged = b"from site_a"
    for topic in (*gateway_inputs("site_b"), *gateway_outputs("site_b")):
        a.publish(topic, forged)
    # Positive controls: A may still publish its own result; B still gets the relay's.
    own, for_b = b"site_a's own result", b"relay to b"
    a.publish(f"{P}/site_a/cmd/result", own)
    relay.publish(f"{P}/site_b/cmd", for_b)
    relay.expect(f"{P}/site_a/cmd/result", where=lambda m: m.payload == own)
    b.expect(f"{P}/site_b/cmd", where=lambda m: m.payload == for_b)
    echo(b, "site_b")
    return ([f"relay received site_a's {t}" for t in from_(relay, forged)]
            + [f"site_b received site_a's {t}" for t in from_(b, forged)])


def probe_gateway_commands(acc: Accounts) -> list[str]:
    """A gateway can send no command or management request, not even to itself."""
    a, b, relay = acc["site_a"], acc["site_b"], acc["relay"]
    gateway_listens(a, "site_a")
    gateway_listens(b, "site_b")
    forged = b"command from site_a"
    for topic in (*gateway_inputs("site_a"), *gateway_inputs("site_b")):
        a.publish(topic, forged)
    for site, gateway in (("site_a", a), ("site_b", b)):
        marker = f"relay to {site}".encode()
        relay.publish(f"{P}/{site}/cmd", marker)
        gateway.expect(f"{P}/{site}/cmd", where=lambda m, x=marker: m.payload == x)
    return ([f"site_a received its own forged {t}" for t in from_(a, forged)]
            + [f"site_b received site_a's forged {t}" for t in from_(b, forged)])


def probe_intruder(acc: Accounts) -> list[str]:
    """Another account (a LAN device, a leaked technician login) reaches no gateway and
    reads nothing of theirs."""
    a, b, relay, intruder = acc["site_a"], acc["site_b"], acc["relay"], acc["intruder"]
    gateway_listens(a, "site_a")
    gateway_listens(b, "site_b")
    relay_listens(relay)
    refused = [t for t in ("#", f"{P}/#") if not try_subscribe(intruder, t)]
    forged = b"from intruder"
    for site in ("site_a", "site_b"):
        for topic in (*gateway_inputs(site), *gateway_outputs(site)):
            intruder.publish(topic, forged)
    # Positive controls, all published after the intruder's messages.
    commands = {site: f"relay to {site}".encode() for site in ("site_a", "site_b")}
    for site, payload in commands.items():
        relay.publish(f"{P}/{site}/cmd", payload)
    result = b"site_a result"
    a.publish(f"{P}/site_a/cmd/result", result)
    a.expect(f"{P}/site_a/cmd", where=lambda m: m.payload == commands["site_a"])
    b.expect(f"{P}/site_b/cmd", where=lambda m: m.payload == commands["site_b"])
    relay.expect(f"{P}/site_a/cmd/result", where=lambda m: m.payload == result)
    echo(a, "site_a")
    echo(b, "site_b")
    echo(intruder, "intruder")  # its own queue is drained too
    leaks = [f"{name} received the intruder's {t}"
             for name, client in (("site_a", a), ("site_b", b), ("relay", relay))
             for t in from_(client, forged)]
    leaks += [f"intruder read {m.topic}" for m in intruder.messages()
              if not m.topic.startswith(f"{P}/intruder/")]
    print(f"\nintruder subscriptions the broker refused outright: {refused or 'none'}")
    return leaks


def test_a_gateway_receives_its_own_commands_and_reports_to_the_relay(
        accounts: Accounts) -> None:
    a, b, relay = accounts["site_a"], accounts["site_b"], accounts["relay"]
    gateway_listens(a, "site_a")
    gateway_listens(b, "site_b")
    relay_listens(relay)
    for site, gateway in (("site_a", a), ("site_b", b)):
        for topic in gateway_inputs(site):
            relay.publish(topic, f"to {topic}".encode())
            gateway.expect(topic, where=lambda m, t=topic: m.payload == f"to {t}".encode())
        for topic in gateway_outputs(site):
            if "/liveness/" in topic:
                continue  # the relay does not read it; the gateway does:
            gateway.publish(topic, f"from {topic}".encode())
            relay.expect("#", where=lambda m, t=topic: m.topic == t
                         and m.payload == f"from {t}".encode())
        echo(gateway, site)


def test_a_gateway_cannot_read_another_site_s_commands(accounts: Accounts) -> None:
    assert probe_reading_other_sites(accounts) == []


def test_a_gateway_cannot_publish_on_another_site_s_topics(accounts: Accounts) -> None:
    assert probe_writing_other_sites(accounts) == []


def test_a_gateway_cannot_send_commands_even_to_itself(accounts: Accounts) -> None:
    assert probe_gateway_commands(accounts) == []


def test_another_account_reaches_no_gateway_and_reads_nothing(accounts: Accounts) -> None:
    assert probe_intruder(accounts) == []


def probe_controller_links(acc: Accounts) -> list[str]:
    """The gateway's zigbee2mqtt and Tasmota links, and the devices, reach their device
    topics (positive controls) and nothing of stora-gw/: a link password lives on the
    same box as the agent's, a device's on the LAN."""
    a, relay = acc["site_a"], acc["relay"]
    link_z, link_t = acc["gw-zigbee2mqtt"], acc["gw-tasmota"]
    bridge, device = acc["zigbee2mqtt"], acc["gate_relay"]
    others = {"gw-zigbee2mqtt": link_z, "gw-tasmota": link_t, "zigbee2mqtt": bridge,
              "gate_relay": device}
    gateway_listens(a, "site_a")
    relay_listens(relay)
    for client in others.values():
        for topic in ("#", f"{P}/#", f"{P}/site_a/cmd", f"{P}/site_a/mgmt"):
            try_subscribe(client, topic)
    forged = b"forged by a controller account"
    for client in others.values():
        for topic in (*gateway_inputs("site_a"), *gateway_outputs("site_a")):
            client.publish(topic, forged)
    # What they are for.
    bridge.subscribe("zigbee2mqtt/#")
    link_z.publish("zigbee2mqtt/bridge/request/permit_join", b'{"value":true}')
    link_z.publish("zigbee2mqtt/site/A-101/set", b'{"state":"UNLOCK"}')
    bridge.expect("zigbee2mqtt/site/A-101/set")
    bridge.publish("zigbee2mqtt/site/A-101", b'{"state":"UNLOCK"}')
    link_z.expect("zigbee2mqtt/site/A-101")
    link_t.publish("cmnd/gate_relay/POWER1", b"ON")
    device.expect("cmnd/gate_relay/POWER1")
    device.publish("stat/gate_relay/POWER1", b"ON")
    link_t.expect("stat/gate_relay/POWER1")
    # The relay's commands, after all of the above.
    command = b"relay to site_a"
    relay.publish(f"{P}/site_a/cmd", command)
    a.expect(f"{P}/site_a/cmd", where=lambda m: m.payload == command)
    echo(a, "site_a")
    for user, client in others.items():
        echo(client, user)
    leaks = [f"{user} read {m.topic}" for user, client in others.items()
             for m in client.messages() if m.topic.startswith(f"{P}/")
             and not m.topic.startswith(f"{P}/{user}/")]
    leaks += [f"{name} received a controller account's {t}"
              for name, client in (("site_a", a), ("relay", relay))
              for t in from_(client, forged)]
    leaks += [f"zigbee2mqtt received {m.topic} from the gateway's link"
              for m in bridge.messages("zigbee2mqtt/bridge/request/#")]
    return leaks


def test_controller_links_and_devices_reach_no_gateway_topic(accounts: Accounts) -> None:
    assert probe_controller_links(accounts) == []


def test_anonymous_clients_are_refused(accounts: Accounts) -> None:
    with pytest.raises(BrokerError, match="did not connect"):
        Client(accounts.broker, "anonymous-probe", timeout=1.0)


def _acl_without(line: str, *replacement: str) -> str:
    text = ACL.read_text()
    assert text.count(f"\n{line}\n") == 1, f"deploy/mosquitto/acl has no line {line!r}"
    return text.replace(f"\n{line}\n", "\n" + "".join(f"{r}\n" for r in replacement))


BROKEN_ACLS: dict[str, tuple[Callable[[], str], Callable[[Accounts], list[str]]]] = {
    "everyone reads and writes the whole tree": (
        lambda: ACL.read_text() + "\npattern readwrite stora-gw/#\n",
        probe_writing_other_sites),
    "gateways may read every site's commands": (
        lambda: _acl_without("pattern read stora-gw/%u/cmd", "pattern read stora-gw/+/cmd"),
        probe_reading_other_sites),
    "gateways may send commands to themselves": (
        lambda: _acl_without("pattern read stora-gw/%u/cmd",
                             "pattern readwrite stora-gw/%u/cmd"),
        probe_gateway_commands),
    "any account may send commands": (
        lambda: ACL.read_text() + "\npattern write stora-gw/+/cmd\n",
        probe_intruder),
    "any account may read the relay's commands": (
        lambda: ACL.read_text() + "\npattern read stora-gw/+/cmd\n",
        probe_intruder),
    "the zigbee2mqtt link may read every site's commands": (
        lambda: _acl_without("user gw-zigbee2mqtt", "user gw-zigbee2mqtt",
                             "topic read stora-gw/#"),
        probe_controller_links),
    "the zigbee2mqtt link may reconfigure Zigbee2MQTT": (
        lambda: _acl_without("user gw-zigbee2mqtt", "user gw-zigbee2mqtt",
                             "topic write zigbee2mqtt/#"),
        probe_controller_links),
}


@pytest.mark.parametrize("mistake", sorted(BROKEN_ACLS))
def test_the_probes_catch_a_permissive_acl(tmp_path: Path, mistake: str) -> None:
    make_acl, probe = BROKEN_ACLS[mistake]
    with acl_accounts(tmp_path, make_acl()) as acc:
        leaks = probe(acc)
    assert leaks, f"{probe.__name__} did not notice: {mistake}"


# ==================================================================== the real agent


def test_the_agent_runs_under_the_acl_and_tells_systemd_it_is_ready(tmp_path: Path) -> None:
    """``stora-gateway run`` as the unit runs it: logged in with its site id under the
    deploy ACL, with $NOTIFY_SOCKET set.  It must send READY=1 (the unit is
    Type=notify), subscribe and echo its liveness without any refusal, execute the
    relay's command, and say so to the relay."""
    passwords = {AGENT_SITE: secrets.token_urlsafe(12), "relay": secrets.token_urlsafe(12)}
    broker = Broker(tmp_path / "broker", users=passwords, extra_conf=[f"acl_file {ACL}"])
    with broker:
        site = make_site(tmp_path, broker)
        password_file = tmp_path / "mqtt-password"
        password_file.write_text(passwords[AGENT_SITE] + "\n")
        password_file.chmod(0o600)
        config = site.config_path.read_text()
        assert config.count("keepalive_s = 5\n") == 1
        site.config_path.write_text(config.replace(
            "keepalive_s = 5\n",
            f'keepalive_s = 5\nusername = "{AGENT_SITE}"\npassword_file = "{password_file}"\n'))
        notify_path = tmp_path / "notify"
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(notify_path))
        relay = Client(broker, "relay-probe", username="relay", password=passwords["relay"])
        relay_listens(relay)
        log_path = tmp_path / "agent.log"
        # As systemd sets them for this unit: the notify socket, and with WatchdogSec=
        # the period in microseconds (WATCHDOG_PID is optional and left out).
        unit = unit_settings()
        watchdog_s = float(unit["WatchdogSec"][-1].rstrip("s")) if unit.get("WatchdogSec") \
            else None
        env = {**os.environ, "PYTHONPATH": str(ROOT), "NOTIFY_SOCKET": str(notify_path)}
        env.pop("WATCHDOG_PID", None)
        if watchdog_s is not None:
            env["WATCHDOG_USEC"] = str(int(watchdog_s * 1_000_000))
        with log_path.open("wb") as log:
            agent = subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", "run", "--config", str(site.config_path)],
                stdout=log, stderr=log, cwd=ROOT, env=env,
            )
        try:
            notify.settimeout(20)
            notices = [notify.recv(4096).decode()]
            assert notices == ["READY=1"], log_path.read_text()
            relay.expect(f"{AGENT_PREFIX}/status", timeout=10,
                         where=lambda m: json.loads(m.payload).get("online") is True)

            from gateway.ops.control import ControlClient

            def link() -> dict[str, Any]:
                status = ControlClient(site.socket_path, timeout=5).call("status")
                return dict(status["broker"])

            deadline = time.monotonic() + 10
            while link().get("liveness_rtt_s") is None:  # one echo: about keepalive_s / 2
                assert time.monotonic() < deadline, f"no liveness echo: {link()}"
                time.sleep(0.1)

            jti, token = site.signer.command("unlock", "unit_b201", ttl=60)
            relay.publish(f"{AGENT_PREFIX}/cmd", token)
            [result] = relay.expect(
                f"{AGENT_PREFIX}/cmd/result", timeout=10,
                where=lambda m: json.loads(m.payload).get("jti") == jti)
            assert json.loads(result.payload)["status"] == "done"
            stats = link()
            assert stats["subscribe_failures"] == 0
            assert stats["liveness_failures"] == 0
            assert stats["connects"] == 1

            # What the unit relies on, against what the agent sent in this run.
            assert unit["Type"] == ["notify"]
            if watchdog_s is not None:
                notify.settimeout(watchdog_s / 2)
                notices = [notify.recv(4096).decode()]
                assert notices == ["WATCHDOG=1"], (
                    f"WatchdogSec is set but the agent sent {notices}, not WATCHDOG=1: "
                    f"systemd would kill it\n{log_path.read_text()}")
        finally:
            agent.send_signal(signal.SIGTERM)
            try:
                code = agent.wait(timeout=20)
            finally:
                if agent.poll() is None:
                    agent.kill()
                notify.close()
                site.close()
        relay.expect(f"{AGENT_PREFIX}/status",
                     where=lambda m: json.loads(m.payload).get("online") is False)
        relay.close()
        log = log_path.read_text()
        assert code == 0, log  # a clean stop is not a failure: Restart=on-failure stays put
        assert "refused subscription" not in log, log
        assert passwords[AGENT_SITE] not in log  # fault matrix #47


# ============================================================= site broker and bridge


#: Small and fast, same proportions as the agent's defaults.
FAST = LinkTimings(backoff_initial_s=0.1, backoff_max_s=0.5, liveness_interval_s=0.5,
                   liveness_timeout_s=0.5, connect_timeout_s=1.0, stable_after_s=1.0)

SITE = "site_123"  # the placeholder site id in site-broker.conf


@dataclass
class BridgedSite:
    """The cloud broker (deploy/'s cloud-broker.conf: TLS, the ACL, accounts for the
    site, another site and the relay), the site broker running deploy/'s config bridged
    to it, the relay on the cloud broker, and the agent's own MQTT link on the site
    broker's unix socket, logged in as the site."""

    cloud: Broker
    site_broker: Broker
    relay: Client
    link: MqttLink
    received: list[Message]
    tls: TlsFiles
    cloud_users: dict[str, str]

    def wait_received(self, payload: bytes, timeout: float = 10) -> Message:
        """The message with ``payload`` the gateway's link received."""
        wait_for(lambda: any(m.payload == payload for m in self.received), timeout,
                 lambda: f"received {self.received}\n{self.site_broker.log_text()}")
        return next(m for m in self.received if m.payload == payload)

    def cloud_client(self, user: str, client_id: str) -> Client:
        """A client of the cloud broker, logged in as ``user`` with ``client_id``."""
        return Client(self.cloud, client_id, username=user, password=self.cloud_users[user],
                      tls=self.tls, host="127.0.0.1")


#: The relay's client id on the cloud broker in these tests (its default is random).
RELAY_ID = "stora-relay-1"


@contextlib.contextmanager
def bridged_site(directory: Path, cloud_text: str | None = None) -> Iterator[BridgedSite]:
    """A :class:`BridgedSite`; ``cloud_text`` replaces the shipped cloud-broker.conf."""
    tls = make_tls_files(directory / "tls", hostname="127.0.0.1")
    cloud_users = {SITE: secrets.token_urlsafe(12), "site_b": secrets.token_urlsafe(12),
                   "relay": secrets.token_urlsafe(12)}
    cloud = shipped_broker(directory / "cloud", cloud_users, cloud=True, tls=tls,
                           text=cloud_text)
    gateway_password = secrets.token_urlsafe(12)
    site_broker = shipped_broker(directory / "site", {SITE: gateway_password},
                                 cloud_port=cloud.port, cloud_ca=tls.ca,
                                 bridge_password=cloud_users[SITE])
    assert site_broker.socket_path is not None
    password_file = directory / "gateway-password"
    password_file.write_text(gateway_password)
    password_file.chmod(0o600)
    received: list[Message] = []
    with cloud, site_broker:
        relay = Client(cloud, RELAY_ID, username="relay", password=cloud_users["relay"],
                       tls=tls, host="127.0.0.1")
        try:
            relay_listens(relay)
            relay.expect(f"{P}/{SITE}/status/bridge", timeout=15,
                         where=lambda m: m.payload == b"1")
            link = MqttLink(
                MqttConfig(host=str(site_broker.socket_path), port=1883, topic_prefix=P,
                           client_id=f"stora-gw-{SITE}", username=SITE,
                           password_file=password_file, tls=False, ca_file=None,
                           cert_file=None, key_file=None, keepalive_s=5),
                status_topic=f"{P}/{SITE}/status", birth=lambda: b'{"online":true}',
                will=b'{"online":false}', subscriptions=[(f"{P}/{SITE}/cmd", 1)],
                on_message=received.append, on_connected=lambda present: None,
                timings=FAST)
            link.start()
            try:
                assert link.wait_connected(10), site_broker.log_text()
                yield BridgedSite(cloud, site_broker, relay, link, received, tls,
                                  cloud_users)
            finally:
                link.stop(timeout=3.0)
        finally:
            relay.close()


@pytest.fixture
def bridged(tmp_path: Path) -> Iterator[BridgedSite]:
    with bridged_site(tmp_path) as site:
        yield site


def test_site_broker_settings_the_gateway_needs() -> None:
    from gateway.config import MQTT_MAX_PACKET_BYTES

    settings = [line.split(None, 1) for line in SITE_BROKER_CONF.read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    values = dict(settings)
    assert values["set_tcp_nodelay"] == "true"  # README: ~40 ms per command otherwise
    assert values["allow_anonymous"] == "false"
    assert values["bridge_insecure"] == "false"
    assert values["cleansession"] == "false"
    assert int(values["max_packet_size"]) >= 4096 + 1024  # a 4 KiB command + overhead
    # The agent refuses to send what this broker would drop it for (issue 11 item 2).
    assert int(values["max_packet_size"]) == MQTT_MAX_PACKET_BYTES
    assert values["persistence"] == "true"
    # Only the unix socket: no TCP port a local user could take while Mosquitto restarts.
    assert [v for k, v in settings if k == "listener"] == ["0 /run/stora-mqtt/mqtt.sock"]
    tmpfiles = (DEPLOY / "mosquitto" / "tmpfiles.conf").read_text().splitlines()
    assert [line for line in tmpfiles if line and not line.startswith("#")] == [
        "d /run/stora-mqtt 2750 mosquitto stora-gateway -"]


@pytest.mark.parametrize("conf", [SITE_BROKER_CONF, CLOUD_BROKER_CONF], ids=lambda p: p.name)
def test_every_listener_binds_client_ids_to_accounts(conf: Path) -> None:
    """Mosquitto 2.0 reads use_username_as_clientid as a setting of the listener above
    it (whatever per_listener_settings says), and before the first listener it opens a
    default listener on port 1883 on every interface.  So: after each listener line,
    the commented-out ones included, and never before the first."""
    lines = [line.strip().lstrip("#").strip() for line in conf.read_text().splitlines()]
    listeners = [i for i, line in enumerate(lines) if line.startswith("listener ")]
    assert listeners
    binding = [i for i, line in enumerate(lines) if line == ID_BINDING]
    assert binding
    assert min(binding) > listeners[0]
    for here, after in zip(listeners, [*listeners[1:], len(lines)], strict=True):
        assert any(here < i < after for i in binding), f"{conf.name}: {lines[here]}"


def test_the_site_broker_takes_no_anonymous_client(bridged: BridgedSite) -> None:
    with pytest.raises(BrokerError, match="did not connect"):
        Client(bridged.site_broker, "anonymous-probe", timeout=1.0, unix=True)


def test_the_bridge_carries_commands_in_and_reports_out(bridged: BridgedSite) -> None:
    relay, link = bridged.relay, bridged.link
    relay.expect(f"{P}/{SITE}/status", where=lambda m: m.payload == b'{"online":true}')
    relay.publish(f"{P}/{SITE}/cmd", b"command")
    relay.publish(f"{P}/{SITE}/mgmt", b"not subscribed by this link")
    assert bridged.wait_received(b"command").topic == f"{P}/{SITE}/cmd"
    for suffix in ("cmd/result", "mgmt/result", "units/unit_1", "alarm"):
        assert link.publish(f"{P}/{SITE}/{suffix}", suffix.encode())
        relay.expect(f"{P}/{SITE}/{suffix}", where=lambda m, s=suffix: m.payload == s.encode())
    assert link.stats()["subscribe_failures"] == 0
    wait_for(lambda: link.stats()["liveness_rtt_s"] is not None, 5, link.stats)
    # The liveness echo stays on the site broker.
    assert not [m for m in relay.messages() if "/liveness/" in m.topic]


def test_a_command_published_retained_arrives_flagged_retained(bridged: BridgedSite) -> None:
    """The RETAIN flag survives relay -> cloud -> bridge -> site broker -> agent, live
    and on the bridge's reconnect, so the agent refuses the command (contract §5)."""
    bridged.relay.publish(f"{P}/{SITE}/cmd", b"live command")
    bridged.relay.publish(f"{P}/{SITE}/cmd", b"retained command", retain=True)
    assert bridged.wait_received(b"live command").retain is False
    assert bridged.wait_received(b"retained command").retain is True
    # After a site broker restart (the bridge and the link reconnect) the command comes
    # again, from the cloud or the site broker's own retained store: still flagged.
    bridged.received.clear()
    bridged.site_broker.restart(clean=True)
    assert bridged.wait_received(b"retained command", timeout=15).retain is True


def test_commands_sent_while_the_site_was_cut_off_arrive_when_the_bridge_returns(
        bridged: BridgedSite) -> None:
    """cleansession false: the cloud broker keeps the bridge's session and queues what the
    relay sends while the site broker is down (a power cut, a lost uplink)."""
    relay = bridged.relay
    bridged.site_broker.terminate()
    relay.expect(f"{P}/{SITE}/status/bridge", where=lambda m: m.payload == b"0")
    relay.publish(f"{P}/{SITE}/cmd", b"sent while cut off")
    bridged.site_broker.start()
    assert bridged.wait_received(b"sent while cut off", timeout=15).retain is False


# ================================= the agent on the site broker's unix socket (issue 11 #2, #5)


def test_the_agent_on_the_site_broker_s_socket_survives_an_oversize_alarm(
        tmp_path: Path) -> None:
    """deploy/'s site broker as it ships: a unix socket only, client ids bound to
    accounts, max_packet_size 65536.  The agent connects over the socket, and so does its
    zigbee2mqtt link, with an account of its own (sharing the agent's, each would
    disconnect the other).  An alarm over the broker's limit is refused by the agent's
    link itself and never queued (queued, it would cost the connection at every
    reconnect); the link stays up and a signed unlock is done."""
    from devkit.site import RunningAgent

    passwords = {user: secrets.token_urlsafe(12)
                 for user in (AGENT_SITE, "relay", "gw-zigbee2mqtt")}
    broker = shipped_broker(tmp_path / "broker", passwords)
    assert broker.socket_path is not None
    with broker:
        site = make_site(tmp_path, broker)
        files = {}
        for user in (AGENT_SITE, "gw-zigbee2mqtt"):
            files[user] = tmp_path / f"{user}.password"
            files[user].write_text(passwords[user] + "\n")
            files[user].chmod(0o600)
        use_socket(site.config_path, broker.socket_path, AGENT_SITE, files[AGENT_SITE],
                   extra=f'\n[[controllers]]\nname = "zb"\ndriver = "zigbee2mqtt"\n'
                         f'username = "gw-zigbee2mqtt"\n'
                         f'password_file = "{files["gw-zigbee2mqtt"]}"\n\n'
                         f'[[locks]]\nunit = "unit_z1"\nreference = "Z-1"\n'
                         f'controller = "zb"\ndevice = "yard/gate"\n')
        relay = Client(broker, "relay-probe", username="relay", password=passwords["relay"],
                       unix=True)
        try:
            with RunningAgent(site.config_path) as agent:
                zigbee = agent.site.controllers["zb"].link
                assert zigbee.wait_connected(10), zigbee.health()
                alarm = json.dumps({"kind": "controller_offline", "unit": None,
                                    "detail": "x" * 100_000, "at": "now"}).encode()
                assert agent.link.publish(f"{AGENT_PREFIX}/alarm", alarm) is False
                jti, token = site.signer.command("unlock", "unit_b201", ttl=60)
                relay.publish(f"{AGENT_PREFIX}/cmd", token)
                [result] = relay.expect(f"{AGENT_PREFIX}/cmd/result", timeout=10,
                                        where=lambda m: json.loads(m.payload)["jti"] == jti)
                assert json.loads(result.payload)["status"] == "done"
                stats = agent.link.stats()
                assert (stats["connects"], stats["disconnects"]) == (1, 0), stats
                assert stats["publish_oversize"] == 1
                assert zigbee.connects == 1  # and the agent never kicked it either
        finally:
            relay.close()
            site.close()


# ============================================== client ids bound to accounts (issue 11 #4)


#: A Tasmota device's account on the site broker (the ACL names such accounts after
#: the device's Topic): the most exposed password on a site, on a LAN device.
DEVICE = "gate_relay"


@dataclass
class AgentOnSocket:
    """The agent (a real subprocess) on deploy/'s site broker, over its unix socket,
    with the relay and a device account as clients of the same broker."""

    broker: Broker
    site: SimSite
    agent: AgentProcess
    relay: Client
    passwords: dict[str, str]

    def client(self, user: str, client_id: str) -> Client:
        """A client of the site broker, logged in as ``user`` with ``client_id``."""
        return Client(self.broker, client_id, username=user, password=self.passwords[user],
                      unix=True)

    def link(self) -> dict[str, Any]:
        """The agent's broker link, as its control socket reports it."""
        from gateway.ops.control import ControlClient

        return dict(ControlClient(self.site.socket_path, timeout=5).call("status")["broker"])

    def unlock(self, timeout: float = 10) -> str:
        """Publish a signed unlock as the relay; the status of its result."""
        jti, token = self.site.signer.command("unlock", "unit_b201", ttl=120)
        self.relay.publish(f"{AGENT_PREFIX}/cmd", token)
        [result] = self.relay.expect(f"{AGENT_PREFIX}/cmd/result", timeout=timeout,
                                     where=lambda m: json.loads(m.payload)["jti"] == jti)
        return str(json.loads(result.payload)["status"])


def use_socket(config_path: Path, socket_path: Path, username: str, password_file: Path,
               extra: str = "") -> None:
    """Point make_site's [mqtt] at the broker's unix socket, logged in as ``username``."""
    text = config_path.read_text()
    old = 'host = "127.0.0.1"\n'
    assert text.count(old) == 1
    config_path.write_text(text.replace(old, f'host = "{socket_path}"\nusername = '
                                             f'"{username}"\npassword_file = '
                                             f'"{password_file}"\n') + extra)


@contextlib.contextmanager
def agent_on_socket(directory: Path, conf_text: str | None = None) -> Iterator[AgentOnSocket]:
    """An :class:`AgentOnSocket`, started; ``conf_text`` replaces site-broker.conf."""
    passwords = {user: secrets.token_urlsafe(12) for user in (AGENT_SITE, "relay", DEVICE)}
    broker = shipped_broker(directory / "broker", passwords, text=conf_text)
    assert broker.socket_path is not None
    with broker:
        site = make_site(directory, broker)
        password_file = directory / "mqtt-password"
        password_file.write_text(passwords[AGENT_SITE] + "\n")
        password_file.chmod(0o600)
        use_socket(site.config_path, broker.socket_path, AGENT_SITE, password_file)
        agent = AgentProcess(site)
        relay = Client(broker, "relay-probe", username="relay", password=passwords["relay"],
                       unix=True)
        try:
            relay.subscribe(f"{AGENT_PREFIX}/cmd/result")
            relay.subscribe(f"{AGENT_PREFIX}/status")
            agent.start()
            yield AgentOnSocket(broker, site, agent, relay, passwords)
        finally:
            agent.stop()
            relay.close()
            site.close()


def probe_agent_id_takeover(on: AgentOnSocket) -> list[str]:
    """A device account connects under the agent's client id: while the agent runs (it
    must stay connected), and while it is down with a signed unlock queued in its
    persistent session (the unlock must still run when it is back)."""
    problems: list[str] = []
    # What the agent's config says (make_site: "agent-under-test"), and what a broker
    # that binds ids makes of it (the site id).
    for client_id in ("agent-under-test", AGENT_SITE):
        with on.client(DEVICE, client_id):
            pass
    # Positive control: a command round trip after both intruders connected; the
    # broker ended any connection they took over before answering their CONNECT.
    try:
        if on.unlock() != "done":
            problems.append("an unlock after the intruders failed")
    except AssertionError:
        problems.append("an unlock after the intruders got no result")
    link = on.link()
    if link["disconnects"] or link["connects"] != 1:
        problems.append(f"the agent was disconnected {link['disconnects']} time(s) by a "
                        "client using its id")
    on.agent.kill()  # kill -9: its session (subscriptions, queued commands) stays
    on.relay.expect(f"{AGENT_PREFIX}/status", where=lambda m: m.retain is False
                    and json.loads(m.payload).get("online") is False)  # the will: gone
    jti, token = on.site.signer.command("unlock", "unit_b201", ttl=120)
    on.relay.publish(f"{AGENT_PREFIX}/cmd", token)  # queued for the agent
    for client_id in ("agent-under-test", AGENT_SITE):
        with on.client(DEVICE, client_id):  # a clean session: would discard the agent's
            pass
    on.agent.start()
    try:
        on.relay.expect(f"{AGENT_PREFIX}/cmd/result", timeout=10,
                        where=lambda m: json.loads(m.payload)["jti"] == jti)
    except AssertionError:
        problems.append("the unlock queued in the agent's session was lost")
    return problems


def test_another_account_cannot_take_the_agent_s_client_id(tmp_path: Path) -> None:
    with agent_on_socket(tmp_path) as on:
        assert probe_agent_id_takeover(on) == [], on.broker.log_text()[-3000:]


def test_the_takeover_probe_fails_on_a_broker_that_does_not_bind_ids(tmp_path: Path) -> None:
    """The same probe against site-broker.conf without use_username_as_clientid (as it
    was): the device account kicks the agent and wipes its queued command."""
    with agent_on_socket(tmp_path, without_id_binding(SITE_BROKER_CONF.read_text())) as on:
        problems = probe_agent_id_takeover(on)
    assert any(p.startswith("the agent was disconnected") for p in problems), problems
    assert "the unlock queued in the agent's session was lost" in problems, problems


def probe_bridge_id_takeover(bridged: BridgedSite) -> list[str]:
    """Another site's account connects to the cloud broker under the bridge's id while
    the site is cut off with a command queued in the bridge's cloud session (it must
    still arrive); then under the bridge's and the relay's ids while all run (both must
    stay connected)."""
    problems: list[str] = []
    relay = bridged.relay
    bridged.site_broker.terminate()
    relay.expect(f"{P}/{SITE}/status/bridge", where=lambda m: m.payload == b"0")
    relay.publish(f"{P}/{SITE}/cmd", b"queued while cut off")
    for client_id in (f"stora-bridge-{SITE}", SITE):  # clean sessions
        with bridged.cloud_client("site_b", client_id):
            pass
    bridged.site_broker.start()
    try:
        bridged.wait_received(b"queued while cut off", timeout=15)
    except AssertionError:
        problems.append("the command queued in the bridge's cloud session was lost")
    for client_id in (f"stora-bridge-{SITE}", SITE, RELAY_ID, "relay"):
        with bridged.cloud_client("site_b", client_id):
            pass
    try:  # positive control, after the broker answered every intruder's CONNECT
        relay.publish(f"{P}/{SITE}/cmd", b"after the intruders")
        bridged.wait_received(b"after the intruders", timeout=10)
    except (AssertionError, BrokerError):
        problems.append("a command after the intruders did not arrive")
    if relay.disconnects:
        problems.append(f"the relay was disconnected {relay.disconnects} time(s)")
    return problems


def test_another_site_cannot_take_the_bridge_s_or_the_relay_s_id(tmp_path: Path) -> None:
    with bridged_site(tmp_path) as bridged:
        assert probe_bridge_id_takeover(bridged) == [], bridged.cloud.log_text()[-3000:]


def test_the_bridge_probe_fails_on_a_cloud_broker_that_does_not_bind_ids(
        tmp_path: Path) -> None:
    with bridged_site(tmp_path, without_id_binding(CLOUD_BROKER_CONF.read_text())) as b:
        problems = probe_bridge_id_takeover(b)
    assert "the command queued in the bridge's cloud session was lost" in problems, problems
    assert any(p.startswith("the relay was disconnected") for p in problems), problems


def wait_for(predicate: Callable[[], bool], timeout: float,
             describe: Callable[[], object]) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out: {describe()}"
        time.sleep(0.02)


# =================================================================== the systemd unit


def unit_settings(text: str | None = None) -> dict[str, list[str]]:
    """Every ``Key=value`` of the unit (all sections), values in order of appearance."""
    settings: dict[str, list[str]] = {}
    for raw in (text if text is not None else UNIT.read_text()).splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.skip("systemd-analyze is not installed (Debian: apt-get install systemd)")
    return found


def runnable_copy(directory: Path) -> Path:
    """The unit with ExecStart pointing at /bin/true: verify insists that the binary
    exists, and /opt/stora-gateway is only there once install.sh has run."""
    text = UNIT.read_text()
    exec_start = "ExecStart=/opt/stora-gateway/venv/bin/stora-gateway run"
    assert text.count(exec_start) == 1
    copy = directory / UNIT.name
    copy.write_text(text.replace(exec_start, "ExecStart=/bin/true run"))
    return copy


def test_the_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    tool = systemd_analyze()
    done = subprocess.run([tool, "verify", str(runnable_copy(tmp_path))],
                          check=False, capture_output=True, text=True, timeout=30)
    assert (done.returncode, done.stdout + done.stderr) == (0, "")
    # And the shipped file: its only complaint is the missing binary.
    shipped = subprocess.run([tool, "verify", str(UNIT)], check=False, capture_output=True,
                             text=True, timeout=30)
    complaints = [line for line in (shipped.stdout + shipped.stderr).splitlines() if line]
    if not Path("/opt/stora-gateway/venv/bin/stora-gateway").exists():
        assert len(complaints) == 1, complaints
        assert "/opt/stora-gateway/venv/bin/stora-gateway is not executable" in complaints[0]


def test_the_unit_exposure_score_does_not_regress(tmp_path: Path) -> None:
    tool = systemd_analyze()
    done = subprocess.run([tool, "security", "--offline=true", str(runnable_copy(tmp_path))],
                          check=False, capture_output=True, text=True, timeout=30)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout)
    if match is None:
        pytest.skip(f"this systemd-analyze cannot score a unit file offline: {done.stderr}")
    score = float(match.group(1))
    print(f"\nsystemd-analyze security exposure: {score} (baseline {EXPOSURE_BASELINE})")
    assert score <= EXPOSURE_BASELINE, done.stdout


def test_the_unit_asks_for_the_watchdog_the_agent_serves() -> None:
    """WatchdogSec is on (a wedged agent is killed and restarted) and long enough for a
    Pi: the agent pings every third of it, from a thread that wakes for nothing else,
    and calls a part wedged only after a whole period without progress.  The pings
    themselves are checked against the real agent in
    test_the_agent_runs_under_the_acl_and_tells_systemd_it_is_ready and, with parts
    broken on purpose, in tests/test_schedule.py."""
    unit = unit_settings()
    assert unit["Type"] == ["notify"]
    watchdog_s = float(unit["WatchdogSec"][-1].rstrip("s"))
    assert 10 <= watchdog_s <= 120
    assert unit["Restart"] == ["on-failure"]  # a watchdog kill is a failure: restarted


def test_the_unit_ends_a_crash_loop() -> None:
    """Fault matrix #42: restarts after a failure are spaced, and a loop stops for good
    after StartLimitBurst starts.  If RestartSec x (burst - 1) reached the interval, the
    limit could never trip and a crash loop would run forever."""
    unit = unit_settings()
    assert unit["Restart"] == ["on-failure"]
    restart_s = float(unit["RestartSec"][-1].rstrip("s"))
    interval_s = float(unit["StartLimitIntervalSec"][-1].rstrip("s"))
    burst = int(unit["StartLimitBurst"][-1])
    assert restart_s >= 1
    assert restart_s * (burst - 1) < interval_s
    assert burst <= 10


def effective_syscalls(tool: str, filters: list[str]) -> set[str]:
    """What a SystemCallFilter= sequence allows, applied in order as systemd does: the
    first (non-~) entry starts an allow list, later entries add to it, ~ entries remove."""
    def expand(names: list[str]) -> set[str]:
        out: set[str] = set()
        for name in names:
            if not name.startswith("@"):
                out.add(name)
                continue
            listing = subprocess.run([tool, "syscall-filter", name], capture_output=True,
                                     text=True, check=True, timeout=30).stdout
            for line in listing.splitlines()[1:]:
                item = line.strip()
                if item and not item.startswith("#"):
                    out |= expand([item])
        return out

    assert not filters[0].startswith("~"), "the filter should be an allow list"
    allowed: set[str] = set()
    for entry in filters:
        deny = entry.startswith("~")
        names = expand(entry.lstrip("~").split())
        allowed = allowed - names if deny else allowed | names
    return allowed


def test_the_syscall_filter_lets_the_agent_read_the_clock_state() -> None:
    """The agent calls adjtimex (read-only) to learn whether NTP synchronized the clock;
    it is in @clock, not @system-service.  Filtered out, every command would be refused
    ``clock_untrusted`` where timesyncd's flag file is missing (chrony)."""
    tool = systemd_analyze()
    unit = unit_settings()
    allowed = effective_syscalls(tool, unit["SystemCallFilter"])
    assert "adjtimex" in allowed
    assert {"clock_settime", "settimeofday", "setuid", "init_module", "mount"}.isdisjoint(
        allowed)
    assert "ProtectClock" not in unit  # it would block adjtimex whatever the filter says


def test_the_unit_runs_the_agent_unprivileged_with_only_the_serial_group() -> None:
    unit = unit_settings()
    assert unit["User"] == ["stora-gateway"]
    assert unit["SupplementaryGroups"] == ["dialout"]
    assert unit["CapabilityBoundingSet"] == [""]
    assert unit["NoNewPrivileges"] == ["yes"]
    assert unit["ProtectSystem"] == ["strict"]
    assert unit["ExecStart"] == [
        "/opt/stora-gateway/venv/bin/stora-gateway run --config /etc/stora-gateway/gateway.toml"]
    # The control socket tells technicians by SO_PEERCRED: no user namespace.
    assert unit.get("PrivateUsers", ["no"]) == ["no"]


# ======================================================================== install.sh


def test_install_script_parses_and_is_shellcheck_clean() -> None:
    done = subprocess.run(["bash", "-n", str(INSTALL)], check=False, capture_output=True,
                          text=True, timeout=30)
    assert (done.returncode, done.stderr) == (0, "")
    assert os.access(INSTALL, os.X_OK), "deploy/install.sh should be executable"
    text = INSTALL.read_text()
    assert "set -euo pipefail" in text
    shellcheck = shutil.which("shellcheck")
    if shellcheck is not None:
        checked = subprocess.run([shellcheck, str(INSTALL)], check=False,
                                 capture_output=True, text=True, timeout=60)
        assert checked.returncode == 0, checked.stdout

