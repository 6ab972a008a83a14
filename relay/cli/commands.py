"""One function per ``stora-relay`` command (contract §7.1).

Every command that opens the database applies pending migrations first, as ``run``
does, so a fresh install needs no separate step (``db upgrade`` remains for deployments
that migrate before starting replicas).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
from typing import Any, TextIO

from relay.apikeys import ApiKeys
from relay.cli.render import ago, table, when
from relay.config import RelayConfig, default_config_path, load_config
from relay.crypto import Keyring
from relay.db.engine import Database
from relay.db.migrate import upgrade
from relay.keys import SigningKeys, trusted_keys_line
from relay.operators import Operators
from relay.rekey import reencrypt, still_under_old_keys
from relay.sites import SiteInfo, SiteRegistry

__all__ = ["Context"]


class Context:
    """A command's arguments, its output streams, and what it opens, once."""

    def __init__(self, args: argparse.Namespace, out: TextIO, err: TextIO) -> None:
        self.args = args
        self.out = out
        self.err = err

    @property
    def json(self) -> bool:
        """Whether ``--json`` was given."""
        return bool(getattr(self.args, "json", False))

    @functools.cached_property
    def config(self) -> RelayConfig:
        """The configuration (a ConfigError with every problem)."""
        path = getattr(self.args, "config", None)
        return load_config(default_config_path() if path is None else path)

    @functools.cached_property
    def keyring(self) -> Keyring:
        """The data keys."""
        return Keyring.from_file(self.config.secrets.data_key_file,
                                 config_file=self.config.path)

    @functools.cached_property
    def db(self) -> Database:
        """The database, migrated to this release."""
        db = Database(self.config.database.url)
        upgrade(db)
        return db

    def close(self) -> None:
        """Close the database if the command opened it (PostgreSQL's connections)."""
        db = self.__dict__.pop("db", None)
        if isinstance(db, Database):
            db.close()

    def emit(self, data: Any, rows: list[list[str]], headers: list[str]) -> None:
        """Print ``data`` as JSON with ``--json``, else ``rows`` as a table."""
        if self.json:
            self.out.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
        else:
            self.out.write(table(headers, rows))


def run(ctx: Context) -> int:
    """``run``: the server, which loads the web framework (kept out of other commands)."""
    server = importlib.import_module("relay.server")
    status: int = server.serve(ctx.config, ctx.keyring)
    return status


def check_config(ctx: Context) -> int:
    """``check-config``: the whole file, and the data key file it names."""
    config = ctx.config
    keyring = ctx.keyring
    if ctx.json:
        ctx.out.write(json.dumps({"ok": True, "path": str(config.path),
                                  "data_keys": list(keyring.kids)}) + "\n")
    else:
        ctx.out.write(f"{config.path}: OK (database {config.database.url.split('://')[0]}, "
                      f"{len(keyring.kids)} data key(s), current {keyring.current_kid})\n")
    return 0


def db_upgrade(ctx: Context) -> int:
    """``db upgrade``."""
    db = Database(ctx.config.database.url)
    try:
        applied = upgrade(db)
    finally:
        db.close()
    ctx.out.write(f"applied {', '.join(applied)}\n" if applied else "already up to date\n")
    return 0


def db_reencrypt(ctx: Context) -> int:
    """``db reencrypt``."""
    counts = reencrypt(ctx.db, ctx.keyring)
    left = still_under_old_keys(ctx.db, ctx.keyring)
    moved = ", ".join(f"{n} {what}" for what, n in sorted(counts.items())) or "nothing"
    ctx.out.write(f"re-encrypted under {ctx.keyring.current_kid}: {moved}; "
                  f"{left} value(s) still under an older key\n")
    return 0 if left == 0 else 1


def _keys(ctx: Context) -> SigningKeys:
    return SigningKeys(ctx.db, ctx.keyring)


def keys_list(ctx: Context) -> int:
    """``keys list``."""
    keys = _keys(ctx).list()
    ctx.emit([{"kid": k.kid, "public_key": k.public_key, "created_at": when(k.created_at),
               "retired_at": when(k.retired_at)} for k in keys],
             [[k.kid, k.public_key, when(k.created_at) or "", when(k.retired_at) or "-"]
              for k in keys], ["KID", "PUBLIC KEY", "CREATED", "RETIRED"])
    if not ctx.json and keys:
        ctx.out.write(f"\nfor each gateway's [commands]:\n{trusted_keys_line(keys)}\n")
    return 0


def keys_rotate(ctx: Context) -> int:
    """``keys rotate``."""
    signing = _keys(ctx)
    key = signing.rotate()
    if ctx.json:
        ctx.out.write(json.dumps({"kid": key.kid, "public_key": key.public_key}) + "\n")
    else:
        ctx.out.write(f"{key.kid} signs from now on; older keys stay published until "
                      f"retired.\nfor each gateway's [commands]:\n"
                      f"{trusted_keys_line(signing.list())}\n")
    return 0


def keys_retire(ctx: Context) -> int:
    """``keys retire KID``."""
    key = _keys(ctx).retire(ctx.args.kid)
    ctx.out.write(f"{key.kid} retired; remove it from each gateway's trusted_keys\n")
    return 0


def operators_list(ctx: Context) -> int:
    """``operators list``."""
    found = Operators(ctx.db, ctx.keyring).list()
    ctx.emit([{"id": o.id, "name": o.name, "status": o.status, "sites": list(o.sites),
               "registered_sites": list(o.registered_sites),
               "last_webhook_at": when(o.last_webhook_at),
               "last_refresh_at": when(o.last_refresh_at)} for o in found],
             [[o.id, o.name, o.status, str(len(o.sites)), str(len(o.registered_sites)),
               ago(o.last_webhook_at), ago(o.last_refresh_at)] for o in found],
             ["ID", "NAME", "STATUS", "SITES", "REGISTERED", "LAST WEBHOOK", "LAST REFRESH"])
    return 0


def _snippet(ctx: Context, site: SiteInfo, credential_file: str) -> str:
    config = ctx.config
    keys = SigningKeys(ctx.db, ctx.keyring)
    keys.current()  # a relay that has never signed makes its first key now
    return (
        "[site]\n"
        f'id = "{site.site_id}"\n'
        f'app_name = "{config.relay.app_name}"\n\n'
        "[commands]\n"
        f"{trusted_keys_line(keys.list())}\n\n"
        "[stora]\n"
        f'base_url = "{config.relay.public_url}/stora/2025-09"\n'
        'auth = "broker"\n'
        f'timeline_source_id = "{config.stora.timeline_source_id}"\n'
        f'token_file = "{credential_file}"   # holds the credential above, chmod 600\n\n'
        "[mqtt]\n"
        f'topic_prefix = "{config.mqtt.topic_prefix}"\n'
        f"# the gateway publishes {config.mqtt.topic_prefix}/{site.site_id}/… and bridges "
        "them to the relay's broker\n"
    )


def sites_add(ctx: Context) -> int:
    """``sites add SITE --operator OP [--timezone ZONE] [--shared UNIT…]``."""
    a = ctx.args
    site, credential = SiteRegistry(ctx.db).add(a.site, a.operator,
                                                timezone=a.timezone or "UTC",
                                                shared=a.shared or ())
    credential_file = "/etc/stora-gateway/secrets/relay-credential"
    snippet = _snippet(ctx, site, credential_file)
    if ctx.json:
        ctx.out.write(json.dumps({"site": site.site_id, "operator": site.operator_id,
                                  "credential": credential, "config": snippet}) + "\n")
    else:
        ctx.out.write(
            f"site {site.site_id} registered for operator {site.operator_id}.\n\n"
            f"Its gateway's credential (shown only now; put it in {credential_file}):\n"
            f"  {credential}\n\n"
            f"Its gateway's config:\n\n{snippet}")
    return 0


def sites_set(ctx: Context) -> int:
    """``sites set SITE [--timezone ZONE] [--shared UNIT…]``."""
    a = ctx.args
    site = SiteRegistry(ctx.db).set(a.site, timezone=a.timezone, shared=a.shared)
    ctx.out.write(f"site {site.site_id}: time zone {site.timezone}, shared units "
                  f"{', '.join(site.shared_units) or 'none'}\n")
    return 0


def sites_list(ctx: Context) -> int:
    """``sites list``."""
    found = SiteRegistry(ctx.db).list(ctx.args.operator)

    def gateway(s: SiteInfo) -> str:
        return "revoked" if s.revoked_at else {None: "never seen", True: "online",
                                                False: "offline"}[s.online]

    ctx.emit([{"site": s.site_id, "operator": s.operator_id, "timezone": s.timezone,
               "shared_units": list(s.shared_units), "gateway": gateway(s),
               "status": s.status, "status_at": when(s.status_at),
               "revoked_at": when(s.revoked_at)} for s in found],
             [[s.site_id, s.operator_id, s.timezone, gateway(s), ago(s.status_at)]
              for s in found], ["SITE", "OPERATOR", "TIME ZONE", "GATEWAY", "SINCE"])
    return 0


def sites_revoke(ctx: Context) -> int:
    """``sites revoke SITE``."""
    site = SiteRegistry(ctx.db).revoke(ctx.args.site)
    ctx.out.write(f"site {site.site_id}: credential revoked\n")
    return 0


def api_keys_create(ctx: Context) -> int:
    """``api-keys create [--operator OP] --name TEXT [--role app|staff|admin]``."""
    a = ctx.args
    key, text = ApiKeys(ctx.db).create(a.operator, a.name, a.role)
    if ctx.json:
        ctx.out.write(json.dumps({"id": key.id, "operator": key.operator_id, "name": key.name,
                                  "role": key.role, "key": text}) + "\n")
    else:
        whose = f"for {key.operator_id}" if key.operator_id else "for the staff pages"
        ctx.out.write(f"API key {key.id} ({key.role}) {whose}, shown only now:\n  {text}\n")
    return 0


def api_keys_list(ctx: Context) -> int:
    """``api-keys list``."""
    found = ApiKeys(ctx.db).list(ctx.args.operator)
    ctx.emit([{"id": k.id, "operator": k.operator_id, "name": k.name, "role": k.role,
               "created_at": when(k.created_at), "revoked_at": when(k.revoked_at)}
              for k in found],
             [[k.id, k.operator_id or "-", k.name, k.role, when(k.created_at) or "",
               when(k.revoked_at) or "-"] for k in found],
             ["ID", "OPERATOR", "NAME", "ROLE", "CREATED", "REVOKED"])
    return 0


def api_keys_revoke(ctx: Context) -> int:
    """``api-keys revoke ID``."""
    key = ApiKeys(ctx.db).revoke(ctx.args.id)
    ctx.out.write(f"API key {key.id} revoked\n")
    return 0
