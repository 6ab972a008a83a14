"""Gateway sites (contract §7.1 ``sites add/set/list/revoke``) and their credentials.

A site is a Stora site id of a connected operator that runs a gateway.  ``sites add``
prints, once, the gateway's credential (kept here only as a digest) and the gateway
config snippet that points the gateway at this relay; the credential authenticates the
gateway's Timeline Events at the broker (§7.4).
"""

from __future__ import annotations

import json
import time
import zoneinfo
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from sqlalchemy import select

from relay.crypto import digest_secret, new_credential, parse_credential, same_digest
from relay.db.engine import Database
from relay.db.models import Operator, OperatorSite, Site
from relay.errors import RelayError

__all__ = ["CREDENTIAL_PREFIX", "SiteInfo", "SiteRegistry", "check_timezone"]

#: Site credentials read ``sgw_<id>.<secret>``.
CREDENTIAL_PREFIX = "sgw"
MAX_SHARED_UNITS = 100


@dataclass(frozen=True)
class SiteInfo:
    """A registered site as ``sites list`` shows it."""

    site_id: str
    operator_id: str
    timezone: str
    shared_units: tuple[str, ...]
    created_at: float
    revoked_at: float | None
    status: dict[str, object] | None
    status_at: float | None

    @property
    def online(self) -> bool | None:
        """Whether the gateway's retained status says online (``None``: never heard)."""
        if self.status is None:
            return None
        return self.status.get("online") is True


def check_timezone(name: str) -> str:
    """``name`` if it is an IANA zone this machine knows, else a :class:`RelayError`."""
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise RelayError(f"unknown time zone {name!r} (an IANA name, e.g. Europe/London)"
                         ) from None
    return name


def _info(row: Site) -> SiteInfo:
    status = json.loads(row.status_json) if row.status_json else None
    return SiteInfo(row.site_id, row.operator_id, row.timezone,
                    tuple(json.loads(row.shared_units)), row.created_at, row.revoked_at,
                    status if isinstance(status, dict) else None, row.status_at)


def _shared(units: Sequence[str]) -> str:
    if len(units) > MAX_SHARED_UNITS:
        raise RelayError(f"at most {MAX_SHARED_UNITS} shared units")
    for unit in units:
        if not unit or len(unit) > 64 or not unit.isprintable():
            raise RelayError(f"not a unit id: {unit!r}")
    return json.dumps(sorted(set(units)))


class SiteRegistry:
    """The registered sites in the database."""

    def __init__(self, db: Database, *, clock: Callable[[], float] = time.time) -> None:
        self._db = db
        self._clock = clock

    def add(self, site_id: str, operator_id: str, *, timezone: str = "UTC",
            shared: Sequence[str] = ()) -> tuple[SiteInfo, str]:
        """Register a site; returns it and its credential (shown once, stored hashed).

        The site must be one of the operator's (as Stora listed them on connect); a site
        already registered is refused (``revoke`` it first to issue a new credential).
        """
        check_timezone(timezone)
        shared_json = _shared(shared)
        credential = new_credential(CREDENTIAL_PREFIX)
        with self._db.session() as s:
            operator = s.get(Operator, operator_id)
            if operator is None:
                raise RelayError(f"no operator {operator_id!r} (see `stora-relay operators "
                                 "list`)")
            listed = s.get(OperatorSite, site_id)
            if listed is None or listed.operator_id != operator_id:
                raise RelayError(f"Stora did not list site {site_id} for operator "
                                 f"{operator_id} when it connected (see `stora-relay "
                                 "operators list --json`)")
            existing = s.get(Site, site_id)
            if existing is not None and existing.revoked_at is None:
                raise RelayError(f"site {site_id} is already registered (revoke it first "
                                 "for a new credential)")
            if existing is not None:
                s.delete(existing)
                s.flush()
            row = Site(site_id=site_id, operator_id=operator_id,
                       credential_id=credential.public_id, credential_digest=credential.digest,
                       timezone=timezone, shared_units=shared_json, created_at=self._clock(),
                       revoked_at=None)
            s.add(row)
            s.flush()
            return _info(row), credential.text

    def set(self, site_id: str, *, timezone: str | None = None,
            shared: Sequence[str] | None = None) -> SiteInfo:
        """Change a site's time zone or shared units."""
        with self._db.session() as s:
            row = s.get(Site, site_id)
            if row is None:
                raise RelayError(f"no site {site_id!r} is registered")
            if timezone is not None:
                row.timezone = check_timezone(timezone)
            if shared is not None:
                row.shared_units = _shared(shared)
            return _info(row)

    def list(self, operator_id: str | None = None) -> list[SiteInfo]:
        """Every registered site (of one operator), by id."""
        query = select(Site).order_by(Site.site_id)
        if operator_id is not None:
            query = query.where(Site.operator_id == operator_id)
        with self._db.read() as s:
            return [_info(r) for r in s.scalars(query).all()]

    def get(self, site_id: str) -> SiteInfo | None:
        """One registered site, revoked or not."""
        with self._db.read() as s:
            row = s.get(Site, site_id)
            return None if row is None else _info(row)

    def revoke(self, site_id: str) -> SiteInfo:
        """Invalidate a site's credential at once."""
        with self._db.session() as s:
            row = s.get(Site, site_id)
            if row is None:
                raise RelayError(f"no site {site_id!r} is registered")
            if row.revoked_at is None:
                row.revoked_at = self._clock()
            return _info(row)

    def authenticate(self, credential: str) -> SiteInfo | None:
        """The live site whose credential this is, or ``None`` (constant-time compare)."""
        parsed = parse_credential(credential, CREDENTIAL_PREFIX)
        if parsed is None:
            return None
        public_id, text = parsed
        with self._db.read() as s:
            row = s.scalars(select(Site).where(Site.credential_id == public_id)).first()
            if row is None or row.revoked_at is not None:
                return None
            if not same_digest(digest_secret(text), row.credential_digest):
                return None
            return _info(row)

    def record_status(self, site_id: str, payload: dict[str, object]) -> bool:
        """Keep a gateway's retained ``P/S/status``; ``False`` (nothing kept) for a site
        not registered (yet)."""
        with self._db.session() as s:
            row = s.get(Site, site_id)
            if row is None:
                return False
            row.status_json = json.dumps(payload)
            row.status_at = self._clock()
            row.online = payload.get("online") is True
            return True

    def registered_among(self, site_ids: Collection[str]) -> frozenset[str]:
        """Which of ``site_ids`` are registered now (revoked ones too: their status is
        still kept)."""
        if not site_ids:
            return frozenset()
        with self._db.read() as s:
            return frozenset(s.scalars(select(Site.site_id).where(
                Site.site_id.in_(list(site_ids)))).all())
