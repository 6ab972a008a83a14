"""The relay's tables (SQLAlchemy 2 declarative models).

Portable SQL only: the same models and migrations run on SQLite (the embedded default,
one process) and PostgreSQL (several replicas, next issue).  Times are UTC epoch seconds
as floats, taken by the code that writes them; secrets are ciphertext from
:class:`relay.crypto.Keyring` (``*_enc`` columns) or digests (``digest`` columns), never
plaintext.  The migrations in ``relay/migrations/versions/`` create exactly these tables;
``tests/relay/test_db.py`` compares them.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = [
    "ApiKey",
    "Base",
    "Command",
    "IdempotencyAlias",
    "JobLease",
    "OAuthState",
    "Operator",
    "OperatorSite",
    "SigningKey",
    "Site",
    "StoraSend",
    "UnitState",
    "WebhookEvent",
]

#: Ids and names: Stora's ids are short (``site_…``), ours too.
ID = String(64)


class Base(DeclarativeBase):
    """The relay's metadata."""


class Operator(Base):
    """A Stora operator connected through OAuth, with its tokens and webhook endpoint."""

    __tablename__ = "operators"

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    #: ``connected``, ``reauth_required`` or ``disconnected`` (contract §7.1).
    status: Mapped[str] = mapped_column(String(20))
    access_token_enc: Mapped[str | None] = mapped_column(Text)
    refresh_token_enc: Mapped[str | None] = mapped_column(Text)
    token_expires_at: Mapped[float | None] = mapped_column(Float)
    token_lifetime_s: Mapped[float | None] = mapped_column(Float)
    scopes: Mapped[str] = mapped_column(Text, default="")
    last_refresh_at: Mapped[float | None] = mapped_column(Float)
    refreshes: Mapped[int] = mapped_column(Integer, default=0)
    #: The refresh lease (relay/tokens.py): until when (the database's clock) one worker
    #: may refresh, and which worker (the fencing value; ``None`` with a time: a failed
    #: refresh's back-off, when no worker may try again yet).
    refresh_lease_until: Mapped[float | None] = mapped_column(Float)
    refresh_lease_owner: Mapped[str | None] = mapped_column(String(32))
    #: The path key of this operator's webhook URL (``/webhooks/stora/{key}``).
    webhook_key: Mapped[str] = mapped_column(String(64), unique=True)
    webhook_endpoint_id: Mapped[str | None] = mapped_column(ID)
    webhook_secret_enc: Mapped[str | None] = mapped_column(Text)
    last_webhook_at: Mapped[float | None] = mapped_column(Float)
    reconciled_at: Mapped[float | None] = mapped_column(Float)
    #: Timeline Events the broker sent on to Stora, and those it answered 429 itself to
    #: keep within the operator's limits (a 429 from Stora avoided); every replica's.
    timeline_sent: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    timeline_throttled: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    connected_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)


class OperatorSite(Base):
    """A Stora site of a connected operator, as Stora lists it (registered or not)."""

    __tablename__ = "operator_sites"

    site_id: Mapped[str] = mapped_column(ID, primary_key=True)
    operator_id: Mapped[str] = mapped_column(ForeignKey("operators.id"), index=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    seen_at: Mapped[float] = mapped_column(Float)


class Site(Base):
    """A gateway site registered with ``sites add``: its credential and settings."""

    __tablename__ = "sites"

    site_id: Mapped[str] = mapped_column(ID, primary_key=True)
    operator_id: Mapped[str] = mapped_column(ForeignKey("operators.id"), index=True)
    credential_id: Mapped[str] = mapped_column(String(32), unique=True)
    credential_digest: Mapped[str] = mapped_column(String(64))
    timezone: Mapped[str] = mapped_column(String(64), default="UTC")
    #: JSON array of unit ids whose doors any current tenant may open (contract §7.6).
    shared_units: Mapped[str] = mapped_column(Text, default="[]")
    created_at: Mapped[float] = mapped_column(Float)
    revoked_at: Mapped[float | None] = mapped_column(Float)
    #: The gateway's retained ``P/S/status`` payload (JSON text) and when it came.
    status_json: Mapped[str | None] = mapped_column(Text)
    status_at: Mapped[float | None] = mapped_column(Float)
    #: Its ``online`` (``None``: never heard), for counting without reading the JSON.
    online: Mapped[bool | None] = mapped_column(Boolean)


class OAuthState(Base):
    """A ``state`` issued by ``/connect``: single use, expiring, with its PKCE verifier."""

    __tablename__ = "oauth_states"

    #: SHA-256 of the state (the state itself travels through the browser only).
    digest: Mapped[str] = mapped_column(String(64), primary_key=True)
    verifier_enc: Mapped[str] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[float] = mapped_column(Float)
    used_at: Mapped[float | None] = mapped_column(Float)


class SigningKey(Base):
    """An Ed25519 command signing key (``keys list`` / ``keys rotate``)."""

    __tablename__ = "signing_keys"

    kid: Mapped[str] = mapped_column(String(64), primary_key=True)
    private_key_enc: Mapped[str] = mapped_column(Text)
    #: base64url of the raw 32-byte public key (the gateway's ``trusted_keys`` format).
    public_key: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[float] = mapped_column(Float)
    retired_at: Mapped[float | None] = mapped_column(Float)


class ApiKey(Base):
    """A key of the unlock API (stored as a digest; printed once)."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    #: ``None`` for an ``admin`` key (the staff pages, every operator).
    operator_id: Mapped[str | None] = mapped_column(ForeignKey("operators.id"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    role: Mapped[str] = mapped_column(String(10))
    digest: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[float] = mapped_column(Float)
    revoked_at: Mapped[float | None] = mapped_column(Float)


class WebhookEvent(Base):
    """A webhook event accepted once: the dedupe record of ``(operator, event.id)``."""

    __tablename__ = "webhook_events"
    __table_args__ = (UniqueConstraint("operator_id", "event_id"),)

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    operator_id: Mapped[str] = mapped_column(ForeignKey("operators.id"))
    event_id: Mapped[str] = mapped_column(String(100))
    type: Mapped[str] = mapped_column(String(100))
    unit_id: Mapped[str | None] = mapped_column(ID)
    #: What it did: ``command``, ``older`` (dropped by ``ver``), ``unregistered_site``, …
    outcome: Mapped[str] = mapped_column(String(40))
    skew_s: Mapped[float] = mapped_column(Float)
    received_at: Mapped[float] = mapped_column(Float)


class UnitState(Base):
    """What the relay knows of a unit: Stora's status, its ``ver`` and the lockout wanted."""

    __tablename__ = "unit_states"

    operator_id: Mapped[str] = mapped_column(ForeignKey("operators.id"), primary_key=True)
    unit_id: Mapped[str] = mapped_column(ID, primary_key=True)
    site_id: Mapped[str] = mapped_column(ID, index=True)
    status: Mapped[str] = mapped_column(String(40))
    #: ``updated_at`` of the newest version processed, epoch milliseconds (contract §7.3).
    ver: Mapped[int] = mapped_column(BigInteger)
    lockout: Mapped[bool] = mapped_column(Boolean)
    #: The ``ver`` a gateway last confirmed (``done`` or ``stale_version``); while it is
    #: below ``ver`` on a registered site, the lockout or clear is sent again.
    confirmed_ver: Mapped[int | None] = mapped_column(BigInteger)
    updated_at: Mapped[float] = mapped_column(Float)


class Command(Base):
    """A signed command to a site: recorded before it is published (the MQTT outbox)."""

    __tablename__ = "commands"
    __table_args__ = (
        UniqueConstraint("api_key_id", "idempotency_key"),
        Index("ix_commands_unpublished", "published_at", "status"),
        Index("ix_commands_unit", "operator_id", "unit_id", "status"),
        Index("ix_commands_operator_created", "operator_id", "created_at"),
    )

    jti: Mapped[str] = mapped_column(String(64), primary_key=True)
    operator_id: Mapped[str] = mapped_column(ForeignKey("operators.id"), index=True)
    site_id: Mapped[str] = mapped_column(ID, index=True)
    unit_id: Mapped[str] = mapped_column(ID)
    cmd: Mapped[str] = mapped_column(String(20))
    ver: Mapped[int | None] = mapped_column(BigInteger)
    token: Mapped[str | None] = mapped_column(Text)
    #: ``pending`` (recorded or sent, no result), then the gateway's ``done``,
    #: ``rejected``, ``failed`` or ``unknown``, or ``timeout`` (contract §7.2).
    status: Mapped[str] = mapped_column(String(20))
    reason: Mapped[str | None] = mapped_column(String(40))
    duplicate: Mapped[bool] = mapped_column(Boolean, default=False)
    state_json: Mapped[str | None] = mapped_column(Text)
    origin: Mapped[str] = mapped_column(String(20))
    actor: Mapped[str | None] = mapped_column(String(200))
    api_key_id: Mapped[str | None] = mapped_column(String(32))
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[float] = mapped_column(Float)
    published_at: Mapped[float | None] = mapped_column(Float)
    #: The publish claim (relay/outbox.py): the replica that is publishing it now, and
    #: until when (its clock); no other replica publishes it before then.
    publish_claimed_by: Mapped[str | None] = mapped_column(String(32))
    publish_claim_until: Mapped[float | None] = mapped_column(Float)
    result_at: Mapped[float | None] = mapped_column(Float)


class StoraSend(Base):
    """A request the relay sent to Stora for an operator, when (the database's clock):
    the log of the per-operator rate limiter that every worker shares (relay/ratelimit.py).
    Rows older than the longest window are deleted as new ones come."""

    __tablename__ = "stora_sends"
    __table_args__ = (Index("ix_stora_sends_operator_sent", "operator_id", "sent_at"),)

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    operator_id: Mapped[str] = mapped_column(ForeignKey("operators.id"))
    sent_at: Mapped[float] = mapped_column(Float)
    #: What it was for (``refresh``, ``timeline_event``, ``connect``…), for diagnosis.
    purpose: Mapped[str] = mapped_column(String(40))


class JobLease(Base):
    """Which replica runs a background job now (relay/leases.py): the owner, until when
    (the database's clock), and the fencing counter, raised by every new holder."""

    __tablename__ = "job_leases"

    name: Mapped[str] = mapped_column(String(120), primary_key=True)
    owner: Mapped[str | None] = mapped_column(String(32))
    until: Mapped[float] = mapped_column(Float)
    fence: Mapped[int] = mapped_column(BigInteger)


class IdempotencyAlias(Base):
    """An ``Idempotency-Key`` answered with another request's command (a double tap
    while an unlock is pending): its retries get that command too, never a new one."""

    __tablename__ = "idempotency_aliases"

    api_key_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    idempotency_key: Mapped[str] = mapped_column(String(200), primary_key=True)
    jti: Mapped[str] = mapped_column(ForeignKey("commands.jti"))
    created_at: Mapped[float] = mapped_column(Float)
