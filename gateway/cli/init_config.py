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

Here: the config's text and writing it.  The flags are ``gateway/cli/init_options.py``,
the answers ``gateway/cli/init_answers.py``, the questions ``gateway/cli/init_prompts.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pwd
import sys
from pathlib import Path
from typing import Final, TextIO

from gateway.cli.init_answers import (
    BARE_KEY,
    Answers,
    InitError,
    LockAnswer,
    answers_from_args,
)
from gateway.cli.init_options import (
    DEFAULT_ADDRESS,
    DEFAULT_BROKER_HOST,
    DEFAULT_MQTT_PASSWORD_FILE,
    LINK_ACCOUNTS,
    SERIAL_DRIVERS,
    STORA_URL,
)
from gateway.cli.init_prompts import Asker, ask_missing, missing_flags
from gateway.cli.shell import EXIT_USAGE, PROG, CliError, Context
from gateway.config import (
    MissingFileError,
    config_path_from_env,
    config_problems,
    parse_config_bytes,
)
from gateway.errors import ConfigError

__all__ = ["CONFIG_MODE", "InitError", "cmd_init", "render", "run_init"]

#: The config's mode: the agent's user writes it, its group (technicians) reads it.
CONFIG_MODE: Final = 0o640
#: How root runs the CLI as the user who owns the config's directory (deploy/README.md).
_SUDO_AS: Final = "sudo runuser -u {user} -- stora-gateway"


# --------------------------------------------------------------------------- the text


def _q(text: str) -> str:
    """A TOML basic string (JSON's escapes are TOML's)."""
    return json.dumps(text, ensure_ascii=False)


def _key(name: str) -> str:
    return name if BARE_KEY.fullmatch(name) else _q(name)


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


def cmd_init(ctx: Context) -> int:
    """``init``: write a first config to ``--config`` from flags, asking on a terminal for
    what they leave out; refuses to overwrite anything (exit 2)."""
    try:
        return run_init(ctx.args, config_path_from_env(ctx.args.config), stdin=sys.stdin,
                        out=ctx.out, err=ctx.err, prog=PROG)
    except InitError as exc:
        raise CliError(str(exc), EXIT_USAGE) from exc
