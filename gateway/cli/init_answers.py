"""The answers ``stora-gateway init`` writes a config from, and how flags give them.

An answer left ``None`` (or empty) is one the flags did not give: ``init`` asks for it on
a terminal (``gateway/cli/init_prompts.py``) or names the flag it needs.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field
from typing import Final

from gateway.cli.init_options import DEFAULT_CLIENT_SECRET_FILE, DEFAULT_TOKEN_FILE

__all__ = [
    "BARE_KEY",
    "Answers",
    "InitError",
    "LockAnswer",
    "answers_from_args",
    "parse_lock",
    "parse_relay_key",
]

#: A TOML bare key, and the characters a Stora id may hold.
BARE_KEY: Final = re.compile(r"[A-Za-z0-9_-]+")


class InitError(Exception):
    """``init`` cannot go on: one sentence for the user, and the exit status (2)."""


@dataclass(slots=True)
class LockAnswer:
    """One lock: its Stora unit id, the label on its door, and its output."""

    unit: str
    reference: str
    where: str = ""  # channel number, or the zigbee2mqtt device name; "" = next free


@dataclass(slots=True)
class Answers:
    """Everything ``init`` writes; ``None`` / empty means "not given yet"."""

    site_id: str | None = None
    app_name: str | None = None
    driver: str | None = None
    controller_name: str = "bus1"
    port: str | None = None
    baudrate: int = 9600
    address: int | None = None
    topic: str | None = None
    base_topic: str = "zigbee2mqtt"
    scbk_file: str | None = None  # osdp; None: secrets/osdp-<controller>.scbk
    link_user: str | None = None  # None: the shipped ACL's account for the driver
    link_password_file: str = ""
    locks: list[LockAnswer] = field(default_factory=list)
    broker_host: str | None = None  # None: deploy/'s socket
    broker_port: int = 1883
    broker_user: str | None = None  # None: the site id, as deploy/'s broker accounts
    broker_password_file: str = ""
    relay_kid: str | None = None
    relay_key: str | None = None
    stora_auth: str = "broker"
    stora_url: str | None = None
    client_id: str | None = None
    client_secret_file: str = DEFAULT_CLIENT_SECRET_FILE
    token_file: str = DEFAULT_TOKEN_FILE
    timeline_source_id: str | None = None



def answers_from_args(a: argparse.Namespace) -> Answers:
    """The answers the flags give (``InitError`` for a malformed ``--lock``/``--relay-key``)."""
    answers = Answers(
        site_id=a.site_id, app_name=a.app_name, driver=a.driver,
        controller_name=a.controller_name, port=a.port, baudrate=a.baudrate,
        address=a.address, topic=a.topic, base_topic=a.base_topic, scbk_file=a.scbk_file,
        link_user=a.link_user,
        link_password_file=a.link_password_file, broker_host=a.broker_host,
        broker_port=a.broker_port, broker_user=a.broker_user,
        broker_password_file=a.broker_password_file, stora_auth=a.stora_auth,
        stora_url=a.stora_url, client_id=a.client_id,
        client_secret_file=a.client_secret_file, token_file=a.token_file,
        timeline_source_id=a.timeline_source_id,
    )
    answers.locks = [parse_lock(text) for text in a.lock]
    if a.relay_key is not None:
        answers.relay_kid, answers.relay_key = parse_relay_key(a.relay_key)
    return answers


def parse_lock(text: str) -> LockAnswer:
    """``UNIT=REFERENCE[@CHANNEL|@DEVICE]`` → a :class:`LockAnswer`."""
    unit, sep, rest = text.partition("=")
    reference, _, where = rest.rpartition("@") if "@" in rest else (rest, "", "")
    if not sep or not unit.strip() or not reference.strip():
        raise InitError(f"--lock {text!r}: expected UNIT=REFERENCE or UNIT=REFERENCE@CHANNEL, "
                        "e.g. unit_abc=A-101@0")
    return LockAnswer(unit.strip(), reference.strip(), where.strip())


def parse_relay_key(text: str) -> tuple[str, str]:
    """``KID=KEY`` → ``(kid, key)``."""
    kid, sep, key = text.partition("=")
    if not sep or not kid.strip() or not key.strip():
        raise InitError(f"--relay-key {text!r}: expected KID=KEY, e.g. relay-2026=<base64url>, "
                        "as `stora-relay sites add` prints it")
    return kid.strip(), key.strip()
