"""``outbox`` and ``clock``: what the state database keeps, through the agent first.

Through the agent when it runs (it owns the database and the clock); else straight on
the database (``gateway.store``): read-only to list, and writing only to re-queue a dead
letter or reset the trusted-time floor, which the next start reports.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from gateway.cli.outcomes import actor
from gateway.cli.render import age, print_json, render_status, table
from gateway.cli.shell import AGENT_READ_S, EXIT_FAILED, EXIT_OK, CliError, Context
from gateway.clock import BUILD_FLOOR, reset_stored_floor, rfc3339, stored_floor
from gateway.store import Store, StoreError
from gateway.term import plural

__all__ = ["cmd_clock", "cmd_outbox"]


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
            with Store(ctx.config().storage.path) as store:
                retried = store.retry_dead(None if a.all_dead else a.id)
            if a.id is not None and not retried:
                raise CliError(f"no dead-lettered event {a.id} (see `outbox --dead`)",
                               EXIT_FAILED)
            answer = {"retried": retried}
        retried = list(answer.get("retried") or [])
        if ctx.json:
            print_json({"retried": retried}, ctx.out)
        elif retried:
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
        print_json(answer, ctx.out)
        return EXIT_OK
    summary = answer.get("summary") or {}
    oldest = age(summary.get("oldest_age_s"))
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
        answer = ctx.through_agent("clock.reset_floor", AGENT_READ_S, actor=actor())
        result = ({**answer, "through_agent": True} if answer is not None
                  else _reset_floor_direct(ctx))
        if ctx.json:
            print_json(result, ctx.out)
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
        print_json(clock, ctx.out)
    else:
        ctx.out.write(render_status({"clock": clock}))
    return EXIT_OK


def _clock_direct(ctx: Context) -> dict[str, Any]:
    """The saved floor read from the database, read-only (no agent running)."""
    path = ctx.config().storage.path
    if not path.exists():
        return stored_floor(None)
    with Store(path, read_only=True) as store:
        return stored_floor(store)


def _reset_floor_direct(ctx: Context) -> dict[str, Any]:
    """Reset the saved floor in the database (no agent running)."""
    path = ctx.config().storage.path
    if not path.exists():  # nothing saved: the build date is the floor already
        return {"previous": None, "floor": rfc3339(BUILD_FLOOR, timespec="seconds"),
                "actor": actor(), "saved": True, "through_agent": False}
    try:
        with Store(path) as store:
            return reset_stored_floor(store, actor())
    except StoreError as exc:
        raise CliError(f"the floor was not reset: {exc}", EXIT_FAILED) from exc
