"""The ``tasmota`` driver: its messages, the controller against a simulated device on a
real Mosquitto, and an agent killed with ``kill -9`` during an unlock (fault matrix #32).

Guarantees tested: an unlock is confirmed only by a report the device sent after the
command; a strike's unlock is ended by the device itself (``PulseTime``), even when the
agent dies halfway; nothing is switched when the pulse was not confirmed; settings that
would make a lock unsafe are refused; LWT Offline means offline.
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
from devkit.sims.tasmota import TasmotaDevice, TasmotaSim
from devkit.site import PREFIX, AgentProcess, make_site
from devkit.testing import wait_for
from drivers.base import DoorState, LockPoint, LockState
from drivers.errors import LinkDownError, NoReplyError, UnsupportedError
from drivers.tasmota import (
    BrokerSettings,
    ClientTiming,
    TasmotaClient,
    TasmotaController,
    TasmotaTiming,
)
from drivers.tasmota import messages as m

TOPIC = "unit_relay"
#: Shrunk timings: the simulator answers in about a millisecond.
TIMING = TasmotaTiming(reply_timeout_s=0.4, connect_wait_s=1.0)


# --------------------------------------------------------------------------- messages


@pytest.mark.parametrize(("seconds", "value"), [
    (0.1, 1), (0.25, 3), (1, 10), (3.0, 30), (11.1, 111), (11.15, 112), (12, 112),
    (13, 113), (360, 460), (64800, 64900),
])
def test_pulse_value_follows_the_tasmota_docs(seconds: float, value: int) -> None:
    # Commands → PulseTime: "PulseTime 113 = 13 seconds and PulseTime 460 = 6 minutes".
    assert m.pulse_value(seconds) == value


@pytest.mark.parametrize("seconds", [0, -1, 64800.5, float("nan"), float("inf")])
def test_pulse_value_refuses_what_tasmota_cannot_time(seconds: float) -> None:
    with pytest.raises(ValueError):
        m.pulse_value(seconds)


@given(st.floats(min_value=0.01, max_value=64800))
def test_a_pulse_is_never_shorter_and_at_most_one_step_longer(seconds: float) -> None:
    value = m.pulse_value(seconds)
    assert 1 <= value <= m.PULSE_VALUE_MAX
    length = m.pulse_seconds(value)
    step = 0.1 if value <= m.PULSE_TENTHS_MAX else 1.0
    assert seconds - 1e-9 <= length < seconds + step + 1e-9


@given(st.integers(min_value=1, max_value=m.PULSE_VALUE_MAX))
def test_pulse_values_round_trip(value: int) -> None:
    assert m.pulse_value(m.pulse_seconds(value)) == value


def test_commands_are_tasmotas() -> None:
    assert (m.power(2, True).topic("door"), m.power(2, True).encode()) == \
        ("cmnd/door/POWER2", b"ON")
    assert m.power(1, False).encode() == b"OFF"
    assert m.power(1, None).encode() == b""  # an empty payload is a query
    assert (m.pulse_time(1, 30).topic("door"), m.pulse_time(1, 30).encode()) == \
        ("cmnd/door/PulseTime1", b"30")
    assert m.sensor_status().encode() == b"10"
    with pytest.raises(ValueError):
        m.power(0, True)
    with pytest.raises(ValueError):
        m.check_topic("a/b")


@pytest.mark.parametrize(("topic", "payload", "reports"), [
    ("tele/d/LWT", b"Online", [m.Availability(True)]),
    ("tele/d/LWT", b"Offline", [m.Availability(False)]),
    ("stat/d/POWER", b"ON", [m.PowerReport(1, True)]),  # a one-relay device
    ("stat/d/POWER2", b"OFF", [m.PowerReport(2, False)]),
    ("stat/d/RESULT", b'{"POWER1":"ON"}', [m.PowerReport(1, True)]),
    ("stat/d/RESULT", b'{"PulseTime1":{"Set":30,"Remaining":29}}', [m.PulseReport(1, 30, 29)]),
    ("stat/d/RESULT", b'{"Switch1":{"Action":"ON"}}', [m.SwitchReport(1, True)]),
    ("stat/d/RESULT", b'{"Switch1":{"Action":"HOLD"}}', []),
    ("stat/d/RESULT", b'{"PowerOnState":3}', [m.SettingReport("PowerOnState", "3")]),
    ("stat/d/RESULT", b'{"SetOption114":"ON"}', [m.SettingReport("SetOption114", "ON")]),
    ("stat/d/RESULT", b'{"SwitchMode2":15}', [m.SettingReport("SwitchMode2", "15")]),
    ("stat/d/STATUS10", b'{"StatusSNS":{"Time":"2026-11-29T09:41:00","Switch1":"ON",'
                        b'"Switch2":"OFF"}}', [m.SwitchReport(1, True), m.SwitchReport(2, False)]),
    ("tele/d/SENSOR", b'{"Time":"2026-11-29T09:41:28","Switch1":"OFF"}',
     [m.SwitchReport(1, False)]),
    ("tele/d/STATE", b'{"Time":"2026-11-29T09:41:28","Uptime":"0T00:10:00","POWER1":"ON",'
                     b'"POWER2":"OFF"}', [m.PowerReport(1, True), m.PowerReport(2, False)]),
    ("tele/d/INFO1", b'{"Info1":{"Module":"Generic"}}', []),
    # SetOption4 1: answers on stat/<topic>/<COMMAND> instead of RESULT
    ("stat/d/PULSETIME1", b'{"PulseTime1":{"Set":3,"Remaining":0}}', [m.PulseReport(1, 3, 0)]),
    ("stat/d/POWER1", b'{"POWER1":"ON"}', [m.PowerReport(1, True)]),
])
def test_decode_reads_what_tasmota_publishes(topic: str, payload: bytes,
                                             reports: list[m.Report]) -> None:
    parts = m.split_topic(topic)
    assert parts is not None
    assert m.decode(parts[0], parts[2], payload) == reports


@pytest.mark.parametrize(("name", "payload"), [
    ("POWER1", b"MAYBE"), ("RESULT", b"not json"), ("RESULT", b"[1]"),
    ("RESULT", b'{"PulseTime1":{"Set":"x","Remaining":0}}'), ("RESULT", b'{"POWER40":"ON"}'),
    ("POWER1", b"\xff"),
])
def test_decode_refuses_what_tasmota_would_not_send(name: str, payload: bytes) -> None:
    with pytest.raises(m.MessageError):
        m.decode("stat", name, payload)


@given(st.sampled_from(["stat", "tele"]),
       st.sampled_from(["POWER", "POWER1", "RESULT", "STATUS10", "SENSOR", "STATE", "LWT",
                        "PulseTime1", "X"]),
       st.one_of(st.binary(max_size=80), st.recursive(
           st.none() | st.booleans() | st.integers() | st.text(max_size=8),
           lambda inner: st.lists(inner, max_size=3)
           | st.dictionaries(st.sampled_from(["POWER1", "Switch1", "PulseTime2", "Set",
                                              "Remaining", "Action", "StatusSNS", "x"]),
                             inner, max_size=4), max_leaves=8).map(
           lambda v: json.dumps(v).encode())))
def test_decode_raises_only_message_error(prefix: str, name: str, payload: bytes) -> None:
    try:
        reports = m.decode(prefix, name, payload)
    except m.MessageError:
        return
    assert isinstance(reports, list)


@given(st.lists(st.tuples(st.integers(1, 3), st.sampled_from(["ON", "OFF", "", "TOGGLE"])),
                max_size=12))
def test_device_reports_decode_to_the_device_state(steps: list[tuple[int, str]]) -> None:
    """What the simulated device publishes (built from messages.py) decodes to its state."""
    published: list[m.Report] = []
    device = TasmotaDevice(3, publish=lambda p: published.extend(m.decode(p[0], p[1], p[2])))
    for relay, word in steps:
        device.command(f"POWER{relay}", word)
        assert published[-1] == m.PowerReport(relay, device.relay(relay))
    device.close()


# --------------------------------------------------------------------------- against the sim


class Rig:
    def __init__(self, broker: Broker, sim: TasmotaSim, channels: int = 2,
                 inputs: int = 2) -> None:
        self.broker = broker
        self.sim = sim
        self.client = TasmotaClient(BrokerSettings(broker.host, broker.port, "gw-tasmota"),
                                    timing=ClientTiming(backoff_initial_s=0.1,
                                                        backoff_max_s=0.5))
        self.ctl = TasmotaController("t1", self.client, sim.topic, channels, inputs,
                                     timing=TIMING)

    def close(self) -> None:
        self.ctl.close()
        self.sim.close()


@pytest.fixture
def rig(broker: Broker) -> Iterator[Rig]:
    r = Rig(broker, TasmotaSim(broker.host, broker.port, TOPIC, relays=2, switches=2).start())
    yield r
    r.close()


STRIKE = LockPoint(channel=0, door_input=0)
MAGLOCK = LockPoint(channel=1, energize_to="lock")


def test_unlock_sets_the_pulse_first_and_the_device_relocks_by_itself(rig: Rig) -> None:
    started = time.monotonic()
    result = rig.ctl.unlock(STRIKE, 0.3)
    took = time.monotonic() - started
    assert result.confirmed
    assert result.self_relocking
    assert result.reading.lock is LockState.UNLOCKED
    assert "PulseTime1 3" in result.detail
    sent = [c for c in rig.sim.device.commands if c[0] in ("PulseTime1", "POWER1")]
    assert sent == [("PulseTime1", "3"), ("POWER1", "ON")]
    # PulseTime1 3 is 0.3 s: ended by the device well before a misread 3 s, with nothing
    # more sent by the driver, and not before its 0.3 s.
    wait_for(lambda: not rig.sim.device.relay(1), 2, "the device ended the pulse")
    assert [c for c in rig.sim.device.commands if c[0] in ("PulseTime1", "POWER1")] == sent
    on_at, off_at = rig.sim.device.logs[0].last_on_period() or (0.0, None)
    assert off_at is not None
    assert off_at - on_at >= 0.3
    assert rig.ctl.read(STRIKE).lock is LockState.LOCKED
    print(f"tasmota unlock → confirmed in {took * 1000:.1f} ms (PulseTime, POWER1, report)")


def test_lock_ends_a_long_pulse_and_seconds_are_encoded_above_11_s(rig: Rig) -> None:
    assert rig.ctl.unlock(STRIKE, 12).confirmed
    assert rig.sim.device.pulse[0] == 112
    result = rig.ctl.lock(STRIKE)
    assert result.confirmed
    assert result.reading.lock is LockState.LOCKED
    assert not rig.sim.device.relay(1)


def test_a_one_relay_device_reporting_plain_power_is_understood(broker: Broker) -> None:
    r = Rig(broker, TasmotaSim(broker.host, broker.port, "single", relays=1).start(),
            channels=1, inputs=0)
    try:
        point = LockPoint(channel=0)
        assert r.ctl.unlock(point, 0.5).confirmed
        assert r.ctl.read(point).lock is LockState.UNLOCKED
        assert r.ctl.lock(point).confirmed
    finally:
        r.close()


def test_lost_power_commands_are_queried_once_then_not_confirmed(rig: Rig) -> None:
    rig.sim.drop_commands = True
    result = rig.ctl.unlock(STRIKE, 5)
    assert not result.confirmed
    assert result.attempts == 2  # POWER1 ON, then the query
    assert result.reading.lock is LockState.LOCKED
    assert rig.sim.device.commands[-1] == ("POWER1", "")
    assert "reports POWER1 OFF" in result.detail


def test_a_report_from_before_the_command_never_confirms_it(rig: Rig) -> None:
    rig.sim.silent = True
    with Client(rig.broker) as other:  # e.g. a report that was still on its way
        other.publish(f"stat/{TOPIC}/POWER1", "OFF")
        other.publish(f"stat/{TOPIC}/RESULT", '{"POWER1":"OFF"}')
    time.sleep(0.05)
    result = rig.ctl.lock(STRIKE)
    assert not result.confirmed
    assert result.reading.lock is LockState.UNKNOWN


def test_a_silent_device_gets_no_unlock(rig: Rig) -> None:
    rig.sim.silent = True
    with pytest.raises(NoReplyError, match=r"nothing was switched|PowerOnState"):
        rig.ctl.unlock(STRIKE, 1)
    rig.sim.silent = False
    assert not rig.sim.device.relay(1)
    rig.sim.silent = True
    with pytest.raises(NoReplyError):
        rig.ctl.read(STRIKE)
    assert rig.ctl.health().online is False


def test_unanswered_pulse_means_nothing_is_switched(rig: Rig) -> None:
    rig.ctl.read(STRIKE)
    rig.ctl.unlock(STRIKE, 1)  # settings checked in this session
    rig.ctl.lock(STRIKE)
    rig.sim.report_delay_s = 1.0  # every answer comes after the reply timeout
    with pytest.raises(NoReplyError, match="nothing was switched"):
        rig.ctl.unlock(STRIKE, 1)
    assert ("POWER1", "ON") not in rig.sim.device.commands[-2:]


def test_lwt_offline_is_offline_and_online_again_reads_again(rig: Rig) -> None:
    assert rig.ctl.read(STRIKE).lock is LockState.LOCKED
    rig.sim.set_offline(True)
    wait_for(lambda: rig.ctl._view.online is False, 3, "the will was published")
    started = time.monotonic()
    with pytest.raises(LinkDownError, match="LWT = Offline"):
        rig.ctl.read(STRIKE)
    assert time.monotonic() - started < 0.1  # known offline: no waiting
    health = rig.ctl.health()
    assert not health.online
    assert "Offline" in health.detail
    rig.sim.device.press(1, True)  # changed while nobody could see
    rig.sim.set_offline(False)
    wait_for(lambda: rig.ctl._view.online is True, 3, "Online again")
    assert rig.ctl.read(STRIKE).lock is LockState.UNLOCKED
    assert rig.ctl.health().online


def test_broker_restart_the_client_reconnects_by_itself(rig: Rig) -> None:
    assert rig.ctl.read(STRIKE).lock is LockState.LOCKED
    rig.broker.restart()  # kill -9 and back (no persistence: sessions and LWT gone)
    wait_for(lambda: rig.client.connected and rig.sim.online, 8, "both reconnected")
    assert rig.ctl.unlock(STRIKE, 0.5).confirmed


def test_broker_down_is_link_down(rig: Rig) -> None:
    rig.broker.kill()
    wait_for(lambda: not rig.client.connected, 3, "the link noticed")
    with pytest.raises(LinkDownError, match="MQTT broker"):
        rig.ctl.unlock(STRIKE, 1)
    assert not rig.ctl.health().online


def test_maglock_clears_the_pulse_before_locking_and_is_relocked_by_the_agent(
        rig: Rig) -> None:
    rig.sim.device.pulse[1] = 3  # left over from when a strike was wired there
    result = rig.ctl.lock(MAGLOCK)
    assert result.confirmed
    assert result.reading.lock is LockState.LOCKED
    assert rig.sim.device.pulse[1] == 0
    time.sleep(0.5)
    assert rig.sim.device.relay(2)  # still energized: the pulse did not release it
    unlocked = rig.ctl.unlock(MAGLOCK, 1)
    assert unlocked.confirmed
    assert not unlocked.self_relocking
    assert unlocked.reading.lock is LockState.UNLOCKED
    assert not rig.sim.device.relay(2)


@pytest.mark.parametrize(("state", "point", "refused"), [
    (5, STRIKE, True), (1, STRIKE, True), (2, STRIKE, True), (3, STRIKE, False),
    (1, MAGLOCK, False), (5, MAGLOCK, True),
])
def test_power_on_states_that_unlock_at_power_up_are_refused(
        broker: Broker, state: int, point: LockPoint, refused: bool) -> None:
    r = Rig(broker, TasmotaSim(broker.host, broker.port, f"pos{state}", relays=2, switches=2,
                               power_on_state=state).start())
    try:
        if refused:
            with pytest.raises(UnsupportedError, match=f"PowerOnState {state}"):
                r.ctl.unlock(point, 1)
            assert [c for c in r.sim.device.commands if c[0].startswith("POWER")] == []
        else:
            assert r.ctl.unlock(point, 1).confirmed
    finally:
        r.close()


def test_a_door_input_that_still_drives_a_relay_is_refused(broker: Broker) -> None:
    r = Rig(broker, TasmotaSim(broker.host, broker.port, "attached", relays=2, switches=2,
                               set_option_114=False).start())
    try:
        with pytest.raises(UnsupportedError, match="SetOption114 1"):
            r.ctl.unlock(STRIKE, 1)
        assert not r.sim.device.relay(1)
        r.sim.device.command("SwitchMode1", "15")  # detached the other way
        assert r.ctl.unlock(STRIKE, 0.3).confirmed
        r.sim.device.set_switch(1, False)  # door opened: tele/SENSOR only
        assert r.ctl.read(STRIKE).door is DoorState.OPEN
        assert r.sim.device.relay(1) or r.sim.device.logs[0].changes[-1][2] == "pulse"
    finally:
        r.close()


def test_door_contact_reads_safe_side(rig: Rig) -> None:
    assert rig.ctl.read(STRIKE).door is DoorState.CLOSED
    rig.sim.device.set_switch(1, False)
    readings = rig.ctl.read_many([STRIKE, LockPoint(channel=1, door_input=1)])
    assert [r.door for r in readings] == [DoorState.OPEN, DoorState.CLOSED]
    assert rig.ctl.unlock(STRIKE, 0.3).reading.door is DoorState.OPEN  # pushed, same session
    assert rig.ctl.read(LockPoint(channel=0)).door is DoorState.UNKNOWN  # no contact


def test_points_outside_the_device_are_refused_before_anything_is_sent(rig: Rig) -> None:
    before = len(rig.sim.device.commands)
    with pytest.raises(UnsupportedError, match="POWER1 is channel 0"):
        rig.ctl.unlock(LockPoint(channel=2), 1)
    with pytest.raises(UnsupportedError, match="Switch1 is input 0"):
        rig.ctl.read(LockPoint(channel=0, door_input=5))
    time.sleep(0.05)
    assert len(rig.sim.device.commands) == before


# --------------------------------------------------------------------------- kill -9


def test_kill9_during_unlock_the_device_relocks_at_the_end_of_its_pulse(
        tmp_path: Path, broker: Broker) -> None:
    """Fault matrix #32: unlock (pulse T), kill -9 the agent at T/2, the device relocks
    at T by itself; the restarted agent reads it locked and closes the unlock."""
    pulse_s = 2
    site = make_site(tmp_path, broker)
    sim = TasmotaSim(broker.host, broker.port, "gate_relay", relays=1).start()
    with site.config_path.open("a") as config:
        config.write('\n[[controllers]]\nname = "tas"\ndriver = "tasmota"\n'
                     'topic = "gate_relay"\nchannels = 1\n\n'
                     '[[locks]]\nunit = "unit_t1"\nreference = "T-1"\ncontroller = "tas"\n'
                     "channel = 0\nunlock_seconds = 2\n")
    agent = AgentProcess(site)
    client = site.client()
    try:
        agent.start()
        jti, token = site.signer.command("unlock", "unit_t1", dur=pulse_s, ttl=300)
        client.publish(f"{PREFIX}/cmd", token, qos=1)
        msgs = client.expect(f"{PREFIX}/cmd/result", 10,
                             where=lambda msg: json.loads(msg.payload)["jti"] == jti)
        result = json.loads(msgs[0].payload)
        assert (result["status"], (result["state"] or {}).get("locked")) == ("done", False), \
            f"{result}\n{agent.log()}"
        period = sim.device.logs[0].last_on_period()
        assert period is not None
        on_at = period[0]
        time.sleep(max(0.0, on_at + pulse_s / 2 - time.monotonic()))
        agent.kill()  # kill -9 halfway through the unlock
        assert sim.device.relay(1)
        wait_for(lambda: not sim.device.relay(1), pulse_s + 2, "the device relocked")
        period = sim.device.logs[0].last_on_period()
        assert period is not None
        assert period[1] is not None
        unlocked_s = period[1] - period[0]
        assert sim.device.logs[0].changes[-1][2] == "pulse"  # the device, not the agent
        assert pulse_s <= unlocked_s <= pulse_s + 0.2, unlocked_s
        print(f"kill -9 at T/2: unlocked {unlocked_s:.3f} s for a {pulse_s:g} s pulse")
        client.clear()
        agent.start()  # back: reads the device and closes the unlock
        client.expect(f"{PREFIX}/units/unit_t1", 15,
                      where=lambda msg: json.loads(msg.payload)["locked"] is True
                      and json.loads(msg.payload)["relock_at"] is None)
    finally:
        agent.kill()
        client.close()
        sim.close()
        site.close()


# --------------------------------------------------------------------------- the broker


def test_the_link_reaches_the_broker_s_unix_socket_with_its_own_account(
        tmp_path: Path) -> None:
    """deploy/'s site broker listens on a unix socket only and binds client ids to
    accounts: the link connects there (host = the socket's path) as its own user, its
    commands reach the device and the device's reports reach it."""
    users = {"gw-tasmota": "link-secret", "gate_relay": "device-secret"}
    with Broker(tmp_path / "broker", users=users, unix_socket=True) as broker:
        assert broker.socket_path is not None
        client = TasmotaClient(BrokerSettings(str(broker.socket_path), 1883, "gw-tasmota-1",
                                              username="gw-tasmota", password="link-secret"))
        view = client.attach("gate_relay")
        try:
            assert client.wait_connected(5), client.last_error
            with Client(broker, "gate_relay", username="gate_relay",
                        password="device-secret", unix=True) as device:
                device.subscribe("cmnd/gate_relay/#")
                mark = client.publish("gate_relay", m.power(1, True))
                [command] = device.expect("cmnd/gate_relay/POWER1")
                assert command.payload == b"ON"
                device.publish("stat/gate_relay/POWER1", b"ON", qos=0)
                assert client.wait_for(
                    lambda: view.power.get(1) is not None and view.power[1].seq > mark, 5)
        finally:
            client.detach("gate_relay")
        assert "link-secret" not in repr(client.settings)
