"""``stora-gateway status`` gives a verdict (issue 12 items 3 and 4), over the real parts.

The CLI runs as a subprocess, as a technician or a monitoring script runs it; the agent
runs in process (clock and broker faults) or as ``stora-gateway run`` (the dead letter,
whose journal line is read from its stderr), against the simulators on ptys, a real
Mosquitto and the sandbox.  Each case checks the first line, the exit status (0 OK, 3
DEGRADED, 4 DOWN), the ``--json`` verdict and reasons, and that no number in the report
is an instant on the monotonic clock.

Colour: on a pseudo-terminal the verdict is coloured; piped, with ``NO_COLOR`` or with
``TERM=dumb`` there is not one escape sequence.
"""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import sys
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from devkit.broker_client import Client
from devkit.mosquitto import Broker
from devkit.sandbox import Sandbox
from devkit.site import PREFIX, ROOT, STORA_TOKEN, AgentProcess, RunningAgent, SimSite, make_site
from devkit.testing import AgentToml, wait_for

pytestmark = pytest.mark.simulator_only

EXIT_OK, EXIT_DEGRADED, EXIT_DOWN = 0, 3, 4
#: An RFC 3339 UTC instant as the gateway writes them.
INSTANT = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")
#: Keys that name an instant (anything ending in ``_at`` too).
INSTANT_KEYS = frozenset({"at", "now", "floor", "proven"})
#: Keys whose numbers are durations, sizes or readings by their unit suffix.
UNIT_SUFFIXES = ("_s", "_ms", "_bytes", "_c", "_1m")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a CLI subprocess: no colour settings inherited from the runner."""
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "TERM")}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


def status_cli(site: SimSite, *args: str) -> subprocess.CompletedProcess[str]:
    """``stora-gateway status ARGS`` as a subprocess, output piped."""
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "status", "--config", str(site.config_path),
         *args], capture_output=True, text=True, env=cli_env(), cwd=ROOT, timeout=90,
        check=False)


def status_both(site: SimSite) -> tuple[int, str, dict[str, Any]]:
    """Exit status and text of ``status``, and ``status --json``, which must agree."""
    text = status_cli(site)
    report = status_cli(site, "--json")
    assert text.stderr == ""
    assert report.stderr == ""
    assert text.returncode == report.returncode
    return text.returncode, text.stdout, json.loads(report.stdout)


def assert_no_monotonic(doc: Any, path: str = "") -> None:
    """Every instant is RFC 3339 UTC near today; no number is a monotonic instant.

    A monotonic instant is recognised two ways: a number under a key that names an
    instant, or a number within the last two minutes of this machine's monotonic clock
    (the clock every process shares) under a key that is not a duration or a size.
    """
    mono = time.monotonic()
    if isinstance(doc, Mapping):
        for key, value in doc.items():
            where = f"{path}.{key}"
            if key in INSTANT_KEYS or key.endswith("_at"):
                assert value is None or (isinstance(value, str) and INSTANT.fullmatch(value)), \
                    f"{where} = {value!r} is not an RFC 3339 instant"
                if value is not None:
                    at = datetime.fromisoformat(value.replace("Z", "+00:00"))
                    assert abs((at - datetime.now(UTC)).total_seconds()) < 400 * 86_400, where
            elif (isinstance(value, int | float) and not isinstance(value, bool)
                  and not key.endswith(UNIT_SUFFIXES)):
                assert not mono - 120 <= value <= mono + 1, \
                    f"{where} = {value!r} looks like a monotonic instant ({mono:.1f})"
            assert_no_monotonic(value, where)
    elif isinstance(doc, list):
        for i, item in enumerate(doc):
            assert_no_monotonic(item, f"{path}[{i}]")


def retained_status(broker: Broker) -> dict[str, Any]:
    with Client(broker) as late:
        late.subscribe(f"{PREFIX}/status")
        [message] = late.expect(f"{PREFIX}/status", 5)
        return dict(json.loads(message.payload))


def codes(report: Mapping[str, Any]) -> list[str]:
    return [r["code"] for r in report["reasons"]]


# -- the verdicts --------------------------------------------------------------------------
def test_all_well_is_ok_exit_0_and_every_time_is_rfc3339(site: SimSite, broker: Broker) -> None:
    with RunningAgent(site.config_path) as agent:
        wait_for(lambda: all(c["online"] for c in agent.status()["controllers"]), 20.0)
        status, text, report = status_both(site)
        agent.publish_telemetry()
        retained = retained_status(broker)
    assert status == EXIT_OK, text
    assert text.splitlines()[0] == "OK"
    assert re.search(r"^controllers +2 online: bus1, lockers$", text, re.M)
    assert list(report)[:4] == ["online", "version", "verdict", "reasons"]  # contract §4
    assert (report["verdict"], report["reasons"]) == ("ok", [])
    assert_no_monotonic(report)
    assert INSTANT.fullmatch(report["broker"]["last_connect_at"])
    assert list(retained)[:4] == ["online", "version", "verdict", "reasons"]
    assert retained["verdict"] == "ok"
    assert_no_monotonic(retained)


def test_clock_untrusted_is_down_exit_4(site: SimSite) -> None:
    text = site.config_path.read_text().replace('clock = "system"', 'clock = "ntp"')
    site.config_path.write_text(text)
    # The kernel says "not synchronized" (the seam gateway/clock.py has for it).
    with RunningAgent(site.config_path, clock_synced=lambda: False), site.client() as client:
        jti, token = site.signer.command("unlock", "unit_a101")
        client.publish(f"{PREFIX}/cmd", token, qos=1)
        [result] = client.expect(f"{PREFIX}/cmd/result", 10,
                                 where=lambda m: json.loads(m.payload)["jti"] == jti)
        status, text, report = status_both(site)
    assert json.loads(result.payload)["reason"] == "clock_untrusted"  # what DOWN means
    assert status == EXIT_DOWN, text
    assert text.startswith("DOWN: clock untrusted, every command is refused clock_untrusted: ")
    assert re.search(r"^clock +NOT trusted: ", text, re.M)
    assert (report["verdict"], codes(report)) == ("down", ["clock_untrusted"])
    assert_no_monotonic(report)


def test_broker_down_is_down_exit_4(site: SimSite, broker: Broker) -> None:
    with RunningAgent(site.config_path) as agent:
        broker.kill()
        wait_for(lambda: not agent.link.connected, 20.0)
        status, text, report = status_both(site)
    assert status == EXIT_DOWN, text
    assert text.startswith("DOWN: MQTT broker not connected, no command can arrive: ")
    assert report["verdict"] == "down"
    assert codes(report)[0] == "broker_disconnected"
    assert report["broker"]["connected"] is False
    assert INSTANT.fullmatch(report["broker"]["last_disconnect_at"])
    assert_no_monotonic(report)


def test_a_trusted_self_test_key_is_degraded_exit_3_until_removed(site: SimSite) -> None:
    """Commissioning left the self-test's key in [commands] trusted_keys: whoever holds
    its file opens every door, so status says so until it is removed."""
    text = site.config_path.read_text()
    site.config_path.write_text(text.replace(
        "trusted_keys = { ", f'trusted_keys = {{ selftest = "{"A" * 43}", '))
    with RunningAgent(site.config_path) as agent:
        wait_for(lambda: all(c["online"] for c in agent.status()["controllers"]), 20.0)
        status, shown, report = status_both(site)
    assert status == EXIT_DEGRADED, shown
    assert shown.splitlines()[0] == (
        "DEGRADED: the self-test key (kid selftest) is trusted; remove it from [commands] "
        "trusted_keys after commissioning")
    assert (report["verdict"], codes(report)) == ("degraded", ["commissioning_key_trusted"])
    assert report["commands"]["trusted_keys"] == ["selftest", "test-2026"]  # ids, no key

    site.config_path.write_text(text)  # removed, the agent restarted: OK again
    with RunningAgent(site.config_path) as agent:
        wait_for(lambda: all(c["online"] for c in agent.status()["controllers"]), 20.0)
        status, shown, report = status_both(site)
    assert status == EXIT_OK, shown
    assert report["commands"]["trusted_keys"] == ["test-2026"]


def test_no_agent_is_down_exit_4_with_one_clear_reason(site: SimSite) -> None:
    status, text, report = status_both(site)
    assert status == EXIT_DOWN
    assert text.startswith("DOWN: the agent is not running (no control socket at ")
    assert "remote commands are not executed" in text.splitlines()[0]
    assert report["online"] is False
    assert (report["verdict"], codes(report)) == ("down", ["agent_not_running"])


#: Runs ``status`` once as root (so every module the command imports is loaded: the
#: interpreter lives where nobody may not read), then as nobody (uid 65534), who may
#: not enter the database's directory; prints both outcomes as JSON.
AS_NOBODY = """
import io, json, os, sys
from gateway.cli.main import main
config = sys.argv[1]
def status(*argv):
    out, err = io.StringIO(), io.StringIO()
    code = main(["status", *argv, "--config", config], out=out, err=err)
    return {"status": code, "out": out.getvalue(), "err": err.getvalue()}
as_root = status("--json")
os.setgroups([])
os.setgid(65534)
os.setuid(65534)
print(json.dumps({"root": as_root, "text": status(), "json": status("--json")}))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become nobody")
def test_a_database_this_user_may_not_reach_is_down_exit_4_not_a_python_error() -> None:
    """A monitoring user outside the group, the agent stopped: Python 3.11's
    ``Path.exists`` raises ``PermissionError`` on the 0700 directory; status still
    answers DOWN, exit 4, and names the unreadable database in the details."""
    import tempfile

    from gateway.store import Store

    public = Path(tempfile.mkdtemp(prefix="stora-status-"))  # tmp_path is root's alone
    try:
        public.chmod(0o755)
        state = public / "state"
        state.mkdir(mode=0o700)
        Store(state / "gateway.db").close()
        config = AgentToml(
            public,
            mqtt={"host": "127.0.0.1", "port": 1},
            commands={"trusted_keys": {"test-2026": "A" * 43}, "clock": "system"},
            stora={"base_url": "http://127.0.0.1:9/2025-09", "auth": "static",
                   "token_file": public / "token", "timeline_source_id": "tsrc_test"},
            storage={"path": state / "gateway.db"},
            control={"socket": public / "run" / "control.sock"},
        ).write()
        config.chmod(0o644)
        done = subprocess.run([sys.executable, "-c", AS_NOBODY, str(config)],
                              capture_output=True, text=True, cwd=ROOT, timeout=90,
                              env=cli_env(), check=False)
    finally:
        subprocess.run(["rm", "-rf", str(public)], check=True)
    assert done.returncode == 0, done.stderr
    runs = json.loads(done.stdout)
    assert runs["root"]["status"] == EXIT_DOWN, runs["root"]  # root reads it: no error
    assert "error" not in json.loads(runs["root"]["out"])["outbox"]
    text = runs["text"]
    assert (text["status"], text["err"]) == (EXIT_DOWN, ""), text
    first = text["out"].splitlines()[0]
    assert first.startswith("DOWN: the agent is not running")
    assert re.search(r"^outbox +cannot be read: .*gateway\.db: Permission denied \(run this "
                     r"as root or as a member of group stora-gateway", text["out"], re.M)
    report = json.loads(runs["json"]["out"])
    assert runs["json"]["status"] == EXIT_DOWN
    assert report["verdict"] == "down"
    assert codes(report)[0] == "agent_not_running"
    assert "Permission denied" in report["outbox"]["error"]


def test_a_dead_letter_is_degraded_with_stora_s_full_reason_in_status_alarm_and_journal(
        tmp_path: Path, broker: Broker) -> None:
    with Sandbox(static_tokens={STORA_TOKEN}) as sandbox:
        site = make_site(tmp_path, broker, stora_url=sandbox.api_url)
        agent = AgentProcess(site)
        try:
            agent.start()
            with site.client() as client:
                # Stora refuses the event: a contact id of the wrong shape.  Its message is
                # generic; only the detail says what is wrong.
                _, token = site.signer.command("lock", "unit_a101", contact="c-42")
                client.publish(f"{PREFIX}/cmd", token, qos=1)
                [alarm] = client.expect(
                    f"{PREFIX}/alarm", 20,
                    where=lambda m: json.loads(m.payload)["kind"] == "timeline_dead_letter")
            status, text, report = status_both(site)
            log = agent.log()
            agent.stop()
            # Stopped: the database still says so, and status is DOWN but names it.
            down, offline_text, offline = status_both(site)
        finally:
            agent.kill()
            site.close()
    stora_says = "422 invalid_content: the request body is invalid (/contact/id: must be an id "
    detail = json.loads(alarm.payload)["detail"]
    assert stora_says in detail
    assert detail.startswith("event 1 (locked, A-101) refused by Stora and kept as a dead "
                             "letter (stora-gateway outbox --dead): ")
    [journal] = [line for line in log.splitlines() if "alarm timeline_dead_letter" in line]
    assert stora_says in journal
    assert "starting with 'con_')" in journal

    assert status == EXIT_DEGRADED, text
    first = text.splitlines()[0]
    assert first.startswith("DEGRADED: 1 Timeline Event refused by Stora and dead-lettered, "
                            "newest: 422 invalid_content: the request body is invalid")
    assert "/contact/id" in first
    assert re.search(r"^outbox +0 events waiting, 1 dead letter; ", text, re.M)
    assert (report["verdict"], codes(report)) == ("degraded", ["dead_letters"])
    newest = report["outbox"]["newest_dead"]
    assert (newest["seq"], newest["reference"]) == (1, "A-101")
    assert newest["reason"].startswith(stora_says)
    assert_no_monotonic(report)

    assert down == EXIT_DOWN
    assert codes(offline) == ["agent_not_running", "dead_letters"]
    assert offline["outbox"]["dead"] == 1
    assert stora_says in offline_text.splitlines()[0]


# -- colour ------------------------------------------------------------------------------------
def on_a_terminal(argv: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run ``argv`` with its stdout and stderr on a pseudo-terminal; (status, output)."""
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=slave,
                                stderr=slave, env=env, cwd=ROOT)
        os.close(slave)
        slave = -1
        chunks = []
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO: the child has closed its side
                break
            if not data:
                break
            chunks.append(data)
        status = proc.wait(timeout=60)
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    return status, b"".join(chunks).decode().replace("\r\n", "\n")


def test_the_verdict_is_coloured_on_a_terminal_only(site: SimSite) -> None:
    argv = [sys.executable, "-m", "gateway.cli", "status", "--config", str(site.config_path)]
    status, shown = on_a_terminal(argv, cli_env(TERM="xterm-256color"))
    assert status == EXIT_DOWN
    assert shown.startswith("\x1b[1;31mDOWN\x1b[0m: the agent is not running")
    for env in (cli_env(TERM="xterm-256color", NO_COLOR="1"), cli_env(TERM="dumb")):
        status, shown = on_a_terminal(argv, env)
        assert status == EXIT_DOWN
        assert shown.startswith("DOWN: ")
        assert not ANSI.search(shown), env
    piped = subprocess.run(argv, capture_output=True, text=True, check=False, cwd=ROOT,
                           env=cli_env(TERM="xterm-256color"), timeout=60)
    assert piped.returncode == EXIT_DOWN
    assert piped.stdout.startswith("DOWN: ")
    assert "\x1b" not in piped.stdout + piped.stderr


def test_status_help_names_every_exit_status() -> None:
    """A monitoring script's author reads them in ``status --help``: 0, 3, 4 by the
    verdict, 1 when no report could be had, 2 for bad usage."""
    import io

    from gateway.cli.main import main
    from gateway.cli.status import EXIT_FOR

    out = io.StringIO()
    assert main(["status", "--help"], out=out, err=io.StringIO()) == 0
    text = " ".join(out.getvalue().split())
    for verdict, code in EXIT_FOR.items():
        assert f"{code} {verdict.upper()}" in text, text
    assert "1 no report could be had" in text
    assert "2 bad usage" in text
