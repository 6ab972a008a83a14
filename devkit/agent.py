"""``python -m devkit.agent``: ``stora-gateway run`` with the dev kit's test hooks.

The agent reads no test-only setting of its own; the subprocess tests that need one run
it through here instead::

    python -m devkit.agent --config gateway.toml --fault wedge-units@2
    python -m devkit.agent --config gateway.toml --restart-min-uptime 0

``--fault NAME[@SECONDS]`` breaks a vital part on purpose (devkit/faults.py);
``--restart-min-uptime S`` replaces the 90 s a ``config.set`` that needs a restart must
wait after a start (``gateway.intake.mgmt.RESTART_MIN_UPTIME_S``).  Without either it is
exactly ``stora-gateway run``: same config lookup, logging, signals and exit statuses.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from devkit.faults import FAULTS, fault_hook, parse_fault
from gateway.agent import run_agent
from gateway.config import config_path_from_env, load_config
from gateway.errors import GatewayError

__all__ = ["main"]

PROG = "python -m devkit.agent"


def build_parser() -> argparse.ArgumentParser:
    """The options: ``run``'s and the test hooks."""
    parser = argparse.ArgumentParser(
        prog=PROG, description="stora-gateway run with the dev kit's test hooks: a fault "
        "injected on purpose, a shorter restart guard (tests only)")
    parser.add_argument("--config", default=None, metavar="PATH",
                        help="config file (default: $STORA_GATEWAY_CONFIG, else "
                        "/etc/stora-gateway/gateway.toml)")
    parser.add_argument("--debug", action="store_true", help="debug logging")
    parser.add_argument("--fault", default=None, metavar="NAME[@S]",
                        help=f"break a vital part S seconds after the start (default 1): "
                        f"{', '.join(FAULTS)}")
    parser.add_argument("--restart-min-uptime", type=float, default=None, metavar="S",
                        help="a config.set that needs a restart is refused this soon after "
                        "a start (default: the product's 90)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the agent with the hooks asked for; the exit status."""
    args = build_parser().parse_args(argv)
    try:
        faults = fault_hook(parse_fault(args.fault)) if args.fault else None
    except ValueError as exc:
        sys.stderr.write(f"{PROG}: --fault: {exc}\n")
        return 2
    try:
        config = load_config(config_path_from_env(args.config))
    except GatewayError as exc:
        sys.stderr.write(f"{PROG}: {exc}\n")
        return 2
    return run_agent(config, debug=args.debug, faults=faults,
                     restart_min_uptime_s=args.restart_min_uptime)


if __name__ == "__main__":
    sys.exit(main())
