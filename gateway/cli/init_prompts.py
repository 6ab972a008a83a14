"""``stora-gateway init`` on a terminal: ask for what the flags left out.

Each answer is checked as it is typed and asked again when wrong, in the order an
installer knows them; without a terminal (or with ``--no-input``) :func:`missing_flags`
names the flags still needed.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from pathlib import Path
from typing import Final, TextIO

from gateway.cli.init_answers import BARE_KEY, Answers, InitError, LockAnswer, parse_relay_key
from gateway.cli.init_options import (
    DEFAULT_ADDRESS,
    DEFAULT_BROKER_HOST,
    DRIVER_CHOICES,
    SERIAL_DRIVERS,
)

__all__ = ["BY_ID_DIR", "Asker", "ask_missing", "missing_flags"]

#: Where a USB serial adapter has a name that survives reboots and re-plugging.
BY_ID_DIR: Final = Path("/dev/serial/by-id")


class Asker:
    """Asks on a terminal; each answer is checked at once and asked again when wrong."""

    def __init__(self, stdin: TextIO, out: TextIO) -> None:
        self.stdin = stdin
        self.out = out

    def ask(self, question: str, default: str = "",
            check: Callable[[str], str | None] | None = None) -> str:
        """The answer to ``question`` (``default`` on an empty line); EOF stops ``init``."""
        shown = f" [{default}]" if default else ""
        while True:
            self.out.write(f"{question}{shown}: ")
            self.out.flush()
            line = self.stdin.readline()
            if not line:
                raise InitError("no answer (end of input): nothing was written")
            answer = line.strip() or default
            problem = check(answer) if check is not None else (
                None if answer else "an answer is needed")
            if problem is None:
                return answer
            self.out.write(f"  {problem}\n")


def _id_check(prefix: str, what: str) -> Callable[[str], str | None]:
    def check(value: str) -> str | None:
        if value.startswith(prefix) and value != prefix and BARE_KEY.fullmatch(value):
            return None
        return f"a Stora {what} starts with '{prefix}' (letters, digits, _ and - only)"

    return check


def _int_check(lo: int, hi: int) -> Callable[[str], str | None]:
    def check(value: str) -> str | None:
        try:
            ok = lo <= int(value) <= hi
        except ValueError:
            ok = False
        return None if ok else f"a whole number from {lo} to {hi}"

    return check


def _choice_check(choices: tuple[str, ...]) -> Callable[[str], str | None]:
    return lambda value: None if value in choices else f"one of: {', '.join(choices)}"


def _url_check(value: str) -> str | None:
    return None if value.startswith(("https://", "http://127.0.0.1", "http://localhost")) \
        else "an https:// URL"


def _serial_ports() -> list[str]:
    """Serial adapters present by their stable names (``/dev/serial/by-id``)."""
    try:
        return sorted(str(p) for p in BY_ID_DIR.iterdir())
    except OSError:
        return []


def ask_missing(answers: Answers, asker: Asker) -> None:
    """Ask for every value the flags did not give, in the order an installer knows them."""
    a, ask = answers, asker.ask
    if a.site_id is None:
        a.site_id = ask("Stora site id (BackOffice, the site's page)", "",
                        _id_check("site_", "site id"))
    if a.app_name is None:
        a.app_name = ask('Your product name, as in "Unit locked via NAME"')
    if a.driver is None:
        a.driver = ask(f"Controller driver ({', '.join(DRIVER_CHOICES)})", "modbus",
                       _choice_check(DRIVER_CHOICES))
    if a.driver in SERIAL_DRIVERS:
        if a.port is None:
            found = _serial_ports()
            if found:
                asker.out.write("Serial adapters present:\n" +
                                "".join(f"  {p}\n" for p in found))
            a.port = ask("Serial port (/dev/serial/by-id/… keeps its name across reboots)",
                         found[0] if found else "")
        if a.address is None:
            first = DEFAULT_ADDRESS[a.driver]
            a.address = int(ask("The board's bus address", str(first), _int_check(first, 247)))
    elif a.driver == "tasmota" and a.topic is None:
        a.topic = ask("The device's Tasmota topic (its web page, Configuration → MQTT)")
    if not a.locks:
        count = int(ask("How many locks on this controller", "1", _int_check(1, 256)))
        for i in range(count):
            unit = ask(f"Lock {i + 1}: Stora unit id", "", _id_check("unit_", "unit id"))
            reference = ask(f"Lock {i + 1}: the label on its door (e.g. A-101)")
            if a.driver == "zigbee2mqtt":
                where = ask(f"Lock {i + 1}: the device's friendly name in Zigbee2MQTT")
            else:
                where = ask(f"Lock {i + 1}: its channel (relay/output number, 0-based)",
                            str(i), _int_check(0, 255))
            a.locks.append(LockAnswer(unit, reference, where))
    if a.broker_host is None:
        a.broker_host = ask("The site broker: a host name, or its unix socket path",
                            DEFAULT_BROKER_HOST)
        if not a.broker_host.startswith("/"):
            a.broker_port = int(ask("Its port", str(a.broker_port), _int_check(1, 65535)))
    if a.broker_user is None:
        a.broker_user = ask("The agent's broker account (\"-\" for a broker without "
                            "accounts)", a.site_id or "")
        if a.broker_user == "-":
            a.broker_user = ""
    if a.relay_kid is None or a.relay_key is None:
        a.relay_kid, a.relay_key = parse_relay_key(ask(
            "The relay's command key, KID=KEY (printed by `stora-relay sites add`)", "",
            _relay_key_check))
    if a.stora_auth == "broker" and a.stora_url is None:
        a.stora_url = ask("The relay's Timeline URL (its public URL + /stora/2025-09)", "",
                          _url_check)
    if a.stora_auth == "client_credentials" and a.client_id is None:
        a.client_id = ask("Stora OAuth client id")
    if a.timeline_source_id is None:
        a.timeline_source_id = ask("Timeline source id (given by Stora at onboarding)", "",
                                   _id_check("tsrc_", "timeline source id"))


def _relay_key_check(value: str) -> str | None:
    """KID=KEY with KEY the base64url of 32 bytes, as the relay prints it (a PEM key,
    several lines, goes in with ``--relay-key``)."""
    wanted = "KID=KEY, e.g. relay-2026=<base64url of the 32-byte key>"
    try:
        _, key = parse_relay_key(value)
    except InitError:
        return wanted
    unpadded = key.rstrip("=")
    try:
        raw = base64.urlsafe_b64decode(unpadded + "=" * (-len(unpadded) % 4))
    except (binascii.Error, ValueError):
        return wanted
    return None if len(raw) == 32 else f"{wanted}: this key decodes to {len(raw)} bytes"


def missing_flags(a: Answers) -> list[str]:
    """The flags still needed when nobody can be asked."""
    needed = [("--site-id", a.site_id), ("--app-name", a.app_name), ("--driver", a.driver),
              ("--relay-key", a.relay_key), ("--timeline-source-id", a.timeline_source_id)]
    if a.driver in SERIAL_DRIVERS:
        needed.append(("--port", a.port))
    if a.driver == "tasmota":
        needed.append(("--topic", a.topic))
    if a.stora_auth == "broker":
        needed.append(("--stora-url", a.stora_url))
    if a.stora_auth == "client_credentials":
        needed.append(("--client-id", a.client_id))
    missing = [flag for flag, value in needed if value is None]
    if not a.locks:
        missing.append("--lock")
    return missing

