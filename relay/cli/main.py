"""``stora-relay``: parsing, dispatch, exit statuses and one-line errors.

Exit status as the gateway's (contract §2): 0 success, 1 the operation failed, 2 bad
usage or bad config; errors are one sentence on stderr, a traceback only with
``--debug``.  The web framework and the MQTT client load only for ``run``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Callable, Sequence
from typing import TextIO

from sqlalchemy.exc import SQLAlchemyError

from relay import __version__
from relay.cli import commands
from relay.cli.commands import Context
from relay.errors import ConfigError, RelayError

__all__ = ["COMMANDS", "EXIT_FAILED", "EXIT_OK", "EXIT_USAGE", "build_parser", "main"]

PROG = "stora-relay"
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

#: Command path -> (one-line help, handler).
COMMANDS: dict[str, tuple[str, Callable[[Context], int]]] = {
    "run": ("HTTP server and background work in the foreground; applies pending "
            "migrations first", commands.run),
    "check-config": ("validate the configuration file and say what is wrong",
                     commands.check_config),
    "db upgrade": ("apply pending database migrations", commands.db_upgrade),
    "db reencrypt": ("encrypt every stored secret under the current data key (after a "
                     "data-key rotation, before the old key's line goes)",
                     commands.db_reencrypt),
    "keys list": ("command signing keys: kid, public key, created, retired", commands.keys_list),
    "keys rotate": ("add a signing key that signs from now on; older ones stay published",
                    commands.keys_rotate),
    "keys retire": ("stop publishing an old signing key", commands.keys_retire),
    "operators list": ("connected operators: status, sites, last webhook, last refresh",
                       commands.operators_list),
    "sites add": ("register a gateway site; prints its credential and config snippet once",
                  commands.sites_add),
    "sites set": ("change a site's time zone or shared units", commands.sites_set),
    "sites list": ("registered sites and their gateways' last status", commands.sites_list),
    "sites revoke": ("invalidate a site's credential", commands.sites_revoke),
    "api-keys create": ("a key for the unlock API (printed once, stored hashed)",
                        commands.api_keys_create),
    "api-keys list": ("the unlock API's keys", commands.api_keys_list),
    "api-keys revoke": ("refuse an API key from now on", commands.api_keys_revoke),
}
_GROUPS = {"db": "database migrations", "keys": "command signing keys",
           "operators": "connected operators", "sites": "gateway sites",
           "api-keys": "keys of the unlock API"}
_JSON = {"keys list", "keys rotate", "operators list", "sites add", "sites list",
         "api-keys create", "api-keys list", "check-config"}


def _common(json_output: bool) -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--config", default=argparse.SUPPRESS, metavar="PATH",
                        help="config file (default: $STORA_RELAY_CONFIG, else "
                        "/etc/stora-relay/relay.toml)")
    parent.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="debug logging and tracebacks")
    if json_output:
        parent.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                            help="print JSON instead of a table")
    return parent


def _arguments(path: str, p: argparse.ArgumentParser) -> None:
    if path == "keys retire":
        p.add_argument("kid", help="the key to retire (see `keys list`)")
    elif path in ("sites add", "sites set"):
        p.add_argument("site", help="the Stora site id (site_…)")
        if path == "sites add":
            p.add_argument("--operator", required=True, help="the operator (op_…) it belongs to")
        p.add_argument("--timezone", default=None, metavar="ZONE",
                       help="IANA time zone of the site's access hours (default UTC)")
        p.add_argument("--shared", nargs="*", default=None, metavar="UNIT",
                       help="units whose doors any current tenant of the site may open "
                       "(a gate or front door)")
    elif path == "sites list":
        p.add_argument("--operator", default=None, help="only this operator's sites")
    elif path == "sites revoke":
        p.add_argument("site", help="the Stora site id (site_…)")
    elif path == "api-keys create":
        p.add_argument("--operator", default=None,
                       help="the operator (op_…) it acts for (not for --role admin)")
        p.add_argument("--name", required=True, help="who uses it (audited as the actor)")
        p.add_argument("--role", choices=["app", "staff", "admin"], default="app",
                       help="app: a tenant-facing app bound by the access rules (default); "
                       "staff: any unit of the operator; admin: the staff pages (/staff), "
                       "every operator, no door")
    elif path == "api-keys list":
        p.add_argument("--operator", default=None, help="only this operator's keys")
    elif path == "api-keys revoke":
        p.add_argument("id", help="the key's id (see `api-keys list`)")


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command."""
    parser = argparse.ArgumentParser(
        prog=PROG, description="The partner relay between Stora and smart-entry gateways.")
    parser.add_argument("--config", default=None, metavar="PATH", help=argparse.SUPPRESS)
    parser.add_argument("--debug", action="store_true", default=False, help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true", default=False, help=argparse.SUPPRESS)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction[argparse.ArgumentParser]] = {}
    for path, (text, _) in COMMANDS.items():
        parent = _common(path in _JSON)
        head, _, tail = path.partition(" ")
        if not tail:
            p = sub.add_parser(head, parents=[parent], help=text, description=text)
        else:
            if head not in groups:
                group = sub.add_parser(head, help=_GROUPS[head], description=_GROUPS[head])
                groups[head] = group.add_subparsers(dest="action", metavar="ACTION",
                                                    required=True)
            p = groups[head].add_parser(tail, parents=[parent], help=text, description=text)
        p.set_defaults(path=path)
        _arguments(path, p)
    return parser


def main(argv: Sequence[str] | None = None, out: TextIO | None = None,
         err: TextIO | None = None) -> int:
    """Run the CLI; returns the exit status."""
    out, err = out or sys.stdout, err or sys.stderr
    parser = build_parser()
    try:
        # argparse writes --help and usage errors to sys.stdout/stderr: send them to ours.
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2)
        return int(exc.code or 0)
    if args.command is None:
        parser.print_help(out)
        return EXIT_USAGE
    debug = bool(getattr(args, "debug", False))
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO if args.path == "run"
                        else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=err)
    ctx = Context(args, out, err)
    try:
        return COMMANDS[args.path][1](ctx)
    except ConfigError as exc:
        err.writelines(f"{PROG}: {line}\n" for line in exc.problems)
        return EXIT_USAGE
    except RelayError as exc:
        if debug:
            raise
        err.write(f"{PROG}: {exc}\n")
        return EXIT_FAILED
    except KeyboardInterrupt:
        err.write(f"{PROG}: interrupted\n")
        return 130
    except (OSError, SQLAlchemyError) as exc:  # the database or a file: say which, once
        if debug:
            raise
        cause = getattr(exc, "orig", None) or exc
        err.write(f"{PROG}: {_one_line(f'{type(cause).__name__}: {cause}')} "
                  "(run with --debug for details)\n")
        return EXIT_FAILED
    except Exception as exc:
        if debug:
            raise
        err.write(f"{PROG}: {_one_line(f'{type(exc).__name__}: {exc}')} "
                  "(run with --debug for details)\n")
        return EXIT_FAILED
    finally:
        ctx.close()


def _one_line(text: str, limit: int = 300) -> str:
    """The first line of ``text``, printable and capped (an error from outside may be
    long or hold control characters)."""
    first = text.strip().splitlines()[0] if text.strip() else text
    return "".join(c if c.isprintable() else "?" for c in first)[:limit]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
