"""One shape for what a technician's command reports, through the agent or directly.

``locks``, ``unlock``, ``lock`` and ``test`` print the same table and the same
``--json`` in both modes, so scripts need not care which mode ran: the agent's answer
is cut to the keys below, timings rounded as in direct mode.  Also who is acting, for
the agent's audit trail.
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Mapping, Sequence
from typing import Any, Final

from gateway.cli.shell import EXIT_FAILED, CliError

__all__ = ["LOCK_KEYS", "OUTCOME_KEYS", "TEST_KEYS", "actor", "items", "shape"]

#: The keys of one ``locks --json`` row, in order, in both modes.
LOCK_KEYS: Final = ("unit", "reference", "controller", "locked", "door", "lockout", "error")
#: The keys of one unlock/lock outcome in ``--json``, in both modes.
OUTCOME_KEYS: Final = ("unit", "reference", "action", "status", "detail", "elapsed_ms",
                       "state", "door")
#: The keys of one ``test --json`` result, in both modes.
TEST_KEYS: Final = ("unit", "reference", "passed", "unlock_ms", "held_ms", "relock_ms",
                    "detail")


def actor() -> str:
    """Who is acting, for the agent's audit trail: ``technician alice (uid 1000)``.

    Only a claim: the agent also sees the caller's uid from the kernel.  Under sudo the
    person behind root is named, since "root" tells an auditor nothing.
    """
    uid = os.getuid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = str(uid)
    sudo_user = os.environ.get("SUDO_USER")
    if uid == 0 and sudo_user:
        return f"technician {sudo_user} (uid {uid}, via sudo)"
    return f"technician {name} (uid {uid})"


def items(answer: Mapping[str, Any], key: str) -> list[dict[str, Any]]:
    """``answer[key]`` as a list of objects, or a one-line error (exit 1)."""
    found = answer.get(key)
    if not isinstance(found, list) or not all(isinstance(i, dict) for i in found):
        raise CliError(f"the agent's answer lacks {key!r}", EXIT_FAILED)
    return found


def _round_ms(value: object) -> object:
    return round(value, 1) if isinstance(value, int | float) else value


def shape(item: Mapping[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    """``item`` with exactly ``keys``, in order, timings rounded as in direct mode."""
    return {k: _round_ms(item.get(k)) if k.endswith("_ms") else item.get(k) for k in keys}
