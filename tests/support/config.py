"""The agent's configuration as the config tests see it
(tests/gateway/config/test_config_*.py, and the CLI and port tests): two fixed relay keys,
a valid file with every section, and its writer."""

from __future__ import annotations

import base64
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

# Two fixed relay keys: one written as base64url of the raw bytes, one as PEM.
RAW_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32))).public_key()

RAW_KEY_BYTES = RAW_KEY.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

RAW_KEY_B64 = base64.urlsafe_b64encode(RAW_KEY_BYTES).rstrip(b"=").decode()

PEM_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33))).public_key()

PEM_TEXT = PEM_KEY.public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
).decode()


SECRET_CONTENT = "s3cr3t-do-not-print"

VALID_TOML = f"""
[site]
id = "site_123"
app_name = "YourApp"

[mqtt]
host = "broker.local"
port = 8883
topic_prefix = "stora-gw"
username = "gw"
password_file = "secrets/mqtt-password"
tls = true
ca_file = "ca.pem"
keepalive_s = 60

[commands]
clock_skew_s = 20
max_lifetime_s = 120

[commands.trusted_keys]
relay-2026 = "{RAW_KEY_B64}"
relay-pem = \"\"\"
{PEM_TEXT}\"\"\"

[stora]
base_url = "https://public-api.stora.co/2025-09/"
auth = "client_credentials"
client_id = "client-1"
client_secret_file = "secrets/stora-client-secret"
timeline_source_id = "tsrc_1"
max_per_second = 5
max_per_minute = 100

[storage]
path = "data/gateway.db"

[control]
socket = "/run/stora-gateway/test.sock"

[[controllers]]
name = "bus1"
driver = "modbus"
port = "/dev/ttyUSB0"
baudrate = 19200
address = 3
pulse = true

[[controllers]]
name = "boards"
driver = "lockboard"
port = "/dev/ttyUSB1"
address = 2

[[locks]]
unit = "unit_abc"
reference = "A-101"
controller = "bus1"
channel = 0
door_input = 0

[[locks]]
unit = "unit_def"
reference = "A-102"
controller = "bus1"
channel = 1
door_input = 1
status_input = 2
energize_to = "lock"
unlock_seconds = 5

[[locks]]
unit = "unit_ghi"
reference = "B-201"
controller = "boards"
channel = 15
"""


SECRET_FILES = ("secrets/mqtt-password", "secrets/stora-client-secret")


def write_config(directory: Path, text: str = VALID_TOML) -> Path:
    """Write a config and the files it names (secrets chmod 600); return its path."""
    (directory / "secrets").mkdir(exist_ok=True)
    for name in SECRET_FILES:
        secret = directory / name
        secret.write_text(SECRET_CONTENT)
        secret.chmod(0o600)
    (directory / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    path = directory / "gateway.toml"
    path.write_text(text, encoding="utf-8")
    return path
