"""Tables and times for people (``--json`` prints the data instead)."""

from __future__ import annotations

import time
from collections.abc import Sequence

from sitelink.payloads import rfc3339

__all__ = ["ago", "table", "until", "when"]


def when(ts: float | None) -> str | None:
    """RFC 3339 UTC, seconds (``None`` stays ``None``)."""
    return rfc3339(ts, timespec="seconds")


def ago(ts: float | None, now: float | None = None) -> str:
    """``12s ago``, ``3m ago``, ``5h ago``, ``2d ago``; ``-`` for never."""
    if ts is None:
        return "-"
    seconds = max(0, int((time.time() if now is None else now) - ts))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def until(ts: float, now: float | None = None) -> str:
    """``12m from now``, ``3h from now``; ``now`` once past."""
    left = int(ts - (time.time() if now is None else now))
    if left <= 0:
        return "now"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if left >= size:
            return f"{left // size}{unit} from now"
    return f"{left}s from now"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell; ``(none)`` for no rows."""
    if not rows:
        return "(none)\n"
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in [list(headers), *rows]]
    return "\n".join(lines) + "\n"
