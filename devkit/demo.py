"""``stora-gateway demo``: the whole loop on one machine, with simulated hardware.

What runs, all of it started here and stopped again, also on Ctrl-C or SIGTERM::

    demo signer ──signed commands (MQTT)──▶ broker ──▶ agent ──RS-485 on ptys──▶ simulators
        ▲                                     │          │
        └── results, retained unit states ◀───┘          └──Timeline Events──▶ sandbox API

* a broker: Mosquitto on a free port when it is installed, else the embedded
  pure-Python one (``devkit/embedded_broker.py``; ``--broker`` chooses);
* two simulated RS-485 buses on pseudo-terminals: a Modbus relay board (strikes A-101 and
  A-102 with door contacts, the GATE maglock) and a hex-protocol lock board (B-201,
  B-202), spoken to through the real drivers;
* the sandbox Stora API (``devkit/sandbox/``) and the agent itself (``gateway/agent.py``),
  in this process, with a generated config and a fresh Ed25519 command key;
* the demo signer: a few unlocks, a replay, a lockout, a refused unlock, a forgery and
  a clear, then a short technician segment through the agent's control socket.

The live view prints one line per thing that happens: what was sent, each result, each
lock state as the agent publishes it (retained ``P/S/units/<unit>``) and each Timeline
Event as the sandbox receives it.  The demo checks itself: every step states what should
happen (result, lock state, Timeline Events), and the exit status is 0 only when all of
it did, each event delivered exactly once; otherwise 1, with what went wrong.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, TextIO

from gateway.ops.liveview import LiveView, describe_state

if TYPE_CHECKING:
    from devkit.demo_relay import DemoRelay
    from devkit.sandbox import Sandbox
    from devkit.signer import CommandSigner
    from gateway.agent import Agent

from devkit.demo_site import (
    APP,
    DEFAULT_PACE_S,
    DEMO_HOLD_S,
    DEMO_TOKEN,
    EXPECT_TIMEOUT_S,
    KID,
    REFERENCES,
    RELOCK_MARGIN_S,
    SETTLE_S,
    SITE,
    write_demo_config,
)
from devkit.demo_watch import EventFeed, Expect, Watcher


@dataclass
class Demo:
    """One run: the parts it started, what it saw and what went wrong."""

    out: TextIO
    pace: float
    broker_kind: str
    view: LiveView = field(init=False)
    problems: list[str] = field(default_factory=list)
    steps: int = 0
    expected_events: int = 0
    # Set while running.
    config_path: Path | None = None
    watcher: Watcher | None = None
    feed: EventFeed | None = None
    agent: Agent | None = None
    signer: CommandSigner | None = None
    forger: CommandSigner | None = None
    lockers: Any = None
    sandbox: Sandbox | None = None
    relay: DemoRelay | None = None
    _jtis: Iterator[int] = field(default_factory=lambda: iter(range(1, 1000)))

    def __post_init__(self) -> None:
        self.view = LiveView(self.out)

    # -- helpers ----------------------------------------------------------------------
    def problem(self, text: str) -> None:
        """Record what went wrong, and show it at once."""
        self.problems.append(text)
        self.view.line("PROBLEM", text)

    def step(self, title: str, note: str = "") -> None:
        """A new step: a heading (and a note), after a pause so a person can follow."""
        time.sleep(self.pace)
        self.steps += 1
        self.view.write(f"\n── {self.steps}. {title}\n" + (f"      {note}\n" if note else ""))

    def head(self, kind: str) -> str:
        """The contract §6 wording of a Timeline Event kind for the demo's app."""
        from gateway.outbox.timeline import KINDS

        return KINDS[kind].format(app=APP)

    def send(self, what: str, cmd: str, unit: str, *, jti: str | None = None,
             signer: CommandSigner | None = None, **claims: Any) -> str:
        """Sign and publish one command; returns its jti."""
        assert self.watcher is not None
        assert self.signer is not None
        jti = jti or f"demo-{next(self._jtis):02d}-{uuid.uuid4().hex[:6]}"
        _, token = (signer or self.signer).command(cmd, unit, jti=jti, **claims)
        self.view.line("→", f"{what} (jti {jti})")
        self.watcher.send(token)
        return jti

    def expect_result(self, jti: str | None, expect: Expect) -> None:
        """The result of ``jti`` (the latest, for a duplicate) is as expected; ``None``
        for a forgery, whose rejection carries no id (README, "The agent")."""
        assert self.watcher is not None
        watcher = self.watcher
        count = 2 if expect.duplicate else 1
        if not watcher.wait(lambda: len(watcher.results_for(jti)) >= count):
            self.problem(f"no result for {jti} within {EXPECT_TIMEOUT_S:.0f} s")
            return
        got = watcher.results_for(jti)[count - 1]
        want = (expect.status, expect.reason, expect.duplicate)
        seen = (got.get("status"), got.get("reason"), bool(got.get("duplicate")))
        if seen != want:
            self.problem(f"{jti}: expected {_words(*want)}, got {_words(*seen)}")

    def expect_state(self, unit: str, what: str, check: Callable[[Mapping[str, Any]], bool],
                     timeout: float = EXPECT_TIMEOUT_S) -> None:
        """The unit's published state comes to satisfy ``check`` within ``timeout``."""
        assert self.watcher is not None
        watcher = self.watcher

        def ok() -> bool:
            state = watcher.state(unit)
            return state is not None and check(state)

        if not watcher.wait(ok, timeout):
            state = watcher.state(unit)
            self.problem(f"{REFERENCES[unit]} should be {what} within {timeout:.0f} s; it is "
                         f"{describe_state(state) if state else 'not published'}")

    def expect_events(self, heads: tuple[str, ...]) -> None:
        """The next Timeline Events reaching Stora are exactly ``heads`` (in any order)."""
        assert self.feed is not None
        start = self.expected_events
        self.expected_events += len(heads)
        if not self.feed.wait_count(self.expected_events):
            self.problem(f"Stora received {len(self.feed.events) - start} of the "
                         f"{len(heads)} Timeline Event(s) expected: {', '.join(heads)}")
            self.expected_events = len(self.feed.events)
            return
        got = sorted(str(e.get("description", "")).split(" — ", 1)[0]
                     for e in self.feed.events[start:self.expected_events])
        if got != sorted(heads):
            self.problem(f"Timeline Events {got}, expected {sorted(heads)}")

    def command(self, what: str, cmd: str, unit: str, expect: Expect, **claims: Any) -> str:
        """Send a command and check its result and its Timeline Events."""
        jti = self.send(what, cmd, unit, **claims)
        self.expect_result(jti, expect)
        self.expect_events(tuple(self.head(kind) for kind in expect.events))
        return jti

    def stora_status(self, unit: str, status: str) -> None:
        """The operator changes a unit's status in Stora (the sandbox's admin API)."""
        assert self.sandbox is not None
        self.view.line("operator", f"in Stora: {REFERENCES[unit]} is now {status}")
        self.sandbox.set_unit_status(unit, status)

    def app_call(self, cmd: str, unit: str, expect: Expect, **body: Any) -> None:
        """The app's unlock or lock through the relay's API, checked like a command."""
        assert self.relay is not None
        self.view.line("→", f"app: POST /v1/sites/{SITE}/units/{unit}/{cmd} "
                            f"{body or ''}".rstrip())
        record = self.relay.call(cmd, unit, **body)
        self.view.line("←", f"app: {record['status']}"
                       + (f" ({record['reason']})" if record.get("reason") else "")
                       + f" (command {record['id']})")
        want = (expect.status, expect.reason)
        if (record.get("status"), record.get("reason")) != want:
            self.problem(f"the app's {cmd} of {REFERENCES[unit]}: expected "
                         f"{_words(*want, False)}, got "
                         f"{_words(record.get('status'), record.get('reason'), False)}")
        self.expect_events(tuple(self.head(kind) for kind in expect.events))

    def cli(self, *argv: str, expect: int) -> str:
        """Run a technician command through the real CLI (and so the agent's socket)."""
        from gateway.cli.main import main

        assert self.config_path is not None
        self.view.line("$", "stora-gateway " + " ".join(argv))
        buffer = io.StringIO()
        status = main([*argv, "--config", str(self.config_path)], out=buffer, err=buffer)
        self.view.write("".join(f"           {line}\n"
                                for line in buffer.getvalue().splitlines()))
        if status != expect:
            self.problem(f"`stora-gateway {' '.join(argv)}` exited {status}, expected {expect}")
        else:
            self.view.line("exit", f"{status}, as expected")
        return buffer.getvalue()

    # -- the story --------------------------------------------------------------------
    def script(self) -> None:
        """The steps, each stating what should happen."""
        assert self.watcher is not None
        unlocked = lambda s: s.get("locked") is False  # noqa: E731
        locked = lambda s: s.get("locked") is True and not s.get("lockout")  # noqa: E731

        # The relay board comes up with every coil off, as after a power cut: the GATE
        # maglock (fail-safe) is released.  The agent's first read-back finds it so, with
        # no unlock of its own running, and locks it at once, with an alarm and a record.
        self.expect_state("unit_gate", "locked at start (it came up released)", locked,
                          timeout=10)
        self.expect_events((self.head("locked"),))

        self.step("A tenant opens A-101 from the app: a signed unlock for 3 s")
        a101 = self.command("signed unlock of A-101 for 3 s", "unlock", "unit_a101",
                            Expect("done", events=("unlocked",)),
                            dur=3, actor="tenant app")
        self.expect_state("unit_a101", "unlocked", unlocked)
        self.expect_state("unit_a101", "locked again after 3 s", locked,
                          timeout=3 + RELOCK_MARGIN_S)
        self.expect_events((self.head("locked"),))

        self.step("The same command arrives again (a retry, or a replay): not run twice")
        seen = len(self.watcher.states["unit_a101"])
        self.send("the same signed unlock of A-101 again", "unlock", "unit_a101", jti=a101,
                  dur=3, actor="tenant app")
        self.expect_result(a101, Expect("done", duplicate=True))
        time.sleep(0.5)  # a second unlock would have been published by now
        if any(s.get("locked") is False for s in self.watcher.states["unit_a101"][seen:]):
            self.problem("A-101 was unlocked again by a replayed command")
        self.expect_events(())

        self.step("Staff open locker B-201 from the dashboard (the lock board)")
        self.command("signed unlock of B-201 for 2 s", "unlock", "unit_b201",
                     Expect("done", events=("unlocked",)), dur=2, actor="operator dashboard")
        self.expect_state("unit_b201", "unlocked", unlocked)
        self.expect_state("unit_b201", "locked again", locked, timeout=2 + RELOCK_MARGIN_S)
        self.expect_events((self.head("locked"),))

        self.step("Rent is overdue: the operator overlocks A-102 in Stora",
                  "(Stora's signed webhook reaches the relay, which sends the site a signed "
                  "lockout)")
        self.stora_status("unit_a102", "overlocked")
        self.expect_state("unit_a102", "locked and in lockout",
                          lambda s: s.get("locked") is True and bool(s.get("lockout")))
        self.expect_events((self.head("overlocked"),))

        self.step("The tenant tries to open A-102 from the app: refused, and staff see it",
                  "(the app asks the relay's unlock API; the site refuses a unit in lockout)")
        seen = len(self.watcher.states["unit_a102"])
        self.app_call("unlock", "unit_a102", Expect("rejected", "overlocked",
                                                    events=("unlock_refused",)), seconds=3)
        time.sleep(0.3)
        if any(s.get("locked") is False for s in self.watcher.states["unit_a102"][seen:]):
            self.problem("A-102 was unlocked while in lockout")

        self.step("A forged unlock of A-102 (right key id, wrong key)",
                  "(refused before any hardware is touched; the forger's jti is not echoed)")
        self.send("forged unlock of A-102", "unlock", "unit_a102", signer=self.forger, dur=3)
        self.expect_result(None, Expect("rejected", "bad_signature"))
        self.expect_events(())

        self.step("Rent paid: the operator removes the overlock in Stora, and the tenant "
                  "gets in from the app")
        self.stora_status("unit_a102", "occupied")
        self.expect_state("unit_a102", "out of lockout", locked)
        self.expect_events((self.head("overlock_removed"),))
        self.app_call("unlock", "unit_a102", Expect("done", events=("unlocked",)), seconds=2)
        self.expect_state("unit_a102", "unlocked", unlocked)
        self.expect_state("unit_a102", "locked again", locked, timeout=2 + RELOCK_MARGIN_S)
        self.expect_events((self.head("locked"),))

        self.step("A technician on site: the CLI acts through the agent, audited",
                  "(B-202's latch is jammed: its test must FAIL, not guess)")
        self.cli("locks", expect=0)
        self.cli("lock", "GATE", expect=0)  # locked already: done, and audited again
        self.expect_state("unit_gate", "locked", locked)
        self.expect_events((self.head("locked"),))
        assert self.lockers is not None
        self.lockers.sim.set_faults(0, 2, jammed=True)  # lock number 2 is channel 1
        try:
            self.cli("test", "B-202", "--seconds", "1", "--relock-timeout", "3", expect=1)
        finally:
            self.lockers.sim.set_faults(0, 2, jammed=False)
        # The door was driven, so both halves are audited (gateway/agent.py, _test_one).
        self.expect_events((self.head("unlocked"), self.head("locked")))

    def check_delivery(self) -> None:
        """Every event reached Stora exactly once, and nothing unexpected arrived."""
        assert self.feed is not None
        time.sleep(SETTLE_S)
        counts = self.feed.sandbox.count_by_external_id()
        twice = [ext for ext, n in counts.items() if n > 1]
        if twice:
            self.problem(f"{len(twice)} Timeline Event(s) reached Stora more than once")
        extra = len(self.feed.events) - self.expected_events
        if extra > 0:
            heads = [str(e.get("description")) for e in self.feed.events[-extra:]]
            self.problem(f"{extra} unexpected Timeline Event(s): {heads}")


def _words(status: Any, reason: Any, duplicate: Any) -> str:
    text = str(status) + (f" ({reason})" if reason else "")
    return text + (" duplicate" if duplicate else "")


# -- running it ---------------------------------------------------------------------------
class _StopRequestedError(Exception):
    """SIGTERM: stop as on Ctrl-C."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise _StopRequestedError


def run_demo(out: TextIO, *, pace: float = DEFAULT_PACE_S, broker: str = "auto") -> int:
    """Run the demo, writing the live view to ``out``; 0 when all went as expected.

    ``pace`` is the pause in seconds before each step (0 runs as fast as the hardware
    allows); ``broker`` is "auto", "mosquitto" or "embedded".  Everything started is
    stopped and removed before this returns, also on Ctrl-C (exit status 130).
    """
    in_main = threading.current_thread() is threading.main_thread()
    previous = (signal.getsignal(signal.SIGINT), signal.signal(signal.SIGTERM, _on_sigterm)) \
        if in_main else None
    before = {t.ident for t in threading.enumerate()}
    demo = Demo(out, pace, broker)
    interrupted = False
    directory = ""
    try:
        with contextlib.ExitStack() as stack:
            try:
                directory = stack.enter_context(
                    tempfile.TemporaryDirectory(prefix="stora-gw-demo-"))
                _run(demo, Path(directory), stack)
            except (KeyboardInterrupt, _StopRequestedError):
                interrupted = True
                demo.view.write("\ninterrupted: stopping everything…\n")
            finally:
                # A second Ctrl-C must not cut the clean-up short.
                if in_main:
                    signal.signal(signal.SIGINT, signal.SIG_IGN)
                    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous[0])
            signal.signal(signal.SIGTERM, previous[1])
    leftovers = _leftovers(before, directory)
    for text in leftovers:
        demo.problem(text)
    if interrupted:
        demo.view.write("demo interrupted; " + ("nothing left running\n" if not leftovers
                                                 else "see the problems above\n"))
        return 130
    if demo.problems:
        demo.view.write(f"\ndemo finished: {len(demo.problems)} thing(s) did not behave as "
                        "expected:\n" + "".join(f"  - {p}\n" for p in demo.problems))
        return 1
    demo.view.write(f"\ndemo finished: all {demo.steps} steps and {demo.expected_events} "
                    "Timeline Events (each delivered once) behaved as expected; nothing "
                    "left running\n")
    return 0


def _leftovers(before: set[int | None], directory: str) -> list[str]:
    """What the demo failed to stop: threads it started, its temporary directory."""
    left = []
    deadline = time.monotonic() + 2.0  # threads told to stop may need a moment
    while True:
        threads = [t for t in threading.enumerate() if t.ident not in before and t.is_alive()]
        if not threads or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if threads:
        left.append("threads still running: " + ", ".join(sorted(t.name for t in threads)))
    if directory and Path(directory).exists():
        left.append(f"{directory} was not removed")
    return left


def _run(demo: Demo, directory: Path, stack: contextlib.ExitStack) -> None:
    from devkit.demo_broker import start_broker
    from devkit.demo_relay import OPERATOR, add_operator, partner_app, start_relay
    from devkit.mosquitto import free_port
    from devkit.sandbox import Sandbox
    from devkit.signer import CommandSigner, generate_keypair
    from devkit.sims.lockboard import start_lockboard_sim
    from devkit.sims.modbus import ModbusSimBus
    from gateway.agent import Agent
    from gateway.config import load_config

    os.chmod(directory, 0o700)
    view = demo.view
    view.write(f"stora-gateway demo: a simulated site in {directory}\n")
    broker = start_broker(demo.broker_kind, directory)
    stack.callback(broker.stop)
    modbus = ModbusSimBus(directory / "ttyRS485-1", slaves=(1,), coils=4, inputs=4)
    stack.callback(modbus.close)
    lockers = start_lockboard_sim(directory / "ttyRS485-2", (0,), 8, hold_s=DEMO_HOLD_S)
    stack.callback(lockers.close)
    demo.lockers = lockers
    relay_port = free_port()
    sandbox = Sandbox(static_tokens=[DEMO_TOKEN], partner_app=partner_app(relay_port)).start()
    stack.callback(sandbox.stop)
    demo.sandbox = sandbox
    add_operator(sandbox)
    relay = start_relay(directory / "relay", sandbox, broker.port, relay_port)
    stack.callback(relay.stop)
    demo.relay = relay
    private, public = generate_keypair()
    demo.signer = CommandSigner(private, KID, SITE)
    demo.forger = CommandSigner(generate_keypair()[0], KID, SITE)
    demo.config_path = write_demo_config(directory, modbus.path, lockers.port.path,
                                         mqtt_port=broker.port, public_key=public,
                                         relay=relay)
    view.write(
        f"  broker       {broker.description}\n"
        f"  controllers  Modbus relay board (A-101, A-102, GATE) on {modbus.path}\n"
        f"               lock board (B-201, B-202) on {lockers.port.path}\n"
        f"  Stora API    sandbox on {sandbox.api_url} (operator {OPERATOR})\n"
        f"  relay        {relay.url}: the operator connected through Stora's consent page; "
        f"site {SITE} registered;\n"
        f"               Stora's webhooks become signed commands (key {relay.kid}); the app "
        "unlocks through its API;\n"
        "               the agent's Timeline Events go through its broker\n"
        f"  agent        site {SITE}, app {APP}, trusting command keys {KID} and {relay.kid}\n"
        "  live view    seconds since start; → sent, ← result, lock = the unit's state as "
        "the agent publishes it,\n"
        "               Stora = a Timeline Event as Stora receives it\n\n")
    demo.watcher = Watcher(broker.host, broker.port, view)
    stack.callback(demo.watcher.close)
    demo.feed = EventFeed(sandbox, view)
    stack.callback(demo.feed.close)

    agent = Agent(load_config(demo.config_path))
    demo.agent = agent
    stack.callback(agent.stop)
    agent.start()
    runner = threading.Thread(target=agent.run_forever, name="demo-agent", daemon=True)
    runner.start()

    def stop_agent() -> None:
        agent.stop_event.set()
        runner.join()

    stack.callback(stop_agent)  # runs before agent.stop (last in, first out)
    if not agent.link.wait_connected(EXPECT_TIMEOUT_S):
        demo.problem("the agent did not connect to the broker")
        return
    watcher = demo.watcher
    demo.expect_state("unit_a101", "read back", lambda s: s.get("locked") is not None)
    if not watcher.wait(lambda: all(watcher.state(u) for u in REFERENCES)):
        missing = [r for u, r in REFERENCES.items() if watcher.state(u) is None]
        demo.problem(f"no state published for {', '.join(missing)}")
        return
    demo.script()
    demo.check_delivery()
