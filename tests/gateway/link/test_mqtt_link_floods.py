"""MqttLink against a real Mosquitto: floods and packet caps.

Fault matrix rows covered: #7 (flood: bounded inbox, broker flow control), #15
(oversized publish), and a hostile broker's huge packet.
"""

from __future__ import annotations

import gc
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest

from devkit.broker_client import Client
from devkit.mosquitto import Broker
from gateway.errors import ConfigError
from tests.support.mqtt_link import CMD, LinkFactory, blocked_handler, mqtt_config, wait_until

# --------------------------------------------------------------------------- floods


def test_a_qos0_flood_is_shed_with_bounded_memory(broker: Broker,
                                                  make_link: LinkFactory) -> None:
    inbound_max = 20
    flood = 500
    release, handled, blocked = blocked_handler(20)

    link, _ = make_link(broker, on_message=blocked, inbound_max=inbound_max)
    assert link.wait_connected(5)
    with Client(broker) as attacker:
        # QoS 0 from the sender: the broker passes it on at QoS 0, without flow control.
        attacker.publish_many(CMD, [b"junk-%d" % i for i in range(flood)], qos=0)
        wait_until(lambda: link.stats()["inbound_dropped"]
                   + link.stats()["inbound_queued"] >= flood - 1, 10)
        time.sleep(1.2)  # two liveness rounds while flooded and blocked
        stats = link.stats()
        assert stats["inbound_queued_peak"] <= inbound_max
        assert stats["inbound_dropped"] >= flood - inbound_max - 1
        assert stats["liveness_failures"] == 0
        assert link.connected
        release.set()
        wait_until(lambda: link.stats()["inbound_queued"] == 0, 5)
        attacker.publish(CMD, b"legitimate", qos=1)
        wait_until(lambda: b"legitimate" in handled, 5)
    stats = link.stats()
    assert stats["handled"] + stats["inbound_dropped"] == flood + 1
    print(f"\nQoS 0 flood of {flood} with inbound_max {inbound_max}: dropped "
          f"{stats['inbound_dropped']}, peak queue {stats['inbound_queued_peak']}, "
          f"link up throughout")


def test_a_qos1_flood_waits_in_the_broker_while_the_handler_is_stuck(
    broker: Broker, make_link: LinkFactory
) -> None:
    # Acknowledging after the handler means a stuck handler holds at most the broker's
    # in-flight window (mosquitto max_inflight_messages, 20); the rest waits in the
    # broker.  Once the handler runs, everything arrives, in order, nothing dropped.
    # (Mosquitto 2.0.11 widens the window once PUBACKs flow, so the queue may then grow
    # past 20; inbound_max is the hard bound.)
    flood = 200
    release, handled, blocked = blocked_handler(20)

    link, _ = make_link(broker, on_message=blocked, inbound_max=1000)
    assert link.wait_connected(5)
    sent = [b"cmd-%03d" % i for i in range(flood)]
    with Client(broker) as relay:
        relay.publish_many(CMD, sent, qos=1)
        time.sleep(1.2)  # two liveness rounds with the handler stuck
        stuck = link.stats()
        assert stuck["inbound_queued_peak"] <= 20
        assert stuck["liveness_failures"] == 0
        assert link.connected
        release.set()
        wait_until(lambda: len(handled) == flood, 10)
    assert handled == sent
    stats = link.stats()
    assert stats["inbound_dropped"] == 0
    assert stats["inbound_queued_peak"] <= 1000
    print(f"\nQoS 1 flood of {flood}: queue {stuck['inbound_queued_peak']} while the "
          f"handler was stuck (broker window 20), peak {stats['inbound_queued_peak']} "
          f"while draining; 0 dropped, order kept")


def test_an_oversized_publish_is_stopped_by_the_broker(tmp_path: Path,
                                                       make_link: LinkFactory) -> None:
    with Broker(tmp_path / "broker", max_packet_size=8192) as broker:
        link, agent = make_link(broker)
        assert link.wait_connected(5)
        with Client(broker) as attacker:
            attacker.publish(CMD, b"x" * (1 << 20), qos=0)  # 1 MiB; the broker drops it
        with Client(broker) as relay:
            relay.publish(CMD, b"small", qos=1)
            agent.wait(lambda: agent.payloads() == [b"small"])
        assert link.stats()["disconnects"] == 0


# --------------------------------------------------------------------------- packet caps

#: What a hostile "broker" declares in one PUBLISH: the largest length MQTT can express
#: (256 MiB; with paho's copies of a whole packet the review saw the agent reach ~800
#: MiB), and how much of it it streams at most.  Without a cap the link keeps every
#: byte; the stream limit keeps that failure affordable on a test machine.
_HOSTILE_DECLARED = 268_435_455

_HOSTILE_STREAMED = 128 * 1024 * 1024

#: Peak RSS growth allowed while the hostile packet arrives: the read-ahead chunk and the
#: kernel's socket buffer, not the packet.
_HOSTILE_RSS_MAX_KIB = 16 * 1024

_LINK_AGAINST_HOSTILE_BROKER = """
import json, sys, time
from gateway.config import MqttConfig
from gateway.link.mqtt import MqttLink
from gateway.link.timing import LinkTimings

def kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])

cfg = MqttConfig(host="127.0.0.1", port=int(sys.argv[1]), topic_prefix="stora-gw",
                 client_id="stora-gw-site_1", username="", password_file=None, tls=False,
                 ca_file=None, cert_file=None, key_file=None, keepalive_s=30,
                 max_packet_bytes=65536)
# Liveness far away: the fake broker echoes nothing, and only the packet is on trial.
timings = LinkTimings(backoff_initial_s=0.1, backoff_max_s=0.2, liveness_interval_s=60,
                      liveness_timeout_s=60, connect_timeout_s=5)
link = MqttLink(cfg, status_topic="stora-gw/site_1/status", birth=lambda: b"{}",
                will=b"{}", subscriptions=[("stora-gw/site_1/cmd", 1)],
                on_message=lambda m: None, timings=timings)
start_kib = kib("VmRSS")
link.start()
deadline = time.monotonic() + float(sys.argv[2])
while time.monotonic() < deadline and link.stats()["connects"] < 2:
    time.sleep(0.02)
stats = link.stats()
print(json.dumps({"start_kib": start_kib, "peak_kib": kib("VmHWM"),
                  "connects": stats["connects"], "oversize": stats["inbound_oversize"],
                  "reason": stats["last_disconnect_reason"]}), flush=True)
link.stop(timeout=1.0)
"""


def test_a_hostile_broker_s_huge_packet_is_refused_before_it_is_buffered() -> None:
    """Fault matrix #15, issue 11 item 5: a fake broker answers CONNACK and SUBACK, then
    sends one PUBLISH declaring 256 MiB and streams it.  The link announced its limit in
    CONNECT (MQTT 5 Maximum Packet Size), drops the connection as soon as the length is
    decoded, counts it, and reconnects; its peak RSS stays flat.  (Without the cap it
    kept all 128 MiB the fake streamed and never came back.)"""
    from support.fake_broker import MAXIMUM_PACKET_SIZE, HostileBroker

    with HostileBroker(declared=_HOSTILE_DECLARED, stream_limit=_HOSTILE_STREAMED) as fake:
        done = subprocess.run(
            [sys.executable, "-c", _LINK_AGAINST_HOSTILE_BROKER, str(fake.port), "15"],
            capture_output=True, text=True, timeout=60, check=False,
            cwd=Path(__file__).resolve().parents[3])
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout.splitlines()[-1])
        assert fake.wait(lambda: fake.sent > 0, 5)
        sent = fake.sent
        connects = list(fake.connects)
    growth_kib = report["peak_kib"] - report["start_kib"]
    print(f"\nhostile PUBLISH declaring {_HOSTILE_DECLARED:,} bytes: the fake got "
          f"{sent / 1024:.0f} KiB out before the link hung up; the link's peak RSS grew "
          f"{growth_kib / 1024:.1f} MiB (start {report['start_kib'] / 1024:.1f} MiB)")
    assert connects[0].properties.get(MAXIMUM_PACKET_SIZE) == 65536
    assert growth_kib < _HOSTILE_RSS_MAX_KIB, report
    assert report["oversize"] == 1, report
    assert "over mqtt.max_packet_bytes" in (report["reason"] or ""), report
    assert report["connects"] == 2, report  # came back, to a broker that behaves


def test_an_oversize_publish_is_refused_locally_and_the_link_stays_up(
    tmp_path: Path, make_link: LinkFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 11 item 2: a message over mqtt.max_packet_bytes (the broker's 65536) is not
    queued: publish() says False, counts it and logs it once per topic.  Queued, the
    broker would drop the link over it, and a QoS 1 message is re-sent after every
    reconnect: a loop that keeps every command out."""
    caplog.set_level(logging.WARNING, logger="gateway.link")
    alarm = "stora-gw/site_1/alarm"
    with Broker(tmp_path / "broker", max_packet_size=65536) as broker:
        link, agent = make_link(broker, cfg=mqtt_config(broker, max_packet_bytes=65536))
        assert link.wait_connected(5)
        with Client(broker) as watcher:
            watcher.subscribe(alarm)
            big = b'{"kind":"controller_offline","detail":"' + b"x" * 80_000 + b'"}'
            assert link.publish(alarm, big) is False
            assert link.publish(alarm, big) is False
            # Just under the limit, with its topic and header, still goes.
            fits = 65536 - (1 + 3 + 2 + len(alarm) + 2 + 1)
            assert link.publish(alarm, b"y" * fits) is True
            assert link.publish(alarm, b"y" * (fits + 1)) is False
            assert link.publish(alarm, b"small") is True
            watcher.expect(alarm, where=lambda m: m.payload == b"small")
            relay_cmd = b"unlock after the oversize alarm"
            watcher.publish(CMD, relay_cmd)
            agent.wait(lambda: relay_cmd in agent.payloads())
        assert [len(m.payload) for m in watcher.messages(alarm)] == [fits, 5]
        stats = link.stats()
    assert stats["publish_oversize"] == 3
    assert stats["disconnects"] == 0
    assert stats["connects"] == 1
    warnings = [r for r in caplog.records if "max_packet_bytes" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]


_MINIMAL_TOML = """\
[site]
id = "site_1"
app_name = "T"

[mqtt]
{mqtt}

[commands]
trusted_keys = {{ k = "{key}" }}

[stora]
base_url = "http://127.0.0.1:9/2025-09"
auth = "static"
token_file = "{token}"
timeline_source_id = "tsrc_1"
"""


@pytest.mark.parametrize(("mqtt", "expected"), [
    ("", ("127.0.0.1:1883", False, 65536)),
    ('host = "/run/stora-mqtt/mqtt.sock"', ("/run/stora-mqtt/mqtt.sock", True, 65536)),
    ("max_packet_bytes = 131072", ("127.0.0.1:1883", False, 131072)),
    ("max_packet_bytes = 4096", "mqtt.max_packet_bytes: must be between 8192 and"),
    ('host = "/run/stora-mqtt/mqtt.sock"\ntls = true\nca_file = "{ca}"',
     "mqtt.tls: must be false when mqtt.host is a unix socket path"),
])
def test_mqtt_config_reads_a_socket_path_and_a_packet_cap(
        tmp_path: Path, mqtt: str, expected: tuple[str, bool, int] | str) -> None:
    import tomllib

    from gateway.config import parse_config

    ca, token = tmp_path / "ca.pem", tmp_path / "token"
    ca.write_text("x")
    token.write_text("t\n")
    token.chmod(0o600)
    text = _MINIMAL_TOML.format(mqtt=mqtt.replace("{ca}", str(ca)), key="A" * 43,
                                token=token)
    data = tomllib.loads(text)
    if isinstance(expected, str):
        with pytest.raises(ConfigError) as caught:
            parse_config(data, "gateway.toml", tmp_path)
        assert expected in str(caught.value)
        return
    cfg = parse_config(data, "gateway.toml", tmp_path).mqtt
    assert (cfg.where, cfg.unix_socket, cfg.max_packet_bytes) == expected


def test_a_missing_broker_socket_is_retried_without_leaking(
        tmp_path: Path, broker: Broker, make_link: LinkFactory) -> None:
    """While the broker restarts its socket path is missing: paho 2.2 left the unix
    socket of every failed attempt open (a ResourceWarning, an error under pytest),
    drivers.mqtt_client.PahoClient closes it.  The link keeps trying, and says where."""
    missing = tmp_path / "not-yet.sock"
    link, _ = make_link(broker, cfg=mqtt_config(broker, host=str(missing)))
    wait_until(lambda: link.stats()["connect_failures"] >= 3, 5)
    assert not link.connected
    assert str(missing) in link.stats()["last_connect_error"] or \
        "No such file" in link.stats()["last_connect_error"]
    link.stop(timeout=2.0)
    gc.collect()
