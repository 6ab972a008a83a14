"""A simulated Zigbee2MQTT bridge with lock devices, on a real MQTT broker.

It speaks Zigbee2MQTT's topics and payloads, built and parsed with the production
:mod:`~drivers.zigbee2mqtt.messages`, so simulator and driver cannot drift apart
silently.  Like Zigbee2MQTT it publishes ``bridge/state`` retained (with an "offline"
last will), each device's ``availability`` retained, and the device's whole state on
``<base>/<name>`` (QoS 0, not retained: Zigbee2MQTT's defaults) after every change and
every ``/get``.

Device model, per lock (:class:`SimLock`): a ``/set`` moves the bolt and the device
reports ``report_delay_s`` later (Zigbee2MQTT reads the lock state back after the
command); a ``jammed`` lock stops at ``not_fully_locked`` when asked to lock; a lock
with ``relock_after_s`` relocks by itself (and says ``auto_relock: true``).

Fault switches (:class:`SimFaults`, per bridge, changeable while it runs), drawn from a
seeded generator so a failing run can be replayed:

* ``drop_p``: a ``/set`` is lost on the radio (the bolt does not move, nothing reported);
* ``skip_report_p``: the bolt moves, but no report follows (a lost attribute report);
* ``delay_p`` / ``delay_s``: the report comes ``delay_s`` late;
* ``silent``: every ``/set`` and ``/get`` is lost (the device's radio is dead, while
  Zigbee2MQTT still believes it online).

Counters and the log of every state report published (``reports``) let a test check
each confirmation against what the device really said, and when.
"""

from __future__ import annotations

import heapq
import itertools
import json
import logging
import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from drivers.zigbee2mqtt.messages import (
    LOCK,
    UNLOCK,
    PayloadError,
    Report,
    Topics,
    decode_command,
    encode_availability,
)

LOGGER = logging.getLogger(__name__)

#: A report's normal latency: one Zigbee round trip and Zigbee2MQTT's 200 ms read after
#: the command would be realistic; tests and benchmarks set it lower.
DEFAULT_REPORT_DELAY_S = 0.2
_ids = itertools.count(1)


@dataclass(slots=True)
class SimFaults:
    """Fault switches of the whole simulated bridge (see the module docstring)."""

    drop_p: float = 0.0
    skip_report_p: float = 0.0
    delay_p: float = 0.0
    delay_s: float = 0.0
    silent: bool = False


@dataclass(slots=True)
class SimLock:
    """One simulated Zigbee lock."""

    name: str
    locked: bool = True
    jammed: bool = False
    battery: float = 90.0
    relock_after_s: float | None = None
    online: bool = True
    half_locked: bool = False  # a jammed lock that was asked to lock
    relock_generation: int = 0

    def report(self) -> Report:
        """The device's state, as Zigbee2MQTT would publish it."""
        if self.half_locked:
            lock_state = "not_fully_locked"
        else:
            lock_state = "locked" if self.locked else "unlocked"
        return Report(
            state=LOCK if self.locked and not self.half_locked else UNLOCK,
            lock_state=lock_state,
            battery=self.battery,
            auto_relock=True if self.relock_after_s is not None else None,
        )


@dataclass(frozen=True, slots=True)
class SentReport:
    """One state report the simulator published: when (monotonic), who, what."""

    at: float
    device: str
    lock_state: str
    cause: str


@dataclass(slots=True)
class SimCounters:
    """What happened, for assertions and benchmark output."""

    commands: int = 0
    commands_dropped: int = 0
    commands_ignored: int = 0  # silent or offline
    reports_skipped: int = 0
    reports_delayed: int = 0
    gets: int = 0
    gets_ignored: int = 0
    reports: list[SentReport] = field(default_factory=list)


class Zigbee2MqttSim:
    """A Zigbee2MQTT bridge on the broker at ``host:port`` with lock ``devices``."""

    def __init__(
        self,
        host: str,
        port: int,
        devices: Iterable[str | SimLock],
        *,
        base_topic: str = "zigbee2mqtt",
        faults: SimFaults | None = None,
        report_delay_s: float = DEFAULT_REPORT_DELAY_S,
        legacy_availability: bool = False,
        seed: int = 0,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.topics = Topics(base_topic)
        self.faults = faults or SimFaults()
        self.report_delay_s = report_delay_s
        self.legacy_availability = legacy_availability
        self.counters = SimCounters()
        self.locks: dict[str, SimLock] = {}
        for device in devices:
            lock = device if isinstance(device, SimLock) else SimLock(device)
            self.locks[lock.name] = lock
        self._rng = random.Random(seed)
        self._lock = threading.RLock()
        self._cv = threading.Condition(self._lock)
        self._queue: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="z2m-sim", daemon=True)
        self._connected = threading.Event()
        self._routes: dict[str, tuple[str, SimLock]] = {}
        for lock in self.locks.values():
            self._routes[self.topics.set(lock.name)] = ("set", lock)
            self._routes[self.topics.get(lock.name)] = ("get", lock)
        self._paho = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                                 client_id=f"z2m-sim-{next(_ids)}", clean_session=True)
        self._paho.will_set(self.topics.bridge_state, encode_availability(False), qos=1,
                            retain=True)
        if username:  # a broker with accounts (``stora-gateway simulate`` on a site's)
            self._paho.username_pw_set(username, password)
        self._paho.on_connect = self._on_connect
        self._paho.on_message = self._on_message

    # -- lifecycle ----------------------------------------------------------------------
    def start(self, timeout: float = 10.0) -> Zigbee2MqttSim:
        """Connect, announce the bridge and the devices online, start serving."""
        self._thread.start()
        self._paho.connect(self.host, self.port, keepalive=30)
        self._paho.loop_start()
        if not self._connected.wait(timeout):
            self.close()
            raise RuntimeError(f"simulated Zigbee2MQTT could not reach {self.host}:"
                               f"{self.port}")
        return self

    def close(self) -> None:
        """Stop serving; the bridge says offline (clean stop) and disconnects."""
        self._stop.set()
        with self._cv:
            self._cv.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        try:
            if self._paho.is_connected():
                self._paho.publish(self.topics.bridge_state, encode_availability(False),
                                   qos=1, retain=True).wait_for_publish(2)
            self._paho.disconnect()
        except (RuntimeError, ValueError, OSError):  # already gone
            LOGGER.debug("simulated bridge: unclean close", exc_info=True)
        self._paho.loop_stop()

    @property
    def connected(self) -> bool:
        """True while the simulated bridge is connected to its broker."""
        return bool(self._paho.is_connected())

    def __enter__(self) -> Zigbee2MqttSim:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _on_connect(self, client: paho.Client, userdata: object, flags: Any,
                    reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            return
        client.subscribe([(topic, 0) for topic in self._routes])
        client.publish(self.topics.bridge_state, encode_availability(True), qos=1,
                       retain=True)
        for lock in self.locks.values():
            self._publish_availability(lock)
        self._connected.set()

    # -- what a test does to the devices ------------------------------------------------
    def set_online(self, online: bool, names: Iterable[str] | None = None) -> None:
        """Devices (default: all) go offline or come back, as Zigbee2MQTT announces."""
        for name in names if names is not None else list(self.locks):
            lock = self.locks[name]
            with self._lock:
                lock.online = online
            self._publish_availability(lock)

    def set_bridge_online(self, online: bool) -> None:
        """Zigbee2MQTT itself stops (its last will) or starts again."""
        self._paho.publish(self.topics.bridge_state, encode_availability(online), qos=1,
                           retain=True).wait_for_publish(5)

    def drift(self, name: str, unlocked: bool) -> None:
        """Someone turns the bolt by hand; the device reports it if it can be heard."""
        lock = self.locks[name]
        with self._lock:
            lock.locked = not unlocked
            lock.half_locked = False
            heard = lock.online and not self.faults.silent
        if heard:
            self._later(self.report_delay_s, lock, "drift")

    def set_battery(self, name: str, percent: float) -> None:
        """The device's battery changes; it reports (battery reports repeat the state)."""
        lock = self.locks[name]
        with self._lock:
            lock.battery = percent
            heard = lock.online and not self.faults.silent
        if heard:
            self._later(0.0, lock, "battery")

    def unlocked(self, name: str) -> bool:
        """Whether the bolt of ``name`` is retracted now."""
        with self._lock:
            lock = self.locks[name]
            return not lock.locked or lock.half_locked

    # -- the bridge ---------------------------------------------------------------------
    def _on_message(self, client: paho.Client, userdata: object,
                    msg: paho.MQTTMessage) -> None:
        route = self._routes.get(msg.topic)
        if route is None:
            return
        kind, lock = route
        try:
            command = decode_command(bytes(msg.payload), get=kind == "get")
        except PayloadError as exc:
            LOGGER.warning("simulated bridge: bad %s payload %r: %s", kind, msg.payload, exc)
            return
        with self._lock:
            if kind == "get":
                self.counters.gets += 1
                if self.faults.silent or not lock.online:
                    self.counters.gets_ignored += 1
                    return
                self._later(self.report_delay_s, lock, "get")
                return
            self.counters.commands += 1
            if self.faults.silent or not lock.online:
                self.counters.commands_ignored += 1
                return
            # Draws in a fixed order, so a seed replays the same run.
            dropped = self._rng.random() < self.faults.drop_p
            skipped = self._rng.random() < self.faults.skip_report_p
            delayed = self._rng.random() < self.faults.delay_p
            if dropped:
                self.counters.commands_dropped += 1
                return
            self._apply(lock, command.state == LOCK)
            if skipped:
                self.counters.reports_skipped += 1
                return
            delay = self.report_delay_s
            if delayed:
                self.counters.reports_delayed += 1
                delay += self.faults.delay_s
            self._later(delay, lock, "set")

    def _apply(self, lock: SimLock, locked: bool) -> None:
        lock.relock_generation += 1
        if locked:
            lock.locked, lock.half_locked = True, lock.jammed
            return
        lock.locked, lock.half_locked = False, False
        if lock.relock_after_s is not None:
            generation = lock.relock_generation

            def relock() -> None:
                with self._lock:
                    if lock.relock_generation != generation:
                        return  # another command came first
                    lock.locked, lock.half_locked = True, lock.jammed
                self._report(lock, "auto_relock")

            self._schedule(lock.relock_after_s, relock)

    def _later(self, delay: float, lock: SimLock, cause: str) -> None:
        self._schedule(delay, lambda: self._report(lock, cause))

    def _report(self, lock: SimLock, cause: str) -> None:
        with self._lock:
            if not lock.online or self.faults.silent:
                return
            report = lock.report()
            payload = {**report.payload(), "linkquality": 112}
            assert report.lock_state is not None
            self.counters.reports.append(
                SentReport(time.monotonic(), lock.name, report.lock_state, cause))
            # Published under the lock, so the log's order is the wire's order.
            self._paho.publish(self.topics.state(lock.name), json.dumps(payload), qos=0)

    def _publish_availability(self, lock: SimLock) -> None:
        self._paho.publish(self.topics.availability(lock.name),
                           encode_availability(lock.online, legacy=self.legacy_availability),
                           qos=1, retain=True)

    # -- a tiny scheduler: one thread, no busy loop -------------------------------------
    def _schedule(self, delay: float, fn: Callable[[], None]) -> None:
        with self._cv:
            heapq.heappush(self._queue, (time.monotonic() + delay, next(self._seq), fn))
            self._cv.notify()

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._cv:
                now = time.monotonic()
                if not self._queue or self._queue[0][0] > now:
                    wait = self._queue[0][0] - now if self._queue else None
                    self._cv.wait(wait)
                    continue
                _, _, fn = heapq.heappop(self._queue)
            try:
                fn()
            except Exception:  # a simulator bug must not hang the test silently
                LOGGER.exception("simulated bridge: scheduled action failed")
