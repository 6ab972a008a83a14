"""Requests from the local CLI on the control socket, routed to the operations service.

:class:`ControlRoutes` is the :class:`~gateway.ops.control.ControlHandler` the agent's
control server calls (gateway/ops/control.py); each method maps to one
:class:`~gateway.ops.service.Operations` call.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Mapping
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from gateway.config import LockConfig
from gateway.intake.commands import Command
from gateway.ops.control_wire import ControlError, Peer
from gateway.ops.lookup import CONTROL_WAIT_S, find_lock
from gateway.ops.service import Operations
from gateway.units.manager import Outcome
from sitelink.codes import Reason, Status

__all__ = ["ControlRoutes"]


class ControlRoutes:
    """The control socket's handler over one :class:`Operations`."""

    def __init__(self, ops: Operations) -> None:
        self.ops = ops

    def handle(self, method: str, params: Mapping[str, Any], peer: Peer) -> dict[str, Any]:
        """Requests from the local CLI (gateway/ops/control.py)."""
        ops = self.ops
        # The kernel says who is calling (SO_PEERCRED); the CLI's own "actor" is only a
        # claim, so it is taken as is only from root (e.g. a sudo wrapper naming the human).
        actor = str(peer.actor)
        if getattr(peer, "uid", None) == 0 and params.get("actor"):
            actor = str(params["actor"])
        if method == "status":
            return ops.status()
        if method == "locks":
            return {"locks": ops.locks()}
        if method in ("unlock", "lock"):
            return self._act(method, params, actor)
        if method == "test":
            return ops.test(params, actor)
        if method == "scan":
            return ops.scan(params)
        if method == "outbox.list":
            return ops.outbox_list(params)
        if method == "outbox.retry":
            return ops.outbox_retry(params, actor)
        if method == "clock.reset_floor":
            return ops.reset_clock_floor(actor)
        raise ControlError(f"unknown request {method!r}", 2)

    def _act(self, method: str, params: Mapping[str, Any], actor: str) -> dict[str, Any]:
        """``unlock`` or ``lock``: on the unit's queue like a remote command, audited."""
        ops = self.ops
        lock = find_lock(ops.config, str(params.get("unit", "")))
        seconds = params.get("seconds")
        if method == "unlock" and seconds is not None and not (
                isinstance(seconds, (int, float)) and 0 < seconds <= 3600):
            raise ControlError("seconds must be between 1 and 3600", 2)
        if params.get("force") and not str(params.get("reason") or "").strip():
            raise ControlError("--force needs --reason TEXT (it is audited)", 2)
        now = int(ops.clock.now())
        cmd = Command(
            jti=f"local-{uuid.uuid4().hex}", cmd=method, unit=lock.unit, kid="local",
            # Valid while the technician waits for the unit's queue, not after.
            iat=now, exp=now + int(CONTROL_WAIT_S),
            # Whole seconds on the wire (contract §5); never round an unlock down to 0.
            dur=max(1, math.ceil(float(params["seconds"])))
            if method == "unlock" and params.get("seconds") else None,
            override=bool(params.get("force")), reason=params.get("reason") or None,
            actor=actor,
        )
        started = time.monotonic()
        future = ops.units.submit(cmd)
        try:
            outcome = future.result(timeout=CONTROL_WAIT_S)
        except FutureTimeout:
            if future.cancel():  # never ran: a retry cannot make it run twice
                raise ControlError("the unit is busy; nothing was done; try again",
                                   1) from None
            raise ControlError("the unit is busy and the action is still running; "
                               "check with `locks`", 1) from None
        if outcome.reason == Reason.OVERLOCKED:
            raise ControlError(
                f"{lock.reference} is in lockout (overlocked): use --force --reason TEXT", 1)
        entry = _outcome_row(lock, method, outcome, time.monotonic() - started)
        ops.commands.publish_result(outcome)
        return {"outcomes": [entry]} if method == "unlock" else {"outcome": entry}


def _outcome_row(lock: LockConfig, action: str, outcome: Outcome,
                 elapsed: float) -> dict[str, Any]:
    state = outcome.state or {}
    locked = state.get("locked")
    status = Status.DONE if outcome.status == Status.DONE else (outcome.reason
                                                               or outcome.status)
    return {
        "unit": lock.unit, "reference": lock.reference, "action": action,
        "status": status, "detail": outcome.reason or "confirmed by read-back",
        "elapsed_ms": round(elapsed * 1000, 1),
        "state": "unknown" if locked is None else ("locked" if locked else "unlocked"),
        "door": state.get("door", "unknown"),
    }
