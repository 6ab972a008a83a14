"""MqttLink against a real Mosquitto: wedges, backoff and handlers.

Fault matrix rows covered: #3 (frozen broker: SIGSTOP), #4 (reconnect backoff with
jitter, herd spread), #14/#36 (handlers that raise), #37 (slow handler vs keepalive).
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import replace

import pytest

from devkit.broker_client import Client
from devkit.mosquitto import Broker
from gateway.link.message import Message
from tests.support.mqtt_link import (
    BIRTH,
    CMD,
    FAST,
    STATUS,
    Agent,
    LinkFactory,
    mqtt_config,
    wait_until,
)

# --------------------------------------------------------------------------- frozen broker


def test_frozen_broker_is_detected_by_liveness_and_the_link_recovers(
    broker: Broker, make_link: LinkFactory
) -> None:
    keepalive = 5
    link, agent = make_link(broker, cfg=mqtt_config(broker, keepalive_s=keepalive))
    assert link.wait_connected(5)
    bound = FAST.liveness_interval_s + FAST.liveness_timeout_s
    detections: list[float] = []
    recoveries: list[float] = []
    attempts_while_frozen: list[int] = []
    phase = random.Random(3)
    for round_no in range(4):
        # Freeze at a random point of the liveness cycle: detection takes between
        # liveness_timeout_s and liveness_interval_s + liveness_timeout_s.
        time.sleep(0.2 + phase.uniform(0, FAST.liveness_interval_s))
        frozen_at = time.monotonic()
        broker.stop()  # SIGSTOP: TCP stays up, nothing answers
        detections.append(wait_until(lambda: not link.connected, bound + 1.0))
        assert link.stats()["liveness_failures"] == round_no + 1
        assert "liveness" in link.stats()["last_disconnect_reason"]
        before = link.stats()["connect_attempts"]
        time.sleep(2.0)  # attempts reach the frozen listener: no CONNACK, then backoff
        attempts_while_frozen.append(link.stats()["connect_attempts"] - before)
        thawed_at = time.monotonic()
        broker.cont()
        recoveries.append(wait_until(lambda: link.connected, 5))
        # Stale CONNECTs from attempts made during the freeze may take our session over
        # once the broker runs again; the link must come back from that too.  The
        # invariant: soon the link is up, the retained status is birth, commands flow.
        with Client(broker) as tester:
            tester.expect(STATUS, 5, where=lambda m: m.payload == BIRTH)
            wait_until(lambda: link.connected, 5)
            tester.publish(CMD, f"thawed-{round_no}".encode(), qos=1)
            agent.wait(lambda n=round_no: f"thawed-{n}".encode() in agent.payloads())
        # No wall-clock bound on the round: each step above has its own wait budget.
        assert link.stats()["connects"] >= round_no + 2
        assert thawed_at - frozen_at > 2.0
    for detected in detections:
        # Never declared wedged before the liveness timeout; and detected well inside the
        # fault matrix's 1.5 x keepalive (7.5 s here, ~7x the ``bound`` it takes).  The
        # figures themselves are printed below.
        assert detected >= FAST.liveness_timeout_s - 0.05
        assert detected < 1.5 * keepalive, f"detection {detected:.2f}s (bound {bound}s)"
    # Each attempt costs at least connect_timeout_s (no CONNACK) plus a backoff sleep.
    assert max(attempts_while_frozen) <= 2.0 / FAST.connect_timeout_s + 1
    print(f"\nfrozen broker (SIGSTOP), liveness {FAST.liveness_interval_s}s/"
          f"{FAST.liveness_timeout_s}s, keepalive {keepalive}s: detection "
          f"{', '.join(f'{d:.2f}' for d in detections)} s "
          f"(= {max(detections) / keepalive:.2f} x keepalive at worst); recovery after "
          f"SIGCONT {', '.join(f'{r:.2f}' for r in recoveries)} s; attempts during a 2 s "
          f"freeze {attempts_while_frozen}; stats liveness_last_detect_s "
          f"{link.stats()['liveness_last_detect_s']:.2f}")


def test_frozen_broker_that_is_then_restarted(broker: Broker, make_link: LinkFactory) -> None:
    link, agent = make_link(broker)
    assert link.wait_connected(5)
    broker.stop()
    wait_until(lambda: not link.connected, 2.0)
    broker.kill()  # SIGKILL ends a stopped process too
    restarted = time.monotonic()
    broker.start()
    recovery = wait_until(lambda: link.connected, 5)
    with Client(broker) as tester:
        tester.publish(CMD, b"after-freeze-and-restart", qos=1)
        agent.wait(lambda: b"after-freeze-and-restart" in agent.payloads())
    print(f"\nfrozen then restarted: reconnected {recovery:.2f}s after restart "
          f"({time.monotonic() - restarted:.2f}s to a delivered command)")


# --------------------------------------------------------------------------- backoff


def test_backoff_while_broker_is_down_is_capped_exponential(
    broker: Broker, make_link: LinkFactory
) -> None:
    # rng pinned at its maximum: every delay is the ceiling, min(max, initial * 2**n).
    timings = replace(FAST, backoff_initial_s=0.05, backoff_max_s=0.4, stable_after_s=60)
    link, _ = make_link(broker, timings=timings, rng=lambda: 1.0)
    assert link.wait_connected(5)
    broker.kill()
    wait_until(lambda: not link.connected, 3)
    before = link.stats()["connect_attempts"]
    window = 2.5
    time.sleep(window)
    stats = link.stats()
    attempts = stats["connect_attempts"] - before
    delays = stats["reconnect_delays"]
    assert delays[:5] == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.4])
    assert all(d == pytest.approx(0.4) for d in delays[3:])
    # 0.05 + 0.1 + 0.2 + 0.4 k <= 2.5 gives at most 9 attempts; a busy loop, thousands.
    assert 5 <= attempts <= 10, attempts
    assert stats["connect_failures"] >= attempts - 1
    print(f"\nbroker down {window}s: {attempts} connection attempts, delays "
          f"{[round(d, 2) for d in delays]}")
    broker.start()  # returns once it listens
    failures_before = link.stats()["connect_failures"]
    wait_until(lambda: link.connected, 5.0)
    # Back at the first attempt once it listens (at most the one in flight failed): within
    # one capped delay (0.4 s), counted rather than timed.
    assert link.stats()["connect_failures"] - failures_before <= 1


def test_backoff_delays_are_full_jitter_of_the_ceiling(
    broker: Broker, make_link: LinkFactory
) -> None:
    seed = 7
    timings = replace(FAST, backoff_initial_s=0.05, backoff_max_s=0.4, stable_after_s=60)
    link, _ = make_link(broker, timings=timings, rng=random.Random(seed).random)
    assert link.wait_connected(5)
    broker.kill()
    wait_until(lambda: len(link.stats()["reconnect_delays"]) >= 8, 10)
    twin = random.Random(seed)
    expected = [twin.random() * min(0.4, 0.05 * 2**n) for n in range(8)]
    assert link.stats()["reconnect_delays"][:8] == pytest.approx(expected)
    assert len({round(d, 6) for d in expected}) == 8  # jittered, not a fixed schedule


def test_a_stable_connection_resets_the_backoff(broker: Broker,
                                                make_link: LinkFactory) -> None:
    timings = replace(FAST, backoff_initial_s=0.05, backoff_max_s=0.4, stable_after_s=0.5)
    link, _ = make_link(broker, timings=timings, rng=lambda: 1.0)
    assert link.wait_connected(5)
    broker.kill()
    time.sleep(1.0)  # delays climb: 0.05, 0.1, 0.2, 0.4
    broker.start()
    assert link.wait_connected(3)
    climbed = len(link.stats()["reconnect_delays"])
    time.sleep(0.8)  # longer than stable_after_s
    broker.kill()
    wait_until(lambda: len(link.stats()["reconnect_delays"]) > climbed, 3)
    assert link.stats()["reconnect_delays"][climbed] == pytest.approx(0.05)


# --------------------------------------------------------------------------- handlers


def test_a_handler_that_raises_does_not_stop_later_messages(
    broker: Broker, make_link: LinkFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.link")
    agent = Agent()

    def handler(message: Message) -> None:
        if message.payload.startswith(b"boom"):
            raise ValueError(f"cannot parse {message.payload!r}")
        agent.on_message(message)

    def bad_on_connected(session_present: bool) -> None:
        raise RuntimeError("agent bug in on_connected")

    link, _ = make_link(broker, on_message=handler, on_connected=bad_on_connected)
    assert link.wait_connected(5)
    with Client(broker) as relay:
        relay.publish(CMD, b"boom-SECRET-PAYLOAD")
        relay.publish(CMD, b"ok-1")
        relay.publish(CMD, b"boom-SECRET-PAYLOAD")
        relay.publish(CMD, b"ok-2")
        agent.wait(lambda: agent.payloads() == [b"ok-1", b"ok-2"])
    stats = link.stats()
    assert stats["handler_errors"] == 3  # two messages and on_connected
    assert stats["handled"] == 2
    assert link.connected
    assert stats["disconnects"] == 0
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 3
    assert all("SECRET" not in r.getMessage() for r in caplog.records
               if r.levelno >= logging.INFO), "payload bytes leaked into the log"


def test_birth_that_raises_still_announces_online(broker: Broker,
                                                  make_link: LinkFactory) -> None:
    def birth() -> bytes:
        raise KeyError("version")

    link, agent = make_link(broker, birth=birth)
    assert link.wait_connected(5)
    with Client(broker) as watcher:
        (status,) = watcher.expect(STATUS)
    assert json.loads(status.payload) == {"online": True}
    agent.wait(lambda: agent.connected == [False])
    assert link.stats()["handler_errors"] == 1


def test_a_slow_handler_does_not_cost_the_connection(broker: Broker,
                                                     make_link: LinkFactory) -> None:
    # Fault matrix #37 (paho #328): the handler sleeps for 3.5 keepalives.  With the
    # handler on the network thread no PINGREQ would go out and the broker would drop
    # us after 1.5 keepalives.  Liveness is slowed down so only the keepalive is tested.
    keepalive = 1
    done: list[bytes] = []

    def slow(message: Message) -> None:
        if message.payload == b"slow":
            time.sleep(3.5 * keepalive)
        done.append(message.payload)

    link, _ = make_link(broker, on_message=slow,
                        cfg=mqtt_config(broker, keepalive_s=keepalive),
                        timings=replace(FAST, liveness_interval_s=60.0))
    assert link.wait_connected(5)
    with Client(broker) as relay:
        relay.publish(CMD, b"slow")
        relay.publish(CMD, b"after")
        wait_until(lambda: done == [b"slow", b"after"], 8)
    stats = link.stats()
    assert stats["connects"] == 1
    assert stats["disconnects"] == 0
    assert stats["liveness_failures"] == 0
    assert "exceeded timeout" not in broker.log_text()
