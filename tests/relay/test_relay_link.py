"""The relay's MQTT link (contract §4, §7.2, §7.3) against a real Mosquitto.

A fake gateway (tests/support/relay_gateway.py) answers, stays silent or refuses; the last
test drives the real agent on simulated hardware.  Invariants: a committed command reaches
the gateway unless it expired first, always under its recorded ``jti`` (re-published with
the same token); a lockout is made again (new ``jti``, same ``ver``) until confirmed;
results land on the right record, late ones too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import random
import re
import time
from pathlib import Path

import pytest

from devkit.mosquitto import Broker
from devkit.site import SITE as GW_SITE
from devkit.site import RunningAgent, make_site
from devkit.testing import wait_for
from devkit.tls_files import make_tls_files
from relay.commands import apply_result
from relay.db.models import OperatorSite, Site, UnitState
from relay.keys import trusted_keys_line
from relay.link import RelayLink, backoff_delay
from relay.operators import StoraSite
from relay.stora import TokenSet
from sitelink.payloads import result_payload
from tests.support import relay_gateway
from tests.support.relay_gateway import (
    FAST,
    PREFIX,
    SITE,
    SITE2,
    FakeGateway,
    LinkRunner,
    Relay,
    done,
    make_relay,
    silent,
)

T0 = 1_780_000_000_000


relay = pytest.fixture(relay_gateway.relay)
gateway = pytest.fixture(relay_gateway.gateway)


# --------------------------------------------------------------------------- outbox


def test_a_committed_command_is_published_with_its_token_and_its_result_recorded(
        relay: Relay, gateway: FakeGateway) -> None:
    link = relay.link()
    with LinkRunner(link) as runner:
        wait_for(lambda: link.connected, 10, "link connected")
        jti = relay.unlock()
        began = time.monotonic()
        link.notify()
        wait_for(lambda: relay.status(jti) == "done", 10, lambda: relay.row(jti).status)
        round_trip = time.monotonic() - began
        assert runner.call(link.wait_for_result(jti, 5)) == "done"
    [got] = gateway.got()
    row = relay.row(jti)
    assert got.token.decode() == row.token
    assert got.retain is False
    assert got.claims["aud"] == SITE
    assert row.published_at is not None
    assert (row.reason, row.duplicate) == (None, False)
    assert round_trip < 2.0  # woken by notify, not by a poll
    wait_for(lambda: link.stats.published == 1, 5, lambda: link.stats)


def test_after_a_restart_rows_go_out_and_unanswered_ones_again_under_their_jti(
        relay: Relay, gateway: FakeGateway) -> None:
    gateway.answer = silent
    with LinkRunner(relay.link()):
        sent = relay.unlock("unit_s")
        wait_for(lambda: sent in gateway.jtis(), 10, "the first command arrived")
    waiting = [relay.unlock(f"unit_{i}") for i in range(3)]  # committed while it is down
    dead = relay.unlock("unit_dead")
    relay.expire(dead)
    gateway.answer = done
    with LinkRunner(relay.link()):
        wait_for(lambda: all(relay.status(j) == "done" for j in [sent, *waiting]), 10,
                 lambda: [relay.status(j) for j in [sent, *waiting]])
        wait_for(lambda: relay.status(dead) == "timeout", 5, "the expired row timed out")
    assert sorted(set(gateway.jtis())) == sorted([sent, *waiting])  # never the expired one
    assert gateway.jtis().count(sent) == 2  # the same token after the restart
    row = relay.row(dead)
    assert (row.reason, row.published_at, row.status) == ("timeout", None, "timeout")


def test_an_expired_command_times_out_and_a_late_result_still_updates_it(
        relay: Relay, gateway: FakeGateway) -> None:
    gateway.answer = silent
    link = relay.link()
    with LinkRunner(link) as runner:
        jti = relay.unlock()
        link.notify()
        wait_for(gateway.jtis, 10, "the command arrived")
        waiter = asyncio.run_coroutine_threadsafe(link.wait_for_result(jti, 10), runner.loop)
        relay.expire(jti)
        assert waiter.result(5) == "timeout"
        assert (relay.row(jti).status, relay.row(jti).reason) == ("timeout", "timeout")
        late = result_payload(jti, "unlock", "unit_1", "done", None, duplicate=False,
                              state={"locked": False}, at=time.time())
        gateway.publish_result(late)
        wait_for(lambda: relay.status(jti) == "done", 5, "the late result was recorded")
    row = relay.row(jti)
    assert row.reason is None
    assert json.loads(row.state_json or "null") == {"locked": False}


def test_results_from_another_site_and_junk_are_ignored(
        relay: Relay, gateway: FakeGateway, broker: Broker) -> None:
    gateway.answer = silent
    other = FakeGateway(broker, PREFIX, SITE2, answer=silent)
    link = relay.link()
    try:
        with LinkRunner(link):
            jti = relay.unlock()
            link.notify()
            wait_for(gateway.jtis, 10, "the command arrived")
            forged = result_payload(jti, "unlock", "unit_1", "done", None, duplicate=False,
                                    state=None, at=time.time())
            other.publish_result(forged)  # SITE2 answering SITE's command
            for junk in (b"not json", b"[1,2]", b'{"jti": 1}', b"{" * 100 + b"}" * 100,
                         b'{"jti":"' + b"x" * (65 * 1024) + b'"}'):
                gateway._paho.publish(f"{PREFIX}/{SITE}/cmd/result", junk, qos=1)
            gateway._paho.publish(f"{PREFIX}/{SITE}/extra/cmd/result", json.dumps(forged),
                                  qos=1)
            wait_for(lambda: link.stats.ignored_results >= 6, 5,
                     lambda: f"ignored {link.stats.ignored_results}")
            assert relay.status(jti) == "pending"
            gateway.publish_result(forged)  # the right site: taken
            wait_for(lambda: relay.status(jti) == "done", 5, "the real result")
    finally:
        other.close()


def test_a_duplicate_answer_keeps_the_first_result(relay: Relay, gateway: FakeGateway) -> None:
    link = relay.link()
    with LinkRunner(link):
        jti = relay.unlock()
        link.notify()
        wait_for(lambda: relay.status(jti) == "done", 10, "the result")
        first = relay.row(jti)
        copy = {**gateway.answers[jti], "duplicate": True, "status": "failed"}
        gateway.publish_result(copy)
        wait_for(lambda: link.stats.results >= 2, 5, "the copy was read")
    row = relay.row(jti)
    assert (row.status, row.duplicate, row.result_at) == ("done", False, first.result_at)


def test_broker_killed_and_restarted_loses_nothing_and_never_changes_a_jti(
        relay: Relay, gateway: FakeGateway, broker: Broker) -> None:
    gateway.answer = silent
    link = relay.link()
    with LinkRunner(link):
        before = [relay.unlock(f"unit_{i}") for i in range(5)]
        link.notify()
        wait_for(lambda: set(before) <= set(gateway.jtis()), 10, "the first five arrived")
        broker.kill()
        wait_for(lambda: not link.connected, 10, "the link noticed")
        during = [relay.unlock(f"unit_{i}") for i in range(5, 10)]
        link.notify()
        gateway.answer = done
        broker.restart()
        restarted = time.monotonic()
        wait_for(lambda: link.connected, 10, "the link reconnected")
        reconnect_s = time.monotonic() - restarted
        everything = before + during
        wait_for(lambda: all(relay.status(j) == "done" for j in everything), 15,
                 lambda: [relay.status(j) for j in everything])
    rows = relay.rows()
    assert len(rows) == 10  # no command was made again under a new jti
    tokens = {r.jti: r.token for r in rows}
    for got in gateway.got():
        assert got.token.decode() == tokens[got.jti]  # same token, same jti
    assert sorted(gateway.executed) == sorted(everything)  # each ran exactly once
    # The broker kept nothing (no persistence): what the silent gateway got before the
    # kill reached it again after the restart, under the same jti.
    received = gateway.jtis()
    assert all(received.count(j) >= 2 for j in before), received
    assert link.stats.drops >= 1
    assert reconnect_s < 5
    print(f"reconnect after restart: {reconnect_s:.2f} s; received "
          f"{len(gateway.got())} copies of {len(everything)} commands")


def test_a_site_offline_is_not_flooded_and_gets_its_commands_when_back(
        relay: Relay, gateway: FakeGateway) -> None:
    gateway.answer = silent
    gateway.publish_status({"online": False})
    link = relay.link()
    with LinkRunner(link):
        wait_for(lambda: link.site_online(SITE) is False, 10, "the offline status")
        jti = relay.unlock()
        link.notify()
        wait_for(lambda: gateway.jtis() == [jti], 10, "the first publish")
        time.sleep(FAST.republish_s * 3)  # a quiet period is what is checked
        assert gateway.jtis() == [jti]
        gateway.answer = done
        gateway.publish_status({"online": True, "version": "1.0"})
        wait_for(lambda: relay.status(jti) == "done", 5, "re-published when back")
    assert set(gateway.jtis()) == {jti}
    assert gateway.executed == [jti]


def test_a_gateway_heard_before_its_site_is_registered_shows_once_it_is(
        relay: Relay, broker: Broker) -> None:
    """A retained status comes once per subscription: the one of a gateway that came up
    before ``sites add`` is kept and recorded when the site is registered (another
    process, the CLI, registers it: the link notices by itself)."""
    early = FakeGateway(broker, PREFIX, "site_early")
    try:
        early.publish_status({"online": True, "version": "1.0"})
        link = relay.link()
        with LinkRunner(link):
            wait_for(lambda: link.connected, 10, "the link is up")
            time.sleep(FAST.resend_scan_s * 3)  # heard, and not registered
            assert relay.services.sites.get("site_early") is None
            with relay.services.db.session() as s:  # Stora lists it (a later connect)
                s.add(OperatorSite(site_id="site_early", operator_id=relay.operator,
                                   name="Early", seen_at=time.time()))
            relay.services.sites.add("site_early", relay.operator)
            wait_for(lambda: link.site_online("site_early") is True, 10,
                     "the kept status was recorded")
        info = relay.services.sites.get("site_early")
        assert info is not None
        assert info.status == {"online": True, "version": "1.0"}
    finally:
        early.close()


# --------------------------------------------------------------------------- lockouts


def test_an_unanswered_lockout_is_sent_again_new_jti_same_ver_until_done(
        relay: Relay, gateway: FakeGateway) -> None:
    gateway.answer = silent
    link = relay.link()
    with LinkRunner(link):
        assert relay.webhook("unit_9", "overlocked", T0) == "command"
        link.notify()
        for count in (1, 2, 3):
            wait_for(lambda n=count: len(set(gateway.jtis())) == n, 10,
                     gateway.jtis)
            if count < 3:
                relay.clock.offset += 301  # the lockout's 300 s run out unanswered
        gateway.answer = done
        wait_for(lambda: relay.unit("unit_9").confirmed_ver == T0, 10,
                 lambda: relay.unit("unit_9").confirmed_ver)
        relay.clock.offset += 301
        time.sleep(FAST.resend_scan_s * 5)
    rows = relay.intents("unit_9")
    assert [r.origin for r in rows] == ["webhook", "resend", "resend"]
    assert {r.ver for r in rows} == {T0}
    assert {r.cmd for r in rows} == {"lockout"}
    assert [r.status for r in rows] == ["timeout", "timeout", "done"]
    assert len({r.jti for r in rows}) == 3
    assert link.stats.resent == 2


def test_stale_version_confirms_and_no_unlock_is_ever_made_again(
        relay: Relay, gateway: FakeGateway) -> None:
    gateway.answer = lambda c: (("rejected", "stale_version") if c["cmd"] == "lockout"
                                else None)
    link = relay.link()
    with LinkRunner(link):
        relay.webhook("unit_9", "overlocked", T0)
        jti = relay.unlock("unit_8")
        link.notify()
        wait_for(lambda: relay.unit("unit_9").confirmed_ver == T0, 10, "confirmed")
        wait_for(lambda: jti in gateway.jtis(), 10, "the unlock arrived")
        relay.clock.offset += 61
        wait_for(lambda: relay.status(jti) == "timeout", 10, "the unlock timed out")
        relay.clock.offset += 301
        time.sleep(FAST.resend_scan_s * 5)
    assert [r.jti for r in relay.rows("unit_8")] == [jti]  # never a second unlock
    assert len(relay.intents("unit_9")) == 1


def test_a_clear_after_an_unconfirmed_lockout_is_what_is_sent_again(
        relay: Relay, gateway: FakeGateway) -> None:
    gateway.answer = silent
    link = relay.link()
    with LinkRunner(link):
        relay.webhook("unit_9", "overlocked", T0)
        assert relay.webhook("unit_9", "occupied", T0 + 1000) == "command"
        link.notify()
        clear = relay.intents("unit_9")[-1].jti
        wait_for(lambda: clear in gateway.jtis(), 10, gateway.jtis)
        for count in (1, 2):  # each resend runs out unanswered too, until the last
            relay.clock.offset += 301
            wait_for(lambda n=count: len(relay.intents("unit_9")) == 2 + n
                     and relay.intents("unit_9")[-1].jti in gateway.jtis(), 10,
                     gateway.jtis)
        gateway.answer = done
        wait_for(lambda: relay.unit("unit_9").confirmed_ver == T0 + 1000, 10, "confirmed")
        # A later event that changes no lockout raises ver without a command.
        assert relay.webhook("unit_9", "vacant", T0 + 2000) == "no_change"
        time.sleep(FAST.resend_scan_s * 5)
    rows = relay.intents("unit_9")
    assert [(r.cmd, r.ver, r.origin) for r in rows] == [
        ("lockout", T0, "webhook"), ("clear_lockout", T0 + 1000, "webhook"),
        ("clear_lockout", T0 + 1000, "resend"), ("clear_lockout", T0 + 1000, "resend")]
    assert rows[0].status == "superseded"


def test_a_gateway_that_keeps_refusing_is_asked_again_with_backoff(
        relay: Relay, gateway: FakeGateway) -> None:
    gateway.answer = lambda c: ("failed", "hardware_error")
    link = relay.link()
    with LinkRunner(link):
        relay.webhook("unit_9", "overlocked", T0)
        link.notify()
        wait_for(lambda: len(relay.intents("unit_9")) >= 4, 10,
                 lambda: len(relay.intents("unit_9")))
    rows = relay.intents("unit_9")
    gaps = [b.created_at - a.created_at for a, b in itertools.pairwise(rows)]
    policy = FAST.resend
    for n, gap in enumerate(gaps[:3], start=1):
        assert gap >= policy.wait(n) - 0.05, (n, gaps)
    assert relay.unit("unit_9").confirmed_ver is None


def test_a_lockout_waiting_for_an_unregistered_site_goes_out_when_it_is_registered(
        relay: Relay, gateway: FakeGateway, broker: Broker) -> None:
    third = FakeGateway(broker, PREFIX, "site_late")
    link = relay.link()
    try:
        with LinkRunner(link):
            with relay.services.db.session() as s:  # a webhook for a site not registered
                s.add(UnitState(operator_id=relay.operator, unit_id="unit_l",
                                site_id="site_late", status="overlocked", ver=T0,
                                lockout=True, confirmed_ver=None, updated_at=time.time()))
            time.sleep(FAST.resend_scan_s * 5)
            assert third.jtis() == []
            relay.services.operators.connect(TokenSet("at", "rt", 7200, "", 0), [
                StoraSite(s, s) for s in (SITE, SITE2, "site_late")])  # Stora lists it now
            relay.services.sites.add("site_late", relay.operator)
            wait_for(lambda: relay.unit("unit_l").confirmed_ver == T0, 10, "confirmed")
    finally:
        third.close()


# --------------------------------------------------------------------------- status, waiters


def test_retained_statuses_reach_the_sites_rows(relay: Relay, gateway: FakeGateway) -> None:
    gateway.publish_status({"online": True, "version": "2.1.0"})
    gateway.publish_status({"online": True}, site="site_unregistered")
    link = relay.link()
    with LinkRunner(link):
        wait_for(lambda: link.site_online(SITE) is True, 10, "the retained status")
        info = relay.services.sites.get(SITE)
        assert info is not None
        assert info.status == {"online": True, "version": "2.1.0"}
        gateway.publish_status(b'{"online": true, "junk": "' + b"x" * 20_000 + b'"}')
        gateway.publish_status(b"not json")
        gateway.publish_status({"online": False})
        wait_for(lambda: link.site_online(SITE) is False, 10, "offline")
        wait_for(lambda: link.stats.statuses == 3, 5, lambda: link.stats)  # junk dropped
    assert link.site_online(SITE2) is None  # never heard
    assert link.site_online("site_unregistered") is None
    with relay.services.db.session() as s:
        assert s.get(Site, "site_unregistered") is None


def test_waiting_for_a_result_resolves_on_the_result_or_the_database(
        relay: Relay, gateway: FakeGateway) -> None:
    gateway.answer = silent
    link = relay.link()
    with LinkRunner(link) as runner:
        first, second, third = relay.unlock("unit_1"), relay.unlock("unit_2"), relay.unlock()
        link.notify()
        wait_for(lambda: len(set(gateway.jtis())) == 3, 10, "all three arrived")
        by_mqtt = asyncio.run_coroutine_threadsafe(link.wait_for_result(first, 10),
                                                   runner.loop)
        by_db = asyncio.run_coroutine_threadsafe(link.wait_for_result(second, 10),
                                                 runner.loop)
        time.sleep(0.2)  # both are registered before their results come
        began = time.monotonic()
        gateway.publish_result(result_payload(first, "unlock", "unit_1", "done", None,
                                              duplicate=False, state=None, at=time.time()))
        assert by_mqtt.result(5) == "done"
        mqtt_s = time.monotonic() - began
        with relay.services.db.session() as s:  # another replica applied it
            apply_result(s, SITE, {"jti": second, "status": "rejected",
                                   "reason": "overlocked"}, time.time())
        began = time.monotonic()
        assert by_db.result(5) == "rejected"
        db_s = time.monotonic() - began
        assert runner.call(link.wait_for_result(third, 0.3)) is None
    assert mqtt_s < 1.0
    assert db_s < 1.0
    print(f"waiter woke {mqtt_s * 1000:.0f} ms after the result, "
          f"{db_s * 1000:.0f} ms after another process's write")


# --------------------------------------------------------------------------- connection


def test_cancel_disconnects_cleanly_and_quickly(relay: Relay, broker: Broker) -> None:
    link = relay.link()
    runner = LinkRunner(link).start()
    wait_for(lambda: link.connected, 10, "connected")
    took = runner.stop()
    assert took < 2.0
    wait_for(lambda: "relay-under-test disconnected" in broker.log_text(), 5,
             broker.log_text)


def test_cancel_while_the_broker_is_gone_is_bounded(relay: Relay, broker: Broker) -> None:
    link = relay.link(backoff_cap_s=30.0, backoff_first_s=30.0)
    runner = LinkRunner(link).start()
    wait_for(lambda: link.connected, 10, "connected")
    broker.kill()
    wait_for(lambda: not link.connected, 10, "dropped")
    assert runner.stop() < 2.0


def test_backoff_is_full_jitter_and_capped() -> None:
    rng = random.Random(7)
    delays = [backoff_delay(n, 0.5, 30.0, rng) for n in range(40)]
    assert all(0 <= d <= 30.0 for d in delays)
    assert max(delays[10:]) > 15 > min(delays[10:])  # reaches the cap, stays jittered


def test_tls_with_a_client_certificate(tmp_path: Path) -> None:
    files = make_tls_files(tmp_path / "tls")
    with Broker(tmp_path / "tls-broker", tls=files, require_client_cert=True) as tls_broker:
        parts = make_relay(tmp_path / "relay", tls_broker)
        services = parts.services
        mqtt = dataclasses.replace(services.config.mqtt, host="localhost", port=tls_broker.port,
                                   tls=True, ca_file=files.ca, cert_file=files.client_cert,
                                   key_file=files.client_key)
        link = RelayLink(mqtt, services.db, services.sites, services.commands, timings=FAST)
        try:
            with LinkRunner(link):
                wait_for(lambda: link.connected, 10, "connected over TLS")
        finally:
            services.close()


# --------------------------------------------------------------------------- end to end


def test_webhook_to_lockout_at_the_real_gateway_and_back(tmp_path: Path, broker: Broker
                                                         ) -> None:
    """Stora's overlock → the relay's lockout → the real agent on simulated hardware →
    its result → ``confirmed_ver``; then the gateway refuses an unlock, and after the
    clear it opens the door."""
    site = make_site(tmp_path, broker)
    parts = make_relay(tmp_path / "relay", broker, sites=(GW_SITE,))
    keys = parts.services.signing_keys
    keys.current()
    config = site.config_path.read_text()
    config = re.sub(r"^trusted_keys = .*$", trusted_keys_line(keys.list()), config,
                    flags=re.MULTILINE)
    site.config_path.write_text(config)
    link = parts.link()
    try:
        with RunningAgent(site.config_path), LinkRunner(link) as runner:
            wait_for(lambda: link.site_online(GW_SITE) is True, 10, "the agent's status")
            unit = "unit_a101"
            began = time.monotonic()
            assert parts.webhook(unit, "overlocked", T0, site=GW_SITE) == "command"
            link.notify()
            wait_for(lambda: parts.unit(unit).confirmed_ver == T0, 10,
                     lambda: [(r.cmd, r.status, r.reason) for r in parts.rows(unit)])
            lockout_s = time.monotonic() - began
            [lockout] = parts.rows(unit)
            assert (lockout.cmd, lockout.status, lockout.ver) == ("lockout", "done", T0)
            assert json.loads(lockout.state_json or "{}")["lockout"] is True

            refused = parts.unlock(unit, site=GW_SITE)
            link.notify()
            assert runner.call(link.wait_for_result(refused, 10)) == "rejected"
            assert parts.row(refused).reason == "overlocked"
            assert site.coil(unit) is False

            assert parts.webhook(unit, "occupied", T0 + 1000, site=GW_SITE) == "command"
            link.notify()
            wait_for(lambda: parts.unit(unit).confirmed_ver == T0 + 1000, 10, "cleared")
            opened = parts.unlock(unit, site=GW_SITE)
            link.notify()
            assert runner.call(link.wait_for_result(opened, 10)) == "done"
            assert site.coil(unit) is True
    finally:
        parts.services.close()
        site.close()
    print(f"webhook to confirmed lockout at the real gateway: {lockout_s * 1000:.0f} ms")


def test_a_frozen_broker_is_noticed_by_keepalive_and_left_behind(
        relay: Relay, gateway: FakeGateway, broker: Broker) -> None:
    """Fault matrix #3: a half-open connection (SIGSTOP) ends within ~1.5 keepalives; the
    link reconnects once the broker thaws and what was committed meanwhile goes out."""
    link = relay.link(keepalive_s=1, op_timeout_s=1)
    with LinkRunner(link):
        wait_for(lambda: link.connected, 10, "connected")
        broker.stop()
        frozen = time.monotonic()
        try:
            wait_for(lambda: not link.connected, 10, "the frozen broker noticed")
            noticed_s = time.monotonic() - frozen
            jti = relay.unlock()
        finally:
            broker.cont()
        wait_for(lambda: relay.status(jti) == "done", 15, lambda: relay.status(jti))
    assert noticed_s < 4
    print(f"frozen broker noticed after {noticed_s:.1f} s (keepalive 1 s)")
