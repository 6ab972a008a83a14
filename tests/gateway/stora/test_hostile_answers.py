"""A hostile or broken Stora answer must never take the site off its broker.

Found in an outside review: Stora's error text went uncapped into the alarm, the
retained status and the birth message; over the site broker's ``max_packet_size`` the
broker dropped the agent, every reconnect repeated it (the QoS 1 alarm re-sent, the birth
carrying the text), and no command was processed.  Here the real agent, a real Mosquitto
limited like deploy/'s site broker, and the sandbox answering a 403 whose message is
80 KB: the agent stays connected, what it publishes stays small, and a signed unlock is
still ``done``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from devkit.mosquitto import Broker
from devkit.sandbox import Sandbox
from devkit.site import PREFIX, STORA_TOKEN, RunningAgent, make_site

pytestmark = pytest.mark.simulator_only

#: deploy/mosquitto/site-broker.conf's ``max_packet_size``.
SITE_BROKER_MAX_PACKET = 65536


def test_a_403_with_an_80_kb_message_leaves_the_agent_on_the_broker(tmp_path: Path) -> None:
    with Broker(tmp_path / "broker", max_packet_size=SITE_BROKER_MAX_PACKET) as broker, \
            Sandbox(static_tokens={STORA_TOKEN}) as sandbox:
        site = make_site(tmp_path, broker, stora_url=sandbox.api_url)
        try:
            sandbox.fail_next(3, 403, message_chars=80_000)
            client = site.client()
            with RunningAgent(site.config_path) as agent:
                # An action queues a Timeline Event; its POST meets the 403.
                jti, token = site.signer.command("unlock", "unit_a101", dur=1)
                client.publish(f"{PREFIX}/cmd", token, qos=1)
                client.expect(f"{PREFIX}/cmd/result", 10,
                              where=lambda m: json.loads(m.payload)["jti"] == jti)
                alarms = client.expect(
                    f"{PREFIX}/alarm", 20,
                    where=lambda m: json.loads(m.payload)["kind"].startswith("timeline"))
                agent.publish_telemetry()  # the status carries the outbox's last error
                time.sleep(0.3)
                # The site still works: a second unlock after all of it.
                jti2, token2 = site.signer.command("unlock", "unit_a102", dur=1)
                client.publish(f"{PREFIX}/cmd", token2, qos=1)
                result = json.loads(client.expect(
                    f"{PREFIX}/cmd/result", 10,
                    where=lambda m: json.loads(m.payload)["jti"] == jti2)[0].payload)
                stats = agent.link.stats()
                status = agent.status()
        finally:
            site.close()
    assert result["status"] == "done", result
    assert stats["connects"] == 1, "the broker dropped the agent"
    assert stats["disconnects"] == 0
    assert max(len(m.payload) for m in alarms) < 2048
    published = client.messages(f"{PREFIX}/#")
    assert max(len(m.payload) for m in published) < 8192, sorted(
        (len(m.payload), m.topic) for m in published)[-3:]
    assert len(json.dumps(status)) < 16_384
    assert "80000" not in json.dumps(status)
