"""Rotating the agent's broker password without a restart, as deploy/README.md says.

The README's order: write the new password into the agent's ``password_file`` first
(the agent reads it again at every connection attempt and not before), then change the
account on the broker and reload it.  On a reload Mosquitto checks the clients already
connected against the new password file and disconnects those whose password no longer
matches; the agent reconnects by itself with the new password, and commands published
meanwhile wait in its persistent session (QoS 1).

Against a real Mosquitto: a link that followed the procedure is back within its backoff
and receives a command sent after the reload; a link whose file was not updated (the
control) is cut off by the same reload and refused from then on, which shows that the
reload really ends the old session and that reading the file again is what carries the
agent through.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from devkit.broker_client import Client
from devkit.mosquitto import Broker
from devkit.testing import wait_for
from gateway.config import MqttConfig
from gateway.link.message import Message
from gateway.link.mqtt import MqttLink
from gateway.link.timing import LinkTimings

pytestmark = pytest.mark.timeout(60)

SITE = "site_1"
CMD = f"stora-gw/{SITE}/cmd"
STATUS = f"stora-gw/{SITE}/status"
#: Reconnect quickly: the test is about the password, not the backoff (same proportions
#: as the link's defaults).
FAST = LinkTimings(backoff_initial_s=0.1, backoff_max_s=0.5, liveness_interval_s=0.5,
                   liveness_timeout_s=0.5, connect_timeout_s=1.0, stable_after_s=1.0)


def write_secret(path: Path, text: str) -> None:
    """As the README does it: a new file renamed over the old, never half-written."""
    tmp = path.with_suffix(".new")
    tmp.write_text(text + "\n")
    tmp.chmod(0o600)
    tmp.replace(path)


def set_broker_passwords(broker: Broker, users: dict[str, str]) -> None:
    """Rewrite the broker's password file (hashed) and reload it (SIGHUP), as
    ``mosquitto_passwd`` and ``systemctl reload mosquitto`` do on a site."""
    passwd = broker.directory / "passwd"
    passwd.write_text("".join(f"{user}:{password}\n" for user, password in users.items()))
    tool = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    subprocess.run([tool, "-U", str(passwd)], check=True, capture_output=True, timeout=30)
    os.kill(broker.pid, signal.SIGHUP)


class Received:
    """Messages a link delivered, for a test thread to wait on."""

    def __init__(self) -> None:
        self.payloads: list[bytes] = []
        self.cond = threading.Condition()

    def on_message(self, message: Message) -> None:
        with self.cond:
            self.payloads.append(message.payload)
            self.cond.notify_all()

    def wait_for(self, payload: bytes, timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: payload in self.payloads, timeout)


@pytest.fixture
def links() -> Iterator[Callable[[Broker, str, Path, Received], MqttLink]]:
    made: list[MqttLink] = []

    def make(broker: Broker, username: str, password_file: Path,
             received: Received) -> MqttLink:
        cfg = MqttConfig(host=broker.host, port=broker.port, topic_prefix="stora-gw",
                         client_id=f"stora-gw-{username}", username=username,
                         password_file=password_file, tls=False, ca_file=None,
                         cert_file=None, key_file=None, keepalive_s=5)
        link = MqttLink(cfg, status_topic=f"stora-gw/{username}/status",
                        birth=lambda: b'{"online":true}', will=b'{"online":false}',
                        subscriptions=[(CMD, 1)], on_message=received.on_message,
                        timings=FAST)
        made.append(link)
        link.start()
        return link

    yield make
    for link in made:
        link.stop(timeout=3.0)


def test_the_agent_survives_a_broker_password_rotation_without_a_restart(
        tmp_path: Path, links: Callable[[Broker, str, Path, Received], MqttLink]) -> None:
    users = {SITE: "old-site-pw", "lagging": "old-lagging-pw", "relay": "relay-pw"}
    with Broker(tmp_path / "broker", users=users) as broker:
        agent_file, lagging_file = tmp_path / "agent.pw", tmp_path / "lagging.pw"
        write_secret(agent_file, users[SITE])
        write_secret(lagging_file, users["lagging"])
        agent_got, lagging_got = Received(), Received()
        agent = links(broker, SITE, agent_file, agent_got)
        lagging = links(broker, "lagging", lagging_file, lagging_got)
        assert agent.wait_connected(10)
        assert lagging.wait_connected(10)
        connects = agent.stats()["connects"]

        # 1. The new password into the agent's file: nothing happens yet.
        write_secret(agent_file, "new-site-pw")
        time.sleep(0.3)  # a reconnect, if the file change caused one, would show here
        assert agent.connected
        assert agent.stats()["connects"] == connects
        # 2. The broker's account, then a reload.  "lagging" skipped step 1.
        set_broker_passwords(broker, {**users, SITE: "new-site-pw",
                                      "lagging": "new-lagging-pw"})

        wait_for(lambda: agent.stats()["connects"] > connects and agent.connected, 10)
        with Client(broker, username="relay", password="relay-pw") as relay:
            relay.publish(CMD, b"after-rotation", qos=1)
        assert agent_got.wait_for(b"after-rotation", 10)

        # The control: the same reload cut the link that kept its old password, and the
        # broker refuses it from then on.
        wait_for(lambda: lagging.stats()["connect_failures"] >= 2, 10)
        assert not lagging.connected
        assert b"after-rotation" not in lagging_got.payloads
