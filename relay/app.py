"""The relay's ASGI application: the operator's pages, health, and (growing) the APIs."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool

from relay import __version__
from relay.api import Dispatch, api_routes, validation_error
from relay.broker import broker_routes
from relay.http import BodyLimit, error, read_capped
from relay.metrics import CONTENT_TYPE, WEBHOOKS, bounded, render
from relay.services import Services
from relay.web import pages, staff_pages
from relay.webhooks import MAX_BODY_BYTES, OUTCOMES

__all__ = ["MAX_REQUEST_BYTES", "create_app"]

#: No request body of any route is longer (the webhook's cap, 256 KiB, is the largest).
MAX_REQUEST_BYTES = 300 * 1024

#: Every outcome of a delivery (the metrics' label).
WEBHOOK_OUTCOMES = frozenset({*OUTCOMES, "too_large"})
_WEBHOOK_REFUSALS = {
    "unknown_endpoint": "no webhook endpoint has this URL",
    "bad_signature": "the X-Stora-Signature does not match the body",
    "stale_timestamp": "the signature's timestamp is outside the tolerance",
    "not_json": "the body is not JSON",
    "no_event_id": "the body has no event.id",
    "conflict": "the event met a concurrent change; deliver it again",
}


def create_app(services: Services, dispatch: Dispatch, *,
               on_connected: Callable[[str], None] | None = None,
               background: Sequence[Callable[[], Coroutine[Any, Any, None]]] = ()) -> FastAPI:
    """The application over ``services``.

    ``dispatch`` publishes commands and waits for their results (the MQTT link; tests may
    pass their own); ``on_connected(operator_id)`` runs after an operator connects;
    ``background`` are coroutines run for the application's lifetime (the link, the
    jobs), cancelled when it stops.
    """

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        tasks = [asyncio.create_task(work()) for work in background]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    app = FastAPI(title="stora-relay", version=__version__, lifespan=lifespan,
                  summary="The partner relay between Stora and smart-entry gateways.")
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_middleware(BodyLimit, limit=MAX_REQUEST_BYTES)
    app.include_router(pages(services, on_connected=on_connected))
    app.include_router(staff_pages(services))
    app.include_router(api_routes(services.unlock, dispatch))
    app.include_router(broker_routes(services.broker))

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        try:
            with services.db.read() as session:
                session.execute(text("SELECT 1"))
        except Exception as exc:  # noqa: BLE001 (any database failure is "not healthy")
            return JSONResponse({"ok": False, "database": type(exc).__name__},
                                status_code=503)
        return JSONResponse({"ok": True})

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(render(), media_type=CONTENT_TYPE)

    @app.post("/webhooks/stora/{key}")
    async def webhook(key: str, request: Request) -> JSONResponse:
        body = await read_capped(request, MAX_BODY_BYTES)
        if body is None:
            WEBHOOKS.labels("too_large").inc()
            return error(413, "too_large", f"a webhook body is at most {MAX_BODY_BYTES} bytes")
        verdict = await run_in_threadpool(services.webhooks.accept, key, body,
                                          request.headers.get("x-stora-signature", ""))
        WEBHOOKS.labels(bounded(verdict.outcome, WEBHOOK_OUTCOMES)).inc()
        if verdict.command is not None:
            dispatch.notify()
        if verdict.status == 200:
            return JSONResponse({"ok": True, "outcome": verdict.outcome})
        return error(verdict.status, verdict.outcome, _WEBHOOK_REFUSALS.get(
            verdict.outcome, "the delivery was refused"))

    app.state.services = services
    return app
