"""deploy/: the broker ACL, as it ships.

Every MQTT test runs a real Mosquitto with the files from ``deploy/`` as they ship.
Mosquitto drops a publish the ACL forbids without telling an MQTT 3.1.1 client (the
PUBACK still comes), and a subscription outside the ACL is granted but never delivers;
so each probe asserts on what subscribers *receive*, and ends with a positive control:
a permitted message published after the forbidden ones, which the subscriber must
receive.  Mosquitto delivers one client's messages in order, so once the control has
arrived, a forbidden message that got through would have arrived before it.
``test_the_probes_catch_a_permissive_acl`` runs the same probes against broken ACLs to
prove that they would fail.

Fault matrix row #16 (ACL escapes, the controller links' accounts included), and the
README's "Broker requirements" (only the relay sends commands).
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from devkit.broker_client import Client
from devkit.mosquitto import Broker, BrokerError
from tests.support.deploy import ACL
from tests.support.deploy_site import P, relay_listens

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
