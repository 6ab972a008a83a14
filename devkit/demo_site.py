"""The demo's site: its names, the expected timings, and its generated config
(:func:`write_demo_config`, also the tests' and benchmarks' ready-made site)."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from devkit.demo_relay import DemoRelay

SITE: Final = "site_demo"
APP: Final = "DemoGate"
PREFIX: Final = f"stora-gw/{SITE}"
KID: Final = "demo-2026"
#: The static Bearer token of the demo's Stora sandbox.
DEMO_TOKEN: Final = "demo-token-not-a-secret"  # noqa: S105 (a demo's, on 127.0.0.1)
#: unit id -> the label on its door, as in :func:`write_demo_config`.
REFERENCES: Final = {"unit_a101": "A-101", "unit_a102": "A-102", "unit_gate": "GATE",
                     "unit_b201": "B-201", "unit_b202": "B-202"}
#: Lock-board hold time in the demo: as long as the unlock the signer asks for.
DEMO_HOLD_S: Final = 2.0
#: How long any one expectation may take to come true before it counts as a failure:
#: a command round trip or an event delivery takes milliseconds here; this covers a
#: loaded Raspberry Pi.
EXPECT_TIMEOUT_S: Final = 10.0
#: Extra time for a relock on top of the unlock's duration (a reconciliation pass).
RELOCK_MARGIN_S: Final = 8.0
#: The pause before each step, so a person can read along (``demo --pace``).
DEFAULT_PACE_S: Final = 1.5
#: After the last step, how long to watch for a Timeline Event delivered twice.
SETTLE_S: Final = 1.0


def _demo_key() -> str:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    raw = Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def write_demo_config(directory: Path, modbus_port: Path | str, lockboard_port: Path | str, *,
                      mqtt_port: int | None = None, stora_url: str | None = None,
                      public_key: str | None = None, relay: DemoRelay | None = None,
                      ) -> Path:
    """A complete config for the simulated site, with its secret file (mode 600).

    Without ``mqtt_port`` it is the technician's config (direct mode, the CLI tests);
    with it the agent's: ``[mqtt]`` on 127.0.0.1, ``[stora]`` at ``stora_url`` and
    ``public_key`` trusted for commands, on the system clock (no NTP needed).  With
    ``relay`` the agent also trusts the relay's signing key and posts its Timeline Events
    through the relay's broker (``auth = "broker"``, the site's credential).
    """
    token = directory / "stora-token"
    token.write_text(f"{relay.credential if relay else DEMO_TOKEN}\n")
    token.chmod(0o600)
    trusted = f'{KID} = "{public_key or _demo_key()}"'
    if relay is not None:
        trusted += f', {relay.kid} = "{relay.public_key}"'
        stora_url = f"{relay.url}/stora/2025-09"
    mqtt = "" if mqtt_port is None else (
        f'[mqtt]\nhost = "127.0.0.1"\nport = {mqtt_port}\nclient_id = "demo-agent"\n\n')
    clock = "" if mqtt_port is None else 'clock = "system"\n'
    config = directory / "gateway.toml"
    config.write_text(f"""\
[site]
id = "{SITE}"
app_name = "{APP}"

{mqtt}[commands]
trusted_keys = {{ {trusted} }}
{clock}
[stora]
base_url = "{stora_url or 'http://127.0.0.1:8099/2025-09'}"
auth = "{'broker' if relay else 'static'}"
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
