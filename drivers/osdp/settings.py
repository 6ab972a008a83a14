"""The ``osdp`` driver's settings: its ``[[controllers]]`` keys, its key file, its timings.

PD addresses are 0-126 (OSDP v2.2 §5.4; 127 is broadcast).  Secure Channel is required:
the table names the PD's key file (``scbk_file``, 32 hex digits; hardware.md, "Secure
Channel keys") unless ``allow_insecure = true`` drives the PD in the clear.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from drivers.settings import (
    RETRIES,
    SERIAL_KEYS,
    TIMEOUT_MS,
    DriverSpec,
    Range,
    SerialSettings,
    SettingsReader,
    check_foreign,
    read_serial_port,
)

__all__ = ["SCBK_D", "SPEC", "OsdpSettings", "OsdpTiming", "ScbkError", "load_scbk"]

#: OSDP addresses 0-126 (127 is broadcast).
MAX_ADDRESS = 126
ADDRESS = Range(0, MAX_ADDRESS, 0)
CHANNELS = Range(1, 256, 4)
INPUTS = Range(0, 256, 4)

#: The default Secure Channel base key of OSDP install mode (OSDP 2.2 Annex D.1): public,
#: so a session under it protects nothing.
SCBK_D = bytes(range(0x30, 0x40))
SCBK_LEN = 16


@dataclass(frozen=True, kw_only=True, slots=True)
class OsdpSettings(SerialSettings):
    """One OSDP peripheral: its outputs, inputs and Secure Channel key file."""

    channels: int = CHANNELS.default
    inputs: int = INPUTS.default
    scbk_file: Path | None = None
    allow_insecure: bool = False


def parse(r: SettingsReader) -> OsdpSettings:
    """The settings of one ``osdp`` controller table."""
    port, baudrate = read_serial_port(r)
    scbk_file = r.get_secret_file("scbk_file")
    allow_insecure = r.get_bool("allow_insecure", False)
    if scbk_file is None and not allow_insecure and r.ok("scbk_file", "allow_insecure"):
        # The driver refuses such a PD when the agent starts (hardware.md, "Secure
        # Channel keys"); said here, it cannot pass check-config and fail on site.
        r.error("scbk_file", "required for an osdp controller: the PD's Secure Channel key "
                             "(32 hex digits; hardware.md, \"Secure Channel keys\"), or "
                             "allow_insecure = true to drive it in the clear")
    address = ADDRESS.read(r, "address")
    channels = CHANNELS.read(r, "channels")
    inputs = INPUTS.read(r, "inputs")
    check_foreign(r, "pulse", "pulse_style", "pulse_base")
    return OsdpSettings(
        port=port,
        baudrate=baudrate,
        address=address,
        channels=channels,
        inputs=inputs,
        scbk_file=scbk_file,
        allow_insecure=allow_insecure,
        timeout_ms=TIMEOUT_MS.read(r, "timeout_ms"),
        retries=RETRIES.read(r, "retries"),
    )


SPEC = DriverSpec(
    name="osdp",
    keys=SERIAL_KEYS | {"channels", "inputs", "scbk_file", "allow_insecure"},
    settings=OsdpSettings,
    parse=parse,
    module="drivers.osdp.controller",
    address=ADDRESS,
    channels=CHANNELS,
    inputs=INPUTS,
    lock_refuses={
        "device": "device is for zigbee2mqtt locks; use channel",
        "status_input": "status_input (lock feedback) is read on modbus boards only",
    },
)


class ScbkError(ValueError):
    """The key file cannot be used."""


def load_scbk(path: Path) -> bytes:
    """The 16-byte Secure Channel base key in ``path`` (32 hex digits, spaces ignored)."""
    try:
        text = path.read_text(encoding="ascii", errors="strict")
    except (OSError, UnicodeDecodeError) as exc:
        raise ScbkError(f"scbk_file {path}: cannot read it ({exc})") from exc
    digits = "".join(text.split())
    try:
        key = bytes.fromhex(digits)
    except ValueError as exc:
        raise ScbkError(f"scbk_file {path}: not hex digits") from exc
    if len(key) != SCBK_LEN:
        raise ScbkError(f"scbk_file {path}: must hold 32 hex digits (16 bytes), "
                        f"found {len(key)} bytes")
    return key


@dataclass(frozen=True, slots=True)
class OsdpTiming:
    """Every timing of the OSDP driver, named (tests shrink these instead of sleeping)."""

    #: How often libosdp's state machine is run (it asks for at least every 50 ms).
    refresh_s: float = 0.02
    #: How long an action waits for the PD's status report that confirms it.  A PD
    #: answers a poll within 200 ms (OSDP 2.2 §5.7 reply delay); the CP polls every
    #: 50 ms; two commands and the report take a few polls.
    confirm_s: float = 1.5
    #: How long ``probe()`` waits for the PD to come online.
    probe_s: float = 2.0
    #: How long one session attempt (osdp_ID, osdp_CAP, the SC handshake: four
    #: exchanges) may take before a PD that is not online counts as failed; actions and
    #: reads wait for it rather than fail while a session is being set up.
    attempt_s: float = 1.5
    #: Re-enable an offline PD after this long, doubling up to ``retry_max_s``.
    retry_initial_s: float = 2.0
    retry_max_s: float = 10.0
    #: A renewed long unlock is re-sent this long before its current timer ends.
    renew_lead_s: float = 2.0
