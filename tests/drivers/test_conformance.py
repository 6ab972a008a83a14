"""One conformance suite for every driver, through its simulator and the real agent.

Each driver's harness (devkit/harness/__init__.py) starts its simulator; the agent runs
in-process with a config naming that controller and two locks, on a real Mosquitto,
and gets signed commands.  The scenarios (issue 6):

1. unlock → confirmed → relock → confirmed;
2. no reply → the command fails (``not_confirmed``; a serial bus that never answers may
   say ``hardware_error``), and is never reported ``done``;
3. controller offline → ``controller_offline`` alarm; back online → state read again
   and the lockout re-applied;
4. hardware drift (the lock opens by itself) → corrected by reconciliation, with an alarm.

A device that can only release a latch (``unlock_only``) skips what needs a lock command.
Nothing here names a driver: a new driver joins by adding its harness.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from devkit.broker_client import Client
from devkit.harness import HARNESSES, Harness, make_harness
from devkit.mosquitto import Broker
from devkit.signer import CommandSigner, generate_keypair
from devkit.site import PREFIX, SITE, RunningAgent
from devkit.testing import AgentToml, wait_for

pytestmark = pytest.mark.simulator_only

UNITS = ("unit_c0", "unit_c1")
#: Reconciliation every this many seconds in these tests (5 s in production).
RECONCILE_S = 0.4


def write_config(directory: Path, broker: Broker, harness: Harness, public_key: str) -> Path:
    config = AgentToml.for_site(directory, broker, public_key, client_id="agent-conformance",
                                app_name="Conformance")
    config.locks = [f'unit = "{unit}"\nreference = "C-{i}"\ncontroller = "c1"\n'
                    f"unlock_seconds = 1\n{harness.lock_keys(i)}"
                    for i, unit in enumerate(UNITS)]
    config.extra = harness.controller_toml("c1")
    return config.write()


class Rig:
    """The agent, a client, a signer and the harness of one driver."""

    def __init__(self, harness: Harness, client: Client, signer: CommandSigner,
                 agent: Any) -> None:
        self.harness = harness
        self.client = client
        self.signer = signer
        self.agent = agent

    def send(self, cmd: str, unit: str, **claims: Any) -> dict[str, Any]:
        jti, token = self.signer.command(cmd, unit, **claims)
        self.client.publish(f"{PREFIX}/cmd", token, qos=1)
        msgs = self.client.expect(f"{PREFIX}/cmd/result", 20,
                                  where=lambda m: json.loads(m.payload)["jti"] == jti)
        return json.loads(msgs[0].payload)  # type: ignore[no-any-return]

    def alarm(self, kind: str, unit: str, timeout: float = 10.0) -> dict[str, Any]:
        msgs = self.client.expect(
            f"{PREFIX}/alarm", timeout,
            where=lambda m: (json.loads(m.payload)["kind"], json.loads(m.payload)["unit"])
            == (kind, unit))
        return json.loads(msgs[0].payload)  # type: ignore[no-any-return]

    def state(self, unit: str, where: Callable[[dict[str, Any]], bool],
              timeout: float = 10.0) -> dict[str, Any]:
        msgs = self.client.expect(f"{PREFIX}/units/{unit}", timeout,
                                  where=lambda m: where(json.loads(m.payload)))
        return json.loads(msgs[-1].payload)  # type: ignore[no-any-return]


@pytest.fixture(params=sorted(HARNESSES))
def rig(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Rig]:
    driver: str = request.param
    try:
        __import__(HARNESSES[driver])
    except ModuleNotFoundError as exc:
        if exc.name == HARNESSES[driver]:
            pytest.fail(f"driver {driver!r} has no conformance harness yet ({exc.name})")
        raise
    with Broker(tmp_path / "broker") as broker:
        harness = make_harness(driver, tmp_path, broker)
        try:
            private, public = generate_keypair()
            config = write_config(tmp_path, broker, harness, public)
            client = Client(broker)
            for suffix in ("cmd/result", "alarm", "units/#"):
                client.subscribe(f"{PREFIX}/{suffix}")
            with RunningAgent(config, job_intervals={"units.reconcile": RECONCILE_S}) as agent:
                yield Rig(harness, client, CommandSigner(private, "test-2026", SITE), agent)
            client.close()
        finally:
            harness.close()


def test_unlock_confirmed_then_relock_confirmed(rig: Rig) -> None:
    h = rig.harness
    res = rig.send("unlock", UNITS[0], dur=1)
    assert (res["status"], res["reason"]) == ("done", None), res
    assert res["state"]["locked"] is False
    assert res["state"]["confirmed"] is True
    assert h.unlocked(0)
    wait_for(lambda: not h.unlocked(0), 1 + 4, "the lock relocked")
    state = rig.state(UNITS[0], lambda s: s["locked"] is True and s["relock_at"] is None)
    assert state["confirmed"] is True


def test_no_reply_is_never_done(rig: Rig) -> None:
    rig.harness.set_silent(True)
    try:
        res = rig.send("unlock", UNITS[0], dur=1)
    finally:
        rig.harness.set_silent(False)
    assert res["status"] == "failed", res
    assert res["reason"] in ("not_confirmed", "hardware_error"), res
    state = res["state"] or {}
    assert not (state.get("locked") is False and state.get("confirmed")), res


def test_offline_alarms_and_back_online_reads_again_and_reapplies_the_lockout(
        rig: Rig) -> None:
    h = rig.harness
    res = rig.send("lockout", UNITS[1], ver=1)
    assert res["status"] == "done", res
    assert not h.unlocked(1)
    h.set_offline(True)
    try:
        alarm = rig.alarm("controller_offline", UNITS[1])
        assert "c1" in alarm["detail"]
        rig.state(UNITS[1], lambda s: s["locked"] is None)  # unknown, never guessed
        h.drift(1, True)  # while nobody could see: it comes back open
    finally:
        h.set_offline(False)
    state = rig.state(UNITS[1], lambda s: s["locked"] is not None, timeout=15)
    assert state["lockout"] is True
    if h.unlock_only:
        return  # nothing can lock it by command; the state was read again
    rig.alarm("lockout_drift", UNITS[1], timeout=15)
    wait_for(lambda: not h.unlocked(1), 10, "the lockout re-applied")
    rig.state(UNITS[1], lambda s: s["locked"] is True and s["confirmed"] is True)


def test_drift_is_corrected(rig: Rig) -> None:
    h = rig.harness
    if h.unlock_only:
        pytest.skip(f"{h.driver}: a released latch cannot be locked by command")
    rig.state(UNITS[0], lambda s: s["locked"] is True)
    h.drift(0, True)
    alarm = rig.alarm("drift", UNITS[0], timeout=15)
    assert "locking again" in alarm["detail"]
    wait_for(lambda: not h.unlocked(0), 10, "the drift corrected")
    rig.state(UNITS[0], lambda s: s["locked"] is True and s["confirmed"] is True)
