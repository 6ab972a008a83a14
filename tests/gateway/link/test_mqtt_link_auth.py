"""MqttLink against a real Mosquitto: TLS and password authentication.

Fault matrix rows covered: #47 (no password in logs).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from devkit.broker_client import Client
from devkit.mosquitto import Broker
from devkit.tls_files import TlsFiles, make_tls_files
from gateway.config import MqttConfig
from gateway.errors import ConfigError
from gateway.link.mqtt import MqttLink
from tests.support.mqtt_link import BIRTH, CMD, STATUS, WILL, LinkFactory, mqtt_config, wait_until

# --------------------------------------------------------------------------- TLS and auth


@pytest.fixture
def tls_files(tmp_path: Path) -> TlsFiles:
    return make_tls_files(tmp_path / "tls", hostname="localhost")


def test_tls_with_hostname_check(tmp_path: Path, tls_files: TlsFiles,
                                 make_link: LinkFactory) -> None:
    with Broker(tmp_path / "broker", tls=tls_files) as broker:
        good = mqtt_config(broker, host="localhost", tls=True, ca_file=tls_files.ca,
                           client_id="tls-ok")
        link, agent = make_link(broker, cfg=good)
        assert link.wait_connected(5)
        with Client(broker, tls=tls_files, host="localhost") as relay:
            relay.publish(CMD, b"over-tls")
            agent.wait(lambda: agent.payloads() == [b"over-tls"])

        # The certificate names "localhost" only: by IP the hostname check must fail.
        by_ip = mqtt_config(broker, host="127.0.0.1", tls=True, ca_file=tls_files.ca,
                            client_id="tls-by-ip")
        wrong, _ = make_link(broker, cfg=by_ip)
        wait_until(lambda: wrong.stats()["connect_failures"] >= 1, 5)
        assert not wrong.connected
        assert "127.0.0.1" in wrong.stats()["last_connect_error"]


def test_tls_with_client_certificate(tmp_path: Path, tls_files: TlsFiles,
                                     make_link: LinkFactory) -> None:
    with Broker(tmp_path / "broker", tls=tls_files, require_client_cert=True) as broker:
        cfg = mqtt_config(broker, host="localhost", tls=True, ca_file=tls_files.ca,
                          cert_file=tls_files.client_cert, key_file=tls_files.client_key)
        link, _ = make_link(broker, cfg=cfg)
        assert link.wait_connected(5)
        without = mqtt_config(broker, host="localhost", tls=True, ca_file=tls_files.ca,
                              client_id="no-cert")
        refused, _ = make_link(broker, cfg=without)
        wait_until(lambda: refused.stats()["connect_failures"] >= 1, 5)
        assert not refused.connected


def test_password_auth_and_no_password_in_logs(
    tmp_path: Path, make_link: LinkFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secret = "pw-7f3a9c-do-not-log"
    with Broker(tmp_path / "broker", users={"gateway": secret}) as broker:
        good_file = tmp_path / "mqtt.password"
        good_file.write_text(secret + "\n")  # one trailing newline is stripped
        good_file.chmod(0o600)
        link, _ = make_link(broker, cfg=mqtt_config(broker, username="gateway",
                                                    password_file=good_file))
        assert link.wait_connected(5)

        bad_file = tmp_path / "wrong.password"
        bad_file.write_text("pw-wrong-do-not-log\n")
        bad_file.chmod(0o600)
        refused, _ = make_link(broker, cfg=mqtt_config(
            broker, username="gateway", password_file=bad_file, client_id="intruder"))
        wait_until(lambda: refused.stats()["connect_failures"] >= 2, 5)
        assert not refused.connected
        assert "refused" in refused.stats()["last_connect_error"]
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "do-not-log" not in logged


def test_unreadable_password_file_is_a_config_error(tmp_path: Path) -> None:
    cfg = MqttConfig(host="localhost", port=1883, topic_prefix="p", client_id="c",
                     username="u", password_file=tmp_path / "missing", tls=False,
                     ca_file=None, cert_file=None, key_file=None, keepalive_s=30)
    with pytest.raises(ConfigError, match=r"mqtt\.password_file"):
        MqttLink(cfg, status_topic=STATUS, birth=lambda: BIRTH, will=WILL,
                 subscriptions=[(CMD, 1)], on_message=lambda m: None)


def test_broker_binary_is_found() -> None:
    # The suite must fail, not skip, where mosquitto is missing; this names the cause.
    from devkit.mosquitto import find_mosquitto

    assert os.access(find_mosquitto(), os.X_OK)
