"""``stora-gateway check-config [--online]``: every problem of the config file, in one run.

Offline, the file is loaded as the agent loads it (:func:`gateway.config.load_config`),
and every problem found is printed, one line each on stderr, ``file: key: reason``, or
listed under ``errors`` with ``--json``; exit status 2.  With ``--online`` a valid
config is also tried against Stora (:mod:`gateway.cli.check_online`): exit status 1 when a
check fails, because then the file is right and the world is not.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TextIO, cast

from gateway.cli.shell import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    ONLINE_CHECKS,
    PROG,
    Context,
    load,
)
from gateway.config import Config, StoraConfig, config_path_from_env, config_problems, load_config
from gateway.errors import ConfigError
from gateway.term import plural

if TYPE_CHECKING:
    from gateway.cli.check_online import Check

__all__ = ["cmd_check_config", "run_check_config"]


def cmd_check_config(ctx: Context) -> int:
    """``check-config [--online]``: every problem of the file, one line each (exit 2);
    with ``--online`` also the credential and timeline source at Stora (exit 1)."""
    return run_check_config(config_path_from_env(ctx.args.config), as_json=ctx.json,
                            online=bool(getattr(ctx.args, "online", False)), out=ctx.out,
                            err=ctx.err, prog=PROG)


def run_check_config(path: str, *, as_json: bool, online: bool, out: TextIO, err: TextIO,
                     prog: str) -> int:
    """Check the config at ``path``; print the verdict; return the exit status."""
    try:
        config = load_config(path)
    except ConfigError as exc:
        problems = config_problems(exc)
        if as_json:
            # "key" and "reason" (the first problem) stay for scripts written before
            # "errors" listed them all.
            _dump({"ok": False, "file": exc.file, "key": exc.key, "reason": exc.reason,
                   "errors": [{"file": p.file, "key": p.key, "reason": p.reason}
                              for p in problems]}, out)
        else:
            err.writelines(f"{prog}: {problem}\n" for problem in problems)
        return EXIT_USAGE
    summary: dict[str, Any] = {"ok": True, "file": str(config.path), "site": config.site.id,
                               "controllers": len(config.controllers),
                               "locks": len(config.locks)}
    checks = _online(config) if online else None
    if checks is not None:
        failed = [c for c in checks if c.status == "failed"]
        summary["online"] = {"ok": not failed, "checks": [c.as_dict() for c in checks]}
        summary["ok"] = not failed
    if as_json:
        _dump(summary, out)
    else:
        out.write(f"{config.path}: OK — site {config.site.id}, "
                  f"{plural(len(config.controllers), 'controller')}, "
                  f"{plural(len(config.locks), 'lock')}\n")
        for check in checks or ():
            verdict = {"ok": "ok", "failed": "FAILED", "skipped": "skipped"}[check.status]
            out.write(f"online {check.name:<10}  {verdict:<7}  {check.detail}\n")
    if checks is not None and not summary["ok"]:
        first = next(c for c in checks if c.status == "failed")
        err.write(f"{prog}: the online check failed: {first.name}: {first.detail}\n")
        return EXIT_FAILED
    return EXIT_OK


def _online(config: Config) -> list[Check]:
    """The online checks, loaded through the command table's seam: they bring httpx
    (``gateway.stora``), which the offline check never needs."""
    check_online = cast("Callable[[StoraConfig], list[Check]]", load(ONLINE_CHECKS))
    return check_online(config.stora)


def _dump(obj: object, out: TextIO) -> None:
    out.write(json.dumps(obj, indent=2) + "\n")
