"""``stora-gateway status``: the verdict first, then the details, grouped and short.

The first line is ``OK``, ``DEGRADED: <reasons>`` or ``DOWN: <reasons>``
(gateway/ops/health.py decides); one line per part follows (agent, broker, clock,
controllers, outbox, commands, host); ``--verbose`` adds every field the agent reports,
section by section; ``--json`` prints the agent's report as is (the retained
``P/S/status`` payload, verdict included).

Exit status (README, "The command line"): 0 ``OK``, :data:`EXIT_DEGRADED` (3)
``DEGRADED``, :data:`EXIT_DOWN` (4) ``DOWN``.  Contract §2's 1 and 2 keep their meaning
for ``status`` too: 1 when no report could be had (the agent answered with an error or
not in time), 2 for bad usage or a bad config; so a monitoring script can tell "the
site is down" from "I could not ask".

When no agent answers, the verdict is ``DOWN`` (nothing executes remote commands), and
what the database says (queued and dead-lettered events) is read, read-only, so a dead
letter shows even then.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

from gateway.cli.render import age, format_bytes, print_json, render_status
from gateway.cli.shell import AGENT_READ_S, Context
from gateway.ops.control import AgentUnavailable
from gateway.ops.health import Reason, Verdict, agent_not_running, assess
from gateway.ops.telemetry import newest_dead_letter
from gateway.store import Store, StoreError
from gateway.term import paint, plural

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["EXIT_DEGRADED", "EXIT_DOWN", "EXIT_FOR", "render_report", "run_status"]

#: ``status`` exit statuses beyond contract §2's 0/1/2 (see the module docstring).
EXIT_DEGRADED: Final = 3
EXIT_DOWN: Final = 4
EXIT_FOR: Final = {"ok": 0, "degraded": EXIT_DEGRADED, "down": EXIT_DOWN}
#: Width of the part names in the summary.
_LABEL: Final = 12


def verdict_of(report: Mapping[str, Any]) -> Verdict:
    """The verdict a report carries (an agent's ``status``), else the one it calls for.

    An agent older than the verdict sends none: it is judged here, from the same rules.
    """
    verdict, reasons = report.get("verdict"), report.get("reasons")
    if verdict in EXIT_FOR and isinstance(reasons, list):
        return Verdict(str(verdict), tuple(
            Reason(str(r.get("severity")), str(r.get("code")), str(r.get("text")))
            for r in reasons if isinstance(r, Mapping)))
    return assess(report)


def run_status(ctx: Context) -> int:
    """``status``: ask the agent; print the verdict and the details; exit by the verdict."""
    try:
        report = ctx.ask_agent("status", AGENT_READ_S)
    except AgentUnavailable as exc:
        report = _offline_report(ctx, str(exc))
    verdict = verdict_of(report)
    if ctx.json:
        print_json(report, ctx.out)
    else:
        ctx.out.write(render_report(report, verdict,
                                    verbose=bool(getattr(ctx.args, "verbose", False))))
    return EXIT_FOR[verdict.verdict]


def _offline_report(ctx: Context, why: str) -> dict[str, Any]:
    """The report when no agent answers: ``DOWN``, and the outbox as the database has it."""
    config = ctx.config()
    report: dict[str, Any] = {"online": False, "site": config.site.id,
                              "agent": {"socket": str(config.control.socket), "error": why}}
    outbox = _stored_outbox(config.storage.path)
    if outbox is not None:
        report["outbox"] = outbox
    down = agent_not_running(why)
    found = assess({"outbox": outbox} if outbox is not None else {})
    verdict = Verdict("down", down.reasons + found.reasons)
    return {"online": False, **verdict.as_dict(), **report}


def _stored_outbox(path: Path) -> dict[str, Any] | None:
    """Pending and dead events read-only from the database (``None`` when it does not
    exist yet); a database that cannot be read says so under ``error``.

    A monitoring user outside the ``stora-gateway`` group may not even enter the
    database's directory (0750 on an install), and Python 3.11's ``Path.exists`` raises
    ``PermissionError`` there rather than answering: every ``OSError`` on the way is
    such a report too, so the verdict stays ``DOWN`` (exit 4), never a Python error.
    """
    try:
        if not path.exists():
            return None
        with Store(path, read_only=True) as store:
            summary = store.outbox_summary(time.time())
            newest = newest_dead_letter(store) if summary["dead"] else None
    except StoreError as exc:
        return {"error": str(exc)}
    except OSError as exc:
        return {"error": f"{path}: {exc.strerror or exc} (run this as root or as a member "
                         "of group stora-gateway, which may read it)"}
    return {**summary, "newest_dead": newest, "drain": "agent not running"}


# -- rendering ------------------------------------------------------------------------------
def render_report(report: Mapping[str, Any], verdict: Verdict | None = None, *,
                  verbose: bool = False) -> str:
    """The verdict line, one short line per part, and with ``verbose`` every field."""
    verdict = verdict or verdict_of(report)
    word = verdict.verdict.upper()
    lines = [paint(word) + verdict.headline[len(word):], ""]
    for label, text in _summary(report):
        lines.append(f"{label.ljust(_LABEL)}{text}")
    text = "\n".join(lines) + "\n"
    if verbose:
        shown = {k: v for k, v in report.items() if k not in ("verdict", "reasons")}
        text += "\n" + render_status(shown)
    elif report.get("online") is not False:
        text += "\n(--verbose for every field, --json for tools)\n"
    return text


def _section(report: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = report.get(name)
    return value if isinstance(value, Mapping) else {}


def _summary(report: Mapping[str, Any]) -> list[tuple[str, str]]:
    parts: list[tuple[str, str | None]] = [
        ("agent", _agent_line(report)),
        ("broker", _broker_line(_section(report, "broker"))),
        ("clock", _clock_line(_section(report, "clock"))),
        ("controllers", _controllers_line(report.get("controllers"))),
        ("outbox", _outbox_line(_section(report, "outbox"))),
        ("dead letter", _dead_line(_section(report, "outbox"))),
        ("storage", _storage_line(_section(report, "storage"))),
        ("commands", _commands_line(_section(report, "commands"))),
        ("host", _host_line(_section(report, "host"))),
    ]
    return [(label, text) for label, text in parts if text]


def _agent_line(report: Mapping[str, Any]) -> str | None:
    if report.get("online") is False:
        return f"not running (control socket {_section(report, 'agent').get('socket')})"
    if "version" not in report:
        return None
    return (f"{report.get('version')}, site {report.get('site', '-')}, up "
            f"{age(report.get('uptime_s'))} (since {report.get('started_at', '-')})")


def _broker_line(broker: Mapping[str, Any]) -> str | None:
    if not broker:
        return None
    drops = plural(int(broker.get("disconnects") or 0), "disconnect")
    if broker.get("connected"):
        return f"connected since {broker.get('last_connect_at') or '-'} ({drops} before)"
    why = broker.get("last_connect_error") or broker.get("last_disconnect_reason") or "-"
    failures = plural(int(broker.get("connect_failures") or 0), "failed attempt")
    return f"NOT connected: {why} ({failures}, {drops})"


def _clock_line(clock: Mapping[str, Any]) -> str | None:
    if not clock:
        return None
    synced = "synchronized" if clock.get("synced") else "not synchronized"
    if clock.get("trusted"):
        return f"trusted (mode {clock.get('mode', '-')}, {synced}), now {clock.get('now', '-')}"
    return f"NOT trusted: {clock.get('why') or '-'}"


def _controllers_line(controllers: object) -> str | None:
    if not isinstance(controllers, list) or not controllers:
        return None
    found = [c for c in controllers if isinstance(c, Mapping)]
    offline = [c for c in found if c.get("online") is False]
    if not offline:
        return f"{len(found)} online: " + ", ".join(str(c.get("name")) for c in found)

    def described(c: Mapping[str, Any]) -> str:
        text = f"{c.get('name')}: {c.get('last_error') or c.get('detail') or 'no answer'}"
        last = c.get("last_ok_age_s")
        return text if last is None else f"{text} (last answer {age(last)} ago)"

    return f"{len(offline)} of {len(found)} offline: " + "; ".join(map(described, offline))


def _outbox_line(outbox: Mapping[str, Any]) -> str | None:
    if not outbox:
        return None
    if outbox.get("error"):
        return f"cannot be read: {outbox['error']}"
    pending = int(outbox.get("pending") or 0)
    waiting = plural(pending, "event") + " waiting"
    if pending:
        waiting += f" (oldest {age(outbox.get('oldest_age_s'))})"
    dead = plural(int(outbox.get("dead") or 0), "dead letter")
    last = outbox.get("last_post_at")
    posted = f", last accepted {last}" if last else ""
    error = f" ({outbox['last_error']})" if outbox.get("last_error") else ""
    return f"{waiting}, {dead}; delivery {outbox.get('drain', '-')}{error}{posted}"


def _dead_line(outbox: Mapping[str, Any]) -> str | None:
    newest = outbox.get("newest_dead")
    if not isinstance(newest, Mapping):
        return None
    return (f"newest: event {newest.get('seq')} ({newest.get('kind')}, "
            f"{newest.get('reference')}) at {newest.get('dead_at') or '-'}: "
            f"{newest.get('reason')}")


def _storage_line(storage: Mapping[str, Any]) -> str | None:
    if storage.get("ephemeral"):
        return "TEMPORARY in-memory database: nothing is kept across a restart"
    if storage.get("read_only"):
        return f"READ-ONLY: {storage.get('path')}"
    return None


def _commands_line(commands: Mapping[str, Any]) -> str | None:
    if not commands:
        return None
    received = plural(int(commands.get("received") or 0), "command")
    text = (f"{received} received, {commands.get('executed', 0)} executed, "
            f"{commands.get('rejected', 0)} rejected")
    by_reason = commands.get("rejected_by_reason")
    if isinstance(by_reason, Mapping) and by_reason:
        text += " (" + ", ".join(f"{k} {v}" for k, v in sorted(by_reason.items())) + ")"
    return text


def _host_line(host: Mapping[str, Any]) -> str | None:
    if not host:
        return None
    parts = []
    free, total = host.get("disk_free_bytes"), host.get("disk_total_bytes")
    if isinstance(free, int) and isinstance(total, int):
        parts.append(f"disk {format_bytes(free)} free of {format_bytes(total)}")
    if isinstance(host.get("cpu_temp_c"), int | float):
        parts.append(f"CPU {host['cpu_temp_c']:.1f} °C")
    if isinstance(host.get("load_1m"), int | float):
        parts.append(f"load {host['load_1m']}")
    if isinstance(host.get("rss_bytes"), int):
        parts.append(f"memory {format_bytes(host['rss_bytes'])}")
    return "; ".join(parts) or None
