"""What a command came to (:class:`Outcome`, the payload of ``P/S/cmd/result``), and the
verdict of one hardware action (:func:`verdict`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from drivers.base import ActionResult
from sitelink.codes import Reason, Status
from sitelink.payloads import result_payload


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a command came to: the payload of ``P/S/cmd/result`` is built from it.

    ``jti``, ``cmd`` and ``unit`` are ``None`` only in the rejection of a token whose
    signature did not verify: its claims are the sender's word, not the relay's.
    """

    jti: str | None
    cmd: str | None
    unit: str | None
    status: str
    reason: str | None
    state: dict[str, Any] | None
    at: float
    duplicate: bool = False

    def payload(self) -> dict[str, Any]:
        """The contract §4 result payload (:func:`sitelink.payloads.result_payload`)."""
        return result_payload(self.jti, self.cmd, self.unit, self.status, self.reason,
                              duplicate=self.duplicate, state=self.state, at=self.at)

    @classmethod
    def from_result(cls, result: dict[str, Any], *, duplicate: bool) -> Outcome:
        """An outcome read back from the inbox (to answer a duplicate)."""
        return cls(
            jti=str(result.get("jti")),
            cmd=str(result.get("cmd")),
            unit=result.get("unit"),
            status=str(result.get("status")),
            reason=result.get("reason"),
            state=result.get("state"),
            at=float(result.get("at_epoch") or time.time()),
            duplicate=duplicate,
        )

    def record(self) -> dict[str, Any]:
        """What the inbox stores, enough to re-publish the result for a duplicate."""
        return {**self.payload(), "at_epoch": self.at}


def verdict(result: ActionResult | None) -> tuple[Status, Reason | None]:
    """Contract §4 status and reason of a hardware action (None: no answer at all)."""
    if result is None:
        return Status.FAILED, Reason.HARDWARE_ERROR
    if result.confirmed:
        return Status.DONE, None
    return Status.FAILED, Reason.NOT_CONFIRMED
