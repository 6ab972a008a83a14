"""deploy/: the real agent under the shipped ACL and unit settings, and the agent on the
site broker's unix socket (issue 11).

Every MQTT test runs a real Mosquitto with the files from ``deploy/`` as they ship.  Fault
matrix row #15 (an oversize alarm against the broker's max_packet_size).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from devkit.broker_client import Client
from devkit.mosquitto import Broker
from devkit.site import PREFIX as AGENT_PREFIX
from devkit.site import SITE as AGENT_SITE
from devkit.site import make_site
from tests.support.deploy import (
    ACL,
    shipped_broker,
)
from tests.support.deploy_site import relay_listens, unit_settings, use_socket

ROOT = Path(__file__).resolve().parents[2]


# Every test in this file starts brokers, agents or systemd-analyze: seconds, not minutes.
pytestmark = pytest.mark.timeout(60)


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
