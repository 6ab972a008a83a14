"""The Stora client (gateway/stora/), issue 11: hostile answers from a local stand-in server
(forged log lines, deep bodies, redirects, dripped headers, compressed or unusable tokens).
"""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import httpx
import pytest

from gateway.stora.answers import AuthFailed, Dead, Delivered, Retry
from gateway.stora.client import make_http_client
from gateway.stora.idempotency import IdempotencyKey
from gateway.stora.limits import MAX_TEXT_CHARS, cap_text, safe_id
from gateway.stora.tokens import MAX_TOKEN_RESPONSE_BYTES
from tests.support.hostile_http import HostileServer, Reply, json_reply
from tests.support.stora_client import (
    CREATED,
    TOKEN_BODY,
    TOKEN_PATH,
    body_for,
    hostile_client,
    routes,
)


def test_stora_text_cannot_forge_or_swell_log_lines(
        tmp_path: Path, http: httpx.Client, caplog: pytest.LogCaptureFixture) -> None:
    forged = "aevt_1\n2026-05-01 12:00:00 ERROR gateway.agent: door A-101 forced\x1b[31m"
    error = json.dumps({"error": {
        "code": "forbidden\r\nINFO forged line", "type": "invalid_request_error",
        "message": "no\n\x1b[2J" + "x" * 10_000, "request_id": "r\n" * 5_000,
        "details": [{"message": "\n" * 3_000, "pointer": "/a\u202e"}]}})
    replies = iter([json_reply(201, json.dumps({"event": {"id": forged}})),
                    json_reply(422, error)])
    with HostileServer(lambda r: json_reply(200, TOKEN_BODY) if r.path == TOKEN_PATH
                       else next(replies)) as server, caplog.at_level(logging.DEBUG):
        client = hostile_client(server, tmp_path, http)
        delivered = client.post_event(body_for("f1"), IdempotencyKey("f1"))
        dead = client.post_event(body_for("f2"), IdempotencyKey("f2"))
    assert isinstance(delivered, Delivered)
    assert delivered.event_id is None  # not id-shaped: not kept
    assert isinstance(dead, Dead)
    record = dead.as_record()
    assert record["code"] == "forbidden\\r\\nINFO forged line"  # escaped, visible
    texts = [record["code"], record["message"], record["request_id"],
             *(d[k] for d in record["details"] for k in ("message", "pointer"))]
    assert all(len(t) <= MAX_TEXT_CHARS and t.isprintable() for t in texts)
    messages = [r.getMessage() for r in caplog.records]
    assert any("not id-shaped" in m for m in messages)
    for message in messages:
        assert "\n" not in message
        assert "\r" not in message
        assert "\x1b" not in message
        assert len(message) < 2_000


def test_a_body_nested_too_deep_is_no_error_envelope_and_no_crash(
        tmp_path: Path, http: httpx.Client) -> None:
    deep = json_reply(422, "[" * 100_000)
    with HostileServer(routes(json_reply(200, TOKEN_BODY), deep)) as server:
        outcome = hostile_client(server, tmp_path, http).post_event(body_for("n"),
                                                                    IdempotencyKey("n"))
    assert isinstance(outcome, Dead)
    assert (outcome.status, outcome.code) == (422, "http_422")


def test_a_token_endpoint_that_redirects_is_a_refused_credential(
        tmp_path: Path, http: httpx.Client) -> None:
    moved = Reply(302, headers=[("Location", "https://elsewhere.invalid/steal\nX: y")])
    with HostileServer(routes(moved, json_reply(201, CREATED))) as server:
        client = hostile_client(server, tmp_path, http)
        outcome = client.post_event(body_for("r"), IdempotencyKey("r"))
        assert isinstance(outcome, AuthFailed)
        assert "token_url" in outcome.reason
        assert "302" in outcome.reason
        assert len(server.requests) == 1  # not followed: the secret went nowhere else
        assert client.tokens.health().state == "failing"


@pytest.mark.parametrize("token_side", [True, False])
def test_dripped_headers_end_by_the_deadline(
        tmp_path: Path, token_side: bool) -> None:
    """httpx's read timeout never fires on a byte every 0.2 s; the overall deadline does."""
    drip = Reply(200, TOKEN_BODY.encode(), head_drip_s=0.2)
    script = (routes(drip, json_reply(201, CREATED)) if token_side
              else routes(json_reply(200, TOKEN_BODY), drip))
    with HostileServer(script) as server, make_http_client() as http:
        client = hostile_client(server, tmp_path, http, deadline_s=1.0, token_deadline_s=1.0)
        outcome = client.post_event(body_for("d"), IdempotencyKey("d"))
        dripped = server.bytes_dripped  # how long it listened, in 0.2 s drips
    assert dripped < (1.0 + 0.8) / 0.2
    assert isinstance(outcome, Retry)
    if token_side:
        assert outcome.reason == "token_unavailable"
        assert "no complete answer within 1 s" in (outcome.detail or "")
    else:
        assert outcome.reason == "no_answer"
        assert outcome.key.unanswered_since is not None  # it may have been created


def test_a_compressed_token_answer_is_not_inflated(tmp_path: Path, http: httpx.Client) -> None:
    bomb = gzip.compress(b"\0" * (64 << 20), compresslevel=9)  # 64 MiB in ~64 KiB
    assert len(bomb) < MAX_TOKEN_RESPONSE_BYTES
    token = Reply(200, bomb, [("Content-Type", "application/json"),
                              ("Content-Encoding", "gzip")])
    with HostileServer(routes(token, json_reply(201, CREATED))) as server:
        outcome = hostile_client(server, tmp_path, http).post_event(body_for("z"),
                                                                    IdempotencyKey("z"))
    assert isinstance(outcome, Retry)
    assert outcome.reason == "token_unavailable"
    assert "compressed (gzip)" in (outcome.detail or "")
    assert server.requests[0].headers["accept-encoding"] == "identity"


def test_an_unusable_token_value_is_refused(tmp_path: Path, http: httpx.Client) -> None:
    bad = json.dumps({"access_token": "tok\r\nX-Injected: 1", "token_type": "Bearer"})
    with HostileServer(routes(json_reply(200, bad), json_reply(201, CREATED))) as server:
        outcome = hostile_client(server, tmp_path, http).post_event(body_for("t"),
                                                                    IdempotencyKey("t"))
    assert isinstance(outcome, Retry)
    assert "unusable token" in (outcome.detail or "")
    assert [r.path for r in server.requests] == [TOKEN_PATH]


def test_cap_text_and_safe_id() -> None:
    assert cap_text("short") == "short"
    capped = cap_text("é" * 1000, 50)
    assert len(capped) <= 50
    assert capped.endswith(f"…(+{1000 - capped.index('…')} chars)")
    assert cap_text("a\nb\x1b") == "a\\nb\\x1b"
    assert safe_id("aevt_01H-x") == "aevt_01H-x"
    for bad in ("", "a\nb", "a b", "x" * 65, 5, None, "aevt_1\n"):
        assert safe_id(bad) is None
