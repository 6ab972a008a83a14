"""``stora-gateway``: the command line (README, "The command line").

A thin shell: each command builds what it needs from the config and calls a library
function (``gateway.ops.technician``, ``gateway.units.hardware``), then prints a table for people
or JSON for machines.  The parser is ``gateway/cli/parser.py``; what runs each command
is named in the command table (``gateway/cli/shell.py``) and loaded only when that
command runs, so ``stora-gateway --help`` stays quick on a Raspberry Pi.

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

import contextlib
import gc
import logging
import sys
from collections.abc import Sequence
from typing import TextIO

from drivers.errors import DriverError
from gateway.cli.parser import COMMANDS, all_commands, build_parser, plugins, product_command
from gateway.cli.shell import (
    AGENT_READ_S,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    PROG,
    CliError,
    Context,
    command_handler,
)
from gateway.errors import GatewayError
from gateway.term import use_colour, wants_colour

# The CLI's interface, for plugins (gateway/cli/plugins.py) and tests: the entry point,
# the parser, and the shell's types and exit statuses.
__all__ = [
    "AGENT_READ_S",
    "COMMANDS",
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_USAGE",
    "PROG",
    "CliError",
    "Context",
    "all_commands",
    "build_parser",
    "main",
]


def main(argv: Sequence[str] | None = None, out: TextIO | None = None,
         err: TextIO | None = None) -> int:
    """Run the CLI; returns the exit status."""
    out = out or sys.stdout
    err = err or sys.stderr
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(with_plugins=product_command(argv) is None)
    try:
        # argparse writes --help and usage errors to sys.stdout/stderr: send them to ours.
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return int(exc.code or 0)
    if args.command is None:
        parser.print_help(out)
        return EXIT_USAGE
    del parser  # every command's parser, which `run` would otherwise hold for its life
    if args.command == "run":
        gc.collect()  # argparse's objects are cyclic: free them before the agent starts
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
    use_colour(wants_colour(out))  # never when piped, NO_COLOR or TERM=dumb
    ctx = Context(args, out, err)
    try:
        handler = command_handler(args.command)  # the command table: loads its module
        if handler is None:  # a plugin's command (gateway/cli/plugins.py)
            handler = next(p.run for p in plugins() if p.name == args.command)
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
