"""The outbox drainer (gateway/outbox/drainer.py), issue 11: what comes back from Stora is
bounded (messages, details, redirects, a huge or dripping token answer).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from devkit.sandbox import EVENT_SCOPE
from gateway.outbox.drainer import Drainer
from gateway.outbox.policy import MAX_NOTE_CHARS
from gateway.stora.answers import MAX_DETAILS
from gateway.stora.client import StoraClient
from gateway.stora.limits import MAX_TEXT_CHARS
from gateway.stora.ratelimit import RateLimiter
from gateway.stora.tokens import MAX_TOKEN_RESPONSE_BYTES, ClientCredentialsTokens
from gateway.store import Store
from tests.support import outbox as support
from tests.support.hostile_http import HostileServer, Reply, Request
from tests.support.outbox import CLIENT_ID, PER_MIN, PER_S, SECRET, T0, Rig, record

# The fake clock and a limited sandbox (test_outbox_kill.py keeps the root ones).
clock = pytest.fixture(support.clock)
sandbox_options = pytest.fixture(support.sandbox_options)


# -- issue 11: what comes back from Stora is bounded ------------------------------------------
def all_strings(value: Any) -> Iterator[str]:
    """Every string inside a JSON-like value."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from all_strings(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from all_strings(v)


def test_a_403_with_an_80_kb_message_is_capped_in_everything_kept(rig: Rig) -> None:
    rig.sandbox.fail_next(1_000, 403, message_chars=80_000)
    rig.add(2)
    rig.drain(stop_when=lambda: rig.clock() >= T0 + 600)
    assert rig.drainer.state == "paused: config"
    assert rig.store.event_count("dead") == 0
    assert [a[0] for a in rig.alarms] == ["timeline_config"]
    detail = rig.alarms[0][2]
    assert len(detail) <= MAX_NOTE_CHARS
    assert "…(+" in detail  # the cut is visible
    status = rig.drainer.status()
    assert len(status["last_error"]) <= MAX_NOTE_CHARS
    assert len(json.dumps(status)) < 2 * MAX_NOTE_CHARS
    for row in rig.store.events():
        assert row.last_error is None or len(row.last_error) <= MAX_NOTE_CHARS


def test_a_refusal_with_huge_details_is_a_small_dead_letter(rig: Rig) -> None:
    # 1 000 details of 500 characters: half a MiB, under the 1 MiB read cap.
    rig.sandbox.fail_next(1, 422, message_chars=500, details=1_000)
    (ext,) = rig.add(1)
    rig.drain()
    (row,) = rig.store.events()
    assert row.state == "dead"
    error = row.as_dict()["error"]
    assert len(error["details"]) == MAX_DETAILS + 1  # the last one says how many were cut
    assert error["details"][-1]["message"] == f"…(+{1_000 - MAX_DETAILS} more details)"
    assert all(len(text) <= MAX_TEXT_CHARS for text in all_strings(error))
    assert len(json.dumps(error)) < 16 * MAX_TEXT_CHARS
    assert row.last_error is not None
    assert len(row.last_error) <= MAX_NOTE_CHARS
    assert [a[0] for a in rig.alarms] == ["timeline_dead_letter"]
    assert len(rig.alarms[0][2]) <= MAX_NOTE_CHARS
    assert ext not in rig.sandbox.count_by_external_id()


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_a_redirect_pauses_delivery_as_config_until_fixed(rig: Rig, status: int) -> None:
    with HostileServer(lambda r: Reply(201)) as elsewhere:
        rig.sandbox.redirect_next(1_000, status, location=elsewhere.url)
        ids = rig.add(4)
        rig.drain(stop_when=lambda: rig.clock() >= T0 + 3600)
        assert rig.drainer.state == "paused: config"
        assert rig.store.event_count("dead") == 0
        assert rig.store.event_count("pending") == 4
        assert [a[0] for a in rig.alarms] == ["timeline_config"]  # one alarm, not four
        assert f"{status} redirect" in rig.alarms[0][2]
        assert "base_url" in rig.alarms[0][2]
        assert "redirect" in rig.drainer.status()["last_error"]
        posts = rig.posts()
        assert 1 <= len(posts) <= 10  # an hour: retried slowly
        assert {r.status for r in posts} == {status}
        assert elsewhere.requests == []  # never followed, so the token never went there
    rig.sandbox.redirect_next(0)  # base_url fixed (or the API is back where it was)
    rig.drain()
    rig.assert_exactly_once(ids)
    assert rig.drainer.state == "ok"


def memory_kib() -> dict[str, int]:
    text = Path("/proc/self/status").read_text()
    return {k: int(text.split(f"{k}:")[1].split()[0]) for k in ("VmHWM", "VmRSS")}


def reset_peak_rss() -> bool:
    """Start the process's RSS high-water mark (VmHWM) at now; False where Linux cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def test_a_300_mb_token_answer_is_cut_at_the_cap(rig: Rig) -> None:
    size = 300 * 1024 * 1024

    def token(request: Request) -> Reply:
        return Reply(200, headers=[("Content-Type", "application/json")], size=size)

    with HostileServer(token) as server:
        rig.store.close()
        rig.open(auth="client_credentials", token_url=server.url + "/oauth2/token")
        rig.add(1)
        measured = reset_peak_rss()
        before = memory_kib()["VmRSS"]
        rig.drainer.guarded_step()
        grown_mib = (memory_kib()["VmHWM"] - before) / 1024
    assert len(server.requests) == 1
    # The client read 64 KiB and hung up; what the server got out is the socket buffers.
    assert server.bytes_sent < 16 * 1024 * 1024
    assert grown_mib < 32 or not measured  # today's code: +900 MiB
    status = rig.drainer.status()
    assert status["drain"] == "backing off"
    assert f"more than {MAX_TOKEN_RESPONSE_BYTES} bytes" in status["last_error"]
    assert status["token"]["state"] == "failing"
    assert f"more than {MAX_TOKEN_RESPONSE_BYTES} bytes" in status["token"]["last_error"]
    assert rig.store.event_count("pending") == 1
    print(f"300 MiB token answer: {server.bytes_sent} bytes sent, RSS peak +{grown_mib:.1f} MiB")


def test_a_dripping_token_answer_ends_by_its_deadline_shows_and_alarms(
        tmp_path: Path, http: httpx.Client) -> None:
    deadline_s, alarm_after_s = 1.5, 3.0  # production: 15 s and 30 s
    body = b'{"access_token": "tok", "token_type": "Bearer", "expires_in": 7200}'

    def token(request: Request) -> Reply:
        return Reply(200, body, [("Content-Type", "application/json")], drip_s=0.5)

    alarms: list[tuple[float, str, str, int]] = []
    with HostileServer(token) as server, Store(tmp_path / "g.db") as store:
        (tmp_path / "secret").write_text(SECRET)
        limiter = RateLimiter(PER_S, PER_MIN)
        tokens = ClientCredentialsTokens(
            token_url=server.url + "/oauth2/token", client_id=CLIENT_ID,
            secret_file=tmp_path / "secret", scope=EVENT_SCOPE, http=http, limiter=limiter,
            deadline_s=deadline_s)
        client = StoraClient("http://127.0.0.1:9/2025-09", tokens, limiter, http=http)
        started = time.monotonic()
        drainer = Drainer(store, client, source_id="tsrc_test", template_id=None,
                          alarm=lambda k, u, d: alarms.append((time.monotonic(), k, d,
                                                               server.bytes_dripped)),
                          token_alarm_after_s=alarm_after_s)
        with store.transaction() as tx:
            tx.add_event(record(1))
        first = threading.Thread(target=drainer.guarded_step)
        first.start()
        seen: dict[str, Any] = {}
        while first.is_alive():  # the agent's status, asked while the refresh is stuck
            seen = drainer.status()["token"]
            if (seen["refreshing_for_s"] or 0) >= 0.5:
                break
            time.sleep(0.05)
        first.join()
        first_took = time.monotonic() - started
        # Ended by its deadline: fewer bytes than (deadline + 1 s) of 0.5 s drips (a loaded
        # machine drips slower, never faster), of an answer that drips for 35 s.
        assert server.bytes_dripped < (deadline_s + 1.0) / 0.5
        assert seen["state"] == "refreshing"
        while not alarms and time.monotonic() - started < 20:
            time.sleep(min(drainer.guarded_step(), 0.5))
        status = drainer.status()
    assert [a[1] for a in alarms] == ["timeline_token"]
    # At most one refresh in flight when the alarm falls due, and it ends by its deadline:
    # alarm_after_s + deadline_s, plus slack for a loaded machine (production: 45 s).
    # Counted in drips, as above: less than that time spent listening to the token server.
    assert alarms[0][3] < (alarm_after_s + deadline_s + 2.0) / 0.5
    assert f"no complete answer within {deadline_s:g} s" in alarms[0][2]
    assert status["drain"] == "backing off"
    assert status["token"]["state"] == "failing"
    assert f"within {deadline_s:g} s" in status["last_error"]
    assert len(server.requests) >= 1
    print(f"dripping token answer: first refresh ended after {first_took:.2f} s "
          f"(deadline {deadline_s} s), alarm after {alarms[0][0] - started:.2f} s "
          f"(due at {alarm_after_s} s), {len(server.requests)} token requests")
