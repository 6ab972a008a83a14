"""The unlock API's routes (contract §7.2), for apps with an API key.

``POST /v1/sites/{site}/units/{unit}/unlock`` and ``…/lock`` record the command
(:class:`relay.unlock.UnlockService`, in a worker thread), wake the MQTT link to publish
it, then wait up to ``?wait=S`` seconds (default 8, at most 25) for the gateway's result:
200 with the final record, or 202 with the pending one and ``Location:
/v1/commands/{id}``.  Errors are JSON ``{"error": {"code", "message"}}``.
"""

from __future__ import annotations

import time
from typing import Any, Final, Protocol

from fastapi import APIRouter, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from relay.metrics import UNLOCK_SECONDS, bounded
from relay.unlock import ApiError, UnlockRequest, UnlockService
from sitelink.codes import Cmd

__all__ = ["Dispatch", "LockBody", "UnlockBody", "api_routes"]

DEFAULT_WAIT_S = 8.0
#: The longest site or unit id (the database's column).
MAX_ID = 64
MAX_WAIT_S = 25.0
#: A command record's statuses (the unlock latency's label).
RECORD_STATUSES: Final = frozenset({"pending", "done", "rejected", "failed", "unknown",
                                     "timeout", "superseded"})


class Dispatch(Protocol):
    """What the API needs of the MQTT link."""

    def notify(self) -> None:
        """A command was committed: publish it now."""

    async def wait_for_result(self, jti: str, timeout: float) -> str | None:
        """``jti``'s status once it has a result; ``None`` when ``timeout`` runs out."""


class UnlockBody(BaseModel):
    """The body of an unlock call."""

    model_config = ConfigDict(extra="forbid")
    seconds: int | None = Field(default=None, description="seconds until relock (1–3600)")
    actor: str | None = Field(default=None, description="who asks, for the audit trail "
                              "(default: the key's name)")
    contact: str | None = Field(default=None, description="the tenant's Stora contact id "
                                "(required for app keys)")
    override: bool = Field(default=False, description="staff only: open a unit in lockout")
    reason: str | None = Field(default=None, description="why override is used")


class LockBody(BaseModel):
    """The body of a lock call."""

    model_config = ConfigDict(extra="forbid")
    actor: str | None = None


def _error(exc: ApiError) -> JSONResponse:
    return JSONResponse({"error": {"code": exc.code, "message": str(exc)}},
                        status_code=exc.status)


def api_routes(service: UnlockService, dispatch: Dispatch) -> APIRouter:
    """The routes of the unlock API."""
    router = APIRouter(prefix="/v1", tags=["unlock API"])

    async def run(request: UnlockRequest, authorization: str | None,
                  wait: float) -> JSONResponse:
        began = time.monotonic()
        try:
            key = await run_in_threadpool(service.authenticate, authorization)
            record, new = await run_in_threadpool(service.submit, key, request)
            if record["status"] == "pending":
                if new:
                    dispatch.notify()
                await dispatch.wait_for_result(record["id"], wait)
                record = await run_in_threadpool(service.record, key, record["id"])
        except ApiError as exc:
            return _error(exc)
        UNLOCK_SECONDS.labels(bounded(record["status"], RECORD_STATUSES)).observe(
            time.monotonic() - began)
        if record["status"] == "pending":
            return JSONResponse(record, status_code=202,
                                headers={"Location": f"/v1/commands/{record['id']}"})
        return JSONResponse(record)

    def checked(site: str, unit: str, cmd: Cmd, key: str | None,
                **body: Any) -> UnlockRequest:
        for what, value in (("site", site), ("unit", unit)):
            if len(value) > MAX_ID:  # no such id: never its prefix
                raise ApiError(404, "not_found", f"no {what} {value[:MAX_ID]}…")
        return UnlockRequest(site_id=site, unit_id=unit, cmd=cmd, idempotency_key=key,
                             **body)

    @router.post("/sites/{site}/units/{unit}/unlock", response_model=None)
    async def unlock(site: str, unit: str, *, body: UnlockBody | None = None,
                     wait: float = Query(DEFAULT_WAIT_S, ge=0, le=MAX_WAIT_S),
                     authorization: str | None = Header(None),
                     idempotency_key: str | None = Header(None)) -> JSONResponse:
        """Unlock a unit for ``seconds`` (the lock's default if absent)."""
        b = body or UnlockBody()
        try:
            request = checked(site, unit, Cmd.UNLOCK, idempotency_key, seconds=b.seconds,
                              actor=b.actor, contact=b.contact, override=b.override,
                              reason=b.reason)
        except ApiError as exc:
            return _error(exc)
        return await run(request, authorization, wait)

    @router.post("/sites/{site}/units/{unit}/lock", response_model=None)
    async def lock(site: str, unit: str, *, body: LockBody | None = None,
                   wait: float = Query(DEFAULT_WAIT_S, ge=0, le=MAX_WAIT_S),
                   authorization: str | None = Header(None),
                   idempotency_key: str | None = Header(None)) -> JSONResponse:
        """Lock a unit now."""
        try:
            request = checked(site, unit, Cmd.LOCK, idempotency_key,
                              actor=(body or LockBody()).actor)
        except ApiError as exc:
            return _error(exc)
        return await run(request, authorization, wait)

    @router.get("/commands/{command_id}", response_model=None)
    async def command(command_id: str, authorization: str | None = Header(None)
                      ) -> JSONResponse:
        """A command record."""
        try:
            key = await run_in_threadpool(service.authenticate, authorization)
            return JSONResponse(await run_in_threadpool(service.record, key, command_id))
        except ApiError as exc:
            return _error(exc)

    return router


def validation_error(_request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's 422 in the contract's shape."""
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    first: dict[str, Any] = dict(errors[0]) if errors else {}
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    message = f"{where}: {first.get('msg', 'invalid')}" if where else "invalid request"
    return JSONResponse({"error": {"code": "invalid_body", "message": message}},
                        status_code=422)
