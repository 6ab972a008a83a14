"""The options of ``stora-gateway init``, and the defaults they share with it.

Only the parser lives here, so ``stora-gateway --help`` stays quick: what writes the
config (``gateway/cli/init_config.py``) loads only when ``init`` runs.
"""

from __future__ import annotations

import argparse
from typing import Final

__all__ = ["DRIVER_CHOICES", "add_arguments"]

#: The drivers ``init`` offers, in the order it lists them (gateway.config.DRIVERS,
#: kept here as text so ``--help`` imports nothing heavy).
DRIVER_CHOICES: Final = ("modbus", "lockboard", "osdp", "zigbee2mqtt", "tasmota")
SERIAL_DRIVERS: Final = frozenset({"modbus", "lockboard", "osdp"})
#: The first bus address each serial driver accepts, its factory setting as a default.
DEFAULT_ADDRESS: Final = {"modbus": 1, "lockboard": 0, "osdp": 0}
AUTH_CHOICES: Final = ("broker", "client_credentials", "static")
#: Secret files, named relative to the config's directory as deploy/README.md lays out.
DEFAULT_TOKEN_FILE: Final = "secrets/stora-token"  # noqa: S105 - a file name
DEFAULT_CLIENT_SECRET_FILE: Final = "secrets/stora-client-secret"  # noqa: S105
DEFAULT_MQTT_PASSWORD_FILE: Final = "secrets/mqtt-password"  # noqa: S105
#: The site broker of deploy/ (deploy/README.md): its unix socket, where the agent's
#: account is named as the site id.
DEFAULT_BROKER_HOST: Final = "/run/stora-mqtt/mqtt.sock"
#: The shipped ACL's accounts for the MQTT drivers' links (hardware.md), and where their
#: passwords go.
LINK_ACCOUNTS: Final = {
    "zigbee2mqtt": ("gw-zigbee2mqtt", "secrets/zigbee2mqtt-password"),
    "tasmota": ("gw-tasmota", "secrets/tasmota-password"),
}
STORA_URL: Final = "https://public-api.stora.co/2025-09"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``init`` (each value it would otherwise ask for)."""
    p.add_argument("--site-id", metavar="SITE", help="the Stora site id (site_…)")
    p.add_argument("--app-name", metavar="NAME",
                   help='your product name, as in "Unit locked via NAME"')
    p.add_argument("--driver", choices=DRIVER_CHOICES, help="the controller's driver")
    p.add_argument("--controller-name", metavar="NAME", default="bus1",
                   help="the controller's name in the config (default bus1)")
    p.add_argument("--port", metavar="PATH", help="serial drivers: the port, e.g. "
                   "/dev/serial/by-id/usb-FTDI_…-port0 or socket://HOST:PORT")
    p.add_argument("--baudrate", type=int, default=9600, help="serial drivers (default 9600)")
    p.add_argument("--address", type=int, help="serial drivers: the board's bus address "
                   "(default: the driver's factory setting)")
    p.add_argument("--topic", metavar="TOPIC", help="tasmota: the device's Tasmota topic")
    p.add_argument("--scbk-file", metavar="FILE", help="osdp: the file of the PD's Secure "
                   "Channel key (default secrets/osdp-<controller>.scbk; hardware.md)")
    p.add_argument("--base-topic", metavar="TOPIC", default="zigbee2mqtt",
                   help="zigbee2mqtt: the bridge's base topic (default zigbee2mqtt)")
    p.add_argument("--link-user", metavar="USER",
                   help="zigbee2mqtt/tasmota: the device link's own broker account (default "
                   "the shipped ACL's: gw-zigbee2mqtt, gw-tasmota; \"\" for none)")
    p.add_argument("--link-password-file", metavar="FILE", default="",
                   help="zigbee2mqtt/tasmota: the file holding that account's password")
    p.add_argument("--lock", action="append", default=[], metavar="UNIT=REF[@OUT]",
                   help="a lock: Stora unit id, door label, and the channel (0-based) or "
                   "zigbee2mqtt device name; repeat for each lock (channels default to "
                   "0, 1, 2, …)")
    p.add_argument("--broker-host", metavar="HOST",
                   help="the site broker: a host name, or its unix socket path (default "
                   f"{DEFAULT_BROKER_HOST}, deploy/'s)")
    p.add_argument("--broker-port", type=int, default=1883, help="default 1883")
    p.add_argument("--broker-user", metavar="USER",
                   help="the agent's broker account (default: the site id, as deploy/'s "
                   "broker accounts; \"\" for a broker without accounts)")
    p.add_argument("--broker-password-file", metavar="FILE", default="",
                   help=f"the file holding its password (default {DEFAULT_MQTT_PASSWORD_FILE} "
                   "with --broker-user)")
    p.add_argument("--relay-key", metavar="KID=KEY",
                   help="the relay's command key, as `stora-relay sites add` prints it")
    p.add_argument("--stora-auth", choices=AUTH_CHOICES, default="broker",
                   help="how events reach Stora: through the relay (broker, the default), "
                   "or straight with client_credentials or a static token")
    p.add_argument("--stora-url", metavar="URL", help="[stora] base_url: the relay's "
                   "https://…/stora/2025-09 for broker, else Stora's (the default)")
    p.add_argument("--client-id", metavar="ID", help="client_credentials: the OAuth client")
    p.add_argument("--client-secret-file", metavar="FILE", default=DEFAULT_CLIENT_SECRET_FILE,
                   help=f"client_credentials: its secret's file (default "
                   f"{DEFAULT_CLIENT_SECRET_FILE})")
    p.add_argument("--token-file", metavar="FILE", default=DEFAULT_TOKEN_FILE,
                   help=f"broker/static: the token's file (default {DEFAULT_TOKEN_FILE})")
    p.add_argument("--timeline-source-id", metavar="TSRC",
                   help="the timeline source Stora gave your product (tsrc_…)")
    p.add_argument("--no-input", action="store_true",
                   help="never ask: fail (exit 2) naming what is missing")
