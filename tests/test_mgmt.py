"""Remote management on ``P/S/mgmt`` (gateway/mgmt.py): a real Mosquitto, simulators on
ptys, signed requests, an in-process agent."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from gateway.signer import CommandSigner, generate_keypair
from tests.support.broker import Broker, Client
from tests.support.site import PREFIX, SITE, RunningAgent, SimSite, make_site

pytestmark = pytest.mark.simulator_only


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    with Broker(tmp_path / "broker") as b:
        yield b


@pytest.fixture
def site(tmp_path: Path, broker: Broker) -> Iterator[SimSite]:
    s = make_site(tmp_path, broker)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def client(site: SimSite) -> Client:
    c = site.client()
    c.subscribe(f"{PREFIX}/mgmt/result")
    return c


def ask(site: SimSite, client: Client, cmd: str, *, signer: CommandSigner | None = None,
        retain: bool = False, **claims: Any) -> str:
    """Send one signed management request; its jti."""
    jti, token = (signer or site.signer).command(cmd, **claims)
    client.publish(f"{PREFIX}/mgmt", token, qos=1, retain=retain)
    return jti


def answer(client: Client, jti: str, timeout: float = 10.0, count: int = 1) -> dict[str, Any]:
    msgs = client.expect(f"{PREFIX}/mgmt/result", timeout, count=count,
                         where=lambda m: json.loads(m.payload).get("jti") == jti)
    return json.loads(msgs[count - 1].payload)  # type: ignore[no-any-return]


def command_result(client: Client, jti: str, timeout: float = 10.0) -> dict[str, Any]:
    msgs = client.expect(f"{PREFIX}/cmd/result", timeout,
                         where=lambda m: json.loads(m.payload).get("jti") == jti)
    return json.loads(msgs[0].payload)  # type: ignore[no-any-return]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- read-only requests ----------------------------------------------------------------


def test_status_answers_with_the_agent_status(site: SimSite, client: Client) -> None:
    with RunningAgent(site.config_path):
        res = answer(client, ask(site, client, "status", actor="ops dashboard"))
    assert res["status"] == "done", res
    assert res["cmd"] == "status"
    assert res["reason"] is None
    assert res["result"]["online"] is True
    assert res["result"]["site"] == SITE
    assert res["result"]["broker"]["connected"] is True


def test_config_get_returns_the_redacted_config_and_the_file_hash(site: SimSite,
                                                                  client: Client) -> None:
    with RunningAgent(site.config_path):
        res = answer(client, ask(site, client, "config.get"))
    assert res["status"] == "done", res
    assert res["result"]["sha256"] == sha(site.config_path)
    assert res["result"]["config"]["site"]["id"] == SITE
    assert res["result"]["config"]["stora"]["token_file"].endswith("token")
    # The secret's bytes never travel, only the path of its file.
    assert "test-token" not in json.dumps(res)


def test_unknown_args_are_malformed(site: SimSite, client: Client) -> None:
    with RunningAgent(site.config_path):
        res = answer(client, ask(site, client, "status", args={"verbose": True}))
    assert (res["status"], res["reason"]) == ("rejected", "malformed")
    assert "takes no args" in res["result"]["error"]


# -- the envelope: forged, expired, replayed, retained --------------------------------


def test_forged_expired_and_retained_requests_are_rejected_like_commands(
        site: SimSite, client: Client) -> None:
    stranger = CommandSigner(generate_keypair()[0], "test-2026", SITE)  # same kid, other key
    unknown = CommandSigner(generate_keypair()[0], "nobody", SITE)
    other_site = CommandSigner(site.signer._key, "test-2026", "site_other")
    level = logging.getLogger().level
    with RunningAgent(site.config_path) as agent:
        cases = {
            ask(site, client, "log.level", signer=stranger, args={"level": "DEBUG"}):
                "bad_signature",
            ask(site, client, "log.level", signer=unknown, args={"level": "DEBUG"}):
                "unknown_key",
            ask(site, client, "log.level", signer=other_site, args={"level": "DEBUG"}):
                "wrong_site",
            ask(site, client, "log.level", args={"level": "DEBUG"},
                iat=int(time.time()) - 200, ttl=60): "expired",
            ask(site, client, "log.level", args={"level": "DEBUG"}, ttl=3600):
                "lifetime_too_long",
            ask(site, client, "reboot"): "malformed",
        }
        for jti, reason in cases.items():
            res = answer(client, jti)
            assert (res["status"], res["reason"]) == ("rejected", reason), res
        retained = ask(site, client, "log.level", args={"level": "DEBUG"}, retain=True)
        res = answer(client, retained)
        assert (res["status"], res["reason"]) == ("rejected", "retained"), res
        client.publish(f"{PREFIX}/mgmt", b"", qos=1, retain=True)  # clear it
        # None of them ran, and none was recorded as seen.
        assert logging.getLogger().level == level
        for jti in [*cases, retained]:
            assert agent.store.command(jti) is None


def test_a_replayed_request_runs_once_and_gets_its_first_result(site: SimSite,
                                                                client: Client) -> None:
    with RunningAgent(site.config_path) as agent:
        jti, token = site.signer.command("locks.test", args={"units": ["A-101"],
                                                             "seconds": 0.3})
        client.publish(f"{PREFIX}/mgmt", token, qos=1)
        client.publish(f"{PREFIX}/mgmt", token, qos=1)  # while the first still runs
        first = answer(client, jti, timeout=30)
        second = answer(client, jti, timeout=30, count=2)
        client.publish(f"{PREFIX}/mgmt", token, qos=1)  # after it ended
        third = answer(client, jti, timeout=10, count=3)
        time.sleep(0.3)
        tests = [e for e in agent.store.events() if "technician test" in e.description]
    assert first["status"] == "done", first
    assert first["duplicate"] is False
    assert first["result"]["passed"] is True
    for copy in (second, third):
        assert copy["duplicate"] is True
        assert copy["result"] == first["result"]
    # One test cycle only: one unlock and one relock record.
    assert len(tests) == 2, [e.description for e in tests]


def test_a_command_jti_reused_for_a_request_never_runs_it(site: SimSite,
                                                          client: Client) -> None:
    with RunningAgent(site.config_path):
        jti, token = site.signer.command("lock", "unit_a101")
        client.publish(f"{PREFIX}/cmd", token, qos=1)
        assert command_result(client, jti)["status"] == "done"
        ask(site, client, "log.level", jti=jti, args={"level": "DEBUG"})
        res = answer(client, jti)
    assert (res["status"], res["reason"], res["duplicate"]) == ("rejected", "malformed", True)
    assert logging.getLogger().level != logging.DEBUG


def test_a_request_interrupted_by_a_crash_ends_unknown_and_never_reruns(
        site: SimSite, client: Client) -> None:
    from gateway.config import load_config
    from gateway.store import Store

    # What a crash between the claim and the result leaves behind.
    db = load_config(site.config_path).storage.path
    db.parent.mkdir(parents=True, exist_ok=True)
    with Store(db) as store, store.transaction() as tx:
        assert tx.claim_command("mgmt-crashed", "mgmt:locks.test", None, time.time())
    with RunningAgent(site.config_path) as agent:
        assert agent.store.command("mgmt-crashed").status == "unknown"
        ask(site, client, "locks.test", jti="mgmt-crashed", args={"units": ["A-101"]})
        res = answer(client, "mgmt-crashed")
        # Not announced on the command results: it was not a command.
        time.sleep(0.2)
        assert not any(json.loads(m.payload)["jti"] == "mgmt-crashed"
                       for m in client.messages(f"{PREFIX}/cmd/result"))
        assert not [e for e in agent.store.events() if "technician test" in e.description]
    assert res["status"] == "unknown"
    assert res["duplicate"] is True
    assert res["cmd"] == "locks.test"


# -- config.set ------------------------------------------------------------------------


def test_config_set_applies_a_new_key_live_and_returns_the_hash(site: SimSite,
                                                                client: Client) -> None:
    new_private, new_public = generate_keypair()
    new_signer = CommandSigner(new_private, "relay-2027", SITE)
    old_text = site.config_path.read_text()
    text = old_text.replace(
        "trusted_keys = { test-2026 = ",
        f'trusted_keys = {{ relay-2027 = "{new_public}", test-2026 = ').replace(
        'app_name = "TestGate"', 'app_name = "NewGate"')
    mode = site.config_path.stat().st_mode & 0o777
    with RunningAgent(site.config_path) as agent:
        # Before: the new key is unknown.
        jti, token = new_signer.command("unlock", "unit_a101", dur=1)
        client.publish(f"{PREFIX}/cmd", token, qos=1)
        assert command_result(client, jti)["reason"] == "unknown_key"
        res = answer(client, ask(site, client, "config.set",
                                 args={"toml": text, "expect_sha256": sha(site.config_path)}))
        assert res["status"] == "done", res
        assert res["result"]["applied"] == "live"
        assert sorted(res["result"]["changed"]) == ["commands", "site"]
        assert res["result"]["sha256"] == hashlib.sha256(text.encode()).hexdigest()
        assert res["result"]["sha256"] == sha(site.config_path)
        assert res["result"]["previous_sha256"] == hashlib.sha256(old_text.encode()).hexdigest()
        # After: a command signed by the new key runs, audited under the new app name.
        jti, token = new_signer.command("unlock", "unit_a101", dur=1)
        client.publish(f"{PREFIX}/cmd", token, qos=1)
        assert command_result(client, jti)["status"] == "done"
        assert site.coil("unit_a101") is True
        assert any(e.description.startswith("Unit unlocked via NewGate")
                   for e in agent.store.events())
        assert agent.restart_reason is None
    assert site.config_path.read_text() == text
    assert site.config_path.stat().st_mode & 0o777 == mode
    assert not [p for p in site.config_path.parent.iterdir() if p.name.startswith(".gateway")]


def test_a_bad_config_set_is_rejected_keeps_the_old_config_and_loses_no_command(
        site: SimSite, client: Client) -> None:
    before = site.config_path.read_bytes()
    bad = before.decode().replace("[control]", "[control]\nsocket_mode = 660", 1)
    with RunningAgent(site.config_path) as agent:
        sent = []
        for i in range(10):
            jti, token = site.signer.command("unlock" if i % 2 == 0 else "lock",
                                             "unit_a102", dur=1 if i % 2 == 0 else None)
            client.publish(f"{PREFIX}/cmd", token, qos=1)
            sent.append(jti)
            if i == 4:
                bad_jti = ask(site, client, "config.set", args={"toml": bad})
        res = answer(client, bad_jti)
        outcomes = [command_result(client, jti)["status"] for jti in sent]
        assert agent.config.control.socket == site.socket_path
    assert (res["status"], res["reason"]) == ("rejected", "malformed"), res
    assert "control.socket_mode" in res["result"]["error"]
    assert "current config is kept" in res["result"]["error"]
    assert site.config_path.read_bytes() == before
    assert outcomes == ["done"] * 10
    assert not [p for p in site.config_path.parent.iterdir() if p.name.startswith(".gateway")]


@pytest.mark.parametrize(("edit", "error"), [
    (lambda t: t.replace(f'id = "{SITE}"', 'id = "site_moved"'), "site.id cannot be changed"),
    (lambda t: t + "\n[[", "TOML syntax error"),
    (lambda t: t.replace('controller = "lockers"', 'controller = "nowhere"', 1), "nowhere"),
])
def test_invalid_configs_are_rejected_with_the_reason(site: SimSite, client: Client,
                                                      edit: Any, error: str) -> None:
    before = site.config_path.read_bytes()
    with RunningAgent(site.config_path):
        res = answer(client, ask(site, client, "config.set",
                                 args={"toml": edit(before.decode())}))
    assert (res["status"], res["reason"]) == ("rejected", "malformed"), res
    assert error in res["result"]["error"]
    assert site.config_path.read_bytes() == before


def test_config_set_with_a_stale_hash_is_refused(site: SimSite, client: Client) -> None:
    before = site.config_path.read_bytes()
    with RunningAgent(site.config_path):
        res = answer(client, ask(site, client, "config.set", args={
            "toml": before.decode().replace("TestGate", "Other"), "expect_sha256": "0" * 64}))
    assert (res["status"], res["reason"]) == ("rejected", "stale_version"), res
    assert site.config_path.read_bytes() == before


def test_config_set_rebuilding_the_locks_drops_no_command(site: SimSite,
                                                          client: Client) -> None:
    """Lock settings change while commands stream in: each gets exactly one result, and
    the new unlock time is what the next unlock uses."""
    text = site.config_path.read_text().replace("unlock_seconds = 2", "unlock_seconds = 7")
    with RunningAgent(site.config_path) as agent:
        stop = threading.Event()
        sent: list[str] = []

        def stream() -> None:
            while not stop.is_set():
                jti, token = site.signer.command("lock", "unit_a103")
                client.publish(f"{PREFIX}/cmd", token, qos=1)
                sent.append(jti)
                time.sleep(0.01)

        streamer = threading.Thread(target=stream)
        streamer.start()
        time.sleep(0.2)
        res = answer(client, ask(site, client, "config.set", args={"toml": text}))
        time.sleep(0.2)
        stop.set()
        streamer.join()
        assert res["status"] == "done", res
        assert res["result"] == {**res["result"], "applied": "live", "changed": ["locks"]}
        statuses = [command_result(client, jti)["status"] for jti in sent]
        jti, token = site.signer.command("unlock", "unit_a102")
        client.publish(f"{PREFIX}/cmd", token, qos=1)
        unlocked = command_result(client, jti)
        assert agent.config.locks[0].unlock_seconds == 7
    assert len(sent) > 10
    assert statuses == ["done"] * len(sent)
    relock_in = (datetime.fromisoformat(unlocked["state"]["relock_at"]).timestamp()
                 - datetime.fromisoformat(unlocked["at"]).timestamp())
    assert 6 < relock_in <= 7.5, unlocked


def test_config_set_of_the_broker_settings_restarts_the_agent(site: SimSite,
                                                              client: Client) -> None:
    text = site.config_path.read_text().replace("keepalive_s = 5", "keepalive_s = 10")
    with RunningAgent(site.config_path) as agent:
        res = answer(client, ask(site, client, "config.set", args={"toml": text}))
        assert agent.stop_event.wait(5)
        assert agent.restart_reason is not None
    assert res["status"] == "done", res
    assert (res["result"]["applied"], res["result"]["changed"]) == ("restart", ["mqtt"])
    assert site.config_path.read_text() == text


# -- the other requests ----------------------------------------------------------------


def test_locks_test_runs_the_technician_cycle_remotely(site: SimSite, client: Client) -> None:
    with RunningAgent(site.config_path) as agent:
        res = answer(client, ask(site, client, "locks.test", actor="installer",
                                 args={"units": ["A-101", "unit_b201"], "seconds": 0.3}),
                     timeout=30)
        unknown = answer(client, ask(site, client, "locks.test", args={"units": ["Z-999"]}))
        bad = answer(client, ask(site, client, "locks.test", args={"units": "A-101"}))
        slow = answer(client, ask(site, client, "locks.test",
                                  args={"all": True, "seconds": 600}))
        events = [e.description for e in agent.store.events() if "technician test" in
                  e.description]
    assert res["status"] == "done", res
    assert res["result"]["passed"] is True
    assert [r["reference"] for r in res["result"]["results"]] == ["A-101", "B-201"]
    assert all(r["unlock_ms"] is not None and r["relock_ms"] is not None
               for r in res["result"]["results"])
    assert len(events) == 4
    assert all("remote installer" in e for e in events)
    assert (unknown["status"], unknown["reason"]) == ("rejected", "unknown_unit")
    assert "Z-999" in unknown["result"]["error"]
    assert (bad["status"], bad["reason"]) == ("rejected", "malformed")
    assert (slow["status"], slow["reason"]) == ("rejected", "malformed")
    assert site.coil("unit_a101") is False


def test_outbox_retry_remotely(site: SimSite, client: Client) -> None:
    with RunningAgent(site.config_path) as agent:
        none = answer(client, ask(site, client, "outbox.retry", args={"seq": 12345}))
        every = answer(client, ask(site, client, "outbox.retry", args={"all_dead": True}))
        both = answer(client, ask(site, client, "outbox.retry",
                                  args={"all_dead": True, "seq": 1}))
        # A real dead letter, retried remotely.
        jti, token = site.signer.command("unlock", "unit_a101", dur=1)
        client.publish(f"{PREFIX}/cmd", token, qos=1)
        command_result(client, jti)
        [event] = [e for e in agent.store.events() if "unlocked" in e.description]
        with agent.store.transaction() as tx:
            tx.mark_dead(event.seq, generation=0, unanswered_since=None, attempts=1,
                         status=422, code="validation_error", error={"message": "test"},
                         dead_at=time.time())
        retried = answer(client, ask(site, client, "outbox.retry", args={"seq": event.seq}))
        after = agent.store.event(event.seq)
    assert (none["status"], none["reason"]) == ("rejected", "malformed")
    assert "12345" in none["result"]["error"]
    assert (every["status"], every["result"]) == ("done", {"retried": []})
    assert (both["status"], both["reason"]) == ("rejected", "malformed")
    assert retried["status"] == "done", retried
    assert retried["result"] == {"retried": [event.seq]}
    assert after is not None
    assert after.state == "pending"


def test_state_republish_sends_every_unit_and_the_status_again(site: SimSite,
                                                               client: Client) -> None:
    with RunningAgent(site.config_path):
        client.expect(f"{PREFIX}/units/unit_b202", 10)
        time.sleep(0.3)
        client.clear()
        res = answer(client, ask(site, client, "state.republish"))
        for unit in ("unit_a101", "unit_a102", "unit_a103", "unit_b201", "unit_b202"):
            client.expect(f"{PREFIX}/units/{unit}", 5)
        status = client.expect(f"{PREFIX}/status", 5)
    assert res["status"] == "done", res
    assert res["result"] == {"units": 5}
    assert json.loads(status[-1].payload)["online"] is True


def test_log_level_changes_the_agent_log_level(site: SimSite, client: Client) -> None:
    root = logging.getLogger()
    saved = root.level
    root.setLevel(logging.INFO)
    try:
        with RunningAgent(site.config_path):
            res = answer(client, ask(site, client, "log.level", args={"level": "debug"}))
            level = root.level
            bad = answer(client, ask(site, client, "log.level", args={"level": "TRACE"}))
    finally:
        root.setLevel(saved)
    assert res["status"] == "done", res
    assert res["result"] == {"level": "DEBUG", "previous": "INFO"}
    assert level == logging.DEBUG
    assert (bad["status"], bad["reason"]) == ("rejected", "malformed")
