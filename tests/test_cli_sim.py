"""The technician CLI in direct mode, against both simulators over real ptys."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from drivers.lockboard.sim import LockboardSim, start_lockboard_sim
from drivers.modbus.sim import ModbusSimBus
from gateway.cli import main
from gateway.demo import write_demo_config

pytestmark = pytest.mark.simulator_only


@dataclass
class SimSite:
    config: str
    modbus: ModbusSimBus
    lockers: LockboardSim

    def run(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        status = main([*argv, "--config", self.config], out=out, err=err)
        return status, out.getvalue(), err.getvalue()


@pytest.fixture
def site(tmp_path: Path) -> Iterator[SimSite]:
    modbus = ModbusSimBus(tmp_path / "ttyA", slaves=(1,), coils=4, inputs=4)
    lockers = start_lockboard_sim(tmp_path / "ttyB", (0,), 8, hold_s=0.5)
    config = write_demo_config(tmp_path, modbus.path, lockers.port.path)
    # A bus without the board pulse: the CLI owns the relock timer there.
    text = config.read_text().replace("pulse = true", "pulse = false")
    config.write_text(text)
    try:
        yield SimSite(str(config), modbus, lockers)
    finally:
        modbus.close()
        lockers.close()


def test_locks_json_reads_every_lock(site: SimSite) -> None:
    site.modbus.board(1).hold_door_open(1)
    status, out, _ = site.run("locks", "--json")
    assert status == 0
    rows = {r["reference"]: r for r in json.loads(out)}
    assert set(rows) == {"A-101", "A-102", "GATE", "B-201", "B-202"}
    assert rows["A-101"]["locked"] is True
    assert rows["A-102"]["door"] == "open"
    assert rows["GATE"]["locked"] is False  # a fail-safe maglock without power is open
    assert rows["GATE"]["door"] == "unknown"  # no door contact configured
    assert rows["B-201"]["locked"] is True
    assert all(r["lockout"] is None for r in rows.values())  # direct mode: unknown


def test_unlock_without_board_pulse_relocks_after_the_time(site: SimSite) -> None:
    status, out, _ = site.run("unlock", "A-101", "--seconds", "0.3", "--json")
    assert status == 0
    unlocked, relocked = json.loads(out)
    assert (unlocked["action"], unlocked["status"], unlocked["state"]) == ("unlock", "done",
                                                                         "unlocked")
    assert (relocked["action"], relocked["status"], relocked["state"]) == ("lock", "done",
                                                                         "locked")
    assert site.modbus.board(1).coil(0) is False


def test_unlock_by_unit_id_on_a_self_relocking_board(site: SimSite) -> None:
    status, out, _ = site.run("unlock", "unit_b201", "--json")
    assert status == 0
    (only,) = json.loads(out)  # the board relocks: the CLI does not send a lock
    assert only["status"] == "done"
    assert site.lockers.sim.is_unlocked(0, 1)


def test_lock_confirms(site: SimSite) -> None:
    status, out, _ = site.run("lock", "GATE")
    assert status == 0
    assert "lock confirmed" in out
    assert site.modbus.board(1).coil(3) is True  # fail-safe: energized means locked


def test_test_all_passes_with_a_table(site: SimSite) -> None:
    status, out, err = site.run("test", "--all", "--seconds", "0.2", "--relock-timeout", "2")
    assert status == 0, out
    assert out.count("PASS") == 5
    assert "5 passed, 0 failed" in out
    assert "5/5" in err  # the progress bar


def test_a_jammed_lock_fails_the_test_with_exit_1(site: SimSite) -> None:
    site.lockers.sim.set_faults(0, 2, jammed=True)
    status, out, _ = site.run("test", "B-202", "B-201", "--json", "--relock-timeout", "2")
    assert status == 1
    report = json.loads(out)
    assert report["passed"] is False
    results = {r["reference"]: r for r in report["results"]}
    assert results["B-202"]["passed"] is False
    assert "jammed" in results["B-202"]["detail"]
    assert results["B-201"]["passed"] is True


def test_a_relay_stuck_on_the_modbus_board_is_not_confirmed(site: SimSite) -> None:
    site.modbus.board(1).stick_relay(1)
    status, out, _ = site.run("unlock", "A-102", "--seconds", "0.1", "--json")
    assert status == 1
    assert json.loads(out)[0]["status"] == "not_confirmed"


def test_a_silent_controller_is_a_hardware_error_exit_1(site: SimSite) -> None:
    site.modbus.faults.ignore_requests = True
    status, out, _ = site.run("lock", "A-101", "--json")
    assert status == 1
    outcome = json.loads(out)
    assert outcome["status"] == "hardware_error"
    assert outcome["state"] == "unknown"


def test_unknown_unit_is_a_one_line_usage_error(site: SimSite) -> None:
    status, out, err = site.run("unlock", "Z-999")
    assert status == 2
    assert out == ""
    assert err.count("\n") == 1
    assert "Z-999" in err


def test_force_needs_a_reason(site: SimSite) -> None:
    status, _, err = site.run("unlock", "A-101", "--force")
    assert status == 2
    assert "--reason" in err
    assert site.modbus.board(1).coil(0) is False  # nothing was touched


def test_test_needs_units_or_all(site: SimSite) -> None:
    assert site.run("test")[0] == 2
    assert site.run("test", "A-101", "--all")[0] == 2


def test_scan_finds_the_boards(site: SimSite) -> None:
    status, out, _ = site.run("scan", "lockers", "--addresses", "0-3", "--json")
    assert status == 0
    assert [f["address"] for f in json.loads(out)["found"]] == [0]
    status, out, _ = site.run("scan", "bus1", "--addresses", "1-3", "--json")
    assert status == 0
    assert [f["address"] for f in json.loads(out)["found"]] == [1]


def test_scan_rejects_a_bad_range_and_unknown_controller(site: SimSite) -> None:
    assert site.run("scan", "bus1", "--addresses", "9-1")[0] == 2
    status, _, err = site.run("scan", "nope")
    assert status == 2
    assert "bus1" in err  # lists the known ones


def test_ports_json_is_a_list(site: SimSite) -> None:
    status, out, _ = site.run("ports", "--json")
    assert status == 0
    assert isinstance(json.loads(out), list)
