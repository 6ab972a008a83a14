"""``stora-gateway``: the command line (contract §2).

A thin shell: each command builds what it needs from the config and calls a library
function (``gateway.technician``, ``gateway.hardware``), then prints a table for people
or JSON for machines.  Heavy modules are imported inside the commands that need them so
``stora-gateway --help`` stays quick on a Raspberry Pi.

Exit status: 0 success, 1 the operation failed (a lock did not confirm, hardware did not
answer), 2 bad usage or bad config.  Errors are one sentence on stderr; a traceback only
with ``--debug``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from gateway.config import Config, LockConfig
    from gateway.hardware import Site

PROG = "stora-gateway"
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

#: Every command and its one-line help; README.md must mention each (a test checks).
COMMANDS: dict[str, str] = {
    "check-config": "validate the configuration file and say what is wrong",
    "ports": "list the serial ports present (device, description, serial number)",
    "scan": "probe the addresses on one controller's bus and list what answers",
    "locks": "one row per lock: unit, reference, controller, state, door, lockout",
    "unlock": "unlock a unit for N seconds, confirm by read-back, then relock",
    "lock": "lock a unit now and confirm by read-back",
    "test": "unlock, confirm, relock, confirm: a pass/fail table with timings",
    "demo": "run the whole loop on this machine with simulated lock controllers",
}


class CliError(Exception):
    """A failure to report in one sentence with an exit status."""

    def __init__(self, message: str, status: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.status = status


# -- parser ---------------------------------------------------------------------------
def _common(json_output: bool) -> argparse.ArgumentParser:
    # SUPPRESS keeps a value given before the command from being reset by the subparser.
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--config", default=argparse.SUPPRESS, metavar="PATH",
        help="config file (default: $STORA_GATEWAY_CONFIG, else /etc/stora-gateway/gateway.toml)",
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

    def add(name: str, parent: argparse.ArgumentParser) -> argparse.ArgumentParser:
        return sub.add_parser(
            name, parents=[parent], help=COMMANDS[name], description=COMMANDS[name]
        )

    add("check-config", data)
    add("ports", data)
    p = add("scan", data)
    p.add_argument("controller", help="controller name from the config")
    p.add_argument(
        "--addresses", metavar="A-B", default=None,
        help="address range to probe, e.g. 1-16 (default: the driver's whole range)",
    )
    p.add_argument(
        "--timeout-ms", type=int, default=50, help="reply timeout per address (default 50)"
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
    p.add_argument("units", nargs="*", metavar="UNIT", help="units or references to test")
    p.add_argument("--all", action="store_true", help="test every lock in the config")
    p.add_argument(
        "--seconds", type=float, default=1.0, help="unlock duration per lock (default 1)"
    )
    p.add_argument(
        "--relock-timeout", type=float, default=10.0, metavar="S",
        help="how long to wait for a board that relocks by itself (default 10; shut the "
        "door of a locker latch meanwhile)",
    )
    p = add("demo", plain)
    p.add_argument("--pace", type=float, default=0.4, help="seconds between demo steps")
    return parser


# -- output helpers -----------------------------------------------------------------------
def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain text table, columns sized to fit."""
    cells = [[str(h) for h in headers], *[["-" if c is None else str(c) for c in r] for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _print_json(obj: Any, out: TextIO) -> None:
    out.write(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"


class Progress:
    """A progress bar on stderr for long work (a line per step when not a terminal)."""

    def __init__(self, total: int, stream: TextIO) -> None:
        self.total = total
        self.stream = stream
        self.done = 0
        self.tty = stream.isatty()

    def step(self, label: str) -> None:
        """Advance by one, naming the item."""
        self.done += 1
        width = 24
        filled = width * self.done // max(self.total, 1)
        bar = "#" * filled + "-" * (width - filled)
        text = f"[{bar}] {self.done}/{self.total} {label}"
        if self.tty:
            self.stream.write("\r" + text.ljust(60))
            if self.done == self.total:
                self.stream.write("\n")
        else:
            self.stream.write(text + "\n")
        self.stream.flush()


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
            raise CliError(f"unknown unit {text!r}: no lock in {config.path} has that unit id "
                           "or reference")
        return lock

    def site(self, only: Sequence[str] | None = None) -> Site:
        """Build the hardware (ports open lazily)."""
        from gateway.hardware import build_site

        return build_site(self.config(), only=only)


def cmd_check_config(ctx: Context) -> int:
    """``check-config``: load and validate; print a summary."""
    from gateway.config import config_path_from_env, load_config
    from gateway.errors import ConfigError

    path = config_path_from_env(ctx.args.config)
    try:
        config = load_config(path)
    except ConfigError as exc:
        if ctx.json:
            _print_json({"ok": False, "file": exc.file, "key": exc.key, "reason": exc.reason},
                        ctx.out)
            return EXIT_USAGE
        raise
    summary = {
        "ok": True,
        "file": str(config.path),
        "site": config.site.id,
        "controllers": len(config.controllers),
        "locks": len(config.locks),
    }
    if ctx.json:
        _print_json(summary, ctx.out)
    else:
        ctx.out.write(f"{config.path}: OK — site {config.site.id}, "
                      f"{len(config.controllers)} controllers, {len(config.locks)} locks\n")
    return EXIT_OK


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
    """``scan CONTROLLER``: probe the bus of one controller."""
    from gateway.hardware import scan_controller

    addresses = _parse_range(ctx.args.addresses) if ctx.args.addresses else None
    found = scan_controller(ctx.config(), ctx.args.controller, addresses,
                            timeout_s=ctx.args.timeout_ms / 1000)
    if ctx.json:
        _print_json({"controller": ctx.args.controller,
                     "found": [{"address": r.address, "description": r.description}
                               for r in found]}, ctx.out)
    elif not found:
        ctx.out.write(f"{ctx.args.controller}: nothing answered (check wiring, A/B polarity, "
                      "baud rate and termination: hardware.md)\n")
    else:
        ctx.out.write(table(["address", "answered"], [[r.address, r.description] for r in found])
                      + "\n")
    return EXIT_OK


def cmd_locks(ctx: Context) -> int:
    """``locks``: read every lock."""
    from gateway.technician import read_locks

    site = ctx.site()
    try:
        rows = read_locks(site, ctx.config().locks)
    finally:
        site.close()
    if ctx.json:
        _print_json([{"unit": r.unit, "reference": r.reference, "controller": r.controller,
                      "locked": r.locked, "door": r.door, "lockout": r.lockout,
                      "error": r.error} for r in rows], ctx.out)
    else:
        ctx.out.write(table(
            ["unit", "reference", "controller", "lock", "door", "lockout", "error"],
            [[r.unit, r.reference, r.controller, r.state, r.door,
              "?" if r.lockout is None else ("yes" if r.lockout else "no"), r.error]
             for r in rows]) + "\n")
        ctx.out.write("lockout: '?' = kept by the agent, which is not running (direct mode)\n")
    return EXIT_OK if all(r.error is None for r in rows) else EXIT_FAILED


def _outcome_dict(o: Any) -> dict[str, Any]:
    return {"unit": o.unit, "reference": o.reference, "action": o.action, "status": o.status,
            "detail": o.detail, "elapsed_ms": round(o.elapsed_ms, 1), "state": o.state,
            "door": o.door}


def _say(ctx: Context, o: Any) -> None:
    verdict = "confirmed" if o.ok else o.status.replace("_", " ")
    ctx.out.write(f"{o.reference} ({o.unit}): {o.action} {verdict} in {o.elapsed_ms:.0f} ms "
                  f"— lock {o.state}, door {o.door}; {o.detail}\n")


def cmd_unlock(ctx: Context) -> int:
    """``unlock UNIT``: a timed unlock; relocks after the time unless the board does."""
    import time

    from gateway import technician

    if ctx.args.force and not (ctx.args.reason or "").strip():
        raise CliError("--force needs --reason TEXT (it is audited)")
    lock = ctx.find_lock(ctx.args.unit)
    seconds = ctx.args.seconds if ctx.args.seconds is not None else lock.unlock_seconds
    if not 0 < seconds <= 3600:
        raise CliError("--seconds must be between 0 and 3600")
    site = ctx.site(only=[lock.controller])
    results = []
    try:
        opened = technician.unlock(site, lock, seconds)
        results.append(opened)
        if not ctx.json:
            _say(ctx, opened)
        if not opened.self_relocking:
            # Direct mode owns the relock timer; Ctrl-C relocks at once rather than
            # leaving the door open.
            if not ctx.json:
                ctx.out.write(f"relocking in {seconds:g} s (Ctrl-C relocks now)\n")
                ctx.out.flush()
            try:
                time.sleep(seconds)
            except KeyboardInterrupt:
                ctx.err.write("interrupted: relocking now\n")
            closed = technician.relock(site, lock)
            results.append(closed)
            if not ctx.json:
                _say(ctx, closed)
    finally:
        site.close()
    if ctx.json:
        _print_json([_outcome_dict(o) for o in results], ctx.out)
    return EXIT_OK if all(o.ok for o in results) else EXIT_FAILED


def cmd_lock(ctx: Context) -> int:
    """``lock UNIT``: lock now."""
    from gateway import technician

    lock = ctx.find_lock(ctx.args.unit)
    site = ctx.site(only=[lock.controller])
    try:
        outcome = technician.relock(site, lock)
    finally:
        site.close()
    if ctx.json:
        _print_json(_outcome_dict(outcome), ctx.out)
    else:
        _say(ctx, outcome)
    return EXIT_OK if outcome.ok else EXIT_FAILED


def cmd_test(ctx: Context) -> int:
    """``test UNIT… | --all``: the test cycle with a pass/fail table."""
    from gateway import technician

    config = ctx.config()
    if ctx.args.all and ctx.args.units:
        raise CliError("give units or --all, not both")
    if not ctx.args.all and not ctx.args.units:
        raise CliError("name at least one unit, or use --all")
    locks = list(config.locks) if ctx.args.all else [ctx.find_lock(u) for u in ctx.args.units]
    site = ctx.site(only=sorted({lock.controller for lock in locks}))
    progress = Progress(len(locks), ctx.err) if ctx.args.all and not ctx.json else None
    results = []
    try:
        for lock in locks:
            results.append(technician.run_test_cycle(
                site, lock, ctx.args.seconds, relock_timeout_s=ctx.args.relock_timeout
            ))
            if progress:
                progress.step(lock.reference)
    finally:
        site.close()
    passed = all(r.passed for r in results)
    if ctx.json:
        _print_json({"passed": passed, "results": [
            {"unit": r.unit, "reference": r.reference, "passed": r.passed,
             "unlock_ms": None if r.unlock_ms is None else round(r.unlock_ms, 1),
             "relock_ms": None if r.relock_ms is None else round(r.relock_ms, 1),
             "detail": r.detail} for r in results]}, ctx.out)
    else:
        ctx.out.write(table(
            ["unit", "reference", "result", "unlock", "relock", "detail"],
            [[r.unit, r.reference, "PASS" if r.passed else "FAIL", _ms(r.unlock_ms),
              _ms(r.relock_ms), r.detail] for r in results]) + "\n")
        failed = sum(not r.passed for r in results)
        ctx.out.write(f"{len(results) - failed} passed, {failed} failed\n")
    return EXIT_OK if passed else EXIT_FAILED


def cmd_demo(ctx: Context) -> int:
    """``demo``: the simulated site."""
    from gateway.demo import run_demo

    return run_demo(ctx.out, pace=ctx.args.pace)


HANDLERS: dict[str, Callable[[Context], int]] = {
    "check-config": cmd_check_config,
    "ports": cmd_ports,
    "scan": cmd_scan,
    "locks": cmd_locks,
    "unlock": cmd_unlock,
    "lock": cmd_lock,
    "test": cmd_test,
    "demo": cmd_demo,
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
    ctx = Context(args, out, err)
    from drivers.errors import DriverError
    from gateway.errors import GatewayError

    try:
        return HANDLERS[args.command](ctx)
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
