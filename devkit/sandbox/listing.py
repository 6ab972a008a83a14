"""Lists as stora-api §5 pages them: ``page`` ≥ 1, ``limit`` 1–100 (default 50),
``sort_by`` / ``sort_direction`` (default ``created_at`` ``DESC``), ``meta.pagination``.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, Final

from devkit.sandbox.rules import PAGE_LIMIT_DEFAULT, PAGE_LIMIT_MAX, _error, _json_reply, _Reply

SORT_KEYS: Final = ("created_at", "updated_at")


def paging(params: Mapping[str, str]) -> tuple[int, int] | _Reply:
    """``(page, limit)`` from the query, or the 422 ``invalid_url_param``."""
    try:
        page = int(params.get("page", "1"))
        limit = int(params.get("limit", str(PAGE_LIMIT_DEFAULT)))
    except ValueError:
        page = limit = 0
    if page < 1 or not 1 <= limit <= PAGE_LIMIT_MAX:
        return _error("invalid_url_param", f"page must be at least 1 and limit 1–{PAGE_LIMIT_MAX}")
    return page, limit


def ordering(params: Mapping[str, str]) -> tuple[str, bool] | _Reply:
    """``(sort key, descending)`` from the query, or the 422."""
    key = params.get("sort_by", "created_at")
    direction = params.get("sort_direction", "DESC").upper()
    if key not in SORT_KEYS or direction not in ("ASC", "DESC"):
        return _error("invalid_url_param",
                      f"sort_by is one of {', '.join(SORT_KEYS)}; sort_direction ASC or DESC")
    return key, direction == "DESC"


def page_reply(name: str, items: Sequence[dict[str, Any]], page: int, limit: int) -> _Reply:
    """200 ``{name: one page of items, "meta": {"pagination": …, "request_id": …}}``."""
    pages = max(1, math.ceil(len(items) / limit))
    pagination = {"count": len(items), "page": page, "pages": pages, "limit": limit,
                  "next": page + 1 if page < pages else None,
                  "prev": page - 1 if page > 1 else None, "last": pages}
    return _json_reply(200, {
        name: list(items[(page - 1) * limit:page * limit]),
        "meta": {"pagination": pagination, "request_id": str(uuid.uuid4())},
    })


def multi(params: Mapping[str, str], key: str) -> set[str] | None:
    """A comma-separated multi-value filter, or ``None`` when absent."""
    value = params.get(key)
    if value is None:
        return None
    return {v.strip() for v in value.split(",") if v.strip()}
