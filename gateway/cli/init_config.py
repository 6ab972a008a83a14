"""``stora-gateway init``: write a first config, from flags or by asking on a terminal.

An installer should get from nothing to a config that passes ``check-config`` without
reading source (issue 12).  ``init`` asks for what only the installer knows (the Stora
site and unit ids, one controller and its locks, the broker, the relay's command key,
how events reach Stora), takes each as a flag too, and writes a short, commented
config; every other key keeps its default (``deploy/gateway.example.toml`` and
``docs/configuration.md`` describe them all).

What it guarantees:

* **Nothing is overwritten.**  The file is written to a temporary name next to it and
  published with ``link(2)``, which fails when the name exists: an existing config is
  never replaced, nor a half-written one ever seen.  ``--config`` may name the link
  ``deploy/install.sh`` makes (``/etc/stora-gateway/gateway.toml`` →
  ``config/gateway.toml``): the file is created where the link points, and relative
  paths resolve against the directory of the name given, as the agent resolves them.
* **Mode 0640**: the agent's user writes it and its group (technicians) reads it
  (``deploy/README.md``); it holds no secret, only the names of the files that do.
  Root never writes it into another user's directory (``sudo stora-gateway init``
  through the link would leave a ``root:root`` file in ``config/`` that the agent cannot
  read): ``init`` refuses, exit 2, and gives the ``runuser`` command that runs it as the
  directory's owner.
* **It loads.**  The text is validated by the loader before it is written; a wrong
  value (a site id without ``site_``) is refused with the loader's one-line errors,
  exit 2.  Secret files are never written (they belong in ``secrets/``, which only root
  may write): the ones still missing are listed as what is left to do.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pwd
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, TextIO

from gateway.cli.init_options import (
    DEFAULT_ADDRESS,
    DEFAULT_BROKER_HOST,
    DEFAULT_CLIENT_SECRET_FILE,
    DEFAULT_MQTT_PASSWORD_FILE,
    DEFAULT_TOKEN_FILE,
    DRIVER_CHOICES,
    LINK_ACCOUNTS,
    SERIAL_DRIVERS,
    STORA_URL,
)

__all__ = ["CONFIG_MODE", "InitError", "render", "run_init"]

#: The config's mode: the agent's user writes it, its group (technicians) reads it.
CONFIG_MODE: Final = 0o640
#: Where a USB serial adapter has a name that survives reboots and re-plugging.
BY_ID_DIR: Final = Path("/dev/serial/by-id")
_BARE_KEY: Final = re.compile(r"[A-Za-z0-9_-]+")
#: How root runs the CLI as the user who owns the config's directory (deploy/README.md).
_SUDO_AS: Final = "sudo runuser -u {user} -- stora-gateway"


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


# --------------------------------------------------------------------------- arguments


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


# --------------------------------------------------------------------------- asking


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
        if value.startswith(prefix) and value != prefix and _BARE_KEY.fullmatch(value):
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
    import base64
    import binascii

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


# --------------------------------------------------------------------------- the text


def _q(text: str) -> str:
    """A TOML basic string (JSON's escapes are TOML's)."""
    return json.dumps(text, ensure_ascii=False)


def _key(name: str) -> str:
    return name if _BARE_KEY.fullmatch(name) else _q(name)


def render(a: Answers) -> str:
    """The config text for ``a`` (complete answers), commented for the next reader."""
    if not (a.site_id and a.app_name and a.driver and a.relay_kid and a.relay_key
            and a.timeline_source_id):
        raise InitError("init lacks an answer it needs; nothing was written")
    lines = [
        "# Written by `stora-gateway init`.  Every key, its default and where its value",
        "# comes from: docs/configuration.md and deploy/gateway.example.toml.",
        "# Check it with: stora-gateway check-config [--online]",
        "",
        "# The Stora site, and your product's name in its Timeline Events:",
        f'# "Unit locked via {a.app_name}".',
        "[site]",
        f"id = {_q(a.site_id)}",
        f"app_name = {_q(a.app_name)}",
        "",
        "# The site broker the relay's commands arrive through.",
        "[mqtt]",
    ]
    host = a.broker_host or DEFAULT_BROKER_HOST
    lines.append(f"host = {_q(host)}")
    if not host.startswith("/"):  # a socket path has no port
        lines.append(f"port = {a.broker_port}")
    broker_user = a.site_id if a.broker_user is None else a.broker_user
    if broker_user:
        lines += [f"username = {_q(broker_user)}",
                  f"password_file = {_q(a.broker_password_file or DEFAULT_MQTT_PASSWORD_FILE)}"]
    lines += [
        "",
        "# Who may sign commands: the relay's key, from `stora-relay sites add`.",
        "[commands]",
        f"trusted_keys = {{ {_key(a.relay_kid)} = {_q(a.relay_key)} }}",
        "",
        "# Where Timeline Events go, with which credential (a file; never inline).",
        "[stora]",
        f"base_url = {_q(a.stora_url or STORA_URL)}",
        f"auth = {_q(a.stora_auth)}",
    ]
    if a.stora_auth == "client_credentials":
        lines += [f"client_id = {_q(a.client_id or '')}",
                  f"client_secret_file = {_q(a.client_secret_file)}"]
    else:
        lines.append(f"token_file = {_q(a.token_file)}")
    lines += [f"timeline_source_id = {_q(a.timeline_source_id)}", "", "[[controllers]]",
              f"name = {_q(a.controller_name)}", f"driver = {_q(a.driver)}"]
    lines += _controller_lines(a)
    next_channel = 0
    for lock in a.locks:
        lines += ["", "[[locks]]", f"unit = {_q(lock.unit)}",
                  f"reference = {_q(lock.reference)}", f"controller = {_q(a.controller_name)}"]
        if a.driver == "zigbee2mqtt":
            lines.append(f"device = {_q(lock.where)}")
            continue
        channel = _channel(lock, next_channel)
        next_channel = channel + 1
        lines.append(f"channel = {channel}")
    return "\n".join(lines) + "\n"


def _controller_lines(a: Answers) -> list[str]:
    if a.driver in SERIAL_DRIVERS:
        assert a.driver is not None
        assert a.port is not None
        address = a.address if a.address is not None else DEFAULT_ADDRESS[a.driver]
        lines = [f"port = {_q(a.port)}", f"baudrate = {a.baudrate}", f"address = {address}"]
        if a.driver == "osdp":  # Secure Channel is required (hardware.md)
            lines.append(f"scbk_file = "
                         f"{_q(a.scbk_file or f'secrets/osdp-{a.controller_name}.scbk')}")
        return lines
    lines = [f"topic = {_q(a.topic or '')}"] if a.driver == "tasmota" else [
        f"base_topic = {_q(a.base_topic)}"]
    assert a.driver is not None
    shipped_user, shipped_file = LINK_ACCOUNTS[a.driver]
    user = shipped_user if a.link_user is None else a.link_user
    if user:
        lines += [f"username = {_q(user)}",
                  f"password_file = {_q(a.link_password_file or shipped_file)}"]
    return lines


def _channel(lock: LockAnswer, next_free: int) -> int:
    if not lock.where:
        return next_free
    try:
        return int(lock.where)
    except ValueError:
        raise InitError(f"lock {lock.unit}: channel {lock.where!r} is not a number") from None


# --------------------------------------------------------------------------- writing


def target_of(named: Path) -> Path:
    """Where a config named ``named`` is written: the name, or where its link points.

    ``InitError`` when something is already there, link or file: ``init`` never
    overwrites.
    """
    if named.is_symlink():
        target = Path(os.path.realpath(named))
        if target.exists() or target.is_symlink():
            raise InitError(f"{named} already exists (a link to {target}); init never "
                            "overwrites a config: move it away or pick another --config")
        return target
    if named.exists():
        raise InitError(f"{named} already exists; init never overwrites a config: move it "
                        "away or pick another --config")
    return named


def check_directory(target: Path) -> None:
    """``InitError`` unless ``target``'s directory exists and this user may write in it:
    said before any question is asked, not after the last."""
    directory = target.parent
    if not directory.is_dir():
        raise InitError(f"directory {directory} does not exist; create it first "
                        "(deploy/install.sh makes /etc/stora-gateway/config)")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise InitError(f"no permission to write in {directory}; run init as the agent's "
                        "user (deploy/README.md) or pick another --config")
    owner = directory.stat().st_uid
    if os.geteuid() == 0 and owner != 0:
        # Root may write anywhere, but the file would be root's, 0640, which the agent
        # (the directory's user) cannot read, and root would be working inside a
        # directory another user writes, where links may be planted: deploy/install.sh
        # never does that.  The directory's owner writes its own config.
        try:
            who = pwd.getpwuid(owner).pw_name
        except KeyError:  # no name to give runuser
            raise InitError(f"{directory} belongs to uid {owner}, not root; a config root "
                            "wrote there would be unreadable to its owner: run init as "
                            "that user instead") from None
        raise InitError(f"{directory} belongs to user {who}, not root; a config root wrote "
                        "there would be unreadable to its owner: run init as that user "
                        f"instead, with the same options: {_SUDO_AS.format(user=who)} "
                        "init …")


def publish(target: Path, text: str) -> None:
    """Write ``text`` to ``target`` (mode 0640) unless it exists, all or nothing."""
    directory = target.parent
    check_directory(target)
    temp = directory / f".{target.name}.init-{os.urandom(4).hex()}"
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, CONFIG_MODE)
    except OSError as exc:
        raise InitError(f"cannot write in {directory}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fp:
            os.fchmod(fp.fileno(), CONFIG_MODE)  # whatever the umask
            fp.write(text)
            fp.flush()
            os.fsync(fp.fileno())
        # link(2) fails when the name exists: never a replaced config, even in a race.
        os.link(temp, target)
    except FileExistsError:
        raise InitError(f"{target} appeared meanwhile; init never overwrites a config") \
            from None
    except OSError as exc:
        raise InitError(f"cannot write {target}: {exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()


# --------------------------------------------------------------------------- the command


def run_init(args: argparse.Namespace, path: str, *, stdin: TextIO, out: TextIO,
             err: TextIO, prog: str) -> int:
    """``init``: gather the answers, validate the text, write it; the exit status."""
    from gateway.config import MissingFileError, config_problems, parse_config_bytes
    from gateway.errors import ConfigError

    named = Path(path)
    target = target_of(named)  # refuse at once, before asking anything
    check_directory(target)
    answers = answers_from_args(args)
    if not args.no_input and stdin.isatty():
        ask_missing(answers, Asker(stdin, err))
    missing = missing_flags(answers)
    if missing:
        raise InitError(f"init needs {', '.join(missing)} (or run it on a terminal to be "
                        "asked); nothing was written")
    text = render(answers)
    todo: list[ConfigError] = []
    try:
        parse_config_bytes(text.encode("utf-8"), str(named), named.absolute().parent)
    except ConfigError as exc:
        problems = config_problems(exc)
        wrong = [p for p in problems if not isinstance(p, MissingFileError)]
        if wrong:
            err.writelines(f"{prog}: {p}\n" for p in wrong)
            err.write(f"{prog}: nothing was written to {named}\n")
            return 2
        todo = list(problems)
    publish(target, text)
    out.write(f"wrote {target} (mode {CONFIG_MODE:04o})\n")
    if todo:
        out.write("Before the agent can start, put each secret in its file (mode 0600, "
                  "owned by the agent's user; deploy/README.md, step 1):\n")
        out.writelines(f"  {p.key}: {p.reason}\n" for p in todo)
    check = f"{prog} check-config --config {named}"
    out.write(f"Then: {check}   and   {check} --online\n")
    return 0
