"""The sections of the config file other than the controllers and the locks.

``[site]``, ``[mqtt]``, ``[commands]``, ``[stora]``, ``[storage]``, ``[control]`` and
``[telemetry]``: each parser reads its table with :class:`~gateway.config.reader.Table`
(every problem recorded, naming the key) and builds its dataclass; each ``no_*`` gives
the section a missing or unreadable one stands for while the rest is checked.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

from gateway.config.model import (
    DEFAULT_DB,
    DEFAULT_SOCKET,
    MQTT_MAX_PACKET_BYTES,
    MQTT_MAX_PACKET_RANGE,
    TELEMETRY_INTERVAL_RANGE,
    TELEMETRY_INTERVAL_S,
    CommandsConfig,
    ControlConfig,
    MqttConfig,
    SiteConfig,
    StoraAuth,
    StoraConfig,
    StorageConfig,
    TelemetryConfig,
)
from gateway.config.reader import Table, check_stora_id, check_topic_segment, os_reason, show

__all__ = [
    "COMMANDS_KEYS",
    "EVENT_SCOPE",
    "MQTT_KEYS",
    "SITE_KEYS",
    "STORA_KEYS",
    "TELEMETRY_KEYS",
    "no_commands",
    "no_site",
    "no_stora",
    "parse_commands",
    "parse_control",
    "parse_mqtt",
    "parse_site",
    "parse_stora",
    "parse_storage",
    "parse_telemetry",
]


SITE_KEYS: Final = frozenset({"id", "app_name"})


def parse_site(t: Table) -> SiteConfig:
    t.check_keys(SITE_KEYS)
    site_id = t.get_str("id")
    if t.ok("id") and check_stora_id(t, "id", site_id, "site_", "site id"):
        check_topic_segment(t, "id", site_id)
    return SiteConfig(id=site_id, app_name=t.get_str("app_name", nonempty=True))


def no_site() -> SiteConfig:
    return SiteConfig(id="", app_name="")


MQTT_KEYS: Final = frozenset({
    "host", "port", "topic_prefix", "client_id", "username", "password_file", "tls",
    "ca_file", "cert_file", "key_file", "keepalive_s", "max_packet_bytes",
})


def parse_mqtt(t: Table, site: SiteConfig) -> MqttConfig:
    t.check_keys(MQTT_KEYS)
    host = t.get_str("host", "127.0.0.1", nonempty=True)
    port = t.get_int("port", 1883, 1, 65535)
    if t.ok("host") and "\0" in host:
        t.error("host", f"must not contain a NUL character, found {show(host)}")
    max_packet_bytes = t.get_int("max_packet_bytes", MQTT_MAX_PACKET_BYTES,
                                 *MQTT_MAX_PACKET_RANGE)
    topic_prefix = t.get_topic("topic_prefix", "stora-gw")
    client_id = t.get_str("client_id", "").strip() or f"stora-gw-{site.id}"
    username = t.get_str("username", "")
    password_file = t.get_secret_file("password_file")
    tls = t.get_bool("tls", False)
    ca_file = t.get_file("ca_file")
    cert_file = t.get_file("cert_file")
    key_file = t.get_secret_file("key_file")
    keepalive_s = t.get_int("keepalive_s", 30, 5, 3600)
    if tls and host.startswith("/") and t.ok("tls", "host"):
        # TLS checks the broker's name, which a socket path is not; the socket's
        # directory permissions are what keeps others out (deploy/README.md).
        t.error("tls", "must be false when mqtt.host is a unix socket path")
    if tls and ca_file is None and t.ok("tls", "ca_file"):
        t.error("ca_file", "required when mqtt.tls = true (the CA that signed the broker)")
    if (cert_file is None) != (key_file is None) and t.ok("cert_file", "key_file"):
        missing = "key_file" if key_file is None else "cert_file"
        t.error(missing, "cert_file and key_file go together for a client certificate")
    return MqttConfig(
        host=host, port=port, topic_prefix=topic_prefix, client_id=client_id,
        username=username, password_file=password_file, tls=tls, ca_file=ca_file,
        cert_file=cert_file, key_file=key_file, keepalive_s=keepalive_s,
        max_packet_bytes=max_packet_bytes,
    )


COMMANDS_KEYS: Final = frozenset({"trusted_keys", "clock_skew_s", "max_lifetime_s", "clock"})


def parse_commands(t: Table) -> CommandsConfig:
    t.check_keys(COMMANDS_KEYS)
    keys_table = t.table("trusted_keys", required=True)
    trusted = _parse_trusted_keys(t, keys_table) if keys_table is not None else {}
    return CommandsConfig(
        trusted_keys=MappingProxyType(trusted),
        clock_skew_s=t.get_int("clock_skew_s", 30, 0, 600),
        max_lifetime_s=t.get_int("max_lifetime_s", 300, 1, 86400),
        clock=t.get_choice("clock", "ntp", {"ntp": "ntp", "system": "system"}),
    )


def _parse_trusted_keys(t: Table, keys_table: Table) -> dict[str, bytes]:
    """Each key id and its raw public key; a bad key does not stop the others."""
    if not keys_table.data:
        t.error("trusted_keys", "must hold at least one key: kid = \"<Ed25519 public key>\"")
    trusted: dict[str, bytes] = {}
    for raw_kid in keys_table.data:
        kid = str(raw_kid)
        if not kid.strip():
            keys_table.error(kid, "a key id (kid) must not be empty")
            continue
        text = keys_table.get_str(kid)
        if keys_table.ok(kid):
            with keys_table.checking(kid):
                trusted[kid] = _parse_public_key(keys_table, kid, text)
    return trusted


def no_commands() -> CommandsConfig:
    return CommandsConfig(trusted_keys=MappingProxyType({}), clock_skew_s=30,
                          max_lifetime_s=300)


_B64URL: Final = re.compile(r"[A-Za-z0-9_-]+={0,2}")


def parse_storage(t: Table) -> StorageConfig:
    t.check_keys({"path"})
    return StorageConfig(path=t.get_path("path", DEFAULT_DB))


def parse_control(t: Table) -> ControlConfig:
    t.check_keys({"socket"})
    return ControlConfig(socket=t.get_path("socket", DEFAULT_SOCKET))


TELEMETRY_KEYS: Final = frozenset({"interval_s", "prometheus_textfile"})


def parse_telemetry(t: Table) -> TelemetryConfig:
    t.check_keys(TELEMETRY_KEYS)
    interval = t.get_int("interval_s", TELEMETRY_INTERVAL_S, *TELEMETRY_INTERVAL_RANGE)
    textfile = t.get_opt_path("prometheus_textfile")
    # node_exporter's textfile collector reads only *.prom (Path(".prom").suffix is ""):
    # any other name would be written faithfully and never scraped, unnoticed.
    if textfile is not None and textfile.suffix != ".prom":
        t.error("prometheus_textfile",
                "must name a *.prom file (node_exporter's textfile collector reads no "
                f"other), found {show(t.data['prometheus_textfile'])}")
    return TelemetryConfig(interval_s=interval, prometheus_textfile=textfile)


def _parse_public_key(t: Table, kid: str, text: str) -> bytes:
    """Raw 32 Ed25519 public-key bytes from PEM or from base64url of the raw bytes."""
    wanted = (
        "expected an Ed25519 public key as PEM (-----BEGIN PUBLIC KEY-----) or as "
        "base64url of the raw 32 bytes"
    )
    stripped = text.strip()
    if stripped.startswith("-----BEGIN"):
        # Imported only for PEM: cryptography is a noticeable share of a Pi's cold start,
        # and every CLI command loads the config.
        from cryptography.exceptions import UnsupportedAlgorithm
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        try:
            key = serialization.load_pem_public_key(stripped.encode("utf-8"))
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            t.fail(kid, f"not a valid PEM public key ({os_reason(exc)}); {wanted}")
        if not isinstance(key, Ed25519PublicKey):
            t.fail(kid, f"the PEM key is not Ed25519 ({type(key).__name__}); {wanted}")
        return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    if not _B64URL.fullmatch(stripped):
        t.fail(kid, f"{wanted}, found {show(text)}")
    unpadded = stripped.rstrip("=")
    try:
        raw = base64.urlsafe_b64decode(unpadded + "=" * (-len(unpadded) % 4))
    except (binascii.Error, ValueError):
        t.fail(kid, f"not valid base64url; {wanted}")
    if len(raw) != 32:
        t.fail(kid, f"decodes to {len(raw)} bytes, not 32; {wanted}")
    # Any 32 bytes load as an Ed25519 public key (cryptography checks only the length);
    # the verifier builds the key objects when the agent starts.
    return raw


STORA_KEYS: Final = frozenset({
    "base_url", "auth", "token_url", "client_id", "client_secret_file", "token_file",
    "scope", "timeline_source_id", "timeline_template_id", "max_per_second",
    "max_per_minute",
})
_AUTH_MODES: Final[Mapping[str, StoraAuth]] = {
    "client_credentials": "client_credentials", "static": "static", "broker": "broker",
}
_DEFAULT_BASE_URL: Final = "https://public-api.stora.co/2025-09"
_DEFAULT_TOKEN_URL: Final = "https://public-api.stora.co/oauth2/token"  # noqa: S105 - a URL
#: The scope ``POST /timeline/events`` needs (stora-api §3.2): a client credential
#: asking without it gets a token every event post is refused with (403).
EVENT_SCOPE: Final = "public.timeline_event:write"
#: stora-api §2.6: scopes are named ``public.<resource>:read|write``.
_SCOPE_RE: Final = re.compile(r"public\.[a-z_]+:(read|write)")


def parse_stora(t: Table) -> StoraConfig:
    t.check_keys(STORA_KEYS)
    base_url = t.get_url("base_url", _DEFAULT_BASE_URL)
    auth = t.get_choice("auth", "client_credentials", _AUTH_MODES)
    token_url = t.get_url("token_url", _DEFAULT_TOKEN_URL)
    client_id = t.get_str("client_id", "")
    client_secret_file = t.get_secret_file("client_secret_file")
    token_file = t.get_secret_file("token_file")
    scope = t.get_str("scope", EVENT_SCOPE)
    if t.ok("scope"):
        _check_scope(t, scope, auth)
    timeline_source_id = t.get_str("timeline_source_id", nonempty=True)
    if t.ok("timeline_source_id"):
        check_stora_id(t, "timeline_source_id", timeline_source_id, "tsrc_",
                       "timeline source id")
    timeline_template_id = t.get_str("timeline_template_id", "")
    if timeline_template_id and t.ok("timeline_template_id"):
        check_stora_id(t, "timeline_template_id", timeline_template_id, "aetpl_",
                       "timeline template id")
    # Stora's documented limits are per second and per minute; no sane limit is higher.
    max_per_second = t.get_int("max_per_second", 10, 1, 10_000)
    max_per_minute = t.get_int("max_per_minute", 60, 1, 600_000)
    if not t.ok("auth"):
        pass  # which credential keys are needed depends on the mode
    elif auth == "client_credentials":
        if not client_id.strip() and t.ok("client_id"):
            t.error("client_id", 'required when stora.auth = "client_credentials"')
        if client_secret_file is None and t.ok("client_secret_file"):
            t.error("client_secret_file", 'required when stora.auth = "client_credentials"')
    elif token_file is None and t.ok("token_file"):
        t.error("token_file", f'required when stora.auth = "{auth}"')
    if max_per_minute < max_per_second and t.ok("max_per_second", "max_per_minute"):
        t.error(
            "max_per_minute",
            f"must be at least max_per_second ({max_per_second}), found {max_per_minute}",
        )
    return StoraConfig(
        base_url=base_url, auth=auth, token_url=token_url, client_id=client_id,
        client_secret_file=client_secret_file, token_file=token_file, scope=scope,
        timeline_source_id=timeline_source_id, timeline_template_id=timeline_template_id,
        max_per_second=max_per_second, max_per_minute=max_per_minute,
    )


def _check_scope(t: Table, scope: str, auth: StoraAuth) -> None:
    """The scopes a client credential asks for: Stora's shape, and the one events need.

    Only ``client_credentials`` sends ``scope``; a static or broker token carries the
    scopes it was made with, which the gateway cannot see.
    """
    if auth != "client_credentials":
        return
    names = scope.split()
    wrong = [name for name in names if not _SCOPE_RE.fullmatch(name)]
    if wrong:
        t.error("scope", f"{show(wrong[0])} is not a Stora scope (public.<resource>:read "
                         "or :write, separated by spaces)")
    elif EVENT_SCOPE not in names:
        t.error("scope", f"must include {EVENT_SCOPE}: without it Stora refuses every "
                         f"Timeline Event (403), found {show(scope)}")


def no_stora() -> StoraConfig:
    return StoraConfig(
        base_url=_DEFAULT_BASE_URL, auth="client_credentials", token_url=_DEFAULT_TOKEN_URL,
        client_id="", client_secret_file=None, token_file=None, scope=EVENT_SCOPE,
        timeline_source_id="", timeline_template_id="", max_per_second=10,
        max_per_minute=60,
    )
