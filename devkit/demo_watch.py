"""The demo's MQTT client and its expectations: signed commands out, the agent's
results, unit states, alarms and Timeline Events in (used by :mod:`devkit.demo`)."""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from gateway.ops import liveview
from gateway.ops.liveview import LiveView

if TYPE_CHECKING:
    from devkit.sandbox import Sandbox

from devkit.demo_site import EXPECT_TIMEOUT_S, PREFIX, REFERENCES

# -- the live view ------------------------------------------------------------------------
# LiveView and the describe_* functions live in gateway/ops/liveview.py (product code), which
# `stora-gateway watch` shares; the demo only adds its unit labels.


class Watcher:
    """The demo's MQTT client: publishes signed commands, watches the agent's outputs.

    It speaks MQTT 3.1.1 while the agent speaks 5, so the embedded broker serves both.
    """

    def __init__(self, host: str, port: int, view: LiveView) -> None:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        self.view = view
        self._cond = threading.Condition()
        self.results: list[dict[str, Any]] = []
        self.states: dict[str, list[dict[str, Any]]] = {}
        self.alarms: list[dict[str, Any]] = []
        self.online: bool | None = None
        self._subscribed = threading.Event()
        self._client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                                   client_id=f"demo-signer-{os.getpid()}",
                                   protocol=paho.MQTTv311)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = lambda *_: self._subscribed.set()
        self._client.on_message = self._on_message
        self._client.connect(host, port, keepalive=30)
        self._client.loop_start()
        if not self._subscribed.wait(EXPECT_TIMEOUT_S):
            self.close()
            raise OSError(f"the demo's MQTT client could not subscribe at {host}:{port}")

    def _on_connect(self, client: Any, userdata: object, flags: Any, reason: Any,
                    properties: object) -> None:
        client.subscribe([(f"{PREFIX}/{suffix}", 1)
                          for suffix in ("status", "cmd/result", "units/+", "alarm")])

    def _on_message(self, client: Any, userdata: object, msg: Any) -> None:
        try:
            doc = json.loads(msg.payload)
        except ValueError:
            self.view.line("mqtt", f"{msg.topic}: not JSON: {msg.payload[:60]!r}")
            return
        suffix = msg.topic[len(PREFIX) + 1:]
        with self._cond:
            if suffix == "status":
                online = bool(doc.get("online"))
                if online != self.online:
                    self.online = online
                    self.view.line("agent", liveview.describe_online(doc))
            elif suffix == "cmd/result":
                self.results.append(doc)
                self.view.line("←", describe_result(doc))
            elif suffix.startswith("units/"):
                history = self.states.setdefault(str(doc.get("unit")), [])
                line = liveview.describe_state_change(history[-1] if history else None, doc)
                if line is not None:
                    self.view.line("lock", line)
                history.append(doc)
            elif suffix == "alarm":
                self.alarms.append(doc)
                self.view.line("alarm", liveview.describe_alarm(doc, REFERENCES))
            self._cond.notify_all()

    def send(self, token: bytes) -> None:
        """Publish a command (QoS 1) and wait until the broker has it."""
        info = self._client.publish(f"{PREFIX}/cmd", token, qos=1)
        info.wait_for_publish(EXPECT_TIMEOUT_S)
        if not info.is_published():
            raise OSError("the broker did not acknowledge a command")

    def wait(self, check: Callable[[], Any], timeout: float = EXPECT_TIMEOUT_S) -> Any:
        """Wait until ``check()`` (called with the watcher's lock held) is truthy."""
        with self._cond:
            return self._cond.wait_for(check, timeout)

    def results_for(self, jti: str | None) -> list[dict[str, Any]]:
        """Every result published for ``jti`` so far (``None``: results of tokens whose
        signature did not verify, which carry no id)."""
        return [r for r in self.results if r.get("jti") == jti]

    def state(self, unit: str) -> dict[str, Any] | None:
        """The unit's last published state."""
        history = self.states.get(unit)
        return history[-1] if history else None

    def close(self) -> None:
        """Disconnect and stop paho's thread."""
        with contextlib.suppress(Exception):
            self._client.disconnect()
        self._client.loop_stop()
        self._client.reinitialise()  # closes paho's socket pair now


def describe_result(doc: Mapping[str, Any]) -> str:
    """A command result in words: "done: unlock A-101", "rejected (overlocked): …"."""
    return liveview.describe_result(doc, REFERENCES)


class EventFeed:
    """Prints each Timeline Event as the sandbox receives it (a poll every 50 ms)."""

    POLL_S: Final = 0.05

    def __init__(self, sandbox: Sandbox, view: LiveView) -> None:
        self.sandbox = sandbox
        self.view = view
        self.events: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo-events", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.POLL_S):
            new = self.sandbox.events()[len(self.events):]
            for event in new:
                self.view.line("Stora", str(event.get("description")))
            if new:
                with self._cond:
                    self.events.extend(new)
                    self._cond.notify_all()

    def wait_count(self, count: int, timeout: float = EXPECT_TIMEOUT_S) -> bool:
        """Wait until ``count`` events arrived in all."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self.events) >= count, timeout)

    def close(self) -> None:
        """Stop polling."""
        self._stop.set()
        self._thread.join()


# -- the script ---------------------------------------------------------------------------
@dataclass
class Expect:
    """What one command should do: its result, and the Timeline Events it causes.

    ``events`` are the description heads (contract §6, before " — ") in any order.
    """

    status: str
    reason: str | None = None
    duplicate: bool = False
    events: tuple[str, ...] = ()
