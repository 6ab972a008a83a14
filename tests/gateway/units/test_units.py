"""UnitManager against the Modbus simulator, with a wall clock the test can step."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devkit.mosquitto import Broker
from devkit.site import SimSite, make_site
from gateway.config import load_config
from gateway.intake.commands import Command
from gateway.store import Store
from gateway.units.hardware import build_site
from gateway.units.manager import UnitManager

pytestmark = pytest.mark.simulator_only


class Wall:
    """A wall clock that follows real time but can be stepped like NTP or `date -s`."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


class Rig:
    def __init__(self, site: SimSite) -> None:
        self.site = site
        self.config = load_config(site.config_path)
        self.hw = build_site(self.config)
        self.config.storage.path.parent.mkdir(parents=True, exist_ok=True)
        self.store = Store(self.config.storage.path)
        self.wall = Wall()
        self.alarms: list[tuple[str, str | None, str]] = []
        self.units = UnitManager(self.config, self.hw, self.store, now=self.wall,
                                 publish_unit=lambda u, s: None,
                                 alarm=lambda k, u, d: self.alarms.append((k, u, d)))
        self.units.start()
        self.n = 0

    def command(self, cmd: str, unit: str, **kw: Any) -> Command:
        self.n += 1
        now = int(self.wall())
        fields: dict[str, Any] = {"jti": f"t{self.n}", "cmd": cmd, "unit": unit, "kid": "k",
                                  "iat": now, "exp": now + 60}
        fields.update(kw)
        return Command(**fields)

    def run(self, command: Command) -> Any:
        return self.units.submit(command).result(timeout=10)

    def wait_locked(self, unit: str, timeout: float) -> float | None:
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if not self.site.coil(unit):
                return time.monotonic() - start
            time.sleep(0.02)
        return None

    def close(self) -> None:
        self.units.stop()
        self.hw.close()
        self.store.close()


@pytest.fixture
def rig(tmp_path: Path, broker: Broker) -> Iterator[Rig]:
    site = make_site(tmp_path, broker)
    r = Rig(site)
    try:
        yield r
    finally:
        r.close()
        site.close()


def test_a_command_that_expired_while_queued_is_not_run(rig: Rig) -> None:
    now = int(rig.wall())
    late = rig.command("unlock", "unit_a101", iat=now - 400, exp=now - 100)
    outcome = rig.run(late)
    assert (outcome.status, outcome.reason) == ("rejected", "expired")
    assert rig.site.coil("unit_a101") is False
    again = rig.run(late)  # and a redelivery answers the same, as a duplicate
    assert again.duplicate
    assert again.reason == "expired"


def test_a_wall_clock_step_back_does_not_postpone_a_relock(rig: Rig) -> None:
    outcome = rig.run(rig.command("unlock", "unit_a101", dur=1))
    assert outcome.status == "done"
    rig.wall.offset = -3600.0  # NTP steps the clock back an hour mid-unlock
    # Relocked on the monotonic timer (1 s), not an hour later by the wall clock.
    took = rig.wait_locked("unit_a101", 5)
    assert took is not None, "the door stayed unlocked after a wall-clock step"


def test_reconciliation_does_not_cut_short_an_override_unlock(rig: Rig) -> None:
    assert rig.run(rig.command("lockout", "unit_a102", ver=1)).status == "done"
    opened = rig.run(rig.command("unlock", "unit_a102", dur=2, override=True,
                                 reason="fire inspection"))
    assert opened.status == "done"
    rig.units.reconcile()
    time.sleep(0.5)
    assert rig.site.coil("unit_a102") is True, "the override was undone by reconciliation"
    assert not [a for a in rig.alarms if a[0] == "lockout_drift"]
    took = rig.wait_locked("unit_a102", 5)
    assert took is not None  # and the lockout holds again once the time is over


def test_stopping_the_agent_locks_doors_waiting_for_their_relock(rig: Rig) -> None:
    assert rig.run(rig.command("unlock", "unit_a103", dur=600)).status == "done"
    assert rig.site.coil("unit_a103") is True
    rig.units.stop()
    assert rig.site.coil("unit_a103") is False


def test_a_reading_older_than_a_command_does_not_overwrite_its_read_back(rig: Rig) -> None:
    from drivers.base import DoorState, LockState, Reading

    stale = Reading(LockState.LOCKED, DoorState.CLOSED, time.monotonic())
    assert rig.run(rig.command("unlock", "unit_a101", dur=30)).status == "done"
    rig.units._reconcile_unit(rig.units.lock_config("unit_a101"), stale, False)  # type: ignore[arg-type]
    assert rig.store.unit("unit_a101").locked is False  # still the unlock's read-back


def test_a_door_still_open_right_after_the_relock_is_not_called_forced(rig: Rig) -> None:
    assert rig.run(rig.command("unlock", "unit_a101", dur=1)).status == "done"
    rig.site.modbus.board(1).hold_door_open(0)  # the tenant is still in the doorway
    assert rig.wait_locked("unit_a101", 5) is not None
    rig.units.reconcile()
    time.sleep(0.5)
    assert not [a for a in rig.alarms if a[0] == "door_forced"]
    rig.site.modbus.board(1).hold_door_open(0, held=False)


def test_a_command_interrupted_by_a_restart_is_audited_as_outcome_unknown(rig: Rig) -> None:
    with rig.store.transaction() as tx:
        tx.claim_command("cut-1", "unlock", "unit_a101", rig.wall())
        tx.claim_command("cut-2", "lockout", "unit_a102", rig.wall())
        tx.claim_command("cut-3", "lock", "unit_gone", rig.wall())  # lock left the config
    rows = rig.store.recover_interrupted(rig.wall(), rig.units.audit_interrupted)
    assert sorted(r.jti for r in rows) == ["cut-1", "cut-2", "cut-3"]
    events = {e.kind: e for e in rig.store.events()}
    assert sorted(events) == ["overlocked", "unlocked"]
    assert events["unlocked"].description.startswith(
        f"Unit unlocked via {rig.config.site.app_name} — outcome unknown")
    assert events["unlocked"].unit == "unit_a101"
    # Recovering again finds nothing and records nothing twice.
    assert rig.store.recover_interrupted(rig.wall(), rig.units.audit_interrupted) == []
    assert len(rig.store.events()) == 2


def test_an_unlock_that_did_not_confirm_is_locked_again_at_once(rig: Rig) -> None:
    """The unlock failed (the relay did not move), but a door may half move: it is locked
    again now, not after the unlock time (issue 12: a failed unlock does not wait out the
    relock time)."""
    rig.site.modbus.board(1).stick_relay(0)  # writes acknowledged, relay does not move
    outcome = rig.run(rig.command("unlock", "unit_a101", dur=600))
    assert (outcome.status, outcome.reason) == ("failed", "not_confirmed")
    deadline = time.monotonic() + 5
    while rig.store.unit("unit_a101").relock_at is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert rig.store.unit("unit_a101").relock_at is None, "the relock waited out 600 s"
