"""The trusted-time floor cannot be ratcheted (issue 11 item 7), through the real agent.

A forged NTP step forward must not become the floor of the next start, a floor that is
already wrong is dropped with an alarm, and a technician can reset it.  The agent runs
in process on a real SQLite store, with its wall and monotonic clocks injected
(``devkit.testing.clock``); the alarms travel over a real Mosquitto where they are
checked.  The clock's own rules are unit-tested in tests/gateway/clock/test_clock.py.
"""

from __future__ import annotations

import io
import json
import re
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import gateway.agent
import gateway.clock
from devkit.broker_client import Client
from devkit.mosquitto import Broker
from devkit.sandbox import Sandbox
from devkit.signer import CommandSigner
from devkit.site import PREFIX, SITE, STORA_TOKEN, RunningAgent, SimSite, make_site
from devkit.testing import DAY, NOW, FakeTime
from gateway.agent import Agent
from gateway.cli.main import main
from gateway.clock import BUILD_FLOOR, FLOOR_MARGIN_S, rfc3339
from gateway.config import load_config
from gateway.intake.commands import Rejection
from gateway.store import Store
from tests.support import sim_site

TEN_YEARS = 3_650 * DAY


class Site:
    """The simulated site (clock mode "ntp"), its config and signer; no agent runs."""

    def __init__(self, directory: Path, t: FakeTime) -> None:
        # Nothing listens there: these agents are built and stopped, never started.
        broker = types.SimpleNamespace(host="127.0.0.1", port=9)
        self.sim = make_site(directory, broker)  # type: ignore[arg-type]
        self.config_path = self.sim.config_path
        text = self.config_path.read_text().replace('clock = "system"', 'clock = "ntp"')
        self.config_path.write_text(text)
        self.db = directory / "state" / "gateway.db"
        self.signer = CommandSigner(self.sim.signer._key, "test-2026", SITE,
                                    clock=lambda: t.wall)
        self.t = t

    def agent(self) -> Agent:
        """One run of the agent (the kernel says "synchronized" as ``t.synced`` does)."""
        return Agent(load_config(self.config_path), clock_synced=lambda: self.t.synced)

    def accepts_a_command(self, agent: Agent) -> bool:
        """Whether a fresh signed unlock passes verification (else why not, asserted)."""
        _, token = self.signer.command("unlock", "unit_a101")
        try:
            agent.verifier.verify(token, retained=False)
        except Rejection as exc:
            reason = exc.reason
        else:
            return True
        assert reason == "clock_untrusted"
        return False

    def seed(self, **meta: str) -> None:
        """Values in the ``meta`` table before the agent starts (a previous run's)."""
        self.db.parent.mkdir(exist_ok=True)
        with Store(self.db) as store:
            for key, value in meta.items():
                store.set_meta(key, value)

    def saved(self, key: str = "last_trusted_time") -> float:
        with Store(self.db) as store:
            value = store.meta(key)
        assert value is not None
        return float(value)


@pytest.fixture
def t(monkeypatch: pytest.MonkeyPatch) -> FakeTime:
    fake = FakeTime()
    # The agent builds its own TrustedClock; this one reads the fake clocks.
    monkeypatch.setattr(gateway.agent, "TrustedClock", fake.clock_class())
    return fake


@pytest.fixture
def site(tmp_path: Path, t: FakeTime) -> Iterator[Site]:
    made = Site(tmp_path, t)
    try:
        yield made
    finally:
        made.sim.close()


def alarms_of(agent: Agent) -> list[tuple[str, str]]:
    """The alarms an agent that never connected holds for its first connection."""
    return [(kind, detail) for kind, _, detail in agent._pending_alarms]


def test_a_forged_step_forward_does_not_hold_commands_after_a_restart(site: Site,
                                                                      t: FakeTime) -> None:
    t.synced = True
    first = site.agent()
    try:
        assert site.accepts_a_command(first)
        t.advance(60)
        first._persist_trusted_time()  # the minute job
        # A forged NTP answer steps the clock ten years ahead; the kernel stays
        # "synchronized", so rule 3 accepts the step and commands are still judged.
        t.step_wall(TEN_YEARS)
        assert first.clock.trusted() == (True, "")
        [(kind, detail)] = alarms_of(first)
        assert kind == "clock_step"
        assert "forward by 3650 days" in detail
        t.advance(60)
        first._persist_trusted_time()
    finally:
        first.stop()  # saves the trusted time once more, still forged
    saved = site.saved()
    assert saved <= NOW + 120 + FLOOR_MARGIN_S, gateway.clock.rfc3339(saved)

    # NTP is fixed and the box restarts at the real time.
    t.step_wall(-TEN_YEARS)
    t.advance(30)
    second = site.agent()
    try:
        # Before the fix: clock_untrusted for every command until ten years from now.
        assert site.accepts_a_command(second), second.clock.trusted()
        assert alarms_of(second) == []  # nothing was wrong with what the first run saved
    finally:
        second.stop()


@pytest.mark.parametrize("stored", ["2111443320.0", "nan", "inf", "-5", "1e400", "junk\n"])
def test_an_invalid_or_unreadable_floor_is_dropped_with_an_alarm(
        site: Site, t: FakeTime, stored: str) -> None:
    site.seed(last_trusted_time=stored)
    t.synced = True
    agent = site.agent()
    try:
        assert agent.clock.floor == BUILD_FLOOR  # the proven time of a first run
        assert site.accepts_a_command(agent)
        [(kind, detail)] = alarms_of(agent)
        assert kind == "clock_floor_invalid"
        assert "\n" not in detail
    finally:
        agent.stop()
    assert site.saved() <= t.wall  # rewritten, bounded


def test_the_proven_time_accumulates_over_runs_and_bounds_the_floor(
        site: Site, t: FakeTime) -> None:
    t.synced = True
    for _ in range(3):
        agent = site.agent()
        try:
            t.advance(DAY)
            agent._persist_trusted_time()
        finally:
            agent.stop()
        t.advance(DAY)  # switched off for a day: not proven
    assert site.saved("clock_proven_time") == BUILD_FLOOR + 3 * DAY
    assert site.saved() == BUILD_FLOOR + 3 * DAY + FLOOR_MARGIN_S
    # A floor within the margin is this version's own: kept, no alarm.
    agent = site.agent()
    try:
        assert agent.clock.floor == BUILD_FLOOR + 3 * DAY + FLOOR_MARGIN_S
        assert alarms_of(agent) == []
    finally:
        agent.stop()


# ============================================ over a real broker, the control socket and CLI


# A simulated site on a real Mosquitto; the agent runs on the real clocks.
live = pytest.fixture(sim_site.site_on_own_broker, name="live")


def seed(site: SimSite, **meta: str) -> None:
    """The state a previous run left in the site's database."""
    db = site.directory / "state" / "gateway.db"
    db.parent.mkdir(exist_ok=True)
    with Store(db) as store:
        for key, value in meta.items():
            store.set_meta(key, value)


def cli(site: SimSite, *argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = main([*argv, "--config", str(site.config_path)], out=out, err=err)
    return status, out.getvalue(), err.getvalue()


def alarm(client: Client, kind: str) -> dict[str, Any]:
    [message] = client.expect(f"{PREFIX}/alarm", 10,
                              where=lambda m: json.loads(m.payload)["kind"] == kind)
    payload: dict[str, Any] = json.loads(message.payload)
    return payload


def lock_result(site: SimSite, client: Client) -> dict[str, Any]:
    """A fresh signed ``lock`` over MQTT, and its result."""
    jti, token = site.signer.command("lock", "unit_a101")
    client.publish(f"{PREFIX}/cmd", token, qos=1)
    [message] = client.expect(f"{PREFIX}/cmd/result", 10,
                              where=lambda m: json.loads(m.payload)["jti"] == jti)
    result: dict[str, Any] = json.loads(message.payload)
    return result


def test_an_invalid_floor_at_start_is_an_alarm_on_the_broker(live: SimSite) -> None:
    seed(live, last_trusted_time=repr(time.time() + TEN_YEARS))
    client = live.client()
    try:
        with RunningAgent(live.config_path):
            found = alarm(client, "clock_floor_invalid")
            assert "beyond what this box's run time proves" in found["detail"]
            # Before the fix: rejected clock_untrusted for ten years.
            assert lock_result(live, client)["status"] == "done"
    finally:
        client.close()


def test_reset_floor_through_the_running_agent(live: SimSite) -> None:
    # A floor a day ahead that the proven time vouches for (a drifted or edited
    # database): valid, so the clock is held back until someone resets it.
    ahead = repr(time.time() + DAY)
    seed(live, last_trusted_time=ahead, clock_proven_time=ahead)
    client = live.client()
    try:
        with RunningAgent(live.config_path):
            assert lock_result(live, client)["reason"] == "clock_untrusted"
            status, out, err = cli(live, "clock", "--json")
            assert (status, err) == (0, "")
            assert json.loads(out)["trusted"] is False

            status, out, err = cli(live, "clock", "--reset-floor", "--json")
            assert (status, err) == (0, ""), err
            answer = json.loads(out)
            assert answer["through_agent"] is True
            assert answer["saved"] is True
            assert answer["floor"] == rfc3339(BUILD_FLOOR, timespec="seconds")
            assert answer["clock"]["trusted"] is True
            found = alarm(client, "clock_floor_reset")
            assert "technician" in found["detail"]
            assert lock_result(live, client)["status"] == "done"
            status, out, _ = cli(live, "clock")
            assert status == 0
            assert re.search(r"trusted\s+yes", out), out
    finally:
        client.close()
    with Store(live.directory / "state" / "gateway.db") as store:
        # Saved at once, then by the shutdown at the wall time: no longer a day ahead.
        assert float(store.meta("last_trusted_time") or "nan") <= time.time()


def test_reset_floor_on_the_database_while_the_agent_is_stopped(live: SimSite) -> None:
    ahead = repr(time.time() + DAY)
    seed(live, last_trusted_time=ahead, clock_proven_time=ahead)
    status, out, err = cli(live, "clock", "--json")
    assert (status, err) == (0, "")
    shown = json.loads(out)
    assert (shown["agent"], shown["floor_ok"]) == ("not running", False)

    status, out, err = cli(live, "clock", "--reset-floor")
    assert (status, err) == (0, "")
    assert "trusted-time floor reset from" in out
    assert "to 2026-11-01T00:00:00Z by technician" in out
    assert json.loads(cli(live, "clock", "--json")[1])["floor_ok"] is True

    client = live.client()
    try:
        with RunningAgent(live.config_path):
            # Reported at the next start, naming who did it.
            found = alarm(client, "clock_floor_reset")
            assert "by technician" in found["detail"]
            assert "while the agent was stopped" in found["detail"]
            assert lock_result(live, client)["status"] == "done"
    finally:
        client.close()


def test_stora_s_date_confirms_a_clock_behind_the_floor(tmp_path: Path) -> None:
    """Nothing to post, the wall clock five minutes behind a valid floor: the agent asks
    Stora (a real local HTTP server) for its Date, which confirms the wall clock."""
    now = time.time()
    with Broker(tmp_path / "broker") as broker, Sandbox(static_tokens={STORA_TOKEN}) as sandbox:
        live = make_site(tmp_path, broker, stora_url=sandbox.api_url)
        seed(live, last_trusted_time=repr(now + 300), clock_proven_time=repr(now - 100))
        client = live.client()
        try:
            # The minute job that saves the floor also asks; shrunk so the test is short.
            with RunningAgent(live.config_path, job_intervals={"clock.persist": 0.2}):
                found = alarm(client, "clock_floor_lowered")
                assert "a server's Date" in found["detail"]
                assert lock_result(live, client)["status"] == "done"
        finally:
            client.close()
            live.close()
    with Store(live.directory / "state" / "gateway.db") as store:
        assert float(store.meta("last_trusted_time") or "nan") < now + 300
