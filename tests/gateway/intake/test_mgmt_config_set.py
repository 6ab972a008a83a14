"""Remote management's ``config.set`` (gateway/intake/mgmt.py, gateway/intake/remote_config.py):
what it may change, how it applies, what it refuses; a real Mosquitto and an in-process agent."""

from __future__ import annotations

import hashlib
import json
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from devkit.broker_client import Client
from devkit.mosquitto import Broker
from devkit.signer import generate_keypair
from devkit.site import PREFIX, AgentProcess, RunningAgent, SimSite, make_site
from tests.support.mgmt import answer, ask, command_result, sha

pytestmark = pytest.mark.simulator_only


# -- config.set ------------------------------------------------------------------------


def test_config_set_applies_commands_and_telemetry_live_and_returns_the_hash(
        site: SimSite, client: Client) -> None:
    old_text = site.config_path.read_text()
    text = old_text.replace('clock = "system"', 'clock = "system"\nclock_skew_s = 5') + (
        "\n[telemetry]\ninterval_s = 7\n")
    mode = site.config_path.stat().st_mode & 0o777
    with RunningAgent(site.config_path) as agent:
        res = answer(client, ask(site, client, "config.set",
                                 args={"toml": text, "expect_sha256": sha(site.config_path)}))
        assert res["status"] == "done", res
        assert res["result"]["applied"] == "live"
        assert sorted(res["result"]["changed"]) == ["commands", "telemetry"]
        assert res["result"]["sha256"] == hashlib.sha256(text.encode()).hexdigest()
        assert res["result"]["sha256"] == sha(site.config_path)
        assert res["result"]["previous_sha256"] == hashlib.sha256(old_text.encode()).hexdigest()
        # Applied: the tighter skew judges the next command, the job runs every 7 s.
        jti, token = site.signer.command("unlock", "unit_a101", dur=1,
                                         iat=int(time.time()) - 30, ttl=20)
        client.publish(f"{PREFIX}/cmd", token, qos=1)
        assert command_result(client, jti)["reason"] == "expired"
        assert agent.scheduler.stats()["jobs"]["telemetry.publish"]["interval_s"] == 7
        assert agent.restart_reason is None
    assert site.config_path.read_text() == text
    assert site.config_path.stat().st_mode & 0o777 == mode
    assert not [p for p in site.config_path.parent.iterdir() if p.name.startswith(".gateway")]


@pytest.mark.parametrize(("edit", "refused"), [
    (lambda t, k: t.replace("trusted_keys = { test-2026 = ",
                            f'trusted_keys = {{ mine = "{k}", test-2026 = '),
     "commands.trusted_keys.mine"),
    (lambda t, k: t.replace('clock = "system"', 'clock = "system"\nmax_lifetime_s = 86400'),
     "commands.max_lifetime_s"),
    # Tighter, but so tight that the relay's own lockouts (300 s) and a relay clock a
    # second off would be refused: one request would lock the relay out (found in review).
    (lambda t, k: t.replace('clock = "system"', 'clock = "system"\nmax_lifetime_s = 1'),
     "commands.max_lifetime_s (remotely at least 300)"),
    (lambda t, k: t.replace('clock = "system"', 'clock = "system"\nclock_skew_s = 0'),
     "commands.clock_skew_s (remotely at least 5)"),
    (lambda t, k: t.replace("unlock_seconds = 2", "unlock_seconds = 3600", 1),
     "locks[unit_a101].unlock_seconds (remotely at most 300)"),
    (lambda t, k: t.replace("max_per_second = 10", "max_per_second = 50"),
     "stora.max_per_second"),
    (lambda t, k: t.replace("http://127.0.0.1:9/2025-09", "https://attacker.example/x"),
     "stora.base_url"),
    (lambda t, k: t.replace('token_file = "', 'token_file = "/etc/../', 1), "stora.token_file"),
    (lambda t, k: t.replace('client_id = "agent-under-test"', 'client_id = "other"'),
     "mqtt.client_id"),
    (lambda t, k: t.replace("state' / 'gateway.db", "x").replace(
        "/state/gateway.db", "/moved.db"), "storage.path"),
])
def test_config_set_may_not_touch_trust_endpoints_or_storage(
        site: SimSite, client: Client, edit: Any, refused: str) -> None:
    """A signed request must not add keys, loosen freshness, send events or a secret
    file to another host, or move the state (found in review: it could)."""
    before = site.config_path.read_bytes()
    text = edit(before.decode(), generate_keypair()[1])
    assert text != before.decode()
    with RunningAgent(site.config_path) as agent:
        res = answer(client, ask(site, client, "config.set", args={"toml": text}))
        assert agent.restart_reason is None
    assert (res["status"], res["reason"]) == ("rejected", "malformed"), res
    assert "only be changed on the gateway itself" in res["result"]["error"]
    assert refused in res["result"]["error"]
    assert site.config_path.read_bytes() == before


def _swap_channels(text: str) -> str:
    """A-101 on A-102's relay and the other way round."""
    return (text.replace('reference = "A-101"\ncontroller = "bus1"\nchannel = 0\n',
                         'reference = "A-101"\ncontroller = "bus1"\nchannel = 9\n')
            .replace('reference = "A-102"\ncontroller = "bus1"\nchannel = 1\n',
                     'reference = "A-102"\ncontroller = "bus1"\nchannel = 0\n')
            .replace("channel = 9\n", "channel = 1\n"))


@pytest.mark.parametrize(("edit", "refused"), [
    # Found in review: pyserial's spy:// handler truncates and writes the file it names
    # (here the agent's own database) while the doors keep working.
    (lambda t: t.replace('driver = "lockboard"\nport = "', 'driver = "lockboard"\nport = "'
                         '/dev/ttyUSB3"\n# was "', 1), "controllers[lockers].port"),
    (_swap_channels, "locks[unit_a101].channel"),
    (lambda t: t.replace('reference = "A-103"\ncontroller = "bus1"\nchannel = 2\n',
                         'reference = "A-103"\ncontroller = "bus1"\nchannel = 2\n'
                         'energize_to = "lock"\n'), "locks[unit_a103].energize_to"),
    (lambda t: t.replace('door_input = 0\n', 'door_input = 3\n', 1),
     "locks[unit_a101].door_input"),
    (lambda t: t.replace('reference = "A-101"', 'reference = "A-999"'),
     "locks[unit_a101].reference"),
    (lambda t: t.replace("address = 0\n", "address = 5\n", 1), "controllers[lockers].address"),
    (lambda t: t + '[[locks]]\nunit = "unit_new"\nreference = "N-1"\ncontroller = "bus1"\n'
                   "channel = 3\n", "locks[unit_new] (added)"),
])
def test_config_set_may_not_rewire_the_site(site: SimSite, client: Client, edit: Any,
                                            refused: str) -> None:
    """Lock wiring and bus endpoints are on-site only: a flipped energize_to makes
    "locked" physically open while read-back says locked; swapped channels make a
    tenant's unlock open another unit with a false audit trail (found in review)."""
    before = site.config_path.read_bytes()
    text = edit(before.decode())
    assert text != before.decode()
    db = site.directory / "state" / "gateway.db"
    with RunningAgent(site.config_path) as agent:
        db_before = db.read_bytes()[:16]
        res = answer(client, ask(site, client, "config.set", args={"toml": text}))
        assert agent.restart_reason is None
        assert not [m for m in client.messages(f"{PREFIX}/alarm")
                    if json.loads(m.payload)["kind"] == "config_changed"]
    assert (res["status"], res["reason"]) == ("rejected", "malformed"), res
    assert refused in res["result"]["error"]
    assert site.config_path.read_bytes() == before
    assert db.read_bytes()[:16] == db_before == b"SQLite format 3\0"


def test_config_set_refuses_a_spy_port_even_where_it_would_be_a_new_controller(
        site: SimSite, client: Client) -> None:
    """Defence in depth: the config's own rule refuses the spy:// URL before any
    comparison, so the file it names is never opened."""
    victim = site.directory / "victim"
    victim.write_bytes(b"precious")
    text = site.config_path.read_text().replace(
        f'port = "{site.modbus.path}"', f'port = "spy://{site.modbus.path}?file={victim}"')
    with RunningAgent(site.config_path):
        res = answer(client, ask(site, client, "config.set", args={"toml": text}))
    assert (res["status"], res["reason"]) == ("rejected", "malformed"), res
    assert "controllers[0].port" in res["result"]["error"]
    assert "spy:// is not allowed" in res["result"]["error"]
    assert victim.read_bytes() == b"precious"


def test_an_accepted_config_set_is_alarmed_and_put_on_the_timeline(
        site: SimSite, client: Client) -> None:
    text = site.config_path.read_text().replace("unlock_seconds = 2", "unlock_seconds = 3", 1)
    import gateway.intake.mgmt

    with RunningAgent(site.config_path) as agent:
        # A restart-needing change (locks); not within the uptime guard for this test.
        agent.started_at -= gateway.intake.mgmt.RESTART_MIN_UPTIME_S
        jti = ask(site, client, "config.set", actor="ops dashboard", args={"toml": text})
        res = answer(client, jti)
        assert res["status"] == "done", res
        alarm = json.loads(client.expect(f"{PREFIX}/alarm", 5, where=lambda m: json.loads(
            m.payload)["kind"] == "config_changed")[0].payload)
        events = [e for e in agent.store.events() if e.kind == "config_changed"]
    assert jti in alarm["detail"]
    assert "remote ops dashboard" in alarm["detail"]
    assert "locks" in alarm["detail"]
    assert len(events) == 1
    assert events[0].description.startswith(
        "Gateway configuration changed via TestGate — sections locks; sha256 ")
    assert events[0].actor == "remote ops dashboard"


def test_a_request_that_expires_while_waiting_is_not_run(
        site: SimSite, client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    with RunningAgent(site.config_path) as agent:
        real_test = agent.ops.test

        def slow_test(params: Any, actor: str) -> Any:  # a long locks.test all:true
            time.sleep(3)
            return real_test(params, actor)

        monkeypatch.setattr(agent.ops, "test", slow_test)
        first = ask(site, client, "locks.test", args={"units": ["A-101"], "seconds": 0.3})
        now = int(time.time())
        # Fresh on arrival (exp + 30 s skew is 1-2 s away), stale once the one ahead ends.
        late = ask(site, client, "locks.test", args={"units": ["A-102"], "seconds": 0.3},
                   iat=now - 40, exp=now - 29)
        assert answer(client, first, timeout=30)["status"] == "done"
        res = answer(client, late, timeout=30)
        tested = [e.description for e in agent.store.events() if "A-102" in e.description]
    assert (res["status"], res["reason"]) == ("rejected", "expired"), res
    assert not tested


def test_config_set_of_locks_restarts_the_agent_and_loses_no_command(
        site: SimSite, client: Client) -> None:
    """A change that needs a new process: answered, the agent exits 75 (systemd
    restarts it), commands sent while it is down run after the start, and the new
    settings are in force."""
    text = site.config_path.read_text().replace("unlock_seconds = 2", "unlock_seconds = 7")
    agent = AgentProcess(site, restart_min_uptime_s=0)
    agent.start()
    try:
        res = answer(client, ask(site, client, "config.set", args={"toml": text}))
        assert res["status"] == "done", res
        assert (res["result"]["applied"], res["result"]["changed"]) == ("restart", ["locks"])
        assert agent.proc is not None
        assert agent.proc.wait(timeout=20) == 75, agent.log()
        sent = []
        for unit in ("unit_a102", "unit_a103"):
            jti, token = site.signer.command("unlock", unit)  # the lock's default time
            client.publish(f"{PREFIX}/cmd", token, qos=1)
            sent.append(jti)
        agent.start()  # what systemd does on exit 75 (RestartForceExitStatus)
        results = [command_result(client, jti, timeout=20) for jti in sent]
    finally:
        agent.stop()
    assert [r["status"] for r in results] == ["done", "done"]
    for r in results:
        relock_in = (datetime.fromisoformat(r["state"]["relock_at"]).timestamp()
                     - datetime.fromisoformat(r["at"]).timestamp())
        assert 6 < relock_in <= 7.5, r
    assert site.config_path.read_text() == text


def test_a_restart_soon_after_a_start_is_refused(site: SimSite, client: Client) -> None:
    """Restarts count towards the unit's start limit: a series of config.sets must not
    leave the service "failed"."""
    before = site.config_path.read_bytes()
    text = before.decode().replace("keepalive_s = 5", "keepalive_s = 10")
    with RunningAgent(site.config_path) as agent:
        res = answer(client, ask(site, client, "config.set", args={"toml": text}))
        assert not agent.stop_event.is_set()
    assert (res["status"], res["reason"]) == ("failed", None), res
    assert "try again in" in res["result"]["error"]
    assert site.config_path.read_bytes() == before


def test_config_set_of_the_broker_keepalive_restarts_the_agent(
        site: SimSite, client: Client) -> None:
    text = site.config_path.read_text().replace("keepalive_s = 5", "keepalive_s = 10")
    with RunningAgent(site.config_path, restart_min_uptime_s=0.0) as agent:
        res = answer(client, ask(site, client, "config.set", args={"toml": text}))
        assert agent.stop_event.wait(5)
        assert agent.restart_reason is not None
    assert res["status"] == "done", res
    assert (res["result"]["applied"], res["result"]["changed"]) == ("restart", ["mqtt"])
    assert site.config_path.read_text() == text


def test_config_set_through_a_symlinked_config_replaces_the_target_and_keeps_the_link(
        tmp_path: Path, broker: Broker) -> None:
    """deploy/: /etc/stora-gateway (root's) holds gateway.toml as a link to the file in
    the one directory the agent may write.  The new file goes there; the link stays, and
    relative paths keep resolving against the link's directory."""
    site = make_site(tmp_path, broker)
    try:
        staged = tmp_path / "staged"
        staged.mkdir()
        real = staged / "gateway.toml"
        text = site.config_path.read_text().replace(
            f'token_file = "{tmp_path / "token"}"', 'token_file = "token"')
        real.write_text(text)
        site.config_path.unlink()
        site.config_path.symlink_to(real)
        client = site.client()
        client.subscribe(f"{PREFIX}/mgmt/result")
        new = text.replace("keepalive_s = 5", "keepalive_s = 5\n# tuned remotely")
        with RunningAgent(site.config_path):
            res = answer(client, ask(site, client, "config.set", args={"toml": new}))
        assert res["status"] == "done", res
        assert site.config_path.is_symlink()
        assert real.read_text() == new
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".gateway.toml")]
    finally:
        site.close()


