"""What a signed ``config.set`` may change, and the file handling of ``config.get`` and
``config.set`` (gateway/intake/mgmt.py): the remote-settings allow-list and its bounds,
the atomic write, and the pages of ``config.get``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Final

from gateway.config import Config

__all__ = ["CONFIG_CHUNK_CHARS", "MAX_CONFIG_BYTES", "REMOTE_SETTINGS", "config_page_end",
           "file_sha256", "protected_changes", "settings", "write_atomically"]

#: ``config.set``: the largest file accepted.  A request is at most
#: :data:`~gateway.intake.commands.MAX_MGMT_BYTES` as a token (base64url: 4/3 of the claims).
MAX_CONFIG_BYTES: Final = 40 * 1024
#: ``config.get``: the most characters of the file's text one answer carries, counted as
#: JSON (escaped quotes and newlines count double).  With the rest of the answer this
#: stays far below the broker's ``max_packet_size`` (64 KiB in deploy/) and the link's
#: own cap, whatever the file holds.
CONFIG_CHUNK_CHARS: Final = 32 * 1024


#: What a signed ``config.set`` may change, by the setting paths of :func:`settings`
#: (``*`` stands for any lock's unit id or controller's name).  An allow-list: a setting
#: added later is on-site only until someone decides otherwise here.
REMOTE_SETTINGS: Final = frozenset({
    "site.app_name",
    "mqtt.keepalive_s",
    "commands.clock_skew_s", "commands.max_lifetime_s",  # only to tighten them
    "stora.max_per_second", "stora.max_per_minute",
    "telemetry.interval_s",
    "locks[*].unlock_seconds",
    "controllers[*].timeout_ms", "controllers[*].retries",
})
#: Remote changes to these may only make them smaller: stricter freshness, and no more
#: load on Stora than the site was given.
_TIGHTEN_ONLY: Final = frozenset({"commands.clock_skew_s", "commands.max_lifetime_s",
                                  "stora.max_per_second", "stora.max_per_minute"})
#: How far a remote change may go, so that one signed request cannot lock the relay out
#: (found in review): the relay signs lockouts and clears for up to 300 s (contract
#: §7.3), and under 5 s of skew a relay whose clock is a few seconds off is refused.  An
#: unlock held longer than 5 minutes by default is a site decision, not a remote one.
_REMOTE_BOUNDS: Final = {
    "commands.max_lifetime_s": (300, None),
    "commands.clock_skew_s": (5, None),
    "locks[*].unlock_seconds": (None, 300),
}


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"<prefix>.a.b": 1}``; lists stay whole values."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def settings(config: Config) -> dict[str, Any]:
    """Every setting of ``config`` by a path that does not depend on the file's order.

    ``{"mqtt.host": …, "locks[unit_a101]": True, "locks[unit_a101].channel": 0,
    "controllers[bus1].port": …}``: locks by unit id, controllers by name, each with a
    presence entry, so adding or removing one is a change of its own and moving a
    ``[[locks]]`` table within the file is none.
    """
    out: dict[str, Any] = {}
    for section, value in config.redacted().items():
        if section in ("locks", "controllers"):
            id_key = "unit" if section == "locks" else "name"
            for item in value:
                where = f"{section}[{item[id_key]}]"
                out[where] = True
                out.update(_flatten({k: v for k, v in item.items() if k != id_key}, where))
        elif section != "path":
            out.update(_flatten(value, section))
    return out


def protected_changes(old: Config, new: Config) -> list[str]:
    """The settings ``config.set`` may not change: all but :data:`REMOTE_SETTINGS`.

    A management request is signed by a command key; a stolen or misused one must not be
    able to add keys, loosen freshness, point Stora or the broker at another host, move
    the state, or rewire the site.  Found in review: lock wiring (``controller``,
    ``channel``, ``device``, ``energize_to``, the door and status inputs) and bus
    endpoints were accepted remotely, so flipping ``energize_to`` made "locked"
    physically open while the read-back said locked, and swapping two channels made a
    tenant's unlock open another unit with a false audit trail.  The physical wiring,
    references (the labels on the doors), endpoints, trust and state are changed on the
    gateway itself (``check-config``, a local edit).
    """
    before, after = settings(old), settings(new)
    refused = []
    for path in sorted(set(before) | set(after)):
        was, now = before.get(path), after.get(path)
        if was == now:
            continue
        pattern = path
        if path.startswith(("locks[", "controllers[")) and "]." in path:
            section, rest = path.split("[", 1)
            pattern = f"{section}[*].{rest.split('].', 1)[1]}"
        allowed = pattern in REMOTE_SETTINGS
        if allowed and pattern in _TIGHTEN_ONLY:
            allowed = (isinstance(was, int) and isinstance(now, int) and now < was)
        if not allowed:
            refused.append(path if path in before and path in after
                           else f"{path} ({'added' if path in after else 'removed'})")
            continue
        low, high = _REMOTE_BOUNDS.get(pattern, (None, None))
        if isinstance(now, int) and low is not None and now < low:
            refused.append(f"{path} (remotely at least {low})")
        elif isinstance(now, int) and high is not None and now > high:
            refused.append(f"{path} (remotely at most {high})")
    return refused


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The SHA-256 of a file's bytes, hex."""
    with open(path, "rb") as fp:
        return hashlib.sha256(fp.read()).hexdigest()


def write_atomically(path: Path, data: bytes, mode: int) -> None:
    """Replace ``path`` with ``data`` so that a reader sees the old or the new file, whole.

    Temporary file in the same directory (same filesystem, so the rename is atomic),
    fsync, rename, fsync of the directory (so the rename survives a power cut).
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fp:
            fp.write(data)
            fp.flush()
            os.fsync(fp.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def config_page_end(text: str, offset: int, limit: int = CONFIG_CHUNK_CHARS) -> int:
    """Where the ``config.get`` page of ``text`` starting at ``offset`` ends: as far as
    its JSON encoding (``ensure_ascii``, as the answer is sent) stays within ``limit``.

    The encoded length only grows with the end, so a binary search finds it in a few
    dozen encodings of at most ``limit`` characters, however large the file.
    """
    def fits(end: int) -> bool:
        return len(json.dumps(text[offset:end])) - 2 <= limit

    lo, hi = offset, min(len(text), offset + limit)  # no character encodes to less than 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo
