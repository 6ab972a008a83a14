"""The outbox drainer (gateway/outbox/drainer.py) against the sandbox over real HTTP: the
acceptance cases, restarts, and the pauses.

The guarantee is counted at the server: every event queued in SQLite exists exactly once
at the sandbox (``count_by_external_id``), no 1-second or 60-second window holds more
requests than allowed, no fault leaves an event stuck, and a refused one is kept as a
dead letter with Stora's error.  Time is one fake clock shared by the sandbox, the store,
the client's limiter and the drainer, which "sleeps" by advancing it
(``Drainer.run_until_idle``): a two-hour outage costs nothing.  Only the thread test
uses real time, a fraction of a second.
"""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from devkit.sandbox import EVENT_SCOPE, Sandbox
from devkit.testing import returns_within, wait_for
from gateway.config import StoraConfig
from gateway.outbox.drainer import Drainer, build_drainer
from gateway.stora.answers import PostOutcome
from gateway.stora.client import StoraClient
from gateway.stora.ratelimit import RateLimiter
from gateway.stora.tokens import ClientCredentialsTokens, FileTokens
from gateway.store import Store
from tests.support import outbox as support
from tests.support.outbox import PER_MIN, PER_S, SECRET, STATIC, T0, Rig, record

# The fake clock and a limited sandbox (test_outbox_kill.py keeps the root ones).
clock = pytest.fixture(support.clock)
sandbox_options = pytest.fixture(support.sandbox_options)


# -- the acceptance cases -----------------------------------------------------------------
def test_two_hour_outage_then_500_events_delivered_once_within_the_limits(rig: Rig) -> None:
    rig.sandbox.set_outage(True)
    ids = rig.add(500)
    rig.drain(stop_when=lambda: rig.clock() >= T0 + 7200)
    outage_probes = [r for r in rig.sandbox.requests if r.refused]
    # The whole drain backs off on a dead connection: one probe per backoff step (capped
    # at 5 min), not one per queued event.
    assert 0 < len(outage_probes) < 150
    assert rig.drainer.state == "backing off"
    assert rig.store.outbox_summary(rig.clock())["pending"] == 500
    rig.sandbox.set_outage(False)
    rig.drain()
    rig.assert_exactly_once(ids)
    assert rig.store.event_count("pending") == 0
    assert rig.delivered() == 500
    assert rig.drainer.state == "ok"
    rig.assert_windows()
    assert 429 not in rig.statuses()  # the limits equal the sandbox's: never refused
    # The limit is the bottleneck, and it is used: 500 events at 60/min take about
    # 8 1/3 minutes from the first success to the last.
    created = [r.at for r in rig.posts() if r.status == 201]
    assert len(created) == 500
    assert created[-1] - created[0] < (500 / PER_MIN) * 60 * 1.05
    # Delivered two hours late: each one says when it happened, except the one whose
    # body was frozen at its first attempt, at the start of the outage (every attempt
    # under one key sends the same bytes).
    events = rig.sandbox.events()
    assert "happened at" not in events[0]["description"]
    assert all("happened at" in e["description"] for e in events[1:])
    assert all(e["variables"]["delivered_late"] is True for e in events[1:])


def test_faults_with_events_flowing_each_event_once_422_dead_lettered(rig: Rig) -> None:
    rig.store.close()
    rig.open(auth="client_credentials")
    ids = rig.add(40)
    rejected = ids[25]
    rig.sandbox.reject_external_ids([rejected])
    rig.sandbox.fail_next(1, 500)  # stored under the first event's key: escaped by rotating
    rig.drain(stop_when=lambda: rig.delivered() >= 5)
    rig.sandbox.storm(20)  # 429 storm
    rig.drain(stop_when=lambda: rig.delivered() >= 10)
    rig.sandbox.drop_after_commit(1)  # committed, then the response is lost
    rig.drain(stop_when=lambda: rig.delivered() >= 15)
    rig.sandbox.expire_tokens()  # token expiry mid-drain
    rig.drain()

    statuses = rig.statuses()
    assert statuses.count(500) == 1
    assert 429 in statuses
    assert 401 in statuses
    assert sum(r.dropped for r in rig.sandbox.requests) == 1
    assert sum(r.replayed and r.status == 201 for r in rig.sandbox.requests) == 1
    rig.assert_exactly_once(ids, missing=frozenset({rejected}))
    rig.assert_windows()
    # Nothing stuck: everything delivered but the refused one, kept with its error.
    assert rig.store.event_count("pending") == 0
    (dead,) = rig.store.events(state="dead")
    assert dead.external_id == rejected
    assert dead.attempts == 1  # dead-lettered after one attempt
    assert (dead.dead_status, dead.dead_code) == (422, "invalid_content")
    assert dead.dead is not None
    assert dead.dead["idempotency_key"] == f"{rejected}.0"
    assert dead.dead["details"][0]["pointer"] == "/external/id"
    assert dead.as_dict()["error"]["status"] == 422
    (alarm,) = [a for a in rig.alarms if a[0] == "timeline_dead_letter"]
    assert alarm[1] == "unit_a101"
    assert "422 invalid_content" in alarm[2]
    first = rig.store.events(state="delivered", limit=1)[0]
    assert first.generation == 1  # the stored 500 was left behind under key .0
    assert rig.store.outbox_summary(rig.clock())["dead"] == 1

    # A person fixes the cause and retries it: delivered once, under a new key.
    rig.sandbox.reject_external_ids([])
    assert rig.store.retry_dead(dead.seq) == [dead.seq]
    assert rig.store.retry_dead(dead.seq) == []  # no longer dead
    rig.drain()
    rig.assert_exactly_once(ids)
    again = rig.store.event(dead.seq)
    assert again is not None
    assert again.state == "delivered"
    assert again.generation == 1
    keys = [r.idempotency_key for r in rig.posts() if r.idempotency_key
            and r.idempotency_key.startswith(rejected)]
    assert keys == [f"{rejected}.0", f"{rejected}.1"]
    rig.assert_windows()


class Crash(BaseException):
    """Stands in for kill -9 between the answer and the write of the outcome."""


class CrashingDrainer(Drainer):
    crash_after = 70

    def _settle(self, row: Any, outcome: PostOutcome) -> None:
        if self.counters["attempts"] + 1 >= self.crash_after:
            raise Crash
        super()._settle(row, outcome)


def test_restart_mid_drain_keeps_the_limits_and_duplicates_nothing(rig: Rig) -> None:
    ids = rig.add(150)
    rig.store.close()
    rig.open(drainer_cls=CrashingDrainer)
    with pytest.raises(Crash):
        rig.drain()
    # The 70th event reached Stora but its outcome was never written.
    assert rig.delivered() == 69
    assert len(rig.sandbox.events()) == 70
    rig.open()  # a new store on the same file and a limiter from the persisted history
    rig.drain()
    rig.assert_exactly_once(ids)
    replays = [r for r in rig.posts() if r.replayed]
    assert len(replays) == 1  # the lost outcome came back as a replayed 201
    assert rig.delivered() == 150
    # The restart came right after a full minute's worth of sends: without the history
    # a fresh limiter would send 10 at once and break the 60-second window.
    rig.assert_windows()
    assert 429 not in rig.statuses()


class DiesInFlight(Drainer):
    """Stands in for kill -9 while a POST is in flight: its answer is never settled."""

    def _settle(self, row: Any, outcome: PostOutcome) -> None:
        raise Crash


def test_a_post_in_flight_when_the_gateway_died_is_retried_as_unanswered(rig: Rig) -> None:
    """Found by tests/gateway/outbox/test_outbox_kill.py's reasoning: after a restart, the
    key of the attempt the dead process had in flight must count as unanswered.  Else Stora's
    "409: a request with this key is in progress" (its first request still running)
    dead-letters an event that is being created, and a person retrying it (a new key)
    would create it twice; and the 24-hour replay window would not be enforced."""
    ids = rig.add(1)
    rig.store.close()
    first = rig.open(drainer_cls=DiesInFlight)
    rig.sandbox.set_slow(0.5)  # Stora is slow: the request outlives the process

    def first_life() -> None:
        with contextlib.suppress(Crash):
            first.step()

    thread = threading.Thread(target=first_life)
    thread.start()
    # (private: the only way to see "the server is processing it" from outside)
    wait_for(lambda: bool(rig.sandbox._inflight), 5)
    rig.sandbox.set_slow(0)
    second = rig.open()  # the restarted gateway, on the same file
    assert second.guarded_step() == 0.0  # 409: the first request is still in progress
    assert rig.store.event_count("dead") == 0
    assert rig.alarms == []
    row = rig.store.events()[0]
    assert row.state == "pending"
    assert row.generation == 0  # the key is kept, marked unanswered
    assert row.unanswered_since is not None
    assert row.attempts == 2  # the lost attempt counts
    thread.join()
    first.store.close()
    rig.drain()
    rig.assert_exactly_once(ids)
    # In the order answered: the 409, the slow first request's 201, its replay.
    assert [(r.status, r.replayed) for r in rig.posts()] == [
        (409, False), (201, False), (201, True)]
    assert rig.delivered() == 1
    assert rig.alarms == []


# -- pauses -----------------------------------------------------------------------------
def test_refused_credential_pauses_without_a_tight_loop_then_resumes(rig: Rig) -> None:
    rig.store.close()
    rig.open(auth="client_credentials")
    (rig.tmp / "secret").write_text("wrong\n")
    ids = rig.add(5)
    rig.drain(stop_when=lambda: rig.clock() >= T0 + 3600)
    assert rig.drainer.state == "paused: auth"
    token_calls = [r for r in rig.sandbox.requests if r.path == "/oauth2/token"]
    assert 1 <= len(token_calls) <= 10  # an hour: retried slowly (60 s doubling to 15 min)
    assert not rig.posts()
    assert [a[0] for a in rig.alarms] == ["timeline_auth"]  # once
    assert rig.store.event_count("pending") == 5  # events keep buffering
    rig.add(2, start=5)
    (rig.tmp / "secret").write_text(SECRET + "\n")  # fixed; no restart needed
    rig.drain()
    assert rig.drainer.state == "ok"
    rig.assert_exactly_once([*ids, record(5).external_id, record(6).external_id])


def test_wrong_base_url_pauses_as_config_without_dead_letters(rig: Rig) -> None:
    rig.store.close()
    rig.open(base_url=rig.sandbox.url + "/2024-01")  # 404 invalid_endpoint for every event
    rig.add(3)
    rig.drain(stop_when=lambda: rig.clock() >= T0 + 3600)
    assert rig.drainer.state == "paused: config"
    assert rig.store.event_count("dead") == 0
    assert rig.store.event_count("pending") == 3
    posts = [r for r in rig.sandbox.requests if r.path.endswith("/timeline/events")]
    assert 1 <= len(posts) <= 10  # an hour: retried slowly
    assert all(r.status == 404 for r in posts)
    assert [a[0] for a in rig.alarms] == ["timeline_config"]
    assert "invalid_endpoint" in rig.alarms[0][2]


def test_storage_failure_while_draining_is_an_alarm_and_a_backoff(rig: Rig) -> None:
    rig.add(1)
    rig.store.close()  # every read and write now fails with StoreError
    delays = [rig.drainer.guarded_step() for _ in range(4)]
    assert delays == [1.0, 2.0, 4.0, 8.0]
    assert rig.drainer.state == "paused: storage"
    assert [a[0] for a in rig.alarms] == ["timeline_outbox_storage"]
    rig.open()


def test_thread_is_woken_by_new_events_and_stops_promptly(tmp_path: Path,
                                                          http: httpx.Client) -> None:
    with Sandbox(static_tokens={STATIC}, max_per_second=PER_S,
                 max_per_minute=PER_MIN) as sandbox, Store(tmp_path / "g.db") as store:
        (tmp_path / "token").write_text(STATIC)
        client = StoraClient(sandbox.api_url, FileTokens(tmp_path / "token"),
                             RateLimiter(PER_S, PER_MIN, on_record=store.record_send),
                             http=http)
        drainer = Drainer(store, client, source_id="tsrc_test", template_id=None)
        store.on_events_added = lambda n: drainer.wake()
        drainer.start()
        time.sleep(0.2)  # idle: waiting up to IDLE_WAIT_S (60 s) unless woken
        with store.transaction() as tx:
            tx.add_event(record(1))
        # Woken, not waiting out IDLE_WAIT_S (60 s); and stopped as promptly.
        wait_for(lambda: store.event_count("delivered") >= 1, 20, "the woken drainer")
        assert store.event_count("delivered") == 1
        returns_within(20, drainer.stop, "stopping an idle drainer")
        assert drainer.state == "stopped"
        assert len(store.send_history(0)) == 1  # the send was persisted


def test_a_wall_clock_stepped_back_does_not_hold_events(rig: Rig) -> None:
    ids = rig.add(2)
    rig.sandbox.fail_next(1, 500)
    assert rig.drainer.guarded_step() == 0.0  # 500: the first event waits its backoff
    rig.clock.now -= 86_400  # the wall clock goes back a day
    rig.sandbox.advance(86_400)  # (the sandbox's own time is not the gateway's)
    rig.drain(max_steps=10)  # without the pull-forward: a day of 30-minute waits
    rig.assert_exactly_once(ids)


def test_missing_scope_pauses_then_a_fixed_scope_delivers_under_a_new_key(rig: Rig) -> None:
    rig.store.close()
    rig.open(auth="client_credentials")
    tokens = rig.drainer.client.tokens
    assert isinstance(tokens, ClientCredentialsTokens)
    tokens.scope = "public.site:read"  # a token without public.timeline_event:write
    (ext,) = rig.add(1)
    rig.drain(stop_when=lambda: rig.clock() >= T0 + 600)
    assert rig.drainer.state == "paused: config"
    assert rig.store.event_count("dead") == 0
    assert [a[0] for a in rig.alarms] == ["timeline_config"]
    assert "403 forbidden" in rig.alarms[0][2]
    # The operator grants the scope.  The 403 is stored under the first key for a day,
    # so only a new key can get through; nothing was created under the old one.
    tokens.scope = EVENT_SCOPE
    tokens.invalidate(tokens.token())
    fixed_at = rig.clock()
    rig.drain()
    rig.assert_exactly_once([ext])
    # At the next slow retry, not after the stored 403 expires a day later.
    assert rig.clock() - fixed_at < 1800
    assert rig.drainer.state == "ok"
    row = rig.store.events()[0]
    assert row.state == "delivered"
    assert row.generation >= 1
    assert [r.status for r in rig.posts()][-1] == 201


def test_build_drainer_passes_stora_dates_to_the_clock(tmp_path: Path) -> None:
    (tmp_path / "token").write_text(STATIC)
    dates: list[float] = []
    with Sandbox(static_tokens={STATIC}) as sandbox, Store(tmp_path / "g.db") as store:
        cfg = StoraConfig(
            base_url=sandbox.api_url, auth="static", token_url=sandbox.token_url,
            client_id="", client_secret_file=None, token_file=tmp_path / "token",
            scope=EVENT_SCOPE, timeline_source_id="tsrc_test", timeline_template_id="",
            max_per_second=PER_S, max_per_minute=PER_MIN)
        drainer = build_drainer(SimpleNamespace(stora=cfg), store, on_server_date=dates.append)
        with store.transaction() as tx:
            tx.add_event(record(1))
        before = time.time()
        drainer.run_until_idle(time.sleep, max_steps=20)
        drainer.client.close()
        assert store.event_count("delivered") == 1
    assert len(dates) == 1  # the sandbox stamps its replies with the real time
    assert before - 2 <= dates[0] <= time.time() + 1
