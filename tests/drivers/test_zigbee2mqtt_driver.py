"""The ``zigbee2mqtt`` driver: payloads (hypothesis), then the controller against the
simulated bridge on a real Mosquitto, then through the gateway (builder, notices).

Timings are shrunk (``FAST``) rather than slept; every wait is bounded.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from devkit.broker_client import Client
from devkit.mosquitto import Broker
from devkit.sims.zigbee2mqtt import SimFaults, SimLock, Zigbee2MqttSim
from devkit.testing import AgentToml, returns_within, wait_for
from devkit.tls_files import make_tls_files
from drivers.base import DoorState, LockPoint, LockState
from drivers.errors import LinkDownError, NoReplyError
from drivers.zigbee2mqtt import (
    BridgeLink,
    BrokerSettings,
    DeviceOfflineError,
    Z2MTiming,
    Zigbee2MqttController,
)
from drivers.zigbee2mqtt.messages import (
    PayloadError,
    Report,
    Topics,
    check_friendly_name,
    decode_availability,
    decode_command,
    decode_report,
    encode_availability,
    encode_get,
    encode_set,
)

pytestmark = pytest.mark.simulator_only

FAST = Z2MTiming(report_timeout_s=0.25, get_timeout_s=0.2, connect_wait_s=0.3,
                 retry_initial_s=5.0)
A, B = "site/A-101", "B-102"
PA, PB = LockPoint(0, device=A), LockPoint(0, device=B)


# --------------------------------------------------------------------------- messages

lock_states = st.sampled_from(["locked", "unlocked", "not_fully_locked"])
reports = st.builds(
    Report,
    state=st.none() | st.sampled_from(["LOCK", "UNLOCK"]),
    lock_state=st.none() | lock_states,
    battery=st.none() | st.integers(0, 100).map(float),
    battery_low=st.none() | st.booleans(),
    door_state=st.none() | st.sampled_from(["open", "closed"]),
    auto_relock=st.none() | st.booleans(),
)


@given(reports)
def test_a_report_survives_encoding(report: Report) -> None:
    assert decode_report(report.encode()) == report


@given(st.binary(max_size=200))
def test_decoding_garbage_raises_only_payload_error(data: bytes) -> None:
    try:
        report = decode_report(data)
    except PayloadError:
        return
    assert report.lock in set(LockState)


@given(st.dictionaries(st.text(max_size=12), st.none() | st.booleans() | st.integers()
                       | st.floats() | st.text(max_size=12), max_size=8))
def test_wrongly_typed_values_are_ignored_not_trusted(obj: dict[str, object]) -> None:
    report = decode_report(json.dumps(obj).encode())
    if not isinstance(obj.get("state"), str) and not isinstance(obj.get("lock_state"), str):
        assert report.lock is LockState.UNKNOWN
    assert report.battery is None or 0 <= report.battery <= 100


@given(st.binary(max_size=100))
def test_availability_never_raises(data: bytes) -> None:
    assert decode_availability(data) in (True, False, None)


@given(st.booleans(), st.booleans())
def test_availability_both_formats(online: bool, legacy: bool) -> None:
    assert decode_availability(encode_availability(online, legacy=legacy)) is online


@given(st.booleans())
def test_set_and_get_payloads_are_zigbee2mqtts(locked: bool) -> None:
    assert json.loads(encode_set(locked)) == {"state": "LOCK" if locked else "UNLOCK"}
    assert decode_command(encode_set(locked), get=False).state == ("LOCK" if locked
                                                                   else "UNLOCK")
    assert json.loads(encode_get()) == {"state": ""}
    assert decode_command(encode_get(), get=True).read


def test_lock_state_wins_over_state_and_half_locked_is_unknown() -> None:
    assert decode_report(b'{"state":"UNLOCK","lock_state":"not_fully_locked"}').lock \
        is LockState.UNKNOWN
    assert decode_report(b'{"state":"LOCK"}').lock is LockState.LOCKED
    assert decode_report(b'{"state":"UNLOCK","lock_state":"unlocked"}').lock \
        is LockState.UNLOCKED
    assert decode_report(b'{"battery":50,"linkquality":90}').has_lock is False
    assert decode_report(b'{"door_state":"open","state":"LOCK"}').door is DoorState.OPEN
    assert decode_report(b'{"battery":true}').battery is None
    assert decode_availability(b"") is None
    assert decode_availability(b'{"state":"online"}') is True
    assert decode_availability(b"offline") is False


def test_friendly_names_and_topics() -> None:
    assert Topics("z2m").set("site/A-1") == "z2m/site/A-1/set"
    assert Topics().bridge_state == "zigbee2mqtt/bridge/state"
    check_friendly_name("site/A-1")
    for bad in ("", "a/+", "#", "/a", "a/", "a//b", "x/set", "bridge", "bridge/state"):
        with pytest.raises(ValueError, match="friendly name"):
            check_friendly_name(bad)


# --------------------------------------------------------------------------- on a broker


class Bench:
    """A broker, a simulated bridge with locks A and B, and a controller."""

    def __init__(self, broker: Broker, sim: Zigbee2MqttSim,
                 timing: Z2MTiming = FAST) -> None:
        self.broker = broker
        self.sim = sim
        self.link = BridgeLink(BrokerSettings(broker.host, broker.port, "gw-test-z2m",
                                              backoff_initial_s=0.2, backoff_max_s=0.5))
        self.ctl = Zigbee2MqttController("zb", self.link, "zb", [A, B], timing=timing)
        assert self.link.wait_connected(5)

    def close(self) -> None:
        self.ctl.close()
        self.sim.close()


def make_bench(broker: Broker, *locks: SimLock, timing: Z2MTiming = FAST,
               **sim_kw: object) -> Bench:
    devices = list(locks) or [SimLock(A), SimLock(B)]
    sim = Zigbee2MqttSim(broker.host, broker.port, devices, base_topic="zb",
                         report_delay_s=0.01, **sim_kw).start()  # type: ignore[arg-type]
    return Bench(broker, sim, timing)


@pytest.fixture
def bench(broker: Broker) -> Iterator[Bench]:
    b = make_bench(broker)
    yield b
    b.close()


def test_unlock_and_lock_are_confirmed_by_a_report_after_the_command(bench: Bench) -> None:
    t0 = time.monotonic()
    result = bench.ctl.unlock(PA, 5)
    assert result.confirmed, result
    assert result.reading.lock is LockState.UNLOCKED
    assert result.reading.at > t0
    assert not result.self_relocking
    assert "agent relocks" in result.detail
    assert bench.sim.unlocked(A)
    assert not bench.sim.unlocked(B)
    assert bench.ctl.lock(PA).confirmed
    assert not bench.sim.unlocked(A)
    assert bench.ctl.stats.confirmed_by_report == 2
    assert bench.ctl.stats.readbacks == 0
    assert bench.ctl.health().online


def test_a_cached_report_never_confirms_a_command(bench: Bench) -> None:
    """The cache already says "unlocked"; the device hears nothing: not confirmed."""
    assert bench.ctl.unlock(PA, 5).confirmed
    assert bench.ctl.read(PA).lock is LockState.UNLOCKED  # fresh in the cache
    bench.sim.faults.silent = True
    result = bench.ctl.unlock(PA, 5)
    assert not result.confirmed
    assert result.reading.lock is LockState.UNKNOWN
    assert "no state report" in result.detail
    assert not bench.ctl.health().online
    assert bench.sim.counters.gets == 1  # the /get read-back went out


def test_a_retained_state_message_proves_nothing(bench: Bench) -> None:
    bench.sim.faults.silent = True
    with Client(bench.broker) as other:  # a stale retained copy of the device's state
        other.publish(Topics("zb").state(A), b'{"state":"UNLOCK","lock_state":"unlocked"}',
                      retain=True)
        link = BridgeLink(BrokerSettings(bench.broker.host, bench.broker.port, "gw-late"))
        late = Zigbee2MqttController("late", link, "zb", [A], timing=FAST)
        try:
            assert link.wait_connected(5)
            wait_for(lambda: late.stats.stale_ignored == 1)
            with pytest.raises(NoReplyError):
                late.read(PA)
            assert not late.unlock(PA, 5).confirmed
        finally:
            late.close()
            other.publish(Topics("zb").state(A), b"", retain=True)


def test_a_missing_report_is_recovered_through_get(bench: Bench) -> None:
    bench.sim.faults.skip_report_p = 1.0
    result = bench.ctl.unlock(PA, 5)
    assert result.confirmed
    assert "/get" in result.detail
    assert bench.ctl.stats.recovered_by_get == 1
    assert bench.sim.counters.reports_skipped == 1


def test_a_dropped_command_is_not_confirmed(bench: Bench) -> None:
    bench.sim.faults.drop_p = 1.0
    result = bench.ctl.unlock(PA, 5)
    assert not result.confirmed
    assert result.reading.lock is LockState.LOCKED  # the /get answer: it did not move
    assert "read-back shows locked" in result.detail
    assert bench.ctl.health().online  # it answered: the device is fine, the lock is not


def test_a_jammed_lock_reports_not_fully_locked_and_is_not_confirmed(broker: Broker) -> None:
    b = make_bench(broker, SimLock(A, locked=False, jammed=True), SimLock(B))
    try:
        result = b.ctl.lock(PA)
        assert not result.confirmed
        assert result.reading.lock is LockState.UNKNOWN
        assert b.ctl.stats.readbacks == 1
    finally:
        b.close()


def test_acceptance_drops_delays_and_skips(broker: Broker) -> None:
    """Issue 6: never confirmed without a fresh report; recovery through /get."""
    faults = SimFaults(drop_p=0.15, skip_report_p=0.2, delay_p=0.2, delay_s=0.3)
    b = make_bench(broker, faults=faults, seed=6)
    cycles = 60
    without_fresh = 0
    untrue = 0
    try:
        for i in range(cycles):
            point, name = (PA, A) if i % 4 < 2 else (PB, B)
            want_unlocked = i % 2 == 0
            t0 = time.monotonic()
            result = (b.ctl.unlock(point, 5) if want_unlocked else b.ctl.lock(point))
            if not result.confirmed:
                continue
            want = "unlocked" if want_unlocked else "locked"
            fresh = [r for r in b.sim.counters.reports
                     if r.device == name and t0 < r.at <= result.reading.at
                     and r.lock_state == want]
            without_fresh += not fresh
            untrue += b.sim.unlocked(name) != want_unlocked
        stats, sim = b.ctl.stats, b.sim.counters
        figures = {
            "actions": cycles, "dropped": sim.commands_dropped,
            "reports_skipped": sim.reports_skipped, "reports_delayed": sim.reports_delayed,
            "confirmed_by_report": stats.confirmed_by_report,
            "recovered_by_get": stats.recovered_by_get,
            "not_confirmed": stats.not_confirmed,
            "confirmed_without_fresh_report": without_fresh,
        }
        print("zigbee2mqtt acceptance:", json.dumps(figures))
        assert without_fresh == 0
        assert untrue == 0
        assert sim.commands == cycles
        assert sim.commands_dropped > 0
        assert sim.reports_skipped > 0
        assert sim.reports_delayed > 0
        assert stats.recovered_by_get > 0
        assert stats.not_confirmed > 0
        assert stats.confirmed_by_report + stats.recovered_by_get + stats.not_confirmed \
            == cycles
    finally:
        b.close()


def test_read_uses_a_fresh_report_and_asks_when_it_is_old(broker: Broker) -> None:
    b = make_bench(broker, timing=Z2MTiming(report_timeout_s=0.25, get_timeout_s=0.2,
                                            max_report_age_s=0.3))
    try:
        assert b.ctl.read(PA).lock is LockState.LOCKED  # nothing cached: /get
        assert b.sim.counters.gets == 1
        assert b.ctl.read(PA).lock is LockState.LOCKED  # fresh: no radio traffic
        assert b.sim.counters.gets == 1
        b.sim.drift(A, unlocked=True)  # the device reports the change itself
        wait_for(lambda: b.ctl.read(PA).lock is LockState.UNLOCKED)
        assert b.sim.counters.gets == 1
        time.sleep(0.35)
        assert [r.lock for r in b.ctl.read_many([PA, PB])] == [LockState.UNLOCKED,
                                                               LockState.LOCKED]
        assert b.sim.counters.gets == 3
    finally:
        b.close()


def test_offline_device_and_bridge(bench: Bench) -> None:
    assert bench.ctl.read(PB).lock is LockState.LOCKED
    gets = bench.sim.counters.gets
    bench.sim.set_online(False, [B])
    wait_for(lambda: not bench.ctl.health().online)
    health = bench.ctl.health()
    assert B in health.detail
    assert "offline" in health.detail
    t0 = time.monotonic()
    with pytest.raises(DeviceOfflineError, match=B):
        bench.ctl.read(PB)
    with pytest.raises(DeviceOfflineError):
        bench.ctl.unlock(PB, 5)
    with pytest.raises(DeviceOfflineError):  # one offline lock: no made-up reading
        bench.ctl.read_many([PA, PB])
    assert time.monotonic() - t0 < 0.5  # no timeouts waited, no radio traffic
    assert bench.sim.counters.gets == gets
    assert bench.sim.counters.commands == 0
    result = bench.ctl.lock(PB)  # securing a door is still tried (and not confirmed)
    assert not result.confirmed
    assert bench.sim.counters.commands_ignored == 1
    assert bench.ctl.read(PA).lock is LockState.LOCKED
    bench.sim.set_online(True, [B])
    wait_for(lambda: bench.ctl.health().online)
    before = bench.sim.counters.gets
    assert bench.ctl.read(PB).lock is LockState.LOCKED  # asked again: cache was dropped
    assert bench.sim.counters.gets == before + 1

    bench.sim.set_bridge_online(False)
    wait_for(lambda: "bridge" in bench.ctl.health().detail)
    with pytest.raises(DeviceOfflineError, match="bridge"):
        bench.ctl.read(PA)
    bench.sim.set_bridge_online(True)
    wait_for(lambda: bench.ctl.health().online)
    assert bench.ctl.unlock(PA, 5).confirmed


def test_legacy_availability_payloads(broker: Broker) -> None:
    b = make_bench(broker, legacy_availability=True)
    try:
        b.sim.set_online(False, [A])
        wait_for(lambda: not b.ctl.health().online)
        with pytest.raises(DeviceOfflineError):
            b.ctl.read(PA)
    finally:
        b.close()


def test_an_unresponsive_device_is_not_asked_at_every_read(bench: Bench) -> None:
    bench.sim.faults.silent = True
    with pytest.raises(NoReplyError, match="no state report"):
        bench.ctl.read(PA)
    gets = bench.sim.counters.gets
    t0 = time.monotonic()
    with pytest.raises(NoReplyError, match="asked again in"):
        bench.ctl.read(PA)
    assert time.monotonic() - t0 < FAST.get_timeout_s  # no reply waited for
    assert bench.sim.counters.gets == gets
    bench.sim.faults.silent = False
    bench.sim.drift(A, unlocked=False)  # it is heard again
    wait_for(lambda: bench.ctl.health().online)
    assert bench.ctl.read(PA).lock is LockState.LOCKED


def test_battery_low_is_noticed_once_until_replaced(bench: Bench) -> None:
    assert bench.ctl.notices() == []
    bench.sim.set_battery(A, 15)
    wait_for(lambda: bench.ctl.battery(A) == 15)
    notices = bench.ctl.notices()
    assert [(n.kind, n.device) for n in notices] == [("battery_low", A)]
    assert "15 %" in notices[0].detail
    bench.sim.set_battery(A, 14)
    wait_for(lambda: bench.ctl.battery(A) == 14)
    assert bench.ctl.notices() == []
    bench.sim.set_battery(A, 100)  # replaced
    wait_for(lambda: bench.ctl.battery(A) == 100)
    assert bench.ctl.notices() == []
    bench.sim.set_battery(A, 12)
    wait_for(lambda: bench.ctl.battery(A) == 12)
    assert [n.kind for n in bench.ctl.notices()] == ["battery_low"]


def test_a_self_relocking_lock(broker: Broker) -> None:
    b = make_bench(broker, SimLock(A, relock_after_s=0.3), SimLock(B, relock_after_s=0.3))
    try:
        result = b.ctl.unlock(PA, 5)
        assert result.confirmed
        assert result.self_relocking
        wait_for(lambda: b.ctl.read(PA).lock is LockState.LOCKED, 3)
        assert not b.sim.unlocked(A)
        assert b.ctl.read(PB).lock is LockState.LOCKED  # B reported auto_relock too
        assert b.ctl.self_relocking
    finally:
        b.close()


def test_broker_loss_fails_fast_sends_nothing_late_and_recovers(bench: Bench) -> None:
    assert bench.ctl.unlock(PA, 5).confirmed
    bench.broker.kill()
    wait_for(lambda: not bench.link.connected)
    with pytest.raises(LinkDownError):
        # Fails after connect_wait_s, not the 5 s retry: back within half of that.
        returns_within(FAST.retry_initial_s / 2, lambda: bench.ctl.lock(PA), "a lock")
    with pytest.raises(LinkDownError):
        # The cache was dropped with the link.
        returns_within(FAST.retry_initial_s / 2, lambda: bench.ctl.read(PA), "a read")
    assert not bench.ctl.health().online
    commands = bench.sim.counters.commands
    bench.broker.start()
    wait_for(lambda: bench.link.connected, 10)
    wait_for(lambda: bench.sim.connected, 10)
    time.sleep(0.2)
    assert bench.sim.counters.commands == commands  # the refused lock never went out
    assert bench.sim.unlocked(A)
    assert bench.ctl.lock(PA).confirmed  # subscriptions restored
    assert bench.link.connects == 2


# --------------------------------------------------------------------------- gateway


def write_config(directory: Path, mqtt: str, controller: str, device: str) -> Path:
    """A gateway config with ``[mqtt]`` lines ``mqtt`` and one zigbee2mqtt lock."""
    return AgentToml(
        directory,
        site={"id": "site_z", "app_name": "Z"},
        mqtt=mqtt,
        stora={"base_url": "http://127.0.0.1:9/2025-09", "auth": "static",
               "token_file": directory / "token", "timeline_source_id": "tsrc_z"},
        storage={"path": directory / "gateway.db"},
        control={"socket": directory / "control.sock"},
        controllers=[f'name = "zb"\ndriver = "zigbee2mqtt"\n{controller}'],
        locks=[{"unit": "unit_gate", "reference": "GATE", "controller": "zb", "device": device}],
        token="t\n",
    ).write()


def test_a_lock_on_a_second_broker_through_the_gateway(tmp_path: Path, broker: Broker) -> None:
    """[mqtt] on one broker, the bridge on another (host/port): builder, reconciliation,
    and the battery notice published as an alarm."""
    from gateway.config import load_config
    from gateway.store import Store
    from gateway.units.hardware import build_site, point_of
    from gateway.units.manager import UnitManager

    with Broker(tmp_path / "lan") as lan:
        sim = Zigbee2MqttSim(lan.host, lan.port, [SimLock("yard/gate")], report_delay_s=0.01)
        sim.start()
        config = load_config(write_config(
            tmp_path, f'host = "{broker.host}"\nport = {broker.port}',
            f'host = "{lan.host}"\nport = {lan.port}', "yard/gate"))
        site = build_site(config)
        store = Store(config.storage.path)
        alarms: list[tuple[str, str | None, str]] = []
        units = UnitManager(config, site, store, now=time.time, publish_unit=lambda u, s: None,
                            alarm=lambda k, u, d: alarms.append((k, u, d)))
        try:
            controller = site.controllers["zb"]
            assert isinstance(controller, Zigbee2MqttController)
            assert controller.link.settings.port == lan.port
            lock = config.locks[0]
            assert controller.unlock(point_of(lock), 3).confirmed
            assert sim.unlocked("yard/gate")
            sim.set_battery("yard/gate", 9)
            wait_for(lambda: controller.battery("yard/gate") == 9)
            units.reconcile()
            assert [(k, u) for k, u, _ in alarms] == [("battery_low", "unit_gate")]
            assert "zb: yard/gate: battery 9 %" in alarms[0][2]
            units.reconcile()
            assert len(alarms) == 1  # once, not every pass
        finally:
            units.stop()
            site.close()
            store.close()
            sim.close()
        assert not controller.link._thread or not controller.link._thread.is_alive()


def test_on_the_mqtt_broker_with_its_own_account_and_the_agent_s_tls(tmp_path: Path) -> None:
    """No host/port: the [mqtt] broker, with [mqtt]'s CA but the controller's own user
    and password file (a broker that binds client ids to accounts gives the agent's
    account one connection)."""
    from gateway.config import load_config
    from gateway.units.hardware import build_site

    tls = make_tls_files(tmp_path / "tls", hostname="localhost")
    password = tmp_path / "password"
    password.write_text("s3cret\n")
    password.chmod(0o600)
    link_password = tmp_path / "z2m-password"
    link_password.write_text("l1nk-s3cret\n")
    link_password.chmod(0o600)
    users = {"gw": "s3cret", "gw-z2m": "l1nk-s3cret", "z2m": "z"}
    with Broker(tmp_path / "broker", tls=tls, users=users) as broker:
        config = load_config(write_config(
            tmp_path, f'host = "localhost"\nport = {broker.port}\nusername = "gw"\n'
                      f'password_file = "{password}"\ntls = true\nca_file = "{tls.ca}"',
            f'base_topic = "z2m"\nusername = "gw-z2m"\npassword_file = "{link_password}"',
            "gate"))
        site = build_site(config)
        try:
            controller = site.controllers["zb"]
            assert isinstance(controller, Zigbee2MqttController)
            assert controller.link.wait_connected(10), controller.health()
            with Client(broker, tls=tls, host="localhost", username="z2m",
                        password="z") as bridge:
                bridge.publish("z2m/gate", b'{"state":"LOCK","lock_state":"locked"}', qos=0)
                wait_for(lambda: controller.stats.reports == 1)
            assert controller.read(LockPoint(0, device="gate")).lock is LockState.LOCKED
            assert controller.link.settings.username == "gw-z2m"
            assert "s3cret" not in repr(controller.link.settings)
        finally:
            site.close()


@pytest.mark.parametrize(("mqtt", "controller", "complaint"), [
    # On the [mqtt] broker without an account of its own: it used to borrow the agent's.
    ('username = "site_z"', "", "controllers[0].username: required for a zigbee2mqtt "
                                "controller on the [mqtt] broker"),
    ('username = "site_z"', 'username = "site_z"', "controllers[0].username: must differ "
                                                   "from mqtt.username 'site_z'"),
    # host/port naming the [mqtt] broker itself is still that broker.
    ('username = "site_z"\nport = 1884',
     'host = "127.0.0.1"\nport = 1884\nusername = "site_z"',
     "controllers[0].username: must differ"),
    ('host = "/run/stora-mqtt/mqtt.sock"\nusername = "site_z"',
     'host = "/run/stora-mqtt/mqtt.sock"\nusername = "site_z"',
     "controllers[0].username: must differ"),
    ('username = "site_z"', 'username = "gw-zigbee2mqtt"', None),
    # Another broker, or a broker without accounts (the demo, tests): not the agent's.
    ('username = "site_z"', 'host = "10.0.0.9"\nusername = "site_z"', None),
    ("", "", None),
])
def test_check_config_refuses_a_link_that_would_share_the_agent_s_account(
        tmp_path: Path, mqtt: str, controller: str, complaint: str | None) -> None:
    """The shipped brokers give one account one connection (use_username_as_clientid),
    so a zigbee2mqtt link logged in as the agent would disconnect it, and it the link,
    forever.  check-config says so in one line naming the key."""
    import io

    from gateway.cli.main import main

    path = write_config(tmp_path, mqtt, controller, "gate")
    out, err = io.StringIO(), io.StringIO()
    status = main(["check-config", "--config", str(path)], out=out, err=err)
    if complaint is None:
        assert status == 0, err.getvalue()
        return
    assert status == 2
    message = err.getvalue().strip()
    assert len(message.splitlines()) == 1, message
    assert complaint in message, message
    assert "Traceback" not in message
