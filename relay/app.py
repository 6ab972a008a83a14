"""The relay's ASGI application: the operator's pages, health, and (growing) the APIs."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool

from relay import __version__
from relay.services import Services
from relay.web import pages
from relay.webhooks import MAX_BODY_BYTES

__all__ = ["create_app", "error", "read_capped"]

_WEBHOOK_REFUSALS = {
    "unknown_endpoint": "no webhook endpoint has this URL",
    "bad_signature": "the X-Stora-Signature does not match the body",
    "stale_timestamp": "the signature's timestamp is outside the tolerance",
    "not_json": "the body is not JSON",
    "no_event_id": "the body has no event.id",
}


def error(status: int, code: str, message: str) -> JSONResponse:
    """A JSON error as contract §7.2: ``{"error": {"code", "message"}}``."""
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


async def read_capped(request: Request, limit: int) -> bytes | None:
    """The request body, or ``None`` when it is over ``limit`` bytes (read no further)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


def create_app(services: Services) -> FastAPI:
    """The application over ``services`` (tests build their own)."""
    app = FastAPI(title="stora-relay", version=__version__,
                  summary="The partner relay between Stora and smart-entry gateways.")
    app.include_router(pages(services))

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        try:
            with services.db.engine.connect() as connection:
                connection.execute(text("SELECT 1"))
        except Exception as exc:  # noqa: BLE001 (any database failure is "not healthy")
            return JSONResponse({"ok": False, "database": type(exc).__name__},
                                status_code=503)
        return JSONResponse({"ok": True})

    @app.post("/webhooks/stora/{key}")
    async def webhook(key: str, request: Request) -> JSONResponse:
        body = await read_capped(request, MAX_BODY_BYTES)
        if body is None:
            return error(413, "too_large", f"a webhook body is at most {MAX_BODY_BYTES} bytes")
        verdict = await run_in_threadpool(services.webhooks.accept, key, body,
                                          request.headers.get("x-stora-signature", ""))
        if verdict.status == 200:
            return JSONResponse({"ok": True, "outcome": verdict.outcome})
        return error(verdict.status, verdict.outcome, _WEBHOOK_REFUSALS.get(
            verdict.outcome, "the delivery was refused"))

    app.state.services = services
    return app
