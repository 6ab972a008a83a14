"""deploy/, issue 11: client ids bound to accounts on both brokers.

Another account using the agent's, the bridge's or the relay's id disturbs nothing, and
the same probes against the old configs show that it did.  Every MQTT test runs a real
Mosquitto with the files from ``deploy/`` as they ship.
"""

from __future__ import annotations

import contextlib
import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from devkit.broker_client import Client
from devkit.mosquitto import Broker, BrokerError
from devkit.site import PREFIX as AGENT_PREFIX
from devkit.site import SITE as AGENT_SITE
from devkit.site import AgentProcess, SimSite, make_site
from tests.support.deploy import (
    CLOUD_BROKER_CONF,
    SITE_BROKER_CONF,
    shipped_broker,
    without_id_binding,
)
from tests.support.deploy_site import (
    RELAY_ID,
    SITE,
    BridgedSite,
    P,
    bridged_site,
    use_socket,
)

# Every test in this file starts brokers, agents or systemd-analyze: seconds, not minutes.
pytestmark = pytest.mark.timeout(60)


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
