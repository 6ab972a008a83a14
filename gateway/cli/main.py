"""``stora-gateway``: the command line (README, "The command line").

A thin shell: each command builds what it needs from the config and calls a library
function (``gateway.ops.technician``, ``gateway.units.hardware``), then prints a table for people
or JSON for machines.  Heavy modules are imported inside the commands that need them so
``stora-gateway --help`` stays quick on a Raspberry Pi.

``locks``, ``unlock``, ``lock``, ``test`` and ``status`` ask a running agent first,
through its control socket (``gateway.ops.control``), so a technician's action queues behind
remote commands and is audited like them.  Only when no agent answers do the first four
open the hardware themselves ("direct mode"); the output is the same either way, table
and ``--json``, so scripts need not care which mode ran.

Exit status: 0 success, 1 the operation failed (a lock did not confirm, hardware did not
answer), 2 bad usage or bad config; ``status`` also exits 3 when the site is DEGRADED and
4 when it is DOWN (``gateway/cli/status.py``); a command interrupted with Ctrl-C exits
130 (``test`` after relocking the lock under test and cancelling the rest).  Errors are
one sentence on stderr; a traceback only with ``--debug``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from gateway.cli.plugins import PluginCommand
    from gateway.config import Config, LockConfig
    from gateway.units.hardware import Site

LOGGER = logging.getLogger(__name__)

PROG = "stora-gateway"
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

#: How long the CLI waits for the agent's answer (after which it says the agent "may
#: still be acting", and never falls back to direct mode).  An unlock or lock waits in
#: the unit's queue for up to two minutes (``gateway.agent.CONTROL_WAIT_S``) first.
AGENT_ACTION_S = 180.0
#: ``status`` and ``locks`` only read; a minute covers every controller timing out.
AGENT_READ_S = 60.0
#: ``test``: on top of ``AGENT_ACTION_S``, per lock its unlock time, its relock timeout
#: and this for the bus's retries.
AGENT_TEST_MARGIN_S = 15.0

#: The product's commands and their one-line help; README.md must mention each, and each
#: command a plugin adds (the dev kit's ``demo``, ``sandbox``, ``simulate``, ``selftest``:
#: gateway/cli/plugins.py); tests check both.
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


class CliError(Exception):
    """A failure to report in one sentence with an exit status."""

    def __init__(self, message: str, status: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.status = status


# -- parser ---------------------------------------------------------------------------
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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every command."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Smart-entry gateway for self-storage sites run on Stora.",
    )
    parser.add_argument("--config", default=None, metavar="PATH", help=argparse.SUPPRESS)
    parser.add_argument("--debug", action="store_true", default=False, help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true", default=False, help=argparse.SUPPRESS)
    from gateway import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    data, plain = _common(True), _common(False)
    # Commands that never read the config: no --config in their help to mislead.
    bare, json_only = _common(False, config=False), _common(True, config=False)
    parents = {(True, True): data, (False, True): plain, (False, False): bare,
               (True, False): json_only}
    plugins = list(_plugins())

    def add_plugins(before: str | None) -> None:
        """The plugins' commands listed before ``before`` (``None``: all that are left)."""
        for plugin in [p for p in plugins if before is None or p.before == before]:
            plugins.remove(plugin)
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
    from gateway.cli.init_options import add_arguments as add_init_arguments

    add_init_arguments(add("init", plain))
    add("ports", json_only)
    p = add("scan", data)
    p.add_argument("controller", help="controller name from the config")
    p.add_argument(
        "--addresses", metavar="A-B", default=None,
        help="address range to probe, e.g. 1-16 (default: the driver's whole range)",
    )
    p.add_argument(
        "--timeout-ms", type=int, default=None, metavar="MS",
        help="reply timeout per address (default: the driver's, 100)"
    )
    add("locks", data)
    p = add("unlock", data)
    p.add_argument("unit", help="Stora unit id (unit_…) or the lock's reference label")
    p.add_argument("--seconds", type=float, default=None, help="seconds until relock")
    p.add_argument("--force", action="store_true", help="unlock a unit in lockout (audited)")
    p.add_argument("--reason", default=None, help="why --force is used (required with it)")
    p = add("lock", data)
    p.add_argument("unit", help="Stora unit id (unit_…) or the lock's reference label")
    p = add("test", data)
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
    p = add("outbox", data)
    p.add_argument("action", nargs="?", choices=["retry"], metavar="retry",
                   help="put dead-lettered events back in the queue (a new Idempotency-Key)")
    p.add_argument("id", nargs="?", type=int, metavar="ID",
                   help="with retry: the event id (seq) to retry")
    p.add_argument("--dead", action="store_true", help="list only dead-lettered events")
    p.add_argument("--all-dead", action="store_true",
                   help="with retry: every dead-lettered event")
    p.add_argument("--limit", type=int, default=100, metavar="N",
                   help="at most N events of each state (default 100)")
    p = add("clock", data)
    p.add_argument("--reset-floor", action="store_true",
                   help="set the trusted-time floor back to this release's build date, when "
                   "the clock is right but commands are refused clock_untrusted (logged and "
                   "raised as an alarm naming you)")
    p = add("watch", data)
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
    p = add("completion", bare)
    p.add_argument("shell", choices=["bash"], help="the shell to complete for")
    add_plugins(before=None)
    return parser


@functools.cache
def _plugins() -> tuple[PluginCommand, ...]:
    """The commands plugins add (gateway/cli/plugins.py), found once per process."""
    from gateway.cli.plugins import plugin_commands

    return tuple(plugin_commands(reserved=COMMANDS))


def all_commands() -> dict[str, str]:
    """Every command, the product's and the plugins', with its one-line help."""
    return {**COMMANDS, **{p.name: p.help for p in _plugins()}}


# -- output helpers -----------------------------------------------------------------------
def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain text table, columns sized to fit; PASS/FAIL, verdicts and lock states
    coloured on a terminal (gateway/term.py)."""
    from gateway.term import table as term_table

    return term_table(headers, rows)


def _print_json(obj: Any, out: TextIO) -> None:
    out.write(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"


# -- commands -----------------------------------------------------------------------------
class Context:
    """What a command needs: parsed args, streams, and the config loaded on demand."""

    def __init__(self, args: argparse.Namespace, out: TextIO, err: TextIO) -> None:
        self.args = args
        self.out = out
        self.err = err
        self._config: Config | None = None

    @property
    def json(self) -> bool:
        """True when the user asked for JSON."""
        return bool(getattr(self.args, "json", False))

    def config(self) -> Config:
        """Load the config (errors become a one-line message, exit 2)."""
        if self._config is None:
            from gateway.config import config_path_from_env, load_config

            self._config = load_config(config_path_from_env(self.args.config))
        return self._config

    def find_lock(self, text: str) -> LockConfig:
        """A lock by unit id or reference, or a usage error naming the config file."""
        config = self.config()
        lock = config.lock_by_id(text)
        if lock is None:
            from gateway.ops.technician import unknown_unit_message

            raise CliError(unknown_unit_message(config, text))  # with the near matches
        return lock

    def site(self, only: Sequence[str] | None = None) -> Site:
        """Build the hardware (ports open lazily)."""
        from gateway.units.hardware import build_site

        return build_site(self.config(), only=only)

    def ask_agent(self, method: str, timeout: float, **params: Any) -> dict[str, Any]:
        """Ask the running agent; ``AgentUnavailable`` when none answers.

        A refusal is a usage error (exit 2); an error the agent answered with keeps its
        status.  ``timeout`` bounds the wait for the answer, sized to the work asked for.
        """
        from gateway.ops.control import ControlClient, ControlDenied, ControlError

        client = ControlClient(self.config().control.socket, timeout=timeout)
        try:
            return client.call(method, **params)
        except ControlDenied as exc:
            raise CliError(str(exc), EXIT_USAGE) from exc
        except ControlError as exc:
            raise CliError(str(exc), exc.status) from exc

    def through_agent(self, method: str, timeout: float, **params: Any) -> dict[str, Any] | None:
        """:meth:`ask_agent`, or ``None`` when no agent answers (the caller goes direct).

        Only "nobody answered the connection" falls back: once the request is sent, the
        agent may be acting on it, and a second actor on the bus is what the socket is
        there to prevent.
        """
        from gateway.ops.control import AgentUnavailable

        try:
            return self.ask_agent(method, timeout, **params)
        except AgentUnavailable as exc:
            LOGGER.debug("agent not running (%s): direct mode", exc)
            return None


def cmd_check_config(ctx: Context) -> int:
    """``check-config [--online]``: every problem of the file, one line each (exit 2);
    with ``--online`` also the credential and timeline source at Stora (exit 1)."""
    from gateway.cli.check_config import run_check_config
    from gateway.config import config_path_from_env

    return run_check_config(config_path_from_env(ctx.args.config), as_json=ctx.json,
                            online=bool(getattr(ctx.args, "online", False)), out=ctx.out,
                            err=ctx.err, prog=PROG)


def cmd_init(ctx: Context) -> int:
    """``init``: write a first config to ``--config`` from flags, asking on a terminal for
    what they leave out; refuses to overwrite anything (exit 2)."""
    from gateway.cli.init_config import InitError, run_init
    from gateway.config import config_path_from_env

    try:
        return run_init(ctx.args, config_path_from_env(ctx.args.config), stdin=sys.stdin,
                        out=ctx.out, err=ctx.err, prog=PROG)
    except InitError as exc:
        raise CliError(str(exc), EXIT_USAGE) from exc


def cmd_ports(ctx: Context) -> int:
    """``ports``: serial ports present."""
    from serial.tools import list_ports

    ports = [
        {"device": p.device, "description": p.description, "serial_number": p.serial_number}
        for p in sorted(list_ports.comports(), key=lambda p: p.device)
    ]
    if ctx.json:
        _print_json(ports, ctx.out)
    elif not ports:
        ctx.out.write("no serial ports found (is the USB RS-485 adapter plugged in?)\n")
    else:
        ctx.out.write(table(["device", "description", "serial number"],
                            [[p["device"], p["description"], p["serial_number"]] for p in ports])
                      + "\n")
    return EXIT_OK


def _parse_range(text: str) -> range:
    try:
        lo, _, hi = text.partition("-")
        start, end = int(lo), int(hi or lo)
    except ValueError:
        raise CliError(f"--addresses {text!r}: expected a range like 1-16") from None
    if start < 0 or end < start or end > 255:
        raise CliError(f"--addresses {text!r}: expected 0 ≤ A ≤ B ≤ 255")
    return range(start, end + 1)


def cmd_scan(ctx: Context) -> int:
    """``scan CONTROLLER``: probe the bus of one controller (gateway/cli/technician.py)."""
    from gateway.cli.technician import run_scan

    return run_scan(ctx)


def _actor() -> str:
    """Who is acting, for the agent's audit trail: ``technician alice (uid 1000)``.

    Only a claim: the agent also sees the caller's uid from the kernel.  Under sudo the
    person behind root is named, since "root" tells an auditor nothing.
    """
    import os
    import pwd

    uid = os.getuid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = str(uid)
    sudo_user = os.environ.get("SUDO_USER")
    if uid == 0 and sudo_user:
        return f"technician {sudo_user} (uid {uid}, via sudo)"
    return f"technician {name} (uid {uid})"


def _items(answer: Mapping[str, Any], key: str) -> list[dict[str, Any]]:
    """``answer[key]`` as a list of objects, or a one-line error (exit 1)."""
    items = answer.get(key)
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise CliError(f"the agent's answer lacks {key!r}", EXIT_FAILED)
    return items


def _round_ms(value: Any) -> Any:
    return round(value, 1) if isinstance(value, int | float) else value


def _yes_no(value: object) -> str:
    return "?" if value is None else ("yes" if value else "no")


#: The keys of one ``locks --json`` row, in order, in both modes.
LOCK_KEYS = ("unit", "reference", "controller", "locked", "door", "lockout", "error")
#: The keys of one unlock/lock outcome in ``--json``, in both modes.
OUTCOME_KEYS = ("unit", "reference", "action", "status", "detail", "elapsed_ms", "state",
                "door")
#: The keys of one ``test --json`` result, in both modes.
TEST_KEYS = ("unit", "reference", "passed", "unlock_ms", "held_ms", "relock_ms", "detail")


def _shape(item: Mapping[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    """``item`` with exactly ``keys``, in order, timings rounded as in direct mode."""
    return {k: _round_ms(item.get(k)) if k.endswith("_ms") else item.get(k) for k in keys}


def cmd_locks(ctx: Context) -> int:
    """``locks``: read every lock (through the agent, which also knows the lockouts)."""
    answer = ctx.through_agent("locks", AGENT_READ_S)
    if answer is not None:
        rows = [_shape(r, LOCK_KEYS) for r in _items(answer, "locks")]
    else:
        from gateway.ops.technician import read_locks

        site = ctx.site()
        try:
            found = read_locks(site, ctx.config().locks)
        finally:
            site.close()
        rows = [{"unit": r.unit, "reference": r.reference, "controller": r.controller,
                 "locked": r.locked, "door": r.door, "lockout": r.lockout, "error": r.error}
                for r in found]
    if ctx.json:
        _print_json(rows, ctx.out)
    else:
        ctx.out.write(table(
            ["unit", "reference", "controller", "lock", "door", "lockout", "error"],
            [[r["unit"], r["reference"], r["controller"],
              "unknown" if r["locked"] is None else ("locked" if r["locked"] else "unlocked"),
              r["door"], _yes_no(r["lockout"]), r["error"]] for r in rows]) + "\n")
        if answer is None:
            ctx.out.write("lockout: '?' = kept by the agent, which is not running "
                          "(direct mode)\n")
    return EXIT_OK if all(r["error"] is None for r in rows) else EXIT_FAILED


def _outcome_dict(o: Any) -> dict[str, Any]:
    return {"unit": o.unit, "reference": o.reference, "action": o.action, "status": o.status,
            "detail": o.detail, "elapsed_ms": round(o.elapsed_ms, 1), "state": o.state,
            "door": o.door}


def _say(ctx: Context, o: Mapping[str, Any]) -> None:
    status = str(o["status"])
    verdict = "confirmed" if status == "done" else status.replace("_", " ")
    elapsed = o["elapsed_ms"]
    took = f"{elapsed:.0f} ms" if isinstance(elapsed, int | float) else "-"
    ctx.out.write(f"{o['reference']} ({o['unit']}): {o['action']} {verdict} in {took} "
                  f"— lock {o['state']}, door {o['door']}; {o['detail']}\n")


def cmd_unlock(ctx: Context) -> int:
    """``unlock UNIT``: a timed unlock; relocks after the time unless the board does.

    Through the agent, the agent owns the relock timer and the lockout check; directly,
    this process waits and relocks, at once on Ctrl-C, a hang-up or SIGTERM (exit 130).
    """
    if ctx.args.force and not (ctx.args.reason or "").strip():
        raise CliError("--force needs --reason TEXT (it is audited)")
    if ctx.args.seconds is not None and not 0 < ctx.args.seconds <= 3600:
        raise CliError("--seconds must be between 0 and 3600")
    wanted = ctx.args.seconds
    answer = ctx.through_agent(
        "unlock", AGENT_ACTION_S, unit=ctx.args.unit,
        # Whole seconds travel as integers, like a command's ``dur``.
        seconds=int(wanted) if wanted is not None and float(wanted).is_integer() else wanted,
        force=bool(ctx.args.force), reason=ctx.args.reason, actor=_actor(),
    )
    interrupted = False
    if answer is not None:
        results = [_shape(o, OUTCOME_KEYS) for o in _items(answer, "outcomes")]
        if not ctx.json:
            for o in results:
                _say(ctx, o)
            if results and results[-1]["action"] == "unlock" and results[-1]["status"] == "done":
                after = "its unlock time" if wanted is None else f"{wanted:g} s"
                ctx.out.write(f"the agent relocks it after {after}\n")
    else:
        results, interrupted = _unlock_direct(ctx)
    if ctx.json:
        _print_json(results, ctx.out)
    if interrupted:
        from gateway.cli.technician import EXIT_INTERRUPTED

        return EXIT_INTERRUPTED
    return EXIT_OK if all(o["status"] == "done" for o in results) else EXIT_FAILED


def _unlock_direct(ctx: Context) -> tuple[list[dict[str, Any]], bool]:
    """The unlock on the hardware itself: the outcomes and whether a signal cut it short."""
    import threading

    from gateway.cli.technician import interrupts_set
    from gateway.ops import technician

    lock = ctx.find_lock(ctx.args.unit)
    seconds = ctx.args.seconds if ctx.args.seconds is not None else lock.unlock_seconds
    site = ctx.site(only=[lock.controller])
    results = []
    stop = threading.Event()
    try:
        # Direct mode owns the relock: from before the unlock's bus transaction to the
        # relock's read-back, Ctrl-C, a hang-up or SIGTERM relocks at once instead of
        # killing this process with the door open (no agent would relock it).
        with interrupts_set(stop):
            opened = technician.unlock(site, lock, seconds)
            results.append(_outcome_dict(opened))
            if not ctx.json:
                _say(ctx, results[-1])
            if not opened.ok or (opened.self_relocking and stop.is_set()):
                # Nothing to hold, or no one wants it held: whatever state the lock is
                # in, lock it now (ending a board's pulse where the board allows it).
                results.append(_outcome_dict(technician.relock(site, lock)))
                if not ctx.json:
                    _say(ctx, results[-1])
            elif not opened.self_relocking:
                if not ctx.json:
                    ctx.out.write(f"relocking in {seconds:g} s (Ctrl-C relocks now)\n")
                    ctx.out.flush()
                if stop.wait(seconds):
                    ctx.err.write("interrupted: relocking now\n")
                results.append(_outcome_dict(technician.relock(site, lock)))
                if not ctx.json:
                    _say(ctx, results[-1])
    finally:
        site.close()
    return results, stop.is_set()


def cmd_lock(ctx: Context) -> int:
    """``lock UNIT``: lock now."""
    answer = ctx.through_agent("lock", AGENT_ACTION_S, unit=ctx.args.unit, actor=_actor())
    if answer is not None:
        outcome = answer.get("outcome")
        if not isinstance(outcome, dict):
            raise CliError("the agent's answer lacks 'outcome'", EXIT_FAILED)
        result = _shape(outcome, OUTCOME_KEYS)
    else:
        from gateway.ops import technician

        lock = ctx.find_lock(ctx.args.unit)
        site = ctx.site(only=[lock.controller])
        try:
            result = _outcome_dict(technician.relock(site, lock))
        finally:
            site.close()
    if ctx.json:
        _print_json(result, ctx.out)
    else:
        _say(ctx, result)
    return EXIT_OK if result["status"] == "done" else EXIT_FAILED


def cmd_test(ctx: Context) -> int:
    """``test UNIT… | --all``: the test cycle with a pass/fail table (progress, Ctrl-C:
    gateway/cli/technician.py)."""
    from gateway.cli.technician import run_test

    return run_test(ctx)


#: The order of ``status`` sections; any other section the agent sends follows them.
STATUS_SECTIONS = ("agent", "broker", "outbox", "controllers", "clock", "host", "commands")


def _value(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if value is None:
        return "-"
    if isinstance(value, list | tuple):
        return ", ".join(_value(v) for v in value) or "-"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_value(v)}" for k, v in value.items()) or "-"
    return str(value)


def _bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError  # not reached


def _field(key: object, value: object) -> str:
    """A status value for people: sizes in KiB/MiB/GiB, ages in s/min/h, °C."""
    name = str(key)
    if isinstance(value, str):  # an error text from a device: keep the table's rows whole
        return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return _value(value)
    if name.endswith("_bytes"):
        return _bytes(int(value))
    if name == "uptime_s" or name.endswith("_age_s"):
        return _age(value)
    if name == "cpu_temp_c":
        return f"{value:.1f} °C"
    return _value(value)


def render_status(status: Mapping[str, Any]) -> str:
    """``status`` for people: one section per part, ``key  value`` lines, tables for lists.

    The agent's answer is free-form; top-level plain values go under "agent".
    """
    sections: dict[str, Any] = {}
    loose = {k: v for k, v in status.items() if not isinstance(v, dict | list)}
    agent = status.get("agent")
    sections["agent"] = {**loose, **agent} if isinstance(agent, dict) else loose
    for key, value in status.items():
        if key != "agent" and isinstance(value, dict | list):
            sections[key] = value
    order = [k for k in STATUS_SECTIONS if k in sections]
    order += [k for k in sections if k not in STATUS_SECTIONS]
    parts = []
    for name in order:
        body = sections[name]
        if isinstance(body, dict):
            if not body:
                continue
            width = max(len(str(k)) for k in body)
            lines = [f"  {str(k).ljust(width)}  {_field(k, v)}" for k, v in body.items()]
        elif body and all(isinstance(item, dict) for item in body):
            headers = list(dict.fromkeys(k for item in body for k in item))
            rendered = table(headers, [[_field(h, item.get(h)) for h in headers]
                                       for item in body])
            lines = ["  " + line for line in rendered.splitlines()]
        else:
            lines = [f"  {_value(body)}"]
        parts.append("\n".join([name, *lines]))
    return "\n\n".join(parts) + "\n"


def cmd_status(ctx: Context) -> int:
    """``status``: the verdict (OK, DEGRADED, DOWN) and why, then the details; exit 0, 3
    or 4 by the verdict (gateway/cli/status.py)."""
    from gateway.cli.status import run_status

    return run_status(ctx)


def cmd_completion(ctx: Context) -> int:
    """``completion bash``: the completion script, made from this parser."""
    from gateway.cli.completion import bash_script

    ctx.out.write(bash_script(build_parser(), PROG))
    return EXIT_OK


def _age(seconds: object) -> str:
    if not isinstance(seconds, int | float):
        return "-"
    s = int(seconds)
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    return f"{s // 3600} h {s % 3600 // 60} min"


def _event_error(event: Mapping[str, Any]) -> str:
    error = event.get("error")
    if isinstance(error, dict):
        text = f"{error.get('status') or '-'} {error.get('code')}: {error.get('message')}"
        details = "; ".join(f"{d.get('pointer') or '-'} {d.get('message')}"
                            for d in error.get("details") or () if isinstance(d, dict))
        return f"{text} ({details})" if details else text
    return str(event.get("last_error") or "-")


def _outbox_direct_list(ctx: Context, dead_only: bool, limit: int) -> dict[str, Any]:
    """The outbox read straight from the database, read-only (no agent running)."""
    import time

    from gateway.store import Store

    path = ctx.config().storage.path
    if not path.exists():
        return {"summary": {"pending": 0, "oldest_age_s": None, "dead": 0,
                            "drain": "agent not running"}, "events": []}
    with Store(path, read_only=True) as store:
        summary = {**store.outbox_summary(time.time()), "drain": "agent not running"}
        rows = store.events(state="dead", limit=limit)
        if not dead_only:
            rows = store.events(state="pending", limit=limit) + rows
        return {"summary": summary, "events": [r.as_dict() for r in rows]}


def cmd_outbox(ctx: Context) -> int:
    """``outbox [--dead]`` lists; ``outbox retry ID|--all-dead`` re-queues dead letters.

    Through the agent when it runs; else straight on the database (read-only to list).
    """
    a = ctx.args
    if a.action == "retry":
        if (a.id is None) == (not a.all_dead):
            raise CliError("outbox retry needs an event ID or --all-dead (one of them)")
        params: dict[str, Any] = {"all_dead": True} if a.all_dead else {"seq": a.id}
        answer = ctx.through_agent("outbox.retry", AGENT_READ_S, **params)
        if answer is None:
            from gateway.store import Store

            with Store(ctx.config().storage.path) as store:
                retried = store.retry_dead(None if a.all_dead else a.id)
            if a.id is not None and not retried:
                raise CliError(f"no dead-lettered event {a.id} (see `outbox --dead`)",
                               EXIT_FAILED)
            answer = {"retried": retried}
        retried = list(answer.get("retried") or [])
        if ctx.json:
            _print_json({"retried": retried}, ctx.out)
        elif retried:
            from gateway.term import plural

            ctx.out.write(f"{plural(len(retried), 'event')} queued again under a new key: "
                          f"{', '.join(str(r) for r in retried)}\n")
        else:
            ctx.out.write("no dead-lettered events\n")
        return EXIT_OK
    if a.id is not None or a.all_dead:
        raise CliError("an event ID and --all-dead go with `outbox retry`")
    if not 0 < a.limit <= 10_000:
        raise CliError("--limit must be from 1 to 10000")
    answer = ctx.through_agent("outbox.list", AGENT_READ_S, dead=bool(a.dead), limit=a.limit)
    if answer is None:
        answer = _outbox_direct_list(ctx, bool(a.dead), a.limit)
    if ctx.json:
        _print_json(answer, ctx.out)
        return EXIT_OK
    summary = answer.get("summary") or {}
    oldest = _age(summary.get("oldest_age_s"))
    ctx.out.write(f"pending {summary.get('pending', 0)} (oldest {oldest}), "
                  f"dead {summary.get('dead', 0)}, drain: {summary.get('drain', '-')}\n")
    events = list(answer.get("events") or [])
    if events:
        ctx.out.write(table(
            ["id", "state", "unit", "reference", "kind", "occurred", "attempts", "error"],
            [[e.get("seq"), e.get("state"), e.get("unit"), e.get("reference"), e.get("kind"),
              e.get("occurred_at"), e.get("attempts"), _event_error(e)] for e in events])
            + "\n")
    return EXIT_OK


def cmd_clock(ctx: Context) -> int:
    """``clock [--reset-floor]``: the clock's trust and floor, or reset the floor.

    Through the agent when it runs (it resets its own floor, saves it and raises the
    alarm); else straight on the database: the floor the next start will use, and a reset
    the next start reports as an alarm.
    """
    if ctx.args.reset_floor:
        answer = ctx.through_agent("clock.reset_floor", AGENT_READ_S, actor=_actor())
        result = ({**answer, "through_agent": True} if answer is not None
                  else _reset_floor_direct(ctx))
        if ctx.json:
            _print_json(result, ctx.out)
        else:
            ctx.out.write(f"trusted-time floor reset from {result.get('previous') or 'unset'} "
                          f"to {result.get('floor')} by {result.get('actor')}"
                          f"{'' if result.get('saved') else ' (NOT saved: see the agent log)'}"
                          "\n")
        return EXIT_OK if result.get("saved") else EXIT_FAILED
    status = ctx.through_agent("status", AGENT_READ_S)
    if status is not None:
        clock = status.get("clock")
        if not isinstance(clock, dict):
            raise CliError("the agent's answer lacks 'clock'", EXIT_FAILED)
    else:
        clock = _clock_direct(ctx)
    if ctx.json:
        _print_json(clock, ctx.out)
    else:
        ctx.out.write(render_status({"clock": clock}))
    return EXIT_OK


def _clock_direct(ctx: Context) -> dict[str, Any]:
    """The saved floor read from the database, read-only (no agent running)."""
    from gateway.clock import stored_floor
    from gateway.store import Store

    path = ctx.config().storage.path
    if not path.exists():
        return stored_floor(None)
    with Store(path, read_only=True) as store:
        return stored_floor(store)


def _reset_floor_direct(ctx: Context) -> dict[str, Any]:
    """Reset the saved floor in the database (no agent running)."""
    from gateway.clock import BUILD_FLOOR, reset_stored_floor, rfc3339
    from gateway.store import Store, StoreError

    path = ctx.config().storage.path
    if not path.exists():  # nothing saved: the build date is the floor already
        return {"previous": None, "floor": rfc3339(BUILD_FLOOR, timespec="seconds"),
                "actor": _actor(), "saved": True, "through_agent": False}
    try:
        with Store(path) as store:
            return reset_stored_floor(store, _actor())
    except StoreError as exc:
        raise CliError(f"the floor was not reset: {exc}", EXIT_FAILED) from exc


def cmd_run(ctx: Context) -> int:
    """``run``: the agent in the foreground until SIGTERM or Ctrl-C."""
    config = ctx.config()  # a bad config is exit 2 before anything starts
    from gateway.agent import run_agent

    return run_agent(config, debug=bool(getattr(ctx.args, "debug", False)))


def cmd_watch(ctx: Context) -> int:
    """``watch``: the site live, one line (or JSON object) per event (gateway/cli/watch.py)."""
    from gateway.cli.watch import WATCH_ACCOUNT, WATCH_PASSWORD_ENV, WATCH_USER_ENV, run_watch
    from gateway.link.site_client import SiteLinkError, resolve_account

    a = ctx.args
    try:
        account = resolve_account(ctx.config(), a.username, a.password_file,
                                  default_user=WATCH_ACCOUNT, user_env=WATCH_USER_ENV,
                                  password_env=WATCH_PASSWORD_ENV)
        return run_watch(ctx.config(), account, ctx.out, ctx.err, json_lines=ctx.json,
                         timeline=not a.no_timeline, tls_cert_file=a.tls_cert_file,
                         tls_key_file=a.tls_key_file)
    except SiteLinkError as exc:
        raise CliError(str(exc), exc.status) from exc


HANDLERS: dict[str, Callable[[Context], int]] = {
    "run": cmd_run,
    "status": cmd_status,
    "check-config": cmd_check_config,
    "init": cmd_init,
    "ports": cmd_ports,
    "scan": cmd_scan,
    "locks": cmd_locks,
    "unlock": cmd_unlock,
    "lock": cmd_lock,
    "test": cmd_test,
    "outbox": cmd_outbox,
    "watch": cmd_watch,
    "clock": cmd_clock,
    "completion": cmd_completion,
}


def main(argv: Sequence[str] | None = None, out: TextIO | None = None,
         err: TextIO | None = None) -> int:
    """Run the CLI; returns the exit status."""
    out = out or sys.stdout
    err = err or sys.stderr
    parser = build_parser()
    try:
        # argparse writes --help and usage errors to sys.stdout/stderr: send them to ours.
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return int(exc.code or 0)
    if args.command is None:
        parser.print_help(out)
        return EXIT_USAGE
    debug = bool(getattr(args, "debug", False))
    if args.command != "run":  # the agent sets up its own logging, at INFO
        logging.basicConfig(
            # The CLI reports failures itself; driver warnings would only repeat them.
            level=logging.DEBUG if debug else logging.ERROR,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s" if debug else
            f"{PROG}: %(message)s",
            stream=err,
        )
    if not debug:
        # pymodbus logs every timed-out attempt as an ERROR; the driver reports the
        # outcome after its retries, once.
        logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    from gateway.term import use_colour, wants_colour

    use_colour(wants_colour(out))  # never when piped, NO_COLOR or TERM=dumb
    ctx = Context(args, out, err)
    from drivers.errors import DriverError
    from gateway.errors import GatewayError

    try:
        handler = HANDLERS.get(args.command)
        if handler is None:  # a plugin's command (gateway/cli/plugins.py)
            handler = next(p.run for p in _plugins() if p.name == args.command)
        return handler(ctx)
    except CliError as exc:
        err.write(f"{PROG}: {exc}\n")
        return exc.status
    except DriverError as exc:  # the hardware did not answer or refused
        if debug:
            raise
        err.write(f"{PROG}: hardware error: {exc}\n")
        return EXIT_FAILED
    except GatewayError as exc:  # config errors and the like: the user's to fix
        if debug:
            raise
        err.write(f"{PROG}: {exc}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        err.write(f"{PROG}: interrupted\n")
        return 130
    except Exception as exc:
        if debug:
            raise
        err.write(f"{PROG}: {type(exc).__name__}: {exc} (run with --debug for details)\n")
        return EXIT_FAILED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
