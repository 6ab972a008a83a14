"""The fleet simulator end to end against a real relay (issue 15, item 3).

One ``stora-relay run`` on SQLite (devkit/relay_process.py), a real Mosquitto, the
sandbox as Stora with 2 operators of 10 sites (2 units each), connected over HTTP;
:class:`devkit.fleet.Fleet` answers for the 20 sites, 20–40 ms a command, ``failed``
``hardware_error`` one time in five on a fixed seed.  Checked:

* each gateway's status is retained at the broker (a late subscriber gets all 20, with
  the fleet's version) and reached the relay's site rows;
* status changes delivered by the sandbox itself reach the gateway as the lockout or
  clear they mean (``deliver="sandbox"``);
* a short mixed load (direct webhooks, unlocks, Timeline Events through the broker) is
  answered in full: every webhook ``200 command``, every unlock ``200 done`` or ``200
  failed``, every event ``201``;
* every change made a lockout or clear; every command the relay made (but those a newer
  change superseded before they went out) reached its gateway and was answered; the relay's rows
  hold the gateway's answers; the failures are exactly those the seed draws for each
  site's commands, and about a fifth of them;
* a gateway whose connection drops without a goodbye is offline at the relay (its will).
"""

from __future__ import annotations

import collections
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import select

from devkit.fleet import (
    Behaviour,
    Fleet,
    LoadGenerator,
    LoadMix,
    connect_operators,
    operator_specs,
    populate,
)
from devkit.mosquitto import Broker, free_port
from devkit.relay_process import RelayProcess
from devkit.relay_site import write_relay_config
from devkit.sandbox import PartnerApp, Sandbox
from relay.db.engine import Database
from relay.db.models import Command, Site

CLIENT_ID, CLIENT_SECRET = "fleet-test-client", "fleet-test-secret"
SOURCE_ID = "tsrc_fleet"
SEED = 20260515
FAILURE_RATE = 0.2

pytestmark = pytest.mark.timeout(90)


def _retained_statuses(broker: Broker, count: int) -> dict[str, dict[str, object]]:
    """What a new subscriber to ``stora-gw/+/status`` gets at once (the retained ones)."""
    got: dict[str, dict[str, object]] = {}
    done = threading.Event()

    def on_message(_c: paho.Client, _u: object, msg: paho.MQTTMessage) -> None:
        if msg.retain:
            got[msg.topic.split("/")[1]] = json.loads(msg.payload)
        if len(got) >= count:
            done.set()

    client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                         client_id=f"fleet-observer-{time.monotonic_ns()}")
    client.on_message = on_message
    client.connect(broker.host, broker.port)
    client.subscribe("stora-gw/+/status", qos=1)
    client.loop_start()
    try:
        done.wait(10)
    finally:
        client.disconnect()
        client.loop_stop()
    return got


def _wait(what: str, check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.05)


def test_the_fleet_answers_every_command_of_a_real_relay(tmp_path: Path,
                                                          broker: Broker) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    app = PartnerApp(CLIENT_ID, CLIENT_SECRET, (url + "/oauth/callback",), name="FleetEntry")
    specs = operator_specs(2, 10, 2)
    sites = [str(s["id"]) for spec in specs.values() for s in spec]
    behaviour = Behaviour(delay_s=(0.02, 0.04), failure_rate=FAILURE_RATE, seed=SEED)
    with Sandbox(partner_app=app, max_per_second=50, max_per_minute=3000,
                 webhook_retry_s=(0.05,), webhook_timeout_s=5.0) as sandbox:
        populate(sandbox, specs)
        config = write_relay_config(
            tmp_path / "relay", stora_url=sandbox.url, client_id=CLIENT_ID,
            client_secret=CLIENT_SECRET, listen_port=port, mqtt_port=broker.port,
            app_name="FleetEntry", timeline_source_id=SOURCE_ID)
        text = config.read_text()
        config.write_text(text.replace(
            f'timeline_source_id = "{SOURCE_ID}"',
            f'timeline_source_id = "{SOURCE_ID}"\nmax_per_second = 50\n'
            'max_per_minute = 3000'))
        db = Database(f"sqlite:///{tmp_path / 'relay' / 'relay.db'}")
        fleet = Fleet(broker.host, broker.port, sites, behaviour=behaviour)
        with RelayProcess(config, port=port, log=tmp_path / "relay.log") as relay:
            try:
                # Sites are registered before their gateways connect, as in service: a
                # status from a site the relay does not know yet is dropped.
                links = connect_operators(sandbox, relay.url, db, specs, timeout=30)
                fleet.start(timeout=30)
                statuses = _retained_statuses(broker, len(sites))

                def relay_online() -> bool:
                    with db.read() as s:
                        return sum(bool(r.online) for r in s.scalars(select(Site))) \
                            == len(sites)

                _wait("every site online at the relay", relay_online)
                load = LoadGenerator(sandbox, fleet, links, [relay.url], source_id=SOURCE_ID)
                delivered = load.run(LoadMix(2.0, webhooks=2, deliver="sandbox"))
                mixed = load.run(LoadMix(3.0, webhooks=2, unlocks=3, timeline=1,
                                         unlock_wait_s=5))

                def settled() -> bool:
                    with db.read() as s:
                        return not s.scalars(select(Command).where(
                            Command.status == "pending")).first()

                _wait("no command pending", settled)
                with db.read() as s:
                    rows = list(s.scalars(select(Command)))
                fleet.cut(sites[0])

                def cut_offline() -> bool:
                    with db.read() as s:
                        row = s.get(Site, sites[0])
                        return row is not None and row.online is False

                _wait("the cut gateway offline at the relay (its will)", cut_offline)
            finally:
                fleet.stop()
                db.close()
        log = relay.log_text()

    # statuses: retained at the broker with the fleet's shape
    assert sorted(statuses) == sorted(sites)
    assert all(s == {"online": True, "version": "fleet-sim",
                     "outbox": {"pending": 0, "dead": 0}} for s in statuses.values())
    # the sandbox's own deliveries became commands at the gateway
    changes = delivered["webhooks"]
    assert len(changes.latencies) >= 5, changes
    assert not changes.errors, changes
    # the mixed load: every request answered as it should be
    hooks, unlocks, events = mixed["webhooks"], mixed["unlocks"], mixed["timeline"]
    assert set(hooks.answers) == {"200 command"}, hooks
    assert set(unlocks.answers) <= {"200 done", "200 failed"}, unlocks
    assert len(unlocks.latencies) >= 10, unlocks
    assert set(events.answers) == {"201"}, events
    assert [s.errors for s in (hooks, unlocks, events)] == [{}, {}, {}], mixed
    # every change made a command, and each one not superseded by the next change before
    # it went out reached the gateway
    intents = [r for r in rows if r.origin == "webhook"]
    assert len(intents) == len(hooks.latencies) + len(changes.latencies)
    rows = [r for r in rows if r.status != "superseded"]
    assert len(load.intent_latencies()) == sum(r.origin == "webhook" for r in rows)
    # every command the relay made reached its gateway and was answered
    made = {r.jti: r for r in rows}
    answered = dict(fleet.answers)
    assert set(made) == set(answered), "commands the fleet never answered: " \
        f"{sorted(set(made) - set(answered))[:5]}; log:\n{log[-3000:]}"
    assert all(r.status == answered[r.jti] for r in rows), \
        collections.Counter((r.status, answered[r.jti]) for r in rows)
    assert all(r.reason == "hardware_error" for r in rows if r.status == "failed")
    # failures: exactly the seed's draws, about the configured rate
    per_site = collections.Counter(r.site for r in fleet.received if not r.duplicate)
    expected = 0
    for site, n in per_site.items():
        fates = behaviour.outcomes(site)
        expected += sum(next(fates)[0] for _ in range(n))
    failed = sum(status == "failed" for status in answered.values())
    assert failed == expected
    assert 0.1 <= failed / len(answered) <= 0.3, (failed, len(answered))
    assert len(answered) >= 30
