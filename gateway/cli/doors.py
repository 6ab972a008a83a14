"""``locks``, ``unlock`` and ``lock``: a technician's doors, through the agent first.

They ask a running agent through its control socket (``gateway.ops.control``), so a
technician's action queues behind remote commands and is audited like them.  Only when
no agent answers do they open the hardware themselves ("direct mode",
``gateway.ops.technician``); the output is the same either way, table and ``--json``
(``gateway/cli/outcomes.py``).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from gateway.cli.interrupts import EXIT_INTERRUPTED, interrupts_set
from gateway.cli.outcomes import LOCK_KEYS, OUTCOME_KEYS, actor, items, shape
from gateway.cli.render import print_json, table, yes_no
from gateway.cli.shell import (
    AGENT_ACTION_S,
    AGENT_READ_S,
    EXIT_FAILED,
    EXIT_OK,
    CliError,
    Context,
)
from gateway.ops import technician
from gateway.ops.technician import ActionOutcome, read_locks

__all__ = ["cmd_lock", "cmd_locks", "cmd_unlock"]


def cmd_locks(ctx: Context) -> int:
    """``locks``: read every lock (through the agent, which also knows the lockouts)."""
    answer = ctx.through_agent("locks", AGENT_READ_S)
    if answer is not None:
        rows = [shape(r, LOCK_KEYS) for r in items(answer, "locks")]
    else:
        site = ctx.site()
        try:
            found = read_locks(site, ctx.config().locks)
        finally:
            site.close()
        rows = [{"unit": r.unit, "reference": r.reference, "controller": r.controller,
                 "locked": r.locked, "door": r.door, "lockout": r.lockout, "error": r.error}
                for r in found]
    if ctx.json:
        print_json(rows, ctx.out)
    else:
        ctx.out.write(table(
            ["unit", "reference", "controller", "lock", "door", "lockout", "error"],
            [[r["unit"], r["reference"], r["controller"],
              "unknown" if r["locked"] is None else ("locked" if r["locked"] else "unlocked"),
              r["door"], yes_no(r["lockout"]), r["error"]] for r in rows]) + "\n")
        if answer is None:
            ctx.out.write("lockout: '?' = kept by the agent, which is not running "
                          "(direct mode)\n")
    return EXIT_OK if all(r["error"] is None for r in rows) else EXIT_FAILED


def _outcome_dict(o: ActionOutcome) -> dict[str, Any]:
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
        force=bool(ctx.args.force), reason=ctx.args.reason, actor=actor(),
    )
    interrupted = False
    if answer is not None:
        results = [shape(o, OUTCOME_KEYS) for o in items(answer, "outcomes")]
        if not ctx.json:
            for o in results:
                _say(ctx, o)
            if results and results[-1]["action"] == "unlock" and results[-1]["status"] == "done":
                after = "its unlock time" if wanted is None else f"{wanted:g} s"
                ctx.out.write(f"the agent relocks it after {after}\n")
    else:
        results, interrupted = _unlock_direct(ctx)
    if ctx.json:
        print_json(results, ctx.out)
    if interrupted:
        return EXIT_INTERRUPTED
    return EXIT_OK if all(o["status"] == "done" for o in results) else EXIT_FAILED


def _unlock_direct(ctx: Context) -> tuple[list[dict[str, Any]], bool]:
    """The unlock on the hardware itself: the outcomes and whether a signal cut it short."""
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
    answer = ctx.through_agent("lock", AGENT_ACTION_S, unit=ctx.args.unit, actor=actor())
    if answer is not None:
        outcome = answer.get("outcome")
        if not isinstance(outcome, dict):
            raise CliError("the agent's answer lacks 'outcome'", EXIT_FAILED)
        result = shape(outcome, OUTCOME_KEYS)
    else:
        lock = ctx.find_lock(ctx.args.unit)
        site = ctx.site(only=[lock.controller])
        try:
            result = _outcome_dict(technician.relock(site, lock))
        finally:
            site.close()
    if ctx.json:
        print_json(result, ctx.out)
    else:
        _say(ctx, result)
    return EXIT_OK if result["status"] == "done" else EXIT_FAILED
