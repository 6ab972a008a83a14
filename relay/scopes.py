"""Why the relay asks Stora for each scope (shown on the connect page, and in
``docs/partner-review.md``): least privilege, one reason per scope."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

__all__ = ["SCOPE_REASONS", "reasons"]

SCOPE_REASONS: Final = {
    "public.site:read": "to list your sites, so each gateway is tied to the right one and "
                        "doors follow each site's access hours",
    "public.unit:read": "to read each unit's status (occupied, overlocked…), so a door is "
                        "locked out exactly when Stora says so",
    "public.unit_allocation:read": "to know which tenant holds which unit, so a tenant's app "
                                   "opens only their own unit",
    "public.tenancy:read": "to know whether a tenancy is current, so access ends at move-out",
    "public.contact:read": "to match the tenant using the app to their tenancy",
    "public.timeline_event:write": "to record every door opened, locked or refused on the "
                                   "unit's timeline in Stora",
    "public.webhook_endpoint:read": "to find the change notifications it set up before, and "
                                    "never subscribe twice",
    "public.webhook_endpoint:write": "to subscribe to changes of your units, so lockouts "
                                     "reach your sites within seconds",
}


def reasons(scopes: Iterable[str]) -> list[tuple[str, str]]:
    """``(scope, why)`` for each scope asked for, in the config's order."""
    return [(s, SCOPE_REASONS.get(s, "configured by the relay's operator")) for s in scopes]
