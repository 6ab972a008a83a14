"""The ``zigbee2mqtt`` driver: Zigbee door locks behind a Zigbee2MQTT bridge.

One controller is one Zigbee2MQTT instance (``base_topic``); each lock point names its
device (``point.device``).  An action is confirmed only by a state report received after
it (or after one ``/get``); offline devices and bridges fail at once; low batteries
become notices; the agent relocks unless the device reports ``auto_relock``.

See docs/design/zigbee2mqtt-driver.md.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Final, Literal

from drivers.base import (
    ActionResult,
    Clock,
    Controller,
    Health,
    LockPoint,
    LockState,
    Notice,
    Reading,
    unknown_reading,
)
from drivers.errors import (
    DriverError,
    LinkDownError,
    NoReplyError,
    TechnicianError,
    UnsupportedError,
)
from drivers.health import HealthTracker
from drivers.mqtt.settings import BrokerSettings
from drivers.settings import BuildContext, ControllerSettings
from drivers.zigbee2mqtt.client import BridgeLink
from drivers.zigbee2mqtt.messages import (
    PayloadError,
    Report,
    Topics,
    check_friendly_name,
    decode_availability,
    decode_report,
    encode_get,
    encode_set,
)
from drivers.zigbee2mqtt.settings import (
    BATTERY_LOW_PCT,
    BATTERY_OK_PCT,
    Z2MTiming,
    Zigbee2MqttSettings,
)

LOGGER = logging.getLogger(__name__)

#: Reports kept per device, to find one that showed the asked-for state even when a
#: later one (a battery report, a relock) followed it before the waiter woke.
_HISTORY: Final = 8
#: Notices kept until the gateway collects them (it does every reconciliation pass).
_NOTICES_MAX: Final = 100


class DeviceOfflineError(NoReplyError):
    """Zigbee2MQTT says the device (or the bridge itself) is offline."""


@dataclass(slots=True)
class Z2MStats:
    """Counters for tests, benchmarks and ``status``."""

    commands: int = 0
    confirmed_by_report: int = 0
    readbacks: int = 0
    recovered_by_get: int = 0
    not_confirmed: int = 0
    gets: int = 0
    reports: int = 0
    stale_ignored: int = 0


@dataclass(slots=True, eq=False)  # identity: used as a set member
class _Device:
    """What the driver knows about one device; guarded by the controller's condition."""

    name: str
    seq: int = 0  # reports with lock state received (non-retained) so far
    report: Report | None = None  # the last one, None when it can no longer be trusted
    received_at: float = 0.0
    history: deque[tuple[int, Report, float]] = field(
        default_factory=lambda: deque(maxlen=_HISTORY))
    available: bool | None = None  # None: Zigbee2MQTT publishes no availability
    unresponsive: str | None = None  # why, after a /get got no answer
    retry_at: float = 0.0
    retry_s: float = 0.0
    battery: float | None = None
    battery_warned: bool = False
    auto_relock: bool | None = None


class Zigbee2MqttController(Controller):
    """One Zigbee2MQTT instance's locks, over a shared :class:`BridgeLink`.

    ``devices`` are the friendly names known up front (subscribed at once); a point
    naming another device is subscribed on first use.
    """

    def __init__(
        self,
        name: str,
        link: BridgeLink,
        base_topic: str = "zigbee2mqtt",
        devices: Iterable[str] = (),
        *,
        timing: Z2MTiming | None = None,
        battery_low_pct: float = BATTERY_LOW_PCT,
        battery_ok_pct: float = BATTERY_OK_PCT,
        clock: Clock = time.monotonic,
    ) -> None:
        self.name = name
        self.link = link
        self.topics = Topics(base_topic)
        self.timing = timing or Z2MTiming()
        self.battery_low_pct = battery_low_pct
        self.battery_ok_pct = battery_ok_pct
        self.stats = Z2MStats()
        self._clock = clock
        self._cond = threading.Condition()
        self._devices: dict[str, _Device] = {}
        self._routes: dict[str, tuple[Literal["state", "availability"], _Device]] = {}
        self._bridge_online: bool | None = None
        self._notices: deque[Notice] = deque(maxlen=_NOTICES_MAX)
        self._health = HealthTracker(clock)
        self._closed = False
        link.acquire()
        link.on_disconnect(self._on_link_lost)
        link.add_handler([self.topics.bridge_state], self._on_bridge)
        for device in devices:
            self._device(device, wait=False)

    # -- devices and messages (link thread) ---------------------------------------------
    def _device(self, name: str, *, wait: bool = True) -> _Device:
        dev = self._devices.get(name)
        if dev is not None:
            return dev
        check_friendly_name(name)
        dev = _Device(name)
        with self._cond:
            self._devices[name] = dev
            self._routes[self.topics.state(name)] = ("state", dev)
            self._routes[self.topics.availability(name)] = ("availability", dev)
        self.link.add_handler(
            [self.topics.state(name), self.topics.availability(name)], self._on_message,
            timeout=self.timing.subscribe_timeout_s if wait else None)
        return dev

    def _on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        route = self._routes.get(topic)
        if route is None:
            return
        kind, dev = route
        if kind == "availability":
            self._on_availability(dev, decode_availability(payload))
            return
        try:
            report = decode_report(payload)
        except PayloadError as exc:
            LOGGER.warning("%s: unreadable state of %s: %s", self.name, dev.name, exc)
            return
        now = self._clock()
        with self._cond:
            if retained:
                # As old as the broker's copy: it proves nothing about now.
                self.stats.stale_ignored += 1
                return
            self.stats.reports += 1
            self._health.last_ok_at = now
            if report.auto_relock is not None:
                dev.auto_relock = report.auto_relock
            self._check_battery(dev, report)
            if report.has_lock:
                dev.seq += 1
                dev.report, dev.received_at = report, now
                dev.history.append((dev.seq, report, now))
                if dev.unresponsive is not None:
                    LOGGER.info("%s: %s reports again", self.name, dev.name)
                dev.unresponsive, dev.retry_s = None, 0.0
                self._health.failures = 0  # it talks: what failed before is history
            self._cond.notify_all()

    def _on_availability(self, dev: _Device, online: bool | None) -> None:
        with self._cond:
            before, dev.available = dev.available, online
            if online is False:
                dev.report = None  # whatever it said before is no longer known
            if online and before is not True:
                dev.unresponsive, dev.retry_s = None, 0.0
                self._health.failures = 0
            self._cond.notify_all()
        if before is not None and online is not None and before != online:
            LOGGER.warning("%s: %s is %s (Zigbee2MQTT availability)", self.name, dev.name,
                           "online" if online else "offline")

    def _on_bridge(self, topic: str, payload: bytes, retained: bool) -> None:
        del topic, retained
        online = decode_availability(payload)
        with self._cond:
            before, self._bridge_online = self._bridge_online, online
            if online is False:
                self._forget_reports()
            elif online and before is not True:
                self._health.failures = 0
            self._cond.notify_all()
        if before is not None and online is not None and before != online:
            LOGGER.warning("%s: Zigbee2MQTT bridge %s is %s", self.name, self.topics.base,
                           "online" if online else "offline")

    def _on_link_lost(self) -> None:
        with self._cond:
            # Reports may be missed while away; retained availability comes back with
            # the subscriptions, so it is unknown meanwhile.
            self._forget_reports()
            self._bridge_online = None
            for dev in self._devices.values():
                dev.available = None
            self._cond.notify_all()

    def _forget_reports(self) -> None:
        for dev in self._devices.values():
            dev.report = None

    def _check_battery(self, dev: _Device, report: Report) -> None:
        if report.battery is not None:
            dev.battery = report.battery
        low = report.battery_low is True or (
            report.battery is not None and report.battery <= self.battery_low_pct)
        ok = report.battery_low is False if report.battery is None else (
            report.battery >= self.battery_ok_pct)
        if low and not dev.battery_warned:
            dev.battery_warned = True
            level = f"{report.battery:g} %" if report.battery is not None else "low"
            self._notices.append(Notice("battery_low", f"{dev.name}: battery {level}; "
                                        "replace the batteries", device=dev.name))
        elif ok and dev.battery_warned:
            dev.battery_warned = False

    # -- actions ------------------------------------------------------------------------
    def unlock(self, point: LockPoint, seconds: float) -> ActionResult:
        """Publish ``UNLOCK`` and confirm with a report received after it (or a /get)."""
        if not seconds > 0:
            raise ValueError(f"unlock time must be positive, got {seconds!r} s")
        result = self._act(point, locked=False)
        dev = self._devices[self._name_of(point)]
        if dev.auto_relock:
            return ActionResult(result.confirmed, result.reading,
                                result.detail + "; the lock relocks by itself (auto_relock)",
                                True, result.attempts)
        return ActionResult(result.confirmed, result.reading,
                            result.detail + f"; the agent relocks after {seconds:g} s",
                            False, result.attempts)

    def lock(self, point: LockPoint) -> ActionResult:
        """Publish ``LOCK`` and confirm with a report received after it (or a /get)."""
        return self._act(point, locked=True)

    def _act(self, point: LockPoint, *, locked: bool) -> ActionResult:
        want = LockState.LOCKED if locked else LockState.UNLOCKED
        with self._io():
            dev = self._device(self._name_of(point))
            # A lock is tried even on a device Zigbee2MQTT calls offline (a battery lock
            # is only declared offline after hours of silence, and may hear us): securing
            # a door is never skipped on a flag.  An unlock fails at once instead.
            self._ready([] if locked else [dev])
            with self._cond:
                mark = dev.seq
            self.link.publish(self.topics.set(dev.name), encode_set(locked))
            self.stats.commands += 1
            hit, last = self._wait_for(dev, mark, want, self.timing.report_timeout_s)
            if hit is not None:
                self.stats.confirmed_by_report += 1
                return ActionResult(True, _reading(*hit), "state report after the command")
            # Missing, or only showing something else: read back once.
            self.stats.readbacks += 1
            with self._cond:
                mark_get = dev.seq
            self.link.publish(self.topics.get(dev.name), encode_get())
            self.stats.gets += 1
            hit, after_get = self._wait_for(dev, mark_get, want, self.timing.get_timeout_s)
            if hit is not None:
                self.stats.recovered_by_get += 1
                return ActionResult(True, _reading(*hit),
                                    "confirmed by a /get read-back (no fresh report "
                                    "after the command)")
            self.stats.not_confirmed += 1
            if after_get is None and last is None:
                self._mark_unresponsive(dev, "no state report after /set nor /get")
                reading = unknown_reading(self._clock)
                detail = (f"{dev.name}: no state report within "
                          f"{self.timing.report_timeout_s:g} s of the command nor "
                          f"{self.timing.get_timeout_s:g} s of a /get")
                self._health.last_error = detail
            else:
                seen = after_get or last
                assert seen is not None
                reading = _reading(*seen)
                detail = f"{dev.name}: read-back shows {reading.lock.value}"
            return ActionResult(False, reading, detail)

    def _wait_for(self, dev: _Device, mark: int, want: LockState, timeout: float) -> tuple[
            tuple[Report, float] | None, tuple[Report, float] | None]:
        """Wait for a report after ``mark`` showing ``want``: (that one, the latest)."""
        deadline = self._clock() + timeout

        def found() -> tuple[Report, float] | None:
            for seq, report, at in dev.history:
                if seq > mark and report.lock is want:
                    return report, at
            return None

        with self._cond:
            while (hit := found()) is None:
                remaining = deadline - self._clock()
                if remaining <= 0 or self._closed:
                    break
                self._cond.wait(remaining)
            latest = dev.history[-1] if dev.history and dev.history[-1][0] > mark else None
            return hit, (latest[1], latest[2]) if latest is not None else None

    def _mark_unresponsive(self, dev: _Device, why: str) -> None:
        with self._cond:
            dev.unresponsive = why
            dev.report = None
            dev.retry_s = min(max(dev.retry_s * 2, self.timing.retry_initial_s),
                              self.timing.retry_max_s)
            dev.retry_at = self._clock() + dev.retry_s

    # -- reading ------------------------------------------------------------------------
    def read(self, point: LockPoint) -> Reading:
        """The last fresh report of the device, or a /get read-back."""
        return self.read_many([point])[0]

    def read_many(self, points: Sequence[LockPoint], *, force: bool = False) -> list[Reading]:
        """Read several devices; the /gets go out together and are awaited together.

        Raises when any of them cannot be read (offline, unresponsive): a reading is
        never made up for it.
        """
        with self._io():
            devs = [self._device(self._name_of(p)) for p in points]
            unique = list(dict.fromkeys(devs))
            self._ready(unique)
            now = self._clock()
            with self._cond:
                need = [d for d in unique if force or not self._fresh(d, now)]
                waiting = [d for d in need if d.unresponsive and now < d.retry_at]
                marks = {d.name: d.seq for d in need}
            if waiting:
                raise NoReplyError("; ".join(
                    f"{d.name}: {d.unresponsive}; asked again in {d.retry_at - now:.0f} s"
                    for d in waiting))
            for dev in need:
                self.link.publish(self.topics.get(dev.name), encode_get())
                self.stats.gets += 1
            if need:
                self._wait_reports(need, marks)
            with self._cond:
                return [_reading(d.report, d.received_at) if d.report is not None
                        else unknown_reading(self._clock) for d in devs]

    def _wait_reports(self, need: list[_Device], marks: dict[str, int]) -> None:
        deadline = self._clock() + self.timing.get_timeout_s
        with self._cond:
            while missing := [d for d in need if d.seq <= marks[d.name]]:
                remaining = deadline - self._clock()
                if remaining <= 0 or self._closed:
                    break
                self._cond.wait(remaining)
        if missing:
            why = f"no state report within {self.timing.get_timeout_s:g} s of a /get"
            for dev in missing:
                self._mark_unresponsive(dev, why)
            raise NoReplyError(", ".join(d.name for d in missing) + f": {why}")

    def _fresh(self, dev: _Device, now: float) -> bool:
        return (dev.report is not None and dev.unresponsive is None
                and now - dev.received_at <= self.timing.max_report_age_s)

    # -- preconditions and health -------------------------------------------------------
    def _name_of(self, point: LockPoint) -> str:
        if point.device is None:
            raise UnsupportedError(f"{self.name}: a zigbee2mqtt lock is named by its "
                                   "device (friendly name), not by a channel")
        return point.device

    def _ready(self, devs: Iterable[_Device]) -> None:
        """Raise unless the link is up and Zigbee2MQTT does not say a device is offline."""
        if not self.link.connected:
            self.link.wait_connected(self.timing.connect_wait_s)
        if not self.link.connected:
            raise self._link_error()
        with self._cond:
            if self._bridge_online is False:
                raise DeviceOfflineError(f"Zigbee2MQTT ({self.topics.bridge_state}) is "
                                         "offline: the bridge is down")
            offline = [d.name for d in devs if d.available is False]
        if offline:
            raise DeviceOfflineError(f"{', '.join(offline)}: offline (Zigbee2MQTT "
                                     "availability)")

    def _link_error(self) -> DriverError:
        return LinkDownError(self.link.health().detail)

    @contextmanager
    def _io(self) -> Iterator[None]:
        """Record the outcome of one operation for ``health()``.

        Not :meth:`HealthTracker.track`: the bridge answering proves nothing about a
        lock, so only a device's own report sets ``last_ok_at`` (in ``_on_message``),
        and an operation that worked keeps the last error for ``health()`` to show.
        """
        try:
            yield
        except TechnicianError as exc:
            self._health.last_error = str(exc)
            raise
        except DriverError as exc:
            self._health.failed(str(exc))
            raise
        self._health.failures = 0

    def health(self) -> Health:
        """Link, bridge and devices as last observed (no I/O)."""
        h = self._health
        link = self.link.health()
        if not link.online:
            return Health(False, link.detail, link.last_error, h.last_ok_at,
                          max(h.failures, link.consecutive_failures))
        with self._cond:
            problems = []
            if self._bridge_online is False:
                problems.append("Zigbee2MQTT bridge offline")
            for dev in self._devices.values():
                if dev.available is False:
                    problems.append(f"{dev.name}: offline (Zigbee2MQTT availability)")
                elif dev.unresponsive:
                    problems.append(f"{dev.name}: {dev.unresponsive}")
        if problems:
            detail = "; ".join(problems)
            return Health(False, detail, h.last_error or detail, h.last_ok_at,
                          max(h.failures, 1))
        if h.failures:
            return h.health(False, h.last_error or "failing")
        return h.health(True, "ok")

    def probe(self) -> Health:
        """Ask every known device for its state once (/get) and return the health."""
        points = [LockPoint(0, device=name) for name in self._devices]
        try:
            self.read_many(points, force=True)
        except DriverError as exc:
            LOGGER.debug("%s: probe failed: %s", self.name, exc)
        return self.health()

    @property
    def self_relocking(self) -> bool:
        """True when every known device reported ``auto_relock: true``."""
        with self._cond:
            devs = list(self._devices.values())
        return bool(devs) and all(d.auto_relock is True for d in devs)

    def notices(self) -> list[Notice]:
        """Battery-low notices since the last call."""
        with self._cond:
            out = list(self._notices)
            self._notices.clear()
        return out

    def battery(self, device: str) -> float | None:
        """The last battery level reported by ``device`` (%), if any."""
        dev = self._devices.get(device)
        return None if dev is None else dev.battery

    def close(self) -> None:
        """Stop waiting and let go of the link (closed with its last user)."""
        if self._closed:
            return
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self.link.release()


def _reading(report: Report, at: float) -> Reading:
    return Reading(report.lock, report.door, at)


def build(settings: ControllerSettings, ctx: BuildContext) -> Controller:
    """A Zigbee2MQTT bridge (:mod:`drivers.registry`): its own MQTT connection and
    account, shared per broker."""
    assert isinstance(settings, Zigbee2MqttSettings)
    broker: BrokerSettings = ctx.broker("z2m")
    key = ("zigbee2mqtt", f"{broker.where}:{broker.username or ''}")
    if key not in ctx.shared:
        ctx.shared[key] = BridgeLink(broker)
    link = ctx.shared[key]
    assert isinstance(link, BridgeLink)
    devices = [p.device for p in ctx.points if p.device is not None]
    return Zigbee2MqttController(ctx.name, link, settings.base_topic or "zigbee2mqtt", devices)
