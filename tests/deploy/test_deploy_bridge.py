"""deploy/: the site broker and its bridge to the cloud broker.

Every MQTT test runs a real Mosquitto with the files from ``deploy/`` as they ship.  The
README's "Broker requirements": the RETAIN flag kept end to end, commands sent while the
site was cut off arriving when the bridge returns.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from devkit.broker_client import Client
from devkit.mosquitto import BrokerError
from devkit.testing import wait_for
from tests.support.deploy import (
    CLOUD_BROKER_CONF,
    DEPLOY,
    ID_BINDING,
    SITE_BROKER_CONF,
)
from tests.support.deploy_site import (
    SITE,
    BridgedSite,
    P,
)

# Every test in this file starts brokers, agents or systemd-analyze: seconds, not minutes.
pytestmark = pytest.mark.timeout(60)


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
