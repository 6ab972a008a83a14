"""``stora-gateway demo``: a simulated site driven through the real drivers and CLI.

Two simulated RS-485 buses on pseudo-terminals (a Modbus relay board with strikes, a
maglock gate and door contacts; a hex-protocol lock board), a generated config, and the
technician commands run against them, including faults a technician meets in the field:
a jammed lock, an unplugged USB adapter, a door held open.  Each step states what should
happen; the demo exits 0 only when everything behaved as stated.  It removes everything
it created, also on Ctrl-C.

Until the agent exists (MQTT commands, Timeline Events) this is the whole loop there is;
the agent issue extends it with a broker, the sandbox API and a command signer.
"""

from __future__ import annotations

import base64
import io
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from drivers.lockboard.sim import start_lockboard_sim
from drivers.modbus.sim import ModbusSimBus

#: Lock-board hold time in the demo: short, so the demo does not wait on it.
DEMO_HOLD_S = 1.0


def _demo_key() -> str:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    raw = Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def write_demo_config(directory: Path, modbus_port: Path, lockboard_port: Path) -> Path:
    """A complete config for the simulated site, with its secret file (mode 600)."""
    token = directory / "stora-token"
    token.write_text("demo-token-not-a-secret\n")
    token.chmod(0o600)
    config = directory / "gateway.toml"
    config.write_text(f"""\
[site]
id = "site_demo"
app_name = "DemoGate"

[commands]
trusted_keys = {{ demo-2026 = "{_demo_key()}" }}

[stora]
base_url = "http://127.0.0.1:8099/2025-09"
auth = "static"
token_file = "{token}"
timeline_source_id = "tsrc_demo"

[storage]
path = "{directory / 'gateway.db'}"

[control]
socket = "{directory / 'control.sock'}"

[[controllers]]
name = "bus1"
driver = "modbus"
port = "{modbus_port}"
address = 1
pulse = true
channels = 4
inputs = 4
timeout_ms = 100

[[controllers]]
name = "lockers"
driver = "lockboard"
port = "{lockboard_port}"
address = 0
channels = 8
timeout_ms = 100

[[locks]]
unit = "unit_a101"
reference = "A-101"
controller = "bus1"
channel = 0
door_input = 0
unlock_seconds = 1

[[locks]]
unit = "unit_a102"
reference = "A-102"
controller = "bus1"
channel = 1
door_input = 1
unlock_seconds = 1

[[locks]]
unit = "unit_gate"
reference = "GATE"
controller = "bus1"
channel = 3
energize_to = "lock"
unlock_seconds = 1

[[locks]]
unit = "unit_b201"
reference = "B-201"
controller = "lockers"
channel = 0

[[locks]]
unit = "unit_b202"
reference = "B-202"
controller = "lockers"
channel = 1
""")
    return config


@dataclass
class Step:
    """One demo step: what it shows, the CLI arguments, the exit status it should give."""

    title: str
    argv: list[str]
    expect: int
    before: Callable[[], None] | None = None
    after: Callable[[], None] | None = None


def run_demo(out: TextIO, *, pace: float = 0.4) -> int:
    """Run the demo, writing a readable log to ``out``; 0 when all went as expected."""
    from gateway.cli import main

    with tempfile.TemporaryDirectory(prefix="stora-gw-demo-") as tmp:
        directory = Path(tmp)
        os.chmod(directory, 0o700)
        out.write(f"stora-gateway demo: a simulated site in {directory}\n")
        modbus = ModbusSimBus(directory / "ttyRS485-1", slaves=(1,), coils=4, inputs=4)
        lockers = start_lockboard_sim(directory / "ttyRS485-2", (0,), 8, hold_s=DEMO_HOLD_S)
        try:
            config = str(write_demo_config(directory, modbus.path, lockers.port.path))
            board = modbus.board(1)

            def jam() -> None:
                lockers.sim.set_faults(0, 2, jammed=True)

            def unjam() -> None:
                lockers.sim.set_faults(0, 2, jammed=False)

            steps = [
                Step("Check the configuration", ["check-config"], 0),
                Step("Read every lock and door (the fail-safe GATE maglock is unpowered: "
                     "open)", ["locks"], 0),
                Step("Lock the gate", ["lock", "GATE"], 0),
                Step("Test every lock: unlock, confirm, relock, confirm",
                     ["test", "--all", "--seconds", "1", "--relock-timeout", "4"], 0),
                Step("Unlock A-101 for 1 s (the relay board ends the pulse itself)",
                     ["unlock", "A-101", "--seconds", "1"], 0),
                Step("Fault: B-202's latch is jammed; the test must FAIL, not guess",
                     ["test", "B-202", "--seconds", "1", "--relock-timeout", "2"], 1,
                     before=jam, after=unjam),
                Step("Fault: the Modbus USB adapter is unplugged; its locks read unknown",
                     ["locks"], 1, before=modbus.port.vanish),
                Step("The adapter is plugged back in; the gateway reopens it by itself",
                     ["locks"], 0, before=modbus.port.restore),
                Step("Fault: A-102's door is held open; the door contact says so",
                     ["locks"], 0, before=lambda: board.hold_door_open(1),
                     after=lambda: board.hold_door_open(1, held=False)),
            ]
            surprises = 0
            for number, step in enumerate(steps, 1):
                out.write(f"\n── {number}. {step.title}\n$ stora-gateway {' '.join(step.argv)}\n")
                if step.before:
                    step.before()
                    time.sleep(0.6 if step.before == modbus.port.restore else 0)
                buffer = io.StringIO()
                status = main([*step.argv, "--config", config], out=buffer, err=buffer)
                out.write(buffer.getvalue())
                if step.after:
                    step.after()
                verdict = "as expected" if status == step.expect else "UNEXPECTED"
                surprises += status != step.expect
                out.write(f"   exit status {status}: {verdict}\n")
                out.flush()
                time.sleep(pace)
        finally:
            modbus.close()
            lockers.close()
    if surprises:
        out.write(f"\ndemo finished: {surprises} step(s) did not behave as expected\n")
        return 1
    out.write(f"\ndemo finished: all {len(steps)} steps behaved as expected; "
              "nothing left running\n")
    return 0
