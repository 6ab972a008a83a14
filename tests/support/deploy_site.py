"""Builders the deploy/ tests share (tests/deploy/test_deploy_*.py): the broker accounts under the
shipped ACL, the topic helpers and probes, and the site broker bridged to a cloud broker.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from devkit.broker_client import Client
from devkit.mosquitto import Broker
from devkit.testing import wait_for
from devkit.tls_files import TlsFiles, make_tls_files
from gateway.config import MqttConfig
from gateway.link.message import Message
from gateway.link.mqtt import MqttLink
from gateway.link.timing import LinkTimings
from tests.support.deploy import (
    DEPLOY,
    shipped_broker,
)

UNIT = DEPLOY / "systemd" / "stora-gateway.service"

P = "stora-gw"


def relay_listens(relay: Client) -> None:
    """The relay subscribes to everything it reads, for every site."""
    for suffix in ("cmd/result", "mgmt/result", "status", "status/bridge", "units/#", "alarm"):
        relay.subscribe(f"{P}/+/{suffix}")


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


def bridged(tmp_path: Path) -> Iterator[BridgedSite]:
    with bridged_site(tmp_path) as site:
        yield site


def use_socket(config_path: Path, socket_path: Path, username: str, password_file: Path,
               extra: str = "") -> None:
    """Point make_site's [mqtt] at the broker's unix socket, logged in as ``username``."""
    text = config_path.read_text()
    old = 'host = "127.0.0.1"\n'
    assert text.count(old) == 1
    config_path.write_text(text.replace(old, f'host = "{socket_path}"\nusername = '
                                             f'"{username}"\npassword_file = '
                                             f'"{password_file}"\n') + extra)


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
