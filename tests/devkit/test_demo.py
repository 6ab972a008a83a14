"""``stora-gateway demo``: README's first command, run as a user runs it.

The demo is run as a real process (the console script ``stora-gateway`` next to this
Python), with each broker: what it prints, its exit status, and that nothing it started
outlives it, also after a Ctrl-C.  The demo's self-check is tested in-process with a
step whose expectation is wrong.  The embedded broker gets a few protocol tests of its
own with paho, in MQTT 3.1.1 and 5, the two versions the demo uses.
"""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

import devkit.demo_broker
from devkit.demo import Demo
from devkit.demo_broker import find_mosquitto
from devkit.demo_watch import Expect
from devkit.embedded_broker import EmbeddedBroker
from devkit.mqtt_codec import topic_matches
from gateway.cli.main import main

pytestmark = pytest.mark.simulator_only

ROOT = Path(__file__).resolve().parents[2]
HAVE_MOSQUITTO = find_mosquitto() is not None
#: Every Timeline Event the demo's script causes, by the start of its description.
EXPECTED_EVENTS = [
    "Unit locked via DemoGate — locked again: it read back unlocked while no unlock was "
    "running; unit GATE",
    "Unit unlocked via DemoGate — for 3 s; unit A-101; by tenant app",
    "Unit locked via DemoGate — relocked",
    "Unit unlocked via DemoGate — for 2 s; unit B-201; by operator dashboard",
    "Unit locked via DemoGate — relocked",
    # From here on through the relay: Stora's webhooks (version = the unit's updated_at in
    # epoch ms) and the app's unlocks (by the relay's API key, "DemoGate app").
    "Unit overlocked via DemoGate — version 1",
    "Unlock refused via DemoGate — the unit is overlocked; unit A-102; by DemoGate app",
    "Overlock removed via DemoGate — version 1",
    "Unit unlocked via DemoGate — for 2 s; unit A-102; by DemoGate app",
    "Unit locked via DemoGate — relocked",
    "Unit locked via DemoGate — unit GATE; by technician",
    "Unit unlocked via DemoGate — technician test; unit B-202",
    "Unit locked via DemoGate — technician test failed",
]


def demo_command(*args: str) -> list[str]:
    """``stora-gateway demo ARGS`` as installed (README runs it through scripts/demo)."""
    script = Path(sys.executable).parent / "stora-gateway"
    if script.exists():
        return [str(script), "demo", *args]
    return [sys.executable, "-m", "gateway.cli", "demo", *args]


def start(*args: str) -> subprocess.Popen[str]:
    """The demo in a session of its own, as a terminal's foreground job would be."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(demo_command(*args), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                            start_new_session=True)


def directory_of(output: str) -> Path:
    """The temporary directory the demo announces on its first line."""
    match = re.match(r"stora-gateway demo: a simulated site in (\S+)\n", output)
    assert match, output[:300]
    return Path(match[1])


def processes_mentioning(text: str) -> list[str]:
    """Command lines of running processes that contain ``text`` (e.g. a temp dir)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{proc.name}: {cmdline}")
    return found


def children_of(pid: int) -> list[int]:
    """Process ids whose parent is ``pid``."""
    kids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces, so split after its ")".
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            kids.append(int(proc.name))
    return kids


def assert_nothing_left(directory: Path) -> None:
    assert not directory.exists(), f"{directory} was left behind"
    assert processes_mentioning(str(directory)) == []


def check_full_run(output: str, stderr: str) -> None:
    """What every complete, successful run prints."""
    assert "PROBLEM" not in output
    assert stderr == ""
    for number in range(1, 9):
        assert f"\n── {number}. " in output
    for line in (
        "agent   online (stora-gateway",
        "lock    A-101 locked, door closed",
        # A fail-safe maglock without power is open: found so at start, and locked.
        "alarm   drift at GATE: found unlocked when it was first read back; locking again",
        "→       signed unlock of A-101 for 3 s (jti demo-01-",
        "←       done: unlock A-101\n",
        "lock    A-101 unlocked, door closed (relocks at ",
        "←       done: unlock A-101 [duplicate: the original result again; not run twice]",
        "←       done: unlock B-201\n",
        "relay        http://127.0.0.1:",
        "operator in Stora: A-102 is now overlocked",
        "lock    A-102 locked, door closed, in lockout",
        "←       done: lockout A-102",
        "→       app: POST /v1/sites/site_demo/units/unit_a102/unlock {'seconds': 3}",
        "←       rejected (overlocked): unlock A-102",
        "←       app: rejected (overlocked) (command ",
        "operator in Stora: A-102 is now occupied",
        "←       done: clear_lockout A-102",
        "←       app: done (command ",
        "←       rejected (bad_signature): a token whose signature did not verify",
        "lock    A-102 locked, door closed, lockout cleared",
        "$       stora-gateway lock GATE",
        "lock    GATE locked",
        "unit_b202  B-202      FAIL",
        "exit    1, as expected",
        "agent   offline",
    ):
        assert line in output, line
    stora = [line.split("Stora   ", 1)[1] for line in output.splitlines()
             if re.match(r"\s+\d+\.\ds  Stora   ", line)]
    assert len(stora) == len(EXPECTED_EVENTS), stora
    for expected in EXPECTED_EVENTS:
        assert any(event.startswith(expected) for event in stora), expected
    assert output.rstrip().endswith(
        "demo finished: all 8 steps and 13 Timeline Events (each delivered once) behaved as "
        "expected; nothing left running")


def test_demo_as_readme_runs_it() -> None:
    """No arguments: Mosquitto when installed (else embedded), at a readable pace."""
    started = time.monotonic()
    proc = start()
    output, stderr = proc.communicate(timeout=90)
    took = time.monotonic() - started
    assert proc.returncode == 0, output + stderr
    check_full_run(output, stderr)
    broker = "mosquitto version" if HAVE_MOSQUITTO else "embedded MQTT broker (pure Python)"
    assert re.search(rf"\n  broker       {broker}.* on 127\.0\.0\.1:\d+\n", output)
    assert 15 < took < 45, f"the demo took {took:.0f} s; it should be about 20-40 s"
    assert_nothing_left(directory_of(output))


def test_demo_on_the_embedded_broker() -> None:
    """The fresh-machine case (no Mosquitto), as fast as the simulators allow."""
    proc = start("--broker", "embedded", "--pace", "0")
    output, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, output + stderr
    check_full_run(output, stderr)
    assert re.search(r"\n  broker       embedded MQTT broker \(pure Python\) on 127\.0\.0\.1:"
                     r"\d+\n", output)
    assert_nothing_left(directory_of(output))


@pytest.mark.parametrize("broker_kind", [
    pytest.param("mosquitto", marks=pytest.mark.skipif(not HAVE_MOSQUITTO,
                                                       reason="mosquitto not installed")),
    "embedded",
])
def test_ctrl_c_stops_everything(broker_kind: str) -> None:
    """Ctrl-C in the middle: exit 130, and no process, thread or file remains."""
    proc = start("--broker", broker_kind)
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("── 1. "):
            break
    directory = directory_of("".join(seen))
    assert directory.exists()
    kids = children_of(proc.pid)
    if broker_kind == "mosquitto":  # the broker runs, so the test below means something
        assert processes_mentioning(str(directory)), "no mosquitto running for the demo"
        assert kids
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal does on Ctrl-C
    rest, stderr = proc.communicate(timeout=30)
    output = "".join(seen) + rest
    assert proc.returncode == 130, output + stderr
    assert "interrupted: stopping everything…" in output
    assert output.rstrip().endswith("demo interrupted; nothing left running")
    assert "PROBLEM" not in output
    assert_nothing_left(directory)
    for kid in kids:
        assert not Path(f"/proc/{kid}").exists(), f"child {kid} still exists"


def test_the_demo_says_what_went_wrong(monkeypatch: pytest.MonkeyPatch) -> None:
    """A step whose expectation is wrong: exit 1, and the difference in words."""

    def wrong_script(self: Demo) -> None:
        self.expect_events((self.head("locked"),))  # the GATE, locked at start
        self.step("Lockout A-102, then expect an unlock of it to be done (it is not)")
        self.command("signed lockout of A-102", "lockout", "unit_a102",
                     Expect("done", events=("overlocked",)), ver=1)
        self.command("signed unlock of A-102", "unlock", "unit_a102",
                     Expect("done", events=("unlocked",)), dur=1)

    monkeypatch.setattr(Demo, "script", wrong_script)
    before = {t.ident for t in threading.enumerate()}
    out = io.StringIO()
    status = main(["demo", "--broker", "embedded", "--pace", "0"], out=out, err=out)
    text = out.getvalue()
    assert status == 1, text
    assert "demo finished: 2 thing(s) did not behave as expected:" in text
    assert re.search(r"  - demo-02-\w+: expected done, got rejected \(overlocked\)\n", text)
    assert ("  - Timeline Events ['Unlock refused via DemoGate'], expected "
            "['Unit unlocked via DemoGate']\n") in text
    assert not directory_of(text).exists()
    assert not [t for t in threading.enumerate() if t.ident not in before and t.is_alive()]


# -- the embedded broker ------------------------------------------------------------------
def test_topic_matching() -> None:
    assert topic_matches("a/+/c", "a/b/c")
    assert topic_matches("a/#", "a")  # "#" also matches the parent level
    assert topic_matches("a/#", "a/b/c")
    assert topic_matches("+", "a")
    assert topic_matches("+/+", "/a")
    assert not topic_matches("a/+", "a/b/c")
    assert not topic_matches("a/b", "a/b/c")
    assert not topic_matches("#", "$SYS/x")  # $-topics need an explicit first level
    assert topic_matches("$SYS/#", "$SYS/x")


class Peer:
    """A paho client recording what it receives."""

    def __init__(self, broker: EmbeddedBroker, client_id: str, version: int, *,
                 clean: bool = True, will: bool = False) -> None:
        self.got: list[paho.MQTTMessage] = []
        self.cond = threading.Condition()
        self.session_present: bool | None = None
        self.client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                                  client_id=client_id, protocol=version,
                                  **({"clean_session": clean} if version != paho.MQTTv5
                                     else {}))
        self.client.on_message = self._on_message
        self.client.on_connect = self._on_connect
        if will:
            self.client.will_set("status/" + client_id, b"gone", qos=1, retain=True)
        kwargs: dict[str, Any] = {}
        if version == paho.MQTTv5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 0 if clean else 3600
            kwargs = {"clean_start": clean, "properties": props}
        self.client.connect("127.0.0.1", broker.port, keepalive=10, **kwargs)
        self.client.loop_start()
        self.wait(lambda: self.session_present is not None)

    def _on_connect(self, client: paho.Client, userdata: object, flags: paho.ConnectFlags,
                    reason: object, properties: object) -> None:
        with self.cond:
            self.session_present = flags.session_present
            self.cond.notify_all()

    def _on_message(self, client: paho.Client, userdata: object,
                    msg: paho.MQTTMessage) -> None:
        with self.cond:
            self.got.append(msg)
            self.cond.notify_all()

    def wait(self, check: object, timeout: float = 5.0) -> None:
        with self.cond:
            assert self.cond.wait_for(check, timeout)  # type: ignore[arg-type]

    def messages(self) -> list[tuple[str, bytes, int, bool]]:
        with self.cond:
            return [(m.topic, bytes(m.payload), m.qos, bool(m.retain)) for m in self.got]

    def close(self, *, clean: bool = True) -> None:
        if clean:
            self.client.disconnect()
        else:  # the network goes away: no DISCONNECT
            sock: Any = self.client.socket()
            assert sock is not None
            sock.shutdown(2)
        self.client.loop_stop()
        self.client.reinitialise()


@pytest.fixture
def embedded_broker() -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker() as running:
        yield running


def test_embedded_broker_retained_will_and_retain_as_published(
        embedded_broker: EmbeddedBroker) -> None:
    old = Peer(embedded_broker, "old", paho.MQTTv311)
    new = Peer(embedded_broker, "new", paho.MQTTv5, will=True)
    new.client.publish("site/units/a", b"locked", qos=1, retain=True).wait_for_publish(5)
    old.client.subscribe([("site/#", 1), ("status/+", 1)])
    old.wait(lambda: len(old.got) == 1)  # the retained message, on subscribe
    assert old.messages() == [("site/units/a", b"locked", 1, True)]
    new.client.subscribe([("site/cmd", SubscribeOptions(qos=1, retainAsPublished=True))])
    time.sleep(0.2)
    # A live retained publish: the v5 subscriber with "retain as published" sees the
    # flag (the agent rejects such a command), the 3.1.1 one never does on live delivery.
    old.client.publish("site/cmd", b"x", qos=1, retain=True).wait_for_publish(5)
    old.client.publish("site/cmd", b"", qos=0, retain=True)  # clears the retained one
    new.wait(lambda: len(new.got) == 2)
    assert new.messages() == [("site/cmd", b"x", 1, True), ("site/cmd", b"", 0, True)]
    old.wait(lambda: len(old.got) == 3)
    assert old.messages()[1:] == [("site/cmd", b"x", 1, False), ("site/cmd", b"", 0, False)]
    new.close(clean=False)  # the last will goes out, retained
    old.wait(lambda: len(old.got) == 4)
    assert old.messages()[3] == ("status/new", b"gone", 1, False)
    old.close()
    late = Peer(embedded_broker, "late", paho.MQTTv311)
    late.client.subscribe("#", 1)
    late.wait(lambda: len(late.got) == 2)
    assert sorted(late.messages()) == [("site/units/a", b"locked", 1, True),
                                       ("status/new", b"gone", 1, True)]
    late.close()


@pytest.mark.parametrize("version", [paho.MQTTv311, paho.MQTTv5])
def test_embedded_broker_keeps_a_session(embedded_broker: EmbeddedBroker, version: int) -> None:
    """QoS 1 messages published while a persistent client is away reach it on return."""
    agent = Peer(embedded_broker, "agent", version, clean=False)
    assert agent.session_present is False
    agent.client.subscribe("cmd", 1)
    time.sleep(0.2)
    agent.close()
    sender = Peer(embedded_broker, "sender", paho.MQTTv311)
    sender.client.publish("cmd", b"while away", qos=1).wait_for_publish(5)
    sender.client.publish("cmd", b"qos 0 is not kept", qos=0)
    sender.close()
    back = Peer(embedded_broker, "agent", version, clean=False)
    assert back.session_present is True
    back.wait(lambda: len(back.got) == 1)
    time.sleep(0.2)
    assert back.messages() == [("cmd", b"while away", 1, False)]
    back.close()
    fresh = Peer(embedded_broker, "agent", version, clean=True)  # a clean start drops the session
    assert fresh.session_present is False
    fresh.close()


def test_without_mosquitto(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """"auto" falls back to the embedded broker; "mosquitto" says what to do, exit 1."""
    monkeypatch.setattr(devkit.demo_broker, "find_mosquitto", lambda: None)
    broker = devkit.demo_broker.start_broker("auto", tmp_path)
    try:
        assert isinstance(broker, EmbeddedBroker)
    finally:
        broker.stop()
    out, err = io.StringIO(), io.StringIO()
    assert main(["demo", "--broker", "mosquitto"], out=out, err=err) == 1
    assert err.getvalue() == ("stora-gateway: the demo cannot start: mosquitto 1.6 or later is "
                              "not installed (apt-get install mosquitto); use --broker "
                              "embedded\n")
    assert not directory_of(out.getvalue()).exists()
