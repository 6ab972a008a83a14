"""The Stora API sandbox over real HTTP (devkit/sandbox/): the admin HTTP API, the HTTP
plumbing and the command line.
"""

from __future__ import annotations

import http.client
import io
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from devkit.sandbox import Sandbox
from devkit.testing import FakeClock, returns_within
from gateway.cli.main import main
from tests.support.sandbox import STATIC, T0, Response, call, get_token, post_event, state

ROOT = Path(__file__).resolve().parents[2]


def admin(sandbox: Sandbox, settings: Mapping[str, Any]) -> Response:
    return call(sandbox, "POST", "/_sandbox/faults", dict(settings))


# -- admin HTTP API -----------------------------------------------------------------------------
def test_admin_api_sets_every_switch(sandbox: Sandbox, clock: FakeClock) -> None:
    r = admin(sandbox, {"fail_next": 1})
    assert r.status == 200
    assert r.json()["faults"]["fail_next"] == 1
    assert post_event(sandbox, "a").status == 500

    admin(sandbox, {"outage": True})
    with pytest.raises(ConnectionError):
        post_event(sandbox, "b")
    admin(sandbox, {"outage": False})

    admin(sandbox, {"storm_s": 10})
    assert post_event(sandbox, "b").status == 429
    admin(sandbox, {"storm_s": 0})

    admin(sandbox, {"drop_after_commit": 1})
    with pytest.raises(ConnectionError):
        post_event(sandbox, "b")

    admin(sandbox, {"reject_external_ids": ["c"], "reject_status": 422})
    assert post_event(sandbox, "c").status == 422
    admin(sandbox, {"reset": True})
    assert post_event(sandbox, "c").status == 201

    token = get_token(sandbox).json()["access_token"]
    admin(sandbox, {"expire_tokens": True})
    assert post_event(sandbox, "d", token=token).status == 401

    admin(sandbox, {"store_unauthorized": False})
    assert sandbox.store_unauthorized is False

    post_event(sandbox, "e", key="k")
    admin(sandbox, {"advance_s": 86_400})
    assert state(sandbox)["now"] == T0 + 86_400
    post_event(sandbox, "e", key="k")
    assert sandbox.count_by_external_id()["e"] == 2

    admin(sandbox, {"slow_s": 0.2})
    started = time.monotonic()
    post_event(sandbox, "f")
    assert time.monotonic() - started >= 0.2
    admin(sandbox, {"slow_s": 0})

    admin(sandbox, {"fail_next": 1, "fail_status": 403, "fail_message_chars": 5000,
                    "fail_details": 2})
    r = post_event(sandbox, "g")
    assert r.status == 403
    assert len(r.error()["message"]) == 5000
    assert len(r.error()["details"]) == 2

    admin(sandbox, {"redirect_next": 1, "redirect_status": 308})
    assert post_event(sandbox, "h").status == 308
    assert post_event(sandbox, "h").status == 201


@pytest.mark.parametrize(
    "settings",
    [
        {"nope": 1},
        {"fail_next": -1},
        {"fail_next": True},
        {"slow_s": "1"},
        {"outage": 1},
        {"reject_external_ids": "x"},
        {"outage": True, "fail_status": 418},  # all or nothing: outage stays off
        {"outage": True, "redirect_status": 200},
        {"fail_message_chars": -1},
    ],
)
def test_admin_api_rejects_bad_settings(sandbox: Sandbox, settings: dict[str, Any]) -> None:
    r = admin(sandbox, settings)
    assert r.status == 400
    assert r.json()["error"]
    assert state(sandbox)["faults"]["outage"] is False
    assert state(sandbox)["faults"]["fail_next"] == 0


def test_admin_api_reports_state(sandbox: Sandbox) -> None:
    post_event(sandbox, "a", key="k1")
    post_event(sandbox, "a", key="k1")
    post_event(sandbox, "b", key="k2")
    post_event(sandbox, "b", key="k3")
    s = state(sandbox)
    assert s["events"] == 3
    assert s["by_external_id"] == {"a": 1, "b": 2}
    assert s["duplicates"] == {"b": 2}
    assert s["requests"] == 4
    assert s["replayed"] == 1
    assert s["idempotency_keys"] == 3
    assert s["api_url"] == sandbox.api_url
    events = call(sandbox, "GET", "/_sandbox/events").json()["events"]
    assert events == sandbox.events()
    log = call(sandbox, "GET", "/_sandbox/requests").json()["requests"]
    assert [(r["status"], r["idempotency_key"], r["replayed"]) for r in log] == [
        (201, "k1", False),
        (201, "k1", True),
        (201, "k2", False),
        (201, "k3", False),
    ]
    assert call(sandbox, "GET", "/_sandbox/nope").status == 404
    assert call(sandbox, "POST", "/_sandbox/faults", b"[1]").status == 400


def test_admin_api_is_not_limited_or_recorded(limited: Sandbox) -> None:
    for _ in range(20):
        assert call(limited, "GET", "/_sandbox/state").status == 200
    assert limited.requests == []
    for i in range(5):
        assert post_event(limited, f"e{i}").status == 201


# -- HTTP plumbing ------------------------------------------------------------------------------
def test_keep_alive_and_stop_closes_idle_connections(clock: FakeClock) -> None:
    sb = Sandbox(static_tokens={STATIC}, clock=clock).start()
    conn = http.client.HTTPConnection("127.0.0.1", sb.port, timeout=5)
    try:
        for i in range(3):
            assert post_event(sb, f"e{i}", conn=conn).status == 201
        # An idle keep-alive connection would hold a handler for IDLE_S (30 s): stop
        # closes it instead.
        returns_within(15, sb.stop, "stop with an idle keep-alive connection open")
        with pytest.raises(ConnectionError):
            post_event(sb, "late", conn=conn)
    finally:
        conn.close()
        sb.stop()
    assert sb.count_by_external_id() == {"e0": 1, "e1": 1, "e2": 1}


def test_constructor_checks() -> None:
    with pytest.raises(ValueError, match="rate limits"):
        Sandbox(max_per_second=0)
    with pytest.raises(ValueError, match="port"):
        Sandbox(port=70_000)


# -- command line ---------------------------------------------------------------------------------
def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = main(list(argv), out=out, err=err)
    return status, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_cli_serves_until_signalled(tmp_path: Path, sig: signal.Signals) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    tokens = tmp_path / "tokens"
    tokens.write_text("# long-lived tokens\n\nstatic-a\nstatic-b\n")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gateway.cli.main",
            "sandbox",
            "--port",
            "0",
            "--client-id",
            "cid",
            "--client-secret-file",
            str(secret),
            "--static-token-file",
            str(tokens),
            "--max-per-second",
            "3",
            "--token-ttl",
            "60",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        urls: dict[str, str] = {}
        while len(urls) < 4:
            line = proc.stdout.readline()
            assert line, f"sandbox exited early: {proc.communicate()[1]}"
            name, _, value = line.strip().partition(": ")
            urls[name] = value
        assert set(urls) == {"url", "api_url", "token_url", "admin_url"}
        port = int(urls["url"].rsplit(":", 1)[1])
        assert urls["api_url"] == f"http://127.0.0.1:{port}/2025-09"
        assert urls["token_url"] == f"http://127.0.0.1:{port}/oauth2/token"

        remote = Sandbox(port=port)  # only to address the running process
        r = get_token(remote, "cid", "s3cret")
        assert r.json()["expires_in"] == 60
        assert post_event(remote, token=r.json()["access_token"]).status == 201
        statuses = [post_event(remote, token="static-b").status for _ in range(2)]
        assert statuses == [201, 429]  # --max-per-second 3, the token request included
        assert state(remote)["events"] == 2

        proc.send_signal(sig)
        _, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err
        assert "Traceback" not in err
        with (
            pytest.raises(ConnectionRefusedError),
            socket.create_connection(("127.0.0.1", port), timeout=1),
        ):
            pass
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_cli_usage_errors(tmp_path: Path) -> None:
    status, out, err = run_cli("sandbox", "--client-id", "cid")
    assert (status, out) == (2, "")
    assert "--client-secret-file" in err
    assert err.count("\n") == 1

    status, _, err = run_cli(
        "sandbox", "--client-id", "cid", "--client-secret-file", str(tmp_path / "missing")
    )
    assert status == 2
    assert "missing" in err
    assert err.count("\n") == 1

    empty = tmp_path / "empty"
    empty.write_text("# nothing\n")
    status, _, err = run_cli("sandbox", "--static-token-file", str(empty))
    assert status == 2
    assert "no token" in err

    status, _, err = run_cli("sandbox", "--max-per-second", "0")
    assert status == 2


def test_cli_port_in_use_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        status, out, err = run_cli("sandbox", "--port", str(port))
    assert status == 1
    assert out == ""
    assert f"cannot listen on 127.0.0.1:{port}" in err
    assert "Traceback" not in err
