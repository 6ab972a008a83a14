"""The argument parser of ``stora-gateway``: every command, its options and its help.

This is all ``stora-gateway --help`` and parsing load (with the plugins' parsers,
``gateway/cli/plugins.py``): what runs a command is named in the command table
(``gateway/cli/shell.py``) and loads only when that command runs.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Sequence

from gateway import __version__
from gateway.cli.init_options import add_arguments as add_init_arguments
from gateway.cli.plugins import PluginCommand, plugin_commands
from gateway.cli.shell import PROG

__all__ = ["COMMANDS", "all_commands", "build_parser", "plugins", "product_command"]

#: The product's commands and their one-line help; README.md must mention each, and each
#: command a plugin adds (the dev kit's ``demo``, ``sandbox``, ``simulate``, ``selftest``:
#: gateway/cli/plugins.py); tests check both.  ``gateway.cli.shell.COMMAND_TABLE`` names
#: what runs each.
COMMANDS: dict[str, str] = {
    "run": "run the agent in the foreground, logging to stderr (for systemd)",
    "status": "the agent, broker link, outbox, controllers' health and clock sync",
    "check-config": "validate the configuration file and say what is wrong",
    "init": "write a first config from flags or by asking on a terminal; never overwrites",
    "ports": "list the serial ports present (device, description, serial number)",
    "scan": "probe the addresses on one controller's bus and list what answers",
    "locks": "one row per lock: unit, reference, controller, state, door, lockout",
    "unlock": "unlock a unit for N seconds, confirm by read-back, then relock",
    "lock": "lock a unit now and confirm by read-back",
    "test": "unlock, confirm, relock, confirm: a pass/fail table with timings",
    "outbox": "queued and dead-lettered Timeline Events; `outbox retry ID|--all-dead`",
    "watch": "show commands, results, lock states, alarms and Timeline Events as they "
             "happen",
    "clock": "whether the clock is trusted and why; `clock --reset-floor` resets the "
             "trusted-time floor to the build date (audited)",
    "completion": "print a shell completion script: "
                  "`source <(stora-gateway completion bash)`",
}


def _common(json_output: bool, *, config: bool = True) -> argparse.ArgumentParser:
    """The options shared by commands: ``--debug``; ``--config``, shown in the help only
    of commands that read the config (contract §2: every command takes it, so the others
    accept it and ignore it); ``--json`` for commands that print data."""
    # SUPPRESS keeps a value given before the command from being reset by the subparser.
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--config", default=argparse.SUPPRESS, metavar="PATH",
        help="config file (default: $STORA_GATEWAY_CONFIG, else "
        "/etc/stora-gateway/gateway.toml)" if config else argparse.SUPPRESS,
    )
    parent.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS,
        help="debug logging and tracebacks",
    )
    if json_output:
        parent.add_argument(
            "--json", action="store_true", default=argparse.SUPPRESS,
            help="print JSON instead of a table",
        )
    return parent


def product_command(argv: Sequence[str]) -> str | None:
    """The product command ``argv`` runs, or ``None`` when it may need the plugins'
    commands: none named, ``--help`` before one, a plugin's command or a misspelling
    (whose error lists every command).

    With a product command named, the parser leaves the plugins out: ``run`` then never
    loads the dev kit, whose parsers would stay in the agent's memory for nothing.
    """
    words = iter(argv)
    for word in words:
        if word == "--config":
            next(words, None)
        elif word in ("-h", "--help"):
            return None
        elif not word.startswith("-"):
            return word if word in COMMANDS else None
    return None


def build_parser(*, with_plugins: bool = True) -> argparse.ArgumentParser:
    """The argument parser for every command (the product's only, without plugins)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Smart-entry gateway for self-storage sites run on Stora.",
    )
    parser.add_argument("--config", default=None, metavar="PATH", help=argparse.SUPPRESS)
    parser.add_argument("--debug", action="store_true", default=False, help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true", default=False, help=argparse.SUPPRESS)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    data, plain = _common(True), _common(False)
    # Commands that never read the config: no --config in their help to mislead.
    bare, json_only = _common(False, config=False), _common(True, config=False)
    parents = {(True, True): data, (False, True): plain, (False, False): bare,
               (True, False): json_only}
    pending = list(plugins()) if with_plugins else []

    def add_plugins(before: str | None) -> None:
        """The plugins' commands listed before ``before`` (``None``: all that are left)."""
        for plugin in [p for p in pending if before is None or p.before == before]:
            pending.remove(plugin)
            common = parents[plugin.prints_json, plugin.reads_config]
            plugin.add_arguments(sub.add_parser(plugin.name, parents=[common],
                                                help=plugin.help, description=plugin.help),
                                 common)

    def add(name: str, parent: argparse.ArgumentParser) -> argparse.ArgumentParser:
        add_plugins(before=name)
        return sub.add_parser(
            name, parents=[parent], help=COMMANDS[name], description=COMMANDS[name]
        )

    add("run", plain)
    p = add("status", data)
    p.epilog = ("exit status: 0 OK; 3 DEGRADED (doors work, something needs a look); "
                "4 DOWN (remote commands are not executed, or no agent runs); 1 no report "
                "could be had (the agent answered with an error or not in time); 2 bad "
                "usage or config")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="after the summary, every field the agent reports")
    p = add("check-config", data)
    p.add_argument("--online", action="store_true",
                   help="also ask Stora: get a token with the configured credential and "
                   "look the timeline source up (exit 1 when either fails)")
    add_init_arguments(add("init", plain))
    add("ports", json_only)
    _add_scan(add("scan", data))
    add("locks", data)
    p = add("unlock", data)
    p.add_argument("unit", help="Stora unit id (unit_…) or the lock's reference label")
    p.add_argument("--seconds", type=float, default=None, help="seconds until relock")
    p.add_argument("--force", action="store_true", help="unlock a unit in lockout (audited)")
    p.add_argument("--reason", default=None, help="why --force is used (required with it)")
    p = add("lock", data)
    p.add_argument("unit", help="Stora unit id (unit_…) or the lock's reference label")
    _add_test(add("test", data))
    _add_outbox(add("outbox", data))
    p = add("clock", data)
    p.add_argument("--reset-floor", action="store_true",
                   help="set the trusted-time floor back to this release's build date, when "
                   "the clock is right but commands are refused clock_untrusted (logged and "
                   "raised as an alarm naming you)")
    _add_watch(add("watch", data))
    p = add("completion", bare)
    p.add_argument("shell", choices=["bash"], help="the shell to complete for")
    add_plugins(before=None)
    return parser


def _add_scan(p: argparse.ArgumentParser) -> None:
    p.add_argument("controller", help="controller name from the config")
    p.add_argument(
        "--addresses", metavar="A-B", default=None,
        help="address range to probe, e.g. 1-16 (default: the driver's whole range)",
    )
    p.add_argument(
        "--timeout-ms", type=int, default=None, metavar="MS",
        help="reply timeout per address (default: the driver's, 100)"
    )


def _add_test(p: argparse.ArgumentParser) -> None:
    p.epilog = ("Ctrl-C stops at once: the lock under test is relocked, the rest are "
                "cancelled, the results so far are printed, and the exit status is 130 "
                "(also on a hang-up or SIGTERM).  Exit 1 when a lock fails.")
    p.add_argument("units", nargs="*", metavar="UNIT", help="units or references to test")
    p.add_argument("--all", action="store_true", help="test every lock in the config")
    p.add_argument(
        "--seconds", type=float, default=1.0,
        help="how long each lock is held unlocked before the relock (default 1; a board "
        "that relocks by itself must hold it too; a lock board's fixed pulse is reported)"
    )
    p.add_argument(
        "--relock-timeout", type=float, default=10.0, metavar="S",
        help="how long to wait for a board that relocks by itself (default 10; shut the "
        "door of a locker latch meanwhile)",
    )


def _add_outbox(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", nargs="?", choices=["retry"], metavar="retry",
                   help="put dead-lettered events back in the queue (a new Idempotency-Key)")
    p.add_argument("id", nargs="?", type=int, metavar="ID",
                   help="with retry: the event id (seq) to retry")
    p.add_argument("--dead", action="store_true", help="list only dead-lettered events")
    p.add_argument("--all-dead", action="store_true",
                   help="with retry: every dead-lettered event")
    p.add_argument("--limit", type=int, default=100, metavar="N",
                   help="at most N events of each state (default 100)")


def _add_watch(p: argparse.ArgumentParser) -> None:
    p.add_argument("--username", default=None,
                   help="broker account of its own, never the agent's (default "
                   "$STORA_GATEWAY_WATCH_USERNAME, else gw-watch on a broker with accounts)")
    p.add_argument("--password-file", default=None, metavar="FILE",
                   help="file holding that account's password, not readable by others "
                   "(default $STORA_GATEWAY_WATCH_PASSWORD_FILE)")
    p.add_argument("--no-timeline", action="store_true",
                   help="do not read the outbox for Timeline Events")
    p.add_argument("--tls-cert-file", default=None, metavar="FILE",
                   help="watch's own TLS client certificate, never the agent's (default "
                   "$STORA_GATEWAY_WATCH_TLS_CERT_FILE; none: the CA of [mqtt] only)")
    p.add_argument("--tls-key-file", default=None, metavar="FILE",
                   help="its key, mode 600 (default $STORA_GATEWAY_WATCH_TLS_KEY_FILE)")


@functools.cache
def plugins() -> tuple[PluginCommand, ...]:
    """The commands plugins add (gateway/cli/plugins.py), found once per process."""
    return tuple(plugin_commands(reserved=COMMANDS))


def all_commands() -> dict[str, str]:
    """Every command, the product's and the plugins', with its one-line help."""
    return {**COMMANDS, **{p.name: p.help for p in plugins()}}
