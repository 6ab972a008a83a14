"""``stora-gateway selftest UNIT``: broker → agent → lock → Timeline, end to end.

A real Mosquitto, the simulators, the sandbox Stora API and the agent; the self-test
runs as a real process (or through ``main`` for the cases that need the test's hands on
the site) with its own key, which the test adds to ``[commands] trusted_keys`` exactly
as ``selftest --new-key`` tells an installer to.  Then each way the path can break is
broken once, and the report must name that step.
"""

from __future__ import annotations

import io
import json
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from devkit.broker_client import Client
from devkit.mosquitto import Broker
from devkit.sandbox import Sandbox
from devkit.site import NO_STORA_URL, SITE, STORA_TOKEN, RunningAgent, SimSite, make_site
from gateway.cli.main import main
from tests.support.cli_process import run_cli
from tests.support.deploy import ACL, ID_BINDING

pytestmark = pytest.mark.simulator_only

STEPS = ["broker", "agent", "command", "unlocked", "relocked", "timeline unlock",
         "timeline relock"]


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = main(list(argv), out=out, err=err)
    return status, out.getvalue(), err.getvalue()


def new_key(directory: Path) -> tuple[Path, str]:
    """``selftest --new-key``: the key file and the trusted_keys entry it printed."""
    key = directory / "selftest.pem"
    status, out, err = cli("selftest", "--new-key", str(key))
    assert status == 0, err
    entry = out.strip().splitlines()[-1]
    assert re.fullmatch(r'selftest = "[A-Za-z0-9_-]{43}"', entry), out
    assert key.stat().st_mode & 0o777 == 0o600
    return key, entry


def trust(config: Path, entry: str) -> None:
    """Add ``entry`` to ``[commands] trusted_keys``, as the installer does."""
    text = config.read_text()
    head, rest = text.split("trusted_keys = { ", 1)
    config.write_text(f"{head}trusted_keys = {{ {entry}, {rest}")


@dataclass
class Rig:
    site: SimSite
    sandbox: Sandbox
    key: Path
    entry: str

    def selftest(self, *argv: str) -> tuple[int, dict[str, Any]]:
        """The self-test through ``main``, as JSON."""
        status, out, err = cli("selftest", *argv, "--key-file", str(self.key), "--json",
                               "--config", str(self.site.config_path))
        assert out, err
        return status, json.loads(out)


def by_step(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    assert [s["step"] for s in report["steps"]] == STEPS, report
    return {s["step"]: s for s in report["steps"]}


def make_rig(tmp_path: Path, broker: Broker, sandbox: Sandbox, *, trusted: bool = True,
             stora_url: str | None = None) -> Rig:
    site = make_site(tmp_path, broker, stora_url=stora_url or sandbox.api_url)
    key, entry = new_key(tmp_path)
    if trusted:
        trust(site.config_path, entry)
    return Rig(site, sandbox, key, entry)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    with Broker(tmp_path / "broker") as broker, \
            Sandbox(static_tokens={STORA_TOKEN}) as sandbox:
        made = make_rig(tmp_path, broker, sandbox)
        try:
            yield made
        finally:
            made.site.close()


def test_selftest_checks_the_whole_path(rig: Rig) -> None:
    """The acceptance: the real CLI, a signed unlock through the broker, the agent
    drives the Modbus relay, relocks, and both Timeline Events reach the sandbox."""
    with RunningAgent(rig.site.config_path):
        done = run_cli("selftest", "A-101", "--seconds", "1", "--key-file", str(rig.key),
                       "--config", str(rig.site.config_path))
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("self-test of A-101 (unit_a101) at site site_test")
    table = "\n".join(lines)
    for step in STEPS:
        assert re.search(rf"^{step} +PASS ", table, re.MULTILINE), table
    assert "OK: broker → agent → lock → Timeline works for A-101" in table
    assert "remove it there, and delete" in table  # the reminder, every run
    descriptions = [e["description"] for e in rig.sandbox.events()]
    assert any(d.startswith("Unit unlocked via TestGate — for 1 s; unit A-101; by site "
                            "self-test by ") for d in descriptions), descriptions
    assert any(d.startswith("Unit locked via TestGate — relocked") for d in descriptions)
    assert rig.site.coil("unit_a101") is False
    assert done.stderr == ""


def test_no_agent_fails_at_the_agent_step(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    import devkit.selftest

    # A retained status arrives with the SUBACK, in milliseconds: 1 s is ample here.
    monkeypatch.setattr(devkit.selftest, "STATUS_WAIT_S", 1.0)
    status, report = rig.selftest("A-101")
    assert status == 1
    steps = by_step(report)
    assert steps["broker"]["status"] == "PASS"
    assert steps["agent"]["status"] == "FAIL"
    assert "no retained status" in steps["agent"]["detail"]
    assert {steps[s]["status"] for s in STEPS[2:]} == {"SKIP"}
    assert report["ok"] is False


def test_stora_unreachable_fails_at_the_timeline_and_says_the_event_stays_queued(
        tmp_path: Path) -> None:
    with Broker(tmp_path / "broker") as broker, \
            Sandbox(static_tokens={STORA_TOKEN}) as sandbox:
        rig = make_rig(tmp_path, broker, sandbox, stora_url=NO_STORA_URL)
        try:
            with RunningAgent(rig.site.config_path):
                status, report = rig.selftest("B-201", "--seconds", "1",
                                              "--timeline-wait", "1")
        finally:
            rig.site.close()
    assert status == 1
    steps = by_step(report)
    assert [steps[s]["status"] for s in STEPS[:5]] == ["PASS"] * 5
    for step in ("timeline unlock", "timeline relock"):
        assert steps[step]["status"] == "FAIL"
        assert "queued, not delivered within 1 s" in steps[step]["detail"]
        assert "stays queued" in steps[step]["detail"]


def test_an_agent_that_was_not_restarted_refuses_the_key_and_the_report_says_why(
        tmp_path: Path) -> None:
    """The key is in the file but the running agent started before it was added."""
    with Broker(tmp_path / "broker") as broker, \
            Sandbox(static_tokens={STORA_TOKEN}) as sandbox:
        rig = make_rig(tmp_path, broker, sandbox, trusted=False)
        try:
            with RunningAgent(rig.site.config_path):
                trust(rig.site.config_path, rig.entry)
                status, report = rig.selftest("A-102")
            coil = rig.site.coil("unit_a102")
        finally:
            rig.site.close()
    assert status == 1
    steps = by_step(report)
    assert steps["command"]["status"] == "FAIL"
    assert "rejected (unknown_key)" in steps["command"]["detail"]
    assert "restart the agent" in steps["command"]["detail"]
    assert coil is False


def test_usage_errors_are_one_line_exit_2(rig: Rig, tmp_path: Path) -> None:
    config = str(rig.site.config_path)
    untrusted = tmp_path / "other"
    untrusted.mkdir()
    other_key, _ = new_key(untrusted)
    cases = [
        (["selftest", "--config", config], "give the UNIT"),
        (["selftest", "A-101", "--config", config], "--key-file"),
        (["selftest", "Z-999", "--key-file", str(rig.key), "--config", config],
         "unknown unit"),
        (["selftest", "A-101", "--key-file", str(other_key), "--config", config],
         "is not the one [commands] trusted_keys lists"),
        (["selftest", "--new-key", str(rig.key)], "never overwrites a key"),
        (["selftest", "A-101", "--seconds", "0", "--key-file", str(rig.key), "--config",
          config], "--seconds"),
    ]
    for argv, message in cases:
        status, _, err = cli(*argv)
        assert status == 2, (argv, err)
        assert message in err, (argv, err)
        assert err.count("\n") == 1, err
    (tmp_path / "bare").mkdir()
    bare = make_site(tmp_path / "bare", rig.site.broker)  # trusts only its own test key
    try:
        status, _, err = cli("selftest", "A-101", "--key-file", str(rig.key), "--config",
                             str(bare.config_path))
        assert status == 2
        assert rig.entry.split(" = ")[1] in err  # the line to add, with this key
    finally:
        bare.close()


def test_on_the_shipped_acl_with_its_own_account(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Client ids bound to accounts and the shipped ACL as it ships (its gw-selftest and
    gw-watch lines): gw-selftest passes and the agent keeps its one connection; watch's
    read-only account fails at the command step, named; an account the ACL gives nothing
    fails at the agent step, and the report says the ACL may be why."""
    import devkit.selftest

    monkeypatch.setattr(devkit.selftest, "STATUS_WAIT_S", 1.0)  # as above
    passwords = {SITE: secrets.token_urlsafe(9), "gw-selftest": secrets.token_urlsafe(9),
                 "gw-watch": secrets.token_urlsafe(9), "tech": secrets.token_urlsafe(9)}
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir(mode=0o700)
    files = {}
    for user, password in passwords.items():
        files[user] = secrets_dir / user
        files[user].write_text(password + "\n")
        files[user].chmod(0o600)
    with Broker(tmp_path / "broker", users=passwords,
                extra_conf=[f"acl_file {ACL}", ID_BINDING]) as broker, \
            Sandbox(static_tokens={STORA_TOKEN}) as sandbox:
        rig = make_rig(tmp_path, broker, sandbox)
        text = rig.site.config_path.read_text()
        rig.site.config_path.write_text(text.replace(
            "keepalive_s = 5\n",
            f'keepalive_s = 5\nusername = "{SITE}"\npassword_file = "{files[SITE]}"\n'))
        try:
            with RunningAgent(rig.site.config_path) as agent:
                ok, report = rig.selftest("A-101", "--seconds", "1", "--password-file",
                                          str(files["gw-selftest"]))
                refused, denied = rig.selftest("A-101", "--username", "gw-watch",
                                               "--password-file", str(files["gw-watch"]))
                nobody, hidden = rig.selftest("A-101", "--username", "tech",
                                              "--password-file", str(files["tech"]))
                stats = agent.link.stats()
        finally:
            rig.site.close()
    assert ok == 0, report
    assert "as gw-selftest" in by_step(report)["broker"]["detail"]
    assert refused == 1
    command = by_step(denied)["command"]
    assert command["status"] == "FAIL"
    assert "refused to let gw-watch publish" in command["detail"]
    assert nobody == 1
    assert "may tech read it (the broker's ACL)" in by_step(hidden)["agent"]["detail"]
    assert (stats["connects"], stats["disconnects"]) == (1, 0)


def test_the_agent_s_account_is_refused(rig: Rig) -> None:
    text = rig.site.config_path.read_text()
    rig.site.config_path.write_text(text.replace(
        "keepalive_s = 5\n", 'keepalive_s = 5\nusername = "agent-account"\n'))
    with Client(rig.site.broker) as probe:
        probe.subscribe("#")
        status, _, err = cli("selftest", "A-101", "--username", "agent-account",
                             "--key-file", str(rig.key), "--config", str(rig.site.config_path))
        assert status == 2
        assert "the agent's broker account" in err
        assert probe.messages() == []  # nothing was sent


def test_the_timeline_steps_quote_stora_s_whole_refusal_and_count_attempts(
        tmp_path: Path) -> None:
    """Read from the outbox as the agent leaves it: a dead letter names Stora's message
    and the field at fault (as the alarm and ``status`` do); a queued event says how
    many attempts it had, in words ("1 attempt")."""
    import time
    from types import SimpleNamespace
    from typing import cast

    from devkit.selftest import SelfTest
    from gateway.link.site_client import BrokerAccount
    from gateway.outbox.timeline import EventRecord
    from gateway.store import Store

    now = time.time()
    with Store(tmp_path / "gateway.db") as store, store.transaction() as tx:
        for n, kind in enumerate(("unlocked", "locked")):
            tx.add_event(EventRecord(f"e-{n}", kind, "unit_a101", "A-101", SITE,
                                     f"Unit {kind}", None, None, now))
        tx.mark_dead(1, generation=0, unanswered_since=None, attempts=1, status=422,
                     code="invalid_content", dead_at=now, error={
                         "message": "the request body is invalid", "request_id": "req_9",
                         "details": [{"pointer": "/contact/id",
                                      "message": "must be an id starting with 'con_'"}]})
        tx.record_attempt(2, generation=0, unanswered_since=now, next_attempt_at=now + 60,
                          attempts=1, last_error="503 unavailable")
    test = SelfTest(cast(Any, None), cast(Any, SimpleNamespace(unit="unit_a101")),
                    BrokerAccount(None), seconds=1, timeline_wait_s=0)
    with Store(tmp_path / "gateway.db", read_only=True) as tail:
        test._timeline(tail, None, 0)
    dead, queued = test.steps
    assert (dead.step, dead.status) == ("timeline unlock", "FAIL")
    assert dead.detail == (
        "REFUSED by Stora (dead letter 1: 422 invalid_content: the request body is invalid "
        "(/contact/id: must be an id starting with 'con_') [request req_9]); see "
        "`stora-gateway outbox --dead`")
    assert (queued.step, queued.status) == ("timeline relock", "FAIL")
    assert "(event 2, 1 attempt; last error: 503 unavailable)" in queued.detail
