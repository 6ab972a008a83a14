"""What the MqttLink tests share (tests/gateway/link/test_mqtt_link_*.py): the topics,
shrunk timings, a recording agent, the link factory fixture and a polling wait."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from devkit.mosquitto import Broker
from gateway.config import MqttConfig
from gateway.link.message import Message
from gateway.link.mqtt import MqttLink
from gateway.link.timing import LinkTimings

STATUS = "stora-gw/site_1/status"

CMD = "stora-gw/site_1/cmd"

BIRTH = b'{"online":true,"version":"test"}'

#: Distinct from OFFLINE_PAYLOAD so a test can tell a will from a clean stop.
WILL = b'{"online":false,"will":true}'

#: Small enough for fast tests, with the same proportions as the defaults.
FAST = LinkTimings(
    backoff_initial_s=0.1,
    backoff_max_s=0.5,
    liveness_interval_s=0.5,
    liveness_timeout_s=0.5,
    connect_timeout_s=1.0,
    stable_after_s=1.0,
)


def mqtt_config(broker: Broker, **overrides: Any) -> MqttConfig:
    """An [mqtt] section pointing at ``broker``."""
    values: dict[str, Any] = {
        "host": broker.host, "port": broker.port, "topic_prefix": "stora-gw",
        "client_id": "stora-gw-site_1", "username": "", "password_file": None,
        "tls": False, "ca_file": None, "cert_file": None, "key_file": None,
        "keepalive_s": 5,
    }
    values.update(overrides)
    return MqttConfig(**values)


@dataclass
class Agent:
    """What a test's fake agent saw: messages, on_connected calls, in order."""

    messages: list[Message] = field(default_factory=list)
    connected: list[bool] = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)

    def on_message(self, message: Message) -> None:
        with self.cond:
            self.messages.append(message)
            self.cond.notify_all()

    def on_connected(self, session_present: bool) -> None:
        with self.cond:
            self.connected.append(session_present)
            self.cond.notify_all()

    def wait(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        with self.cond:
            assert self.cond.wait_for(predicate, timeout), (
                f"timed out; messages={[m.payload for m in self.messages]} "
                f"connected={self.connected}")

    def payloads(self) -> list[bytes]:
        with self.cond:
            return [m.payload for m in self.messages]


LinkFactory = Callable[..., tuple[MqttLink, Agent]]


def make_link() -> Iterator[LinkFactory]:
    """Build and start links; every one is stopped at teardown."""
    made: list[MqttLink] = []

    def factory(
        broker: Broker,
        *,
        agent: Agent | None = None,
        on_message: Callable[[Message], None] | None = None,
        start: bool = True,
        cfg: MqttConfig | None = None,
        **kwargs: Any,
    ) -> tuple[MqttLink, Agent]:
        agent = agent or Agent()
        kwargs.setdefault("timings", FAST)
        kwargs.setdefault("birth", lambda: BIRTH)
        kwargs.setdefault("on_connected", agent.on_connected)
        link = MqttLink(
            cfg or mqtt_config(broker),
            status_topic=STATUS,
            will=WILL,
            subscriptions=[(CMD, 1)],
            on_message=on_message or agent.on_message,
            **kwargs,
        )
        made.append(link)
        if start:
            link.start()
        return link, agent

    yield factory
    for link in made:
        link.stop(timeout=3.0)


def wait_until(predicate: Callable[[], bool], timeout: float, step: float = 0.005) -> float:
    """Poll ``predicate``; the seconds it took.  Fails the test on timeout."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(step)
    return time.monotonic() - start


def blocked_handler(
    timeout: float,
) -> tuple[threading.Event, list[bytes], Callable[[Message], None]]:
    """A handler that waits until ``release`` is set (at most ``timeout`` s) and then keeps
    the payload: ``(release, handled, handler)``."""
    release = threading.Event()
    handled: list[bytes] = []

    def blocked(message: Message) -> None:
        release.wait(timeout)
        handled.append(message.payload)

    return release, handled, blocked
