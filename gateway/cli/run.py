"""``stora-gateway run``: the agent in the foreground (what systemd starts)."""

from __future__ import annotations

from gateway.agent import run_agent
from gateway.cli.shell import Context

__all__ = ["cmd_run"]


def cmd_run(ctx: Context) -> int:
    """``run``: the agent in the foreground until SIGTERM or Ctrl-C."""
    config = ctx.config()  # a bad config is exit 2 before anything starts
    return run_agent(config, debug=bool(getattr(ctx.args, "debug", False)))
