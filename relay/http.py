"""What the relay's routes share: reading a capped body, the JSON error shape."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse

__all__ = ["error", "read_capped"]


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
