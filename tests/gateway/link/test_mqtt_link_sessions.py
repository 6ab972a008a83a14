"""MqttLink against a real Mosquitto: sessions.

Fault matrix rows covered: #1/#2 (broker kill -9 and restart, persistence on and off).
"""

from __future__ import annotations

import statistics
import threading
import time
from pathlib import Path
from typing import Any

from devkit.broker_client import Client
from devkit.mosquitto import Broker
from gateway.link.inbox import Inbound as _Inbound
from gateway.link.inbox import Inbox as _Inbox
from gateway.link.message import Message
from tests.support.mqtt_link import (
    BIRTH,
    CMD,
    FAST,
    STATUS,
    LinkFactory,
    blocked_handler,
    wait_until,
)

# --------------------------------------------------------------------------- sessions


def test_subscriptions_come_back_after_broker_kill9_and_restart_without_persistence(
    broker: Broker, make_link: LinkFactory
) -> None:
    link, agent = make_link(broker)
    assert link.wait_connected(5)
    agent.wait(lambda: len(agent.connected) == 1)
    reconnects: list[float] = []
    for round_no in range(3):
        broker.kill()  # session, subscriptions and retained status are gone
        wait_until(lambda: not link.connected, 3)
        broker.start()  # returns once it listens
        failures_before = link.stats()["connect_failures"]
        reconnects.append(wait_until(lambda: link.connected, 5))
        # Back at the first attempt once it listens (at most the one in flight failed),
        # so within one capped backoff: counted, not timed.
        assert link.stats()["connect_failures"] - failures_before <= 1
        agent.wait(lambda n=round_no: len(agent.connected) == n + 2)
        with Client(broker) as tester:
            # The broker forgot everything: birth and subscriptions are the link's doing.
            (status,) = tester.expect(STATUS)
            assert status.payload == BIRTH
            tester.publish(CMD, f"after-restart-{round_no}".encode(), qos=1)
            agent.wait(lambda n=round_no: f"after-restart-{n}".encode() in agent.payloads())
    assert agent.connected == [False, False, False, False]  # session lost every time
    stats = link.stats()
    assert stats["connects"] == 4
    assert stats["disconnects"] == 3
    print(f"\nreconnect after kill -9 + restart (persistence off): "
          f"{', '.join(f'{r * 1000:.0f}' for r in reconnects)} ms; p50 "
          f"{statistics.median(reconnects) * 1000:.0f} ms, max {max(reconnects) * 1000:.0f} ms "
          f"(backoff {FAST.backoff_initial_s}-{FAST.backoff_max_s}s, full jitter)")


def test_commands_queued_while_away_survive_a_broker_kill9_with_persistence(
    tmp_path: Path, make_link: LinkFactory
) -> None:
    with Broker(tmp_path / "broker", persistence=True) as broker:
        first, first_agent = make_link(broker)
        assert first.wait_connected(5)
        first.stop()  # clean: the session (clean_session=False) stays on the broker
        with Client(broker) as relay:
            relay.publish(CMD, b"queued-while-away", qos=1)
        time.sleep(0.3)  # the broker saves after each change; let it write
        broker.kill()
        broker.start()

        second, agent = make_link(broker)  # same client id: the agent restarted
        assert second.wait_connected(5)
        agent.wait(lambda: agent.payloads() == [b"queued-while-away"])
        agent.wait(lambda: agent.connected == [True])  # the broker kept our session
        assert first_agent.messages == []

        # And once more: a kill -9 with the link connected; the session survives.
        time.sleep(0.3)
        broker.kill()
        wait_until(lambda: not second.connected, 3)
        broker.start()
        assert second.wait_connected(5)
        agent.wait(lambda: agent.connected == [True, True])
        with Client(broker) as relay:
            relay.publish(CMD, b"after-kill", qos=1)
        agent.wait(lambda: agent.payloads() == [b"queued-while-away", b"after-kill"])


def test_an_unhandled_command_is_redelivered_to_the_next_agent(
    broker: Broker, make_link: LinkFactory
) -> None:
    # Acknowledged after the handler returns: an agent that stops (or dies) while a
    # command waits in its inbox gets it again from its session.
    release = threading.Event()
    busy = threading.Event()

    def stuck(message: Message) -> None:
        busy.set()
        release.wait(10)

    first, _ = make_link(broker, on_message=stuck)
    assert first.wait_connected(5)
    with Client(broker) as relay:
        relay.publish(CMD, b"cmd-1", qos=1)
        assert busy.wait(5)
        relay.publish(CMD, b"cmd-2", qos=1)  # waits in the inbox behind cmd-1
        time.sleep(0.2)
    first.stop(timeout=1.0)  # the handler is stuck: cmd-1 and cmd-2 are not acknowledged
    release.set()

    second, agent = make_link(broker)
    assert second.wait_connected(5)
    agent.wait(lambda: sorted(agent.payloads()) == [b"cmd-1", b"cmd-2"])
    # Messages the session held may arrive before the SUBACK, so before on_connected.
    agent.wait(lambda: agent.connected == [True])


def test_a_retained_message_on_the_command_topic_is_flagged(
    broker: Broker, make_link: LinkFactory
) -> None:
    with Client(broker) as relay:
        relay.publish(CMD, b"stale-unlock", qos=1, retain=True)
    _, agent = make_link(broker)
    agent.wait(lambda: len(agent.messages) == 1)
    assert agent.messages[0].retain is True  # the agent rejects it (contract §5)


def _v5_publisher(broker: Broker) -> Any:
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                         client_id="v5-publisher", protocol=paho.MQTTv5)
    client.connect(broker.host, broker.port)
    client.loop_start()
    return client


def test_the_lean_publish_decoder_skips_mqtt5_properties(
    broker: Broker, make_link: LinkFactory
) -> None:
    # The link decodes PUBLISH itself (gateway/link/, _ReadAheadClient); properties
    # a publisher sets must be skipped by their length, never read as payload.
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    link, agent = make_link(broker)
    assert link.wait_connected(5)
    publisher = _v5_publisher(broker)
    try:
        props = Properties(PacketTypes.PUBLISH)
        props.UserProperty = [("k" * 40, "v" * 300), ("trace", "1")]
        props.MessageExpiryInterval = 60
        props.ContentType = "application/jwt"
        props.CorrelationData = b"\x00\xff" * 100
        payloads = [b"", b"x", bytes(range(256)) * 3, "ünïcode".encode()]
        for i, payload in enumerate(payloads):
            publisher.publish(CMD, payload, qos=i % 2, properties=props).wait_for_publish(5)
        publisher.publish(CMD, b"plain", qos=1).wait_for_publish(5)
        agent.wait(lambda: len(agent.messages) == len(payloads) + 1)
    finally:
        publisher.loop_stop()
        publisher.disconnect()
    assert sorted(agent.payloads()) == sorted([*payloads, b"plain"])
    assert {m.qos for m in agent.messages} == {0, 1}
    assert not any(m.retain for m in agent.messages)
    assert link.stats()["inbound_invalid"] == 0


def test_a_burst_is_read_in_few_system_calls(broker: Broker, make_link: LinkFactory) -> None:
    # paho alone reads type, length and body separately: at least three recv() calls a
    # message.  The read-ahead must serve a burst from far fewer, and lose nothing.
    release, handled, blocked = blocked_handler(10)

    link, _ = make_link(broker, on_message=blocked, inbound_max=1000)
    assert link.wait_connected(5)
    client: Any = link._client
    before = client.recv_calls
    burst = [b"burst-%04d" % i for i in range(400)]
    with Client(broker) as sender:
        sender.publish_many(CMD, burst, qos=0)
        wait_until(lambda: link.stats()["inbound_queued"] >= len(burst) - 1, 10)
    calls = client.recv_calls - before
    print(f"\n{calls} recv() calls for a burst of {len(burst)} messages")
    release.set()
    wait_until(lambda: len(handled) >= len(burst), 10)
    assert handled == burst
    # Read as they arrive, a message may come alone; paho alone needs three reads each.
    assert calls < 1.5 * len(burst), f"{calls} recv() calls for {len(burst)} messages"


def _item(qos: int, n: int) -> _Inbound:
    return _Inbound(Message(topic=CMD, payload=b"%d" % n, qos=qos, retain=False, dup=False,
                            received_at=0.0), n, 1)


def test_inbox_serves_qos1_first_and_lets_it_push_out_qos0() -> None:
    inbox = _Inbox(3)
    assert inbox.put(_item(0, 1))
    assert inbox.put(_item(0, 2))
    assert inbox.put(_item(1, 3))
    assert not inbox.put(_item(0, 4))  # full: a QoS 0 arrival is refused
    assert inbox.put(_item(1, 5))  # full: a QoS 1 arrival takes the newest QoS 0's place
    assert [i.mid for i in inbox.evicted] == [2]
    assert inbox.put(_item(1, 6))  # and again
    assert [i.mid for i in inbox.evicted] == [2, 1]
    assert not inbox.put(_item(1, 7))  # full of QoS 1: refused
    assert len(inbox) == 3
    assert inbox.peak == 3
    got = [inbox.get() for _ in range(3)]
    assert [g.mid for g in got if isinstance(g, _Inbound)] == [3, 5, 6]
    inbox2 = _Inbox(5)
    for item in (_item(0, 1), _item(1, 2), _item(0, 3), _item(1, 4)):
        inbox2.put(item)
    order = [inbox2.get() for _ in range(4)]
    assert [g.mid for g in order if isinstance(g, _Inbound)] == [2, 4, 1, 3]
