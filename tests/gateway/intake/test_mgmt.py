"""Remote management on ``P/S/mgmt`` (gateway/intake/mgmt.py): a real Mosquitto, simulators on
ptys, signed requests, an in-process agent.  ``config.set`` is in
tests/gateway/intake/test_mgmt_config_set.py."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import pytest

from devkit.broker_client import Client
from devkit.mosquitto import Broker
from devkit.signer import CommandSigner, generate_keypair
from devkit.site import PREFIX, SITE, RunningAgent, SimSite, make_site
from tests.support.mgmt import answer, ask, command_result, sha

pytestmark = pytest.mark.simulator_only


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


def test_config_get_returns_the_file_text_and_its_hash(site: SimSite, client: Client) -> None:
    with RunningAgent(site.config_path):
        res = answer(client, ask(site, client, "config.get"))
    assert res["status"] == "done", res
    assert res["result"]["sha256"] == sha(site.config_path)
    assert res["result"]["toml"] == site.config_path.read_text()
    assert res["result"]["next_offset"] is None
    # The secret's bytes never travel, only the path of its file.
    assert "test-token" not in json.dumps(res)


def test_config_get_of_a_large_site_comes_in_pages_under_the_broker_limit(
        tmp_path: Path) -> None:
    """Found in review: a large site's config (about 380 locks passes 64 KiB) made an
    answer over the broker's max_packet_size, and the broker dropped the agent.  Pages
    of at most 32 KiB as JSON, on a broker that enforces 64 KiB like deploy/'s."""
    with Broker(tmp_path / "broker", max_packet_size=65536) as broker:
        site = make_site(tmp_path, broker)
        try:
            # A config as long as one with hundreds of locks; comments cost the same bytes
            # and leave the simulated bus alone.  Quotes and backslashes: JSON doubles them.
            filler = "".join(f'# lock "{n:04d}" \\ wired at bay {n}\n' for n in range(3000))
            site.config_path.write_text(site.config_path.read_text() + filler)
            assert site.config_path.stat().st_size > 100_000
            client = site.client()
            client.subscribe(f"{PREFIX}/mgmt/result")
            pages: list[dict[str, Any]] = []
            with RunningAgent(site.config_path) as agent:
                offset: int | None = 0
                while offset is not None:
                    args = {"offset": offset} if offset else {}
                    res = answer(client, ask(site, client, "config.get", args=args))
                    assert res["status"] == "done", res
                    pages.append(res["result"])
                    offset = res["result"]["next_offset"]
                assert agent.link.connected
                jti, token = site.signer.command("lock", "unit_a101")
                client.publish(f"{PREFIX}/cmd", token, qos=1)
                assert command_result(client, jti)["status"] == "done"
            sizes = [len(m.payload) for m in client.messages(f"{PREFIX}/mgmt/result")]
        finally:
            site.close()
    assert len(pages) >= 4
    assert max(sizes) < 40 * 1024, sizes
    text = "".join(p["toml"] for p in pages)
    assert text == site.config_path.read_text()
    assert {p["sha256"] for p in pages} == {hashlib.sha256(text.encode()).hexdigest()}


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
        forged = [ask(site, client, "log.level", signer=stranger, args={"level": "DEBUG"}),
                  ask(site, client, "log.level", signer=unknown, args={"level": "DEBUG"})]
        # Their ids are the forger's word: answered without them (found in review).
        unverified = client.expect(f"{PREFIX}/mgmt/result", 10, count=2,
                                   where=lambda m: json.loads(m.payload)["jti"] is None)
        assert sorted(json.loads(m.payload)["reason"] for m in unverified) == [
            "bad_signature", "unknown_key"]
        assert all(json.loads(m.payload)["cmd"] is None for m in unverified)
        cases = {
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
        # A retained message is refused before its signature is judged: no ids either.
        client.expect(f"{PREFIX}/mgmt/result", 10, where=lambda m: json.loads(m.payload)[
            "reason"] == "retained" and json.loads(m.payload)["jti"] is None)
        client.publish(f"{PREFIX}/mgmt", b"", qos=1, retain=True)  # clear it
        # None of them ran, and none was recorded as seen.
        assert logging.getLogger().level == level
        for jti in [*forged, *cases, retained]:
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


def test_a_flood_of_one_forged_request_is_shed_like_one_on_the_command_topic(
        site: SimSite, client: Client, caplog: pytest.LogCaptureFixture) -> None:
    """Found in review: P/S/mgmt had none of the command topic's shedding (each repeat
    cost a full signature check and an INFO line) and counted each rejection twice.
    Now a repeat is refused from the cache (gateway/intake/screen.py), counted once, logged at
    debug level only, and its answers stay within the rejection bucket."""
    stranger = CommandSigner(generate_keypair()[0], "test-2026", SITE)
    _, forged = stranger.command("log.level", args={"level": "DEBUG"})
    count = 300
    caplog.set_level(logging.INFO, logger="gateway.intake.mgmt")
    with RunningAgent(site.config_path) as agent:
        for _ in range(count):
            client.publish(f"{PREFIX}/mgmt", forged, qos=1)
        marker = ask(site, client, "status")
        assert answer(client, marker, timeout=30)["status"] == "done"
        counters = dict(agent.mgmt.counters)
    assert counters["rejected"] == count
    assert counters["refused_again"] == count - 1
    answers = [m for m in client.messages(f"{PREFIX}/mgmt/result")
               if json.loads(m.payload)["reason"] == "bad_signature"]
    assert 0 < len(answers) < count  # the bucket: a burst, then its rate
    assert not [r for r in caplog.records if "rejected" in r.getMessage()]


def test_an_answer_too_large_for_the_broker_is_shrunk_not_lost(site: SimSite,
                                                               client: Client) -> None:
    """Found in review: an answer over mqtt.max_packet_bytes (here outbox.retry of 15,000
    dead letters, its list of numbers ~90 KB) was refused by the link and lost, logged as
    "broker not connected".  It goes out cut to its summary, saying so."""
    from gateway.outbox.timeline import external_id_for, make_event

    with RunningAgent(site.config_path) as agent:
        with agent.store.transaction() as tx:
            for n in range(15_000):
                tx.add_event(make_event(
                    "locked", app_name="TestGate", site_id=SITE, unit="unit_a101",
                    reference="A-101", external_id=external_id_for("big", str(n)),
                    occurred_at=time.time()))
        seqs = [e.seq for e in agent.store.events(limit=20_000)]
        with agent.store.transaction() as tx:
            for seq in seqs:
                tx.mark_dead(seq, generation=0, unanswered_since=None, attempts=1,
                             status=422, code="invalid", error={}, dead_at=time.time())
        res = answer(client, ask(site, client, "outbox.retry", args={"all_dead": True}),
                     timeout=30)
        assert agent.link.connected
    assert res["status"] == "done", res
    assert "over mqtt.max_packet_bytes (65536)" in res["result"]["omitted"]
