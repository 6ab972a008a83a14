"""The ``osdp`` driver against a simulated PD (libosdp in PD mode) on a pty.

* Secure Channel is required: a PD that offers none, or one left in install mode, or a
  key file holding the default key SCBK-D, is refused, with nothing sent in the clear
  (fault matrix #38: counted on the wire by the simulator's tap); ``allow_insecure``
  accepts a PD without SC, in the clear, and says so.
* With SC: unlock (a PD-timed output), lock and the door input end to end.
* kill -9 of the agent during an unlock: the PD relocks by itself at the end of its
  timer (fault matrix #32), and the restarted agent reads it locked.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from devkit.broker_client import Client
from devkit.harness.osdp import write_scbk
from devkit.mosquitto import Broker
from devkit.sims.osdp import (
    FrameSplitter,
    OsdpPdSim,
    checksum,
    classify,
    crc16,
    strip_sc_capability,
)
from devkit.testing import AgentToml, wait_for
from drivers.base import DoorState, LockPoint, LockState
from drivers.errors import LinkDownError, TechnicianError
from drivers.osdp import SCBK_D, OsdpController, OsdpTiming, ScbkError, load_scbk
from drivers.osdp import controller as osdp_controller

pytestmark = [pytest.mark.simulator_only, pytest.mark.timeout(60)]

ADDRESS = 7
KEY = bytes.fromhex("8f1c0a6e52b3d9470e6a1f2c3b4d5e6f")
STRIKE = LockPoint(channel=0, door_input=0)
MAGLOCK = LockPoint(channel=1, energize_to="lock")


@pytest.fixture
def make_pd(tmp_path: Path) -> Iterator[Callable[..., OsdpPdSim]]:
    sims: list[OsdpPdSim] = []

    def make(**kwargs: object) -> OsdpPdSim:
        sim = OsdpPdSim(tmp_path / f"ttyPD{len(sims)}", address=ADDRESS, **kwargs)  # type: ignore[arg-type]
        sims.append(sim.start())
        return sim

    yield make
    for sim in sims:
        sim.close()


@pytest.fixture
def make_cp() -> Iterator[Callable[..., OsdpController]]:
    cps: list[OsdpController] = []

    def make(sim: OsdpPdSim, **kwargs: object) -> OsdpController:
        cp = OsdpController("door-pd", str(sim.path), 115200, ADDRESS, **kwargs)  # type: ignore[arg-type]
        cps.append(cp)
        return cp

    yield make
    for cp in cps:
        cp.close()


def refused(cp: OsdpController, why: str) -> None:
    """The PD is offline for ``why`` and an unlock is refused without being sent."""
    cp.probe()
    wait_for(lambda: why in cp.health().detail, 10, f"health says {why!r}")
    health = cp.health()
    assert not health.online
    assert health.detail.startswith("refused"), health
    with pytest.raises(TechnicianError, match="refused"):
        cp.unlock(STRIKE, 2)


# -- the key file and the wire helpers ---------------------------------------------------


def test_scbk_file(tmp_path: Path) -> None:
    assert load_scbk(write_scbk(tmp_path / "k", KEY)) == KEY
    spaced = tmp_path / "spaced"
    spaced.write_text(" ".join(KEY.hex()[i:i + 4] for i in range(0, 32, 4)) + "\n")
    assert load_scbk(spaced) == KEY
    for text in ("", "00" * 15, "zz" * 16, "00" * 17):
        (tmp_path / "bad").write_text(text)
        with pytest.raises(ScbkError, match="scbk_file"):
            load_scbk(tmp_path / "bad")
    with pytest.raises(ScbkError, match="cannot read"):
        load_scbk(tmp_path / "missing")


def test_frame_helpers() -> None:
    # osdp_PDCAP from address 7, CRC: SC capability (9, level 1, 1 item) and outputs.
    body = bytes([0x53, 0x87, 0, 0, 0x04, 0x46, 9, 1, 1, 4, 1, 4])
    length = len(body) + 2
    body = bytes([0x53, 0x87, length & 0xFF, length >> 8]) + body[4:]
    crc = crc16(body)
    frame = body + bytes((crc & 0xFF, crc >> 8))
    info = classify(frame)
    assert info is not None
    assert (info.code, info.secure) == (0x46, False)
    stripped = strip_sc_capability(frame)
    assert stripped[6:9] == bytes([9, 0, 0])
    assert stripped[9:12] == frame[9:12]
    crc = crc16(stripped[:-2])
    assert stripped[-2:] == bytes((crc & 0xFF, crc >> 8))
    assert checksum(b"\x53\x00") == (-0x53) & 0xFF
    # Marks, garbage and a split frame.
    splitter = FrameSplitter()
    assert splitter.feed(b"\xff\x00" + frame[:5]) == []
    assert splitter.feed(frame[5:] + b"\xff" + frame) == [frame, frame]


# -- Secure Channel required (fault matrix #38) ------------------------------------------


def test_pd_without_secure_channel_is_refused_and_nothing_is_sent_in_the_clear(
        make_pd: Callable[..., OsdpPdSim], make_cp: Callable[..., OsdpController]) -> None:
    sim = make_pd(scbk=KEY, no_sc=True)
    cp = make_cp(sim, scbk=KEY)
    refused(cp, "offers no Secure Channel")
    assert sim.log.sessions >= 1  # it did talk to the PD: ID and CAP only
    assert sim.log.clear_commands == 0  # the figure: commands sent in the clear
    assert sim.log.clear_output_commands == sim.log.secure_output_commands == 0
    assert cp.commands_sent == 0
    assert not sim.output(0)


def test_pd_left_in_install_mode_is_refused(
        make_pd: Callable[..., OsdpPdSim], make_cp: Callable[..., OsdpController]) -> None:
    sim = make_pd(install_mode=True)  # knows only SCBK-D
    cp = make_cp(sim, scbk=KEY)
    refused(cp, "handshake failed")
    assert "install mode" in cp.health().detail
    assert sim.log.clear_commands == 0
    assert sim.log.keysets == 0  # no fallback to SCBK-D that would hand over our key
    assert cp.commands_sent == 0
    assert not sim.output(0)


@pytest.mark.parametrize(("key", "why"), [
    (SCBK_D, "default install key SCBK-D"),
    (None, "no scbk_file"),
])
def test_no_usable_key_is_refused_before_a_byte_is_sent(
        make_pd: Callable[..., OsdpPdSim], make_cp: Callable[..., OsdpController],
        key: bytes | None, why: str) -> None:
    sim = make_pd(install_mode=True)  # a PD that would accept SCBK-D
    cp = make_cp(sim, scbk=key)
    refused(cp, why)
    time.sleep(0.3)
    assert cp.channel.opens == 0
    assert cp.channel.bytes_out == 0
    assert sim.log.sessions == 0
    assert cp.notices() == []


def test_allow_insecure_accepts_a_pd_without_secure_channel_and_says_so(
        make_pd: Callable[..., OsdpPdSim], make_cp: Callable[..., OsdpController]) -> None:
    sim = make_pd(no_sc=True)
    # The key is not handed to libosdp: it would fall back to SCBK-D and send it.
    cp = make_cp(sim, scbk=KEY, allow_insecure=True)
    assert cp.probe().online
    assert "WITHOUT Secure Channel" in cp.health().detail
    result = cp.unlock(STRIKE, 1)
    assert result.confirmed
    assert sim.output(0)
    assert sim.log.clear_output_commands >= 1  # in the clear, as the switch says
    assert cp.commands_sent_clear == cp.commands_sent >= 1
    assert sim.log.keysets == 0
    assert all(code != 5 or units for _, _, code, units in sim.log.commands)


# -- with Secure Channel: end to end -----------------------------------------------------


def test_secure_unlock_relock_and_door_input_end_to_end(
        make_pd: Callable[..., OsdpPdSim], make_cp: Callable[..., OsdpController]) -> None:
    sim = make_pd(scbk=KEY)
    cp = make_cp(sim, scbk=KEY)
    health = cp.probe()
    assert health.online, health
    assert "Secure Channel active" in health.detail, health
    reading = cp.read(STRIKE)
    assert (reading.lock, reading.door) == (LockState.LOCKED, DoorState.CLOSED)

    result = cp.unlock(STRIKE, 1.0)
    assert result.confirmed, result
    assert result.self_relocking
    assert result.reading.lock is LockState.UNLOCKED
    assert sim.output(0)
    # The PD ends the unlock by itself, with nothing more from the CP.
    sent = len(sim.log.commands)
    wait_for(lambda: not sim.output(0), 3, "the PD relocked")
    on_at, off_at = (t for t, n, _ in sim.log.changes if n == 0)
    assert 0.9 <= off_at - on_at <= 1.3, (on_at, off_at)
    assert len(sim.log.commands) == sent
    wait_for(lambda: cp.read(STRIKE).lock is LockState.LOCKED, 2, "the report of the relock")

    sim.set_input(0, True)
    wait_for(lambda: cp.read(STRIKE).door is DoorState.OPEN, 2, "door open reported")
    sim.set_input(0, False)
    wait_for(lambda: cp.read(STRIKE).door is DoorState.CLOSED, 2, "door closed reported")

    assert cp.unlock(STRIKE, 20).confirmed
    locked = cp.lock(STRIKE)
    assert locked.confirmed
    assert locked.reading.lock is LockState.LOCKED
    assert not sim.output(0)

    # A fail-safe maglock: locked is energized; the unlock is a timed OFF.
    assert cp.lock(MAGLOCK).confirmed
    assert sim.output(1)
    assert cp.unlock(MAGLOCK, 0.5).confirmed
    assert not sim.output(1)
    wait_for(lambda: sim.output(1), 2, "the maglock re-energized by the PD")

    assert sim.log.clear_commands == 0
    assert sim.log.secure_output_commands == cp.commands_sent >= 7
    assert cp.commands_sent_clear == 0


def test_long_unlock_is_renewed_within_the_timer_libosdp_can_send(
        make_pd: Callable[..., OsdpPdSim], make_cp: Callable[..., OsdpController],
        monkeypatch: pytest.MonkeyPatch) -> None:
    # libosdp 3.2.9's binding sends at most 255 units (25.5 s); shrink that to 0.5 s.
    monkeypatch.setattr(osdp_controller, "MAX_TIMER_UNITS", 5)
    sim = make_pd(scbk=KEY)
    cp = make_cp(sim, scbk=KEY, timing=OsdpTiming(renew_lead_s=0.25))
    assert cp.probe().online
    started = time.monotonic()
    result = cp.unlock(STRIKE, 1.6)
    assert result.confirmed
    assert "renewed" in result.detail
    wait_for(lambda: not sim.output(0), 4, "the relock")
    # Held past the 0.5 s timer by the renewals (a lower bound: slowness cannot fail it);
    # the wait for the relock above is the ceiling.
    assert time.monotonic() - started >= 1.4
    assert [on for _, n, on in sim.log.changes if n == 0] == [True, False]  # never a gap
    timed = [units for _, n, code, units in sim.log.commands if n == 0 and code == 5]
    assert len(timed) >= 3
    assert max(timed) <= 5


def test_tamper_and_power_reports_become_notices(
        make_pd: Callable[..., OsdpPdSim], make_cp: Callable[..., OsdpController]) -> None:
    sim = make_pd(scbk=KEY)
    cp = make_cp(sim, scbk=KEY)
    assert cp.probe().online
    sim.set_tamper(True)
    sim.set_power_failure(True)
    wait_for(lambda: "POWER FAILURE" in cp.health().detail, 2, "power failure reported")
    assert "TAMPER" in cp.health().detail
    assert [n.kind for n in cp.notices()] == ["tamper", "power_failure"]
    assert cp.notices() == []
    sim.set_tamper(False)
    sim.set_power_failure(False)
    wait_for(lambda: "TAMPER" not in cp.health().detail, 2, "tamper cleared")


def test_adapter_unplugged_reads_unknown_at_once_and_a_new_session_reads_again(
        make_pd: Callable[..., OsdpPdSim], make_cp: Callable[..., OsdpController]) -> None:
    sim = make_pd(scbk=KEY)
    cp = make_cp(sim, scbk=KEY)
    assert cp.probe().online
    sim.set_offline(True)
    wait_for(lambda: not cp.health().online, 2, "offline noticed")
    assert "link down" in cp.health().detail
    with pytest.raises(LinkDownError):
        cp.read(STRIKE)
    sim.set_output(0, True)  # changed while nobody could see
    sim.set_offline(False)
    wait_for(lambda: cp.health().online, 10, "back online")
    wait_for(lambda: cp.read(STRIKE).lock is LockState.UNLOCKED, 3, "state read again")
    assert sim.log.sessions >= 2
    assert sim.log.clear_commands == 0


# -- kill -9 of the agent during an unlock (fault matrix #32) ----------------------------


def _agent_config(directory: Path, broker: Broker, sim: OsdpPdSim, public_key: str) -> Path:
    scbk = write_scbk(directory / "scbk.hex", KEY)
    config = AgentToml.for_site(directory, broker, public_key, client_id="agent-osdp")
    config.controllers = [{"name": "pd", "driver": "osdp", "port": sim.path, "baudrate": 115200,
                           "address": ADDRESS, "scbk_file": scbk, "channels": 4, "inputs": 4}]
    config.locks = [{"unit": "unit_d1", "reference": "D-1", "controller": "pd", "channel": 0,
                     "door_input": 0, "unlock_seconds": 2}]
    return config.write()


def test_kill9_during_an_unlock_the_pd_relocks_at_the_end_of_its_timer(
        tmp_path: Path, make_pd: Callable[..., OsdpPdSim]) -> None:
    from devkit.signer import CommandSigner, generate_keypair
    from devkit.site import PREFIX, SITE, AgentProcess

    sim = make_pd(scbk=KEY)  # the door lives in this process; the agent is a subprocess
    seconds = 3.0
    with Broker(tmp_path / "broker") as broker:
        private, public = generate_keypair()
        config = _agent_config(tmp_path, broker, sim, public)
        site = SimpleNamespace(directory=tmp_path, config_path=config,
                               socket_path=tmp_path / "run" / "control.sock")
        agent = AgentProcess(site)  # type: ignore[arg-type]
        agent.start()
        client = Client(broker)
        try:
            client.subscribe(f"{PREFIX}/cmd/result")
            client.subscribe(f"{PREFIX}/units/#")
            jti, token = CommandSigner(private, "test-2026", SITE).command(
                "unlock", "unit_d1", dur=int(seconds))
            client.publish(f"{PREFIX}/cmd", token, qos=1)
            msg = client.expect(f"{PREFIX}/cmd/result", 20,
                                where=lambda m: json.loads(m.payload)["jti"] == jti)[0]
            result = json.loads(msg.payload)
            assert result["status"] == "done", (result, agent.log())
            on_at = next(t for t, n, on in sim.log.changes if n == 0 and on)
            time.sleep(max(0.0, on_at + seconds / 2 - time.monotonic()))
            agent.kill()  # kill -9 at T/2
            killed_at = time.monotonic()
            assert sim.output(0), "still unlocked right after the kill"
            sent = len(sim.log.commands)
            wait_for(lambda: not sim.output(0), seconds, "the PD relocked by itself")
            off_at = next(t for t, n, on in sim.log.changes if n == 0 and not on)
            assert off_at > killed_at
            assert abs((off_at - on_at) - seconds) <= 0.3, off_at - on_at
            print(f"kill -9 at T/2 = {seconds / 2:g} s: the PD relocked {off_at - on_at:.2f} s "
                  f"after unlocking (T = {seconds:g} s); relock failures 0")
            assert len(sim.log.commands) == sent  # nobody else relocked it
            assert sim.log.clear_commands == 0

            # The restarted agent reads the state back: locked.
            agent.start()
            client.expect(f"{PREFIX}/units/unit_d1", 20,
                          where=lambda m: json.loads(m.payload).get("locked") is True
                          and json.loads(m.payload).get("confirmed") is True)
        finally:
            client.close()
            agent.stop()
