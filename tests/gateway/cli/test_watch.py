"""``stora-gateway watch``: the site live, against a real Mosquitto and a running agent.

The agent runs with the simulators and the sandbox Stora API; the test sends signed
commands as the relay would, and reads what ``watch`` (a real process) prints.  The
broker-account tests run the shipped ACL as it ships (deploy/mosquitto/acl, with its
``gw-watch`` lines), with client ids bound to accounts as on a site: watch must see
everything and never disconnect the agent.
"""

from __future__ import annotations

import io
import json
import secrets
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from devkit.broker_client import Client
from devkit.mosquitto import Broker
from devkit.sandbox import Sandbox
from devkit.site import PREFIX, SITE, STORA_TOKEN, RunningAgent, SimSite, make_site
from gateway.cli.main import main
from gateway.cli.watch import WATCH_ACCOUNT, WATCH_USER_ENV, run_watch
from gateway.config import load_config
from gateway.link.site_client import SiteLinkError, resolve_account
from tests.support.cli_process import CliProcess
from tests.support.deploy import ACL, ID_BINDING

pytestmark = pytest.mark.simulator_only

@pytest.fixture
def site(tmp_path: Path) -> Iterator[SimSite]:
    """Broker, sandbox Stora API, simulators and config (the agent is the test's)."""
    with Broker(tmp_path / "broker") as broker, \
            Sandbox(static_tokens={STORA_TOKEN}) as sandbox:
        built = make_site(tmp_path, broker, stora_url=sandbox.api_url)
        try:
            yield built
        finally:
            built.close()


def send_unlock(site: SimSite, unit: str, seconds: int, client: Client | None = None) -> str:
    """A signed unlock published as the relay would; its jti."""
    jti, token = site.signer.command("unlock", unit, dur=seconds, actor="tenant app")
    if client is not None:
        client.publish(f"{PREFIX}/cmd", token)
        return jti
    with Client(site.broker) as sender:
        sender.publish(f"{PREFIX}/cmd", token)
    return jti


def is_(doc: dict[str, Any], event: str, **data: Any) -> bool:
    """``doc`` is an ``event`` line whose data has these values."""
    return doc.get("event") == event and all(
        (doc.get("data") or {}).get(k) == v for k, v in data.items())


def index(docs: list[dict[str, Any]], event: str, **data: Any) -> int:
    """Where the first such line is (AssertionError naming the lines when absent)."""
    for i, doc in enumerate(docs):
        if is_(doc, event, **data):
            return i
    raise AssertionError(f"no {event} {data} in:\n" + "\n".join(map(str, docs)))


def test_watch_json_shows_an_unlock_and_its_relock(site: SimSite) -> None:
    """The acceptance: a signed unlock, its result, the unit unlocked then locked again,
    and both Timeline Events delivered, one JSON object per line, in that order."""
    with RunningAgent(site.config_path), \
            CliProcess("watch", "--json", "--config", str(site.config_path)) as watch:
        watch.wait_json(lambda d: is_(d, "broker", connected=True))
        watch.wait_json(lambda d: is_(d, "state", unit="unit_a101", locked=True))
        jti = send_unlock(site, "unit_a101", 1)
        watch.wait_json(lambda d: is_(d, "timeline", change="delivered", unit="unit_a101",
                                      kind="locked"))
        assert watch.interrupt() == 0
    docs = watch.json_lines()
    command = index(docs, "command", jti=jti)
    result = index(docs, "result", jti=jti, status="done")
    unlocked = index(docs, "state", unit="unit_a101", locked=False)
    relocked = next(i for i, d in enumerate(docs)
                    if i > unlocked and is_(d, "state", unit="unit_a101", locked=True))
    queued = index(docs, "timeline", change="queued", unit="unit_a101", kind="unlocked")
    delivered = index(docs, "timeline", change="delivered", unit="unit_a101", kind="unlocked")
    relock_delivered = index(docs, "timeline", change="delivered", unit="unit_a101",
                             kind="locked")
    assert command < result < relocked
    assert unlocked < relocked
    assert queued < delivered < relock_delivered
    assert docs[command]["data"]["verified"] is False  # watch does not check signatures
    assert docs[command]["reference"] == "A-101"
    assert docs[command]["text"].startswith("unlock A-101 for 1 s by tenant app")
    assert docs[delivered]["text"].startswith("delivered: Unit unlocked via TestGate")
    for doc in docs:  # every line: an ISO 8601 time in UTC, the text and the data
        assert datetime.fromisoformat(doc["at"]).utcoffset() is not None
        assert isinstance(doc["text"], str)
        assert isinstance(doc["data"], dict)
    assert watch.stderr == ""


def test_watch_for_people_reads_like_the_demo(site: SimSite) -> None:
    with RunningAgent(site.config_path), \
            CliProcess("watch", "--config", str(site.config_path)) as watch:
        watch.wait_for(lambda line: "lock    B-201 locked" in line)
        send_unlock(site, "unit_b201", 1)
        watch.wait_for(lambda line: "Stora   delivered: Unit locked via TestGate" in line)
        assert watch.interrupt() == 0
    text = "\n".join(watch.lines)
    assert f"watching site {SITE}" in text
    assert "→       unlock B-201 for 1 s by tenant app" in text
    assert "←       done: unlock B-201" in text
    assert "lock    B-201 unlocked" in text
    assert "agent   online (stora-gateway " in text


def test_a_dead_letter_shows_stora_s_whole_refusal(site: SimSite) -> None:
    """Stora refuses an event (a contact id of the wrong shape): its message is generic,
    only the detail names the field, so watch shows both, as the alarm does."""
    with RunningAgent(site.config_path), \
            CliProcess("watch", "--json", "--config", str(site.config_path)) as watch:
        watch.wait_json(lambda d: is_(d, "broker", connected=True))
        _, token = site.signer.command("lock", "unit_a101", contact="c-42")
        with Client(site.broker) as sender:
            sender.publish(f"{PREFIX}/cmd", token)
        watch.wait_json(lambda d: is_(d, "timeline", change="dead", unit="unit_a101"))
        assert watch.interrupt() == 0
    docs = watch.json_lines()
    text = docs[index(docs, "timeline", change="dead", unit="unit_a101")]["text"]
    assert text.startswith("REFUSED by Stora, dead-lettered (422 invalid_content: the "
                           "request body is invalid (/contact/id: must be an id starting "
                           "with 'con_'"), text
    assert text.endswith("see `stora-gateway outbox --dead`")


def test_a_refused_command_and_a_forgery_are_shown_with_the_agent_s_verdict(
        site: SimSite) -> None:
    from devkit.signer import CommandSigner, generate_keypair

    forger = CommandSigner(generate_keypair()[0], "test-2026", SITE)
    with RunningAgent(site.config_path), \
            CliProcess("watch", "--json", "--no-timeline", "--config",
                       str(site.config_path)) as watch:
        watch.wait_json(lambda d: is_(d, "broker", connected=True))
        jti, token = forger.command("unlock", "unit_a102", dur=1)
        with Client(site.broker) as sender:
            sender.publish(f"{PREFIX}/cmd", token)
            sender.publish(f"{PREFIX}/cmd", b"not a token")
        watch.wait_json(lambda d: is_(d, "result", reason="bad_signature"))
        watch.wait_json(lambda d: is_(d, "result", reason="malformed"))
        assert watch.interrupt() == 0
    docs = watch.json_lines()
    assert docs[index(docs, "command", jti=jti)]["data"]["verified"] is False
    assert "not a readable command token" in docs[index(docs, "command", size=11)]["text"]
    assert not any(is_(d, "state", unit="unit_a102", locked=False) for d in docs)


def _accounts_broker(directory: Path, passwords: dict[str, str]) -> Broker:
    """The shipped ACL, unchanged: without its gw-watch lines watch sees nothing."""
    return Broker(directory / "broker", users=passwords,
                  extra_conf=[f"acl_file {ACL}", ID_BINDING])


def _secret(path: Path, text: str) -> Path:
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path


def test_watch_with_its_own_account_never_disconnects_the_agent(tmp_path: Path) -> None:
    """Shipped ACL, client ids bound to accounts: watch logs in as gw-watch and sees the
    relay's unlock; the agent keeps its one connection.  The agent's own account is
    refused before any connection is made."""
    passwords = {SITE: secrets.token_urlsafe(9), "relay": secrets.token_urlsafe(9),
                 WATCH_ACCOUNT: secrets.token_urlsafe(9)}
    with _accounts_broker(tmp_path, passwords) as broker:
        site = make_site(tmp_path, broker)
        agent_secret = _secret(tmp_path / "agent-password", passwords[SITE])
        text = site.config_path.read_text()
        site.config_path.write_text(text.replace(
            "keepalive_s = 5\n",
            f'keepalive_s = 5\nusername = "{SITE}"\npassword_file = "{agent_secret}"\n'))
        watch_secret = _secret(tmp_path / "watch-password", passwords[WATCH_ACCOUNT])
        try:
            with RunningAgent(site.config_path) as agent, \
                    Client(broker, username="relay", password=passwords["relay"]) as relay, \
                    CliProcess("watch", "--json", "--password-file", str(watch_secret),
                               "--config", str(site.config_path)) as watch:
                watch.wait_json(lambda d: is_(d, "agent", online=True))
                jti = send_unlock(site, "unit_a101", 1, client=relay)
                # In the order the agent publishes: the state, then the result.
                watch.wait_json(lambda d: is_(d, "command", jti=jti))
                watch.wait_json(lambda d: is_(d, "state", unit="unit_a101", locked=False))
                watch.wait_json(lambda d: is_(d, "result", jti=jti, status="done"))

                out, err = io.StringIO(), io.StringIO()
                status = main(["watch", "--username", SITE, "--config",
                               str(site.config_path)], out=out, err=err)
                assert status == 2
                assert "the agent's broker account" in err.getvalue()
                assert watch.interrupt() == 0
                stats = agent.link.stats()
                assert (stats["connects"], stats["disconnects"]) == (1, 0)
        finally:
            site.close()
    assert f"as {WATCH_ACCOUNT}" in broker.log_text()  # the default account for watch


def test_account_rules(tmp_path: Path) -> None:
    """Who watch logs in as: options, then the environment, then gw-watch on a broker
    with accounts; never the agent's or a controller link's; a password file others may
    read is refused."""
    with Broker(tmp_path / "broker") as broker:
        site = make_site(tmp_path, broker)
    try:
        text = site.config_path.read_text().replace(
            "keepalive_s = 5\n", 'keepalive_s = 5\nusername = "agent-account"\n')
        site.config_path.write_text(text + (
            '[[controllers]]\nname = "zb"\ndriver = "zigbee2mqtt"\n'
            'username = "gw-zigbee2mqtt"\n'))
        config = load_config(site.config_path)
        kw: dict[str, Any] = {"default_user": WATCH_ACCOUNT, "user_env": WATCH_USER_ENV,
                              "password_env": "NONE"}
        assert resolve_account(config, None, None, environ={}, **kw).username == "gw-watch"
        assert resolve_account(config, None, None, environ={WATCH_USER_ENV: "tech-7"},
                               **kw).username == "tech-7"
        assert resolve_account(config, "alice", None, environ={WATCH_USER_ENV: "tech-7"},
                               **kw).username == "alice"
        for user, why in (("agent-account", "agent's"), ("gw-zigbee2mqtt", "controller link")):
            with pytest.raises(SiteLinkError, match=why) as caught:
                resolve_account(config, user, None, environ={}, **kw)
            assert caught.value.status == 2
        loose = tmp_path / "loose"
        loose.write_text("pw\n")
        loose.chmod(0o644)
        with pytest.raises(SiteLinkError, match="chmod 600"):
            resolve_account(config, None, str(loose), environ={}, **kw)
        loose.chmod(0o600)
        account = resolve_account(config, None, str(loose), environ={}, **kw)
        assert account.password == "pw"
        assert "pw" not in repr(account)
    finally:
        site.close()


def test_silence_from_the_agent_is_explained(site: SimSite,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """No agent status at all (it never ran here, or the ACL hides it): watch says so
    once, on stderr, and keeps watching; an unreachable broker is exit 1."""
    import gateway.cli.watch

    monkeypatch.setattr(gateway.cli.watch, "STATUS_HINT_S", 0.0)
    config = load_config(site.config_path)
    out, err, stop = io.StringIO(), io.StringIO(), threading.Event()
    account = resolve_account(config, None, None, default_user=WATCH_ACCOUNT,
                              user_env=WATCH_USER_ENV, password_env="NONE", environ={})
    result: list[int] = []
    runner = threading.Thread(target=lambda: result.append(
        run_watch(config, account, out, err, timeline=False, stop=stop)))
    runner.start()
    deadline = time.monotonic() + 10
    while "no status from the agent" not in err.getvalue():
        assert time.monotonic() < deadline, err.getvalue()
        time.sleep(0.02)
    stop.set()
    runner.join(timeout=10)
    assert result == [0]
    assert err.getvalue().count("no status from the agent") == 1
    assert "broker's ACL" in err.getvalue()

    site.broker.kill()
    out, err = io.StringIO(), io.StringIO()
    status = main(["watch", "--config", str(site.config_path)], out=out, err=err)
    assert status == 1
    assert "cannot reach the broker" in err.getvalue()
    assert err.getvalue().count("\n") <= 2  # the outbox note, then the one error
    assert "Traceback" not in err.getvalue()


def test_watch_json_lines_are_one_object_each(site: SimSite) -> None:
    """Piped to a tool: nothing but JSON objects on stdout, one per line."""
    with RunningAgent(site.config_path), \
            CliProcess("watch", "--json", "--config", str(site.config_path)) as watch:
        watch.wait_json(lambda d: is_(d, "agent", online=True))
        send_unlock(site, "unit_b202", 1)
        watch.wait_json(lambda d: is_(d, "result", status="done"))
        assert watch.interrupt() == 0
    assert watch.lines
    assert all(isinstance(json.loads(line), dict) for line in watch.lines)


def test_a_refused_password_is_one_line_exit_2(tmp_path: Path) -> None:
    with Broker(tmp_path / "broker", users={WATCH_ACCOUNT: "right"}) as broker:
        site = make_site(tmp_path, broker)
        try:
            text = site.config_path.read_text()
            site.config_path.write_text(text.replace(
                "keepalive_s = 5\n", 'keepalive_s = 5\nusername = "agent-account"\n'))
            wrong = _secret(tmp_path / "wrong", "wrong")
            out, err = io.StringIO(), io.StringIO()
            status = main(["watch", "--password-file", str(wrong), "--no-timeline",
                           "--config", str(site.config_path)], out=out, err=err)
        finally:
            site.close()
    assert status == 2
    assert f"refused to connect as {WATCH_ACCOUNT}" in err.getvalue()
    assert err.getvalue().count("\n") == 1
    assert "wrong" not in err.getvalue().replace(str(wrong), "")  # never the password


def test_watch_is_product_code_and_loads_no_dev_kit() -> None:
    """style.md: the dev kit (demo, sandbox, signer, simulators) is never imported by the
    product; watch and the live view it shares with the demo are product code.  The CLI's
    parser loads the dev kit's plugin (its commands' parsers, gateway/cli/plugins.py) and
    nothing else of it."""
    import subprocess
    import sys

    from tests.support.cli_process import ROOT, cli_env

    loaded = ("print(sorted(m for m in sys.modules "
              "if m.split('.')[0] == 'devkit' or m == 'devkit.signer'))\n")
    code = ("import sys, gateway.cli.watch, gateway.link.site_client, gateway.ops.liveview, "
            f"gateway.store\n{loaded}from gateway.cli.main import build_parser\nbuild_parser()\n"
            f"{loaded}")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=cli_env(), cwd=ROOT, check=True)
    assert done.stdout.splitlines() == [
        "[]", "['devkit', 'devkit.commands', 'devkit.simulate_options']"], done.stdout


def test_the_timeline_feed_follows_every_pending_event_it_tracks(tmp_path: Path) -> None:
    """A backlog (Stora down for a while) of more events than one read returns: each
    poll reads every tracked one, so a delivery far above the lowest slice is reported,
    once; beyond MAX_TRACKED the oldest are let go."""
    from gateway.cli.watch import MAX_TRACKED, TimelineFeed
    from gateway.outbox.timeline import EventRecord
    from gateway.store import Store

    path = tmp_path / "gateway.db"
    count = MAX_TRACKED + 100
    assert count > 5 * Store.OUTBOX_READ_SLICE
    with Store(path) as store, Store(path, read_only=True) as tail:
        feed = TimelineFeed(tail)
        with store.transaction() as tx:
            for n in range(1, count + 1):
                tx.add_event(EventRecord(f"e-{n}", "unlocked", "unit_a101", "A-101", SITE,
                                         f"event {n}", None, None, time.time()))
        queued = []
        while feed.watermark < count:  # a slice per poll
            queued += [c.row.seq for c in feed.poll() if c.change == "queued"]
        assert queued == list(range(1, count + 1))
        with store.transaction() as tx:
            for seq in (50, count - 50):
                tx.mark_delivered(seq, generation=0, attempts=1, delivered_at=time.time(),
                                  stora_event_id=None)
            tx.record_attempt(count - 400, generation=0, unanswered_since=None,
                              next_attempt_at=0, attempts=1, last_error="503 unavailable")
        changes = [(c.change, c.row.seq) for c in feed.poll()]
        assert changes == [("attempt", count - 400), ("delivered", count - 50)]
        assert feed.poll() == []  # once


def test_events_in_reads_any_number_of_rows() -> None:
    """In slices: one statement's ``?`` marks stay under SQLite's limit (999 on old
    builds), and none is left out."""
    from gateway.outbox.timeline import EventRecord
    from gateway.store import Store

    with Store(Path(":memory:"), ephemeral=True) as store:
        with store.transaction() as tx:
            for n in range(1, 1201):
                tx.add_event(EventRecord(f"e-{n}", "locked", "unit_a101", "A-101", SITE,
                                         f"event {n}", None, None, time.time()))
        rows = store.events_in(range(1, 1500))
    assert [r.seq for r in rows] == list(range(1, 1201))


def test_an_outbox_this_user_may_not_reach_is_a_note_not_a_crash(
        site: SimSite, monkeypatch: pytest.MonkeyPatch) -> None:
    """Python 3.11's ``Path.exists`` raises ``PermissionError`` in a directory the user
    may not enter (0750 on an install, this user outside the group; root, who runs the
    tests, is never refused, so the refusal is staged)."""
    from gateway.cli.watch import open_outbox

    config = load_config(site.config_path)
    real_exists = Path.exists

    def exists(path: Path, *args: Any, **kwargs: Any) -> bool:
        if path == config.storage.path:
            raise PermissionError(13, "Permission denied", str(path))
        return real_exists(path, *args, **kwargs)

    monkeypatch.setattr(Path, "exists", exists)
    tail, why = open_outbox(config)
    assert tail is None
    assert why == (f"{config.storage.path}: Permission denied (on the gateway, run this as "
                   "a member of group stora-gateway, which may read it)")
