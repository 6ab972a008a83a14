"""MqttLink: the pure parts (full-jitter backoff, liveness topic, timings) and, against a
real Mosquitto, birth, will and stop.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from devkit.broker_client import Client
from devkit.mosquitto import Broker
from devkit.testing import returns_within
from gateway.config import MqttConfig
from gateway.errors import ConfigError
from gateway.link.message import OFFLINE_PAYLOAD, Message
from gateway.link.mqtt import MqttLink
from gateway.link.timing import LinkTimings, full_jitter_delay
from sitelink.topics import liveness_topic
from tests.support.mqtt_link import BIRTH, CMD, FAST, STATUS, WILL, LinkFactory, wait_until


def link_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name in ("mqtt-link", "mqtt-inbound")]


# --------------------------------------------------------------------------- pure parts


@given(
    attempt=st.integers(min_value=0, max_value=10_000),
    initial=st.floats(min_value=0.001, max_value=100),
    cap=st.floats(min_value=0.001, max_value=10_000),
    r=st.floats(min_value=0.0, max_value=1.0, exclude_max=True),
)
def test_full_jitter_delay_stays_under_the_capped_exponential(
    attempt: int, initial: float, cap: float, r: float
) -> None:
    cap = max(cap, initial)
    ceiling = min(cap, initial * 2.0 ** min(attempt, 60))
    delay = full_jitter_delay(attempt, initial, cap, lambda: r)
    assert 0.0 <= delay <= ceiling
    assert delay == pytest.approx(r * ceiling)


def test_full_jitter_spreads_a_herd_of_reconnecting_gateways() -> None:
    # Fault matrix #4: 50 gateways lose the broker at the same instant.  Their first
    # reconnects must not arrive together: no 100 ms slot of the first second gets
    # more than a fifth of them (uniform would be 5 per slot).
    rng = random.Random(20260101)
    delays = [full_jitter_delay(0, 1.0, 60.0, rng.random) for _ in range(50)]
    slots = [sum(1 for d in delays if k / 10 <= d < (k + 1) / 10) for k in range(10)]
    print(f"\nherd of 50: first-reconnect delays per 100 ms slot {slots}")
    assert max(slots) <= 10
    assert all(0.0 <= d < 1.0 for d in delays)


def test_liveness_topic_is_one_safe_level() -> None:
    assert liveness_topic("p/s/status", "stora-gw-site_1") == "p/s/status/liveness/stora-gw-site_1"
    assert liveness_topic("p/s/status", "a/b+c#") == "p/s/status/liveness/a_b_c_"


@pytest.mark.parametrize("bad", [
    {"backoff_initial_s": 0}, {"liveness_timeout_s": -1.0},
    {"backoff_initial_s": 10.0, "backoff_max_s": 1.0}, {"stable_after_s": -1.0},
])
def test_link_timings_reject_nonsense(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="LinkTimings"):
        LinkTimings(**bad)


def test_unreadable_tls_material_is_a_config_error(tmp_path: Path) -> None:
    bad_ca = tmp_path / "ca.pem"
    bad_ca.write_text("not a certificate")
    cfg = MqttConfig(host="localhost", port=8883, topic_prefix="p", client_id="c",
                     username="", password_file=None, tls=True, ca_file=bad_ca,
                     cert_file=None, key_file=None, keepalive_s=30)
    with pytest.raises(ConfigError, match=r"mqtt\.ca_file"):
        MqttLink(cfg, status_topic=STATUS, birth=lambda: BIRTH, will=WILL,
                 subscriptions=[(CMD, 1)], on_message=lambda m: None)


# --------------------------------------------------------------------------- birth, will, stop


def test_birth_is_retained_and_commands_arrive(broker: Broker, make_link: LinkFactory) -> None:
    link, agent = make_link(broker)
    assert link.wait_connected(5)
    with Client(broker) as watcher:
        # Subscribed this early, the watcher may get the birth live (retain flag 0);
        # a subscriber that comes after it must get it retained.
        watcher.expect(STATUS, where=lambda m: m.payload == BIRTH)
        with Client(broker) as late:
            (status,) = late.expect(STATUS)
        assert status.payload == BIRTH
        assert status.retain, "birth must be retained so a late subscriber sees it"
        assert status.qos == 1
        agent.wait(lambda: agent.connected == [False])  # fresh session

        watcher.publish(CMD, b"unlock-1", qos=1)
        agent.wait(lambda: len(agent.messages) == 1)
    (msg,) = agent.messages
    assert (msg.topic, msg.payload, msg.qos, msg.retain, msg.dup) == (
        CMD, b"unlock-1", 1, False, False)
    assert msg.received_at <= time.monotonic()
    stats = link.stats()
    assert stats["connects"] == 1
    assert stats["disconnects"] == 0
    assert stats["handled"] == 1
    # A measured round trip, not a wall-clock target: an echo slower than the detection
    # bound would have been a liveness failure, and there was no disconnect.
    assert stats["liveness_rtt_s"] is None or \
        0.0 <= stats["liveness_rtt_s"] <= FAST.liveness_interval_s + FAST.liveness_timeout_s


def test_publish_is_refused_while_not_connected(broker: Broker,
                                                make_link: LinkFactory) -> None:
    link, _ = make_link(broker, start=False)
    assert link.publish(f"{STATUS}/x", b"1") is False
    link.start()
    assert link.wait_connected(5)
    with Client(broker) as watcher:
        watcher.subscribe("stora-gw/site_1/units/#")
        assert link.publish("stora-gw/site_1/units/unit_a", b"{}", retain=True) is True
        watcher.expect("stora-gw/site_1/units/#")
    broker.kill()
    wait_until(lambda: not link.connected, 3)
    assert link.publish("stora-gw/site_1/units/unit_a", b"{}") is False
    assert link.stats()["publish_refused"] == 2


_DYING_AGENT = """
import sys, time
from pathlib import Path
from gateway.config import MqttConfig
from gateway.link.mqtt import MqttLink
cfg = MqttConfig(host="127.0.0.1", port=int(sys.argv[1]), topic_prefix="stora-gw",
                 client_id="stora-gw-site_1", username="", password_file=None, tls=False,
                 ca_file=None, cert_file=None, key_file=None, keepalive_s=5)
link = MqttLink(cfg, status_topic=sys.argv[2], birth=lambda: b'{"online":true}',
                will=sys.argv[3].encode(), subscriptions=[(sys.argv[4], 1)],
                on_message=lambda m: None)
link.start()
assert link.wait_connected(10)
print("connected", flush=True)
time.sleep(60)
"""


def test_will_is_published_when_the_agent_process_dies(broker: Broker) -> None:
    with Client(broker) as watcher:
        watcher.subscribe(STATUS)
        agent = subprocess.Popen(
            [sys.executable, "-c", _DYING_AGENT, str(broker.port), STATUS, WILL.decode(),
             CMD],
            stdout=subprocess.PIPE, text=True,
        )
        try:
            assert agent.stdout is not None
            assert agent.stdout.readline().strip() == "connected"
            watcher.expect(STATUS, where=lambda m: m.payload == b'{"online":true}')
            killed_at = time.monotonic()
            agent.send_signal(signal.SIGKILL)
            agent.wait(5)
        finally:
            agent.kill()
            agent.wait(5)
            if agent.stdout is not None:
                agent.stdout.close()
        (will,) = watcher.expect(STATUS, where=lambda m: m.payload == WILL)
        print(f"\nwill seen {will.received_at - killed_at:.3f}s after kill -9 of the agent")
    with Client(broker) as late:
        (retained,) = late.expect(STATUS)
        assert retained.payload == WILL
        assert retained.retain


def test_clean_stop_publishes_offline_and_no_will(broker: Broker,
                                                  make_link: LinkFactory) -> None:
    link, _ = make_link(broker)
    assert link.wait_connected(5)
    with Client(broker) as watcher:
        watcher.expect(STATUS, where=lambda m: m.payload == BIRTH)
        # A budget of 30 s it must not need: back within a third of it.
        returns_within(10, lambda: link.stop(timeout=30.0), "a clean stop")
        watcher.expect(STATUS, where=lambda m: m.payload == OFFLINE_PAYLOAD)
        time.sleep(0.3)  # a will would follow the socket close at once
        assert [m.payload for m in watcher.messages(STATUS)] == [BIRTH, OFFLINE_PAYLOAD]
    assert json.loads(OFFLINE_PAYLOAD) == {"online": False}
    assert not link.connected
    assert link_threads() == []
    assert link.publish(CMD, b"x") is False
    with Client(broker) as late:
        (retained,) = late.expect(STATUS)
        assert retained.payload == OFFLINE_PAYLOAD
        assert retained.retain
    link.stop()  # a second stop is harmless


def test_stop_from_inside_a_handler(broker: Broker, make_link: LinkFactory) -> None:
    # The agent may decide to shut down while handling a message (a management request).
    links: list[MqttLink] = []
    stopped = threading.Event()

    def handler(message: Message) -> None:
        links[0].stop(timeout=2.0)
        stopped.set()

    link, _ = make_link(broker, on_message=handler)
    links.append(link)
    assert link.wait_connected(5)
    with Client(broker) as watcher:
        watcher.expect(STATUS, where=lambda m: m.payload == BIRTH)
        watcher.publish(CMD, b"shutdown")
        assert stopped.wait(3)
        watcher.expect(STATUS, where=lambda m: m.payload == OFFLINE_PAYLOAD)
    wait_until(lambda: link_threads() == [], 2)


@pytest.mark.parametrize(("subscriptions", "inbound_max"), [
    ([("", 1)], 10), ([(CMD, 3)], 10), ([(CMD, 1)], 0),
])
def test_link_rejects_bad_arguments(subscriptions: list[tuple[str, int]],
                                    inbound_max: int) -> None:
    cfg = MqttConfig(host="localhost", port=1883, topic_prefix="p", client_id="c",
                     username="", password_file=None, tls=False, ca_file=None,
                     cert_file=None, key_file=None, keepalive_s=30)
    with pytest.raises(ValueError, match=r"subscription|inbound_max"):
        MqttLink(cfg, status_topic=STATUS, birth=lambda: BIRTH, will=WILL,
                 subscriptions=subscriptions, on_message=lambda m: None,
                 inbound_max=inbound_max)


def test_stop_is_prompt_while_the_broker_is_down(tmp_path: Path,
                                                 make_link: LinkFactory) -> None:
    broker = Broker(tmp_path / "never-started")  # configured, never running
    link, _ = make_link(broker, timings=replace(FAST, backoff_initial_s=60.0,
                                                backoff_max_s=60.0))
    wait_until(lambda: link.stats()["connect_failures"] >= 1, 3)
    # stop must interrupt the 60 s backoff sleep: back within a third of its 30 s budget,
    # with the threads gone.
    returns_within(10, lambda: link.stop(timeout=30.0), "stop during a backoff")
    assert link_threads() == []
